"""The recipes diffalign ships, installed as ``diffalign.recipes`` (this folder is ``configs/`` in a checkout).

A recipe is named by its path below this folder without ``.yaml``: ``sdxl/dpo``, ``sd3/mapo``,
``quickstart``. ``diffalign train sdxl/dpo`` and ``diffalign recipes`` read them from here, so a
pip-installed package runs them from any folder; a path to a YAML file of the user's still works.
"""

from __future__ import annotations

from pathlib import Path

FOLDER = Path(__file__).resolve().parent


def available() -> dict[str, Path]:
    """Every shipped recipe, name -> file, sorted by name."""
    return {path.relative_to(FOLDER).with_suffix("").as_posix(): path for path in sorted(FOLDER.rglob("*.yaml"))}


def resolve(name_or_path: str | Path) -> Path:
    """A YAML file that exists as given (the user's own, or ``configs/sdxl/dpo.yaml`` in a checkout), else the
    shipped recipe of that name (``sdxl/dpo``, ``sdxl/dpo.yaml`` or ``configs/sdxl/dpo.yaml`` all name it).
    Unknown names come back unchanged, so the caller's "not found" message names what the user typed."""
    given = Path(name_or_path)
    if given.is_file():
        return given
    name = given.as_posix().removesuffix(".yaml").removeprefix("configs/")
    return available().get(name, given)


def describe(path: Path) -> str:
    """A recipe's one-line description: its first comment line."""
    for line in path.read_text().splitlines():
        if line.startswith("#"):
            return line.lstrip("# ").strip()
    return ""
