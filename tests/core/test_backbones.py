"""Backbone adapters: loading by family, and conditioning/latents/predictions exactly as the stock pipelines make them.

Every parity check compares the adapter with the stock diffusers pipeline
loaded from the same tiny folder (``diffalign.tiny``), so a drift in how a
family encodes prompts (penultimate vs last hidden state, pooled output,
zero-padded T5 slot, VAE shift) fails here on CPU in seconds.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from diffalign import tiny
from diffalign.backbones import (
    StableDiffusion3Backbone,
    StableDiffusionBackbone,
    StableDiffusionXLBackbone,
    detect_family,
    load_backbone,
    sdxl_time_ids,
)
from diffalign.config import ModelConfig
from diffalign.noise import DDPMProcess, RectifiedFlowProcess

diffusers = pytest.importorskip("diffusers")
from diffusers import DiffusionPipeline  # noqa: E402

FAMILY_OF = {"sd15": "sd", "sd2": "sd", "sdxl": "sdxl", "sd3": "sd3", "sd35-medium": "sd3", "sd35-large": "sd3"}
SD3_LIKE = tuple(tiny.SD3_FAMILIES)  # one pipeline class, one backbone
CLASS_OF = {
    "sd15": StableDiffusionBackbone,
    "sd2": StableDiffusionBackbone,
    "sdxl": StableDiffusionXLBackbone,
    **dict.fromkeys(SD3_LIKE, StableDiffusion3Backbone),
}
NOISE_OF = {"sd15": DDPMProcess, "sd2": DDPMProcess, "sdxl": DDPMProcess, **dict.fromkeys(SD3_LIKE, RectifiedFlowProcess)}
LOAD_KWARGS = dict.fromkeys(SD3_LIKE, {"text_encoder_3": None, "tokenizer_3": None})  # the tiny SD3s have no T5

# "" (BOS, EOS, padding only), a short prompt, and one of 3 * 40 = 120 single-token words: truncated at 77.
LONG_PROMPT = " ".join(["a red circle"] * 40)
PROMPTS = ["", "a photo of a red circle on a blue square", LONG_PROMPT]


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("backbone_tiny")
    return {family: str(tiny.save_pipeline(family, root / family)) for family in tiny.FAMILIES}


@pytest.fixture(scope="module")
def backbones(folders: dict[str, str]) -> dict:
    return {family: load_backbone(ModelConfig(path=path)) for family, path in folders.items()}


@pytest.fixture(scope="module")
def pipelines(folders: dict[str, str]) -> dict:
    return {
        family: DiffusionPipeline.from_pretrained(path, **LOAD_KWARGS.get(family, {}))
        for family, path in folders.items()
    }


# --------------------------------------------------------------------------- loading


@pytest.mark.parametrize("family", tiny.FAMILIES)
def test_load_backbone_picks_the_family(folders: dict[str, str], backbones: dict, family: str) -> None:
    backbone = backbones[family]
    assert detect_family(folders[family]) == FAMILY_OF[family]
    assert type(backbone) is CLASS_OF[family]
    assert backbone.family == FAMILY_OF[family]
    assert type(backbone.noise) is NOISE_OF[family]
    assert backbone.has_encoders
    # an explicit, matching family is accepted too
    explicit = load_backbone(ModelConfig(path=folders[family], family=FAMILY_OF[family]), load_encoders=False)
    assert type(explicit) is CLASS_OF[family] and not explicit.has_encoders


@pytest.mark.parametrize("family", tiny.FAMILIES)
def test_each_lora_target_names_attention_projections_of_its_denoiser(backbones: dict, family: str) -> None:
    """Every default LoRA target of the adapter matches a module of its own denoiser (peft fails only when
    none matches, so one stale name would silently leave a projection untrained)."""
    backbone = backbones[family]
    names = [name for name, _ in backbone.denoiser.named_modules()]
    for target in backbone.lora_target_modules:
        assert any(name == target or name.endswith("." + target) for name in names), f"{family}: no module {target}"
    if family in SD3_LIKE:  # no MMDiT attention is left out: SD3.5 Medium's second attention (attn2) where it exists
        has_attn2 = any(".attn2." in name for name in names)
        assert ("attn2.to_q" in backbone.lora_target_modules) == (family == "sd35-medium") == has_attn2


def test_denoiser_subfolder_comes_from_the_adapter() -> None:
    from diffalign.backbones import DENOISER_SUBFOLDERS, denoiser_subfolder

    assert [denoiser_subfolder(f) for f in ("sd", "sdxl", "sd3")] == ["unet", "unet", "transformer"]
    assert DENOISER_SUBFOLDERS == ("unet", "transformer")
    with pytest.raises(ValueError, match="unknown model family 'flux'"):
        denoiser_subfolder("flux")


def test_v_prediction_travels_from_the_folder(backbones: dict) -> None:
    assert backbones["sd15"].noise.prediction_type == "epsilon"
    assert backbones["sd2"].noise.prediction_type == "v_prediction"


def test_sd3_without_t5_loads_without_t5(backbones: dict) -> None:
    backbone = backbones["sd3"]
    assert backbone.t5_encoder is None and backbone.max_sequence_length == 256


def test_folder_that_is_not_a_pipeline(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("not a model")
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        detect_family(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        load_backbone(ModelConfig(path=str(tmp_path)))


def test_unsupported_pipeline_class_lists_supported(tmp_path: Path) -> None:
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    with pytest.raises(ValueError, match="FluxPipeline.*StableDiffusion3Pipeline, StableDiffusionPipeline"):
        detect_family(str(tmp_path))


def test_family_mismatch_is_an_error(folders: dict[str, str]) -> None:
    with pytest.raises(ValueError, match="model.family is 'sdxl'.*sd pipeline"):
        load_backbone(ModelConfig(path=folders["sd15"], family="sdxl"))
    with pytest.raises(ValueError, match="model.family is 'sd'.*sd3 pipeline"):
        load_backbone(ModelConfig(path=folders["sd3"], family="sd"))


def test_distilled_mode_reaches_the_noise_process(folders: dict[str, str]) -> None:
    backbone = load_backbone(ModelConfig(path=folders["sdxl"], timestep_mode="distilled"), load_encoders=False)
    t = backbone.noise.sample_timesteps(64, generator=torch.Generator().manual_seed(0))
    assert set(t.tolist()) <= {249, 499, 749, 999}
    with pytest.raises(ValueError, match="distilled"):
        load_backbone(ModelConfig(path=folders["sd3"], timestep_mode="distilled"), load_encoders=False)


# --------------------------------------------------------------------------- prompt encoding parity


@pytest.mark.parametrize("family", ["sd15", "sd2"])
def test_sd_prompt_parity(backbones: dict, pipelines: dict, family: str) -> None:
    pipe = pipelines[family]
    assert len(pipe.tokenizer(LONG_PROMPT).input_ids) > pipe.tokenizer.model_max_length  # really truncated
    expected = pipe.encode_prompt(PROMPTS, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False)[0]
    conditioning = backbones[family].encode_prompts(PROMPTS)
    assert set(conditioning) == {"prompt_embeds"}
    assert conditioning["prompt_embeds"].shape == (3, 77, 32)
    torch.testing.assert_close(conditioning["prompt_embeds"], expected, atol=1e-6, rtol=0)
    # the prompts really differ: parity is not trivially between constant tensors
    assert not torch.allclose(conditioning["prompt_embeds"][0], conditioning["prompt_embeds"][1])


def test_sdxl_prompt_parity(backbones: dict, pipelines: dict) -> None:
    prompt_embeds, _, pooled, _ = pipelines["sdxl"].encode_prompt(
        prompt=PROMPTS, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False
    )
    conditioning = backbones["sdxl"].encode_prompts(PROMPTS)
    assert set(conditioning) == {"prompt_embeds", "pooled_prompt_embeds"}
    assert conditioning["prompt_embeds"].shape == (3, 77, 64)  # both encoders' 32 wide states concatenated
    assert conditioning["pooled_prompt_embeds"].shape == (3, 32)
    torch.testing.assert_close(conditioning["prompt_embeds"], prompt_embeds, atol=1e-6, rtol=0)
    torch.testing.assert_close(conditioning["pooled_prompt_embeds"], pooled, atol=1e-6, rtol=0)


def test_sd3_prompt_parity(backbones: dict, pipelines: dict) -> None:
    import inspect

    pipe = pipelines["sd3"]
    default_length = inspect.signature(pipe.encode_prompt).parameters["max_sequence_length"].default
    assert default_length == backbones["sd3"].max_sequence_length == 256
    prompt_embeds, _, pooled, _ = pipe.encode_prompt(
        prompt=PROMPTS,
        prompt_2=None,
        prompt_3=None,
        device="cpu",
        num_images_per_prompt=1,
        do_classifier_free_guidance=False,
        max_sequence_length=256,
    )
    conditioning = backbones["sd3"].encode_prompts(PROMPTS)
    # 77 CLIP tokens + 256 T5 slots (zeros without T5), joint width 64; pooled: 32 + 32
    assert conditioning["prompt_embeds"].shape == (3, 77 + 256, 64)
    assert conditioning["pooled_prompt_embeds"].shape == (3, 64)
    assert torch.count_nonzero(conditioning["prompt_embeds"][:, 77:]) == 0
    torch.testing.assert_close(conditioning["prompt_embeds"], prompt_embeds, atol=1e-6, rtol=0)
    torch.testing.assert_close(conditioning["pooled_prompt_embeds"], pooled, atol=1e-6, rtol=0)


def test_encoding_is_per_prompt(backbones: dict) -> None:
    """A prompt's embedding does not depend on its batch neighbours (the cache stores rows one by one)."""
    for family in ("sd15", "sdxl", "sd3"):
        batch = backbones[family].encode_prompts(PROMPTS)
        alone = backbones[family].encode_prompts([PROMPTS[1]])
        for key in batch:
            torch.testing.assert_close(batch[key][1:2], alone[key], atol=1e-6, rtol=0)


# --------------------------------------------------------------------------- SDXL time ids


def test_sdxl_time_ids_by_hand() -> None:
    """Row = original (h, w) + crop (top, left) + (res, res).

    (512, 768) + (0, 64) + (256, 256) -> [512, 768, 0, 64, 256, 256]
    (1024, 1024) + (10, 0) + (256, 256) -> [1024, 1024, 10, 0, 256, 256]
    """
    original = torch.tensor([[512, 768], [1024, 1024]])
    crops = torch.tensor([[0, 64], [10, 0]])
    ids = sdxl_time_ids(original, crops, 256)
    assert ids.tolist() == [[512, 768, 0, 64, 256, 256], [1024, 1024, 10, 0, 256, 256]]
    assert ids.shape == (2, 6)


def test_sdxl_time_ids_follow_the_input_device() -> None:
    """The 'meta' device stands in for CUDA on a CPU-only machine: any non-CPU device shows the mismatch."""
    sizes = torch.zeros(2, 2, dtype=torch.int64, device="meta")
    ids = sdxl_time_ids(sizes, torch.zeros(2, 2, dtype=torch.int64, device="meta"), 32)
    assert ids.device.type == "meta" and ids.shape == (2, 6)


def test_sdxl_time_ids_match_the_pipeline(pipelines: dict, backbones: dict) -> None:
    pipe = pipelines["sdxl"]
    expected = pipe._get_add_time_ids(
        (48, 40), (4, 2), (32, 32), dtype=torch.float32,
        text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim,
    )  # fmt: skip
    ours = backbones["sdxl"].geometry_conditioning(torch.tensor([[48.0, 40.0]]), torch.tensor([[4.0, 2.0]]), 32)
    assert set(ours) == {"time_ids"}
    torch.testing.assert_close(ours["time_ids"], expected, atol=0, rtol=0)
    assert backbones["sd15"].geometry_conditioning(torch.zeros(1, 2), torch.zeros(1, 2), 32) == {}
    assert backbones["sd3"].geometry_conditioning(torch.zeros(1, 2), torch.zeros(1, 2), 32) == {}


# --------------------------------------------------------------------------- images -> latents


@pytest.mark.parametrize("family", tiny.FAMILIES)
def test_encode_images_is_the_shifted_scaled_posterior_mode(backbones: dict, family: str) -> None:
    backbone = backbones[family]
    pixels = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    latents = backbone.encode_images(pixels)
    assert latents.shape == (2, 4, 16, 16)
    config = backbone.vae.config
    shift = config.shift_factor or 0.0
    if family in SD3_LIKE:
        assert (shift, config.scaling_factor) == (0.0609, 1.5305)
    with torch.no_grad():
        expected = (backbone.vae.encode(pixels).latent_dist.mode() - shift) * config.scaling_factor
    torch.testing.assert_close(latents, expected, atol=1e-6, rtol=0)
    assert torch.equal(latents, backbone.encode_images(pixels))  # deterministic: no posterior sampling


def test_sd3_shift_is_not_forgotten(backbones: dict) -> None:
    """Forgetting the shift would move every latent by 0.0609 * 1.5305 = 0.09321."""
    backbone = backbones["sd3"]
    pixels = torch.zeros(1, 3, 32, 32)
    with torch.no_grad():
        unshifted = backbone.vae.encode(pixels).latent_dist.mode() * 1.5305
    difference = unshifted - backbone.encode_images(pixels)
    torch.testing.assert_close(difference, torch.full_like(difference, 0.0609 * 1.5305), atol=1e-5, rtol=0)


# --------------------------------------------------------------------------- predict


@pytest.mark.parametrize("family", tiny.FAMILIES)
def test_predict_shape_and_gradients(backbones: dict, family: str) -> None:
    backbone = backbones[family]
    generator = torch.Generator().manual_seed(0)
    noisy = torch.randn(2, 4, 16, 16, generator=generator)
    timesteps = backbone.noise.sample_timesteps(2, generator=generator)
    if family in SD3_LIKE:
        timesteps = backbone.noise.timestep_values[timesteps]
    conditioning = backbone.encode_prompts(["a red circle", "a blue square"])
    conditioning.update(
        backbone.geometry_conditioning(torch.tensor([[32, 32], [40, 36]]), torch.tensor([[0, 0], [4, 2]]), 32)
    )
    denoiser = backbone.denoiser
    denoiser.zero_grad(set_to_none=True)

    prediction = backbone.predict(denoiser, noisy, timesteps, conditioning)

    assert prediction.shape == noisy.shape
    prediction.square().mean().backward()
    grads = [p.grad for p in denoiser.parameters() if p.requires_grad and p.grad is not None]
    assert len(grads) > 0.9 * sum(1 for p in denoiser.parameters() if p.requires_grad)
    assert sum(g.abs().sum().item() for g in grads) > 0
    # gradients stop at the denoiser: the VAE and the text encoders are frozen
    encoders = getattr(backbone, "text_encoders", None) or getattr(backbone, "clip_encoders", None)
    encoders = encoders or [backbone.text_encoder]
    for module in [backbone.vae, *encoders]:
        assert not any(p.requires_grad for p in module.parameters())
    denoiser.zero_grad(set_to_none=True)


def test_sdxl_prediction_depends_on_time_ids(backbones: dict) -> None:
    """The time ids reach the UNet: changing the crop changes the prediction."""
    backbone = backbones["sdxl"]
    noisy = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    text = backbone.encode_prompts(["a red circle"])
    with torch.no_grad():
        outputs = [
            backbone.predict(
                backbone.denoiser,
                noisy,
                torch.tensor([500]),
                {**text, **backbone.geometry_conditioning(torch.tensor([[32, 32]]), torch.tensor([crop]), 32)},
            )
            for crop in ([0, 0], [8, 8])
        ]
    assert not torch.allclose(outputs[0], outputs[1])
