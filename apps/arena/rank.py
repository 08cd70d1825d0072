"""Rank models from arena votes: win rates, a Bradley-Terry fit with bootstrap intervals, a heatmap.

Bradley-Terry: P(i beats j) = σ(θ_i − θ_j). Each vote is an outcome s ∈ {1, ½, 0} for the
left model; a tie (and "both bad", which says neither is better) counts as half a win each
way, i.e. the log-likelihood term s·logσ(θ_i − θ_j) + (1 − s)·logσ(θ_j − θ_i). The fit is a
maximum a posteriori estimate under a weak N(0, 1/λ) prior (λ = 0.01 by default) so that a
model that never lost gets a finite score instead of a diverging one; scipy's L-BFGS does the
optimisation. Scores are reported on the Elo scale, 1000 + 400·θ/ln 10, centred at mean 0.

Intervals: the votes are resampled with replacement and refitted (percentile bootstrap, 95 %).

Both views a person reads are in rank order: the heatmap's rows and columns follow the
Bradley-Terry scores (best first, so the matrix reads top-left to bottom-right like the table),
and :func:`write_leaderboard_csv` writes the table as CSV for a spreadsheet.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from diffalign.apps.arena.store import LEFT_SCORE
from diffalign.atomic import staged_file

__all__ = ["Outcomes", "LeaderboardRow", "LEADERBOARD_CSV_COLUMNS", "bootstrap_intervals", "fit_bradley_terry",
           "leaderboard", "outcomes", "rank_order", "reordered", "write_heatmap", "write_leaderboard_csv"]

ELO_SCALE = 400.0 / math.log(10.0)
ELO_BASE = 1000.0


@dataclass(frozen=True)
class Outcomes:
    """Votes as index arrays: model ``left[k]`` against ``right[k]`` scored ``score[k]`` ∈ {1, ½, 0}."""

    models: list[str]
    left: np.ndarray
    right: np.ndarray
    score: np.ndarray

    def __len__(self) -> int:
        return len(self.score)


@dataclass(frozen=True)
class LeaderboardRow:
    model: str
    votes: int
    wins: int
    ties: int
    losses: int
    win_rate: float  # (wins + ties/2) / votes
    score: float  # Bradley-Terry, Elo scale
    low: float  # 95 % bootstrap interval of score
    high: float


def outcomes(votes: Iterable[tuple[str, str, str]], models: Sequence[str] | None = None) -> Outcomes:
    """``(left_model, right_model, choice)`` triples as index arrays over ``models`` (default: those seen)."""
    triples = list(votes)
    names = list(models) if models is not None else sorted({m for t in triples for m in t[:2]})
    index = {name: k for k, name in enumerate(names)}
    left = np.array([index[t[0]] for t in triples], dtype=np.int64)
    right = np.array([index[t[1]] for t in triples], dtype=np.int64)
    score = np.array([LEFT_SCORE[t[2]] for t in triples], dtype=np.float64)
    return Outcomes(names, left, right, score)


def fit_bradley_terry(data: Outcomes, prior: float = 0.01) -> np.ndarray:
    """Log-strengths θ [M], mean 0, maximising the tie-as-half likelihood plus the N(0, 1/prior) prior."""
    from scipy.optimize import minimize

    m = len(data.models)
    if m == 0:
        return np.zeros(0)

    def objective(theta: np.ndarray) -> tuple[float, np.ndarray]:
        diff = theta[data.left] - theta[data.right]
        # -[s logσ(d) + (1-s) logσ(-d)] = softplus(d) - s·d, computed stably.
        nll = np.sum(np.logaddexp(0.0, diff) - data.score * diff) + 0.5 * prior * theta @ theta
        residual = 1.0 / (1.0 + np.exp(-diff)) - data.score  # d nll / d diff
        grad = np.bincount(data.left, residual, m) - np.bincount(data.right, residual, m) + prior * theta
        return float(nll), grad

    result = minimize(objective, np.zeros(m), jac=True, method="L-BFGS-B", options={"maxiter": 1000, "gtol": 1e-9})
    theta = result.x
    return theta - theta.mean()


def bootstrap_intervals(
    data: Outcomes, rounds: int = 200, seed: int = 0, prior: float = 0.01, level: float = 0.95
) -> tuple[np.ndarray, np.ndarray]:
    """Percentile bootstrap of θ over resampled votes: ``(low [M], high [M])``."""
    rng = np.random.default_rng(seed)
    n = len(data)
    if n == 0:
        zeros = np.zeros(len(data.models))
        return zeros, zeros
    fits = np.empty((rounds, len(data.models)))
    for r in range(rounds):
        pick = rng.integers(0, n, n)
        fits[r] = fit_bradley_terry(Outcomes(data.models, data.left[pick], data.right[pick], data.score[pick]), prior)
    tail = (1.0 - level) / 2.0 * 100.0
    return np.percentile(fits, tail, axis=0), np.percentile(fits, 100.0 - tail, axis=0)


def pairwise_win_rates(data: Outcomes) -> tuple[np.ndarray, np.ndarray]:
    """``(rate [M, M], games [M, M])``: rate[i, j] = i's share of points against j (NaN without games)."""
    m = len(data.models)
    points = np.zeros((m, m))
    games = np.zeros((m, m))
    np.add.at(points, (data.left, data.right), data.score)
    np.add.at(points, (data.right, data.left), 1.0 - data.score)
    np.add.at(games, (data.left, data.right), 1.0)
    np.add.at(games, (data.right, data.left), 1.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        rate = np.where(games > 0, points / np.maximum(games, 1), np.nan)
    return rate, games


def leaderboard(data: Outcomes, rounds: int = 200, seed: int = 0, prior: float = 0.01) -> list[LeaderboardRow]:
    """One row per model, best Bradley-Terry score first."""
    theta = fit_bradley_terry(data, prior)
    low, high = bootstrap_intervals(data, rounds, seed, prior)
    rows = []
    for k, model in enumerate(data.models):
        as_left, as_right = data.left == k, data.right == k
        mine = np.concatenate([data.score[as_left], 1.0 - data.score[as_right]])
        wins, losses = int(np.sum(mine == 1.0)), int(np.sum(mine == 0.0))
        rows.append(
            LeaderboardRow(
                model, len(mine), wins, len(mine) - wins - losses, losses,
                float(mine.mean()) if len(mine) else float("nan"),
                ELO_BASE + ELO_SCALE * float(theta[k]), ELO_BASE + ELO_SCALE * float(low[k]),
                ELO_BASE + ELO_SCALE * float(high[k]),
            )
        )
    return sorted(rows, key=lambda row: -row.score)


def rank_order(data: Outcomes, prior: float = 0.01) -> list[str]:
    """The models best first by Bradley-Terry score (ties in score keep the models' order)."""
    theta = fit_bradley_terry(data, prior)
    return [data.models[k] for k in sorted(range(len(data.models)), key=lambda k: -theta[k])]


def reordered(data: Outcomes, order: Sequence[str]) -> Outcomes:
    """The same votes indexed over ``order`` (a permutation of ``data.models``)."""
    if sorted(order) != sorted(data.models):
        raise ValueError(f"order {list(order)} is not a permutation of the models {data.models}")
    position = np.array([list(order).index(model) for model in data.models], dtype=np.int64)
    return Outcomes(list(order), position[data.left], position[data.right], data.score)


def write_heatmap(data: Outcomes, path: str | Path, order: Sequence[str] | None = None) -> Path:
    """A PNG of the pairwise win-rate matrix (row model's share of points against the column model).

    Rows and columns follow ``order`` (default :func:`rank_order`: best first).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = reordered(data, order if order is not None else rank_order(data))
    rate, games = pairwise_win_rates(data)
    m = len(data.models)
    size = max(3.0, 0.9 * m + 2.0)
    figure, axes = plt.subplots(figsize=(size + 1.0, size))
    image = axes.imshow(np.ma.masked_invalid(rate), vmin=0.0, vmax=1.0, cmap="RdBu")
    axes.set_xticks(range(m), data.models, rotation=45, ha="right")
    axes.set_yticks(range(m), data.models)
    for i in range(m):
        for j in range(m):
            if games[i, j] > 0:
                axes.text(j, i, f"{rate[i, j]:.2f}\n({int(games[i, j])})", ha="center", va="center", fontsize=8)
    axes.set_title("win rate of row model vs column model (votes), best first")
    figure.colorbar(image, ax=axes, fraction=0.046)
    figure.tight_layout()
    path = Path(path)
    with staged_file(path) as temporary:
        figure.savefig(temporary, format="png", dpi=100)
    plt.close(figure)
    return path


LEADERBOARD_CSV_COLUMNS = ["rank", "model", "score", "interval_low", "interval_high", "votes", "wins", "ties", "losses",
                           "win_rate"]


def write_leaderboard_csv(rows: Sequence[LeaderboardRow], path: str | Path) -> Path:
    """The leaderboard as CSV (:data:`LEADERBOARD_CSV_COLUMNS`; ranks follow ``rows``' order), written atomically.

    Scores and the 95 % interval are on the Elo scale, rounded to 0.1; the win rate to 4 decimals.
    """
    path = Path(path)
    with staged_file(path) as temporary:
        with temporary.open("w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(LEADERBOARD_CSV_COLUMNS)
            for rank, row in enumerate(rows, start=1):
                writer.writerow([rank, row.model, f"{row.score:.1f}", f"{row.low:.1f}", f"{row.high:.1f}", row.votes,
                                 row.wins, row.ties, row.losses, f"{row.win_rate:.4f}"])
    return path
