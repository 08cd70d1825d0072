"""Diffusion-DPO (Wallace et al., 2023, "Diffusion Model Alignment Using Direct Preference Optimization").

Per pair, with ``L`` the per-sample denoising error (the ELBO proxy of -log p):

    d_theta = L_theta(x_w) - L_theta(x_l)
    d_ref   = L_ref(x_w)   - L_ref(x_l)
    loss    = -mean( log sigmoid( -0.5 * beta * (d_theta - d_ref) ) )      (paper eq. 14)

The mean is taken outside the log-sigmoid (one public implementation had it
inside; that was a bug). beta = 5000 in the official SD1.5/SDXL code.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from diffalign.config import StrictModel

from .base import ObjectiveOutput, check_errors, register_objective


class DPOConfig(StrictModel):
    """Diffusion-DPO hyperparameters."""

    name: Literal["dpo"] = "dpo"
    beta: float = Field(5000.0, gt=0, description="KL strength (official SD1.5/SDXL: 5000; Flow-DPO SD3.5: 100).")


def implicit_accuracy(margin_gap: Tensor) -> Tensor:
    """Fraction of groups whose policy margin beats the reference's; exact ties count half.

    ``margin_gap = d_theta - d_ref`` [G]: negative means the policy prefers the
    winner more than the reference does.
    """
    return ((margin_gap < 0).float() + 0.5 * (margin_gap == 0).float()).mean()


class DiffusionDPO:
    """The Diffusion-DPO objective on pairs (K = 2, winner first)."""

    needs_reference = True
    def __init__(self, beta: float, method_name: str = "Diffusion-DPO") -> None:
        self.beta = beta
        self.method_name = method_name  # named in input errors (DCPO reuses this loss)

    def __call__(self, policy_errors: Tensor, reference_errors: Tensor | None, scores: Tensor | None = None) -> ObjectiveOutput:
        if reference_errors is None:
            raise ValueError(f"{self.method_name} needs the reference model's errors")
        check_errors(self.method_name, policy_errors, reference_errors, group_size=2)
        policy_gap = policy_errors[:, 0] - policy_errors[:, 1]  # d_theta [G]
        reference_gap = reference_errors[:, 0] - reference_errors[:, 1]  # d_ref [G]
        margin_gap = policy_gap - reference_gap
        loss = -F.logsigmoid(-0.5 * self.beta * margin_gap).mean()  # eq. 14, mean outside logsigmoid
        with torch.no_grad():
            metrics = {
                "implicit_acc": implicit_accuracy(margin_gap),
                "policy_err_winner": policy_errors[:, 0].mean(),
                "policy_err_loser": policy_errors[:, 1].mean(),
                "ref_err_winner": reference_errors[:, 0].mean(),
                "ref_err_loser": reference_errors[:, 1].mean(),
                "margin_gap": margin_gap.mean(),
            }
        return ObjectiveOutput(loss=loss, metrics=metrics)


register_objective("dpo", DPOConfig, lambda config: DiffusionDPO(beta=config.beta))  # type: ignore[attr-defined]
