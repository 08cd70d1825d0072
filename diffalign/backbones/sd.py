"""SD 1.x / 2.x: one CLIP text encoder, last hidden state, UNet; epsilon or v-prediction."""

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


class StableDiffusionBackbone:
    """Adapter for StableDiffusionPipeline-format models (SD 1.5, SD 2.1 incl. 768-v)."""

    family = "sd"
    denoiser_subfolder = "unet"
    lora_layers_argument = "unet_lora_layers"
    pipeline_class_name = "StableDiffusionPipeline"
    lora_target_modules = UNET_LORA_TARGETS

    def __init__(self, unet: nn.Module, noise: NoiseProcess, tokenizer=None, text_encoder=None, vae=None) -> None:
        self.denoiser = unet
        self.noise = noise
        self.tokenizer = tokenizer
        self.text_encoder = freeze(text_encoder) if text_encoder is not None else None
        self.vae = freeze(vae) if vae is not None else None

    @classmethod
    def load(cls, options: LoadOptions, noise: NoiseProcess, load_encoders: bool = True) -> "StableDiffusionBackbone":
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        unet = UNet2DConditionModel.from_pretrained(options.path, **options.kwargs("unet"))
        if not load_encoders:
            return cls(unet, noise)
        tokenizer = CLIPTokenizer.from_pretrained(options.path, subfolder="tokenizer", revision=options.revision)
        text_encoder = CLIPTextModel.from_pretrained(options.path, **options.kwargs("text_encoder"))
        vae = AutoencoderKL.from_pretrained(options.path, **options.kwargs("vae"))
        return cls(unet, noise, tokenizer, text_encoder, vae)

    @property
    def has_encoders(self) -> bool:
        return self.text_encoder is not None

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> Conditioning:
        # StableDiffusionPipeline.encode_prompt with clip_skip=None: the last hidden state.
        ids = tokenize(self.tokenizer, prompts).to(self.text_encoder.device)
        mask = None
        if getattr(self.text_encoder.config, "use_attention_mask", False):
            mask = (ids != self.tokenizer.pad_token_id).long()  # pragma: no cover - no SD checkpoint sets it
        return {"prompt_embeds": self.text_encoder(ids, attention_mask=mask)[0]}

    def geometry_conditioning(self, original_sizes: Tensor, crop_top_lefts: Tensor, resolution: int) -> Conditioning:
        return {}

    @torch.no_grad()
    def encode_images(self, pixel_values: Tensor) -> Tensor:
        vae = require_vae(self.vae, self.family)
        return vae_encode(vae, pixel_values.to(vae.device))

    @torch.no_grad()
    def decode_latents(self, latents: Tensor) -> Tensor:
        return vae_decode(require_vae(self.vae, self.family), latents)

    def latent_shape(self, resolution: int) -> tuple[int, int, int]:
        return vae_latent_shape(require_vae(self.vae, self.family), self.denoiser, resolution)

    def predict(self, denoiser: nn.Module, noisy: Tensor, timesteps: Tensor, conditioning: Conditioning) -> Tensor:
        return denoiser(noisy, timesteps, encoder_hidden_states=conditioning["prompt_embeds"], return_dict=False)[0]

    def drop_encoders(self) -> None:
        self.text_encoder = self.vae = None

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> None:
        move_frozen([self.text_encoder, self.vae], device, dtype)
