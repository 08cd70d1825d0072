"""Ranked preference lists (RankDPO): k images per prompt with soft scores.

Why a reader of its own: a listwise objective needs every group of a batch to
hold the same k images, sorted best first, with their scores (e.g. RankDPO's
averaged win rate ``phi_i = C_i / (n (k-1))``) travelling along. Rows look like::

    {"prompt": str, "images": [k payloads], "scores": [k floats, higher is better],
     "models": [k str] (optional), "id" / "ranking_id" (optional)}

stored as parquet (a file or a folder of shards; images as JPEG/PNG bytes or
as paths) or as JSONL (one object per line; images as paths). Paths are
relative to the file's folder unless absolute. Opening runs cheap checks only
(no decoding); images are decoded in :meth:`RankedSource.load`. Parquet is read
memory-mapped through ``datasets`` (Arrow), never into RAM. The row checks
and the two layouts live in :mod:`diffalign.data.ranked_layout`.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from diffalign.data.common import READER_VERSION, check_index, stat_entry
from diffalign.data.images import decode_image
from diffalign.data.parquet import is_save_to_disk, select_split_files
from diffalign.data.ranked_layout import (
    RANKED_REQUIRED_COLUMNS,
    JsonlLayout,
    ParquetLayout,
    RowGate,
    ranked_parquet_files,
)
from diffalign.data.report import SkipReport
from diffalign.data.types import PreferenceGroup

__all__ = ["RANKED_REQUIRED_COLUMNS", "RankedSource", "looks_ranked"]


# --------------------------------------------------------------------------- the source


class RankedSource:
    """Ranked lists of k images per prompt, sorted best first (stable, by descending score).

    Every kept group has the dataset's group size: ``group_size`` when given,
    else the size of the first kept row. Rows of another size, mismatched
    lengths, fewer than 2 images, non-finite or non-numeric scores, empty
    prompts, missing image files (paths) and -- with ``drop_ties`` -- rows whose
    scores are all equal are reported and skipped. Row ids: ``"<file>:<line>"``
    (JSONL), ``"<file>:<id>"`` with the ``id``/``ranking_id`` column, else
    ``"<file>:<row>"`` (parquet). ``max_rows`` keeps the first rows that pass.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        report: SkipReport,
        split: str = "train",
        group_size: int | None = None,
        drop_ties: bool = True,
        max_rows: int | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        if group_size is not None and group_size < 2:
            raise ValueError(f"group_size must be >= 2 or None, got {group_size}")
        if max_rows is not None and max_rows < 0:
            raise ValueError(f"max_rows must be >= 0 or None, got {max_rows}")
        p = Path(os.fspath(path)).expanduser()
        self.path = p
        self.drop_ties = drop_ties
        options: dict[str, Any] = {"group_size": group_size, "drop_ties": drop_ties, "max_rows": max_rows}
        hasher = hashlib.sha256()
        self._layout: JsonlLayout | ParquetLayout
        if p.suffix == ".jsonl":
            if not p.is_file():
                raise FileNotFoundError(
                    f"{p}: no such file; expected a JSONL file with one "
                    '{"prompt": ..., "images": [paths], "scores": [numbers]} object per line'
                )
            self.name = p.name
            data: list[Any] = [stat_entry(p)]
            hasher.update(_header(data, options))
            self._layout = JsonlLayout(p, RowGate(self.name, group_size, drop_ties), hasher, max_rows, report)
        else:
            files, root = ranked_parquet_files(p, split)
            self.name = p.name if len(files) > 1 else files[0].name
            options["split"] = split
            hasher.update(_header([stat_entry(f) for f in files], options))
            cache = os.fspath(cache_dir) if cache_dir is not None else None
            gate = RowGate(self.name, group_size, drop_ties)
            self._layout = ParquetLayout(files, root, gate, hasher, cache, max_rows, report)
        scores = self._layout.scores
        k = len(scores[0]) if len(scores) else 0
        self._scores = np.asarray(scores, dtype=np.float64).reshape(len(self._layout), k)  # [n, k], file order
        self._fingerprint = hasher.hexdigest()[:20]

    @property
    def group_size(self) -> int | None:
        """k of every group (None when no row was kept)."""
        return int(self._scores.shape[1]) if len(self) else None

    def __len__(self) -> int:
        return len(self._layout)

    def row_id(self, index: int) -> str:
        check_index(self.name, index, len(self))
        return self._layout.row_id(index)

    def load(self, index: int, min_side: int | None = None) -> PreferenceGroup:
        """Decode row ``index``, best first; BadRowError ("undecodable image: ...") for a bad image."""
        check_index(self.name, index, len(self))
        rid = self._layout.row_id(index)
        prompt, payloads, models = self._layout.raw(index)
        scores = self._scores[index]
        order = np.argsort(-scores, kind="stable").tolist()  # best first; equal scores keep file order
        return PreferenceGroup(
            row_id=rid,
            prompt=prompt,
            images=[decode_image(payloads[i], row_id=rid, source=self.name, min_side=min_side) for i in order],
            captions=None,
            scores=[float(scores[i]) for i in order],
            models=[str(models[i]) for i in order] if models is not None else None,
        )

    def fingerprint(self) -> str:
        return self._fingerprint

    def __repr__(self) -> str:
        return f"RankedSource(path={str(self.path)!r}, rows={len(self)}, group_size={self.group_size})"


def _header(data: list[Any], options: dict[str, Any]) -> bytes:
    payload = {"reader": "ranked", "version": READER_VERSION, "data": data, **options}
    return json.dumps(payload, sort_keys=True, default=str).encode()


def looks_ranked(p: Path, split: str) -> bool:
    """Auto-detection: a ``.jsonl`` whose first object has ``"images"``, or parquet with ``images`` and ``scores``.

    Anything unreadable says False, so the existing readers report it as they always did.
    """
    if p.suffix == ".jsonl":
        try:
            with p.open("r", encoding="utf-8") as fh:
                first = next((line for line in fh if line.strip()), "")
            obj = json.loads(first)
        except (OSError, ValueError):
            return False
        return isinstance(obj, dict) and "images" in obj
    try:
        import pyarrow.parquet as pq

        if p.is_file() and p.suffix == ".parquet":
            first_file = p
        elif p.is_dir() and not is_save_to_disk(p):
            first_file = select_split_files(p, split)[0]
        else:
            return False
        names = set(pq.read_schema(first_file).names)
    except (OSError, ValueError):  # missing split, corrupt footer (ArrowInvalid): not ours to report here
        return False
    return {"images", "scores"} <= names
