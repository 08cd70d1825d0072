"""``diffalign captions``: add a caption per image to a pairs dataset, for DCPO.

Wired into ``apps/cli.py`` with ``add_captions_parser(commands)``; the handler
is set as ``run``, like the other subcommands.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from diffalign.dtypes import DTYPE_NAMES

__all__ = ["add_captions_parser"]


def _captions(args: argparse.Namespace) -> int:
    """Run :func:`diffalign.captioning.dataset.add_dual_captions`; print the output path and what was skipped."""
    from diffalign.apps.output import show_progress
    from diffalign.captioning.dataset import CaptionStats, add_dual_captions
    from diffalign.captioning.strategies import CaptionSettings
    from diffalign.data.report import SkipReport

    device = args.device
    if device is None:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    report, stats = SkipReport(), CaptionStats()
    try:
        from diffalign.writable import check_writable

        check_writable(args.output, "output", "file" if Path(args.output).suffix else "folder")  # before models load
        settings = CaptionSettings(
            perturb_model=args.perturb_model,
            level=args.level,
            caption_model=args.caption_model,
            perturb_prefix=args.perturb_prefix,
            condition_on_prompt=args.condition_on_prompt,
            max_new_tokens=args.max_new_tokens,
            device=device,
            dtype=args.dtype,
        )
        output = add_dual_captions(
            args.input,
            args.output,
            args.strategy,
            settings=settings,
            batch_size=args.batch_size,
            seed=args.seed,
            report=report,
            stats=stats,
            overwrite=args.overwrite,
            progress=show_progress(not args.no_progress),
        )
    except (ValueError, KeyError, FileExistsError) as error:  # bad arguments or paths: a message, not a traceback
        print(f"diffalign captions: error: {error}", file=sys.stderr)
        return 2
    print(output)
    print(stats.summary())
    print(report.summary())
    return 0


def add_captions_parser(subparsers: Any) -> None:
    """Register ``captions`` on the ``add_subparsers()`` object of the ``diffalign`` parser."""
    captions = subparsers.add_parser(
        "captions",
        help="add caption_0/caption_1 (a caption per image) to pairs, for DCPO",
        description=(
            "Read Pick-a-Pic-style parquet (a file or a folder of shards) or a JSONL pairs manifest and write the "
            "same rows plus a caption per image: caption_0/caption_1 (JSONL: chosen_caption/rejected_caption). "
            "Bad rows are skipped and listed by row id."
        ),
    )
    captions.add_argument("input", help="a .parquet file, a folder of parquet shards, or a .jsonl manifest")
    captions.add_argument("output", help="where to write (.parquet / folder / .jsonl, like the input); never the input")
    captions.add_argument(
        "--strategy",
        choices=["perturb", "caption", "hybrid"],
        default="perturb",
        help="perturb: winner keeps the prompt, loser gets it perturbed; caption: a model captions each image; "
        "hybrid: caption both, then perturb the loser's caption",
    )
    captions.add_argument(
        "--perturb-model", default="rules", help="'rules' (offline lexicon swaps) or a text2text model: hub id or folder"
    )
    captions.add_argument("--level", choices=["weak", "medium", "strong"], default="medium", help="perturbation strength")
    captions.add_argument("--perturb-prefix", default="paraphrase: ", help="instruction prepended for a text2text model")
    captions.add_argument("--caption-model", default=None, help="image-to-text model (hub id or folder) for caption/hybrid")
    captions.add_argument(
        "--condition-on-prompt", action="store_true", help="captions continue the prompt as a text prefix"
    )
    captions.add_argument("--max-new-tokens", type=int, default=40, help="generation length of the models")
    captions.add_argument("--batch-size", type=int, default=16, help="pairs per batch (parquet is streamed in these)")
    captions.add_argument("--seed", type=int, default=0, help="makes perturbation and sampling reproducible")
    captions.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    captions.add_argument("--dtype", choices=DTYPE_NAMES, default="float32", help="dtype of the caption and perturbation models")
    captions.add_argument("--overwrite", action="store_true", help="replace an existing output (never the input)")
    captions.add_argument("--no-progress", action="store_true", help="no progress bar (none is drawn when stderr is not a terminal)")
    captions.set_defaults(run=_captions)
