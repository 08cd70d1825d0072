"""Parquet and ``datasets`` plumbing shared by the readers and writers of image datasets.

Why a module of its own: the Pick-a-Pic pairs reader, the ranked-list reader
and the dual-caption writer all find a split's parquet shards, read image
cells as undecoded bytes and scan small columns in chunks; none of that knows
what the columns mean, so it lives here once, under public names.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from diffalign.data.types import BadRowError, NoUsableRowsError

if TYPE_CHECKING:
    import datasets

__all__ = [
    "CHUNK_ROWS",
    "image_payload",
    "is_save_to_disk",
    "pick_split",
    "require_parquet_rows",
    "select_split_files",
    "split_labels",
    "undecoded_images",
]

# Rows per Arrow slice when scanning small columns: bounded memory, few Python round trips.
CHUNK_ROWS = 65_536

_KNOWN_SPLIT = re.compile(r"^(train|test|validation|valid|val|dev|eval)(_[a-z0-9]+)?$", re.IGNORECASE)


def undecoded_images(ds: datasets.Dataset, columns: Sequence[str]) -> datasets.Dataset:
    """Make image columns yield bytes/paths: some Hub copies type them as ``Image()`` or lists of ``Image()``.

    Decoding then happens once, in the reader's ``load``, where a bad image is a
    reported row rather than a crash inside ``datasets``.
    """
    import datasets

    for col in columns:
        feature = ds.features.get(col)
        if isinstance(feature, datasets.Image):
            if feature.decode:
                ds = ds.cast_column(col, datasets.Image(decode=False))
            continue
        inner = getattr(feature, "feature", None)  # a list (Sequence/List) of images
        if isinstance(inner, datasets.Image) and inner.decode:
            ds = ds.cast_column(col, type(feature)(datasets.Image(decode=False)))
    return ds


def image_payload(value: Any, row_id: str, source: str) -> bytes | str:
    """An image cell as encoded bytes or a path string, or a BadRowError naming the row."""
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, dict):  # datasets.Image(decode=False): {"bytes": ..., "path": ...}
        if value.get("bytes"):
            return bytes(value["bytes"])
        if value.get("path"):
            return str(value["path"])
    if value is None:
        raise BadRowError(source, row_id, "undecodable image: image cell is empty (null)")
    raise BadRowError(source, row_id, f"undecodable image: unexpected cell type {type(value).__name__}")


def require_parquet_rows(files: Sequence[Path], rows: Sequence[int], root: Path) -> None:
    """NoUsableRowsError when the footers say there are no rows: ``datasets`` would fail with a traceback of its own."""
    if sum(rows) == 0:
        names = ", ".join(str(f) for f in files[:5]) + (", ..." if len(files) > 5 else "")
        raise NoUsableRowsError(f"{root}: the data set is empty: its parquet file(s) hold 0 rows ({names})")


def split_labels(rel: Path) -> set[str]:
    """Names that may mark a parquet file's split: its folders, its stem, its stem before '-'."""
    stem = rel.name[: -len(".parquet")]
    return {*rel.parts[:-1], stem, stem.split("-", 1)[0]}


def select_split_files(root: Path, split: str) -> list[Path]:
    """Parquet files under ``root`` (recursive) that belong to ``split``.

    A file belongs to a split when the split's name is one of its folders
    (``train/x.parquet``), its stem, or its stem's prefix before ``-``
    (``train-00000-of-00010.parquet``, the Hub's layout). When no file names
    the split and no file names any split, all files are one unnamed split.
    """
    files = sorted(p for p in root.rglob("*.parquet") if p.is_file())
    if not files:
        raise FileNotFoundError(f"{root}: directory contains no .parquet files (searched recursively)")
    rels = [p.relative_to(root) for p in files]
    chosen = [f for f, r in zip(files, rels) if split in split_labels(r)]
    if chosen:
        return chosen
    found = sorted({lab for r in rels for lab in split_labels(r) if _KNOWN_SPLIT.match(lab)})
    if found:
        raise FileNotFoundError(
            f"{root}: no parquet files for split {split!r}; splits found: {found}"
        )
    return files


def pick_split(obj: Any, split: str, where: str) -> datasets.Dataset:
    """The ``split`` of a DatasetDict, or the Dataset itself (a single-split save)."""
    import datasets

    if isinstance(obj, datasets.DatasetDict):
        if split not in obj:
            raise KeyError(f"{where}: no split {split!r}; splits present: {sorted(obj)}")
        return obj[split]
    if isinstance(obj, datasets.Dataset):
        return obj
    raise TypeError(f"{where}: expected a datasets Dataset or DatasetDict, got {type(obj).__name__}")


def is_save_to_disk(path: Path) -> bool:
    """Whether ``path`` is a ``datasets.save_to_disk`` folder (a DatasetDict or a single Dataset)."""
    return (path / "dataset_dict.json").is_file() or (
        (path / "state.json").is_file() and (path / "dataset_info.json").is_file()
    )
