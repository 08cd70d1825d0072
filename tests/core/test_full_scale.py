"""The full-scale pipelines have the published architectures: configs key by key, parameter counts exactly.

Everything is built on the meta device (no weights allocated, seconds for 6 B parameters) and only the
configs are written to disk: saving random full-size weights belongs to ``diffalign tiny --scale full``,
not to the suite. The published values are written here a second time, on purpose, from the hub files
cited, so a slip in ``diffalign/tiny/full_scale.py`` cannot agree with itself.
"""

from __future__ import annotations

import json

import pytest

from diffalign.tiny.full_scale import COMPONENT_CONFIGS, FULL_SCALE_FAMILIES, build_full_scale_component

# Published parameter counts. UNets: the well-known SD 1.5 (859.52 M) and SDXL base (2.567 B) figures;
# the KL-f8 VAE 83.65 M; CLIP ViT-L/14 text 123.06 M (+ 768x768 projection in SD3); OpenCLIP bigG text
# 694.66 M; SD3-medium's MMDiT 2.028 B ("2B").
PUBLISHED_COUNTS = {
    "sd15": {"unet": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480},
    "sdxl": {"unet": 2_567_463_684, "vae": 83_653_863, "text_encoder": 123_060_480, "text_encoder_2": 694_659_840},
    "sd3": {"transformer": 2_028_328_000, "vae": 83_819_683, "text_encoder": 123_650_304, "text_encoder_2": 694_659_840},
}
# SD3.5-medium ("2.5B" with its 384 x 384 x 1536 position-embedding buffer, 226 M values, not a parameter): SD3-medium's
# MMDiT plus, in each of the 13 dual-attention blocks, a second attention (4 projections of 1536 x 1536 with bias), its
# QK norms (2 x 64) and 3 more AdaLN modulation rows (3 x (1536 x 1536 + 1536)); plus QK RMS-norms everywhere
# (4 x 64 per block, 24 blocks). Worked by hand, not read from the code under test.
_DIM = 1536
SD35_MEDIUM_TRANSFORMER_COUNT = (
    2_028_328_000 + 13 * (4 * (_DIM * _DIM + _DIM) + 2 * 64 + 3 * (_DIM * _DIM + _DIM)) + 24 * 4 * 64
)
PUBLISHED_COUNTS["sd35-medium"] = {**PUBLISHED_COUNTS["sd3"], "transformer": SD35_MEDIUM_TRANSFORMER_COUNT}

# Key values from the published config.json files (the architecture-defining ones, written independently).
# stable-diffusion-v1-5/stable-diffusion-v1-5 unet/config.json
SD15_UNET = {
    "block_out_channels": [320, 640, 1280, 1280], "layers_per_block": 2, "attention_head_dim": 8,
    "cross_attention_dim": 768, "in_channels": 4, "out_channels": 4, "sample_size": 64, "norm_num_groups": 32,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "flip_sin_to_cos": True, "freq_shift": 0, "use_linear_projection": False,
}  # fmt: skip
# stabilityai/stable-diffusion-xl-base-1.0 unet/config.json
SDXL_UNET = {
    "block_out_channels": [320, 640, 1280], "transformer_layers_per_block": [1, 2, 10],
    "attention_head_dim": [5, 10, 20], "cross_attention_dim": 2048, "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256, "projection_class_embeddings_input_dim": 2816, "layers_per_block": 2,
    "use_linear_projection": True, "sample_size": 128, "in_channels": 4, "out_channels": 4,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "addition_embed_type_num_heads": 64, "mid_block_type": "UNetMidBlock2DCrossAttn",
}  # fmt: skip
# stabilityai/stable-diffusion-3-medium-diffusers transformer/config.json
SD3_TRANSFORMER = {
    "num_layers": 24, "num_attention_heads": 24, "attention_head_dim": 64, "joint_attention_dim": 4096,
    "caption_projection_dim": 1536, "pooled_projection_dim": 2048, "in_channels": 16, "out_channels": 16,
    "patch_size": 2, "pos_embed_max_size": 192, "sample_size": 128,
}  # fmt: skip
# stabilityai/stable-diffusion-3.5-medium transformer/config.json
SD35_MEDIUM_TRANSFORMER = {**SD3_TRANSFORMER, "pos_embed_max_size": 384, "qk_norm": "rms_norm",
                           "dual_attention_layers": [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]}  # fmt: skip
# vae/config.json of the three repositories
VAE = {"block_out_channels": [128, 256, 512, 512], "layers_per_block": 2, "latent_channels": 4, "norm_num_groups": 32}
SD3_VAE = {**VAE, "latent_channels": 16, "scaling_factor": 1.5305, "shift_factor": 0.0609,
           "use_quant_conv": False, "use_post_quant_conv": False}  # fmt: skip
# openai/clip-vit-large-patch14 text_config; text_encoder_2/config.json of SDXL base (OpenCLIP bigG)
CLIP_L = {"vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
          "num_attention_heads": 12, "max_position_embeddings": 77, "hidden_act": "quick_gelu", "projection_dim": 768}  # fmt: skip
BIGG = {"vocab_size": 49408, "hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32,
        "num_attention_heads": 20, "max_position_embeddings": 77, "hidden_act": "gelu", "projection_dim": 1280}  # fmt: skip

PUBLISHED_VALUES = {
    "sd15": {"unet": SD15_UNET, "vae": {**VAE, "scaling_factor": 0.18215}, "text_encoder": CLIP_L},
    "sdxl": {"unet": SDXL_UNET, "vae": {**VAE, "scaling_factor": 0.13025}, "text_encoder": CLIP_L, "text_encoder_2": BIGG},
    "sd3": {"transformer": SD3_TRANSFORMER, "vae": SD3_VAE, "text_encoder": CLIP_L, "text_encoder_2": BIGG},
    "sd35-medium": {"transformer": SD35_MEDIUM_TRANSFORMER, "vae": SD3_VAE, "text_encoder": CLIP_L, "text_encoder_2": BIGG},
}

CASES = [(family, name) for family in FULL_SCALE_FAMILIES for name in COMPONENT_CONFIGS[family]]


def _plain(value):
    return list(value) if isinstance(value, tuple) else value


def _saved_config(model, folder) -> dict:
    """The config.json the component writes (``save_pretrained`` writes this file beside its weights)."""
    if hasattr(model, "save_config"):  # diffusers
        model.save_config(folder)
    else:  # transformers
        model.config.save_pretrained(folder)
    return json.loads((folder / "config.json").read_text())


def test_every_component_is_covered():
    assert set(PUBLISHED_VALUES) == set(FULL_SCALE_FAMILIES) == set(PUBLISHED_COUNTS)
    for family in FULL_SCALE_FAMILIES:
        assert set(PUBLISHED_VALUES[family]) == set(COMPONENT_CONFIGS[family]) == set(PUBLISHED_COUNTS[family])


@pytest.mark.parametrize(("family", "name"), CASES)
def test_saved_config_matches_published_and_parameter_count_is_exact(family, name, tmp_path):
    model = build_full_scale_component(family, name, device="meta")
    saved = _saved_config(model, tmp_path)
    # every value the package cites from the hub file is what the model was built with and saves
    for key, value in COMPONENT_CONFIGS[family][name].items():
        assert _plain(saved[key]) == value, (family, name, key)
    # and the values written independently here agree
    for key, value in PUBLISHED_VALUES[family][name].items():
        assert _plain(saved[key]) == value, (family, name, key)
    assert sum(p.numel() for p in model.parameters()) == PUBLISHED_COUNTS[family][name]
    assert all(p.device.type == "meta" for p in model.parameters()), "the test must not allocate weights"


def test_unknown_family_or_component_says_what_exists():
    with pytest.raises(ValueError, match="sd15, sdxl, sd3"):
        build_full_scale_component("sd2", "unet", device="meta")
    with pytest.raises(ValueError, match="transformer"):
        build_full_scale_component("sd3", "unet", device="meta")


def test_saving_one_model_at_a_time_gives_a_pipeline_that_loads(monkeypatch, tmp_path):
    """``save_full_scale_pipeline`` writes the files ``save_pretrained`` would, model by model (shrunk here:
    same code, same classes, 32-wide layers), and the stock loader takes them with the real CLIP tokenizer."""
    import torch
    from diffusers import DiffusionPipeline

    from diffalign.tiny import full_scale
    from diffalign.tiny.clip_vocab import ClipVocabularyError, clip_bpe_path

    try:
        clip_bpe_path()
    except ClipVocabularyError as error:
        pytest.skip(f"CLIP's BPE file is not available here: {error}")
    small = {
        "unet": {**COMPONENT_CONFIGS["sd15"]["unet"], "block_out_channels": [32, 32, 32, 32], "layers_per_block": 1,
                 "cross_attention_dim": 32, "sample_size": 8},
        "vae": {**COMPONENT_CONFIGS["sd15"]["vae"], "block_out_channels": [32, 32, 32, 32], "layers_per_block": 1},
        "text_encoder": {**COMPONENT_CONFIGS["sd15"]["text_encoder"], "hidden_size": 32, "intermediate_size": 37,
                         "projection_dim": 32, "num_hidden_layers": 2, "num_attention_heads": 4},
    }  # fmt: skip
    monkeypatch.setitem(full_scale.COMPONENT_CONFIGS, "sd15", small)
    saved = full_scale.save_full_scale_pipeline("sd15", tmp_path / "sd15", seed=3)
    loaded = DiffusionPipeline.from_pretrained(saved)
    built = full_scale.build_full_scale_pipeline("sd15", seed=3)
    assert type(loaded) is type(built) and loaded.safety_checker is None
    for name in ("unet", "vae", "text_encoder"):
        expected = getattr(built, name).state_dict()
        assert all(torch.equal(value, expected[key]) for key, value in getattr(loaded, name).state_dict().items()), name
    assert loaded.tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
