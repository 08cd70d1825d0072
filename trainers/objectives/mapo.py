"""MaPO (Hong et al., 2024, "Margin-aware Preference Optimization for Aligning Diffusion Models
without Reference"): reference-free, one forward on the 2B batch.

Per pair, with ``L`` the per-sample denoising error and ``s`` = ``snr_value``:

    f(L)     = s L / (exp(s L) - 1)                       (a decreasing map of the error to (0, 1])
    log_odds = f(L_w) - f(L_l)
    ratio    = log sigmoid( T * log_odds )
    loss     = mean(L_w) - beta_mapo * mean(ratio)

No reference model is built or loaded: the memory saving is the method's point.
The public code computes ``x / (exp(x) - 1)``, which is NaN at x = 0; here it is
``x / expm1(x)`` with its limit 1 (Taylor 1 - x/2) near 0.
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


class MaPOConfig(StrictModel):
    """MaPO hyperparameters (defaults: the paper's SDXL recipe)."""

    name: Literal["mapo"] = "mapo"
    beta_mapo: float = Field(0.1, gt=0, description="Weight of the margin (odds-ratio) term against the winner's loss.")
    snr_value: float = Field(0.5, gt=0, description="s in f(L) = sL / (exp(sL) - 1).")
    temperature: float = Field(1000.0, gt=0, description="T, the scale of the log-odds inside the log-sigmoid.")


def error_to_odds(errors: Tensor, snr_value: float) -> Tensor:
    """f(L) = sL / (exp(sL) - 1), finite everywhere (=1 at L = 0)."""
    x = snr_value * errors
    safe = torch.where(x.abs() < 1e-6, torch.ones_like(x), x)
    return torch.where(x.abs() < 1e-6, 1.0 - 0.5 * x, safe / torch.expm1(safe))


class MaPO:
    """Margin-aware preference optimisation on pairs (K = 2, winner first), no reference."""

    needs_reference = False

    def __init__(self, beta_mapo: float, snr_value: float, temperature: float) -> None:
        self.beta_mapo = beta_mapo
        self.snr_value = snr_value
        self.temperature = temperature

    def __call__(self, policy_errors: Tensor, reference_errors: Tensor | None = None, scores: Tensor | None = None) -> ObjectiveOutput:
        check_errors("MaPO", policy_errors, None, group_size=2)
        winner, loser = policy_errors[:, 0], policy_errors[:, 1]
        log_odds = error_to_odds(winner, self.snr_value) - error_to_odds(loser, self.snr_value)
        ratio = F.logsigmoid(self.temperature * log_odds)
        loss = winner.mean() - self.beta_mapo * ratio.mean()
        with torch.no_grad():
            margin = loser - winner  # held-out quantity: positive when the winner is likelier
            metrics = {
                "margin_acc": implicit_accuracy(-margin),
                "margin": margin.mean(),
                "log_odds": log_odds.mean(),
                "ratio": ratio.mean(),
                "policy_err_winner": winner.mean(),
                "policy_err_loser": loser.mean(),
            }
        return ObjectiveOutput(loss=loss, metrics=metrics)


register_objective(
    "mapo",
    MaPOConfig,
    lambda c: MaPO(beta_mapo=c.beta_mapo, snr_value=c.snr_value, temperature=c.temperature),  # type: ignore[attr-defined]
)
