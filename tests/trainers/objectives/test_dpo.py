"""Diffusion-DPO on hand-computed numbers, its limits, its metrics, its config and its registry entry.

Notation of Diffusion-DPO (Wallace et al., 2023, "Diffusion Model Alignment Using Direct Preference
Optimization"): per pair, d_theta = L_theta(w) - L_theta(l), d_ref = L_ref(w) - L_ref(l),
z = -0.5 * beta * (d_theta - d_ref), loss = mean over pairs of -log sigmoid(z) = log(1 + e^-z).
Errors are float64 so the hand values hold to 1e-9.
"""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError

from diffalign.trainers.objectives import (
    DiffusionDPO,
    DPOConfig,
    implicit_accuracy,
    objective_entry,
)

LOG2 = math.log(2.0)


def errors(rows: list[list[float]], requires_grad: bool = False) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64, requires_grad=requires_grad)


def softplus_neg(z: float) -> float:
    """-log sigmoid(z) = log(1 + e^-z)."""
    return math.log1p(math.exp(-z))


# --------------------------------------------------------------------------- hand-computed values


def test_dpo_single_pair_policy_prefers_winner() -> None:
    """beta = 2, policy [[0.3, 0.5]], reference [[0.4, 0.4]].

    d_theta = 0.3 - 0.5 = -0.2;  d_ref = 0.4 - 0.4 = 0
    z = -0.5 * 2 * (-0.2 - 0) = 0.2
    loss = -log sigmoid(0.2) = log(1 + e^-0.2) = log(1 + 0.8187307531) = log(1.8187307531) = 0.5981388694
    """
    out = DiffusionDPO(beta=2.0)(errors([[0.3, 0.5]]), errors([[0.4, 0.4]]))
    assert out.loss.item() == pytest.approx(0.5981388694, abs=1e-9)
    assert out.loss.ndim == 0
    assert out.metrics["margin_gap"].item() == pytest.approx(-0.2, abs=1e-12)
    assert out.metrics["implicit_acc"].item() == 1.0


def test_dpo_single_pair_policy_prefers_loser() -> None:
    """beta = 10, policy [[0.2, 0.1]], reference [[0.1, 0.1]].

    d_theta = 0.2 - 0.1 = 0.1;  d_ref = 0
    z = -0.5 * 10 * 0.1 = -0.5
    loss = log(1 + e^0.5) = log(1 + 1.6487212707) = log(2.6487212707) = 0.9740769842
    """
    out = DiffusionDPO(beta=10.0)(errors([[0.2, 0.1]]), errors([[0.1, 0.1]]))
    assert out.loss.item() == pytest.approx(0.9740769842, abs=1e-9)
    assert out.metrics["implicit_acc"].item() == 0.0


def test_dpo_batch_mean_is_outside_the_logsigmoid() -> None:
    """beta = 4, three pairs.

    pair 1: policy [0.5, 1.0], ref [0.6, 0.6]   -> d_theta = -0.5, d_ref = 0,    gap = -0.5,  z = -2 * -0.5  = 1.0
    pair 2: policy [0.9, 0.4], ref [0.3, 0.3]   -> d_theta =  0.5, d_ref = 0,    gap =  0.5,  z = -1.0
    pair 3: policy [0.2, 0.2], ref [0.5, 0.25]  -> d_theta =  0,   d_ref = 0.25, gap = -0.25, z = 0.5
    per pair: log(1 + e^-1) = 0.3132616875, log(1 + e^1) = 1.3132616875, log(1 + e^-0.5) = 0.4740769842
    loss = (0.3132616875 + 1.3132616875 + 0.4740769842) / 3 = 2.1006003592 / 3 = 0.7002001197
    The buggy mean-inside form gives -log sigmoid((1 - 1 + 0.5) / 3) = log(1 + e^-0.1667) = 0.6132820581.
    """
    policy = errors([[0.5, 1.0], [0.9, 0.4], [0.2, 0.2]])
    reference = errors([[0.6, 0.6], [0.3, 0.3], [0.5, 0.25]])
    out = DiffusionDPO(beta=4.0)(policy, reference)
    assert out.loss.item() == pytest.approx(0.7002001197, abs=1e-9)
    assert out.loss.item() == pytest.approx((softplus_neg(1.0) + softplus_neg(-1.0) + softplus_neg(0.5)) / 3, abs=1e-12)
    assert abs(out.loss.item() - 0.6132820581) > 0.05  # not the mean-inside bug
    assert out.metrics["implicit_acc"].item() == pytest.approx(2 / 3)
    assert out.metrics["margin_gap"].item() == pytest.approx((-0.5 + 0.5 - 0.25) / 3, abs=1e-12)


def test_dpo_loss_is_the_mean_of_single_pair_losses() -> None:
    """Batching invariance: the batch loss is the mean of each pair's own loss."""
    generator = torch.Generator().manual_seed(0)
    policy = torch.rand(5, 2, generator=generator, dtype=torch.float64)
    reference = torch.rand(5, 2, generator=generator, dtype=torch.float64)
    dpo = DiffusionDPO(beta=3.0)
    singles = [dpo(policy[i : i + 1], reference[i : i + 1]).loss for i in range(5)]
    assert dpo(policy, reference).loss.item() == pytest.approx(torch.stack(singles).mean().item(), abs=1e-12)


# --------------------------------------------------------------------------- limits


def test_beta_to_zero_gives_log2() -> None:
    """z = -0.5 * beta * gap -> 0 as beta -> 0, and -log sigmoid(0) = log 2 = 0.6931471806, whatever the errors."""
    policy = errors([[0.3, 0.9], [1.5, 0.1]])
    reference = errors([[0.7, 0.2], [0.4, 0.4]])
    assert DiffusionDPO(beta=1e-9)(policy, reference).loss.item() == pytest.approx(LOG2, abs=1e-9)


def test_policy_equal_to_reference_gives_log2_and_half_accuracy() -> None:
    """At initialisation (policy == reference) every gap is exactly 0: loss = log 2, each pair a tie worth 1/2."""
    policy = errors([[0.3, 0.9], [1.5, 0.1], [0.25, 0.25]])
    out = DiffusionDPO(beta=5000.0)(policy, policy.clone())
    assert out.loss.item() == pytest.approx(LOG2, abs=1e-12)
    assert out.metrics["implicit_acc"].item() == 0.5


def test_swapping_winner_and_loser_flips_the_margin() -> None:
    """One pair with z = 0.2 (first test); swapped, d_theta and d_ref change sign so z -> -0.2.

    loss(x) = log(1 + e^-z), loss(swap) = log(1 + e^z), and loss(x) - loss(swap) = -z:
    0.5981388694 - 0.7981388694 = -0.2.
    """
    dpo = DiffusionDPO(beta=2.0)
    policy, reference = errors([[0.3, 0.5]]), errors([[0.4, 0.4]])
    out = dpo(policy, reference)
    swapped = dpo(policy.flip(1), reference.flip(1))
    assert swapped.loss.item() == pytest.approx(0.7981388694, abs=1e-9)
    assert out.loss.item() - swapped.loss.item() == pytest.approx(-0.2, abs=1e-12)
    assert swapped.metrics["margin_gap"].item() == pytest.approx(-out.metrics["margin_gap"].item(), abs=1e-12)
    assert out.metrics["implicit_acc"].item() + swapped.metrics["implicit_acc"].item() == 1.0


def test_gradient_sign_and_value() -> None:
    """d loss / d L_theta(w) = 0.5 beta sigmoid(-z) / G > 0; d loss / d L_theta(l) is its negative.

    First test's pair (beta = 2, z = 0.2, G = 1): 0.5 * 2 * sigmoid(-0.2) = 1 / (1 + e^0.2) = 0.4501660027.
    So lowering the winner's error (or raising the loser's) lowers the loss; the reference gets no gradient.
    """
    policy = errors([[0.3, 0.5]], requires_grad=True)
    reference = errors([[0.4, 0.4]], requires_grad=True)
    DiffusionDPO(beta=2.0)(policy, reference).loss.backward()
    assert policy.grad[0, 0].item() == pytest.approx(0.4501660027, abs=1e-9)
    assert policy.grad[0, 1].item() == pytest.approx(-0.4501660027, abs=1e-9)

    # raising the winner's policy error raises the loss
    dpo = DiffusionDPO(beta=2.0)
    base = dpo(errors([[0.3, 0.5]]), errors([[0.4, 0.4]])).loss.item()
    worse = dpo(errors([[0.35, 0.5]]), errors([[0.4, 0.4]])).loss.item()
    assert worse > base


def test_large_beta_is_finite() -> None:
    """beta = 5000 with a gap of 0.5: z = -1250; -log sigmoid(-1250) = 1250 (no overflow to inf)."""
    out = DiffusionDPO(beta=5000.0)(errors([[1.0, 0.5]]), errors([[0.5, 0.5]]))
    assert out.loss.item() == pytest.approx(1250.0, rel=1e-9)


# --------------------------------------------------------------------------- metrics


def test_metrics_on_a_hand_made_batch() -> None:
    """Three pairs, reference [0.5, 0.5] for the first two and equal to the policy for the third.

    pair 1: policy [0.25, 0.5]  -> d_theta = -0.25, d_ref = 0 -> gap -0.25: correct (1)
    pair 2: policy [0.125, 0.5] -> d_theta = -0.375, d_ref = 0 -> gap -0.375: correct (1)
    pair 3: policy = ref = [0.75, 0.25]                        -> gap 0: tie (1/2)
    implicit_acc = (1 + 1 + 0.5) / 3 = 0.8333333333
    policy_err_winner = (0.25 + 0.125 + 0.75) / 3 = 0.375; policy_err_loser = (0.5 + 0.5 + 0.25) / 3 = 0.4166666667
    ref_err_winner = (0.5 + 0.5 + 0.75) / 3 = 0.5833333333; ref_err_loser = (0.5 + 0.5 + 0.25) / 3 = 0.4166666667
    """
    policy = errors([[0.25, 0.5], [0.125, 0.5], [0.75, 0.25]])
    reference = errors([[0.5, 0.5], [0.5, 0.5], [0.75, 0.25]])
    metrics = DiffusionDPO(beta=1.0)(policy, reference).metrics
    assert metrics["implicit_acc"].item() == pytest.approx(2.5 / 3, abs=1e-7)  # counted in float32
    assert metrics["policy_err_winner"].item() == pytest.approx(0.375, abs=1e-12)
    assert metrics["policy_err_loser"].item() == pytest.approx(1.25 / 3, abs=1e-12)
    assert metrics["ref_err_winner"].item() == pytest.approx(1.75 / 3, abs=1e-12)
    assert metrics["ref_err_loser"].item() == pytest.approx(1.25 / 3, abs=1e-12)
    assert all(not value.requires_grad for value in metrics.values())


def test_implicit_accuracy_function() -> None:
    """Gaps [-1, 0, 2, -0.5]: wins 1 + 0.5 + 0 + 1 = 2.5 out of 4 = 0.625."""
    assert implicit_accuracy(torch.tensor([-1.0, 0.0, 2.0, -0.5])).item() == 0.625


def test_dpo_rejects_bad_inputs() -> None:
    dpo = DiffusionDPO(beta=1.0)
    with pytest.raises(ValueError, match="reference"):
        dpo(errors([[0.1, 0.2]]), None)
    with pytest.raises(ValueError, match=r"\[G, 2\]"):
        dpo(errors([[0.1, 0.2, 0.3]]), errors([[0.1, 0.2, 0.3]]))
    with pytest.raises(ValueError, match=r"\[G, 2\]"):
        dpo(errors([[0.1, 0.2]])[0], errors([[0.1, 0.2]])[0])
    assert DiffusionDPO.needs_reference is True


# --------------------------------------------------------------------------- config and registry entry


def test_registry_builds_dpo_from_its_config() -> None:
    entry = objective_entry("dpo")
    assert entry.config_class is DPOConfig
    assert DPOConfig().beta == 5000.0  # official SD1.5/SDXL value
    objective = entry.build(DPOConfig(beta=3.0))
    assert isinstance(objective, DiffusionDPO) and objective.beta == 3.0
    assert objective.needs_reference


def test_dpo_config_is_validated() -> None:
    with pytest.raises(ValidationError):
        DPOConfig(beta=0.0)
    with pytest.raises(ValidationError):
        DPOConfig(beta=1.0, betta=2.0)
    with pytest.raises(ValidationError):
        DPOConfig(name="mapo")
