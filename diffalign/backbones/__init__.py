"""Model families behind one Backbone interface, chosen from the pipeline's model_index.json."""

from __future__ import annotations

from typing import Any

from diffalign.config import ConfigError, ModelConfig
from diffalign.noise import NoiseProcess, noise_process_from_scheduler

from .base import (
    Backbone,
    Conditioning,
    LoadOptions,
    tokenize,
    vae_decode,
    vae_encode,
    vae_latent_shape,
)
from .sd import StableDiffusionBackbone
from .sd3 import StableDiffusion3Backbone
from .sdxl import StableDiffusionXLBackbone, sdxl_time_ids

# Pipeline class (from model_index.json) -> family. Explicit: an unknown class is an error.
PIPELINE_FAMILIES: dict[str, str] = {
    "StableDiffusionPipeline": "sd",
    "StableDiffusionXLPipeline": "sdxl",
    "StableDiffusion3Pipeline": "sd3",
}
BACKBONES: dict[str, Any] = {
    "sd": StableDiffusionBackbone,
    "sdxl": StableDiffusionXLBackbone,
    "sd3": StableDiffusion3Backbone,
}
# Every folder a saved pipeline or full fine-tune may keep its denoiser in ("unet", "transformer").
DENOISER_SUBFOLDERS: tuple[str, ...] = tuple(dict.fromkeys(backbone.denoiser_subfolder for backbone in BACKBONES.values()))


def denoiser_subfolder(family: str) -> str:
    """Where ``family`` saves its denoiser (and the prefix of its LoRA keys): ``unet`` or ``transformer``."""
    if family not in BACKBONES:
        raise ValueError(f"unknown model family {family!r}; diffalign knows {', '.join(sorted(BACKBONES))}")
    return BACKBONES[family].denoiser_subfolder


def read_model_index(path: str, revision: str | None = None) -> dict[str, Any]:
    """model_index.json of a hub id or local folder, with a clear error when it is missing."""
    from diffusers import DiffusionPipeline

    try:
        return DiffusionPipeline.load_config(path, revision=revision)
    except (OSError, EnvironmentError, ValueError) as error:
        raise FileNotFoundError(
            f"cannot read model_index.json of model {path!r}: expected a diffusers pipeline folder or hub id ({error})"
        ) from None


def detect_family(path: str, revision: str | None = None) -> str:
    """Family of a pipeline, from its model_index.json's class name."""
    class_name = read_model_index(path, revision).get("_class_name", "<none>")
    if class_name not in PIPELINE_FAMILIES:
        raise ValueError(
            f"model {path!r} is a {class_name}; diffalign supports {', '.join(sorted(PIPELINE_FAMILIES))}"
        )
    return PIPELINE_FAMILIES[class_name]


def load_scheduler_config(path: str, revision: str | None = None) -> dict[str, Any]:
    """scheduler/scheduler_config.json as a dict (any ConfigMixin class reads it unchanged)."""
    from diffusers import DDPMScheduler

    return dict(DDPMScheduler.load_config(path, subfolder="scheduler", revision=revision))


def load_backbone(config: ModelConfig, load_encoders: bool = True) -> Backbone:
    """Load the family's components from ``config.path`` (hub id or local folder) on CPU, fp32.

    ``load_encoders=False`` loads only the denoiser (training from a cache).
    """
    family = detect_family(config.path, config.revision)
    if config.family != "auto" and config.family != family:
        raise ConfigError(f"model.family is {config.family!r} but {config.path!r} is a {family} pipeline")
    try:
        noise = _noise_process(config)
    except ValueError as error:  # a setting that does not fit this model's schedule: a config error, not a crash
        raise ConfigError(f"model {config.path!r}: {error}") from None
    options = LoadOptions(config.path, config.revision, config.variant)
    if family == "sd3":
        return StableDiffusion3Backbone.load(
            options, noise, load_encoders, use_t5=config.use_t5, max_sequence_length=config.max_sequence_length
        )
    return BACKBONES[family].load(options, noise, load_encoders)


def _noise_process(config: ModelConfig) -> NoiseProcess:
    return noise_process_from_scheduler(
        load_scheduler_config(config.path, config.revision),
        timestep_mode=config.timestep_mode,
        flow_weighting=config.flow_weighting,
        flow_logit_mean=config.flow_logit_mean,
        flow_logit_std=config.flow_logit_std,
        flow_mode_scale=config.flow_mode_scale,
        zero_terminal_snr=config.zero_terminal_snr,
    )


__all__ = [
    "Backbone",
    "Conditioning",
    "DENOISER_SUBFOLDERS",
    "LoadOptions",
    "PIPELINE_FAMILIES",
    "StableDiffusionBackbone",
    "StableDiffusionXLBackbone",
    "StableDiffusion3Backbone",
    "denoiser_subfolder",
    "detect_family",
    "load_backbone",
    "load_scheduler_config",
    "read_model_index",
    "sdxl_time_ids",
    "tokenize",
    "vae_decode",
    "vae_encode",
    "vae_latent_shape",
]
