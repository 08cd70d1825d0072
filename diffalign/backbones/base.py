"""The Backbone seam: one calling convention over SD 1.x/2.x, SDXL and SD3.

A Backbone adapts a model family to what the training loop needs: prompts ->
conditioning tensors, images -> latents, and one prediction call. SDXL's
pooled embeddings and time ids and SD3's joint embeddings stay inside the
adapters; the loop never asks which family it runs, so adding a family means adding
one adapter, not a branch in every caller.
Conditioning is a flat ``dict[str, Tensor]`` with the batch first, so it can
be cached to safetensors, indexed and concatenated without knowing its keys.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from diffalign.noise import NoiseProcess

Conditioning = dict[str, Tensor]


@dataclass(frozen=True)
class LoadOptions:
    """Where and how to load a pipeline's components (hub id or local folder)."""

    path: str
    revision: str | None = None
    variant: str | None = None

    def kwargs(self, subfolder: str) -> dict[str, Any]:
        return {"subfolder": subfolder, "revision": self.revision, "variant": self.variant}


# The UNets' attention projections, which diffusers' own LoRA training scripts adapt (SD 1.x/2.x, SDXL).
UNET_LORA_TARGETS: tuple[str, ...] = ("to_k", "to_q", "to_v", "to_out.0")

class Backbone(Protocol):
    """What every model family provides to the loop."""

    family: str
    denoiser: nn.Module
    noise: NoiseProcess
    denoiser_subfolder: str  # "unet" or "transformer": where save_pretrained writes it
    lora_layers_argument: str  # the keyword of the pipeline's save_lora_weights for the denoiser
    pipeline_class_name: str  # the stock diffusers pipeline that loads our outputs
    lora_target_modules: tuple[str, ...]  # default LoRA targets (module-name suffixes) in the denoiser
    has_encoders: bool

    def encode_prompts(self, prompts: list[str]) -> Conditioning:
        """Text conditioning exactly as the family's pipeline computes it; batch first."""
        ...

    def geometry_conditioning(self, original_sizes: Tensor, crop_top_lefts: Tensor, resolution: int) -> Conditioning:
        """Per-image conditioning from image geometry (SDXL's time ids); {} for other families."""
        ...

    def encode_images(self, pixel_values: Tensor) -> Tensor:
        """[N, 3, H, W] in [-1, 1] -> scaled latents [N, C, H/f, W/f] (the posterior mean)."""
        ...

    def decode_latents(self, latents: Tensor) -> Tensor:
        """Scaled latents [N, C, h, w] -> pixels [N, 3, H, W] in [-1, 1] (the inverse of ``encode_images``)."""
        ...

    def latent_shape(self, resolution: int) -> tuple[int, int, int]:
        """(C, h, w) of the latents of a square ``resolution`` image: what a sampler starts from."""
        ...

    def predict(self, denoiser: nn.Module, noisy: Tensor, timesteps: Tensor, conditioning: Conditioning) -> Tensor:
        """One network call; ``denoiser`` may be the policy (possibly DDP-wrapped) or the reference."""
        ...

    def drop_encoders(self) -> None:
        """Free the VAE and text encoders (training from a cache never needs them)."""
        ...

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> None:
        """Move the frozen parts (VAE, text encoders) to ``device`` and ``dtype``."""
        ...


def tokenize(tokenizer: Any, prompts: list[str], max_length: int | None = None) -> Tensor:
    """Pad to max length and truncate, as every SD pipeline tokenises CLIP prompts."""
    return tokenizer(
        prompts,
        padding="max_length",
        max_length=max_length or tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids


def vae_encode(vae: nn.Module, pixel_values: Tensor) -> Tensor:
    """Posterior mean, shifted and scaled as the pipeline's decoder expects.

    The mean rather than a posterior sample makes latents deterministic (so the
    cache and a cache-less run see the same tensors); the SD VAEs' posterior
    std is ~1e-3 of the latent scale, so the difference is negligible.
    """
    config = vae.config
    latents = vae.encode(pixel_values.to(vae.dtype)).latent_dist.mode()
    shift = getattr(config, "shift_factor", None) or 0.0
    return (latents - shift) * config.scaling_factor


def vae_decode(vae: nn.Module, latents: Tensor) -> Tensor:
    """Inverse of :func:`vae_encode`: ``z = latents / scaling_factor + shift``, decoded and clamped to [-1, 1].

    This is the pipelines' own decode path (StableDiffusion(XL)Pipeline: ``latents /
    scaling_factor``; StableDiffusion3Pipeline adds ``shift_factor``). The clamp
    is the pipelines' post-processing ``(x / 2 + 0.5).clamp(0, 1)`` kept in [-1, 1].
    Returns float32 on the VAE's device.
    """
    config = vae.config
    shift = getattr(config, "shift_factor", None) or 0.0
    z = latents.to(device=vae.device, dtype=vae.dtype) / config.scaling_factor + shift
    return vae.decode(z, return_dict=False)[0].float().clamp(-1.0, 1.0)


def vae_latent_shape(vae: nn.Module, denoiser: nn.Module, resolution: int) -> tuple[int, int, int]:
    """(C, h, w) for a square image: channels from the denoiser, spatial factor 2^(levels-1) from the VAE."""
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    if resolution % factor:
        raise ValueError(f"resolution {resolution} is not a multiple of the VAE's downsampling factor {factor}")
    return (int(denoiser.config.in_channels), resolution // factor, resolution // factor)


def require_vae(vae: nn.Module | None, family: str) -> nn.Module:
    """The VAE, or a clear error when ``drop_encoders`` (or ``load_encoders=False``) removed it."""
    if vae is None:
        raise RuntimeError(
            f"the {family} backbone has no VAE: it was loaded with load_encoders=False or drop_encoders() "
            "was called; load it with encoders to decode latents or to sample"
        )
    return vae


def freeze(module: nn.Module) -> nn.Module:
    """Frozen, eval-mode module: encoders and the reference never train."""
    module.requires_grad_(False)
    module.eval()
    return module


def move_frozen(modules: list[nn.Module | None], device: torch.device | str, dtype: torch.dtype | None) -> None:
    for module in modules:
        if module is None:
            continue
        if dtype is None or dtype == next(module.parameters()).dtype:
            module.to(device=device)  # no dtype cast: diffusers warns about casts it did not ask for
        else:
            module.to(device=device, dtype=dtype)
