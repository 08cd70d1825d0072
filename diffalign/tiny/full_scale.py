"""Full-scale random-weight pipelines: the published architectures of SD 1.5, SDXL base 1.0, SD3-medium and SD3.5-medium.

The tiny pipelines prove the code paths; these prove the sizes. Each family's
components are built from the ``config.json`` values its public checkpoint
publishes (copied below with the hub repository and file cited), with random
weights, and saved in diffusers format, so ``diffalign train`` loads them
through exactly the code a real checkpoint takes: memory, step time and LoRA
targets are those of the real model without downloading it.

What is not the published model, and why:

* SD3's T5-XXL (4.7 B parameters, ``text_encoder_3``) is left out
  (``text_encoder_3=None``), as the SD3 pipeline allows and ``model.use_t5=false``
  trains; the two CLIP encoders are full size.
* The CLIP tokenizers use the real CLIP BPE vocabulary (49,408 tokens, see
  :mod:`~diffalign.tiny.clip_vocab`); the T5 tokenizer is absent with T5.
* No safety checker, feature extractor or watermarker (as the tiny pipelines).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch

from diffalign.atomic import staged_folder
from diffalign.tiny.clip_vocab import build_clip_tokenizer, clip_bpe_path

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline

__all__ = ["FULL_SCALE_FAMILIES", "FullScaleFamily", "COMPONENT_CONFIGS",
           "build_full_scale_component", "build_full_scale_pipeline", "full_scale_parameter_counts",
           "save_full_scale_pipeline"]  # fmt: skip

FullScaleFamily = Literal["sd15", "sdxl", "sd3", "sd35-medium"]
FULL_SCALE_FAMILIES: tuple[FullScaleFamily, ...] = ("sd15", "sdxl", "sd3", "sd35-medium")

# --------------------------------------------------------------------------- published configs
# Every value below is from the cited config.json ("_class_name"/"_diffusers_version"/"architectures"/
# "torch_dtype"/"transformers_version" bookkeeping left out). Diffusers fills any key not listed with the
# class default, which the published files also rely on.

_CLIP_L_TEXT = {  # CLIP ViT-L/14 text tower (openai/clip-vit-large-patch14)
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "projection_dim": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-05,
    "attention_dropout": 0.0,
    "dropout": 0.0,
    "initializer_factor": 1.0,
    "initializer_range": 0.02,
    "bos_token_id": 0,
    "eos_token_id": 2,  # legacy value: transformers then pools at argmax(input_ids), i.e. the EOS (49407)
    "pad_token_id": 1,
}
_BIGG_TEXT = {  # OpenCLIP ViT-bigG/14 text tower, with its projection
    **_CLIP_L_TEXT,
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "projection_dim": 1280,
    "num_hidden_layers": 32,
    "num_attention_heads": 20,
    "hidden_act": "gelu",
}
_VAE_SD = {  # the SD 1.x/2.x/SDXL KL-f8 autoencoder layout
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
}

COMPONENT_CONFIGS: dict[str, dict[str, dict[str, Any]]] = {
    "sd15": {
        # stable-diffusion-v1-5/stable-diffusion-v1-5 (mirror of runwayml/stable-diffusion-v1-5): unet/config.json
        "unet": {
            "act_fn": "silu",
            "attention_head_dim": 8,
            "block_out_channels": [320, 640, 1280, 1280],
            "center_input_sample": False,
            "cross_attention_dim": 768,
            "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
            "downsample_padding": 1,
            "flip_sin_to_cos": True,
            "freq_shift": 0,
            "in_channels": 4,
            "layers_per_block": 2,
            "mid_block_scale_factor": 1,
            "norm_eps": 1e-05,
            "norm_num_groups": 32,
            "out_channels": 4,
            "sample_size": 64,
            "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
        },
        # same repository: vae/config.json (scaling_factor is the class default 0.18215 there)
        "vae": {**_VAE_SD, "sample_size": 512, "scaling_factor": 0.18215},
        # same repository: text_encoder/config.json (= openai/clip-vit-large-patch14's text_config)
        "text_encoder": dict(_CLIP_L_TEXT),
    },
    "sdxl": {
        # stabilityai/stable-diffusion-xl-base-1.0: unet/config.json
        "unet": {
            "act_fn": "silu",
            "addition_embed_type": "text_time",
            "addition_embed_type_num_heads": 64,
            "addition_time_embed_dim": 256,
            "attention_head_dim": [5, 10, 20],
            "block_out_channels": [320, 640, 1280],
            "center_input_sample": False,
            "class_embed_type": None,
            "class_embeddings_concat": False,
            "conv_in_kernel": 3,
            "conv_out_kernel": 3,
            "cross_attention_dim": 2048,
            "cross_attention_norm": None,
            "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
            "downsample_padding": 1,
            "dual_cross_attention": False,
            "encoder_hid_dim": None,
            "encoder_hid_dim_type": None,
            "flip_sin_to_cos": True,
            "freq_shift": 0,
            "in_channels": 4,
            "layers_per_block": 2,
            "mid_block_only_cross_attention": None,
            "mid_block_scale_factor": 1,
            "mid_block_type": "UNetMidBlock2DCrossAttn",
            "norm_eps": 1e-05,
            "norm_num_groups": 32,
            "num_attention_heads": None,
            "num_class_embeds": None,
            "only_cross_attention": False,
            "out_channels": 4,
            "projection_class_embeddings_input_dim": 2816,  # 6 time ids x 256 + bigG's 1280-d pooled embedding
            "resnet_out_scale_factor": 1.0,
            "resnet_skip_time_act": False,
            "resnet_time_scale_shift": "default",
            "sample_size": 128,
            "time_cond_proj_dim": None,
            "time_embedding_act_fn": None,
            "time_embedding_dim": None,
            "time_embedding_type": "positional",
            "timestep_post_act": None,
            "transformer_layers_per_block": [1, 2, 10],
            "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
            "upcast_attention": None,
            "use_linear_projection": True,
        },
        # same repository: vae/config.json
        "vae": {**_VAE_SD, "sample_size": 1024, "scaling_factor": 0.13025, "force_upcast": True},
        # same repository: text_encoder/config.json (CLIP ViT-L/14 text) and text_encoder_2/config.json (bigG)
        "text_encoder": dict(_CLIP_L_TEXT),
        "text_encoder_2": dict(_BIGG_TEXT),
    },
    "sd3": {
        # stabilityai/stable-diffusion-3-medium-diffusers: transformer/config.json
        "transformer": {
            "attention_head_dim": 64,
            "caption_projection_dim": 1536,
            "in_channels": 16,
            "joint_attention_dim": 4096,  # T5-XXL's width; CLIP's 768 + 1280 are zero-padded up to it
            "num_attention_heads": 24,
            "num_layers": 24,
            "out_channels": 16,
            "patch_size": 2,
            "pooled_projection_dim": 2048,  # CLIP-L's 768 + bigG's 1280 pooled embeddings
            "pos_embed_max_size": 192,
            "sample_size": 128,
        },
        # same repository: vae/config.json (16 latent channels, no quant convs, shift and scale)
        "vae": {
            **_VAE_SD,
            "latent_channels": 16,
            "sample_size": 1024,
            "scaling_factor": 1.5305,
            "shift_factor": 0.0609,
            "force_upcast": True,
            "use_quant_conv": False,
            "use_post_quant_conv": False,
        },
        # same repository: text_encoder/config.json and text_encoder_2/config.json (both with projection)
        "text_encoder": dict(_CLIP_L_TEXT),
        "text_encoder_2": dict(_BIGG_TEXT),
    },
}

# SD3.5 Medium: SD3's VAE and CLIP encoders (stabilityai/stable-diffusion-3.5-medium: vae/config.json,
# text_encoder*/config.json are SD3-medium's), a transformer with QK RMS-norm and MMDiT-X dual attention
# in its first 13 blocks, and a larger position-embedding grid (384: up to 1440 px at patch 2).
COMPONENT_CONFIGS["sd35-medium"] = {
    **COMPONENT_CONFIGS["sd3"],
    # stabilityai/stable-diffusion-3.5-medium: transformer/config.json
    "transformer": {
        **COMPONENT_CONFIGS["sd3"]["transformer"],
        "pos_embed_max_size": 384,
        "qk_norm": "rms_norm",
        "dual_attention_layers": list(range(13)),
    },
}


@dataclass(frozen=True)
class _Component:
    module: str  # "diffusers" or "transformers"
    class_name: str


_CLASSES: dict[str, dict[str, _Component]] = {
    "sd15": {
        "unet": _Component("diffusers", "UNet2DConditionModel"),
        "vae": _Component("diffusers", "AutoencoderKL"),
        "text_encoder": _Component("transformers", "CLIPTextModel"),
    },
    "sdxl": {
        "unet": _Component("diffusers", "UNet2DConditionModel"),
        "vae": _Component("diffusers", "AutoencoderKL"),
        "text_encoder": _Component("transformers", "CLIPTextModel"),
        "text_encoder_2": _Component("transformers", "CLIPTextModelWithProjection"),
    },
    "sd3": {
        "transformer": _Component("diffusers", "SD3Transformer2DModel"),
        "vae": _Component("diffusers", "AutoencoderKL"),
        "text_encoder": _Component("transformers", "CLIPTextModelWithProjection"),
        "text_encoder_2": _Component("transformers", "CLIPTextModelWithProjection"),
    },
}
_CLASSES["sd35-medium"] = _CLASSES["sd3"]


def _check_family(family: str) -> None:
    if family not in COMPONENT_CONFIGS:
        raise ValueError(f"no full-scale architecture for {family!r}; full scale exists for {', '.join(FULL_SCALE_FAMILIES)}")


def build_full_scale_component(family: FullScaleFamily, name: str, seed: int = 0, device: str | torch.device = "cpu"):
    """One component at its published size; ``device="meta"`` allocates no weights (for counting and config checks).

    Random weights come from each class's own initialiser under ``torch.manual_seed(seed)`` inside a forked RNG,
    so building never disturbs the caller's RNG.
    """
    _check_family(family)
    if name not in _CLASSES[family]:
        raise ValueError(f"{family} has no component {name!r}; it has {', '.join(_CLASSES[family])}")
    component = _CLASSES[family][name]
    config = COMPONENT_CONFIGS[family][name]
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(seed)
        if component.module == "diffusers":
            import diffusers

            model = getattr(diffusers, component.class_name)(**config)
        else:
            import transformers

            model = getattr(transformers, component.class_name)(transformers.CLIPTextConfig(**config))
    return model.eval()


def full_scale_parameter_counts(family: FullScaleFamily) -> dict[str, int]:
    """Parameters per component, counted on the meta device (no memory, a few seconds)."""
    _check_family(family)
    counts = {}
    for name in _CLASSES[family]:
        model = build_full_scale_component(family, name, device="meta")
        counts[name] = sum(p.numel() for p in model.parameters())
    return counts


# Scheduler settings from the same repositories' scheduler/scheduler_config.json.
_SD_BETAS = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


def _assemble(family: FullScaleFamily, parts: dict, clip_bpe) -> DiffusionPipeline:
    """The family's pipeline class around ``parts`` (models, real or on the meta device), tokenizers and scheduler."""
    from diffusers import (
        EulerDiscreteScheduler,
        FlowMatchEulerDiscreteScheduler,
        PNDMScheduler,
        StableDiffusion3Pipeline,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
    )

    clip = build_clip_tokenizer(bpe_path=clip_bpe)
    # OpenCLIP's tokenizer (bigG) pads with "!" (id 0), OpenAI's with <|endoftext|>: tokenizer_2 of SDXL and SD3 has "!".
    clip_bigg = build_clip_tokenizer(bpe_path=clip_bpe, pad_token="!")
    if family == "sd15":
        scheduler = PNDMScheduler(**_SD_BETAS, set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1)
        return StableDiffusionPipeline(**parts, tokenizer=clip, scheduler=scheduler, safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False)  # fmt: skip
    if family == "sdxl":
        scheduler = EulerDiscreteScheduler(**_SD_BETAS, interpolation_type="linear", timestep_spacing="leading", steps_offset=1)
        return StableDiffusionXLPipeline(**parts, tokenizer=clip, tokenizer_2=clip_bigg, scheduler=scheduler, add_watermarker=False)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    return StableDiffusion3Pipeline(**parts, tokenizer=clip, tokenizer_2=clip_bigg, text_encoder_3=None, tokenizer_3=None,
                                    scheduler=scheduler)  # fmt: skip


def _component_seed(seed: int, index: int) -> int:
    return seed * 1009 + index


def build_full_scale_pipeline(family: FullScaleFamily, seed: int = 0, clip_bpe: str | os.PathLike | None = None) -> DiffusionPipeline:
    """The whole pipeline at published size with random weights, fp32 on CPU (SDXL: about 14 GB of memory)."""
    _check_family(family)
    clip_bpe_path(clip_bpe)  # a missing vocabulary fails in a second, not after minutes of weight initialisation
    parts = {name: build_full_scale_component(family, name, seed=_component_seed(seed, i)) for i, name in enumerate(_CLASSES[family])}
    return _assemble(family, parts, clip_bpe)


def save_full_scale_pipeline(
    family: FullScaleFamily, path: str | os.PathLike, seed: int = 0, clip_bpe: str | os.PathLike | None = None
) -> Path:
    """Save the full-scale pipeline to ``path`` atomically in diffusers format (safetensors, fp32, 2 GB shards).

    The same files as ``build_full_scale_pipeline(...).save_pretrained(path)``, but one model at a time: the
    pipeline is assembled on the meta device for ``model_index.json``, tokenizers and scheduler, then each model
    is built, saved and freed, so peak memory is the largest model (SDXL's UNet, 10.3 GB) rather than all 14 GB.
    """
    _check_family(family)
    clip_bpe_path(clip_bpe)
    target = Path(path)
    skeleton = _assemble(family, {name: build_full_scale_component(family, name, device="meta") for name in _CLASSES[family]},
                         clip_bpe)  # fmt: skip
    with staged_folder(target) as staging:
        skeleton.save_config(staging)  # model_index.json
        for name, component in skeleton.components.items():
            if component is None or name in _CLASSES[family]:
                continue
            component.save_pretrained(staging / name)  # tokenizers and the scheduler
        for index, name in enumerate(_CLASSES[family]):
            model = build_full_scale_component(family, name, seed=_component_seed(seed, index))
            model.save_pretrained(staging / name, max_shard_size="2GB")
            del model
    return target
