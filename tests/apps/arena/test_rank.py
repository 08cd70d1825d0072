"""Ranking arena votes: win rates by hand, Bradley-Terry recovers known strengths, intervals narrow with votes."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest
from PIL import Image

from diffalign.apps.arena.rank import (
    ELO_BASE,
    ELO_SCALE,
    LEADERBOARD_CSV_COLUMNS,
    bootstrap_intervals,
    fit_bradley_terry,
    leaderboard,
    outcomes,
    pairwise_win_rates,
    rank_order,
    reordered,
    write_heatmap,
    write_leaderboard_csv,
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


def test_heatmap_rows_and_columns_follow_the_rank(tmp_path):
    """Names sorted alphabetically (a, b, c) but c beats b beats a: the heatmap's order is c, b, a."""
    votes = [("c", "b", "left")] * 6 + [("b", "a", "left")] * 6 + [("a", "c", "right")] * 6 + [("a", "b", "left")] * 2
    data = outcomes(votes)
    assert data.models == ["a", "b", "c"]
    assert rank_order(data) == ["c", "b", "a"]
    ranked = reordered(data, rank_order(data))
    rate, games = pairwise_win_rates(ranked)
    assert ranked.models == ["c", "b", "a"]
    assert rate[0, 1] == pytest.approx(1.0) and rate[1, 2] == pytest.approx(6 / 8) and games[1, 2] == 8
    assert np.all(np.nan_to_num(rate[np.triu_indices(3, 1)]) > 0.5), "above the diagonal: the better model wins"
    with pytest.raises(ValueError, match="not a permutation"):
        reordered(data, ["a", "b"])
    assert write_heatmap(data, tmp_path / "h.png").is_file()
    with pytest.raises(ValueError, match="not a permutation"):
        write_heatmap(data, tmp_path / "h.png", order=["c"])


def test_leaderboard_csv_columns_and_rows(tmp_path):
    votes = [("A", "B", "left")] * 3 + [("B", "A", "tie")] + [("C", "A", "right")] * 2
    rows = leaderboard(outcomes(votes), rounds=20)
    path = write_leaderboard_csv(rows, tmp_path / "board.csv")
    with path.open(newline="", encoding="utf-8") as handle:
        table = list(csv.reader(handle))
    assert table[0] == LEADERBOARD_CSV_COLUMNS
    by_model = {row[1]: dict(zip(table[0], row)) for row in table[1:]}
    assert [row[0] for row in table[1:]] == ["1", "2", "3"] and table[1][1] == "A"
    assert (by_model["A"]["votes"], by_model["A"]["wins"], by_model["A"]["ties"], by_model["A"]["losses"]) == (
        "6", "5", "1", "0")
    assert by_model["A"]["win_rate"] == f"{5.5 / 6:.4f}"
    for row in by_model.values():
        assert float(row["interval_low"]) <= float(row["score"]) <= float(row["interval_high"])
    assert not list(tmp_path.glob(".*tmp*")), "written under a temporary name, then renamed"


def test_arena_leaderboard_on_a_store_ranks_the_known_winner_first(toy_arena_sources, tmp_path):
    """Votes where truth beats degraded beats wrong-colour, whatever the sides: table, CSV and heatmap agree."""
    from diffalign.apps.arena.cli import build_arena

    strength = {"truth": 2, "degraded": 1, "wrong-colour": 0}
    arena = build_arena([str(p) for p in toy_arena_sources.values()], tmp_path / "votes.sqlite", seed=0,
                        bootstrap_rounds=20)
    for session in range(6):  # under the suspicion rules' 10 votes a session: no session is judged
        for _ in range(8):
            issued = arena.issue(f"session-{session}")
            left, right = issued.showing.left.model, issued.showing.right.model
            choice = "left" if strength[left] > strength[right] else "right"
            assert arena.vote(f"session-{session}", issued.token, choice).accepted
    table, heatmap, summary = arena.leaderboard()
    assert [row[1] for row in table] == ["truth", "degraded", "wrong-colour"]
    assert "48 votes" in summary and heatmap is not None and arena.heatmap_path.is_file()
    with arena.leaderboard_csv.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert [(row["rank"], row["model"]) for row in rows] == [("1", "truth"), ("2", "degraded"), ("3", "wrong-colour")]
    assert sum(int(row["votes"]) for row in rows) == 2 * 48
    assert arena.leaderboard_csv.name == "votes.leaderboard.csv"
    arena.store.close()
