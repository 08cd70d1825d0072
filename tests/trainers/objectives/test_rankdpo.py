"""RankDPO on hand-computed numbers, its reduction to Diffusion-DPO on pairs, and its DCG weights.

Each value's arithmetic is in the test's docstring (errors float64, so hand values hold to 1e-9).
softplus(-z) = -log sigmoid(z) = log(1 + e^-z).
"""

from __future__ import annotations

import pytest
import torch

from diffalign.trainers.objectives import DiffusionDPO, RankDPO, current_ranks, ndcg


def t(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


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
