"""Rebuild the toy base that ships inside the package: ``python -m diffalign.toy.shipped [--out DIR]``.

``--test-bases DIR`` builds the toy turbo and the flow toy base the learning tests start from
(a checkout's ``tests/fixtures/toy_bases``), each in the folder name the toy cache looks for.

Run it after any change to :class:`~diffalign.toy.base.ToyBaseRecipe`, the toy world or the tiny
SD1.5 architecture, and commit the folder: until then the shipped copy's fingerprint no longer
matches the recipe and every user builds the base themselves (a test fails to say so). It is the
same build the cache runs (``build_toy_base``), on the same toy world.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from diffalign.toy.base import (
    SHIPPED_TOY_BASE,
    ToyBaseRecipe,
    build_toy_base,
    ensure_flow_toy_base,
    ensure_toy_turbo,
    ensure_toy_world,
)


def rebuild_shipped_base(out: Path = SHIPPED_TOY_BASE, recipe: ToyBaseRecipe = ToyBaseRecipe(), log=print) -> Path:
    """Build ``recipe``'s toy base into ``out`` (atomically), its world in a temporary folder."""
    with tempfile.TemporaryDirectory(prefix="diffalign-toy-world-") as scratch:
        world = ensure_toy_world(Path(scratch), recipe)
        return build_toy_base(out, recipe, world.train, log)


def rebuild_test_bases(out: Path, log=print) -> list[Path]:
    """Build the default toy turbo and flow toy base (from the shipped base) and move them into ``out``
    under the folder names the toy cache gives them."""
    import shutil

    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="diffalign-toy-cache-") as scratch:
        cache = Path(scratch)
        built = [ensure_toy_turbo(cache, log=log), ensure_flow_toy_base(cache, log=log)[1]]
        for folder in built:
            shutil.rmtree(out / folder.name, ignore_errors=True)
            shutil.move(str(folder), out / folder.name)
    return [out / folder.name for folder in built]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m diffalign.toy.shipped", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=SHIPPED_TOY_BASE, help="where to write the base (default: the package's copy)")
    parser.add_argument("--test-bases", type=Path, default=None,
                        help="instead, build the toy turbo and flow toy base of the learning tests into this folder")
    args = parser.parse_args(argv)
    if args.test_bases is not None:
        for folder in rebuild_test_bases(args.test_bases):
            print(folder)
        return 0
    print(rebuild_shipped_base(args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
