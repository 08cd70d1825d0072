"""``diffalign score`` (score a folder of images) and ``diffalign score-pairs`` (PickScore's preference accuracy).

Wired into ``apps/cli.py`` with ``add_score_parsers(commands)``; each handler is set as
``run`` and returns the exit status. Bad arguments (unknown scorer, bad layout, bad
option) print one line and return 2; ``cli.main`` does the same for missing files.

``--scorer NAME[=WEIGHTS]``: a registered scorer (``diffalign.scorers.available_scorers()``)
with weights from a hub id or a local folder (default: the reference weights). Loader
options go through ``--scorer-option NAME:KEY=VALUE``, e.g. ``aesthetic:head=ava.pth``;
values are read as JSON when they parse (``batch_size=8`` is an int), else as text.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from diffalign.apps.output import show_progress
from diffalign.dtypes import DTYPE_NAMES

if TYPE_CHECKING:
    from diffalign.scorers.base import Scorer

__all__ = ["ScorerSpec", "add_score_parsers", "parse_scorer_specs"]


@dataclass
class ScorerSpec:
    """One ``--scorer``: registry name, weights (None: the scorer's default), loader options, table column."""

    name: str
    weights: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    column: str = ""


def _option_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_scorer_specs(scorers: list[str], options: list[str] | None = None) -> list[ScorerSpec]:
    """``["pickscore", "clipscore=/w"]`` + ``["clipscore:processor=/p"]`` -> specs with unique column names.

    A column is the scorer's name; a name given twice (two weights) is told apart by its full spec.
    """
    specs = []
    for text in scorers:
        name, _, weights = text.partition("=")
        if not name:
            raise ValueError(f"--scorer {text!r}: expected NAME or NAME=WEIGHTS")
        specs.append(ScorerSpec(name, weights or None, column=name))
    for text in options or []:
        # NAME may hold a colon itself (openclip:ViT-H-14:batch_size=8): KEY follows the last colon before "=".
        head, equals, value = text.partition("=")
        target, _, key = head.rpartition(":")
        if not target or not key or not equals:
            raise ValueError(f"--scorer-option {text!r}: expected NAME:KEY=VALUE")
        matching = [s for s in specs if s.name == target]
        if not matching:
            raise ValueError(f"--scorer-option {text!r}: no --scorer named {target!r}")
        for spec in matching:
            spec.options[key] = _option_value(value)
    names = [s.name for s in specs]
    for spec in specs:
        if names.count(spec.name) > 1:
            spec.column = spec.name if spec.weights is None else f"{spec.name}={spec.weights}"
    columns = [s.column for s in specs]
    if len(set(columns)) != len(columns):
        raise ValueError(f"--scorer given twice with the same weights: {columns}")
    return specs


def _load_scorers(specs: list[ScorerSpec], device: str | None, dtype: str) -> dict[str, Scorer]:
    """Load every scorer once (``--device`` default: cuda when available, else cpu)."""
    import torch
    from diffalign.scorers import load_scorer

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    scorers = {}
    for spec in specs:
        try:
            scorers[spec.column] = load_scorer(spec.name, spec.weights, device=device, dtype=dtype, **spec.options)
        except TypeError as error:  # unknown loader option
            raise ValueError(f"--scorer {spec.name}: {error}") from error
    return scorers


def _write_json(path: str, payload: dict[str, Any]) -> None:
    """Write ``payload`` under a temporary name, then rename: a reader never sees half a file."""
    from diffalign.atomic import staged_file

    with staged_file(path) as temporary:
        temporary.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")


def _check_outputs(paths: dict[str, str | None]) -> None:
    """Every output file given can be written: found before the scorers load, not after the scoring."""
    from diffalign.writable import check_writable

    for option, path in paths.items():
        if path is not None:
            check_writable(path, option, "file")


def _fail(command: str, error: Exception) -> int:
    message = error.args[0] if isinstance(error, KeyError) and error.args else error
    print(f"diffalign {command}: error: {message}", file=sys.stderr)
    return 2


def _score(args: argparse.Namespace) -> int:
    """Collect (image, prompt) items, score them in one pass, write the table, print the summary."""
    from diffalign.scorers.folder import (
        collect_items,
        score_items,
        summarize,
        write_table,
    )

    from diffalign.data.report import SkipReport

    report = SkipReport()
    try:
        if args.out is not None and Path(args.out).suffix.lower() not in (".parquet", ".csv", ".jsonl"):
            raise ValueError(f"--out {args.out}: use a .parquet, .csv or .jsonl file")
        _check_outputs({"--out": args.out, "--summary-json": args.summary_json})
        specs = parse_scorer_specs(args.scorer, args.scorer_option)
        found = collect_items(
            args.folder, layout=args.layout, manifest=args.manifest, prompts_dir=args.prompts_dir, report=report
        )
        scorers = _load_scorers(specs, args.device, args.dtype)
        table = score_items(
            found.items, scorers, batch_size=args.batch_size, report=report,
            source=found.root.name or str(found.root), layout=found.layout, progress=show_progress(not args.no_progress),
        )  # fmt: skip
    except (ValueError, KeyError) as error:
        return _fail("score", error)
    if args.out is not None:
        print(f"wrote {write_table(table, args.out)}")
    summary = summarize(table)
    print(f"layout {found.layout}: {len(table.items)} images scored")
    print(summary.format())
    print(report.summary())
    if args.summary_json is not None:
        _write_json(
            args.summary_json,
            {"layout": found.layout, "images": len(table.items), **summary.to_dict(), "skipped": report.to_dict()},
        )
    return 0


def _describe(path: str, split: str) -> str:
    """How to name the pairs read: a single file has no splits, so only a folder or hub id names its split."""
    return str(path) if Path(path).expanduser().is_file() else f"{path} [{split}]"


def _shared_rows(first: Any, second: Any) -> int:
    """How many row ids two opened sources share (row ids name their file or split, so different data share none)."""
    ids = {first.row_id(i) for i in range(len(first))}
    return sum(second.row_id(i) in ids for i in range(len(second)))


def _score_pairs(args: argparse.Namespace) -> int:
    """Report preference accuracy honestly: tuned on other pairs, k-fold cross-validated, or at a given threshold.

    Two sets of pairs that share no row: tune on one, report on the other (PickScore's protocol). One set
    (a single file, or --tune-split/--tune-data naming the same rows): k-fold cross-validation, so no pair
    is scored by a threshold chosen on it. Rows shared only in part are refused: that would leak.
    """
    from diffalign.scorers.preference import cross_validate_preference, evaluate_preference, score_pairs

    from diffalign.data.report import SkipReport
    from diffalign.data.sources import open_preference_source

    reports = {"tune": SkipReport(), "eval": SkipReport()}
    eval_where = _describe(args.data, args.eval_split)
    tune_where = _describe(args.tune_data or args.data, args.tune_split)
    try:
        specs = parse_scorer_specs(args.scorer, args.scorer_option)
        _check_outputs({"--summary-json": args.summary_json})
        candidates = [float(t) for t in args.thresholds.split(",")]

        def open_split(path: str, split: str, which: str) -> Any:
            return open_preference_source(
                path, split=split, drop_ties=False, max_rows=args.max_pairs, report=reports[which]
            )

        eval_source = open_split(args.data, args.eval_split, "eval")
        tune_source, protocol = None, "given"
        if args.threshold is None:
            tune_source, protocol = open_split(args.tune_data or args.data, args.tune_split, "tune"), "split"
            shared = _shared_rows(tune_source, eval_source)
            if shared and shared == len(eval_source) == len(tune_source):
                tune_source, protocol = None, "cross-validation"
            elif shared:
                raise ValueError(
                    f"the tuning pairs ({tune_where}) and the evaluation pairs ({eval_where}) share {shared} rows: "
                    "give disjoint splits (--tune-split/--eval-split, --tune-data), or one set of pairs alone to "
                    "cross-validate on it"
                )
        scorers = _load_scorers(specs, args.device, args.dtype)
        options = {"batch_size": args.batch_size, "progress": show_progress(not args.no_progress)}
        tune = None if tune_source is None else score_pairs(tune_source, scorers, report=reports["tune"], **options)
        evaluated = score_pairs(eval_source, scorers, report=reports["eval"], **options)
        scale = {"candidates": candidates, "logit_scale": args.logit_scale}
        if protocol == "cross-validation":
            results = cross_validate_preference(evaluated, args.folds, **scale)
        else:
            results = evaluate_preference(evaluated, tune, threshold=args.threshold, **scale)
    except (ValueError, KeyError) as error:
        return _fail("score-pairs", error)
    pairs = len(evaluated.labels)
    if protocol == "split":
        print(f"score-pairs: threshold tuned on {len(tune.labels)} pairs of {tune_where}, "  # type: ignore[union-attr]
              f"accuracy reported on {pairs} pairs of {eval_where}")
    elif protocol == "cross-validation":
        print(f"score-pairs: one set of pairs ({eval_where}): {args.folds}-fold cross-validation on its {pairs} pairs "
              f"(each fold scored at a threshold tuned on the other {args.folds - 1} folds)")
    else:
        print(f"score-pairs: threshold {args.threshold:g} given (not tuned); accuracy on {pairs} pairs of {eval_where}")
    for column, result in results.items():
        counts = f"{result.pairs} pairs, {result.label_ties} tied labels, {result.predicted_ties} predicted ties"
        if protocol == "split":
            how = f"threshold {result.threshold:g} tuned on {tune_where} (accuracy there {result.tune_accuracy:.2%})"
        elif protocol == "cross-validation":
            how = (f"fold thresholds {', '.join(f'{t:g}' for t in result.fold_thresholds)} "
                   f"(mean tuning accuracy {result.tune_accuracy:.2%})")
        else:
            how = f"threshold {result.threshold:g} given"
        print(f"{column}: preference accuracy {result.accuracy:.2%} ({counts}); {how}")
        if protocol == "split":
            print("  " + ", ".join(f"{t:g}: {a:.2%}" for t, a in result.tune_accuracies.items()))
    for which, report in reports.items():
        if tune_source is not None or which == "eval":
            print(f"{which}: {report.summary()}")
    if args.summary_json is not None:
        _write_json(
            args.summary_json,
            {
                "protocol": protocol,
                "eval_data": eval_where,
                "eval_split": args.eval_split,
                "tune_data": tune_where if protocol == "split" else None,
                "tune_split": args.tune_split if protocol == "split" else None,
                "folds": args.folds if protocol == "cross-validation" else None,
                "logit_scale": args.logit_scale,
                "scorers": {column: result.to_dict() for column, result in results.items()},
                "skipped": {which: report.to_dict() for which, report in reports.items()},
            },
        )
    return 0


def _add_scorer_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--scorer", action="append", required=True, metavar="NAME[=WEIGHTS]",
        help="a registered scorer (clipscore, clipscore-100, pickscore, aesthetic, ...), weights a hub id or a "
        "local folder; repeat to score with several in one pass",
    )  # fmt: skip
    parser.add_argument(
        "--scorer-option", action="append", default=[], metavar="NAME:KEY=VALUE",
        help="a loader option of one scorer, e.g. aesthetic:head=sac+logos+ava1-l14-linearMSE.pth",
    )  # fmt: skip
    parser.add_argument("--batch-size", type=int, default=32, help="images per forward")
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--dtype", choices=DTYPE_NAMES, default="fp32", help="scorer weights' dtype")
    parser.add_argument("--summary-json", default=None, metavar="PATH", help="also write the summary as JSON")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (none is drawn when stderr is not a terminal)")


def add_score_parsers(subparsers: Any) -> None:
    """Register ``score`` and ``score-pairs`` on the ``add_subparsers()`` object of the ``diffalign`` parser."""
    score = subparsers.add_parser(
        "score",
        help="score a folder of images with one or several reward models; per-image table and summary",
        description=(
            "Pair every image in DIR with its prompt (a JSONL manifest of {image, prompt} rows, a sidecar .txt per "
            "image, or the HPSv2 benchmark layout DIR/{style}/{idx:05d}.jpg + {style}.json prompt lists), decode "
            "each image once and score it with every --scorer. Images without a prompt and undecodable images are "
            "skipped and listed. With the HPSv2 layout the summary adds the benchmark protocol (per style: mean "
            "and std of the means of chunks of 80 images, x100 for hpsv2 scorers; average over all images)."
        ),
    )
    score.add_argument("folder", metavar="DIR", help="the images (or a .jsonl manifest)")
    _add_scorer_arguments(score)
    score.add_argument("--manifest", default=None, help="JSONL manifest; image paths relative to it")
    score.add_argument(
        "--layout", choices=["auto", "manifest", "sidecar", "hpsv2"], default="auto",
        help="auto: a manifest (--manifest, DIR/manifest.jsonl), else HPSv2 if a {style}.json matches a "
        "subfolder, else sidecar .txt files",
    )  # fmt: skip
    score.add_argument("--prompts-dir", default=None, help="HPSv2 layout: folder of {style}.json (default: DIR)")
    score.add_argument("--out", default=None, metavar="TABLE", help="per-image table: .parquet, .csv or .jsonl")
    score.set_defaults(run=_score)

    pairs = subparsers.add_parser(
        "score-pairs",
        help="PickScore's preference accuracy of reward models on Pick-a-Pic-style pairs",
        description=(
            "Score both images of every pair (ties kept), predict a tie when |p0 - p1| <= threshold with "
            "(p0, p1) = softmax(logit_scale * scores), credit 1 for agreement, 0.5 when exactly one of prediction "
            "and label is a tie, 0 otherwise. The threshold is tuned on --tune-split (unless --threshold) and the "
            "accuracy reported on --eval-split. When both name the same rows (a single file has no splits), the "
            "accuracy is k-fold cross-validated instead (--folds): a threshold never scores the pairs it was tuned on."
        ),
    )
    pairs.add_argument("data", metavar="DATA", help="Pick-a-Pic-style parquet file/folder, save_to_disk folder or JSONL")
    _add_scorer_arguments(pairs)
    pairs.add_argument("--tune-split", default="validation_unique", help="split the threshold is chosen on")
    pairs.add_argument("--eval-split", default="test_unique", help="split the accuracy is reported on")
    pairs.add_argument("--tune-data", default=None, help="tune on this data instead of DATA")
    pairs.add_argument("--threshold", type=float, default=None, help="use this tie threshold (no tuning)")
    pairs.add_argument(
        "--thresholds", default=",".join(f"{t:g}" for t in (i / 10 for i in range(11))),
        help="candidate thresholds, comma-separated (PickScore's: 0,0.1,...,1)",
    )  # fmt: skip
    pairs.add_argument(
        "--logit-scale", type=float, default=1.0,
        help="scores are multiplied by this before the softmax (PickScore's are logits already: 1)",
    )  # fmt: skip
    pairs.add_argument("--max-pairs", type=int, default=None, help="use only the first N pairs of each split")
    pairs.add_argument(
        "--folds", type=int, default=5,
        help="when the tuning and evaluation pairs are the same rows (one file): k of the k-fold cross-validation",
    )  # fmt: skip
    pairs.set_defaults(run=_score_pairs)
