"""Held-out evaluation: does the policy prefer the better images more than the reference does?

Per group, over ``draws`` shared (t, eps) draws (the toy world's protocol, docs/toy-world.md), summed
per image:

    implicit_i = sum_d [ L_theta(x_i) - L_ref(x_i) ]     (lower = the policy likes x_i more than the reference)
    policy_i   = sum_d L_theta(x_i) / draws              (reference-free: MaPO's held-out margin L_l - L_w)

Pairs: ``score = -(implicit_w - implicit_l)``; a pair is correct when score > 0 and counts
half when score == 0 (so a policy identical to its reference scores exactly 0.5). Ranked
lists: the same over every label-ordered pair (φ_i > φ_j) of a group.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from diffalign.atomic import staged_file
from diffalign.backbones import Backbone
from diffalign.data import EpochBatchSampler, GroupTransform, PreferenceDataset, SkipReport, collate_groups, derive_seed
from diffalign.data.sources import PreferenceSource
from diffalign.prediction import Network

from .objectives.rankdpo import pairwise_accuracy
from .step import draw_noise, encode_groups, group_errors, group_generators


@dataclass
class HeldoutScores:
    """Per-group sums over draws in the source's order (bad rows excluded) and their row ids."""

    row_ids: list[str]
    implicit: torch.Tensor  # [N, K] sum_d (L_theta - L_ref), best image first
    policy: torch.Tensor  # [N, K] mean_d L_theta
    labels: torch.Tensor | None = None  # [N, K] label scores when the data has them
    reference_errors: torch.Tensor | None = None  # [N, draws, K] the reference's per-draw errors, for reuse
    draws_seed: tuple[int, int] | None = None  # (draws, seed) the pass used; a reusing pass must match

    @property
    def scores(self) -> torch.Tensor:
        """Pairs: -(implicit_w - implicit_l) [N]; positive when the policy prefers the winner more than the reference."""
        return -(self.implicit[:, 0] - self.implicit[:, 1])

    def accuracy(self, mask: torch.Tensor | None = None) -> float:
        """Implicit accuracy over label-ordered pairs (pairs: winner vs loser; ties count half)."""
        implicit = self.implicit if mask is None else self.implicit[mask]
        labels = self._labels() if mask is None else self._labels()[mask]
        return float(pairwise_accuracy(implicit, labels))

    def margin(self, mask: torch.Tensor | None = None) -> float:
        """Mean held-out policy margin L_l - L_w of pairs (MaPO's reference-free measure)."""
        policy = self.policy if mask is None else self.policy[mask]
        return float((policy[:, -1] - policy[:, 0]).mean())

    def save(self, path: str | Path) -> None:
        """Write the scores to ``path`` (atomically), so a later evaluation can reuse the reference's errors."""
        with staged_file(path) as temporary:
            torch.save({field.name: getattr(self, field.name) for field in fields(self)}, temporary)

    @classmethod
    def load(cls, path: str | Path) -> HeldoutScores:
        """Scores written by :meth:`save` (tensors and plain values only: ``weights_only`` loading)."""
        stored = torch.load(path, weights_only=True)
        draws_seed = stored.get("draws_seed")
        return cls(**{**stored, "draws_seed": tuple(draws_seed) if draws_seed is not None else None})

    def _labels(self) -> torch.Tensor:
        if self.labels is not None:
            return self.labels
        k = self.implicit.shape[1]
        return torch.arange(k, 0, -1, dtype=torch.float32).expand(self.implicit.shape[0], k)  # best first


@torch.no_grad()
def heldout_scores(
    backbone: Backbone,
    policy: Network,
    reference: Network,
    source: PreferenceSource,
    resolution: int,
    draws: int = 8,
    batch_size: int = 32,
    seed: int = 1234,
    reuse: HeldoutScores | None = None,
) -> HeldoutScores:
    """Score every held-out group; deterministic in ``seed`` (the same draws for any two models).

    The reference's errors are computed once per draw, not twice: when ``policy is reference`` (the
    "before training" pass) they serve as the policy's too, and ``reuse``, an earlier pass over the same
    source with the same reference, draws and seed, lends its reference errors to this one. The
    forward is deterministic, so the figures equal those of recomputing; a "before, then after"
    evaluation costs two model passes instead of four.
    """
    if reuse is not None and (reuse.reference_errors is None or reuse.draws_seed != (draws, seed)):
        raise ValueError(f"reuse: that pass used (draws, seed) = {reuse.draws_seed}, this one ({draws}, {seed})")
    dataset = PreferenceDataset(source, GroupTransform(resolution, center_crop=True, random_flip=False, size_conditioning="official"), seed)
    sampler = EpochBatchSampler(len(source), batch_size, seed, shuffle=False, drop_last=False, num_epochs=1)
    report = SkipReport()
    row_ids: list[str] = []
    implicit: list[torch.Tensor] = []
    policy_means: list[torch.Tensor] = []
    labels: list[torch.Tensor] = []
    reference_draws: list[torch.Tensor] = []
    for batch in DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_groups):
        report.record_all(source.name, batch["skipped"])
        if not batch["row_ids"]:
            continue
        start = len(row_ids)
        if reuse is not None and reuse.row_ids[start : start + len(batch["row_ids"])] != list(batch["row_ids"]):
            raise ValueError("reuse: that pass scored other rows (another source?)")
        groups = encode_groups(backbone, batch, resolution)
        total = torch.zeros(groups.num_groups, groups.group_size)
        policy_total = torch.zeros_like(total)
        batch_reference: list[torch.Tensor] = []
        for draw in range(draws):
            seeds = [derive_seed("heldout", seed, row_id, draw) for row_id in batch["row_ids"]]
            eps, timesteps = draw_noise(groups, backbone, group_generators(seeds))
            if reuse is not None:
                reference_errors = reuse.reference_errors[start : start + groups.num_groups, draw].to(eps.device)  # type: ignore[index]
            else:
                reference_errors = group_errors(backbone, reference, groups, eps, timesteps)
            policy_errors = reference_errors if policy is reference else group_errors(backbone, policy, groups, eps, timesteps)
            total += (policy_errors - reference_errors).cpu()
            policy_total += policy_errors.cpu()
            batch_reference.append(reference_errors.cpu())
        row_ids.extend(batch["row_ids"])
        implicit.append(total)
        policy_means.append(policy_total / draws)
        reference_draws.append(torch.stack(batch_reference, dim=1))  # kept in their own dtype
        if batch["scores"] is not None:
            labels.append(batch["scores"].float())
    label_tensor = torch.cat(labels) if len(labels) == len(implicit) and labels else None
    return HeldoutScores(row_ids, torch.cat(implicit), torch.cat(policy_means), label_tensor, torch.cat(reference_draws), (draws, seed))
