"""PSO's three variants (reference, hinge, online clipped ratio) on hand-computed numbers and their limits.

Each value's arithmetic is in the test's docstring (errors float64, so hand values hold to 1e-9).
softplus(-z) = -log sigmoid(z) = log(1 + e^-z).
"""

from __future__ import annotations

import pytest
import torch

from diffalign.trainers.objectives import PSO, DiffusionDPO, PSOHinge, PSOOnline


def t(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


def test_pso_reference_variant_hand_computed() -> None:
    """beta = 5, λ = 0.1; policy [0.3, 0.5], reference [0.4, 0.5].

    policy term = 0.3 - 0.05 = 0.25; reference term = 0.4 - 0.05 = 0.35
    loss = -log sigmoid(5 * (0.35 - 0.25)) = log(1 + e^-0.5) = 0.4740769842
    """
    out = PSO(beta=5.0, loser_weight=0.1)(t([[0.3, 0.5]]), t([[0.4, 0.5]]))
    assert out.loss.item() == pytest.approx(0.4740769842, abs=1e-9)
    assert out.metrics["implicit_acc"].item() == 1.0


def test_pso_with_lambda_one_is_diffusion_dpo_at_twice_beta() -> None:
    """λ = 1: -log σ(β(d_ref - d_θ)) = DPO's -log σ(-0.5 β' (d_θ - d_ref)) with β' = 2β."""
    policy, reference = t([[0.5, 1.0], [0.9, 0.4]]), t([[0.6, 0.6], [0.3, 0.3]])
    assert PSO(3.0, 1.0)(policy, reference).loss.item() == pytest.approx(DiffusionDPO(6.0)(policy, reference).loss.item(), abs=1e-12)


def test_pso_hinge_variant_hand_computed() -> None:
    """λ = 0.1, prior 0.5, margin 0: pairs [0.3, 0.5], [0.01, 0.5].

    hinge: relu(0.3 - 0.05) = 0.25, relu(0.01 - 0.05) = 0 -> mean 0.125; prior 0.5 * mean(0.5, 0.5) = 0.25
    loss = 0.375
    """
    out = PSOHinge(loser_weight=0.1, prior_weight=0.5, margin=0.0)(t([[0.3, 0.5], [0.01, 0.5]]), None)
    assert out.loss.item() == pytest.approx(0.375, abs=1e-12)
    assert out.metrics["hinge_active"].item() == 0.5
    assert PSOHinge.needs_reference is False


def test_pso_online_clipped_ratio_hand_computed() -> None:
    """beta = 50, ε = 0.1 (log 0.9 = -0.1053605157, log 1.1 = 0.0953101798).

    group 1 (rewards 0.9 > 0.2): log ratios = ref - policy: winner [0.01, 0.5 -> clip 0.0953101798], loser [0, -0.01]
      z = 50 * ((0.01 + 0.0953101798) - (0 - 0.01)) = 5.7655089902; loss = log(1 + e^-z) = 0.0031288998
    group 2 (rewards equal): no preference, left out.
    """
    policy = t([[[1.0, 2.0], [1.5, 1.0]], [[1.0, 1.0], [1.0, 1.0]]])
    reference = t([[[1.01, 2.5], [1.5, 0.99]], [[3.0, 3.0], [0.0, 0.0]]])
    rewards = t([[0.9, 0.2], [0.5, 0.5]])
    out = PSOOnline(beta=50.0, clip_range=0.1)(policy, reference, rewards)
    assert out.loss.item() == pytest.approx(0.0031288998, abs=1e-9)
    assert out.metrics["decided_fraction"].item() == 0.5
    assert out.metrics["clip_fraction"].item() == pytest.approx(5 / 8)  # 0.5 in group 1 and all four of group 2


def test_pso_online_gradient_vanishes_outside_the_clip() -> None:
    policy = t([[[0.0], [0.0]]]).requires_grad_(True)
    reference = t([[[1.0], [0.0]]])  # winner's log ratio 1.0 > log 1.1: clipped, no gradient through it
    PSOOnline(beta=1.0, clip_range=0.1)(policy, reference, t([[1.0, 0.0]])).loss.backward()
    assert policy.grad[0, 0, 0].item() == 0.0
    assert policy.grad[0, 1, 0].item() < 0  # raising the loser's -log p lowers the loss
