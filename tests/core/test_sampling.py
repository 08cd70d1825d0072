"""The few-step sampler, its transition log-probs, and Backbone.decode_latents.

Parity is checked against diffusers: each DDIM step (epsilon and v) against
``DDIMScheduler.step`` with the same noise, the eta = 0 flow step against
``FlowMatchEulerDiscreteScheduler.step``, and whole chains against the stock
pipelines run without guidance on the same generators. Log-probs are checked
on one hand-computed transition and by their invariances.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from diffalign import tiny
from diffalign.backbones import load_backbone, load_scheduler_config
from diffalign.config import ModelConfig
from diffalign.noise import DDPMProcess, RectifiedFlowProcess
from diffalign.sampling import (
    FewStepSampler,
    Trajectory,
    ddpm_trailing_timesteps,
    flow_sigmas,
    gaussian_log_prob,
    generate_images,
    sampling_conditioning,
    to_pil,
)

diffusers = pytest.importorskip("diffusers")
from diffusers import DDIMScheduler, DiffusionPipeline, FlowMatchEulerDiscreteScheduler

PROMPTS = ["a red circle", "a blue square"]
LOAD_KWARGS = dict.fromkeys(tiny.SD3_FAMILIES, {"text_encoder_3": None, "tokenizer_3": None})  # the tiny SD3s have no T5


@pytest.fixture(scope="module")
def backbones(tiny_models: dict[str, Path]) -> dict:
    return {family: load_backbone(ModelConfig(path=str(path))) for family, path in tiny_models.items()}


def generators(seeds: list[int]) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(seed) for seed in seeds]


def trailing_ddim(config: dict) -> DDIMScheduler:
    """DDIM that ends on x0 (set_alpha_to_one) with SDXL-Turbo's trailing spacing: our sampler's schedule."""
    return DDIMScheduler.from_config(config, timestep_spacing="trailing", set_alpha_to_one=True, clip_sample=False)


# --------------------------------------------------------------------------- decode_latents


@pytest.mark.parametrize("family", tiny.FAMILIES)
def test_decode_inverts_encode_as_the_pipeline_decodes(backbones: dict, family: str) -> None:
    backbone = backbones[family]
    pixels = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    latents = backbone.encode_images(pixels)
    decoded = backbone.decode_latents(latents)
    assert decoded.shape == (2, 3, 32, 32) and decoded.dtype == torch.float32
    assert decoded.min() >= -1 and decoded.max() <= 1
    config = backbone.vae.config
    shift = getattr(config, "shift_factor", None) or 0.0  # StableDiffusion3Pipeline adds it; SD/SDXL have none
    with torch.no_grad():
        expected = backbone.vae.decode(latents / config.scaling_factor + shift).sample.clamp(-1, 1)
    torch.testing.assert_close(decoded, expected, atol=1e-6, rtol=0)
    assert backbone.latent_shape(32) == tuple(latents.shape[1:])


def test_decode_without_a_vae_is_a_clear_error(tiny_models: dict[str, Path]) -> None:
    backbone = load_backbone(ModelConfig(path=str(tiny_models["sd15"])), load_encoders=False)
    with pytest.raises(RuntimeError, match="no VAE"):
        backbone.decode_latents(torch.zeros(1, 4, 16, 16))
    with pytest.raises(RuntimeError, match="no VAE"):
        backbone.latent_shape(32)


def test_sdxl_fp16_vae_decodes_in_fp32_and_stays_fp16(tiny_models: dict[str, Path]) -> None:
    """force_upcast: as StableDiffusionXLPipeline, decode in fp32 (SDXL's VAE overflows in fp16), then cast back."""
    backbone = load_backbone(ModelConfig(path=str(tiny_models["sdxl"])))
    latents = backbone.encode_images(torch.zeros(1, 3, 32, 32))
    backbone.to("cpu", torch.float16)
    upcast = copy.deepcopy(backbone.vae).to(torch.float32)  # the fp16 weights, run in fp32
    with torch.no_grad():
        expected = upcast.decode(latents / upcast.config.scaling_factor).sample.clamp(-1, 1)
    decoded = backbone.decode_latents(latents)
    assert decoded.dtype == torch.float32 and backbone.vae.dtype == torch.float16
    torch.testing.assert_close(decoded, expected, atol=1e-6, rtol=0)


# --------------------------------------------------------------------------- schedules and single steps


def test_trailing_timesteps_are_the_distilled_set() -> None:
    assert ddpm_trailing_timesteps(1000, 4) == [999, 749, 499, 249]
    assert ddpm_trailing_timesteps(1000, 2) == [999, 499]
    assert ddpm_trailing_timesteps(1000, 1) == [999]


@pytest.mark.parametrize("family", ["sd15", "sd2"])
@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_ddim_step_matches_diffusers(tiny_models: dict[str, Path], family: str, eta: float) -> None:
    """sd15 is epsilon-prediction, sd2 v-prediction: every step equals DDIMScheduler.step to 1e-5."""
    config = load_scheduler_config(str(tiny_models[family]))
    scheduler = trailing_ddim(config)
    scheduler.set_timesteps(4)
    sampler = FewStepSampler(DDPMProcess.from_scheduler_config(config), num_steps=4, eta=eta)
    assert sampler.timesteps.tolist() == scheduler.timesteps.tolist() == [999, 749, 499, 249]
    assert sampler.stochastic.tolist() == [eta > 0] * 3 + [False]  # the step onto x0 is deterministic
    g = torch.Generator().manual_seed(1)
    for k, t in enumerate(scheduler.timesteps):
        x, output, z = (torch.randn(2, 4, 8, 8, generator=g) for _ in range(3))
        expected = scheduler.step(output, t, x, eta=eta, variance_noise=z).prev_sample
        torch.testing.assert_close(sampler.step(k, x, output, z), expected, atol=1e-5, rtol=1e-5)


def test_flow_sigmas_are_the_schedulers(tiny_models: dict[str, Path]) -> None:
    config = load_scheduler_config(str(tiny_models["sd3"]))
    for shift in (1.0, 3.0):
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(config, shift=shift)
        noise = RectifiedFlowProcess.from_scheduler_config(dict(scheduler.config))
        for steps in (1, 4, 8):
            scheduler.set_timesteps(steps)
            torch.testing.assert_close(flow_sigmas(noise, steps), scheduler.sigmas, atol=1e-7, rtol=0)
            sampler = FewStepSampler(noise, num_steps=steps, eta=0.0)
            torch.testing.assert_close(sampler.timesteps, scheduler.timesteps, atol=1e-4, rtol=0)


def test_flow_step_at_eta_zero_is_the_euler_step(tiny_models: dict[str, Path]) -> None:
    """(1-s') x0_hat + s' eps_hat with x0_hat = x - s v, eps_hat = x + (1-s) v is x + (s' - s) v: Euler."""
    config = load_scheduler_config(str(tiny_models["sd3"]))
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(config)
    scheduler.set_timesteps(4)
    sampler = FewStepSampler(RectifiedFlowProcess.from_scheduler_config(config), num_steps=4, eta=0.0)
    assert not sampler.stochastic.any()
    g = torch.Generator().manual_seed(2)
    for k, t in enumerate(scheduler.timesteps):
        x, velocity = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
        expected = scheduler.step(velocity, t, x, return_dict=False)[0]
        torch.testing.assert_close(sampler.step(k, x, velocity, None), expected, atol=1e-5, rtol=1e-5)


def test_flow_noise_scale_by_hand() -> None:
    """sigmas (1, 0.5): step 0 has a = 0, a' = 0.5, s = eta 0.5 sqrt(1 - 0) = 0.5 eta; direction sqrt(0.25 - s^2)."""
    noise = RectifiedFlowProcess(torch.linspace(1, 0.001, 1000), torch.linspace(1000, 1, 1000))
    sampler = FewStepSampler(noise, eta=0.6, sigmas=[1.0, 0.5])
    first, last = sampler.coefficients
    assert first.std == pytest.approx(0.3) and first.direction == pytest.approx(0.4)
    assert last.std == 0.0 and sampler.stochastic.tolist() == [True, False]
    assert sampler.timesteps.tolist() == [1000.0, 500.0]


def test_schedule_validation(tiny_models: dict[str, Path]) -> None:
    ddpm = DDPMProcess.from_scheduler_config(load_scheduler_config(str(tiny_models["sd15"])))
    distilled = DDPMProcess(ddpm.alphas_cumprod, "epsilon", timestep_mode="distilled")
    assert FewStepSampler(distilled).timesteps.tolist() == [999, 749, 499, 249]
    assert FewStepSampler(distilled, timesteps=[999, 499]).timesteps.tolist() == [999, 499]
    with pytest.raises(ValueError, match="distilled"):
        FewStepSampler(distilled, num_steps=3)
    with pytest.raises(ValueError, match="distilled"):
        FewStepSampler(distilled, timesteps=[999, 500])
    with pytest.raises(ValueError, match="strictly decreasing"):
        FewStepSampler(ddpm, timesteps=[499, 999])
    with pytest.raises(ValueError, match="eta"):
        FewStepSampler(ddpm, eta=1.5)
    with pytest.raises(ValueError, match="sigmas"):
        FewStepSampler(ddpm, sigmas=[1.0, 0.5])


# --------------------------------------------------------------------------- whole chains vs the pipelines


@pytest.mark.parametrize("family", ["sd15", "sd2", "sdxl"])
def test_chain_matches_the_stock_pipeline_with_ddim(backbones: dict, tiny_models: dict[str, Path], family: str) -> None:
    """Unguided 4-step DDIM (eta = 1) from the pipeline, one generator per image, equals our sampler's x0."""
    path = str(tiny_models[family])
    pipeline = DiffusionPipeline.from_pretrained(path, scheduler=trailing_ddim(load_scheduler_config(path)))
    expected = pipeline(
        PROMPTS,
        height=32,
        width=32,
        num_inference_steps=4,
        guidance_scale=0.0 if family == "sdxl" else 1.0,
        eta=1.0,
        generator=generators([3, 4]),
        output_type="latent",
    ).images
    backbone = backbones[family]
    sampler = FewStepSampler(backbone.noise, num_steps=4, eta=1.0)
    conditioning = sampling_conditioning(backbone, PROMPTS, 32)
    trajectory = sampler.sample(
        backbone, backbone.denoiser, conditioning, backbone.latent_shape(32), generators([3, 4])
    )
    torch.testing.assert_close(trajectory.final, expected, atol=1e-4, rtol=1e-4)


def test_chain_matches_the_stock_sd3_pipeline(backbones: dict, tiny_models: dict[str, Path]) -> None:
    pipeline = DiffusionPipeline.from_pretrained(str(tiny_models["sd3"]), **LOAD_KWARGS["sd3"])
    expected = pipeline(
        PROMPTS,
        height=32,
        width=32,
        num_inference_steps=4,
        guidance_scale=1.0,
        generator=generators([5, 6]),
        output_type="latent",
    ).images
    backbone = backbones["sd3"]
    sampler = FewStepSampler(backbone.noise, num_steps=4, eta=0.0)
    conditioning = sampling_conditioning(backbone, PROMPTS, 32)
    trajectory = sampler.sample(
        backbone, backbone.denoiser, conditioning, backbone.latent_shape(32), generators([5, 6])
    )
    torch.testing.assert_close(trajectory.final, expected, atol=1e-4, rtol=1e-4)


def test_sdxl_conditioning_describes_an_uncropped_square(backbones: dict) -> None:
    conditioning = sampling_conditioning(backbones["sdxl"], PROMPTS, 32)
    assert conditioning["time_ids"].tolist() == [[32, 32, 0, 0, 32, 32]] * 2
    assert set(sampling_conditioning(backbones["sd15"], PROMPTS, 32)) == {"prompt_embeds"}


# --------------------------------------------------------------------------- reproducibility


@pytest.mark.parametrize("family", ["sd15", "sd3"])
def test_same_generators_same_chain_and_batch_split_invariance(backbones: dict, family: str) -> None:
    backbone = backbones[family]
    sampler = FewStepSampler(backbone.noise, eta=1.0)
    shape = backbone.latent_shape(32)
    conditioning = sampling_conditioning(backbone, PROMPTS, 32)
    both = sampler.sample(backbone, backbone.denoiser, conditioning, shape, generators([7, 8]))
    again = sampler.sample(backbone, backbone.denoiser, conditioning, shape, generators([7, 8]))
    assert torch.equal(both.latents, again.latents)
    for i, seed in enumerate([7, 8]):
        single = {key: value[i : i + 1] for key, value in conditioning.items()}
        alone = sampler.sample(backbone, backbone.denoiser, single, shape, generators([seed]))
        # equal up to the rounding of batched vs single convolutions (amplified by 1/sqrt(ab_999) ~ 15)
        torch.testing.assert_close(alone.latents[:, 0], both.latents[:, i], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(both.select([i]).latents, alone.latents, atol=1e-4, rtol=1e-4)
    assert both.latents.shape == (5, 2, *shape) and both.timesteps.shape == (4,)


# --------------------------------------------------------------------------- log-probs


class _Identity:
    """A backbone stand-in whose predict calls the network on the latents alone."""

    def __init__(self, noise) -> None:
        self.noise = noise

    def predict(self, network: nn.Module, noisy, timesteps, conditioning):
        return network(noisy)


class _ZeroEps(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.zeros(()))

    def forward(self, x):
        return self.scale * x


def test_log_prob_by_hand() -> None:
    """ab = (0.9, 0.5, 0.1), timesteps (2, 0), eps_hat = 0, eta = 1, x_2 = 1, x_0' = 0.5:
    x0_hat = 1 / sqrt(0.1); mu = sqrt(0.9) x0_hat = 3 (direction term is 0 since eps_hat = 0);
    s^2 = (0.1 / 0.9)(1 - 0.1 / 0.9) = 0.0987654...; log p = -0.5 (2.5)^2 / s^2 - 0.5 log(2 pi s^2) = -31.40206."""
    noise = DDPMProcess(torch.tensor([0.9, 0.5, 0.1], dtype=torch.float64), "epsilon")
    sampler = FewStepSampler(noise, eta=1.0, timesteps=[2, 0])
    assert sampler.stochastic.tolist() == [True, False]
    assert sampler.coefficients[0].std ** 2 == pytest.approx(0.08 / 0.81)
    latents = torch.tensor([1.0, 0.5, 0.5]).reshape(3, 1, 1, 1, 1)
    trajectory = Trajectory(latents, sampler.timesteps, sampler.stochastic)
    log_probs = sampler.transition_log_probs(_Identity(noise), _ZeroEps(), trajectory, {"c": torch.zeros(1, 1)})
    assert log_probs.shape == (1, 1)
    assert log_probs.item() == pytest.approx(-31.402059726708373, abs=1e-9)
    assert gaussian_log_prob(torch.zeros(1, 2), torch.zeros(1, 2), 1.0, "sum").item() == pytest.approx(-math.log(2 * math.pi))
    assert gaussian_log_prob(torch.zeros(1, 2), torch.zeros(1, 2), 1.0).item() == pytest.approx(-0.5 * math.log(2 * math.pi))
    residual = torch.tensor([[1.0, 3.0]])  # per-dim log-density -0.5 r^2 - 0.5 log 2 pi: mean over dims -2.5 - 0.5 log 2 pi
    assert gaussian_log_prob(residual, torch.zeros(1, 2), 1.0).item() == pytest.approx(-2.5 - 0.5 * math.log(2 * math.pi))
    with pytest.raises(ValueError, match="reduction"):
        gaussian_log_prob(residual, torch.zeros(1, 2), 1.0, "max")  # type: ignore[arg-type]


def test_pso_log_ratios_of_a_small_policy_move_stay_inside_the_clip_at_sdxl_latent_size() -> None:
    """At real size (an SDXL latent, 4x128x128 = 65,536 dims) on SDXL's own schedule, 4 trailing steps, eta 1:
    a policy whose transition mean moves by an RMS of 1e-3 per dimension. The per-dimension mean log-ratio
    (the default, as DDPO and Flow-GRPO reduce) stays far inside log(1 +- 0.1); the sum over dimensions
    lands outside it at every stochastic step, so online PSO's clip would zero every gradient."""
    from diffalign.trainers.objectives.pso import PSOOnline

    noise = DDPMProcess.from_scheduler_config(
        {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "prediction_type": "epsilon"}
    )
    sampler = FewStepSampler(noise, num_steps=4, eta=1.0)
    generator = torch.Generator().manual_seed(0)
    objective = PSOOnline(beta=50.0, clip_range=0.1)
    stochastic = [k for k, s in enumerate(sampler.stochastic.tolist()) if s]
    assert len(stochastic) == 3
    for k in stochastic:
        std = sampler.coefficients[k].std
        reference_mean = torch.randn(1, 4, 128, 128, generator=generator, dtype=torch.float64)
        x_next = reference_mean + std * torch.randn(reference_mean.shape, generator=generator, dtype=torch.float64)
        move = torch.randn(reference_mean.shape, generator=generator, dtype=torch.float64)
        policy_mean = reference_mean + 1e-3 * move / move.pow(2).mean().sqrt()  # RMS exactly 1e-3
        ratios = {
            reduction: gaussian_log_prob(x_next, policy_mean, std, reduction) - gaussian_log_prob(x_next, reference_mean, std, reduction)
            for reduction in ("mean", "sum")
        }
        assert ratios["mean"].abs().item() < 1e-4 < objective.high, (k, std, ratios)
        assert ratios["sum"].abs().item() > objective.high, (k, std, ratios)  # what the summed form did: clipped
        nll = {key: -value.reshape(1, 1, 1).expand(1, 2, 1) for key, value in ratios.items()}
        zero = torch.zeros(1, 2, 1, dtype=torch.float64)
        scores = torch.tensor([[1.0, 0.0]])
        assert objective(nll["mean"] * torch.tensor([1.0, -1.0]).view(1, 2, 1), zero, scores).metrics["clip_fraction"] == 0


class _FrozenCopy:
    """Duck-typed reference (as trainers.models.FrozenCopyReference): predicts through the backbone, no grad."""

    def __init__(self, network: nn.Module) -> None:
        self.network = network.requires_grad_(False)

    @torch.no_grad()
    def predict(self, backbone, noisy, timesteps, conditioning):
        return backbone.predict(self.network, noisy, timesteps, conditioning)


@pytest.mark.parametrize("family", ["sd2", "sd3"])
def test_policy_log_probs_have_gradients_and_the_same_network_gives_ratio_zero(backbones: dict, family: str) -> None:
    backbone = backbones[family]
    policy = copy.deepcopy(backbone.denoiser).requires_grad_(True)
    sampler = FewStepSampler(backbone.noise, eta=1.0)
    conditioning = sampling_conditioning(backbone, PROMPTS * 2, 32)
    trajectory = sampler.sample(backbone, policy, conditioning, backbone.latent_shape(32), generators([0, 1, 2, 3]))
    policy_lp = sampler.transition_log_probs(backbone, policy, trajectory, conditioning)
    assert policy_lp.shape == (4, 3) and torch.isfinite(policy_lp).all()
    policy_lp.sum().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in policy.parameters())

    same = sampler.transition_log_probs(backbone, _FrozenCopy(copy.deepcopy(policy)), trajectory, conditioning)
    assert not same.requires_grad
    assert torch.equal(policy_lp.detach() - same, torch.zeros_like(same))  # log(pi_theta / pi_ref) is exactly 0

    perturbed = copy.deepcopy(policy)
    with torch.no_grad():
        for parameter in perturbed.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=torch.Generator().manual_seed(9)))
    other = sampler.transition_log_probs(backbone, _FrozenCopy(perturbed), trajectory, conditioning)
    assert (policy_lp.detach() - other).sum() > 0  # a sample estimate of KL(pi_theta || pi_perturbed) >= 0
    one = sampler.transition_log_probs(backbone, policy, trajectory, conditioning, steps=[1])
    torch.testing.assert_close(one.detach(), policy_lp.detach()[:, 1:2])
    with pytest.raises(ValueError, match="not a stochastic step"):
        sampler.transition_log_probs(backbone, policy, trajectory, conditioning, steps=[3])


def test_deterministic_sampler_has_no_log_probs_and_schedules_must_match(backbones: dict) -> None:
    backbone = backbones["sd15"]
    conditioning = sampling_conditioning(backbone, PROMPTS, 32)
    deterministic = FewStepSampler(backbone.noise, eta=0.0)
    trajectory = deterministic.sample(
        backbone, backbone.denoiser, conditioning, backbone.latent_shape(32), generators([0, 1])
    )
    assert deterministic.transition_log_probs(backbone, backbone.denoiser, trajectory, conditioning).shape == (2, 0)
    with pytest.raises(ValueError, match="another schedule"):
        FewStepSampler(backbone.noise, num_steps=2).transition_log_probs(
            backbone, backbone.denoiser, trajectory, conditioning
        )
    with pytest.raises(ValueError, match="batch"):
        deterministic.sample(backbone, backbone.denoiser, conditioning, backbone.latent_shape(32), generators([0]))


# --------------------------------------------------------------------------- every family, end to end


@pytest.mark.parametrize("family", tiny.FAMILIES)
def test_generate_images_on_every_family(backbones: dict, family: str) -> None:
    backbone = backbones[family]
    images = generate_images(backbone, None, PROMPTS, 32, seeds=[0, 1], num_steps=4, eta=1.0)
    assert images.shape == (2, 3, 32, 32) and torch.isfinite(images).all()
    assert images.min() >= -1 and images.max() <= 1
    again = generate_images(backbone, backbone.denoiser, PROMPTS, 32, seeds=[0, 1])
    assert torch.equal(images, again)
    pictures = to_pil(images)
    assert len(pictures) == 2 and pictures[0].size == (32, 32) and pictures[0].mode == "RGB"


def test_distilled_timesteps_on_a_distilled_model(tiny_models: dict[str, Path]) -> None:
    backbone = load_backbone(ModelConfig(path=str(tiny_models["sdxl"]), timestep_mode="distilled"))
    sampler = FewStepSampler(backbone.noise)
    assert sampler.timesteps.tolist() == [999, 749, 499, 249]
    conditioning = sampling_conditioning(backbone, PROMPTS, 32)
    trajectory = sampler.sample(
        backbone, backbone.denoiser, conditioning, backbone.latent_shape(32), generators([0, 1])
    )
    assert trajectory.timesteps.tolist() == [999, 749, 499, 249]
    assert torch.isfinite(sampler.transition_log_probs(backbone, backbone.denoiser, trajectory, conditioning)).all()


def test_a_reduced_precision_reference_runs_under_dtype(backbones: dict) -> None:
    """As group_errors does for a bf16 reference: inputs cast to ``dtype``, the log-density still in float64."""
    backbone = backbones["sd15"]
    sampler = FewStepSampler(backbone.noise, eta=1.0)
    conditioning = sampling_conditioning(backbone, PROMPTS, 32)
    trajectory = sampler.sample(
        backbone, backbone.denoiser, conditioning, backbone.latent_shape(32), generators([0, 1])
    )
    reference = _FrozenCopy(copy.deepcopy(backbone.denoiser).to(torch.bfloat16))
    log_probs = sampler.transition_log_probs(backbone, reference, trajectory, conditioning, dtype=torch.bfloat16)
    assert log_probs.dtype == torch.float64 and log_probs.shape == (2, 3) and torch.isfinite(log_probs).all()
