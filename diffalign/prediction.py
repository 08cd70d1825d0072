"""The one prediction path: a network call with its dtype cast, and "noise -> predict -> per-sample error".

Training (every method's step), sampling (PSO's few-step sampler and its log-probabilities),
evaluation and the toy base's pretraining all call the denoiser through here, so a fix to the
call (a cast, a dispatch) is made once. A network is either an ``nn.Module`` (the policy, possibly
wrapped by accelerate) or a :class:`Predictor` (a method's reference: a frozen copy, or the policy
with its LoRA adapters switched off), which decides how it runs, normally without gradients.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from diffalign.backbones import Backbone, Conditioning
from diffalign.noise import per_sample_error


@runtime_checkable
class Predictor(Protocol):
    """Something that predicts like the base model (a reference), through the backbone's calling convention."""

    def predict(self, backbone: Backbone, noisy: Tensor, timesteps: Tensor, conditioning: Conditioning) -> Tensor: ...


Network = nn.Module | Predictor


def predict(
    backbone: Backbone,
    network: Network,
    noisy: Tensor,
    timesteps: Tensor,
    conditioning: Conditioning,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """One network call. ``dtype``: cast the noisy latents and floating conditioning to the weights' dtype
    first (a frozen reference held in bf16/fp16 under mixed precision); None leaves them as they are
    (autocast, or fp32 weights). The prediction comes back in the network's output dtype."""
    if dtype is not None:
        noisy = noisy.to(dtype)
        conditioning = {key: value.to(dtype) if value.is_floating_point() else value for key, value in conditioning.items()}
    if isinstance(network, nn.Module):
        return backbone.predict(network, noisy, timesteps, conditioning)
    return network.predict(backbone, noisy, timesteps, conditioning)


def denoising_errors(
    backbone: Backbone,
    network: Network,
    x0: Tensor,
    eps: Tensor,
    timesteps: Tensor,
    conditioning: Conditioning,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """Noise ``x0`` [N, C, h, w] with ``eps`` at ``timesteps`` [N], predict, and return the per-sample
    errors [N] against the process's target: the ELBO proxy every method is built on."""
    noised = backbone.noise.noise(x0, eps, timesteps)
    prediction = predict(backbone, network, noised.noisy, noised.timesteps, conditioning, dtype)
    return per_sample_error(prediction, noised.target)
