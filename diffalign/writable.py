"""Can an output be written where the user asked? Checked before any work, so a bad path is one clear line.

Why: an output path that is a file, lies under a file, or lies under ``/sys`` used to surface only at
the end of a run (or after minutes of model building) as a PermissionError or FileExistsError traceback.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from diffalign.config import ConfigError

__all__ = ["check_writable"]

_SYSTEM_FOLDERS = (("sys",), ("proc",), ("dev",))  # kernel file systems: never a place for outputs


def check_writable(path: str | os.PathLike[str], key: str, kind: Literal["folder", "file"]) -> None:
    """Raise ConfigError naming ``key`` (``train.output_dir``, ``--out``) when ``path`` cannot become a ``kind``.

    A folder may exist (it is reused or refused later by its owner); a file may exist (the command decides
    whether to replace it). What is refused: the wrong kind already there, a file among the parents, and a
    parent that cannot be written.
    """
    path = Path(path).expanduser()
    named = f"{key}={path}" if "." in key and not key.startswith("-") else f"{key} {path}"  # config key or option
    if kind == "folder" and path.exists() and not path.is_dir():
        raise ConfigError(f"{named} is a file, not a folder: choose a folder path for the outputs")
    if kind == "file" and path.is_dir():
        raise ConfigError(f"{named} is a folder: name a file inside it")
    parent = path if kind == "folder" else path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise ConfigError(f"{named}: {parent} is a file, so nothing can be made under it; choose another path")
    if parent.resolve().parts[1:2] in _SYSTEM_FOLDERS or not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"{named}: {parent} cannot be written; choose a path in a writable folder")
