"""Pick-a-Pic v2-style reader: parquet files, ``datasets.save_to_disk`` folders or Hub ids.

Pick-a-Pic v2 has ~850k rows of JPEG bytes, so it is read through
``datasets`` (Arrow, memory-mapped), never into RAM; opening runs only the
cheap checks (labels, captions) over the small columns and images are decoded
lazily in :meth:`PickapicSource.load`. Use it through
:func:`diffalign.data.sources.open_preference_source`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from diffalign.data.common import READER_VERSION, check_index, stat_entry
from diffalign.data.images import decode_image
from diffalign.data.parquet import (
    CHUNK_ROWS,
    image_payload,
    is_save_to_disk,
    pick_split,
    require_parquet_rows,
    select_split_files,
    undecoded_images,
)
from diffalign.data.report import SkipReport
from diffalign.data.types import PreferenceGroup
from diffalign.fingerprint import fingerprint
from diffalign.hub_access import looks_like_hub_id

if TYPE_CHECKING:
    import datasets
    import pyarrow as pa

__all__ = [
    "LABEL_REASON",
    "PICKAPIC_REQUIRED_COLUMNS",
    "PickapicSource",
    "check_pickapic_schemas",
    "open_pickapic",
    "pickapic_core_fields",
]

PICKAPIC_REQUIRED_COLUMNS: tuple[str, ...] = ("jpg_0", "jpg_1", "label_0", "caption")


def pickapic_core_fields() -> list[tuple[str, Any]]:
    """Pick-a-Pic v2's core columns with their Arrow types (what writers of pair files share)."""
    import pyarrow as pa

    return [
        ("jpg_0", pa.binary()),
        ("jpg_1", pa.binary()),
        ("label_0", pa.float64()),
        ("label_1", pa.float64()),
        ("caption", pa.string()),
        ("model_0", pa.string()),
        ("model_1", pa.string()),
    ]


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# The reason recorded for a row whose label is not a win, loss or tie (the dual-caption writer records it too).
LABEL_REASON = "label out of {0, 0.5, 1}"


@dataclass
class _Origin:
    """Where the rows of a datasets.Dataset came from, for row ids and fingerprints."""

    label: str  # shown in row ids when there is a single file/dataset
    file_labels: list[str]  # per parquet file (empty for save_to_disk / hub)
    file_offsets: np.ndarray  # start row of each file in the concatenated dataset
    fingerprint_items: list[Any]


class PickapicSource:
    """Pick-a-Pic v2-style pairs: ``jpg_0``/``jpg_1`` bytes, ``label_0``(/``label_1``), ``caption``.

    Winner is image 0 when ``label_0 == 1`` and image 1 when ``label_0 == 0``.
    ``label_0 == 0.5`` is a tie: dropped and reported as ``"tie"`` by default;
    with ``drop_ties=False`` ties are kept with image 0 first -- rarely what
    you want, since a pairwise objective then pushes towards an arbitrary one
    of two equally liked images (``scores`` carries the 0.5/0.5 so a
    tie-aware objective can tell). ``scores`` holds the labels, winner first.

    ``max_rows`` keeps the first ``max_rows`` rows that pass the checks and
    stops scanning there (so the report covers only the scanned rows).
    """

    def __init__(
        self,
        ds: datasets.Dataset,
        origin: _Origin,
        *,
        name: str,
        drop_ties: bool,
        max_rows: int | None,
        report: SkipReport,
        options: dict[str, Any],
    ) -> None:
        self.name = name
        self._origin = origin
        self.drop_ties = drop_ties
        columns = set(ds.column_names)
        _check_columns(columns, name)
        self._has_label_1 = "label_1" in columns
        self._has_ranking_id = "ranking_id" in columns
        self._caption_pair = [c for c in ("caption_0", "caption_1") if c in columns]
        if len(self._caption_pair) == 1:
            raise ValueError(
                f"{name}: has column {self._caption_pair[0]!r} but not its partner; "
                "per-image captions need both caption_0 and caption_1"
            )
        self._models = all(c in columns for c in ("model_0", "model_1"))
        ds = undecoded_images(ds, ("jpg_0", "jpg_1"))

        load_cols = ["jpg_0", "jpg_1", "caption", *self._caption_pair]
        if self._models:
            load_cols += ["model_0", "model_1"]
        self._load_ds = ds.select_columns(load_cols)
        self._id_ds = ds.select_columns(["ranking_id"]) if self._has_ranking_id else None

        kept, labels = self._scan(ds, max_rows, report)
        self._kept = kept  # global row index of each kept row
        self._labels = labels  # [n, 2] label_0, label_1 of each kept row
        self._fingerprint = fingerprint(
            {"reader": "pickapic", "version": READER_VERSION, "data": origin.fingerprint_items, **options}, 20
        )

    # -- cheap checks ---------------------------------------------------------

    def _scan(self, ds: datasets.Dataset, max_rows: int | None, report: SkipReport) -> tuple[np.ndarray, np.ndarray]:
        import pyarrow as pa
        import pyarrow.compute as pc

        check_cols = ["label_0", "caption", *self._caption_pair]
        if self._has_label_1:
            check_cols.append("label_1")
        if self._has_ranking_id:
            check_cols.append("ranking_id")
        small = ds.select_columns(check_cols).with_format("arrow")

        kept_parts: list[np.ndarray] = []
        label_parts: list[np.ndarray] = []
        n_kept = 0
        n_rows = len(ds)
        for start in range(0, n_rows, CHUNK_ROWS):
            if max_rows is not None and n_kept >= max_rows:
                break
            table: pa.Table = small[start : start + CHUNK_ROWS]
            l0 = self._float_column(table, "label_0")
            l1 = self._float_column(table, "label_1") if self._has_label_1 else 1.0 - l0
            with np.errstate(invalid="ignore"):
                label_ok = np.isfinite(l0) & ((l0 == 0.0) | (l0 == 0.5) | (l0 == 1.0))
                if self._has_label_1:
                    label_ok &= np.isfinite(l1) & (np.abs(l0 + l1 - 1.0) <= 1e-6)
            caption_ok = np.ones(len(l0), dtype=bool)
            for col in ["caption", *self._caption_pair]:
                caption_ok &= self._caption_present(table, col, pa, pc)
            tie = l0 == 0.5
            keep = label_ok & caption_ok & (~tie if self.drop_ties else True)

            stop = len(keep)  # rows of this chunk that count as scanned
            if max_rows is not None:
                cum = np.cumsum(keep)
                if cum.size and cum[-1] >= max_rows - n_kept:
                    stop = int(np.searchsorted(cum, max_rows - n_kept)) + 1
            keep = keep[:stop]
            report.add_rows(stop)

            bad = np.flatnonzero(~keep)
            if bad.size:
                ids = table.column("ranking_id") if self._has_ranking_id else None
                for j in bad.tolist():
                    if not label_ok[j]:
                        detail = f"label_0={float(l0[j])}" + (f", label_1={float(l1[j])}" if self._has_label_1 else "")
                        reason = f"{LABEL_REASON}: {detail}"
                    elif not caption_ok[j]:
                        reason = "missing caption"
                    else:
                        reason = "tie"
                    rid = self._make_row_id(start + j, None if ids is None else ids[j].as_py())
                    report.record(self.name, rid, reason)

            idx = np.flatnonzero(keep)
            kept_parts.append(idx.astype(np.int64) + start)
            label_parts.append(np.stack([l0[idx], np.asarray(l1)[idx]], axis=1))
            n_kept += idx.size
        kept = np.concatenate(kept_parts) if kept_parts else np.zeros(0, dtype=np.int64)
        labels = np.concatenate(label_parts) if label_parts else np.zeros((0, 2), dtype=np.float64)
        return kept, labels

    def _float_column(self, table: pa.Table, col: str) -> np.ndarray:
        import pyarrow as pa
        import pyarrow.compute as pc

        column = table.column(col)
        try:
            as_float = pc.cast(column, pa.float64())
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
            raise ValueError(
                f"{self.name}: column {col!r} has type {column.type}, expected numbers (0, 0.5 or 1)"
            ) from exc
        return np.asarray(as_float.to_numpy(zero_copy_only=False), dtype=np.float64)

    def _caption_present(self, table: pa.Table, col: str, pa: Any, pc: Any) -> np.ndarray:
        column = table.column(col)
        if pa.types.is_null(column.type):
            return np.zeros(len(column), dtype=bool)
        if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
            raise ValueError(
                f"{self.name}: column {col!r} has type {column.type}, expected text captions"
            )
        lengths = pc.utf8_length(pc.utf8_trim_whitespace(column))
        ok = pc.fill_null(pc.greater(lengths, 0), False)
        return np.asarray(ok.to_numpy(zero_copy_only=False), dtype=bool)

    # -- row access -----------------------------------------------------------

    def _make_row_id(self, global_row: int, ranking_id: Any) -> str:
        o = self._origin
        if o.file_labels:
            f = int(np.searchsorted(o.file_offsets, global_row, side="right")) - 1
            where, local = o.file_labels[f], global_row - int(o.file_offsets[f])
        else:
            where, local = o.label, global_row
        return f"{where}:{ranking_id if ranking_id is not None else local}"

    def __len__(self) -> int:
        return int(self._kept.size)

    def row_id(self, index: int) -> str:
        check_index(self.name, index, len(self))
        g = int(self._kept[index])
        rid = self._id_ds[g]["ranking_id"] if self._id_ds is not None else None
        return self._make_row_id(g, rid)

    def load(self, index: int, min_side: int | None = None) -> PreferenceGroup:
        check_index(self.name, index, len(self))
        g = int(self._kept[index])
        row = self._load_ds[g]
        rid = self.row_id(index)
        l0, l1 = (float(x) for x in self._labels[index])
        order = [1, 0] if l0 == 0.0 else [0, 1]
        images = [decode_image(image_payload(row[f"jpg_{i}"], rid, self.name), row_id=rid, source=self.name, min_side=min_side)
                  for i in order]
        captions = [row[f"caption_{i}"] for i in order] if self._caption_pair else None
        models = None
        if self._models and row["model_0"] is not None and row["model_1"] is not None:
            models = [str(row[f"model_{i}"]) for i in order]
        labels = [l0, l1]
        return PreferenceGroup(
            row_id=rid,
            prompt=row["caption"],
            images=images,
            captions=captions,
            scores=[labels[i] for i in order],
            models=models,
        )

    def has_captions(self, index: int) -> bool:
        """Per-image captions come as whole columns: rows whose caption_0/caption_1 are empty were skipped at open."""
        return bool(self._caption_pair)

    def fingerprint(self) -> str:
        return self._fingerprint

    def __repr__(self) -> str:
        return f"PickapicSource(name={self.name!r}, rows={len(self)}, drop_ties={self.drop_ties})"


# -- locating Pick-a-Pic data ---------------------------------------------------


def _check_columns(columns: set[str], where: str) -> None:
    """A missing required column is a bad dataset, not a bad row: fail now, naming both."""
    missing = [c for c in PICKAPIC_REQUIRED_COLUMNS if c not in columns]
    if missing:
        raise ValueError(
            f"{where}: not Pick-a-Pic data: missing required column {missing[0]!r}"
            f" (missing: {missing}; columns present: {sorted(columns)})"
        )


def check_pickapic_schemas(files: Sequence[Path]) -> None:
    """Every parquet file has Pick-a-Pic's required columns: read from the footers, before any row."""
    import pyarrow.parquet as pq

    for f in files:
        _check_columns(set(pq.read_schema(f).names), str(f))


def _open_parquet(
    files: list[Path], root: Path, cache_dir: str | None
) -> tuple[datasets.Dataset, _Origin]:
    import datasets
    import pyarrow.parquet as pq

    check_pickapic_schemas(files)
    rows = [pq.ParquetFile(f).metadata.num_rows for f in files]
    require_parquet_rows(files, rows, root)
    ds = datasets.load_dataset(
        "parquet", data_files=[str(f) for f in files], split="train", cache_dir=cache_dir
    )
    if len(ds) != sum(rows):
        raise RuntimeError(
            f"{root}: datasets loaded {len(ds)} rows but the parquet footers say {sum(rows)}"
        )
    labels = [f.name if f == root else str(f.relative_to(root)) for f in files]
    offsets = np.concatenate([[0], np.cumsum(rows)[:-1]]).astype(np.int64)
    return ds, _Origin(
        label=labels[0] if len(labels) == 1 else root.name,
        file_labels=labels,
        file_offsets=offsets,
        fingerprint_items=[stat_entry(f) for f in files],
    )


def open_pickapic(
    path: str, split: str, drop_ties: bool, max_rows: int | None, report: SkipReport,
    cache_dir: str | None, options: dict[str, Any],
) -> PickapicSource:
    """Pick-a-Pic pairs from a parquet file or folder, a ``save_to_disk`` folder or a Hub id (in that order)."""
    import datasets

    p = Path(path).expanduser()
    if p.is_file():
        if p.suffix != ".parquet":
            raise ValueError(f"{p}: expected a .parquet file (or a .jsonl manifest with format='jsonl')")
        ds, origin = _open_parquet([p], p, cache_dir)
        name = p.name
    elif p.is_dir():
        if is_save_to_disk(p):
            ds = pick_split(datasets.load_from_disk(str(p)), split, str(p))
            _check_columns(set(ds.column_names), str(p))
            files = sorted(q for q in p.rglob("*") if q.is_file())
            name = p.name
            label = p.name if (p / "state.json").is_file() else f"{p.name}/{split}"
            origin = _Origin(label, [], np.zeros(0, np.int64), [stat_entry(q) for q in files])
        else:
            files = select_split_files(p, split)
            ds, origin = _open_parquet(files, p, cache_dir)
            name = p.name if len(files) > 1 else files[0].name
    elif _HUB_ID.match(path) and looks_like_hub_id(path) and not p.exists():
        from diffalign.hub_access import go_offline_if_unreachable

        offline = go_offline_if_unreachable()  # an unreachable hub fails at once, not after five retries per file
        try:
            ds = pick_split(datasets.load_dataset(path, split=split, cache_dir=cache_dir), split, path)
        except Exception as exc:
            why = f"it is not in the local cache and {offline}" if offline else f"{type(exc).__name__}: {exc}"
            raise FileNotFoundError(
                f"{path!r}: no such local file or directory, and loading it as a Hub dataset "
                f"(split {split!r}) failed: {why}"
            ) from exc
        _check_columns(set(ds.column_names), f"{path} (Hub, split {split!r})")
        name = f"{path}[{split}]"
        items = [[c["filename"], *(stat_entry(Path(c["filename"]))[1:])] for c in ds.cache_files]
        origin = _Origin(name, [], np.zeros(0, np.int64), [path, split, ds.info.version, items])
    else:
        where = "" if p.is_absolute() else f" (a local path, not a hub id: looked for {p.resolve()})"
        raise FileNotFoundError(
            f"{path}: no such file or directory{where}; expected a .parquet file, a directory of "
            "parquet files, a datasets.save_to_disk folder, a .jsonl manifest, or a Hub id 'owner/name'"
        )
    return PickapicSource(
        ds, origin, name=name, drop_ties=drop_ties, max_rows=max_rows, report=report, options=options
    )
