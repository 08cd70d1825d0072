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
        specs = parse_scorer_specs(args.scorer, args.scorer_option)
        found = collect_items(
            args.folder, layout=args.layout, manifest=args.manifest, prompts_dir=args.prompts_dir, report=report
        )
        scorers = _load_scorers(specs, args.device, args.dtype)
        table = score_items(
            found.items, scorers, batch_size=args.batch_size, report=report,
            source=found.root.name or str(found.root), layout=found.layout, progress=not args.no_progress,
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


def _score_pairs(args: argparse.Namespace) -> int:
    """Tune the tie threshold on one split (unless ``--threshold``), report preference accuracy on another."""
    from diffalign.scorers.preference import evaluate_preference, score_pairs

    from diffalign.data.report import SkipReport
    from diffalign.data.sources import open_preference_source

    reports = {"tune": SkipReport(), "eval": SkipReport()}
    try:
        specs = parse_scorer_specs(args.scorer, args.scorer_option)
        candidates = [float(t) for t in args.thresholds.split(",")]

        def open_split(path: str, split: str, which: str) -> Any:
            return open_preference_source(
                path, split=split, drop_ties=False, max_rows=args.max_pairs, report=reports[which]
            )

        eval_source = open_split(args.data, args.eval_split, "eval")
        tune_source = None if args.threshold is not None else open_split(
            args.tune_data or args.data, args.tune_split, "tune"
        )
        scorers = _load_scorers(specs, args.device, args.dtype)
        options = {"batch_size": args.batch_size, "progress": not args.no_progress}
        tune = None if tune_source is None else score_pairs(tune_source, scorers, report=reports["tune"], **options)
        evaluated = score_pairs(eval_source, scorers, report=reports["eval"], **options)
        results = evaluate_preference(
            evaluated, tune, threshold=args.threshold, candidates=candidates, logit_scale=args.logit_scale
        )
    except (ValueError, KeyError) as error:
        return _fail("score-pairs", error)
    for column, result in results.items():
        where = (
            f"tuned on {args.tune_split} ({result.tune_pairs} pairs, accuracy {result.tune_accuracy:.2%})"
            if result.tuned
            else "given"
        )
        print(
            f"{column}: preference accuracy {result.accuracy:.2%} on {args.eval_split} ({result.pairs} pairs, "
            f"{result.label_ties} tied labels, {result.predicted_ties} predicted ties); threshold {result.threshold:g} {where}"
        )
        if result.tuned:
            print("  " + ", ".join(f"{t:g}: {a:.2%}" for t, a in result.tune_accuracies.items()))
    for which, report in reports.items():
        if tune_source is not None or which == "eval":
            print(f"{which}: {report.summary()}")
    if args.summary_json is not None:
        _write_json(
            args.summary_json,
            {
                "eval_split": args.eval_split,
                "tune_split": None if args.threshold is not None else args.tune_split,
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
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


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
            "accuracy reported on --eval-split."
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
    pairs.set_defaults(run=_score_pairs)
