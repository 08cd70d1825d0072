"""Helpers shared by the preference readers (reader version, file stats, index checks, JSONL objects).

Kept apart from :mod:`diffalign.data.sources` so that the readers
(:mod:`diffalign.data.pickapic`, :mod:`diffalign.data.jsonl`) can use them
without importing the module that dispatches to them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from diffalign.data.types import BadRowError

# Bump when the readers' row selection logic changes: cached artefacts keyed by
# fingerprint() must then be rebuilt.
READER_VERSION = 1


def stat_entry(path: Path) -> list[Any]:
    """A file's identity for a fingerprint: resolved path, size and modification time."""
    st = path.stat()
    return [str(path.resolve()), st.st_size, st.st_mtime_ns]


def check_index(name: str, index: int, n: int) -> None:
    """A row index out of range is the caller's bug: say which source and how many rows it has."""
    if not 0 <= index < n:
        raise IndexError(f"{name}: index {index} out of range for {n} rows")


def json_object(line: str, row_id: str, source: str) -> dict[str, Any]:
    """One JSONL line as an object, or a BadRowError (``invalid JSON: ...``) naming the row."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        raise BadRowError(source, row_id, f"invalid JSON: {exc}") from exc
    if not isinstance(obj, dict):
        raise BadRowError(source, row_id, f"invalid JSON: expected an object, got {type(obj).__name__}")
    return obj
