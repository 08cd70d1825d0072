"""MaPO, RankDPO, DCPO and PSO on hand-computed numbers, their limits and their reductions.

Each value's arithmetic is in the test's docstring (errors float64, so hand values hold to 1e-9).
softplus(-z) = -log sigmoid(z) = log(1 + e^-z).
"""

from __future__ import annotations

import math
from typing import get_args

import pytest
import torch

from diffalign.trainers.objectives import (
    DCPO,
    PSO,
    DataLayout,
    DiffusionDPO,
    MaPO,
    PSOHinge,
    PSOOnline,
    RankDPO,
    StepKind,
    current_ranks,
    error_to_odds,
    ndcg,
    objective_entry,
)


def t(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


# --------------------------------------------------------------------------- MaPO


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


# --------------------------------------------------------------------------- RankDPO


def test_rankdpo_hand_computed_list_of_three() -> None:
    """beta = 4; policy [0.3, 0.5, 0.4], reference [0.4, 0.4, 0.4], labels φ = [1, 0.5, 0].

    s = [-0.1, 0.1, 0.0]; current ranks (lowest s first) r = [1, 3, 2];
    1/D(r) = 1/log2(1 + r) = [1, 0.5, 0.6309297536]
    (0,1): |2 - 1.4142135624| * |1 - 0.5|          = 0.2928932188, -log sig(-2 * -0.2) = log(1+e^-0.4) = 0.5130152524
    (0,2): |2 - 1| * |1 - 0.6309297536|             = 0.3690702464, -log sig(0.2)                      = 0.5981388694
    (1,2): |1.4142135624 - 1| * |0.5 - 0.6309297536| = 0.0542328796, -log sig(-0.2)                     = 0.7981388694
    loss = (0.1502505 + 0.2207537 + 0.0432856) / 0.7161963448 = 0.5784717008
    """
    out = RankDPO(beta=4.0)(t([[0.3, 0.5, 0.4]]), t([[0.4, 0.4, 0.4]]), t([[1.0, 0.5, 0.0]]))
    assert out.loss.item() == pytest.approx(0.5784717008, abs=1e-9)
    assert out.metrics["implicit_acc"].item() == pytest.approx(2 / 3)  # (0,1) and (0,2) right, (1,2) wrong


def test_rankdpo_on_pairs_equals_diffusion_dpo() -> None:
    """k = 2: one pair, its ΔNDCG weight cancels in the normalisation -> exactly Diffusion-DPO (same β)."""
    generator = torch.Generator().manual_seed(0)
    policy = torch.rand(16, 2, generator=generator, dtype=torch.float64).requires_grad_(True)
    reference = torch.rand(16, 2, generator=generator, dtype=torch.float64)
    labels = t([[1.0, 0.0]] * 16)
    rank_out = RankDPO(beta=300.0)(policy, reference, labels)
    (rank_grad,) = torch.autograd.grad(rank_out.loss, policy)
    dpo_out = DiffusionDPO(beta=300.0)(policy, reference)
    (dpo_grad,) = torch.autograd.grad(dpo_out.loss, policy)
    assert rank_out.loss.item() == pytest.approx(dpo_out.loss.item(), rel=1e-12)
    assert torch.allclose(rank_grad, dpo_grad, rtol=1e-12, atol=0)
    assert rank_out.metrics["implicit_acc"].item() == pytest.approx(dpo_out.metrics["implicit_acc"].item())
    no_scores = RankDPO(beta=300.0)(policy, reference)  # JSONL pairs carry no scores: winner 1, loser 0
    assert no_scores.loss.item() == pytest.approx(dpo_out.loss.item(), rel=1e-12)


def test_rankdpo_groups_without_preference_are_left_out() -> None:
    """A group with equal label scores has no label-ordered pair: the loss is the other group's alone."""
    policy, reference = t([[0.3, 0.5], [0.1, 0.9]]), t([[0.4, 0.4], [0.4, 0.4]])
    both = RankDPO(beta=2.0)(policy, reference, t([[1.0, 0.0], [0.5, 0.5]]))
    first = RankDPO(beta=2.0)(policy[:1], reference[:1], t([[1.0, 0.0]]))
    assert both.loss.item() == pytest.approx(first.loss.item(), abs=1e-12)


def test_rankdpo_weights_follow_current_ranks_and_ndcg_is_one_when_ordered() -> None:
    assert current_ranks(t([[0.2, -0.1, 0.0]])).tolist() == [[3.0, 1.0, 2.0]]
    assert current_ranks(t([[0.0, 0.0, 0.0]])).tolist() == [[1.0, 2.0, 3.0]]  # ties keep list order
    labels = t([[1.0, 2 / 3, 1 / 3, 0.0]])
    assert ndcg(labels, t([[1.0, 2.0, 3.0, 4.0]])).item() == pytest.approx(1.0)
    assert ndcg(labels, t([[4.0, 3.0, 2.0, 1.0]])).item() < 0.8


def test_rankdpo_needs_scores_beyond_pairs() -> None:
    with pytest.raises(ValueError, match="label scores"):
        RankDPO(beta=1.0)(t([[0.1, 0.2, 0.3]]), t([[0.1, 0.2, 0.3]]))


# --------------------------------------------------------------------------- DCPO


def test_dcpo_loss_is_diffusion_dpo_on_its_errors_and_requires_captions() -> None:
    policy, reference = t([[0.5, 1.0], [0.9, 0.4]]), t([[0.6, 0.6], [0.3, 0.3]])
    assert DCPO(beta=4.0)(policy, reference).loss.item() == DiffusionDPO(beta=4.0)(policy, reference).loss.item()
    assert objective_entry("dcpo").data == "captioned_pairs"  # rows without per-image captions are skipped
    with pytest.raises(ValueError, match="DCPO"):
        DCPO(beta=4.0)(policy, None)


# --------------------------------------------------------------------------- PSO


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


def test_every_method_is_registered_with_its_own_schema() -> None:
    for name in ("dpo", "mapo", "rankdpo", "dcpo", "pso", "pso-online"):
        entry = objective_entry(name)
        config = entry.config_class()
        assert config.name == name
        objective = entry.build(config)
        assert entry.data in get_args(DataLayout) and entry.step in get_args(StepKind)
        assert (entry.step == "sampled") == (entry.data == "prompts"), "only a sampling method reads prompts alone"
        assert callable(objective)
