"""Policy and reference networks, optimizer and LR schedule.

LoRA: the reference is the same network with its adapters disabled (no second
copy in memory). Full fine-tuning: the reference is a frozen copy made before
training starts. Reference-free methods build neither.
"""

from __future__ import annotations

import contextlib
import copy
from typing import Iterator

import torch
from torch import Tensor, nn

from diffalign.backbones import Backbone, Conditioning
from diffalign.prediction import Predictor

from .config import LoraSection, TrainSection


class AdaptersDisabledReference:
    """LoRA reference (a Predictor): the policy network itself with adapters switched off for one call."""

    def __init__(self, network: nn.Module) -> None:
        self.network = network

    @contextlib.contextmanager
    def _disabled(self) -> Iterator[None]:
        self.network.disable_adapters()
        try:
            yield
        finally:
            self.network.enable_adapters()

    @torch.no_grad()
    def predict(self, backbone: Backbone, noisy: Tensor, timesteps: Tensor, conditioning: Conditioning) -> Tensor:
        with self._disabled():
            return backbone.predict(self.network, noisy, timesteps, conditioning)


class FrozenCopyReference:
    """Full fine-tuning reference (a Predictor): a frozen network (a copy of the base)."""

    def __init__(self, network: nn.Module) -> None:
        self.network = network.requires_grad_(False).eval()

    @torch.no_grad()
    def predict(self, backbone: Backbone, noisy: Tensor, timesteps: Tensor, conditioning: Conditioning) -> Tensor:
        return backbone.predict(self.network, noisy, timesteps, conditioning)


def add_lora(network: nn.Module, default_targets: tuple[str, ...], section: LoraSection) -> None:
    """Attach trainable LoRA adapters (peft) through diffusers' PeftAdapterMixin; the family's targets unless the recipe names its own."""
    from peft import LoraConfig

    targets = section.target_modules or list(default_targets)
    network.requires_grad_(False)
    network.add_adapter(
        LoraConfig(
            r=section.rank,
            lora_alpha=section.alpha or section.rank,
            lora_dropout=section.dropout,
            init_lora_weights="gaussian",
            target_modules=targets,
        )
    )
    for parameter in network.parameters():
        if parameter.requires_grad:
            parameter.data = parameter.data.float()  # adapters train in fp32 under mixed precision


def build_policy_and_reference(
    backbone: Backbone,
    mode: str,
    lora: LoraSection,
    needs_reference: bool,
    weight_dtype: torch.dtype,
    device: torch.device | str = "cpu",
) -> tuple[nn.Module, Predictor | None]:
    """Make the trainable policy and, if the method needs one, its reference (on ``device``)."""
    network = backbone.denoiser
    if mode == "lora":
        network.to(dtype=weight_dtype)
        add_lora(network, backbone.lora_target_modules, lora)
        return network, (AdaptersDisabledReference(network) if needs_reference else None)
    reference = FrozenCopyReference(copy.deepcopy(network).to(device, weight_dtype)) if needs_reference else None
    network.requires_grad_(True)
    network.train()
    return network, reference


def build_optimizer(parameters: list[nn.Parameter], section: TrainSection, learning_rate: float) -> torch.optim.Optimizer:
    """AdamW, Adafactor (the official SDXL DPO choice) or 8-bit AdamW (bitsandbytes)."""
    if section.optimizer == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(
            parameters,
            lr=learning_rate,
            weight_decay=section.weight_decay,
            clip_threshold=1.0,
            scale_parameter=False,
            relative_step=False,
            warmup_init=False,
        )
    adam = {
        "lr": learning_rate,
        "betas": (section.adam_beta1, section.adam_beta2),
        "eps": section.adam_epsilon,
        "weight_decay": section.weight_decay,
    }
    if section.optimizer == "adamw":
        implementation = {"fused": {"fused": True}, "foreach": {"foreach": True}, "for-loop": {"foreach": False}}
        return torch.optim.AdamW(parameters, **adam, **implementation[section.adam_implementation])
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise ImportError("train.optimizer=adamw8bit needs bitsandbytes: pip install 'diffalign[bnb]'") from None
    return bnb.optim.AdamW8bit(parameters, **adam)


def build_lr_scheduler(optimizer: torch.optim.Optimizer, section: TrainSection, num_processes: int):
    """diffusers' schedules; step counts scale with processes because accelerate steps it once per process."""
    from diffusers.optimization import get_scheduler

    return get_scheduler(
        section.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=section.lr_warmup_steps * num_processes,
        num_training_steps=section.max_steps * num_processes,
    )


def enable_memory_savers(network: nn.Module, gradient_checkpointing: bool, attention: str) -> None:
    if gradient_checkpointing:
        network.enable_gradient_checkpointing()
    if attention == "xformers":
        try:
            import xformers  # noqa: F401
        except ImportError:
            raise ImportError("model.attention=xformers needs xformers: pip install 'diffalign[xformers]'") from None
        network.enable_xformers_memory_efficient_attention()
