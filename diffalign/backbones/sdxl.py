"""SDXL: two CLIP encoders (penultimate states concatenated), pooled text embeds and time ids."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from diffalign.noise import NoiseProcess

from .base import (
    Conditioning,
    UNET_LORA_TARGETS,
    LoadOptions,
    freeze,
    move_frozen,
    require_vae,
    tokenize,
    vae_decode,
    vae_encode,
    vae_latent_shape,
)


def sdxl_time_ids(original_sizes: Tensor, crop_top_lefts: Tensor, resolution: int) -> Tensor:
    """``original_size + crop_top_left + target_size`` per image, as SDXL's training scripts build them.

    original_sizes, crop_top_lefts: [N, 2] as (h, w) and (top, left) -> [N, 6].
    """
    target = original_sizes.new_tensor([resolution, resolution]).expand(len(original_sizes), 2)
    return torch.cat([original_sizes, crop_top_lefts, target], dim=1)


class StableDiffusionXLBackbone:
    """Adapter for StableDiffusionXLPipeline-format models (SDXL base, SDXL-Turbo, DMD2)."""

    family = "sdxl"
    denoiser_subfolder = "unet"
    lora_layers_argument = "unet_lora_layers"
    pipeline_class_name = "StableDiffusionXLPipeline"
    lora_target_modules = UNET_LORA_TARGETS

    def __init__(
        self,
        unet: nn.Module,
        noise: NoiseProcess,
        tokenizers: list | None = None,
        text_encoders: list[nn.Module] | None = None,
        vae=None,
    ) -> None:
        self.denoiser = unet
        self.noise = noise
        self.tokenizers = tokenizers
        self.text_encoders = [freeze(encoder) for encoder in text_encoders] if text_encoders else None
        self.vae = freeze(vae) if vae is not None else None

    @classmethod
    def load(cls, options: LoadOptions, noise: NoiseProcess, load_encoders: bool = True) -> "StableDiffusionXLBackbone":
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

        unet = UNet2DConditionModel.from_pretrained(options.path, **options.kwargs("unet"))
        if not load_encoders:
            return cls(unet, noise)
        tokenizers = [
            CLIPTokenizer.from_pretrained(options.path, subfolder=name, revision=options.revision)
            for name in ("tokenizer", "tokenizer_2")
        ]
        text_encoders = [
            CLIPTextModel.from_pretrained(options.path, **options.kwargs("text_encoder")),
            CLIPTextModelWithProjection.from_pretrained(options.path, **options.kwargs("text_encoder_2")),
        ]
        vae = AutoencoderKL.from_pretrained(options.path, **options.kwargs("vae"))
        return cls(unet, noise, tokenizers, text_encoders, vae)

    @property
    def has_encoders(self) -> bool:
        return self.text_encoders is not None

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> Conditioning:
        # StableDiffusionXLPipeline.encode_prompt, clip_skip=None: penultimate hidden states of
        # both encoders concatenated on the feature dim; pooled output of the final encoder.
        hidden_states, pooled = [], None
        for tokenizer, encoder in zip(self.tokenizers, self.text_encoders):
            ids = tokenize(tokenizer, prompts).to(encoder.device)
            output = encoder(ids, output_hidden_states=True)
            if output[0].ndim == 2:
                pooled = output[0]
            hidden_states.append(output.hidden_states[-2])
        if pooled is None:
            raise ValueError("SDXL's second text encoder must be a CLIPTextModelWithProjection (pooled output)")
        return {"prompt_embeds": torch.cat(hidden_states, dim=-1), "pooled_prompt_embeds": pooled}

    def geometry_conditioning(self, original_sizes: Tensor, crop_top_lefts: Tensor, resolution: int) -> Conditioning:
        return {"time_ids": sdxl_time_ids(original_sizes, crop_top_lefts, resolution)}

    @torch.no_grad()
    def encode_images(self, pixel_values: Tensor) -> Tensor:
        vae = require_vae(self.vae, self.family)
        return vae_encode(vae, pixel_values.to(vae.device))

    @torch.no_grad()
    def decode_latents(self, latents: Tensor) -> Tensor:
        vae = require_vae(self.vae, self.family)
        if vae.dtype == torch.float16 and getattr(vae.config, "force_upcast", False):
            # SDXL's VAE overflows in fp16; the pipeline decodes it in fp32 (force_upcast) and so do we.
            vae.to(dtype=torch.float32)
            try:
                return vae_decode(vae, latents)
            finally:
                vae.to(dtype=torch.float16)
        return vae_decode(vae, latents)

    def latent_shape(self, resolution: int) -> tuple[int, int, int]:
        return vae_latent_shape(require_vae(self.vae, self.family), self.denoiser, resolution)

    def predict(self, denoiser: nn.Module, noisy: Tensor, timesteps: Tensor, conditioning: Conditioning) -> Tensor:
        added = {
            "text_embeds": conditioning["pooled_prompt_embeds"],
            "time_ids": conditioning["time_ids"].to(noisy.dtype),
        }
        return denoiser(
            noisy,
            timesteps,
            encoder_hidden_states=conditioning["prompt_embeds"],
            added_cond_kwargs=added,
            return_dict=False,
        )[0]

    def drop_encoders(self) -> None:
        self.text_encoders = self.vae = None

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> None:
        move_frozen([*(self.text_encoders or []), self.vae], device, dtype)
