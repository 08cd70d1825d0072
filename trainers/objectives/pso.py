"""PSO (Miao et al., 2024, "Tuning Timestep-Distilled Diffusion Model Using Pairwise Sample
Optimization") for few-step models (SDXL-Turbo, DMD2, LCM) trained on their distilled timesteps.

Offline (``pso``): pairs are (a training image x_w, a reference image x_l sampled once from
the initial distilled model with its own few-step sampler), on shared eps and t:

    reference variant:  loss = -log sigmoid( β [ (L_ref(w) - λ L_ref(l)) - (L_θ(w) - λ L_θ(l)) ] ),  λ = 0.1
    hinge variant:      loss = relu( L_θ(w) - λ L_θ(l) + margin ) + prior_weight · L_θ(l)   (no reference)

The hinge variant's exact form is not checked against the paper's equations: we read "a
reference-free hinge variant [that] adds 0.5 L_θ(l) as a prior term" as above; margin and prior
weight are settings.

Online (``pso-online``): two few-step samples per prompt from the current policy, a reward
picks the winner, and per stochastic transition k of each sample the log-ratio
log π_θ/π_ref of its Gaussian step (the per-dimension mean of the log-density over the latent,
as in DDPO and Flow-GRPO, whose recipes give β = 50 and ε = 0.1; ``log_prob_reduction``) is
clipped to log(1 ± ε):

    loss = -log sigmoid( β Σ_k h_k log clip(π_θ/π_ref, 1 - ε, 1 + ε) ),   h = +1 (winner), -1 (loser)

The online objective receives *negative log-probabilities* [G, 2, S] in place of errors, so
log π_θ/π_ref = reference_errors - policy_errors. Exact paper equations: unverified.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from diffalign.config import StrictModel

from .base import ObjectiveOutput, check_errors, register_objective
from .dpo import implicit_accuracy


class PSOConfig(StrictModel):
    """Offline PSO: hyperparameters and how the reference images are sampled (once, then cached)."""

    name: Literal["pso"] = "pso"
    variant: Literal["reference", "hinge"] = Field("reference", description="Reference-anchored loss, or the reference-free hinge.")
    beta: float = Field(5.0, gt=0, description="β (paper: 5 for concept/style tuning).")
    loser_weight: float = Field(0.1, ge=0, description="λ, the weight of the reference image's likelihood.")
    prior_weight: float = Field(0.5, ge=0, description="Hinge variant: weight of the prior term L_θ(l).")
    hinge_margin: float = Field(0.0, description="Hinge variant: margin inside relu(L_θ(w) - λ L_θ(l) + margin).")
    reference_dir: str | None = Field(
        None, description="Where sampled reference images are cached (default: <train.output_dir>/pso-references)."
    )
    reference_steps: int = Field(4, ge=1, description="Few-step sampler steps for the reference images.")
    reference_eta: float = Field(1.0, ge=0, le=1, description="Sampler stochasticity η (1: ancestral-like, 0: deterministic).")
    reference_seed: int = Field(0, description="Seed of the reference images (one per training row).")


class PSOOnlineConfig(StrictModel):
    """Online PSO: sampling, reward and the clipped-ratio loss."""

    name: Literal["pso-online"] = "pso-online"
    beta: float = Field(50.0, gt=0, description="β (paper: 50).")
    clip_range: float = Field(0.1, gt=0, lt=1, description="ε: per-transition ratios are clipped to [1 - ε, 1 + ε].")
    num_steps: int = Field(4, ge=2, description="Sampler steps per sample (at least 2: the last step is deterministic).")
    eta: float = Field(1.0, gt=0, le=1, description="Sampler stochasticity η of the non-final steps.")
    reward: str = Field("toy", description="Reward: 'toy' (toy world) or a scorer name from diffalign.scorers (e.g. pickscore).")
    reward_weights: str | None = Field(None, description="Scorer weights (hub id or local path) when reward is a scorer.")
    log_prob_reduction: Literal["mean", "sum"] = Field(
        "mean",
        description="How a transition's Gaussian log-prob is reduced over latent dimensions before the ratio is clipped: "
        "'mean' (DDPO / Flow-GRPO, where β 50 and ε 0.1 come from) or 'sum' (the joint density; clips almost every "
        "transition of a real-size latent).",
    )


def _pairs(method: str, policy_errors: Tensor, reference_errors: Tensor | None) -> None:
    check_errors(method, policy_errors, reference_errors, group_size=2)


class PSO:
    """Offline PSO, reference-anchored (K = 2: training image first, sampled reference second)."""

    needs_reference = True

    def __init__(self, beta: float, loser_weight: float) -> None:
        self.beta = beta
        self.loser_weight = loser_weight

    def __call__(self, policy_errors: Tensor, reference_errors: Tensor | None, scores: Tensor | None = None) -> ObjectiveOutput:
        if reference_errors is None:
            raise ValueError("PSO (reference variant) needs the reference model's errors")
        _pairs("PSO", policy_errors, reference_errors)
        lam = self.loser_weight
        policy_term = policy_errors[:, 0] - lam * policy_errors[:, 1]
        reference_term = reference_errors[:, 0] - lam * reference_errors[:, 1]
        loss = -F.logsigmoid(self.beta * (reference_term - policy_term)).mean()
        with torch.no_grad():
            metrics = {
                "implicit_acc": implicit_accuracy(policy_term - reference_term),
                "policy_err_winner": policy_errors[:, 0].mean(),
                "policy_err_loser": policy_errors[:, 1].mean(),
                "ref_err_winner": reference_errors[:, 0].mean(),
                "ref_err_loser": reference_errors[:, 1].mean(),
            }
        return ObjectiveOutput(loss=loss, metrics=metrics)


class PSOHinge:
    """Offline PSO, reference-free hinge with a prior term on the reference image."""

    needs_reference = False

    def __init__(self, loser_weight: float, prior_weight: float, margin: float) -> None:
        self.loser_weight = loser_weight
        self.prior_weight = prior_weight
        self.margin = margin

    def __call__(self, policy_errors: Tensor, reference_errors: Tensor | None = None, scores: Tensor | None = None) -> ObjectiveOutput:
        _pairs("PSO (hinge)", policy_errors, None)
        winner, loser = policy_errors[:, 0], policy_errors[:, 1]
        hinge = F.relu(winner - self.loser_weight * loser + self.margin)
        loss = hinge.mean() + self.prior_weight * loser.mean()
        with torch.no_grad():
            margin = loser - winner
            metrics = {
                "margin_acc": implicit_accuracy(-margin),
                "margin": margin.mean(),
                "hinge_active": (hinge > 0).float().mean(),
                "policy_err_winner": winner.mean(),
                "policy_err_loser": loser.mean(),
            }
        return ObjectiveOutput(loss=loss, metrics=metrics)


class PSOOnline:
    """Online PSO on two policy samples per prompt; errors are negative log-probs [G, 2, S]."""

    needs_reference = True

    def __init__(self, beta: float, clip_range: float) -> None:
        self.beta = beta
        self.low, self.high = math.log(1.0 - clip_range), math.log(1.0 + clip_range)

    def __call__(self, policy_errors: Tensor, reference_errors: Tensor | None, scores: Tensor | None = None) -> ObjectiveOutput:
        if reference_errors is None:
            raise ValueError("online PSO needs the reference model's log-probabilities")
        if policy_errors.ndim != 3 or policy_errors.shape[1] != 2 or reference_errors.shape != policy_errors.shape:
            raise ValueError(
                f"online PSO expects [G, 2, S] negative log-probs for policy and reference, got "
                f"{tuple(policy_errors.shape)} and {tuple(reference_errors.shape)}"
            )
        if scores is None or scores.shape != policy_errors.shape[:2]:
            raise ValueError("online PSO needs the rewards [G, 2] of its samples, best first")
        log_ratio = reference_errors - policy_errors  # log π_θ - log π_ref per transition
        clipped = log_ratio.clamp(self.low, self.high).sum(dim=2)  # Σ_k log clip(ratio) [G, 2]
        decided = scores[:, 0] > scores[:, 1]  # equal rewards carry no preference
        z = self.beta * (clipped[:, 0] - clipped[:, 1])  # h = +1 winner, -1 loser
        per_group = -F.logsigmoid(z)
        loss = per_group[decided].mean() if decided.any() else 0.0 * per_group.sum()
        with torch.no_grad():
            metrics = {
                "reward_mean": scores.float().mean(),
                "reward_gap": (scores[:, 0] - scores[:, 1]).float().mean(),
                "log_ratio_winner": log_ratio[:, 0].sum(dim=1).mean(),
                "log_ratio_loser": log_ratio[:, 1].sum(dim=1).mean(),
                "clip_fraction": ((log_ratio < self.low) | (log_ratio > self.high)).float().mean(),
                "decided_fraction": decided.float().mean(),
            }
        return ObjectiveOutput(loss=loss, metrics=metrics)


def _build_offline(config: PSOConfig):
    if config.variant == "hinge":
        return PSOHinge(config.loser_weight, config.prior_weight, config.hinge_margin)
    return PSO(config.beta, config.loser_weight)


# Offline PSO pairs each training image with a sample of the initial model (trainers/pso/references.py).
register_objective("pso", PSOConfig, _build_offline, data="sampled_reference_pairs")  # type: ignore[arg-type]
register_objective(
    "pso-online", PSOOnlineConfig, lambda c: PSOOnline(c.beta, c.clip_range), data="prompts", step="sampled"  # type: ignore[attr-defined]
)
