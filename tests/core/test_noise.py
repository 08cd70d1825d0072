"""Noise processes: x_t, targets and timestep sampling agree with diffusers' schedulers and with hand arithmetic.

The reference numbers come from the tiny pipelines' saved scheduler configs
(``diffalign.tiny``), which copy the real checkpoints' settings: SD 1.5's PNDM
(scaled_linear betas 0.00085..0.012, epsilon), SD 2.1-768's DDIM
(v_prediction), SDXL's Euler (epsilon) and SD3's FlowMatch Euler (shift 3).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from diffalign import tiny
from diffalign.noise import (
    DISTILLED_TIMESTEPS,
    DDPMProcess,
    RectifiedFlowProcess,
    noise_process_from_scheduler,
    per_sample_error,
)

diffusers = pytest.importorskip("diffusers")
from diffusers import DDIMScheduler, DDPMScheduler, FlowMatchEulerDiscreteScheduler  # noqa: E402

# SD's scaled_linear schedule at t = 0: beta_0 = 0.00085 exactly, so
# alpha_bar_0 = 1 - 0.00085 = 0.99915, sqrt(ab_0) = 0.99957490965, sqrt(1 - ab_0) = sqrt(0.00085) = 0.02915475947.
SQRT_AB0 = math.sqrt(0.99915)
SQRT_1M_AB0 = math.sqrt(0.00085)


@pytest.fixture(scope="module")
def scheduler_configs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    """The scheduler_config.json each saved tiny pipeline ships with, per family."""
    root = tmp_path_factory.mktemp("noise_tiny")
    configs = {}
    for family in tiny.FAMILIES:
        folder = tiny.save_pipeline(family, root / family)
        configs[family] = json.loads((Path(folder) / "scheduler" / "scheduler_config.json").read_text())
    return configs


def _latents(seed: int, n: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x0 = torch.randn(n, 4, 8, 8, generator=generator)
    eps = torch.randn(n, 4, 8, 8, generator=generator)
    return x0, eps


# --------------------------------------------------------------------------- DDPM, epsilon


def test_ddpm_epsilon_matches_diffusers_add_noise(scheduler_configs: dict[str, dict]) -> None:
    config = scheduler_configs["sd15"]
    assert config["_class_name"] == "PNDMScheduler" and config["beta_schedule"] == "scaled_linear"
    process = DDPMProcess.from_scheduler_config(config)
    reference = DDPMScheduler.from_config(config)
    x0, eps = _latents(0)
    t = torch.tensor([0, 1, 500, 999])

    batch = process.noise(x0, eps, t)

    torch.testing.assert_close(batch.noisy, reference.add_noise(x0, eps, t), atol=1e-6, rtol=0)
    assert torch.equal(batch.target, eps)
    assert torch.equal(batch.timesteps, t)
    assert batch.noisy.shape == x0.shape and batch.noisy.dtype == x0.dtype


def test_ddpm_epsilon_hand_values_at_t0(scheduler_configs: dict[str, dict]) -> None:
    """x0 = 1, eps = 2 at t = 0: x_t = 0.99957490965 * 1 + 0.02915475947 * 2 = 1.05788442860; target = eps = 2."""
    process = DDPMProcess.from_scheduler_config(scheduler_configs["sd15"])
    batch = process.noise(torch.ones(1, 1, 1, 1), torch.full((1, 1, 1, 1), 2.0), torch.tensor([0]))
    assert batch.noisy.item() == pytest.approx(1.0578844286, abs=1e-6)
    assert batch.noisy.item() == pytest.approx(SQRT_AB0 + 2 * SQRT_1M_AB0, abs=1e-6)
    assert batch.target.item() == 2.0


def test_ddpm_limits_of_the_schedule(scheduler_configs: dict[str, dict]) -> None:
    """alpha_bar falls monotonically from 0.99915 (t = 0) to 0.0046601 (t = 999, SD's known value).

    So x_t ~ x0 at t = 0 (|x_t - x0| <= (1 - 0.99957) |x0| + 0.02915 |eps|) and
    x_t ~ eps at t = 999 (x_t = 0.068265 x0 + 0.997667 eps). (diffusers builds the table in float32, so
    the hand values hold to ~1e-6: the float32 beta_0 makes sqrt(1 - ab_0) off by ~4e-7.)
    """
    process = DDPMProcess.from_scheduler_config(scheduler_configs["sd15"])
    ab = process.alphas_cumprod
    assert torch.all(ab[1:] < ab[:-1])
    assert ab[0].item() == pytest.approx(0.99915, abs=1e-7)
    assert ab[999].item() == pytest.approx(0.0046601, abs=1e-6)
    x0, eps = _latents(1, n=2)
    batch = process.noise(x0, eps, torch.tensor([0, 999]))
    bound0 = (1 - SQRT_AB0) * x0[0].abs() + SQRT_1M_AB0 * eps[0].abs()
    assert torch.all((batch.noisy[0] - x0[0]).abs() <= bound0 + 1e-5)
    torch.testing.assert_close(batch.noisy[0], SQRT_AB0 * x0[0] + SQRT_1M_AB0 * eps[0], atol=1e-5, rtol=0)
    expected = 0.0682649 * x0[1] + math.sqrt(1 - 0.0046601) * eps[1]
    torch.testing.assert_close(batch.noisy[1], expected, atol=1e-5, rtol=0)


# --------------------------------------------------------------------------- DDPM, v-prediction


def test_v_prediction_matches_get_velocity(scheduler_configs: dict[str, dict]) -> None:
    config = scheduler_configs["sd2"]
    assert config["_class_name"] == "DDIMScheduler"
    process = DDPMProcess.from_scheduler_config(config)
    scheduler = DDIMScheduler.from_config(config)
    x0, eps = _latents(2)
    t = torch.tensor([0, 250, 750, 999])

    batch = process.noise(x0, eps, t)

    torch.testing.assert_close(batch.target, scheduler.get_velocity(x0, eps, t), atol=1e-6, rtol=0)
    torch.testing.assert_close(batch.noisy, DDPMScheduler.from_config(config).add_noise(x0, eps, t), atol=1e-6, rtol=0)
    assert not torch.allclose(batch.target, eps)  # v is not epsilon


def test_v_prediction_hand_values_at_t0(scheduler_configs: dict[str, dict]) -> None:
    """v = sqrt(ab) eps - sqrt(1-ab) x0 at t = 0 (ab = 0.99915).

    x0 = 1,  eps = 2:   v = 2 * 0.99957490965 - 0.02915475947 = 1.96999505982
    x0 = -1, eps = 0.5: v = 0.5 * 0.99957490965 + 0.02915475947 = 0.52894221430
                        x_t = -0.99957490965 + 0.5 * 0.02915475947 = -0.98499752991
    """
    process = DDPMProcess.from_scheduler_config(scheduler_configs["sd2"])
    x0 = torch.tensor([1.0, -1.0]).reshape(2, 1, 1, 1)
    eps = torch.tensor([2.0, 0.5]).reshape(2, 1, 1, 1)
    batch = process.noise(x0, eps, torch.tensor([0, 0]))
    assert batch.target.flatten().tolist() == pytest.approx([1.9699950598, 0.5289422143], abs=1e-6)
    assert batch.noisy.flatten().tolist() == pytest.approx([1.0578844286, -0.9849975299], abs=1e-6)


# --------------------------------------------------------------------------- prediction type from the config


def test_prediction_type_is_read_from_the_config(scheduler_configs: dict[str, dict]) -> None:
    assert DDPMProcess.from_scheduler_config(scheduler_configs["sd15"]).prediction_type == "epsilon"
    assert DDPMProcess.from_scheduler_config(scheduler_configs["sd2"]).prediction_type == "v_prediction"
    assert DDPMProcess.from_scheduler_config(scheduler_configs["sdxl"]).prediction_type == "epsilon"


def test_missing_or_unsupported_prediction_type_is_an_error(scheduler_configs: dict[str, dict]) -> None:
    config = dict(scheduler_configs["sd15"])
    del config["prediction_type"]
    with pytest.raises(ValueError, match="prediction_type"):
        DDPMProcess.from_scheduler_config(config)
    with pytest.raises(ValueError, match="unsupported DDPM prediction_type 'sample'"):
        DDPMProcess.from_scheduler_config({**scheduler_configs["sd15"], "prediction_type": "sample"})


# --------------------------------------------------------------------------- distilled timesteps


def test_distilled_timesteps_follow_250_u_mod_4_plus_249(scheduler_configs: dict[str, dict]) -> None:
    """t = 250 (u mod 4) + 249 with u ~ U{0..999}: u = 0 -> 249, 1 -> 499, 2 -> 749, 3 -> 999, 4 -> 249..."""
    process = DDPMProcess.from_scheduler_config(scheduler_configs["sdxl"], timestep_mode="distilled")
    t = process.sample_timesteps(4000, generator=torch.Generator().manual_seed(0))
    assert set(t.tolist()) == set(DISTILLED_TIMESTEPS) == {249, 499, 749, 999}
    counts = torch.bincount(t)[list(DISTILLED_TIMESTEPS)]
    assert counts.min() > 850  # each of the four appears ~1000 times out of 4000

    # the same generator draws the same u; the map is exactly the formula
    u = torch.randint(0, 1000, (4000,), generator=torch.Generator().manual_seed(0))
    assert torch.equal(t, 250 * (u % 4) + 249)


def test_uniform_timesteps_cover_the_whole_range(scheduler_configs: dict[str, dict]) -> None:
    process = DDPMProcess.from_scheduler_config(scheduler_configs["sd15"])
    t = process.sample_timesteps(20000, generator=torch.Generator().manual_seed(0))
    assert t.min() == 0 and t.max() == 999
    assert len(t.unique()) > 990
    assert torch.equal(t, process.sample_timesteps(20000, generator=torch.Generator().manual_seed(0)))


# --------------------------------------------------------------------------- rectified flow


def test_rectified_flow_uses_the_shifted_sigma_table(scheduler_configs: dict[str, dict]) -> None:
    config = scheduler_configs["sd3"]
    assert config["_class_name"] == "FlowMatchEulerDiscreteScheduler" and config["shift"] == 3.0
    process = RectifiedFlowProcess.from_scheduler_config(config)
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(config)
    x0, eps = _latents(3)
    index = torch.tensor([0, 500, 750, 999])

    batch = process.noise(x0, eps, index)

    sigma = scheduler.sigmas[index].reshape(-1, 1, 1, 1)
    torch.testing.assert_close(batch.noisy, (1 - sigma) * x0 + sigma * eps, atol=1e-6, rtol=0)
    assert torch.equal(batch.timesteps, scheduler.timesteps[index])
    torch.testing.assert_close(batch.target, eps - x0, atol=0, rtol=0)


def test_rectified_flow_hand_values() -> None:
    """Shift 3 maps s = (1000 - i) / 1000 to sigma = 3 s / (1 + 2 s), timestep = 1000 sigma.

    i = 0:   s = 1     -> sigma = 3 / 3 = 1 (pure noise), timestep 1000
    i = 500: s = 0.5   -> sigma = 1.5 / 2 = 0.75,         timestep 750
    i = 750: s = 0.25  -> sigma = 0.75 / 1.5 = 0.5,       timestep 500
    i = 999: s = 0.001 -> sigma = 0.003 / 1.002 = 0.00299401
    With x0 = 2, eps = -2: x_t = (1 - sigma) 2 - 2 sigma = 2 - 4 sigma -> -2, -1, 0, 1.98802; target = -4.
    """
    process = RectifiedFlowProcess.from_scheduler_config(FlowMatchEulerDiscreteScheduler(shift=3.0).config)
    x0 = torch.full((4, 1, 1, 1), 2.0)
    eps = torch.full((4, 1, 1, 1), -2.0)
    batch = process.noise(x0, eps, torch.tensor([0, 500, 750, 999]))
    assert batch.noisy.flatten().tolist() == pytest.approx([-2.0, -1.0, 0.0, 2 - 4 * 0.003 / 1.002], abs=1e-5)
    assert batch.timesteps.tolist() == pytest.approx([1000.0, 750.0, 500.0, 2.994012], abs=1e-3)
    assert batch.target.flatten().tolist() == [-4.0] * 4


def test_rectified_flow_equals_scheduler_scale_noise(scheduler_configs: dict[str, dict]) -> None:
    """diffusers' own forward process, looked up by the model timestep, gives the same x_t."""
    config = scheduler_configs["sd3"]
    process = RectifiedFlowProcess.from_scheduler_config(config)
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(config)
    assert scheduler.timesteps.unique().numel() == len(scheduler.timesteps)  # a timestep names one index
    x0, eps = _latents(4)
    index = process.sample_timesteps(4, generator=torch.Generator().manual_seed(1))
    batch = process.noise(x0, eps, index)
    torch.testing.assert_close(batch.noisy, scheduler.scale_noise(x0, batch.timesteps, eps), atol=1e-6, rtol=0)


def test_logit_normal_index_sampling(scheduler_configs: dict[str, dict]) -> None:
    """u = sigmoid(z), z ~ N(0, 1): E[u] = 0.5 by symmetry, so the mean index is ~ 500 (std of the mean ~ 1.5).

    Logit-normal puts little mass in the tails: P(u < 0.1) = P(z < -2.197) = 0.014, against 0.1 for uniform.
    """
    process = RectifiedFlowProcess.from_scheduler_config(scheduler_configs["sd3"])
    assert process.weighting == "logit_normal"
    index = process.sample_timesteps(20000, generator=torch.Generator().manual_seed(0))
    assert index.dtype == torch.long
    assert 0 <= index.min() and index.max() <= 999
    assert index.float().mean().item() == pytest.approx(500, abs=10)
    assert (index < 100).float().mean().item() == pytest.approx(0.014, abs=0.005)
    again = process.sample_timesteps(20000, generator=torch.Generator().manual_seed(0))
    assert torch.equal(index, again)
    other = process.sample_timesteps(20000, generator=torch.Generator().manual_seed(1))
    assert not torch.equal(index, other)


def test_uniform_flow_weighting_is_flat(scheduler_configs: dict[str, dict]) -> None:
    process = noise_process_from_scheduler(scheduler_configs["sd3"], flow_weighting="uniform")
    index = process.sample_timesteps(20000, generator=torch.Generator().manual_seed(0))
    assert (index < 100).float().mean().item() == pytest.approx(0.1, abs=0.01)


# --------------------------------------------------------------------------- factory


@pytest.mark.parametrize(
    ("family", "cls", "prediction_type"),
    [
        ("sd15", DDPMProcess, "epsilon"),
        ("sd2", DDPMProcess, "v_prediction"),
        ("sdxl", DDPMProcess, "epsilon"),
        ("sd3", RectifiedFlowProcess, None),
    ],
)
def test_noise_process_from_scheduler_picks_the_class(
    scheduler_configs: dict[str, dict], family: str, cls: type, prediction_type: str | None
) -> None:
    process = noise_process_from_scheduler(scheduler_configs[family])
    assert type(process) is cls
    if prediction_type is not None:
        assert process.prediction_type == prediction_type


def test_distilled_with_a_flow_scheduler_is_an_error(scheduler_configs: dict[str, dict]) -> None:
    with pytest.raises(ValueError, match="distilled"):
        noise_process_from_scheduler(scheduler_configs["sd3"], timestep_mode="distilled")
    with pytest.raises(ValueError, match="timestep_mode"):
        noise_process_from_scheduler(scheduler_configs["sd15"], timestep_mode="distiled")


def test_zero_terminal_snr_equals_diffusers_rescale_on_sdxls_schedule(scheduler_configs: dict[str, dict]) -> None:
    """SDXL(-Turbo)'s schedule rescaled to zero terminal SNR (Lin et al. 2024) is diffusers' own rescale:
    sqrt(alpha_bar) at t = 999 goes from 0.068 (stock) to 2**-12 (diffusers' Euler keeps alpha_bar_T = 2**-24,
    not 0, so an epsilon model's x0 estimate is finite), every other timestep equal to diffusers' table; the
    few-step sampler's first (t = 999) step reads the same value, so PSO's references sample on it."""
    from diffusers import EulerAncestralDiscreteScheduler

    from diffalign.noise import ZERO_SNR_TERMINAL_ALPHA_BAR
    from diffalign.sampling import FewStepSampler

    config = scheduler_configs["sdxl"]
    stock = DDPMProcess.from_scheduler_config(config, "distilled")
    rescaled = noise_process_from_scheduler(config, timestep_mode="distilled", zero_terminal_snr=True)
    assert stock.alphas_cumprod[999].sqrt().item() == pytest.approx(0.068265, abs=1e-5)
    assert rescaled.alphas_cumprod[999].item() == ZERO_SNR_TERMINAL_ALPHA_BAR
    reference = DDPMScheduler.from_config({**config, "rescale_betas_zero_snr": True}).alphas_cumprod.double()
    assert reference[999].item() == 0.0  # diffusers' DDPM table: exactly zero terminal SNR
    torch.testing.assert_close(rescaled.alphas_cumprod[:999], reference[:999], rtol=0, atol=0)
    euler = EulerAncestralDiscreteScheduler.from_config({**config, "rescale_betas_zero_snr": True})
    assert euler.alphas_cumprod[-1].item() == ZERO_SNR_TERMINAL_ALPHA_BAR
    assert (rescaled.alphas_cumprod[:999] - stock.alphas_cumprod[:999]).abs().max() > 1e-3  # really another schedule
    sampler = FewStepSampler(rescaled, num_steps=4, eta=1.0)
    assert sampler.timesteps.tolist() == [999, 749, 499, 249]
    assert sampler.coefficients[0].a == pytest.approx(2.0**-12)
    assert sampler.coefficients[0].a_prev == pytest.approx(reference[749].sqrt().item())


def test_zero_terminal_snr_is_refused_for_rectified_flow(scheduler_configs: dict[str, dict]) -> None:
    with pytest.raises(ValueError, match="zero_terminal_snr applies to DDPM"):
        noise_process_from_scheduler(scheduler_configs["sd3"], zero_terminal_snr=True)


# --------------------------------------------------------------------------- per-sample error


def test_per_sample_error_one_value_per_sample() -> None:
    """Mean of squared differences over everything but the batch dim.

    sample 0: diffs [1, -1, 2, 0]  -> (1 + 1 + 4 + 0) / 4 = 1.5
    sample 1: diffs [0, 0, 0, 4]   -> 16 / 4 = 4.0
    """
    target = torch.zeros(2, 1, 2, 2)
    prediction = torch.tensor([[1.0, -1.0, 2.0, 0.0], [0.0, 0.0, 0.0, 4.0]]).reshape(2, 1, 2, 2)
    errors = per_sample_error(prediction, target)
    assert errors.shape == (2,)
    assert errors.tolist() == [1.5, 4.0]
    # computed in float32 even for half inputs, and never averaged over the batch
    half = per_sample_error(prediction.half(), target.half())
    assert half.dtype == torch.float32 and half.tolist() == [1.5, 4.0]
