"""SD3 / SD3.5: two CLIP encoders (+ optional T5) into joint embeddings, MMDiT transformer, rectified flow."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffalign.noise import NoiseProcess

from .base import (
    Conditioning,
    LoadOptions,
    freeze,
    move_frozen,
    require_vae,
    tokenize,
    vae_decode,
    vae_encode,
    vae_latent_shape,
)


class StableDiffusion3Backbone:
    """Adapter for StableDiffusion3Pipeline-format models; T5 is used when present and enabled."""

    family = "sd3"
    denoiser_subfolder = "transformer"
    lora_layers_argument = "transformer_lora_layers"
    pipeline_class_name = "StableDiffusion3Pipeline"
    # The joint-attention projections of both streams, as diffusers' SD3 LoRA script adapts them.
    lora_target_modules: tuple[str, ...] = (
        "attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out",
        "attn.to_k", "attn.to_out.0", "attn.to_q", "attn.to_v",
    )
    # SD3.5 Medium's MMDiT-X blocks have a second, image-only attention: left out, a third of those blocks'
    # attention weights could not move. Added only where the transformer has it, so every target names a module.
    DUAL_ATTENTION_LORA_TARGETS: tuple[str, ...] = ("attn2.to_k", "attn2.to_out.0", "attn2.to_q", "attn2.to_v")

    def __init__(
        self,
        transformer: nn.Module,
        noise: NoiseProcess,
        tokenizers: list | None = None,
        clip_encoders: list[nn.Module] | None = None,
        t5_tokenizer=None,
        t5_encoder: nn.Module | None = None,
        vae=None,
        max_sequence_length: int = 256,
    ) -> None:
        self.denoiser = transformer
        if getattr(transformer.config, "dual_attention_layers", None):
            self.lora_target_modules = self.lora_target_modules + self.DUAL_ATTENTION_LORA_TARGETS
        self.noise = noise
        self.tokenizers = tokenizers
        self.clip_encoders = [freeze(encoder) for encoder in clip_encoders] if clip_encoders else None
        self.t5_tokenizer = t5_tokenizer
        self.t5_encoder = freeze(t5_encoder) if t5_encoder is not None else None
        self.vae = freeze(vae) if vae is not None else None
        self.max_sequence_length = max_sequence_length
        self.joint_attention_dim = transformer.config.joint_attention_dim

    @classmethod
    def load(
        cls,
        options: LoadOptions,
        noise: NoiseProcess,
        load_encoders: bool = True,
        use_t5: bool = True,
        max_sequence_length: int = 256,
    ) -> "StableDiffusion3Backbone":
        from diffusers import AutoencoderKL, DiffusionPipeline, SD3Transformer2DModel
        from transformers import CLIPTextModelWithProjection, CLIPTokenizer

        transformer = SD3Transformer2DModel.from_pretrained(options.path, **options.kwargs("transformer"))
        if not load_encoders:
            return cls(transformer, noise, max_sequence_length=max_sequence_length)
        tokenizers = [
            CLIPTokenizer.from_pretrained(options.path, subfolder=name, revision=options.revision)
            for name in ("tokenizer", "tokenizer_2")
        ]
        clip_encoders = [
            CLIPTextModelWithProjection.from_pretrained(options.path, **options.kwargs(name))
            for name in ("text_encoder", "text_encoder_2")
        ]
        t5_tokenizer = t5_encoder = None
        index = DiffusionPipeline.load_config(options.path, revision=options.revision)
        if use_t5 and (index.get("text_encoder_3") or [None])[0] is not None:
            from transformers import T5EncoderModel, T5TokenizerFast

            t5_tokenizer = T5TokenizerFast.from_pretrained(options.path, subfolder="tokenizer_3", revision=options.revision)
            t5_encoder = T5EncoderModel.from_pretrained(options.path, **options.kwargs("text_encoder_3"))
        vae = AutoencoderKL.from_pretrained(options.path, **options.kwargs("vae"))
        return cls(transformer, noise, tokenizers, clip_encoders, t5_tokenizer, t5_encoder, vae, max_sequence_length)

    @property
    def has_encoders(self) -> bool:
        return self.clip_encoders is not None

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> Conditioning:
        # StableDiffusion3Pipeline.encode_prompt, clip_skip=None: penultimate CLIP states of both
        # encoders concatenated, zero-padded to the T5 width, then T5 tokens (zeros without T5)
        # appended on the sequence dim; pooled = both CLIP projections concatenated.
        clip_states, pooled = [], []
        for tokenizer, encoder in zip(self.tokenizers, self.clip_encoders):
            ids = tokenize(tokenizer, prompts, self.tokenizers[0].model_max_length).to(encoder.device)
            output = encoder(ids, output_hidden_states=True)
            pooled.append(output[0])
            clip_states.append(output.hidden_states[-2])
        clip_embeds = torch.cat(clip_states, dim=-1)
        t5_embeds = self._t5_embeds(prompts, clip_embeds)
        clip_embeds = F.pad(clip_embeds, (0, t5_embeds.shape[-1] - clip_embeds.shape[-1]))
        return {
            "prompt_embeds": torch.cat([clip_embeds, t5_embeds], dim=-2),
            "pooled_prompt_embeds": torch.cat(pooled, dim=-1),
        }

    def _t5_embeds(self, prompts: list[str], clip_embeds: Tensor) -> Tensor:
        if self.t5_encoder is None:
            shape = (len(prompts), self.max_sequence_length, self.joint_attention_dim)
            return torch.zeros(shape, device=clip_embeds.device, dtype=clip_embeds.dtype)
        ids = self.t5_tokenizer(
            prompts,
            padding="max_length",
            max_length=self.max_sequence_length,
            truncation=True,
            add_special_tokens=True,
            return_tensors="pt",
        ).input_ids
        return self.t5_encoder(ids.to(self.t5_encoder.device))[0].to(clip_embeds.dtype)

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
        return denoiser(
            hidden_states=noisy,
            timestep=timesteps,
            encoder_hidden_states=conditioning["prompt_embeds"],
            pooled_projections=conditioning["pooled_prompt_embeds"],
            return_dict=False,
        )[0]

    def drop_encoders(self) -> None:
        self.clip_encoders = self.t5_encoder = self.vae = None

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> None:
        move_frozen([*(self.clip_encoders or []), self.t5_encoder, self.vae], device, dtype)
