"""``diffalign recipes``: list, show and copy the recipes the package ships (as torchtune's ``tune ls/cp``).

``recipes show NAME [overrides]`` prints the full effective config: every key of every section,
with its value after the recipe and the overrides, its default and its description, as YAML a
user can save and edit.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel
from pydantic_core import PydanticUndefined

__all__ = ["add_recipes_parsers", "effective_config_yaml"]


def add_recipes_parsers(commands: Any) -> None:
    recipes = commands.add_parser("recipes", help="list the shipped recipes; `recipes show NAME`, `recipes cp NAME FILE`")
    actions = recipes.add_subparsers(dest="recipes_command")
    show = actions.add_parser("show", help="print a recipe's full effective config: every key, its default and description")
    show.add_argument("name", help="a shipped recipe (e.g. sdxl/dpo) or a YAML file")
    show.add_argument("overrides", nargs="*", help="key.path=value overrides to apply first")
    show.set_defaults(run=_show)
    copy = actions.add_parser("cp", help="copy a shipped recipe to a file to edit")
    copy.add_argument("name", help="a shipped recipe, e.g. sdxl/dpo (`diffalign recipes` lists them)")
    copy.add_argument("destination", help="a file, or a folder to copy it into under its own name (never overwritten)")
    copy.set_defaults(run=_copy)
    recipes.set_defaults(run=_list)


def _list(args: argparse.Namespace) -> int:
    from diffalign import recipes

    found = recipes.available()
    width = max(len(name) for name in found)
    for name, path in found.items():
        print(f"{name:<{width}}  {recipes.describe(path)}")
    print("\n`diffalign train NAME [key=value ...]` runs one; `diffalign recipes show NAME` prints every setting.")
    return 0


def _show(args: argparse.Namespace) -> int:
    from diffalign.trainers.config import load_train_config

    print(effective_config_yaml(load_train_config(args.name, args.overrides)), end="")
    return 0


def _copy(args: argparse.Namespace) -> int:
    from diffalign import recipes
    from diffalign.config import ConfigError

    source = recipes.available().get(str(args.name).removesuffix(".yaml"))
    if source is None:
        raise ConfigError(f"no shipped recipe named {args.name!r}; `diffalign recipes` lists them")
    destination = Path(args.destination)
    if destination.is_dir():
        destination = destination / source.name
    if destination.exists():
        raise ConfigError(f"{destination} exists; choose another file (nothing was overwritten)")
    from diffalign.writable import check_writable

    check_writable(destination, "destination", "file")
    destination.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, destination)
    print(f"copied {args.name} to {destination}; run it with `diffalign train {destination}`", file=sys.stderr)
    return 0


def effective_config_yaml(config: BaseModel) -> str:
    """Every section and key as YAML, each key followed by a comment with its default and description."""
    lines = []
    for section_name in type(config).model_fields:
        section = getattr(config, section_name)
        lines.append(f"{section_name}:")
        for key, field in type(section).model_fields.items():
            name = field.alias or key
            value = yaml.safe_dump(getattr(section, key), default_flow_style=True, width=10_000).strip()
            value = value.removesuffix("\n...").removesuffix("...").strip()
            if field.default is PydanticUndefined and field.default_factory is None:
                default = "required"
            else:
                default = "default " + yaml.safe_dump(field.get_default(call_default_factory=True), default_flow_style=True,
                                                      width=10_000).removesuffix("\n...\n").strip()
            note = f"{default}. {field.description}" if field.description else default
            lines.append(f"  {name}: {value}  # {note}")
    return "\n".join(lines) + "\n"
