"""DCPO (Saeidi et al., 2025, "Dual Caption Preference Optimization for Diffusion Models").

The loss is Diffusion-DPO's; what changes is the conditioning: the winner is
denoised under its own caption z_w and the loser under z_l, for the policy and
the reference alike (the step encodes per-image captions; SDXL and SD3 included):

    loss = -log sigmoid( -0.5 β ( [L_θ(x_w, z_w) - L_θ(x_l, z_l)] - [L_ref(x_w, z_w) - L_ref(x_l, z_l)] ) )

So the method *requires* per-image captions: rows without them are reported and
skipped when the data is opened, and data without the columns is refused.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from torch import Tensor

from diffalign.config import StrictModel

from .base import ObjectiveOutput, register_objective
from .dpo import DiffusionDPO


class DCPOConfig(StrictModel):
    """DCPO hyperparameters."""

    name: Literal["dcpo"] = "dcpo"
    beta: float = Field(
        5000.0, gt=0, description="KL strength in the -0.5β form (code default 5000; the public SD 2.1 run uses 500)."
    )


class DCPO:
    """Diffusion-DPO on dual-caption pairs (K = 2, winner first, per-image captions)."""

    needs_reference = True

    def __init__(self, beta: float) -> None:
        self._dpo = DiffusionDPO(beta, method_name="DCPO")

    def __call__(self, policy_errors: Tensor, reference_errors: Tensor | None, scores: Tensor | None = None) -> ObjectiveOutput:
        return self._dpo(policy_errors, reference_errors)


register_objective("dcpo", DCPOConfig, lambda c: DCPO(beta=c.beta), data="captioned_pairs")  # type: ignore[attr-defined]
