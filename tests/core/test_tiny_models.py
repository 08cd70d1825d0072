"""Tiny pipelines load through stock diffusers ``from_pretrained`` and generate, per family."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from diffalign import tiny

diffusers = pytest.importorskip("diffusers")
from diffusers import (  # noqa: E402
    DiffusionPipeline,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
)

PIPELINE_CLASSES = {
    "sd15": StableDiffusionPipeline,
    "sd2": StableDiffusionPipeline,
    "sdxl": StableDiffusionXLPipeline,
    "sd3": StableDiffusion3Pipeline,
    "sd35-medium": StableDiffusion3Pipeline,
    "sd35-large": StableDiffusion3Pipeline,
}

# The tiny SD3s have no T5; diffusers refuses to load a folder whose model_index.json
# lists text_encoder_3 as null unless told so, exactly as for a real SD3 without T5.
LOAD_KWARGS = dict.fromkeys(tiny.SD3_FAMILIES, {"text_encoder_3": None, "tokenizer_3": None})


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {family: tiny.save_pipeline(family, root / family, seed=0) for family in tiny.FAMILIES}


def load(saved: dict[str, Path], family: str) -> DiffusionPipeline:
    return DiffusionPipeline.from_pretrained(saved[family], **LOAD_KWARGS.get(family, {}))


def generate(pipe: DiffusionPipeline, prompt: str = "a photo of a red circle on a blue square") -> np.ndarray:
    generator = torch.Generator("cpu").manual_seed(0)
    return pipe(
        prompt, num_inference_steps=2, output_type="np", height=32, width=32, generator=generator
    ).images


# --------------------------------------------------------------------------- tokenizer


def test_tokenizer_round_trip_and_single_token_words(tmp_path: Path) -> None:
    from transformers import CLIPTokenizer

    tiny.build_tokenizer().save_pretrained(tmp_path)
    tokenizer = CLIPTokenizer.from_pretrained(tmp_path)
    assert tokenizer.model_max_length == 77
    assert tokenizer.bos_token_id == tiny.BOS_TOKEN_ID
    assert tokenizer.eos_token_id == tokenizer.pad_token_id == tiny.EOS_TOKEN_ID
    assert len(tokenizer) == tiny.TOY_VOCAB_SIZE

    for word in tiny.TOY_WORDS:
        assert len(tokenizer(word, add_special_tokens=False).input_ids) == 1, word
    prompt = "a photo of a red circle on a blue square"
    ids = tokenizer(prompt).input_ids
    assert ids[0] == tiny.BOS_TOKEN_ID and ids[-1] == tiny.EOS_TOKEN_ID
    assert len(ids) == len(prompt.split()) + 2

    # Unknown words still tokenise (character / byte fallback), never to the unknown token.
    unknown = tokenizer("Zebra, 42 éclair!", add_special_tokens=False).input_ids
    assert len(unknown) > 3 and tiny.EOS_TOKEN_ID not in unknown
    assert tokenizer.decode(unknown) == "zebra , 4 2 éclair !"

    padded = tokenizer(prompt, padding="max_length", max_length=77, truncation=True).input_ids
    assert len(padded) == 77 and padded[-1] == tiny.EOS_TOKEN_ID


def test_text_encoder_pools_at_first_eos() -> None:
    tokenizer = tiny.build_tokenizer()
    encoder = tiny.build_text_encoder(with_projection=False)
    ids = tokenizer(["a cat", "a photo of a dog"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        out = encoder(ids)
    first_eos = (ids == tiny.EOS_TOKEN_ID).int().argmax(dim=-1)
    assert first_eos.tolist() == [3, 6]
    torch.testing.assert_close(out.pooler_output, out.last_hidden_state[torch.arange(2), first_eos])


# --------------------------------------------------------------------------- pipelines


@pytest.mark.parametrize("family", tiny.FAMILIES)
def test_pipeline_loads_and_generates_deterministically(saved: dict[str, Path], family: str) -> None:
    pipe = load(saved, family)
    assert type(pipe) is PIPELINE_CLASSES[family]
    images = generate(pipe)
    assert images.shape == (1, 32, 32, 3)
    assert np.isfinite(images).all()

    again = generate(load(saved, family))
    np.testing.assert_array_equal(images, again)
    # The prompt reaches the denoiser.
    assert not np.array_equal(images, generate(pipe, "a green triangle"))


def test_scheduler_prediction_types(saved: dict[str, Path]) -> None:
    def scheduler_config(family: str) -> dict:
        return json.loads((saved[family] / "scheduler" / "scheduler_config.json").read_text())

    sd15 = scheduler_config("sd15")
    assert sd15["_class_name"] == "PNDMScheduler"
    assert sd15["prediction_type"] == "epsilon"
    assert sd15["beta_schedule"] == "scaled_linear" and sd15["steps_offset"] == 1 and sd15["skip_prk_steps"]
    sd2 = scheduler_config("sd2")
    assert sd2["_class_name"] == "DDIMScheduler"
    assert sd2["prediction_type"] == "v_prediction"
    assert scheduler_config("sdxl")["_class_name"] == "EulerDiscreteScheduler"
    sd3 = scheduler_config("sd3")
    assert sd3["_class_name"] == "FlowMatchEulerDiscreteScheduler" and sd3["shift"] == 3.0


def test_sd2_unet_is_sd2_shaped(saved: dict[str, Path]) -> None:
    unet = json.loads((saved["sd2"] / "unet" / "config.json").read_text())
    assert unet["use_linear_projection"] is True
    assert isinstance(unet["attention_head_dim"], list)
    sd15 = json.loads((saved["sd15"] / "unet" / "config.json").read_text())
    assert sd15["use_linear_projection"] is False and isinstance(sd15["attention_head_dim"], int)


def test_sdxl_unet_conditioning_dims(saved: dict[str, Path]) -> None:
    pipe = load(saved, "sdxl")
    config = pipe.unet.config
    assert config.addition_embed_type == "text_time"
    projection_dim = pipe.text_encoder_2.config.projection_dim
    assert config.projection_class_embeddings_input_dim == 6 * config.addition_time_embed_dim + projection_dim
    assert config.cross_attention_dim == pipe.text_encoder.config.hidden_size + pipe.text_encoder_2.config.hidden_size
    assert pipe.config.force_zeros_for_empty_prompt is True
    assert type(pipe.text_encoder).__name__ == "CLIPTextModel"
    assert type(pipe.text_encoder_2).__name__ == "CLIPTextModelWithProjection"


def test_sd3_has_no_t5_and_sd3_vae(saved: dict[str, Path]) -> None:
    pipe = load(saved, "sd3")
    assert pipe.text_encoder_3 is None and pipe.tokenizer_3 is None
    assert pipe.vae.config.shift_factor == pytest.approx(0.0609)
    assert pipe.vae.config.scaling_factor == pytest.approx(1.5305)
    clip_width = pipe.text_encoder.config.hidden_size + pipe.text_encoder_2.config.hidden_size
    assert pipe.transformer.config.joint_attention_dim >= clip_width
    index = json.loads((saved["sd3"] / "model_index.json").read_text())
    assert index["text_encoder_3"] == [None, None]


def test_sd35_pipelines_have_what_sd35_adds_and_sd3_lacks(saved: dict[str, Path]) -> None:
    """SD3.5 Large: QK RMS-norm in every attention; SD3.5 Medium also a second, image-only attention
    (MMDiT-X) in its first block(s); SD3: neither. Read from the loaded modules, not just the config."""
    from diffusers.models.normalization import RMSNorm

    def features(family: str) -> tuple[bool, list[bool]]:
        blocks = load(saved, family).transformer.transformer_blocks
        qk = all(isinstance(block.attn.norm_q, RMSNorm) and isinstance(block.attn.norm_k, RMSNorm) for block in blocks)
        return qk, [getattr(block, "attn2", None) is not None for block in blocks]

    assert features("sd3") == (False, [False, False])
    assert features("sd35-large") == (True, [False, False])
    assert features("sd35-medium") == (True, [True, False])


def test_save_pipeline_replaces_atomically(tmp_path: Path) -> None:
    target = tmp_path / "model"
    tiny.save_pipeline("sd15", target, seed=0)
    tiny.save_pipeline("sd15", target, seed=1)  # over an existing folder
    assert (target / "model_index.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no staging / old folders left


# --------------------------------------------------------------------------- determinism


def state(pipe: DiffusionPipeline) -> dict[str, torch.Tensor]:
    return {
        f"{name}.{key}": tensor
        for name, module in pipe.components.items()
        if isinstance(module, torch.nn.Module)
        for key, tensor in module.state_dict().items()
    }


@pytest.mark.parametrize("family", tiny.FAMILIES)
def test_build_is_deterministic_in_seed(family: str) -> None:
    rng_before = torch.get_rng_state()
    a, b, c = (state(tiny.build_pipeline(family, seed=seed)) for seed in (0, 0, 1))
    assert torch.equal(torch.get_rng_state(), rng_before)  # building leaves the global RNG alone
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)
    # Every learned component differs between seeds, not just one of them.
    for component in {k.split(".", 1)[0] for k in a}:
        keys = [k for k in a if k.startswith(component + ".") and a[k].is_floating_point()]
        assert any(not torch.equal(a[k], c[k]) for k in keys), component
