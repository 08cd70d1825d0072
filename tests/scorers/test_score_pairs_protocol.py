"""``score-pairs`` says what it did and never reports accuracy on the pairs its threshold was tuned on.

Two sets of pairs: tune on one, report on the other. One set (a single file has no splits): k-fold
cross-validation. The hand example is PickScore's four tuning pairs (logits s0, s1; label_0), with
``|p0 - p1| = tanh(|s0 - s1| / 2)``: A (2, 0) 1: 0.762;  B (0, 1) 0: 0.462;  C (0.1, 0) tie: 0.050;
D (0, 0.3) 1: 0.149. Leave-one-out (4 folds of one pair; no dependence on how pairs are dealt):

* without A, credits over B, C, D: t=0 1.5, t=0.1 2, t=0.2..0.4 2.5 (best, first), t>=0.5 2 -> A at 0.2: 1
* without B, over A, C, D: 1.5, 2, 2.5 (0.2, first of 0.2..0.7), 2 at t>=0.8 -> B at 0.2: predicts image 1: 1
* without C, over A, B, D: 2, 2, 2.5 (0.2), 2, 1.5 -> C at 0.2: 0.050 <= 0.2, a tie on a tie label: 1
* without D, over A, B, C: 2.5, 3 (0.1, first), 3, 2.5, 2 -> D at 0.1: 0.149 > 0.1, predicts image 1: 0

Cross-validated accuracy 3/4, where tuning and reporting on all four pairs claims 3.5/4.
"""

from __future__ import annotations

import argparse
import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from diffalign.apps.score_cli import add_score_parsers
from diffalign.scorers import base
from diffalign.scorers.preference import PairScores, cross_validate_preference, tune_threshold

SCORES = np.array([[2.0, 0.0], [0.0, 1.0], [0.1, 0.0], [0.0, 0.3]])
LABELS = np.array([1.0, 0.0, 0.5, 1.0])


def test_leave_one_out_on_the_hand_example() -> None:
    result = cross_validate_preference(PairScores(list("ABCD"), LABELS, {"s": SCORES}), folds=4)["s"]
    assert result.accuracy == 0.75 and result.folds == 4 and result.pairs == 4
    assert sorted(result.fold_thresholds) == [0.1, 0.2, 0.2, 0.2] and result.threshold == 0.2
    assert result.predicted_ties == 1 and result.label_ties == 1
    in_sample, accuracies = tune_threshold(SCORES, LABELS)
    assert accuracies[in_sample] == 0.875 > result.accuracy  # what tuning on the reported pairs would claim


def test_every_pair_is_held_out_exactly_once_whatever_the_seed() -> None:
    rng = np.random.default_rng(7)
    scores, labels = rng.normal(size=(23, 2)), rng.choice([0.0, 0.5, 1.0], size=23)
    results = [cross_validate_preference(PairScores([str(i) for i in range(23)], labels, {"s": scores}), folds=23, seed=seed)
               for seed in (0, 1)]  # fmt: skip
    assert results[0]["s"].accuracy == results[1]["s"].accuracy  # leave-one-out does not depend on the dealing
    assert len(results[0]["s"].fold_thresholds) == 23


def test_too_few_pairs_or_folds_is_an_error() -> None:
    pairs = PairScores(list("ABCD"), LABELS, {"s": SCORES})
    with pytest.raises(ValueError, match="at least 5 pairs, got 4; lower --folds"):
        cross_validate_preference(pairs, folds=5)
    with pytest.raises(ValueError, match="at least 2 folds"):
        cross_validate_preference(pairs, folds=1)


class _Brightness:
    """mean(pixels) / 10 per image: a grey value of 20 scores 2."""

    name = "brightness"

    def score(self, images, prompts, batch_size=None) -> torch.Tensor:
        return torch.tensor([np.asarray(image, np.float64).mean() / 10 for image in images], dtype=torch.float32)


@pytest.fixture
def brightness(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(base._REGISTRY, "brightness", lambda weights, device, dtype: _Brightness())  # noqa: SLF001


def _pairs(path: Path, pairs: list[tuple[int, int, float]]) -> Path:
    def png(value: int) -> bytes:
        buffer = io.BytesIO()
        Image.new("RGB", (8, 8), (value, value, value)).save(buffer, format="PNG")
        return buffer.getvalue()

    rows = [{"jpg_0": png(a), "jpg_1": png(b), "label_0": l0, "label_1": 1 - l0, "caption": "a cat", "ranking_id": i}
            for i, (a, b, l0) in enumerate(pairs)]  # fmt: skip
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


HAND = [(20, 0, 1.0), (0, 10, 0.0), (1, 0, 0.5), (0, 3, 1.0)]  # the hand example as grey values


def _run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="diffalign")
    add_score_parsers(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.run(args)


def test_one_file_is_cross_validated_and_says_so(tmp_path: Path, brightness, capsys) -> None:
    data, out = _pairs(tmp_path / "pairs.parquet", HAND), tmp_path / "summary.json"
    assert _run(["score-pairs", str(data), "--scorer", "brightness", "--folds", "4", "--no-progress",
                 "--summary-json", str(out)]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert f"one set of pairs ({data}): 4-fold cross-validation on its 4 pairs" in printed
    assert "validation_unique" not in printed and "test_unique" not in printed  # a file has no splits
    assert "brightness: preference accuracy 75.00%" in printed
    summary = json.loads(out.read_text())
    assert summary["protocol"] == "cross-validation" and summary["folds"] == 4 and summary["tune_split"] is None
    assert summary["scorers"]["brightness"]["accuracy"] == 0.75


def test_two_splits_tune_on_one_and_report_on_the_other(tmp_path: Path, brightness, capsys) -> None:
    folder = tmp_path / "pickapic"
    folder.mkdir()
    _pairs(folder / "validation_unique.parquet", HAND)
    _pairs(folder / "test_unique.parquet", [(30, 0, 0.0), (0, 0, 0.5), (10, 0, 0.5), (0, 20, 0.0)])
    assert _run(["score-pairs", str(folder), "--scorer", "brightness", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert (f"threshold tuned on 4 pairs of {folder} [validation_unique], accuracy reported on 4 pairs of "
            f"{folder} [test_unique]") in printed  # fmt: skip
    assert "brightness: preference accuracy 62.50%" in printed  # PickScore's hand example: 0.2 tuned, 2.5/4 on test


def test_the_same_split_named_twice_is_cross_validated(tmp_path: Path, brightness, capsys) -> None:
    folder = tmp_path / "pickapic"
    folder.mkdir()
    _pairs(folder / "validation_unique.parquet", HAND)
    argv = ["score-pairs", str(folder), "--scorer", "brightness", "--tune-split", "validation_unique",
            "--eval-split", "validation_unique", "--folds", "4", "--no-progress"]  # fmt: skip
    assert _run(argv) == 0
    assert "4-fold cross-validation on its 4 pairs" in capsys.readouterr().out


def test_a_given_threshold_is_reported_as_given(tmp_path: Path, brightness, capsys) -> None:
    data = _pairs(tmp_path / "pairs.parquet", HAND)
    assert _run(["score-pairs", str(data), "--scorer", "brightness", "--threshold", "0.2", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert f"threshold 0.2 given (not tuned); accuracy on 4 pairs of {data}" in printed
    assert "preference accuracy 87.50%" in printed  # in-sample at 0.2: the user's choice, and said so
