"""``diffalign toy``: the toy world's data files, so every data-taking command can be tried offline.

The toy world (:mod:`diffalign.toy`) draws prompts like "a red circle" with PIL; winners follow the prompt,
losers break it. These subcommands write it in the formats the real commands read: Pick-a-Pic v2 pairs
(``train``, ``cache``, ``captions``, ``data check``), RankDPO's ranked lists, a prompt file (``generate``,
online PSO) and arena sources (``arena``, ``rank``). Outputs are written atomically and an existing one
is refused unless ``--overwrite``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

__all__ = ["add_toy_parsers"]

_RANKED_FORMATS = {".parquet": "parquet", ".jsonl": "jsonl"}


def _positive(text: str) -> int:
    """argparse type: an integer >= 1 (an empty data file only fails later, with a less useful message)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _error(args: argparse.Namespace, message: str) -> int:
    print(f"diffalign toy {args.toy_command}: error: {message}", file=sys.stderr)
    return 2


def _taken(paths: list[Path], overwrite: bool, folder: bool = False) -> str | None:
    """Why these outputs must not be written, or None: the wrong kind (a file where a folder goes, or the
    reverse), or an existing file or non-empty folder without --overwrite."""
    for path in paths:
        if path.exists() and path.is_dir() != folder:
            return f"{path} exists and is {'a file' if folder else 'a folder'}; choose another path"
        if path.is_dir() and not any(path.iterdir()):
            continue
        if path.exists() and not overwrite:
            return f"{path} exists; pass --overwrite to replace it, or choose another path"
    return None


def _pairs(args: argparse.Namespace) -> int:
    from diffalign.toy.world import write_pairs

    out = Path(args.out)
    if out.suffix != ".parquet":
        return _error(args, f"{out}: pairs are written as Pick-a-Pic v2 parquet; name the file *.parquet")
    refusal = _taken([out], args.overwrite)
    if refusal:
        return _error(args, refusal)
    print(write_pairs(out, args.n, args.seed, dual_captions=args.dual_captions))
    return 0


def _ranked(args: argparse.Namespace) -> int:
    from diffalign.toy.ranked import write_ranked

    out = Path(args.out)
    if out.suffix not in _RANKED_FORMATS:
        return _error(args, f"{out}: name the file *.parquet (images inside) or *.jsonl (images in a folder beside it)")
    images = out.with_name(f"{out.stem}_images")
    refusal = _taken([out], args.overwrite)
    if refusal is None and out.suffix == ".jsonl":
        refusal = _taken([images], args.overwrite, folder=True)
    if refusal:
        return _error(args, refusal)
    try:
        print(write_ranked(out, args.n, args.seed, k=args.k, format=_RANKED_FORMATS[out.suffix]))  # type: ignore[arg-type]
    except ValueError as error:  # k outside 2..4
        return _error(args, str(error))
    return 0


def _prompts(args: argparse.Namespace) -> int:
    from diffalign.atomic import staged_file
    from diffalign.toy.world import prompts

    out = Path(args.out)
    every = prompts()
    if args.n > len(every):
        return _error(args, f"--n {args.n}: the toy world has {len(every)} prompts")
    refusal = _taken([out], args.overwrite)
    if refusal:
        return _error(args, refusal)
    with staged_file(out) as temporary:
        temporary.write_text("".join(f"{prompt}\n" for prompt in every[: args.n]), encoding="utf-8")
    print(out)
    return 0


def _arena_sources(args: argparse.Namespace) -> int:
    from diffalign.atomic import staged_folder
    from diffalign.toy.arena import write_toy_sources

    root = Path(args.out_dir)
    refusal = _taken([root], args.overwrite, folder=True)
    if refusal:
        return _error(args, refusal)
    with staged_folder(root) as staging:  # all sources appear together, or none
        write_toy_sources(staging, tuple(args.models), seeds_per_prompt=args.seeds_per_prompt, seed=args.seed)
    for model in args.models:
        print(root / model)
    return 0


def _world(args: argparse.Namespace) -> int:
    from diffalign.atomic import staged_folder
    from diffalign.toy.world import write_toy_world

    root = Path(args.out_dir)
    refusal = _taken([root], args.overwrite, folder=True)
    if refusal:
        return _error(args, refusal)
    if args.train_seed == args.heldout_seed:
        return _error(args, "--train-seed and --heldout-seed must differ: held-out pairs must be unseen in training")
    with staged_folder(root) as staging:
        write_toy_world(staging, n_train=args.n_train, n_heldout=args.n_heldout,
                        train_seed=args.train_seed, heldout_seed=args.heldout_seed)  # fmt: skip
    print(root / "train.parquet")
    print(root / "heldout.parquet")
    return 0


def add_toy_parsers(commands: Any) -> None:
    """Register ``toy`` (pairs, ranked, prompts, arena-sources, world) on the ``diffalign`` subparsers."""
    from diffalign.toy.arena import TOY_MODELS

    toy = commands.add_parser(
        "toy", help="write toy-world data (pairs, ranked lists, prompts, arena sources) to try commands offline",
        description="The toy world: prompts like 'a red circle', 32x32 PIL drawings, winners that follow the "
        "prompt, losers with the wrong colour, the wrong shape, or a degraded copy. Deterministic in --seed.",
    )  # fmt: skip
    actions = toy.add_subparsers(dest="toy_command", required=True, metavar="WHAT")

    def output(parser: argparse.ArgumentParser, name: str, help: str, seed: bool = True) -> None:
        parser.add_argument(name, metavar=name.upper(), help=help)
        if seed:
            parser.add_argument("--seed", type=int, default=0, help="seed of the drawing (same seed, same file)")
        parser.add_argument("--overwrite", action="store_true", help="replace an existing output")

    pairs = actions.add_parser("pairs", help="preference pairs as Pick-a-Pic v2 parquet (train, cache, captions, data check)")
    output(pairs, "out", "output .parquet file (columns jpg_0, jpg_1, label_0, label_1, caption, ...)")
    pairs.add_argument("--n", type=_positive, default=64, help="number of pairs (a third per loser kind)")
    pairs.add_argument("--dual-captions", action="store_true",
                       help="add caption_0/caption_1 (the loser's describes the loser), as DCPO's data")
    pairs.set_defaults(run=_pairs)

    ranked = actions.add_parser("ranked", help="RankDPO's ranked lists: k images per prompt with graded scores")
    output(ranked, "out", "output .parquet (images inside) or .jsonl (images in <stem>_images/ beside it)")
    ranked.add_argument("--n", type=_positive, default=32, help="number of ranked lists")
    ranked.add_argument("--k", type=int, default=4, help="images per list, 2..4 (truth, degraded, one wrong, both wrong)")
    ranked.set_defaults(run=_ranked)

    prompt_file = actions.add_parser("prompts", help="a prompt file, one per line (generate; online PSO's data.path)")
    output(prompt_file, "out", "output .txt file", seed=False)
    prompt_file.add_argument("--n", type=_positive, default=12, help="the first N of the 12 toy prompts")
    prompt_file.set_defaults(run=_prompts)

    sources = actions.add_parser(
        "arena-sources", help="one folder of images + manifest.jsonl per toy model (arena --source, rank --source)",
        description="OUT_DIR/<model>/manifest.jsonl and images/, as `diffalign generate` writes them: 'truth' "
        "follows the prompt, 'wrong-colour' paints the wrong colour, 'degraded' blurs and noises the truth.",
    )  # fmt: skip
    output(sources, "out_dir", "output folder; one subfolder per model")
    sources.add_argument("--models", nargs="+", choices=TOY_MODELS, default=list(TOY_MODELS), help="which toy models")
    sources.add_argument("--seeds-per-prompt", type=_positive, default=1, help="images per prompt and model")
    sources.set_defaults(run=_arena_sources)

    world = actions.add_parser("world", help="the quickstart's data: train.parquet and heldout.parquet (other seed)")
    output(world, "out_dir", "output folder", seed=False)
    world.add_argument("--n-train", type=_positive, default=3000, help="training pairs")
    world.add_argument("--n-heldout", type=_positive, default=300, help="held-out pairs")
    world.add_argument("--train-seed", type=int, default=0, help="seed of the training pairs")
    world.add_argument("--heldout-seed", type=int, default=1, help="seed of the held-out pairs (must differ)")
    world.set_defaults(run=_world)
