"""RankDPO (Karthik et al., 2024, "Scalable Ranked Preference Optimization for Text-to-Image
Generation"): a listwise, ΔNDCG-weighted Diffusion-DPO over ranked lists of k images.

Per group (one prompt, k images sharing one eps and one t, best first by label score φ):

    s_i  = L_theta(x_i) - L_ref(x_i)             implicit score; lower = the policy likes x_i more
    r_i  = rank of s_i among the group (1 = lowest s), from the *current* scores, no gradient
    G_ij = 2^φ_i - 2^φ_j                          gain difference of a label-ordered pair φ_i > φ_j
    D(r) = log2(1 + r)                            discount
    Δ_ij = |G_ij| * |1/D(r_i) - 1/D(r_j)|         ΔNDCG weight (LambdaLoss form; a reconstruction)
    loss = - Σ_{i≻j} Δ_ij log sigmoid( -0.5 β (s_i - s_j) ) / Σ_{i≻j} Δ_ij,   then the mean over groups

The -0.5β scale is Diffusion-DPO's, so one β means one strength in both methods and
k = 2 reduces *exactly* to Diffusion-DPO (one pair; its weight cancels). Groups whose
label scores are all equal carry no preference and are left out of the mean.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from diffalign.config import StrictModel

from .base import ObjectiveOutput, check_errors, register_objective
from .dpo import implicit_accuracy


class RankDPOConfig(StrictModel):
    """RankDPO hyperparameters (β unverified in the paper: Diffusion-DPO's value)."""

    name: Literal["rankdpo"] = "rankdpo"
    beta: float = Field(5000.0, gt=0, description="KL strength, in Diffusion-DPO's -0.5β form (k = 2 equals DPO).")


def current_ranks(implicit_scores: Tensor) -> Tensor:
    """Rank 1..k of each image by its implicit score, lowest first; exact ties keep list order. [G, K] -> [G, K]."""
    order = torch.sort(implicit_scores, dim=1, stable=True).indices
    return torch.argsort(order, dim=1).to(implicit_scores.dtype) + 1


def pair_weights(label_scores: Tensor, ranks: Tensor) -> Tensor:
    """Δ_ij [G, K, K] for label-ordered pairs (φ_i > φ_j), zero elsewhere."""
    gains = torch.pow(2.0, label_scores)
    inverse_discount = 1.0 / torch.log2(1.0 + ranks)
    gain_gap = (gains[:, :, None] - gains[:, None, :]).abs()
    discount_gap = (inverse_discount[:, :, None] - inverse_discount[:, None, :]).abs()
    ordered = label_scores[:, :, None] > label_scores[:, None, :]
    return torch.where(ordered, gain_gap * discount_gap, torch.zeros_like(gain_gap))


def ndcg(label_scores: Tensor, ranks: Tensor) -> Tensor:
    """NDCG [G] of the current ranking with gains 2^φ - 1 (1 = the policy orders the list like its labels)."""
    gains = torch.pow(2.0, label_scores) - 1.0
    dcg = (gains / torch.log2(1.0 + ranks)).sum(dim=1)
    ideal_ranks = torch.arange(1, label_scores.shape[1] + 1, dtype=label_scores.dtype, device=label_scores.device)
    ideal = (torch.sort(gains, dim=1, descending=True).values / torch.log2(1.0 + ideal_ranks)).sum(dim=1)
    return torch.where(ideal > 0, dcg / ideal.clamp_min(1e-12), torch.ones_like(dcg))


def pairwise_accuracy(implicit: Tensor, labels: Tensor) -> Tensor:
    """Implicit accuracy over every label-ordered pair (φ_i > φ_j) of every group: the better image has the
    lower s (ties half; 0.5 when no pair is ordered). implicit, labels: [G, K]. k = 2 is Diffusion-DPO's."""
    ordered = labels[:, :, None] > labels[:, None, :]
    if not ordered.any():
        return torch.tensor(0.5)
    gap = implicit[:, :, None] - implicit[:, None, :]
    return implicit_accuracy(gap[ordered])


def default_scores(policy_errors: Tensor, scores: Tensor | None) -> Tensor:
    """Label scores; pairs without any (JSONL pairs) are winner 1, loser 0."""
    if scores is not None:
        if scores.shape != policy_errors.shape:
            raise ValueError(f"label scores {tuple(scores.shape)} do not match errors {tuple(policy_errors.shape)}")
        return scores.to(policy_errors.dtype)
    if policy_errors.shape[1] != 2:
        raise ValueError(f"RankDPO on groups of {policy_errors.shape[1]} images needs label scores (the data's 'scores')")
    return torch.tensor([1.0, 0.0], dtype=policy_errors.dtype, device=policy_errors.device).expand_as(policy_errors)


class RankDPO:
    """ΔNDCG-weighted pairwise Diffusion-DPO over ranked groups [G, K], best first."""

    needs_reference = True

    def __init__(self, beta: float) -> None:
        self.beta = beta

    def __call__(self, policy_errors: Tensor, reference_errors: Tensor | None, scores: Tensor | None = None) -> ObjectiveOutput:
        if reference_errors is None:
            raise ValueError("RankDPO needs the reference model's errors")
        check_errors("RankDPO", policy_errors, reference_errors, group_size=None)
        labels = default_scores(policy_errors, scores)
        implicit = policy_errors - reference_errors  # s_i [G, K]
        with torch.no_grad():
            ranks = current_ranks(implicit.detach())
            weights = pair_weights(labels, ranks)  # Δ_ij [G, K, K]
        gap = implicit[:, :, None] - implicit[:, None, :]  # s_i - s_j
        pair_loss = -F.logsigmoid(-0.5 * self.beta * gap)
        weight_sum = weights.sum(dim=(1, 2))
        has_preference = weight_sum > 0
        group_loss = (weights * pair_loss).sum(dim=(1, 2)) / weight_sum.clamp_min(1e-12)
        loss = group_loss[has_preference].mean() if has_preference.any() else 0.0 * implicit.sum()
        with torch.no_grad():
            metrics = {
                "implicit_acc": pairwise_accuracy(implicit, labels),
                "ndcg": ndcg(labels, ranks).mean(),
                "policy_err_best": policy_errors[:, 0].mean(),
                "policy_err_worst": policy_errors[:, -1].mean(),
                "ref_err_best": reference_errors[:, 0].mean(),
                "ref_err_worst": reference_errors[:, -1].mean(),
            }
        return ObjectiveOutput(loss=loss, metrics=metrics)


register_objective("rankdpo", RankDPOConfig, lambda c: RankDPO(beta=c.beta), data="ranked")  # type: ignore[attr-defined]
