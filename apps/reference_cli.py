"""``diffalign reference-errors CONFIG [overrides]``: the reference's errors for a run, computed once before it.

Then ``diffalign train CONFIG [overrides] train.reference_errors=FOLDER`` runs only the policy. The
store holds the groups the run will draw; a sweep over beta or the learning rate reuses it.
"""

from __future__ import annotations

import argparse
from typing import Any


__all__ = ["add_reference_parsers"]


def add_reference_parsers(commands: Any) -> None:
    parser = commands.add_parser(
        "reference-errors",
        help="precompute a run's reference errors once (then train with train.reference_errors=FOLDER)",
        description="Compute the frozen reference's per-sample errors for every group the run CONFIG will draw, "
        "in inference mode at a large batch, into train.reference_errors (or --output).",
    )
    parser.add_argument("config", help="the training recipe (a shipped name such as sdxl/dpo, or a YAML file)")
    parser.add_argument("overrides", nargs="*", help="key.path=value overrides, the same as the training run's")
    parser.add_argument("--output", default=None, help="the store folder (default: the config's train.reference_errors; for 'auto', "
                        "<train.output_dir>/reference_errors, which that run then reuses)")
    parser.add_argument("--num-processes", type=int, default=1,
                        help="processes the training run will use (each draws its own batches): the store covers them all")
    parser.add_argument("--batch-size", type=int, default=32, help="groups per inference forward (any value gives the same errors)")
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.set_defaults(run=_reference_errors)


def _reference_errors(args: argparse.Namespace) -> int:
    from pathlib import Path

    import torch

    from diffalign.config import ConfigError
    from diffalign.trainers.config import load_train_config
    from diffalign.trainers.reference_errors import AUTO, AUTO_FOLDER, build_reference_errors

    config = load_train_config(args.config, args.overrides)
    folder = args.output or config.train.reference_errors
    if folder == AUTO:  # where `diffalign train ... train.reference_errors=auto` looks first
        folder = str(Path(config.train.output_dir) / AUTO_FOLDER)
    if folder is None:
        raise ConfigError("diffalign reference-errors: name the store folder with --output DIR or train.reference_errors=DIR")
    if args.num_processes < 1 or args.batch_size < 1:
        raise ConfigError("diffalign reference-errors: --num-processes and --batch-size must be at least 1")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    written = build_reference_errors(config, folder, num_processes=args.num_processes, batch_size=args.batch_size, device=device)
    print(f"diffalign reference-errors: wrote {written}; train with train.reference_errors={written}")
    return 0
