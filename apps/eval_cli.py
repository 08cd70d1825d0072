"""``diffalign generate``, ``compare`` and ``rank``: sample a model, compare two models, rank k models.

Wired into ``apps/cli.py`` with ``add_eval_parsers(commands)``; each handler is
set as ``run`` and returns the exit status, like the other subcommands. Bad
arguments and paths print one ``error:`` line and return 2 (no traceback).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from diffalign.dtypes import DTYPE_NAMES
from diffalign.writable import check_writable

__all__ = ["add_eval_parsers"]

_USER_ERRORS = (ValueError, KeyError, FileExistsError, FileNotFoundError)


def _fail(command: str, error: BaseException) -> int:
    message = error.args[0] if isinstance(error, KeyError) and error.args else error
    print(f"diffalign {command}: error: {message}", file=sys.stderr)
    return 2


def _generate(args: argparse.Namespace) -> int:
    """Sample images into ``--out`` with a manifest; print the folder."""
    from diffalign.apps.generate import GenerateSettings, generate, read_prompts
    from diffalign.apps.output import show_progress

    from diffalign.data.report import SkipReport

    report = SkipReport()
    try:
        settings = GenerateSettings(
            model=args.model, prompts=args.prompts, out=args.out, lora=args.lora, finetuned=args.finetuned,
            seeds_per_prompt=args.seeds_per_prompt, seed=args.seed, steps=args.steps, guidance=args.guidance,
            resolution=args.resolution, batch_size=args.batch_size, device=args.device, dtype=args.dtype,
            name=args.name, overwrite=args.overwrite, progress=show_progress(not args.no_progress),
        )  # fmt: skip
        check_writable(args.out, "--out", "folder")  # before the pipeline loads
        prompts = read_prompts(args.prompts, report)
        out = generate(settings, prompts)
    except _USER_ERRORS as error:
        return _fail("generate", error)
    print(out)
    print(report.summary())
    return 0


def _compare(args: argparse.Namespace) -> int:
    """Print the per-scorer win rate of A over B; draw the chart when ``--out`` is given."""
    from diffalign.apps.compare import run_compare

    try:
        if args.out is not None:
            check_writable(args.out, "--out", "file")
        _, text = run_compare(args.a_table, args.b_table, args.out, args.bootstrap, args.seed)
    except _USER_ERRORS as error:
        return _fail("compare", error)
    print(text)
    if args.out is not None:
        print(f"chart: {args.out}")
    return 0


def _rank(args: argparse.Namespace) -> int:
    """Write RankDPO ranked lists (and best-vs-worst pairs); print what was written and skipped."""
    from diffalign.apps.output import show_progress
    from diffalign.apps.rank import parse_scorer_spec, rank_sources

    from diffalign.data.report import SkipReport

    report = SkipReport()
    try:
        for option, path in (("--out", args.out), ("--pairs-out", args.pairs_out)):
            if path is not None:
                check_writable(path, option, "file")  # before the scorers load
        stats = rank_sources(
            args.source, [parse_scorer_spec(spec) for spec in args.scorer], args.out, pairs_out=args.pairs_out,
            batch_size=args.batch_size, device=args.device, dtype=args.dtype, report=report,
            progress=show_progress(not args.no_progress),
        )  # fmt: skip
    except _USER_ERRORS as error:
        return _fail("rank", error)
    print(args.out if args.pairs_out is None else f"{args.out}\n{args.pairs_out}")
    print(stats.summary())
    print(report.summary())
    return 0


def _add_generate(commands: Any) -> None:
    generate = commands.add_parser(
        "generate",
        help="sample images of a prompt file from a model (+ LoRA or fine-tune) into a folder with a manifest",
        description=(
            "Writes OUT/images/{prompt:05d}_{sample:02d}.png and OUT/manifest.jsonl "
            '({"image", "prompt", "model", "seed"} per image), atomically. Each image has its own seed, '
            "so the batch size never changes the images."
        ),
    )
    generate.add_argument(
        "--model", default=None, help="hub id or pipeline folder (default: the trained folder's base_model)"
    )
    trained = generate.add_mutually_exclusive_group()
    trained.add_argument(
        "--lora", default=None, help="LoRA: a run's output dir, its final/, any load_lora_weights folder, or a hub id"
    )
    trained.add_argument(
        "--finetuned",
        default=None,
        help="full fine-tune: a run's output dir, its final/ (unet/ or transformer/), or the network folder",
    )
    generate.add_argument("--prompts", required=True, help='.txt (one prompt per line) or .jsonl ({"prompt": ...})')
    generate.add_argument("--out", required=True, help="output folder")
    generate.add_argument("--seeds-per-prompt", type=int, default=1, help="images per prompt (<= 100)")
    generate.add_argument(
        "--seed",
        type=int,
        default=0,
        help="base seed; image seeds derive from it, the prompt index and the sample index",
    )
    generate.add_argument("--steps", type=int, default=30, help="denoising steps")
    generate.add_argument(
        "--guidance", type=float, default=None, help="classifier-free guidance scale (default: the pipeline's)"
    )
    generate.add_argument("--resolution", type=int, default=None, help="image side in pixels (default: the model's)")
    generate.add_argument("--batch-size", type=int, default=4, help="images per pipeline call")
    generate.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    generate.add_argument("--dtype", choices=DTYPE_NAMES, default="fp32", help="dtype the pipeline runs in")
    generate.add_argument(
        "--name", default=None, help="model name written in the manifest (default: from the model and weights)"
    )
    generate.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    generate.add_argument("--no-progress", action="store_true", help="no progress bar (none is drawn when stderr is not a terminal)")
    generate.set_defaults(run=_generate)


def _add_compare(commands: Any) -> None:
    compare = commands.add_parser(
        "compare",
        help="win rate of model A over model B per scorer, with a bootstrap 95%% interval",
        description=(
            "Reads two per-image score tables (.parquet/.csv/.jsonl with columns image, prompt and one float "
            "column per scorer, as `diffalign score` writes them), pairs images by prompt (and seed or sample "
            "order), and prints A's win rate over B per scorer (ties count half) with a bootstrap 95% interval "
            "over prompts."
        ),
    )
    compare.add_argument("a_table", help="score table of model A")
    compare.add_argument("b_table", help="score table of model B")
    compare.add_argument("--out", default=None, help="PNG bar chart with the intervals as error bars")
    compare.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples of the prompts")
    compare.add_argument("--seed", type=int, default=0, help="seed of the bootstrap")
    compare.set_defaults(run=_compare)


def _add_rank(commands: Any) -> None:
    rank = commands.add_parser(
        "rank",
        help="rank k models' images per prompt with n scorers into RankDPO lists (phi = C / (n (k-1)))",
        description=(
            'Reads k manifests ({"image", "prompt", "model"?} JSONL, or generate output folders), matches '
            "them by prompt, scores every image with every scorer and writes the ranked parquet RankDPO trains on; "
            "--pairs-out adds best-vs-worst pairs in Pick-a-Pic v2 schema."
        ),
    )
    rank.add_argument("--source", action="append", required=True, help="a manifest or generate folder; repeat, k >= 2")
    rank.add_argument(
        "--scorer", action="append", required=True, help="NAME or NAME=WEIGHTS (hub id or folder); repeat"
    )
    rank.add_argument("--out", required=True, help="ranked lists, .parquet")
    rank.add_argument("--pairs-out", default=None, help="best-vs-worst pairs, .parquet (Pick-a-Pic v2 schema)")
    rank.add_argument("--batch-size", type=int, default=16, help="images per scorer forward")
    rank.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    rank.add_argument("--dtype", choices=DTYPE_NAMES, default="fp32", help="scorer dtype")
    rank.add_argument("--no-progress", action="store_true", help="no progress bar (none is drawn when stderr is not a terminal)")
    rank.set_defaults(run=_rank)


def add_eval_parsers(subparsers: Any) -> None:
    """Register ``generate``, ``compare`` and ``rank`` on the ``add_subparsers()`` object of the ``diffalign`` parser."""
    _add_generate(subparsers)
    _add_compare(subparsers)
    _add_rank(subparsers)
