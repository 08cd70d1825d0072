"""MaPO on hand-computed numbers, its odds map's limit at zero error and its gradient's direction.

Each value's arithmetic is in the test's docstring (errors float64, so hand values hold to 1e-9).
"""

from __future__ import annotations

import math

import pytest
import torch

from diffalign.trainers.objectives import MaPO, error_to_odds, objective_entry


def t(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


def test_mapo_hand_computed_two_pairs() -> None:
    """s = 0.5, T = 10, beta = 0.1.

    pair 1: L_w = 0.2, L_l = 0.6: f(0.2) = 0.1/(e^0.1 - 1) = 0.9508331945, f(0.6) = 0.3/(e^0.3 - 1) = 0.8574887741
            log_odds = 0.0933444204, ratio = log sigmoid(0.933444204) = -0.3316011954
    pair 2: L_w = 0.4, L_l = 0.1: f(0.4) = 0.9033311132, f(0.1) = 0.9752083247
            log_odds = -0.0718772114, ratio = log sigmoid(-0.718772114) = -1.1157683285
    loss = mean(L_w) - 0.1 mean(ratio) = 0.3 - 0.1 * (-0.7236847619) = 0.3723684762
    """
    out = MaPO(beta_mapo=0.1, snr_value=0.5, temperature=10.0)(t([[0.2, 0.6], [0.4, 0.1]]), None)
    assert out.loss.item() == pytest.approx(0.3723684762, abs=1e-9)
    assert out.metrics["margin"].item() == pytest.approx((0.4 - 0.3) / 2, abs=1e-12)  # mean(L_l - L_w) = (0.4 - 0.3)/2
    assert out.metrics["margin_acc"].item() == 0.5


def test_mapo_odds_map_is_finite_at_zero_with_its_limit() -> None:
    """f(L) = sL/(e^{sL} - 1) -> 1 as L -> 0 (the public code's x/(exp(x)-1) is NaN there)."""
    errors = torch.tensor([0.0, 1e-9, 1e-3], dtype=torch.float64, requires_grad=True)
    odds = error_to_odds(errors, 0.5)
    assert torch.isfinite(odds).all()
    assert odds[0].item() == 1.0
    assert odds[2].item() == pytest.approx(0.0005 / math.expm1(0.0005), abs=1e-12)
    odds.sum().backward()
    assert torch.isfinite(errors.grad).all()
    assert errors.grad[0].item() == pytest.approx(-0.25, abs=1e-9)  # d/dL (1 - sL/2) = -s/2


def test_mapo_gradient_lowers_the_winner_error_and_raises_the_loser_error() -> None:
    policy = t([[0.3, 0.3]]).requires_grad_(True)
    MaPO(0.1, 0.5, 1000.0)(policy, None).loss.backward()
    assert policy.grad[0, 0] > 0 and policy.grad[0, 1] < 0


def test_mapo_needs_no_reference_and_rejects_non_pairs() -> None:
    mapo = objective_entry("mapo").build(objective_entry("mapo").config_class())
    assert mapo.needs_reference is False
    with pytest.raises(ValueError, match=r"\[G, 2\]"):
        mapo(t([[0.1, 0.2, 0.3]]), None)
