"""Few-step stochastic sampling with per-transition Gaussian log-probabilities.

Why: PSO (Miao et al., 2024, "Tuning Timestep-Distilled Diffusion Model Using Pairwise
Sample Optimization") pairs training images with images sampled from the
current distilled model by its own few-step sampler, and its online variant
needs ``log pi(x_{k+1} | x_k)`` of every stochastic transition under the policy
and under the reference, so the ratio ``pi_theta / pi_ref`` can be clipped.

One sampler covers every noise process in :mod:`diffalign.noise`. A network
prediction at ``(x_t, t)`` is turned into ``x0_hat`` and ``eps_hat``; with
``x_t = a_t x0 + b_t eps`` (DDPM: ``a = sqrt(ab)``, ``b = sqrt(1 - ab)``; flow:
``a = 1 - sigma``, ``b = sigma``) one step is the DDIM update with noise
(Song et al. 2021, eq. 12)::

    x_prev = a_prev x0_hat + sqrt(b_prev^2 - s^2) eps_hat + s z,   z ~ N(0, I)

so each transition is Gaussian with mean ``mu_theta(x_k)`` and std ``s``. The
last step lands on ``x0`` (``b_prev = 0``) and is deterministic. Samples are
unguided (no classifier-free guidance), as distilled models are run.

This module is pure: it never imports trainers, scorers or apps.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise
from typing import Literal

import numpy as np
import PIL.Image
import torch
from torch import Tensor

from diffalign.backbones import Backbone, Conditioning
from diffalign.noise import DISTILLED_TIMESTEPS, DDPMProcess, NoiseProcess, RectifiedFlowProcess
from diffalign.prediction import Network, predict

__all__ = [
    "FewStepSampler", "LogProbReduction", "StepCoefficients", "Trajectory",
    "ddpm_trailing_timesteps", "flow_sigmas", "gaussian_log_prob", "generate_images", "sampling_conditioning", "to_pil",
]  # fmt: skip


@dataclass
class Trajectory:
    """One sampled chain per sample. latents [S+1, N, C, h, w] (x_T ... x_0); timesteps [S] (fed to the
    network at each step); stochastic [S] bool (transitions with s > 0: only these have log-probs)."""

    latents: Tensor
    timesteps: Tensor
    stochastic: Tensor

    @property
    def final(self) -> Tensor:
        """The clean latents x_0 [N, C, h, w]."""
        return self.latents[-1]

    @property
    def num_samples(self) -> int:
        return self.latents.shape[1]

    def select(self, indices: Tensor | Sequence[int]) -> Trajectory:
        """The chains of some samples (e.g. the winner of each pair), schedule unchanged."""
        index = torch.as_tensor(indices, dtype=torch.long, device=self.latents.device)
        return Trajectory(self.latents.index_select(1, index), self.timesteps, self.stochastic)


@dataclass(frozen=True)
class StepCoefficients:
    """One transition x_t -> x_prev: x_t = a x0 + b eps, x_prev = a_prev x0_hat + direction eps_hat + std z."""

    a: float
    b: float
    a_prev: float
    b_prev: float
    std: float

    @property
    def direction(self) -> float:
        return math.sqrt(max(self.b_prev**2 - self.std**2, 0.0))


def ddpm_trailing_timesteps(num_train_timesteps: int, num_steps: int) -> list[int]:
    """Evenly spaced, starting at the last training timestep (DDIM's ``timestep_spacing='trailing'``).

    1000 steps, 4 samples -> [999, 749, 499, 249]: SDXL-Turbo's distilled set.
    """
    if not 1 <= num_steps <= num_train_timesteps:
        raise ValueError(f"num_steps must be in 1..{num_train_timesteps}, got {num_steps}")
    spaced = np.round(np.arange(num_train_timesteps, 0, -num_train_timesteps / num_steps)).astype(np.int64) - 1
    return [int(t) for t in spaced]


def _static_shift(table: Tensor) -> float:
    """The ``shift`` that made a FlowMatchEulerDiscreteScheduler's sigma table from linear sigmas.

    Row i of the table is ``shift u / (1 + (shift - 1) u)`` with ``u = (T - i) / T``,
    so ``shift = sigma (1 - u) / (u (1 - sigma))``. Read off the middle rows,
    rounded to 4 decimals (config values are like 3.0), and checked on the whole table.
    """
    sigmas = table.double()
    count = len(sigmas)
    u = (count - torch.arange(count, dtype=torch.float64)) / count
    middle = slice(count // 10, count - count // 10) if count >= 10 else slice(0, count)
    inner = (sigmas[middle] > 0) & (sigmas[middle] < 1)
    if not inner.any():
        raise ValueError("cannot read a shift from this flow sigma table; pass sigmas= explicitly")
    s, v = sigmas[middle][inner], u[middle][inner]
    shift = round(float((s * (1 - v) / (v * (1 - s))).median()), 4)
    rebuilt = (shift * u / (1 + (shift - 1) * u)).float()
    if not torch.allclose(rebuilt, table.float(), atol=1e-6, rtol=0):
        raise ValueError(
            "the flow sigma table is not a static shift of linear sigmas (dynamic shifting?); pass sigmas= explicitly"
        )
    return shift


def flow_sigmas(noise: RectifiedFlowProcess, num_steps: int) -> Tensor:
    """The sigmas ``FlowMatchEulerDiscreteScheduler.set_timesteps(num_steps)`` gives, then 0: [num_steps + 1].

    Built from the process's (shifted) table as the scheduler does: linear in
    t between the table's ends, then shifted again by the table's own shift.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    table = noise.sigmas
    shift = _static_shift(table)
    count = len(table)
    t = np.linspace(float(table[0]) * count, float(table[-1]) * count, num_steps)
    u = t / count
    sigmas = torch.from_numpy(shift * u / (1 + (shift - 1) * u)).float()
    return torch.cat([sigmas, torch.zeros(1)])


LogProbReduction = Literal["mean", "sum"]


def gaussian_log_prob(x: Tensor, mean: Tensor, std: float, reduction: LogProbReduction = "mean") -> Tensor:
    """log N(x; mean, std^2 I) per latent dimension, reduced over all dims but the first: [N, ...] -> [N], float64.

    ``reduction="mean"`` (default) averages the per-dimension log-density, as the clipped-ratio lineage
    PSO's online recipe comes from does (DDPO's ``ddim_step_with_logprob``, flow_grpo's
    ``sd3_sde_with_logprob``), and where its β = 50 and ε = 0.1 were tuned. ``"sum"`` is the
    joint log-density. The difference matters at real size: a policy whose mean moves by an RMS
    of 1e-3 per dimension changes the *summed* log-ratio of an SDXL latent (4x128x128 = 65,536
    dims) by about sqrt(D) * 1e-3 / s ~ 0.5, far outside log(1 +- 0.1), so every transition is
    clipped and gives no gradient; the mean stays inside (tests/core/test_sampling.py).

    float64 because the summed value is about -D/2: in float32 its rounding (~0.004) would swamp
    the log-ratios PSO clips at 0.1.
    """
    if std <= 0:
        raise ValueError(f"a deterministic transition (std={std}) has no density")
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    residual = (x.double() - mean.double()).flatten(1)
    per_dim = -0.5 * (residual / std).pow(2) - math.log(std) - 0.5 * math.log(2 * math.pi)
    return per_dim.mean(dim=1) if reduction == "mean" else per_dim.sum(dim=1)


class FewStepSampler:
    """DDIM-with-eta over a few steps, for DDPM (epsilon / v) and rectified-flow processes.

    DDPM: ``timesteps`` (descending model timesteps) or ``num_steps`` trailing
    ones; in ``timestep_mode='distilled'`` every one must be a distilled
    timestep. Flow: ``sigmas`` (descending, used as given, no terminal 0) or the
    scheduler's ``num_steps`` shifted sigmas. ``eta`` in [0, 1] scales the noise:
    0 is deterministic DDIM (Euler for flow), 1 is DDPM-like ancestral sampling.
    """

    def __init__(
        self,
        noise: NoiseProcess,
        num_steps: int = 4,
        eta: float = 1.0,
        timesteps: Sequence[int] | None = None,
        sigmas: Sequence[float] | None = None,
    ) -> None:
        if not 0.0 <= eta <= 1.0:
            raise ValueError(f"eta must be in [0, 1], got {eta}")
        self.noise, self.eta = noise, float(eta)
        if isinstance(noise, DDPMProcess):
            if sigmas is not None:
                raise ValueError("sigmas= applies to rectified flow; give a DDPM process timesteps=")
            self.timesteps, self.coefficients = self._ddpm_schedule(noise, num_steps, timesteps)
        elif isinstance(noise, RectifiedFlowProcess):
            if timesteps is not None:
                raise ValueError("timesteps= applies to DDPM; give a rectified-flow process sigmas=")
            self.timesteps, self.coefficients = self._flow_schedule(noise, num_steps, sigmas)
        else:
            raise TypeError(f"no few-step sampler for noise process {type(noise).__name__}")
        self.stochastic = torch.tensor([c.std > 0 for c in self.coefficients])

    def _ddpm_schedule(
        self, noise: DDPMProcess, num_steps: int, timesteps: Sequence[int] | None
    ) -> tuple[Tensor, list[StepCoefficients]]:
        chosen = (
            [int(t) for t in timesteps]
            if timesteps is not None
            else ddpm_trailing_timesteps(noise.num_train_timesteps, num_steps)
        )
        if (
            not chosen
            or any(b >= a for a, b in pairwise(chosen))
            or not 0 <= chosen[-1] <= chosen[0] < noise.num_train_timesteps
        ):
            raise ValueError(f"timesteps must be strictly decreasing in [0, {noise.num_train_timesteps}), got {chosen}")
        if noise.timestep_mode == "distilled" and not set(chosen) <= set(DISTILLED_TIMESTEPS):
            raise ValueError(
                f"a distilled model only knows timesteps {sorted(DISTILLED_TIMESTEPS, reverse=True)}, got {chosen} "
                "(num_steps 1, 2 or 4 land on them)"
            )
        alpha_bar = noise.alphas_cumprod
        coefficients = []
        for k, t in enumerate(chosen):
            ab = float(alpha_bar[t])
            ab_prev = float(alpha_bar[chosen[k + 1]]) if k + 1 < len(chosen) else 1.0  # the last step lands on x0
            # Song et al. 2021, eq. 16: sigma = eta sqrt((1 - ab_prev) / (1 - ab)) sqrt(1 - ab / ab_prev)
            std = self.eta * math.sqrt((1 - ab_prev) / (1 - ab)) * math.sqrt(max(1 - ab / ab_prev, 0.0))
            coefficients.append(
                StepCoefficients(math.sqrt(ab), math.sqrt(1 - ab), math.sqrt(ab_prev), math.sqrt(1 - ab_prev), std)
            )
        return torch.tensor(chosen, dtype=torch.long), coefficients

    def _flow_schedule(
        self, noise: RectifiedFlowProcess, num_steps: int, sigmas: Sequence[float] | None
    ) -> tuple[Tensor, list[StepCoefficients]]:
        if sigmas is None:
            chain = flow_sigmas(noise, num_steps)
        else:
            chain = torch.cat([torch.as_tensor(sigmas, dtype=torch.float32).flatten(), torch.zeros(1)])
            if len(chain) < 2 or not ((chain[:-1] > chain[1:]).all() and chain[0] <= 1 and chain[-2] > 0):
                raise ValueError(f"sigmas must be strictly decreasing in (0, 1], got {list(sigmas)}")
        coefficients = []
        for sigma, sigma_prev in zip(chain[:-1].tolist(), chain[1:].tolist()):
            a, a_prev = 1 - sigma, 1 - sigma_prev
            # Our choice for flow: s = eta b_prev sqrt(1 - (a_t / a_prev)^2) <= b_prev, so the direction
            # term stays real; eta = 0 is the Euler step, and the step to sigma = 0 has s = 0.
            std = self.eta * sigma_prev * math.sqrt(max(1 - (a / a_prev) ** 2, 0.0))
            coefficients.append(StepCoefficients(a, sigma, a_prev, sigma_prev, std))
        return chain[:-1] * noise.num_train_timesteps, coefficients  # model timestep = sigma T, as the scheduler feeds

    @property
    def num_steps(self) -> int:
        return len(self.coefficients)

    def denoised(self, k: int, x: Tensor, prediction: Tensor) -> tuple[Tensor, Tensor]:
        """(x0_hat, eps_hat) from the network's prediction at step k."""
        c = self.coefficients[k]
        if isinstance(self.noise, RectifiedFlowProcess):  # v = eps - x0, x = (1 - sigma) x0 + sigma eps
            return x - c.b * prediction, x + c.a * prediction
        if self.noise.prediction_type == "epsilon":  # Ho et al. 2020, eq. 15
            return (x - c.b * prediction) / c.a, prediction
        return c.a * x - c.b * prediction, c.b * x + c.a * prediction  # v-prediction, Salimans & Ho 2022, sec. 4

    def mean(self, k: int, x: Tensor, prediction: Tensor) -> Tensor:
        """mu(x_k): the deterministic part of Song et al. 2021, eq. 12."""
        c = self.coefficients[k]
        x0_hat, eps_hat = self.denoised(k, x, prediction)
        return c.a_prev * x0_hat + c.direction * eps_hat

    def step(self, k: int, x: Tensor, prediction: Tensor, z: Tensor | None) -> Tensor:
        """x_prev = mu(x_k) + s_k z (Song et al. 2021, eq. 12); ``z`` is ignored when s_k = 0."""
        mean = self.mean(k, x, prediction)
        std = self.coefficients[k].std
        if std == 0:
            return mean
        if z is None:
            raise ValueError(f"step {k} is stochastic (s={std:.4g}) and needs noise z")
        return mean + std * z

    @torch.no_grad()
    def sample(
        self,
        backbone: Backbone,
        network: Network,
        conditioning: Conditioning,
        latent_shape: Sequence[int],
        generators: list[torch.Generator],
        dtype: torch.dtype | None = None,
    ) -> Trajectory:
        """Sample N = len(generators) chains from pure noise.

        Each sample's initial noise and every z come from its own generator, in
        that order, so a sample is the same whatever batch it is drawn in.
        conditioning: flat dict [N, ...] (see :func:`sampling_conditioning`).
        """
        n = len(generators)
        _check_batch(conditioning, n)
        device = next(iter(conditioning.values())).device
        shape = tuple(int(d) for d in latent_shape)

        def draw() -> Tensor:
            return torch.stack([torch.randn(shape, generator=g, device=g.device) for g in generators]).to(device)

        x = draw()
        states = [x]
        for k, stochastic in enumerate(self.stochastic.tolist()):
            timesteps = self.timesteps[k].to(device).expand(n)
            prediction = predict(backbone, network, x, timesteps, conditioning, dtype).float()
            x = self.step(k, x, prediction, draw() if stochastic else None)
            states.append(x)
        return Trajectory(torch.stack(states), self.timesteps.clone(), self.stochastic.clone())

    def transition_log_probs(
        self,
        backbone: Backbone,
        network: Network,
        trajectory: Trajectory,
        conditioning: Conditioning,
        steps: Sequence[int] | None = None,
        dtype: torch.dtype | None = None,
        reduction: LogProbReduction = "mean",
    ) -> Tensor:
        """log N(x_{k+1}; mu_net(x_k), s_k^2 I) of each stochastic transition: [N, S_stochastic], float64.

        ``reduction``: per-dimension mean (default, the DDPO / Flow-GRPO convention) or sum over the
        latent's dimensions; see :func:`gaussian_log_prob`.

        mu is recomputed with ``network`` (an nn.Module keeps its graph, so the
        policy's log-probs have gradients; a Predictor such as a reference runs
        as it decides, normally without grad). ``steps``: transition indices to
        compute (all stochastic ones by default), e.g. one at a time to backward
        per step. Subtract policy and reference values before casting down.
        """
        if not torch.equal(trajectory.timesteps.cpu(), self.timesteps) or not torch.equal(
            trajectory.stochastic.cpu(), self.stochastic
        ):
            raise ValueError("the trajectory was sampled with another schedule than this sampler's")
        n = trajectory.num_samples
        _check_batch(conditioning, n)
        chosen = [k for k, s in enumerate(self.stochastic.tolist()) if s] if steps is None else [int(k) for k in steps]
        for k in chosen:
            if not 0 <= k < self.num_steps or not self.stochastic[k]:
                raise ValueError(
                    f"transition {k} is not a stochastic step of this sampler (stochastic: {self.stochastic.tolist()})"
                )
        log_probs = []
        for k in chosen:
            x = trajectory.latents[k]
            prediction = predict(backbone, network, x, self.timesteps[k].to(x.device).expand(n), conditioning, dtype).float()
            mean = self.mean(k, x.double(), prediction.double())  # float64: see gaussian_log_prob
            log_probs.append(gaussian_log_prob(trajectory.latents[k + 1], mean, self.coefficients[k].std, reduction))
        if not log_probs:
            return torch.zeros(n, 0, dtype=torch.float64, device=trajectory.latents.device)
        return torch.stack(log_probs, dim=1)


def _check_batch(conditioning: Conditioning, n: int) -> None:
    if not conditioning:
        raise ValueError("conditioning is empty; build it with sampling_conditioning(backbone, prompts, resolution)")
    for key, value in conditioning.items():
        if value.shape[0] != n:
            raise ValueError(f"conditioning[{key!r}] has batch {value.shape[0]}, expected {n} (one per sample)")


def sampling_conditioning(backbone: Backbone, prompts: list[str], resolution: int) -> Conditioning:
    """The flat conditioning [N, ...] for generating square ``resolution`` images of ``prompts``.

    SDXL's time ids describe an uncropped square image, ``(H, W, 0, 0, H, W)``,
    as StableDiffusionXLPipeline builds them by default; other families add nothing.
    """
    text = backbone.encode_prompts(list(prompts))
    device = next(iter(text.values())).device
    sizes = torch.tensor([[resolution, resolution]] * len(prompts), dtype=torch.int64)
    geometry = backbone.geometry_conditioning(sizes, torch.zeros_like(sizes), resolution)
    return {**text, **{key: value.to(device) for key, value in geometry.items()}}


def generate_images(
    backbone: Backbone,
    network: Network | None,
    prompts: list[str],
    resolution: int,
    seeds: Sequence[int],
    num_steps: int = 4,
    eta: float = 1.0,
    timesteps: Sequence[int] | None = None,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """Sample and decode one image per (prompt, seed): [N, 3, H, W] in [-1, 1]. ``network=None``: the backbone's denoiser."""
    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    sampler = FewStepSampler(backbone.noise, num_steps=num_steps, eta=eta, timesteps=timesteps)
    conditioning = sampling_conditioning(backbone, prompts, resolution)
    generators = [torch.Generator().manual_seed(int(seed)) for seed in seeds]
    network = backbone.denoiser if network is None else network
    trajectory = sampler.sample(backbone, network, conditioning, backbone.latent_shape(resolution), generators, dtype)
    return backbone.decode_latents(trajectory.final)


def to_pil(images: Tensor) -> list[PIL.Image.Image]:
    """[N, 3, H, W] in [-1, 1] -> RGB images, rounded as the pipelines' ``postprocess`` does."""
    pixels = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return [PIL.Image.fromarray(image.permute(1, 2, 0).numpy()) for image in pixels]
