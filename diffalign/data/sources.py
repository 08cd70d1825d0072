"""Readers that turn preference datasets into winner-first PreferenceGroups.

Design:

* Opening a source runs only *cheap* checks (labels, captions, manifest
  keys, file existence) over the small columns; images are decoded lazily in
  :meth:`PreferenceSource.load`, which raises :class:`BadRowError` for the
  caller to skip and report. Pick-a-Pic v2 has ~850k rows of JPEG bytes, so
  it is read through ``datasets`` (Arrow, memory-mapped), never into RAM.
* Every dropped row, ties included, goes to the :class:`SkipReport`.
* A whole-dataset problem (missing column, no files for the split) raises
  immediately with the file and the column named: that is a bad dataset,
  not a bad row.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Protocol, runtime_checkable

from diffalign.data.jsonl import JsonlSource
from diffalign.data.pickapic import open_pickapic
from diffalign.data.ranked import RankedSource, looks_ranked
from diffalign.data.report import SkipReport
from diffalign.data.types import PreferenceGroup

if TYPE_CHECKING:
    from diffalign.config import DataConfig

__all__ = ["PreferenceSource", "open_preference_source", "open_source"]

Format = Literal["auto", "pickapic", "jsonl", "ranked"]


@runtime_checkable
class PreferenceSource(Protocol):
    """Indexable preference rows; indices cover only rows that passed the cheap checks."""

    name: str

    def __len__(self) -> int: ...

    def load(self, index: int, min_side: int | None = None) -> PreferenceGroup:
        """Decode row ``index`` (winner first); raises BadRowError for a bad row.

        ``min_side``: the images are only needed at that shorter side (see ``decode_image``)."""
        ...

    def row_id(self, index: int) -> str: ...

    def fingerprint(self) -> str:
        """Stable hash of the data and the reader options, for cache invalidation."""
        ...


# --------------------------------------------------------------------------- entry point


def open_preference_source(
    path: str | os.PathLike[str],
    *,
    format: Format = "auto",
    split: str = "train",
    drop_ties: bool = True,
    max_rows: int | None = None,
    report: SkipReport,
    cache_dir: str | os.PathLike[str] | None = None,
    group_size: int | None = None,
) -> PreferenceSource:
    """Open preference data at ``path`` (see the module docstring for the layouts).

    Args:
        path: a ``.parquet`` file, a directory of parquet files, a
            ``datasets.save_to_disk`` folder, a Hub id ``owner/name`` (only when
            no such local path exists), or a ``.jsonl`` manifest.
        format: ``"auto"`` picks ``"ranked"`` for a ``.jsonl`` file whose first
            object has an ``"images"`` key or parquet with ``images`` and
            ``scores`` columns, else ``"jsonl"`` for ``.jsonl`` files, else
            ``"pickapic"``. ``"ranked"``: k images per prompt with scores
            (:class:`~diffalign.data.ranked.RankedSource`).
        split: which split of a multi-split directory / DatasetDict / Hub dataset
            (ignored for JSONL).
        drop_ties: drop ``label_0 == 0.5`` rows (counted as ``"tie"``). ``False``
            keeps them with image 0 first -- rarely what you want for a pairwise
            objective (it learns an arbitrary preference); scores are 0.5/0.5.
            Ranked data: a tie is a row whose scores are all equal.
        max_rows: keep at most this many rows (the first that pass the checks).
        report: receives every skipped row.
        cache_dir: ``datasets`` cache for the Arrow conversion of parquet / Hub data
            (default: the HF datasets cache).
        group_size: the k every group must have. Ranked data: rows of another
            size are skipped; None takes the first kept row's k. Pair formats
            accept only None or 2.
    """
    if max_rows is not None and max_rows < 0:
        raise ValueError(f"max_rows must be >= 0 or None, got {max_rows}")
    path_str = os.fspath(path)
    p = Path(path_str).expanduser()
    fmt = format
    if fmt == "auto":
        if looks_ranked(p, split):
            fmt = "ranked"
        else:
            fmt = "jsonl" if p.suffix == ".jsonl" else "pickapic"
    if group_size not in (None, 2) and fmt != "ranked":
        raise ValueError(f"group_size={group_size}: {p} was opened as {fmt!r}, whose groups are pairs (k = 2)")
    cache = os.fspath(cache_dir) if cache_dir is not None else None
    if fmt == "ranked":
        return RankedSource(
            p, report=report, split=split, group_size=group_size, drop_ties=drop_ties,
            max_rows=max_rows, cache_dir=cache,
        )
    if fmt == "jsonl":
        if not p.is_file():
            raise FileNotFoundError(
                f"{p}: no such file; expected a JSONL manifest with one "
                '{"prompt": ..., "chosen": <image path>, "rejected": <image path>} object per line'
            )
        options = {"format": "jsonl", "max_rows": max_rows}
        return JsonlSource(p, max_rows=max_rows, report=report, options=options)
    if fmt == "pickapic":
        options = {"format": "pickapic", "split": split, "drop_ties": drop_ties, "max_rows": max_rows}
        return open_pickapic(path_str, split, drop_ties, max_rows, report, cache, options)
    raise ValueError(f"unknown format {format!r}; expected 'auto', 'pickapic', 'jsonl' or 'ranked'")


def open_source(data: DataConfig, report: SkipReport) -> PreferenceSource:
    """The preference source a config's ``data`` section names, opened with its reader options.

    One place maps the config's fields onto :func:`open_preference_source`, so
    the encoder cache, training and PSO's reference sampling open the same rows.
    """
    return open_preference_source(
        data.path, format=data.format, split=data.split, drop_ties=data.drop_ties, max_rows=data.max_rows, report=report
    )
