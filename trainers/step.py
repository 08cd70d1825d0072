"""One training step's forward: encoded groups -> per-sample errors -> Objective.

Groups of K images share one noise draw and one timestep, as in Diffusion-DPO (Wallace et al.,
2023, "Diffusion Model Alignment Using Direct Preference Optimization"), so a group's
errors differ only by its images. The K
images of all G groups go through the network as one batch laid out K-major,
``[w_1..w_G, l_1..l_G]`` for pairs, and the errors come back as ``[G, K]``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor, nn

from diffalign.backbones import Backbone, Conditioning
from diffalign.prediction import Network, Predictor, denoising_errors

from .objectives import Objective, ObjectiveOutput


@dataclass
class EncodedGroups:
    """Latents [G, K, C, h, w]; text conditioning per group [G, ...] (or per image [G, K, ...] when
    ``text_per_image``, for per-image captions); geometry conditioning per image [G, K, ...]."""

    latents: Tensor
    text: Conditioning
    geometry: Conditioning
    text_per_image: bool = False
    scores: Tensor | None = None  # label scores [G, K], best first (ranked data, Pick-a-Pic labels), if the data has them

    @property
    def num_groups(self) -> int:
        return self.latents.shape[0]

    @property
    def group_size(self) -> int:
        return self.latents.shape[1]

    def flat_conditioning(self) -> Conditioning:
        """Conditioning for the K-major flat batch [K*G, ...]."""
        k = self.group_size
        flat: Conditioning = {}
        for key, value in self.text.items():
            flat[key] = _k_major(value) if self.text_per_image else value.repeat(k, *([1] * (value.ndim - 1)))
        for key, value in self.geometry.items():
            flat[key] = _k_major(value)
        return flat


def _k_major(value: Tensor) -> Tensor:
    """[G, K, ...] -> [K*G, ...] with all first images, then all second images, ..."""
    return value.transpose(0, 1).reshape(-1, *value.shape[2:])


def _as_float32(value: Tensor) -> Tensor:
    return value.float() if value.is_floating_point() else value


def encode_groups(backbone: Backbone, batch: dict, resolution: int, drop_prompt: Tensor | None = None) -> EncodedGroups:
    """Encode a raw batch (pixels + prompts), or pass a cached one (latents + embeddings) through.

    ``drop_prompt`` [G] bool: groups whose prompt becomes '' (empty-prompt dropout).
    """
    if "latents" in batch:
        # A cache may be stored in float16/bfloat16 (`diffalign cache --dtype`) to halve its size; the step
        # computes in float32 like an encoded batch (autocast or the reference's weight dtype casts from there).
        text = {key: _as_float32(value).clone() for key, value in batch["text"].items()}
        if drop_prompt is not None and drop_prompt.any():
            for key, value in text.items():
                value[drop_prompt] = batch["empty_text"][key].to(value.dtype)
        geometry = {key: _as_float32(value) for key, value in batch["geometry"].items()}
        return EncodedGroups(_as_float32(batch["latents"]), text, geometry, text_per_image=True, scores=batch.get("scores"))

    pixels: Tensor = batch["pixel_values"]  # [G, K, 3, H, W]
    g, k = pixels.shape[:2]
    latents = backbone.encode_images(pixels.flatten(0, 1))
    latents = latents.reshape(g, k, *latents.shape[1:])
    prompts = list(batch["prompts"])
    if drop_prompt is not None:
        prompts = ["" if drop else prompt for prompt, drop in zip(prompts, drop_prompt.tolist())]
    captions = batch.get("captions")
    if captions is not None:
        flat = [caption for group in captions for caption in group]  # [G*K] group-major
        if drop_prompt is not None:
            flat = ["" if drop_prompt[i // k] else caption for i, caption in enumerate(flat)]
        text = {key: value.reshape(g, k, *value.shape[1:]) for key, value in backbone.encode_prompts(flat).items()}
        per_image = True
    else:
        text, per_image = backbone.encode_prompts(prompts), False
    geometry = backbone.geometry_conditioning(
        batch["original_sizes"].flatten(0, 1), batch["crop_top_lefts"].flatten(0, 1), resolution
    )
    geometry = {key: value.reshape(g, k, *value.shape[1:]) for key, value in geometry.items()}
    return EncodedGroups(latents, text, geometry, text_per_image=per_image, scores=batch.get("scores"))


def group_errors(
    backbone: Backbone,
    network: Network,
    groups: EncodedGroups,
    eps: Tensor,
    timesteps: Tensor,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """Per-sample denoising errors [G, K] of the policy (an nn.Module) or a reference (a Predictor).

    eps: [G, C, h, w] (one draw per group); timesteps: [G] (one per group).
    """
    g, k = groups.num_groups, groups.group_size
    errors = denoising_errors(
        backbone, network, _k_major(groups.latents), eps.repeat(k, 1, 1, 1), timesteps.repeat(k),
        groups.flat_conditioning(), dtype,
    )
    return errors.reshape(k, g).transpose(0, 1)


def group_generators(seeds: list[int]) -> list[torch.Generator]:
    """One CPU generator per group: its noise, timestep and prompt dropout depend on nothing else."""
    return [torch.Generator().manual_seed(int(seed)) for seed in seeds]


def draw_noise(groups: EncodedGroups, backbone: Backbone, generators: list[torch.Generator]) -> tuple[Tensor, Tensor]:
    """One eps [G, C, h, w] and one timestep [G] per group, each group from its own generator."""
    shape = groups.latents.shape
    if len(generators) != shape[0]:
        raise ValueError(f"{len(generators)} generators for {shape[0]} groups")
    eps = torch.stack([torch.randn(tuple(shape[2:]), generator=g) for g in generators])
    timesteps = torch.cat([backbone.noise.sample_timesteps(1, generator=g) for g in generators])
    return eps.to(groups.latents.device, groups.latents.dtype), timesteps


def prepare_groups(
    backbone: Backbone, batch: dict, resolution: int, empty_prompt_prob: float
) -> tuple[EncodedGroups, list[torch.Generator]]:
    """Everything before the forward: each group's generator, its empty-prompt dropout, the encoding."""
    generators = group_generators(batch["noise_seeds"])
    drop = torch.tensor([float(torch.rand(1, generator=g)) < empty_prompt_prob for g in generators])
    groups = encode_groups(backbone, batch, resolution, drop if drop.any() else None)
    return groups, generators


def objective_step(
    backbone: Backbone,
    policy: nn.Module,
    reference: Predictor | None,
    objective: Objective,
    groups: EncodedGroups,
    generators: list[torch.Generator],
    weight_dtype: torch.dtype | None = None,
    reference_errors: Tensor | None = None,
) -> ObjectiveOutput:
    """The whole per-batch computation every method shares.

    ``reference_errors`` [G, K]: the reference's errors for these groups, precomputed
    (reference_errors.py); then the reference network is not run.
    """
    eps, timesteps = draw_noise(groups, backbone, generators)
    policy_errors = group_errors(backbone, policy, groups, eps, timesteps)
    if reference_errors is not None:
        reference_errors = reference_errors.to(policy_errors.device, policy_errors.dtype)
    elif objective.needs_reference:
        if reference is None:
            raise ValueError("this method needs a reference model but none was built")
        reference_errors = group_errors(backbone, reference, groups, eps, timesteps, dtype=weight_dtype)
    scores = None if groups.scores is None else groups.scores.to(policy_errors.device)
    return objective(policy_errors, reference_errors, scores)


class PrecomputedReference(Protocol):
    """Reference errors [G, K] looked up by the groups' noise seeds (reference_errors.ReferenceErrors)."""

    def lookup(self, noise_seeds: list[int], device: torch.device | str = "cpu") -> Tensor: ...


class DenoisingStep:
    """One micro-batch of data groups -> the Objective's output (every method but online PSO).

    ``precomputed``: the reference's errors stored before training; the reference network is then never run.
    """

    def __init__(
        self, backbone: Backbone, objective: Objective, resolution: int, empty_prompt_prob: float, weight_dtype: torch.dtype | None,
        precomputed: PrecomputedReference | None = None,
    ) -> None:
        self.backbone = backbone
        self.objective = objective
        self.resolution = resolution
        self.empty_prompt_prob = empty_prompt_prob
        self.weight_dtype = weight_dtype
        self.precomputed = precomputed

    def __call__(self, policy: nn.Module, reference: Predictor | None, batch: dict) -> ObjectiveOutput:
        groups, generators = prepare_groups(self.backbone, batch, self.resolution, self.empty_prompt_prob)
        stored = None if self.precomputed is None else self.precomputed.lookup(batch["noise_seeds"])
        return objective_step(self.backbone, policy, reference, self.objective, groups, generators, self.weight_dtype, stored)
