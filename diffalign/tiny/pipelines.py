"""Tiny, randomly initialised text-to-image pipelines shaped like the real families.

Tests and the CPU quickstart need a model that loads through exactly the same
``from_pretrained`` code a user's SD 1.5 / SD 2.1 / SDXL / SD3 checkpoint takes,
but without a model hub and in seconds on a laptop CPU. So this module builds
each family's components at toy size (hidden sizes of 32-64, two layers, 32x32
pixel images, 16x16 latents), keeps every structural feature the library code
branches on (SDXL's pooled embeddings and time ids, SD2's v-prediction, SD3's
joint attention, VAE shift/scaling factors, SD3 with and without T5), and saves
them in diffusers format.

Everything is built on CPU in fp32 and is a pure function of the seed: each
component is constructed under its own seed inside ``torch.random.fork_rng`` so
building a model never disturbs the caller's global RNG state.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch

from diffalign.atomic import staged_folder
from diffalign.tiny.t5 import T5_HIDDEN_SIZE, build_t5_encoder, build_t5_tokenizer
from diffalign.tiny.tokenizer import BOS_TOKEN_ID, EOS_TOKEN_ID, TOY_VOCAB_SIZE, build_tokenizer

if TYPE_CHECKING:  # heavy imports stay lazy: `import diffalign.tiny` must be cheap
    from diffusers import AutoencoderKL, DiffusionPipeline, SD3Transformer2DModel, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

__all__ = [
    "Family",
    "FAMILIES",
    "SD3_FAMILIES",
    "SDXL_TIME_EMBED_DIM",
    "TEXT_HIDDEN_SIZE",
    "build_text_encoder",
    "build_vae",
    "build_unet",
    "build_transformer_sd3",
    "build_pipeline",
    "save_pipeline",
    "save_clip",
]

Family = Literal["sd15", "sd2", "sdxl", "sd3", "sd35-medium", "sd35-large"]
FAMILIES: tuple[Family, ...] = ("sd15", "sd2", "sdxl", "sd3", "sd35-medium", "sd35-large")
# What SD3.5 changed in the MMDiT, over SD3 (diffusers' SD3Transformer2DModel options): QK RMS-norm in every
# attention (Large and Medium) and, in Medium, a second, image-only attention in the first 13 of 24 blocks
# (MMDiT-X). The tiny transformers keep those features at 2 layers: dual attention in the first.
# Sources: stabilityai/stable-diffusion-3.5-{large,medium} transformer/config.json; huggingface.co/blog/sd3-5.
SD3_FAMILIES: dict[str, dict] = {
    "sd3": {},
    "sd35-medium": {"qk_norm": "rms_norm", "dual_attention_layers": (0,)},
    "sd35-large": {"qk_norm": "rms_norm"},
}

# Text encoder sizes. SDXL's UNet and SD3's transformer derive their
# conditioning widths from these, so they live in one place.
TEXT_HIDDEN_SIZE = 32
SDXL_TIME_EMBED_DIM = 8  # SDXL: addition_time_embed_dim (256 in the real model)


# --------------------------------------------------------------------------- components


@contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Seed the CPU RNG for one component's construction without leaking state to the caller."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _component_seed(seed: int, index: int) -> int:
    """Distinct, non-overlapping seeds per component, so seed s's second encoder never equals seed s+1's first."""
    return seed * 1009 + index


def build_text_encoder(
    with_projection: bool,
    hidden_size: int = TEXT_HIDDEN_SIZE,
    seed: int = 0,
    vocab_size: int = TOY_VOCAB_SIZE,
    max_position_embeddings: int = 77,
) -> CLIPTextModel | CLIPTextModelWithProjection:
    """Tiny CLIP text encoder; ``with_projection`` gives SDXL's second / SD3's encoders (pooled ``text_embeds``).

    bos/eos/pad ids match ``build_tokenizer``. This matters: transformers'
    CLIPTextTransformer pools at ``argmax(input_ids)`` only when
    ``eos_token_id == 2`` (legacy configs) and otherwise at the first position
    whose id equals ``config.eos_token_id``; the default config id (49407) would
    never match our small vocabulary, and the pooled token would silently be
    position 0 (BOS) for every prompt.
    """
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        projection_dim=hidden_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=max_position_embeddings,
        hidden_act="quick_gelu",
        bos_token_id=BOS_TOKEN_ID,
        eos_token_id=EOS_TOKEN_ID,
        pad_token_id=EOS_TOKEN_ID,  # the tokenizer pads with EOS, as CLIP's does
    )
    model_class = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    with _seeded(seed):
        model = model_class(config)
    return model.eval()


def build_vae(
    latent_channels: int = 4,
    block_out_channels: Sequence[int] = (32, 32),
    sample_size: int = 32,
    seed: int = 0,
    shift_factor: float | None = None,
    scaling_factor: float = 1.0,
    use_quant_conv: bool = True,
) -> AutoencoderKL:
    """Tiny AutoencoderKL: one downsampling per extra block, so two blocks map 32x32 images to 16x16 latents.

    ``shift_factor``/``scaling_factor`` are exposed because SD3's VAE uses both
    (latents = (z - shift) * scale) and code that forgets the shift must fail
    on the tiny model too. SD3's VAE also drops the quant convs
    (``use_quant_conv=False``).
    """
    from diffusers import AutoencoderKL

    channels = tuple(block_out_channels)
    groups = 8 if all(c % 8 == 0 for c in channels) else 1
    with _seeded(seed):
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * len(channels),
            up_block_types=("UpDecoderBlock2D",) * len(channels),
            block_out_channels=channels,
            layers_per_block=1,
            latent_channels=latent_channels,
            norm_num_groups=groups,
            sample_size=sample_size,
            scaling_factor=scaling_factor,
            shift_factor=shift_factor,
            use_quant_conv=use_quant_conv,
            use_post_quant_conv=use_quant_conv,
        )
    return vae.eval()


def build_unet(
    family: Literal["sd15", "sd2", "sdxl"],
    sample_size: int = 16,
    seed: int = 0,
    in_channels: int = 4,
    block_out_channels: Sequence[int] = (32, 64),
    cross_attention_dim: int = TEXT_HIDDEN_SIZE,
    pooled_projection_dim: int = TEXT_HIDDEN_SIZE,
) -> UNet2DConditionModel:
    """Tiny UNet2DConditionModel with the structural switches of each family.

    sd15: conv-projection transformers, a single int ``attention_head_dim``
    (which diffusers reads as the number of heads). sd2: linear projections and
    a per-block ``attention_head_dim`` list as SD 2.x configs have. sdxl:
    ``addition_embed_type="text_time"`` (pooled text + 6 time ids), linear
    projections and ``cross_attention_dim`` = both encoders' widths
    concatenated; pass that width (2 * 32 by default for sdxl) as
    ``cross_attention_dim`` and the second encoder's projection dim as
    ``pooled_projection_dim``.
    """
    from diffusers import UNet2DConditionModel

    channels = tuple(block_out_channels)
    if len(channels) != 2:
        raise ValueError(f"tiny UNets have exactly two blocks, got block_out_channels={channels}")
    kwargs: dict = dict(
        sample_size=sample_size,
        in_channels=in_channels,
        out_channels=in_channels,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=channels,
        layers_per_block=1,
        norm_num_groups=8,
        cross_attention_dim=cross_attention_dim,
    )
    if family == "sd15":
        kwargs.update(attention_head_dim=8)
    elif family == "sd2":
        kwargs.update(attention_head_dim=(2, 4), use_linear_projection=True)
    elif family == "sdxl":
        kwargs.update(
            attention_head_dim=(2, 4),
            use_linear_projection=True,
            transformer_layers_per_block=(1, 1),
            addition_embed_type="text_time",
            addition_time_embed_dim=SDXL_TIME_EMBED_DIM,
            projection_class_embeddings_input_dim=6 * SDXL_TIME_EMBED_DIM + pooled_projection_dim,
        )
    else:
        raise ValueError(f"build_unet builds sd15, sd2 or sdxl UNets, not {family!r}")
    with _seeded(seed):
        unet = UNet2DConditionModel(**kwargs)
    return unet.eval()


def build_transformer_sd3(
    sample_size: int = 16,
    seed: int = 0,
    in_channels: int = 4,
    joint_attention_dim: int = 2 * TEXT_HIDDEN_SIZE,
    pooled_projection_dim: int = 2 * TEXT_HIDDEN_SIZE,
    qk_norm: str | None = None,
    dual_attention_layers: tuple[int, ...] = (),
) -> SD3Transformer2DModel:
    """Tiny SD3 MMDiT: SD3.0's layout by default; ``qk_norm`` and ``dual_attention_layers`` as SD3.5 has them.

    ``joint_attention_dim`` must be at least the two CLIP encoders' hidden sizes
    concatenated: without T5 the SD3 pipeline zero-pads the CLIP embeddings up
    to it. ``pooled_projection_dim`` is the two encoders' projection dims
    concatenated.
    """
    from diffusers import SD3Transformer2DModel

    with _seeded(seed):
        transformer = SD3Transformer2DModel(
            sample_size=sample_size,
            patch_size=2,
            in_channels=in_channels,
            num_layers=2,
            attention_head_dim=8,
            num_attention_heads=4,
            joint_attention_dim=joint_attention_dim,
            caption_projection_dim=32,
            pooled_projection_dim=pooled_projection_dim,
            out_channels=in_channels,
            qk_norm=qk_norm,
            dual_attention_layers=dual_attention_layers,
        )
    return transformer.eval()


# --------------------------------------------------------------------------- pipelines

# Scheduler settings copied from the real checkpoints' scheduler_config.json.
_SD_BETAS = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


def build_pipeline(family: Family, seed: int = 0, sample_size: int = 32, t5: bool = False) -> DiffusionPipeline:
    """A complete tiny pipeline for ``family``; ``sample_size`` is the image size in pixels (latents are half).

    sd15: StableDiffusionPipeline + PNDM (SD 1.5's scheduler config), VAE scaling 0.18215.
    sd2: StableDiffusionPipeline + DDIM with v-prediction (SD 2.1-768), SD2-shaped UNet.
    sdxl: StableDiffusionXLPipeline, CLIPTextModel + CLIPTextModelWithProjection, Euler, VAE scaling 0.13025.
    sd35-medium, sd35-large: sd3 with SD3.5's transformer features (:data:`SD3_FAMILIES`).
    sd3: StableDiffusion3Pipeline, two CLIPTextModelWithProjection, FlowMatch Euler (shift 3.0), VAE
    with SD3's shift_factor 0.0609 / scaling_factor 1.5305 and no quant convs. Without T5 by default
    (``text_encoder_3 = None``, joint width 64 = the CLIP pair); ``t5=True`` adds a tiny T5 encoder
    and tokenizer (``diffalign.tiny.t5``) and widens the joint attention to T5's 128, as in real SD3
    (CLIP 2048 zero-padded to T5's 4096). The default stays T5-less: it is the cheaper model, the
    SD3 path most tests exercise, and what a user who drops T5 runs.
    No safety checker, feature extractor or watermarker anywhere.
    """
    from diffusers import (
        DDIMScheduler,
        EulerDiscreteScheduler,
        FlowMatchEulerDiscreteScheduler,
        PNDMScheduler,
        StableDiffusion3Pipeline,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
    )

    if t5 and family not in SD3_FAMILIES:
        raise ValueError(f"T5 (SD3's third text encoder) is for the sd3 and sd35 families only, not {family!r}")
    if sample_size % 4 != 0:
        raise ValueError(f"sample_size must be a multiple of 4 (VAE factor 2 x SD3 patch 2), got {sample_size}")
    latent_size = sample_size // 2
    s = lambda index: _component_seed(seed, index)  # noqa: E731

    if family in ("sd15", "sd2"):
        if family == "sd15":
            scheduler = PNDMScheduler(
                **_SD_BETAS, set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1, prediction_type="epsilon"
            )
        else:
            scheduler = DDIMScheduler(
                **_SD_BETAS,
                clip_sample=False,
                set_alpha_to_one=False,
                steps_offset=1,
                prediction_type="v_prediction",
            )
        return StableDiffusionPipeline(
            vae=build_vae(sample_size=sample_size, seed=s(0), scaling_factor=0.18215),
            text_encoder=build_text_encoder(with_projection=False, seed=s(1)),
            tokenizer=build_tokenizer(),
            unet=build_unet(family, sample_size=latent_size, seed=s(3)),
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )

    if family == "sdxl":
        scheduler = EulerDiscreteScheduler(
            **_SD_BETAS,
            prediction_type="epsilon",
            interpolation_type="linear",
            use_karras_sigmas=False,
            timestep_spacing="leading",
            steps_offset=1,
        )
        text_encoder_2 = build_text_encoder(with_projection=True, seed=s(2))
        return StableDiffusionXLPipeline(
            vae=build_vae(sample_size=sample_size, seed=s(0), scaling_factor=0.13025),
            text_encoder=build_text_encoder(with_projection=False, seed=s(1)),
            text_encoder_2=text_encoder_2,
            tokenizer=build_tokenizer(),
            tokenizer_2=build_tokenizer(),
            unet=build_unet(
                "sdxl",
                sample_size=latent_size,
                seed=s(3),
                cross_attention_dim=2 * TEXT_HIDDEN_SIZE,
                pooled_projection_dim=text_encoder_2.config.projection_dim,
            ),
            scheduler=scheduler,
            add_watermarker=False,
        )

    if family in SD3_FAMILIES:
        return StableDiffusion3Pipeline(
            transformer=build_transformer_sd3(
                sample_size=latent_size,
                seed=s(3),
                joint_attention_dim=T5_HIDDEN_SIZE if t5 else 2 * TEXT_HIDDEN_SIZE,
                pooled_projection_dim=2 * TEXT_HIDDEN_SIZE,
                **SD3_FAMILIES[family],
            ),
            scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
            vae=build_vae(
                sample_size=sample_size,
                seed=s(0),
                shift_factor=0.0609,
                scaling_factor=1.5305,
                use_quant_conv=False,
            ),
            text_encoder=build_text_encoder(with_projection=True, seed=s(1)),
            tokenizer=build_tokenizer(),
            text_encoder_2=build_text_encoder(with_projection=True, seed=s(2)),
            tokenizer_2=build_tokenizer(),
            text_encoder_3=build_t5_encoder(seed=s(4)) if t5 else None,
            tokenizer_3=build_t5_tokenizer() if t5 else None,
        )

    raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")


def save_pipeline(
    family: Family, path: str | os.PathLike, seed: int = 0, sample_size: int = 32, t5: bool = False
) -> Path:
    """Build a tiny pipeline (``t5``: SD3 with T5, see :func:`build_pipeline`) and ``save_pretrained`` it to
    ``path`` atomically; returns ``path``.

    The pipeline is written to a hidden sibling folder and renamed into place,
    so a crash or a concurrent reader never sees a half-written model at
    ``path``. An existing folder at ``path`` is replaced.
    """
    target = Path(path)
    pipeline = build_pipeline(family, seed=seed, sample_size=sample_size, t5=t5)
    with staged_folder(target) as staging:
        pipeline.save_pretrained(staging)
    return target


def save_clip(
    path: str | os.PathLike,
    vision: dict,
    text: dict,
    projection_dim: int,
    seed: int = 0,
    logit_scale: float | None = None,
) -> Path:
    """A random-weight ``CLIPModel`` (scorer backbone) with the local tokenizer and a CLIP processor config.

    ``vision``/``text``: CLIPVisionConfig/CLIPTextConfig fields (the text vocabulary defaults to the
    local tokenizer's); the processor resizes the shortest edge to the vision tower's image size and
    centre-crops it, as CLIP's does. Loadable with ``from_pretrained`` like a hub checkpoint.
    """
    import json

    from transformers import CLIPConfig, CLIPModel

    config = CLIPConfig(
        text_config={
            "vocab_size": TOY_VOCAB_SIZE,
            **text,
            "max_position_embeddings": 77,
            "bos_token_id": BOS_TOKEN_ID,
            "eos_token_id": EOS_TOKEN_ID,
            "pad_token_id": EOS_TOKEN_ID,
        },
        vision_config=vision,
        projection_dim=projection_dim,
    )
    with _seeded(seed):
        model = CLIPModel(config).eval()
        if logit_scale is not None:
            model.logit_scale.data.fill_(logit_scale)
    side = int(vision["image_size"])
    if Path(path).is_dir() and any(Path(path).iterdir()):
        raise FileExistsError(f"{path} exists and is not empty; save_clip never replaces a folder")
    with staged_folder(Path(path)) as staging:
        model.save_pretrained(staging)
        build_tokenizer().save_pretrained(staging)
        processor = {"size": {"shortest_edge": side}, "crop_size": {"height": side, "width": side}}
        (staging / "preprocessor_config.json").write_text(json.dumps(processor))
    return Path(path)
