"""Ranking arena votes: win rates by hand, Bradley-Terry recovers known strengths, intervals narrow with votes."""

from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image

from diffalign.apps.arena.rank import (
    ELO_BASE,
    ELO_SCALE,
    bootstrap_intervals,
    fit_bradley_terry,
    leaderboard,
    outcomes,
    pairwise_win_rates,
    write_heatmap,
)


def synthetic_votes(strengths: dict[str, float], n: int, seed: int, tie_rate: float = 0.1):
    """Votes between random model pairs, the left model winning with σ(θ_l − θ_r); some ties."""
    rng = np.random.default_rng(seed)
    names = list(strengths)
    votes = []
    for _ in range(n):
        i, j = rng.choice(len(names), 2, replace=False)
        if rng.random() < tie_rate:
            votes.append((names[i], names[j], "tie"))
            continue
        p = 1.0 / (1.0 + math.exp(-(strengths[names[i]] - strengths[names[j]])))
        votes.append((names[i], names[j], "left" if rng.random() < p else "right"))
    return votes


def test_win_rates_by_hand():
    """A beats B twice, B beats A once, A–C tie, C both-bad vs B (a tie):
    A: 2 + ½ of 4 games = 0.625; B: 1 + ½ of 4 = 0.375; C: ½ + ½ of 2 = 0.5."""
    votes = [("A", "B", "left"), ("B", "A", "right"), ("B", "A", "left"), ("C", "A", "tie"), ("C", "B", "both_bad")]
    data = outcomes(votes)
    rows = {r.model: r for r in leaderboard(data, rounds=20)}
    assert (rows["A"].votes, rows["A"].wins, rows["A"].ties, rows["A"].losses) == (4, 2, 1, 1)
    assert rows["A"].win_rate == pytest.approx(0.625)
    assert rows["B"].win_rate == pytest.approx(0.375)
    assert rows["C"].win_rate == pytest.approx(0.5)
    rate, games = pairwise_win_rates(data)
    a, b = data.models.index("A"), data.models.index("B")
    assert rate[a, b] == pytest.approx(2 / 3) and rate[b, a] == pytest.approx(1 / 3) and games[a, b] == 3


def test_two_models_fit_equals_the_closed_form():
    """With two models and w wins of 3w+... : the MLE (prior → 0) is θ_A − θ_B = log(w_A / w_B)."""
    votes = [("A", "B", "left")] * 30 + [("A", "B", "right")] * 10
    theta = fit_bradley_terry(outcomes(votes), prior=1e-9)
    assert theta[0] - theta[1] == pytest.approx(math.log(3.0), abs=1e-4)
    assert theta.sum() == pytest.approx(0.0, abs=1e-9)


def test_bradley_terry_recovers_known_order_and_intervals_narrow():
    strengths = {"best": 1.5, "good": 0.7, "fair": 0.0, "weak": -0.8, "worst": -1.4}
    widths = []
    for n in (200, 3200):
        data = outcomes(synthetic_votes(strengths, n, seed=n), models=list(strengths))
        theta = fit_bradley_terry(data)
        order = [data.models[k] for k in np.argsort(-theta)]
        if n == 3200:
            assert order == list(strengths), f"recovered order {order}"
        low, high = bootstrap_intervals(data, rounds=100, seed=0)
        assert np.all(low <= theta + 1e-9) and np.all(theta <= high + 1e-9)
        widths.append(float(np.mean(high - low)))
    # 16x the votes: intervals should shrink by about 4x (1/sqrt(n)); demand at least 2.5x.
    assert widths[1] < widths[0] / 2.5, widths


def test_bradley_terry_recovers_strengths_without_ties():
    """Without ties the fit is consistent: 4000 votes put every θ within 0.15 of the truth (centred).
    (Random ties, counted as half a win, pull the scores towards each other: that is the tie model.)"""
    strengths = {"best": 1.5, "good": 0.7, "fair": 0.0, "weak": -0.8, "worst": -1.4}
    data = outcomes(synthetic_votes(strengths, 4000, seed=7, tie_rate=0.0), models=list(strengths))
    truth = np.array(list(strengths.values()))
    assert np.max(np.abs(fit_bradley_terry(data) - (truth - truth.mean()))) < 0.15


def test_undefeated_model_gets_a_finite_score_and_the_board_is_sorted():
    votes = [("A", "B", "left")] * 20 + [("B", "C", "left")] * 5 + [("C", "B", "left")] * 5
    rows = leaderboard(outcomes(votes), rounds=50)
    assert [r.model for r in rows][0] == "A"
    assert all(math.isfinite(r.score) and r.low <= r.score <= r.high for r in rows)
    assert rows[0].score > ELO_BASE > rows[-1].score
    assert ELO_SCALE == pytest.approx(400 / math.log(10))


def test_heatmap_png_is_written(tmp_path):
    data = outcomes(synthetic_votes({"a": 1.0, "b": 0.0, "c": -1.0}, 60, seed=0))
    path = write_heatmap(data, tmp_path / "heatmap.png")
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size[0] > 100
    assert not list(tmp_path.glob(".*tmp*")), "the PNG is written under a temporary name, then renamed"
