"""``diffalign tiny``: save tiny (or full-scale, random-weight) models for offline trials and tests.

Every model a recipe, a scorer or ``diffalign captions`` loads from the hub has a tiny stand-in here, saved
in the same format, so the README's offline walk runs on any machine with no hub: the pipelines (sd15, sd2,
sdxl, sd3, sd35-medium, sd35-large), a CLIP reward model (``--scorer clipscore=PATH`` / ``pickscore=PATH``), a BLIP captioner
(``--caption-model PATH``) and a T5 paraphraser (``--perturb-model PATH``).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["TINY_MODELS", "add_tiny_parsers"]

PIPELINE_FAMILIES = ("sd15", "sd2", "sdxl", "sd3", "sd35-medium", "sd35-large")
# The other tiny models and what loads them: shown in --help and printed after saving one.
TINY_MODELS: dict[str, str] = {
    "clip": "a CLIP reward model: diffalign score DIR --scorer clipscore=PATH (or pickscore=PATH, clipscore-100=PATH)",
    "captioner": "a BLIP image captioner: diffalign captions IN OUT --strategy caption --caption-model PATH",
    "paraphraser": "a T5 paraphraser: diffalign captions IN OUT --strategy perturb --perturb-model PATH",
}


def _error(message: str) -> int:
    print(f"diffalign tiny: error: {message}", file=sys.stderr)
    return 2


def _builder(args: argparse.Namespace) -> Callable[[Path], Any]:
    """A function that saves the asked-for tiny model into an empty folder."""
    from diffalign import tiny

    if args.model in PIPELINE_FAMILIES:
        return lambda folder: tiny.save_pipeline(args.model, folder, seed=args.seed, t5=args.t5)
    return {
        "clip": lambda folder: tiny.save_tiny_clip(folder, seed=args.seed),
        "captioner": lambda folder: tiny.save_tiny_captioner(folder, seed=args.seed),
        "paraphraser": lambda folder: tiny.save_tiny_paraphraser(folder, seed=args.seed),
    }[args.model]


def _refusal(target: Path, overwrite: bool) -> str | None:
    """Why ``target`` must not be written, or None."""
    if target.exists() and not target.is_dir():
        return f"{target} exists and is not a folder; choose another path"
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        return f"{target} exists and is not empty; pass --overwrite to replace it, or choose another path"
    return None


def _tiny(args: argparse.Namespace) -> int:
    target = Path(args.path)
    if args.model not in PIPELINE_FAMILIES and (args.scale == "full" or args.t5):
        flag = "--scale full" if args.scale == "full" else "--t5"
        return _error(f"{flag} applies to the pipelines ({', '.join(PIPELINE_FAMILIES)}), not to {args.model!r}")
    refusal = _refusal(target, args.overwrite)
    if refusal is not None:
        return _error(refusal)
    if args.scale == "full":
        from diffalign.tiny import full_scale_parameter_counts, save_full_scale_pipeline

        try:  # a family without a published full-scale architecture: the message names those with one
            full_scale_parameter_counts(args.model)
        except ValueError as error:
            return _error(str(error))
        print(save_full_scale_pipeline(args.model, target, seed=args.seed, clip_bpe=args.clip_bpe))
        return 0
    from diffalign.atomic import staged_folder

    save = _builder(args)
    try:
        # Each builder stages its own folder; this outer one makes --overwrite all-or-nothing for every model.
        with staged_folder(target) as staging:
            save(staging)
    except ValueError as error:  # e.g. --t5 on a family without T5
        return _error(str(error))
    print(target)
    if args.model in TINY_MODELS:
        print(f"diffalign tiny: saved {TINY_MODELS[args.model].replace('PATH', str(target))}", file=sys.stderr)
    return 0


def add_tiny_parsers(commands: Any) -> None:
    """Register ``tiny`` on the ``add_subparsers()`` object of the ``diffalign`` parser."""
    choices = [*PIPELINE_FAMILIES, *TINY_MODELS]
    tiny = commands.add_parser(
        "tiny",
        help=f"save a tiny randomly initialised model for offline trials ({', '.join(choices)})",
        description="Save a tiny random-weight model in the format its real counterpart is loaded from, so every "
        "command runs offline. " + " ".join(f"{name}: {use}." for name, use in TINY_MODELS.items()),
    )
    tiny.add_argument("model", metavar="MODEL", choices=choices,
                      help=f"a pipeline family ({', '.join(PIPELINE_FAMILIES)}) or {', '.join(TINY_MODELS)}")
    tiny.add_argument("path", metavar="PATH", help="output folder (refused when it exists and is not empty, unless --overwrite)")
    tiny.add_argument("--seed", type=int, default=0, help="seed of the random weights (same seed, same files)")
    tiny.add_argument("--overwrite", action="store_true", help="replace an existing folder at PATH")
    tiny.add_argument("--t5", action="store_true", help="sd3: add a tiny T5 encoder (text_encoder_3), as real SD3 has")
    tiny.add_argument("--scale", choices=["tiny", "full"], default="tiny",
                      help="pipelines only. full: the published architecture (sd15, sdxl, sd3 = SD3-medium, sd35-medium) with random "
                      "weights, fp32 (SDXL ~14 GB)")
    tiny.add_argument("--clip-bpe", default=None, help="CLIP's bpe_simple_vocab_16e6.txt.gz for --scale full "
                      "(default: $DIFFALIGN_CLIP_BPE, open_clip, the cache, else fetched with pip download)")
    tiny.set_defaults(run=_tiny)
