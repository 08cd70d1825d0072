"""PickScore's preference-accuracy protocol on Pick-a-Pic-schema pairs.

Kirstain et al. 2023 (Pick-a-Pic), ``trainer/scripts/eval_preference_predictor.py``:

1. For a pair (image 0, image 1) and its caption, ``(p0, p1) = softmax(s0, s1)`` over the
   scorer's two scores. PickScore's scores are ``logit_scale.exp() * cos`` already, so they
   are the logits as they are. For any other scorer the scores are *used as logits too*,
   multiplied by ``logit_scale`` (default 1): a scorer on a small scale (HPSv2's cosine
   ~0.27) gives probabilities near 0.5, and the tuned threshold absorbs that; pass
   ``logit_scale=100`` to put a cosine on CLIP's usual logit scale.
2. Prediction: a tie when ``|p0 - p1| <= threshold``, else the image with the larger p.
3. Credit per pair: **1 when prediction and label agree (a predicted tie on a tied label
   included), 0.5 when exactly one of them is a tie, 0 otherwise** (the reference's
   ``calc_score``: ``label == pred -> 1; "tie" in (label, pred) -> 0.5; else 0``).
   Accuracy = mean credit.
4. The threshold is the candidate with the highest accuracy on one split (candidates
   0, 0.1, ..., 1; the first, i.e. smallest, on equal accuracy, like ``np.argmax``),
   chosen on ``validation_unique`` and reported on ``test_unique`` (70.2% for PickScore).
   With only one set of pairs, tuning and reporting on the same rows would overstate the
   accuracy, so :func:`cross_validate_preference` tunes on k-1 folds and scores the held-out
   fold, k times: every pair is scored by a threshold that never saw it.

Tied labels (``label_0 == 0.5``) are kept here: they are part of the protocol.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from diffalign.data.report import SkipReport
from diffalign.data.types import BadRowError

if TYPE_CHECKING:
    from PIL import Image

    from diffalign.data.sources import PreferenceSource

    from .base import Scorer

__all__ = [
    "PICKSCORE_THRESHOLDS",
    "TIE",
    "PairScores",
    "PreferenceResult",
    "cross_validate_preference",
    "evaluate_preference",
    "pair_credits",
    "pair_probabilities",
    "predict_pairs",
    "preference_accuracy",
    "score_pairs",
    "tune_threshold",
]

PICKSCORE_THRESHOLDS: tuple[float, ...] = tuple(i / 10 for i in range(11))  # the reference's candidates
TIE = 0.5  # label_0 of a tie; 1.0: image 0 preferred, 0.0: image 1 preferred


def pair_probabilities(scores: np.ndarray, logit_scale: float = 1.0) -> np.ndarray:
    """``[N, 2]`` scores -> ``[N, 2]`` ``softmax(logit_scale * scores)`` per pair (float64)."""
    logits = np.asarray(scores, dtype=np.float64) * logit_scale
    if logits.ndim != 2 or logits.shape[1] != 2:
        raise ValueError(f"expected scores of shape [N, 2], got {logits.shape}")
    logits = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(logits)
    return exp / exp.sum(axis=1, keepdims=True)


def predict_pairs(probs: np.ndarray, threshold: float) -> np.ndarray:
    """``[N, 2]`` probabilities -> ``[N]`` predicted ``label_0``: TIE when ``|p0 - p1| <= threshold``."""
    p0, p1 = probs[:, 0], probs[:, 1]
    return np.where(np.abs(p1 - p0) <= threshold, TIE, np.where(p0 > p1, 1.0, 0.0))


def pair_credits(predicted: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """``[N]`` credits: 1 on agreement (tie-tie too), 0.5 when exactly one side is a tie, else 0."""
    predicted, labels = np.asarray(predicted, np.float64), np.asarray(labels, np.float64)
    one_tie = (predicted == TIE) | (labels == TIE)
    return np.where(predicted == labels, 1.0, np.where(one_tie, 0.5, 0.0))


def preference_accuracy(
    scores: np.ndarray, labels: np.ndarray, threshold: float, logit_scale: float = 1.0
) -> float:
    """Mean credit of the pairs at ``threshold`` (NaN for no pairs)."""
    if len(labels) == 0:
        return float("nan")
    predicted = predict_pairs(pair_probabilities(scores, logit_scale), threshold)
    return float(pair_credits(predicted, labels).mean())


def tune_threshold(
    scores: np.ndarray,
    labels: np.ndarray,
    candidates: Sequence[float] = PICKSCORE_THRESHOLDS,
    logit_scale: float = 1.0,
) -> tuple[float, dict[float, float]]:
    """The candidate with the highest accuracy (the first on equal accuracy) and every candidate's accuracy."""
    if not candidates:
        raise ValueError("tune_threshold needs at least one candidate threshold")
    if len(labels) == 0:
        raise ValueError("cannot tune the tie threshold on zero pairs")
    accuracies = {float(t): preference_accuracy(scores, labels, t, logit_scale) for t in candidates}
    best = next(iter(accuracies))
    for candidate, accuracy in accuracies.items():
        if accuracy > accuracies[best]:  # strictly: the first of equal accuracies wins, as np.argmax
            best = candidate
    return best, accuracies


# -- scoring pairs ----------------------------------------------------------------------------


@dataclass
class PairScores:
    """Scores of every usable pair: ``labels`` ``[N]`` (label_0 of the pair as stored), ``scores[name]`` ``[N, 2]``.

    Readers give groups winner first, so a stored pair's image 0 is the winner (label 1.0)
    or, for a tie, the original image 0 (label 0.5). The protocol is symmetric in the two
    images, so this order gives the same accuracy as the dataset's.
    """

    row_ids: list[str]
    labels: np.ndarray
    scores: dict[str, np.ndarray]


def _pair_label(scores: Sequence[float] | None) -> float:
    if scores is not None and scores[0] == scores[1]:
        return TIE
    return 1.0  # winner first


def score_pairs(
    source: PreferenceSource,
    scorers: Mapping[str, Scorer],
    *,
    batch_size: int = 32,
    report: SkipReport,
    progress: bool = True,
) -> PairScores:
    """Decode each pair once and score both images (same caption) with every scorer, ``batch_size`` images a call.

    Open the source with ``drop_ties=False``; undecodable rows are reported and left out.
    """
    from tqdm.auto import tqdm

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    row_ids: list[str] = []
    labels: list[float] = []
    parts: dict[str, list[np.ndarray]] = {name: [] for name in scorers}
    images: list[Image.Image] = []
    prompts: list[str] = []

    def flush() -> None:
        for name, scorer in scorers.items():
            values = scorer.score(images, prompts, batch_size=batch_size)
            parts[name].append(values.detach().float().cpu().numpy().reshape(-1, 2))
        images.clear()
        prompts.clear()

    for index in tqdm(range(len(source)), unit="pair", disable=not progress, desc="scoring pairs"):
        try:
            group = source.load(index)
        except BadRowError as error:
            report.record(error.source, error.row_id, error.reason)
            continue
        if len(group.images) != 2:
            raise ValueError(f"{source.name}: row {group.row_id} has {len(group.images)} images, expected a pair")
        row_ids.append(group.row_id)
        labels.append(_pair_label(group.scores))
        images.extend(group.images)
        prompts.extend([group.prompt, group.prompt])
        if len(images) >= batch_size:
            flush()
    if images:
        flush()
    scores = {name: np.concatenate(p) if p else np.zeros((0, 2), np.float32) for name, p in parts.items()}
    return PairScores(row_ids, np.asarray(labels, dtype=np.float64), scores)


@dataclass
class PreferenceResult:
    """One scorer's result: the threshold (tuned or given) and the accuracy on the evaluation split."""

    threshold: float
    accuracy: float
    pairs: int
    label_ties: int
    predicted_ties: int
    tuned: bool
    tune_accuracy: float | None = None
    tune_pairs: int | None = None
    tune_accuracies: dict[float, float] = field(default_factory=dict)
    folds: int | None = None  # k-fold cross-validation: the threshold of each fold, tuned on the other folds
    fold_thresholds: list[float] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["tune_accuracies"] = {str(k): v for k, v in self.tune_accuracies.items()}
        return out


def evaluate_preference(
    eval_pairs: PairScores,
    tune_pairs: PairScores | None = None,
    *,
    threshold: float | None = None,
    candidates: Sequence[float] = PICKSCORE_THRESHOLDS,
    logit_scale: float = 1.0,
) -> dict[str, PreferenceResult]:
    """Per scorer: tune the threshold on ``tune_pairs`` (unless ``threshold`` is given), report on ``eval_pairs``."""
    if threshold is None and tune_pairs is None:
        raise ValueError("give either a threshold or pairs to tune it on")
    results = {}
    for name, scores in eval_pairs.scores.items():
        tuned, accuracies = threshold is None, {}
        chosen = threshold
        if chosen is None:
            assert tune_pairs is not None
            chosen, accuracies = tune_threshold(tune_pairs.scores[name], tune_pairs.labels, candidates, logit_scale)
        predicted = predict_pairs(pair_probabilities(scores, logit_scale), chosen) if len(scores) else np.zeros(0)
        results[name] = PreferenceResult(
            threshold=float(chosen),
            accuracy=preference_accuracy(scores, eval_pairs.labels, chosen, logit_scale),
            pairs=len(eval_pairs.labels),
            label_ties=int((eval_pairs.labels == TIE).sum()),
            predicted_ties=int((predicted == TIE).sum()),
            tuned=tuned,
            tune_accuracy=accuracies[chosen] if tuned else None,
            tune_pairs=len(tune_pairs.labels) if tuned and tune_pairs is not None else None,
            tune_accuracies=accuracies,
        )
    return results


def cross_validate_preference(
    pairs: PairScores,
    folds: int = 5,
    *,
    candidates: Sequence[float] = PICKSCORE_THRESHOLDS,
    logit_scale: float = 1.0,
    seed: int = 0,
) -> dict[str, PreferenceResult]:
    """Per scorer: k-fold cross-validated accuracy on one set of pairs (no pair is scored by a threshold tuned on it).

    Pairs are dealt into ``folds`` folds by a permutation seeded with ``seed`` (sizes differ by at most
    one). For each fold the threshold is tuned on the other folds and the fold's pairs are credited at
    it; the accuracy is the mean credit over all pairs. ``threshold`` is the fold threshold chosen most
    often (the smallest on a tie), ``tune_accuracy`` the mean of the folds' tuning accuracies.
    """
    n = len(pairs.labels)
    if folds < 2:
        raise ValueError(f"cross-validation needs at least 2 folds, got {folds}")
    if n < folds:
        raise ValueError(f"{folds}-fold cross-validation needs at least {folds} pairs, got {n}; lower --folds")
    assignment = np.empty(n, dtype=np.int64)
    for fold, members in enumerate(np.array_split(np.random.default_rng(seed).permutation(n), folds)):
        assignment[members] = fold
    results = {}
    for name, scores in pairs.scores.items():
        credits, predicted, thresholds, tune_accuracies = np.zeros(n), np.zeros(n), [], []
        for fold in range(folds):
            held_out, rest = assignment == fold, assignment != fold
            chosen, accuracies = tune_threshold(scores[rest], pairs.labels[rest], candidates, logit_scale)
            predicted[held_out] = predict_pairs(pair_probabilities(scores[held_out], logit_scale), chosen)
            credits[held_out] = pair_credits(predicted[held_out], pairs.labels[held_out])
            thresholds.append(float(chosen))
            tune_accuracies.append(accuracies[chosen])
        counts = {t: thresholds.count(t) for t in sorted(set(thresholds))}
        results[name] = PreferenceResult(
            threshold=max(counts, key=lambda t: (counts[t], -t)),
            accuracy=float(credits.mean()),
            pairs=n,
            label_ties=int((pairs.labels == TIE).sum()),
            predicted_ties=int((predicted == TIE).sum()),
            tuned=True,
            tune_accuracy=float(np.mean(tune_accuracies)),
            folds=folds,
            fold_thresholds=thresholds,
        )
    return results
