"""Held-out implicit accuracy: does the policy prefer the winner more than the reference does?

Per pair, over ``draws`` shared (t, eps) draws (TOYWORLD.md's protocol):
``score = -sum_d [ (L_theta(w) - L_ref(w)) - (L_theta(l) - L_ref(l)) ]``;
a pair is correct when score > 0 and counts half when score == 0 (so a policy
identical to its reference scores exactly 0.5).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import DataLoader

from diffalign.backbones import Backbone
from diffalign.data import EpochBatchSampler, GroupTransform, PreferenceDataset, SkipReport, collate_groups, derive_seed
from diffalign.data.sources import PreferenceSource

from .models import Reference
from .objectives.dpo import implicit_accuracy
from .step import draw_noise, encode_groups, group_errors, group_generators


@dataclass
class HeldoutScores:
    """Per-pair scores in the source's order (bad rows excluded) and their row ids."""

    row_ids: list[str]
    scores: torch.Tensor  # [N]

    def accuracy(self, mask: torch.Tensor | None = None) -> float:
        scores = self.scores if mask is None else self.scores[mask]
        return float(implicit_accuracy(-scores))  # score = -(margin gap), summed over draws


@torch.no_grad()
def heldout_scores(
    backbone: Backbone,
    policy: nn.Module | Reference,
    reference: nn.Module | Reference,
    source: PreferenceSource,
    resolution: int,
    draws: int = 8,
    batch_size: int = 32,
    seed: int = 1234,
) -> HeldoutScores:
    """Score every held-out pair; deterministic in ``seed`` (the same draws for any two models)."""
    dataset = PreferenceDataset(source, GroupTransform(resolution, center_crop=True, random_flip=False), seed)
    sampler = EpochBatchSampler(len(source), batch_size, seed, shuffle=False, drop_last=False, num_epochs=1)
    report = SkipReport()
    row_ids: list[str] = []
    scores: list[torch.Tensor] = []
    for batch in DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_groups):
        report.record_all(source.name, batch["skipped"])
        if not batch["row_ids"]:
            continue
        groups = encode_groups(backbone, batch, resolution)
        total = torch.zeros(groups.num_groups)
        for draw in range(draws):
            seeds = [derive_seed("heldout", seed, row_id, draw) for row_id in batch["row_ids"]]
            eps, timesteps = draw_noise(groups, backbone, group_generators(seeds))
            policy_errors = group_errors(backbone, policy, groups, eps, timesteps)
            reference_errors = group_errors(backbone, reference, groups, eps, timesteps)
            gap = policy_errors - reference_errors  # [G, 2]
            total -= (gap[:, 0] - gap[:, 1]).cpu()
        row_ids.extend(batch["row_ids"])
        scores.append(total)
    return HeldoutScores(row_ids, torch.cat(scores))
