"""Noise processes and the ELBO proxy: one denoising error per sample.

Every alignment method is a function of per-sample denoising errors
``L(x0, c; eps, t)``, the ELBO proxy of -log p(x0 | c) that Diffusion-DPO (Wallace et al.,
2023) builds on. A noise process owns how ``x_t`` is made,
what the network regresses onto and how timesteps are drawn; it returns one
error per sample and never averages over the batch (the loop does that once).

Supported: DDPM with epsilon- or v-prediction (SD 1.x/2.x/SDXL; the
prediction type is read from the scheduler config, never assumed) and
rectified flow (SD3/SD3.5: ``x_t = (1-s) x0 + s eps``, target ``eps - x0``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import torch
from torch import Tensor

DISTILLED_TIMESTEPS = (249, 499, 749, 999)


@dataclass
class NoisedBatch:
    """What a network sees and what it should predict. Shapes: noisy/target [N, C, H, W], timesteps [N]."""

    noisy: Tensor
    timesteps: Tensor
    target: Tensor


class NoiseProcess(Protocol):
    """The training-time forward process of a base model."""

    name: str

    def sample_timesteps(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """Draw ``n`` training times (one per group: images of a group share it)."""
        ...

    def noise(self, x0: Tensor, eps: Tensor, t: Tensor) -> NoisedBatch:
        """Make ``x_t`` from clean latents ``x0`` [N, ...] and noise ``eps`` at times ``t`` [N]."""
        ...


def _expand(values: Tensor, like: Tensor) -> Tensor:
    """Broadcast per-sample scalars [N] over the remaining dims of ``like``."""
    return values.reshape(-1, *([1] * (like.ndim - 1))).to(dtype=like.dtype, device=like.device)


# diffusers' Euler/DPM-Solver schedulers: "close to 0 without being 0 so first sigma is not inf".
ZERO_SNR_TERMINAL_ALPHA_BAR = 2.0**-24


class DDPMProcess:
    """DDPM forward process: ``x_t = sqrt(ab_t) x0 + sqrt(1-ab_t) eps`` (Ho et al. 2020, eq. 4).

    Target: ``eps`` (epsilon-prediction) or ``v = sqrt(ab_t) eps - sqrt(1-ab_t) x0``
    (v-prediction, Salimans & Ho 2022, sec. 4). ``timestep_mode='distilled'``
    maps ``t -> 250 (t mod 4) + 249`` so only the four timesteps a Turbo-style
    model was distilled on are used (as Diffusion-DPO's public training code does for
    Turbo models; Wallace et al., 2023).
    """

    name = "ddpm"

    def __init__(
        self,
        alphas_cumprod: Tensor,
        prediction_type: str,
        timestep_mode: Literal["uniform", "distilled"] = "uniform",
    ) -> None:
        if prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(
                f"unsupported DDPM prediction_type {prediction_type!r}; diffalign trains 'epsilon' and 'v_prediction' models"
            )
        if timestep_mode not in ("uniform", "distilled"):
            raise ValueError(f"unknown timestep_mode {timestep_mode!r}; valid: 'uniform', 'distilled'")
        self.alphas_cumprod = alphas_cumprod.to(torch.float64)
        self.prediction_type = prediction_type
        self.timestep_mode = timestep_mode
        self.num_train_timesteps = len(alphas_cumprod)
        if timestep_mode == "distilled" and self.num_train_timesteps != 1000:
            raise ValueError("timestep_mode 'distilled' assumes 1000 training timesteps")

    @classmethod
    def from_scheduler_config(
        cls, config: dict[str, Any], timestep_mode: str = "uniform", zero_terminal_snr: bool = False
    ) -> "DDPMProcess":
        """Build from any DDPM-family scheduler config (PNDM, DDIM, Euler...), as the official scripts do.

        ``zero_terminal_snr``: rescale the betas so the last timestep is pure noise (Lin et al. 2024,
        "Common Diffusion Noise Schedules and Sample Steps are Flawed", alg. 1), through diffusers' own
        ``rescale_betas_zero_snr``, as the reference DPO scripts do for SDXL-Turbo. The terminal
        alpha-bar is then set to 2**-24 instead of 0, as diffusers' Euler and DPM-Solver schedulers do,
        so an epsilon-prediction model's x0 estimate stays finite at t = T; training, the few-step
        sampler and PSO's reference images all read this one table.
        """
        from diffusers import DDPMScheduler

        if "prediction_type" not in config:
            raise ValueError("scheduler config has no 'prediction_type'; cannot tell epsilon from v-prediction")
        if zero_terminal_snr:
            config = {**config, "rescale_betas_zero_snr": True}
        scheduler = DDPMScheduler.from_config(config)
        alphas_cumprod = scheduler.alphas_cumprod.clone()
        if zero_terminal_snr:
            alphas_cumprod[-1] = ZERO_SNR_TERMINAL_ALPHA_BAR
        return cls(alphas_cumprod, config["prediction_type"], timestep_mode)  # type: ignore[arg-type]

    def sample_timesteps(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        t = torch.randint(0, self.num_train_timesteps, (n,), generator=generator)
        if self.timestep_mode == "distilled":
            t = 250 * (t % 4) + 249
        return t

    def noise(self, x0: Tensor, eps: Tensor, t: Tensor) -> NoisedBatch:
        alpha_bar = self.alphas_cumprod.to(x0.device)[t.to(x0.device)]
        sqrt_ab = _expand(alpha_bar.sqrt(), x0)
        sqrt_one_minus_ab = _expand((1.0 - alpha_bar).sqrt(), x0)
        noisy = sqrt_ab * x0 + sqrt_one_minus_ab * eps
        if self.prediction_type == "epsilon":
            target = eps
        else:
            target = sqrt_ab * eps - sqrt_one_minus_ab * x0
        return NoisedBatch(noisy=noisy, timesteps=t.to(x0.device), target=target)


class RectifiedFlowProcess:
    """Rectified flow (Esser et al. 2024, SD3): ``x_t = (1-s) x0 + s eps``, target ``eps - x0``.

    Sigmas come from the scheduler's (shifted) table; the training index is
    drawn with the density diffusers' SD3 recipe uses
    (``compute_density_for_timestep_sampling``: logit-normal by default).
    No loss weighting inside L, as public Flow-DPO code does.
    """

    name = "rectified_flow"

    def __init__(
        self,
        sigmas: Tensor,
        timesteps: Tensor,
        weighting: Literal["logit_normal", "uniform", "mode"] = "logit_normal",
        logit_mean: float = 0.0,
        logit_std: float = 1.0,
        mode_scale: float = 1.29,
    ) -> None:
        if weighting not in ("logit_normal", "uniform", "mode"):
            raise ValueError(f"unknown flow weighting {weighting!r}; valid: logit_normal, uniform, mode")
        self.sigmas = sigmas.to(torch.float32)
        self.timestep_values = timesteps.to(torch.float32)
        self.num_train_timesteps = len(timesteps)
        self.weighting = weighting
        self.logit_mean, self.logit_std, self.mode_scale = logit_mean, logit_std, mode_scale

    @classmethod
    def from_scheduler_config(cls, config: dict[str, Any], **density: Any) -> "RectifiedFlowProcess":
        """Build from a FlowMatchEulerDiscreteScheduler config, reading its shifted sigma table."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        scheduler = FlowMatchEulerDiscreteScheduler.from_config(config)
        sigmas = scheduler.sigmas[: len(scheduler.timesteps)]
        return cls(sigmas, scheduler.timesteps, **density)

    def sample_timesteps(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """Indices into the sigma table (the SD3 script's ``u * num_train_timesteps``)."""
        if self.weighting == "logit_normal":
            u = torch.sigmoid(torch.normal(self.logit_mean, self.logit_std, (n,), generator=generator))
        elif self.weighting == "mode":
            u = torch.rand((n,), generator=generator)
            u = 1 - u - self.mode_scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
        else:
            u = torch.rand((n,), generator=generator)
        return (u * self.num_train_timesteps).long().clamp(0, self.num_train_timesteps - 1)

    def noise(self, x0: Tensor, eps: Tensor, t: Tensor) -> NoisedBatch:
        index = t.cpu()
        sigma = _expand(self.sigmas[index], x0)
        noisy = (1.0 - sigma) * x0 + sigma * eps
        return NoisedBatch(noisy=noisy, timesteps=self.timestep_values[index].to(x0.device), target=eps - x0)


def noise_process_from_scheduler(
    config: dict[str, Any],
    timestep_mode: str = "uniform",
    flow_weighting: str = "logit_normal",
    flow_logit_mean: float = 0.0,
    flow_logit_std: float = 1.0,
    flow_mode_scale: float = 1.29,
    zero_terminal_snr: bool = False,
) -> NoiseProcess:
    """Pick the process from the scheduler config a pipeline ships with."""
    class_name = str(config.get("_class_name", ""))
    if class_name.startswith("FlowMatch"):
        if timestep_mode != "uniform":
            raise ValueError("timestep_mode 'distilled' applies to DDPM models, not rectified flow")
        if zero_terminal_snr:
            raise ValueError("model.zero_terminal_snr applies to DDPM models; rectified flow already ends in pure noise")
        return RectifiedFlowProcess.from_scheduler_config(
            config,
            weighting=flow_weighting,  # type: ignore[arg-type]
            logit_mean=flow_logit_mean,
            logit_std=flow_logit_std,
            mode_scale=flow_mode_scale,
        )
    return DDPMProcess.from_scheduler_config(config, timestep_mode, zero_terminal_snr)


def per_sample_error(prediction: Tensor, target: Tensor) -> Tensor:
    """Mean squared error over every dim but the first, in float32: [N, ...] -> [N]."""
    diff = prediction.float() - target.float()
    return diff.pow(2).flatten(1).mean(dim=1)
