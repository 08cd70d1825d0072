"""The ``diffalign`` command line: parse, then dispatch to the core, trainers, scorers and apps.

Subcommands: train, cache, quickstart, tiny (save a tiny, or full-scale random-weight, pipeline for offline trials),
captions (add a second, per-image caption to pairs for DCPO), score (score image folders with
reward models), score-pairs (a scorer's preference accuracy on Pick-a-Pic-schema pairs), generate (images for a
prompt file, optionally with trained weights), compare (win rates of two scored folders), rank
(ranked lists from several sources and scorers, RankDPO's data), arena (blind side-by-side human votes
in a Gradio app), export-votes (those votes as Pick-a-Pic v2 parquet for train), data check (decode every row of a
data set and report each bad row).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from diffalign.dtypes import DTYPE_NAMES, parse_dtype


def _train(args: argparse.Namespace) -> int:
    from diffalign.trainers.config import load_train_config
    from diffalign.atomic import DiskFullError
    from diffalign.trainers.finite import NonFiniteTrainingError
    from diffalign.trainers.hub import HubError
    from diffalign.trainers.loop import train

    from diffalign.trainers.preflight import check_run_inputs

    config = load_train_config(args.config, args.overrides)
    check_run_inputs(config)  # the data, the output folder and a hub-id model, before any model loads
    try:
        train(config, reward=_scorer_reward(config.method), validation_scorer=_validation_scorer(config.validation))
    except (NonFiniteTrainingError, DiskFullError, HubError) as error:  # a failed run, not a usage error (2): the message says what to do
        print(f"diffalign train: error: {error}", file=sys.stderr)
        return 1
    return 0


def _scorer_reward(method):
    """Online methods rewarded by a scorer: the apps layer loads it (trainers never import scorers)."""
    name = getattr(method, "reward", None)
    if name is None or name == "toy":
        return None
    import torch

    from diffalign.scorers import load_scorer

    device = "cuda" if torch.cuda.is_available() else "cpu"
    return load_scorer(name, weights=method.reward_weights, device=device).score


def _validation_scorer(validation):
    """The scorer of the validation images (validation.scorer), loaded here: trainers never import scorers."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if validation.scorer is None or not validation.active(device):
        return None
    from diffalign.config import ConfigError
    from diffalign.scorers import load_scorer

    try:
        return load_scorer(validation.scorer, weights=validation.scorer_weights, device=device).score
    except KeyError as error:  # an unknown name: the message lists the registered scorers
        raise ConfigError(f"validation.scorer: {error.args[0]}") from None


def _cache(args: argparse.Namespace) -> int:
    import torch

    from diffalign.backbones import load_backbone
    from diffalign.cache import build_cache
    from diffalign.trainers.config import load_train_config

    from diffalign.config import ConfigError
    from diffalign.trainers.preflight import check_data, check_model_path

    config = load_train_config(args.config, args.overrides)
    if config.data.cache_dir is None:
        raise ConfigError("set data.cache_dir (in the config or as data.cache_dir=PATH)")
    check_data(config, from_cache=False)  # the cache is built from the raw data, even over an existing one
    check_model_path(config.model.path, config.model.revision)
    from diffalign.writable import check_writable

    check_writable(config.data.cache_dir, "data.cache_dir", "folder")
    backbone = load_backbone(config.model)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    backbone.to(device)
    dtype = parse_dtype(args.dtype)
    from diffalign.trainers.objectives import objective_entry

    folder = build_cache(
        backbone, config.model, config.data, config.data.cache_dir, batch_size=args.batch_size, shard_size=args.shard_size,
        dtype=dtype, require_captions=config.method.name if objective_entry(config.method.name).data == "captioned_pairs" else None,
    )
    print(f"diffalign cache: wrote {folder}")
    return 0


def _quickstart(args: argparse.Namespace) -> int:
    from diffalign.apps.quickstart import run_quickstart
    from diffalign.writable import check_writable

    check_writable(args.output_dir, "--output-dir", "folder")  # before the toy base is built (minutes, the first time)

    run_quickstart(Path(args.output_dir), overrides=args.overrides, cache_root=args.cache_root)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diffalign", description="Align text-to-image diffusion models with preferences.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}", help="print the version and exit")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="show the libraries' warnings and loading bars (hidden by default)")
    parser.add_argument("-q", "--quiet", action="store_true", help="also hide diffalign's own progress bars and info lines")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train with a YAML recipe (also under `accelerate launch`)")
    train.add_argument("config", help="a shipped recipe (sdxl/dpo; `diffalign recipes` lists them) or a YAML file")
    train.add_argument("overrides", nargs="*", help="key.path=value overrides, e.g. train.max_steps=10")
    train.set_defaults(run=_train)

    cache = commands.add_parser("cache", help="precompute VAE latents and text embeddings into data.cache_dir")
    cache.add_argument("config", help="the recipe the cache is for (as for train): a shipped recipe or a YAML file")
    cache.add_argument("overrides", nargs="*", help="key.path=value overrides, e.g. data.cache_dir=PATH")
    cache.add_argument("--batch-size", type=int, default=16, help="groups encoded per forward")
    cache.add_argument("--shard-size", type=int, default=1024, help="groups (and texts) per safetensors shard")
    cache.add_argument("--dtype", choices=DTYPE_NAMES, default="float32", help="dtype the latents and embeddings are stored in")
    cache.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    cache.set_defaults(run=_cache)

    quickstart = commands.add_parser("quickstart", help="CPU demo: toy world, toy base model, Diffusion-DPO, report")
    quickstart.add_argument("--output-dir", default="quickstart_out", help="where the run and its report go")
    quickstart.add_argument("--cache-root", default=None, help="where the toy base is cached (default ~/.cache/diffalign)")
    quickstart.add_argument("overrides", nargs="*", help="overrides for configs/quickstart.yaml")
    quickstart.set_defaults(run=_quickstart)


    from diffalign.apps.arena.cli import add_arena_parsers
    from diffalign.apps.captions_cli import add_captions_parser
    from diffalign.apps.data_cli import add_data_parsers
    from diffalign.apps.eval_cli import add_eval_parsers
    from diffalign.apps.hub_cli import add_hub_parsers
    from diffalign.apps.recipes_cli import add_recipes_parsers
    from diffalign.apps.reference_cli import add_reference_parsers
    from diffalign.apps.score_cli import add_score_parsers
    from diffalign.apps.tiny_cli import add_tiny_parsers
    from diffalign.apps.toy_cli import add_toy_parsers

    add_tiny_parsers(commands)
    add_toy_parsers(commands)
    add_captions_parser(commands)
    add_score_parsers(commands)
    add_eval_parsers(commands)
    add_arena_parsers(commands)
    add_data_parsers(commands)
    add_recipes_parsers(commands)
    add_reference_parsers(commands)
    add_hub_parsers(commands)
    return parser


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("diffalign")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"


def command_name(args: argparse.Namespace) -> str:
    """The command as typed, nested ones included (``data check``, ``recipes show``), for messages."""
    parts = (args.command, getattr(args, "data_command", None), getattr(args, "recipes_command", None))
    return " ".join(part for part in parts if part)


_GLOBAL_FLAGS = {"-v": "verbose", "--verbose": "verbose", "-q": "quiet", "--quiet": "quiet"}


def parse_arguments(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse, letting ``key=value`` overrides and the global flags come after a command's options.

    argparse gives a ``nargs="*"`` positional only the overrides before the first option, so
    ``train sd15/dpo a=1 --verbose b=2`` used to fail with "unrecognized arguments"; leftovers that are
    overrides join ``overrides``, global flags are applied, and anything else is one error naming it.
    """
    args, extras = parser.parse_known_args(argv)
    unknown = []
    for item in extras:
        if item in _GLOBAL_FLAGS:
            setattr(args, _GLOBAL_FLAGS[item], True)
        elif hasattr(args, "overrides") and not item.startswith("-") and "=" in item:
            args.overrides.append(item)
        else:
            unknown.append(item)
    if unknown:
        command = command_name(args)
        hint = "key.path=value overrides may come anywhere; each option must be one its command takes"
        parser.exit(2, f"diffalign {command}: error: unrecognized arguments: {' '.join(unknown)} ({hint}; "
                       f"`diffalign {command} -h` lists them)\n")
    return args


def main(argv: list[str] | None = None) -> int:
    from diffalign.apps.output import configure_output
    from diffalign.config import ConfigError
    from diffalign.data.types import NoUsableRowsError

    args = parse_arguments(build_parser(), argv)
    configure_output(verbose=args.verbose, quiet=args.quiet)
    try:
        return args.run(args)
    except (ConfigError, FileNotFoundError, NotADirectoryError, ImportError, NoUsableRowsError) as error:
        print(f"diffalign {command_name(args)}: error: {error}", file=sys.stderr)
        return 2
    except (PermissionError, IsADirectoryError, FileExistsError) as error:  # an output path the checks did not cover
        where = error.filename or "a path"
        print(f"diffalign {command_name(args)}: error: {where}: {error.strerror or error}; choose another path", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: outputs are written atomically, so nothing half-written is left to explain
        print(f"diffalign {command_name(args)}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
