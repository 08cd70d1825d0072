"""Open-time scanning of ranked preference data: the JSONL and parquet layouts behind :class:`RankedSource`.

Why a module of its own: :mod:`diffalign.data.ranked` is the reader's public
face (:class:`~diffalign.data.ranked.RankedSource`, auto-detection); the
row checks and the two on-disk layouts it opens are long and only it uses
them. Opening runs cheap checks only: scores, prompts, list lengths and
(for paths) a stat of each image file, all folded into the fingerprint;
image bytes are never read here. Nothing in this module imports
:mod:`diffalign.data.ranked`, so there is no import cycle.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from diffalign.data.common import json_object, stat_entry
from diffalign.data.parquet import (
    CHUNK_ROWS,
    image_payload,
    is_save_to_disk,
    require_parquet_rows,
    select_split_files,
    undecoded_images,
)
from diffalign.data.report import SkipReport
from diffalign.data.types import BadRowError

if TYPE_CHECKING:
    import datasets
    import pyarrow as pa

__all__ = ["RANKED_REQUIRED_COLUMNS", "JsonlLayout", "ParquetLayout", "RowGate", "ranked_parquet_files"]

RANKED_REQUIRED_COLUMNS: tuple[str, ...] = ("prompt", "images", "scores")
_ID_COLUMNS = ("id", "ranking_id")  # first present one names the rows


class RowGate:
    """Row checks shared by both layouts: value checks, one group size, ties."""

    def __init__(self, name: str, group_size: int | None, drop_ties: bool) -> None:
        self.name = name
        self.k = group_size
        self.drop_ties = drop_ties

    def check(self, rid: str, prompt: Any, n_images: int, scores: Any, models: Any) -> tuple[list[float], list[str] | None]:
        """Validated ``(scores, models)`` of a row, or BadRowError with a ``"<category>: <detail>"`` reason."""
        if not isinstance(prompt, str) or not prompt.strip():
            raise BadRowError(self.name, rid, "missing caption: 'prompt' is empty or not a string")
        if not isinstance(scores, (list, tuple)):
            raise BadRowError(self.name, rid, f"bad value: 'scores' must be a list, got {type(scores).__name__}")
        if models is not None and not isinstance(models, (list, tuple)):
            raise BadRowError(self.name, rid, f"bad value: 'models' must be a list, got {type(models).__name__}")
        sizes = f"{n_images} images, {len(scores)} scores" + (f", {len(models)} models" if models is not None else "")
        if len(scores) != n_images or (models is not None and len(models) != n_images):
            raise BadRowError(self.name, rid, f"size mismatch: {sizes}")
        if n_images < 2:
            raise BadRowError(self.name, rid, f"too few images: {n_images} (a ranked list needs >= 2)")
        for i, s in enumerate(scores):
            if isinstance(s, bool) or not isinstance(s, (int, float)):
                raise BadRowError(self.name, rid, f"bad score: scores[{i}] = {s!r} is not a number")
            if not math.isfinite(s):
                raise BadRowError(self.name, rid, f"bad score: scores[{i}] = {s} is not finite")
        if models is not None and not all(isinstance(m, str) for m in models):
            raise BadRowError(self.name, rid, "bad value: 'models' must hold strings")
        if self.k is not None and n_images != self.k:
            raise BadRowError(
                self.name, rid, f"group size differs: {n_images} images, the dataset's groups have {self.k}"
            )
        if self.drop_ties and len(set(scores)) == 1:
            raise BadRowError(self.name, rid, f"tie: all {n_images} scores equal {scores[0]}")
        return [float(s) for s in scores], (list(models) if models is not None else None)

    def kept(self, n_images: int) -> None:
        """The first kept row fixes the group size (groups of one dataset are batched together)."""
        if self.k is None:
            self.k = n_images


def _resolve(value: Any, base: Path, name: str, rid: str, i: int) -> Path:
    if not isinstance(value, str) or not value:
        raise BadRowError(name, rid, f"bad value: images[{i}] must be a non-empty path string")
    p = Path(value).expanduser()
    return p if p.is_absolute() else base / p


def _stat_image(p: Path, name: str, rid: str, i: int) -> list[Any]:
    """Stat a referenced image (for the fingerprint); a missing one is a row problem."""
    try:
        entry = stat_entry(p)
    except OSError:
        raise BadRowError(name, rid, f"missing image file: images[{i}] -> {p}") from None
    if not p.is_file():
        raise BadRowError(name, rid, f"missing image file: images[{i}] -> {p} is not a file")
    return entry


# --------------------------------------------------------------------------- layouts


@dataclass(frozen=True)
class _JsonlRow:
    row_id: str
    prompt: str
    images: tuple[Path, ...]
    models: tuple[str, ...] | None


class JsonlLayout:
    """Rows of a JSONL file, kept in memory (paths and small values only)."""

    def __init__(self, path: Path, gate: RowGate, hasher: Any, max_rows: int | None, report: SkipReport) -> None:
        self.rows: list[_JsonlRow] = []
        self.scores: list[list[float]] = []
        self._name, self._base = gate.name, path.parent
        with path.open("r", encoding="utf-8") as fh:
            for line_no, line in enumerate(fh, start=1):
                if max_rows is not None and len(self.rows) >= max_rows:
                    break
                if not line.strip():
                    continue
                report.add_rows(1)
                rid = f"{path.name}:{line_no}"
                try:
                    row, scores, stats = self._parse(line, rid, gate)
                except BadRowError as err:
                    report.record(self._name, rid, err.reason)
                    continue
                gate.kept(len(row.images))
                self.rows.append(row)
                self.scores.append(scores)
                for s in stats:
                    hasher.update(json.dumps(s).encode())

    def _parse(self, line: str, rid: str, gate: RowGate) -> tuple[_JsonlRow, list[float], list[list[Any]]]:
        obj = json_object(line, rid, self._name)
        for key in RANKED_REQUIRED_COLUMNS:
            if key not in obj:
                raise BadRowError(self._name, rid, f"missing key: {key!r}")
        images = obj["images"]
        if not isinstance(images, list):
            raise BadRowError(self._name, rid, f"bad value: 'images' must be a list of paths, got {type(images).__name__}")
        scores, models = gate.check(rid, obj["prompt"], len(images), obj["scores"], obj.get("models"))
        paths = [_resolve(v, self._base, self._name, rid, i) for i, v in enumerate(images)]
        stats = [_stat_image(p, self._name, rid, i) for i, p in enumerate(paths)]
        models_t = tuple(models) if models is not None else None
        return _JsonlRow(rid, obj["prompt"], tuple(paths), models_t), scores, stats

    def __len__(self) -> int:
        return len(self.rows)

    def row_id(self, index: int) -> str:
        return self.rows[index].row_id

    def raw(self, index: int) -> tuple[str, list[bytes | str | Path], list[str] | None]:
        r = self.rows[index]
        return r.prompt, list(r.images), list(r.models) if r.models is not None else None


class ParquetLayout:
    """Rows of parquet files through ``datasets`` (memory-mapped Arrow); keeps only row indices."""

    def __init__(self, files: list[Path], root: Path, gate: RowGate, hasher: Any, cache_dir: str | None,
                 max_rows: int | None, report: SkipReport) -> None:
        import datasets
        import pyarrow.parquet as pq

        self._name = gate.name
        for f in files:
            _check_ranked_schema(pq.read_schema(f), str(f))
        rows = [pq.ParquetFile(f).metadata.num_rows for f in files]
        require_parquet_rows(files, rows, root)
        ds = datasets.load_dataset("parquet", data_files=[str(f) for f in files], split="train", cache_dir=cache_dir)
        if len(ds) != sum(rows):
            raise RuntimeError(f"{root}: datasets loaded {len(ds)} rows but the parquet footers say {sum(rows)}")
        ds = undecoded_images(ds, ("images",))
        columns = set(ds.column_names)
        self._labels = [f.name if f == root else str(f.relative_to(root)) for f in files]
        self._folders = [f.parent for f in files]
        self._offsets = np.concatenate([[0], np.cumsum(rows)[:-1]]).astype(np.int64)
        self._id_col = next((c for c in _ID_COLUMNS if c in columns), None)
        self._has_models = "models" in columns
        self._id_ds = ds.select_columns([self._id_col]) if self._id_col else None
        self._load_ds = ds.select_columns(["prompt", "images", *(["models"] if self._has_models else [])])
        image_type = ds.data.schema.field("images").type.value_type
        self._paths = _is_text(image_type)  # paths to check at open time; bytes are checked at load
        kept, scores = self._scan(ds, gate, hasher, max_rows, report)
        self.kept = np.asarray(kept, dtype=np.int64)  # global row of each kept row
        self.scores = np.concatenate(scores) if scores else np.zeros((0, 0))  # [n, k]

    def _scan(
        self, ds: datasets.Dataset, gate: RowGate, hasher: Any, max_rows: int | None, report: SkipReport
    ) -> tuple[list[int], list[np.ndarray]]:
        """Check the small columns chunk by chunk; image bytes are never read (list lengths only)."""
        import pyarrow.compute as pc

        cols = ["prompt", "images", "scores", *(["models"] if self._has_models else []),
                *([self._id_col] if self._id_col else [])]
        small = ds.select_columns(cols).with_format("arrow")
        kept: list[int] = []
        score_parts: list[np.ndarray] = []  # one [m, k] array per chunk: no per-row Python lists kept
        for start in range(0, len(ds), CHUNK_ROWS):
            chunk_scores: list[list[float]] = []
            table: pa.Table = small[start : start + CHUNK_ROWS]
            images = table.column("images")
            lengths = pc.fill_null(pc.list_value_length(images), -1).to_numpy(zero_copy_only=False)
            prompts = table.column("prompt").to_pylist()
            scores = table.column("scores").to_pylist()
            models = table.column("models").to_pylist() if self._has_models else [None] * len(prompts)
            ids = table.column(self._id_col).to_pylist() if self._id_col else None
            for j in range(len(prompts)):
                if max_rows is not None and len(kept) >= max_rows:
                    break
                report.add_rows(1)
                g = start + j
                rid = self._make_row_id(g, None if ids is None else ids[j])
                try:
                    if lengths[j] < 0:
                        raise BadRowError(self._name, rid, "bad value: 'images' is null")
                    row_scores, _ = gate.check(rid, prompts[j], int(lengths[j]), scores[j], models[j])
                    stats = self._check_paths(images[j].as_py(), g, rid) if self._paths else []
                except BadRowError as err:
                    report.record(self._name, rid, err.reason)
                    continue
                gate.kept(int(lengths[j]))
                kept.append(g)
                chunk_scores.append(row_scores)
                for s in stats:
                    hasher.update(json.dumps(s).encode())
            if chunk_scores:
                score_parts.append(np.asarray(chunk_scores, dtype=np.float64))
            if max_rows is not None and len(kept) >= max_rows:
                break
        return kept, score_parts

    def _check_paths(self, values: list[Any], g: int, rid: str) -> list[list[Any]]:
        base = self._folder(g)
        return [_stat_image(_resolve(v, base, self._name, rid, i), self._name, rid, i) for i, v in enumerate(values)]

    def _file_of(self, g: int) -> int:
        return int(np.searchsorted(self._offsets, g, side="right")) - 1

    def _folder(self, g: int) -> Path:
        return self._folders[self._file_of(g)]

    def _make_row_id(self, g: int, row_key: Any) -> str:
        f = self._file_of(g)
        return f"{self._labels[f]}:{row_key if row_key is not None else g - int(self._offsets[f])}"

    def __len__(self) -> int:
        return len(self.kept)

    def row_id(self, index: int) -> str:
        g = int(self.kept[index])
        return self._make_row_id(g, self._id_ds[g][self._id_col] if self._id_ds is not None else None)

    def raw(self, index: int) -> tuple[str, list[bytes | str | Path], list[str] | None]:
        g = int(self.kept[index])
        row = self._load_ds[g]
        rid, base = self.row_id(index), self._folder(g)
        payloads: list[bytes | str | Path] = []
        for value in row["images"]:
            payload = value if isinstance(value, str) else image_payload(value, rid, self._name)
            if isinstance(payload, str):  # a path, relative to the parquet file's folder
                payload = _resolve(payload, base, self._name, rid, len(payloads))
            payloads.append(payload)
        return row["prompt"], payloads, row["models"] if self._has_models else None


def _is_text(t: pa.DataType) -> bool:
    import pyarrow as pa

    return pa.types.is_string(t) or pa.types.is_large_string(t)


def _check_ranked_schema(schema: pa.Schema, where: str) -> None:
    """A missing or mistyped column is a bad dataset, not a bad row: fail now, naming file and column."""
    import pyarrow as pa

    missing = [c for c in RANKED_REQUIRED_COLUMNS if c not in schema.names]
    if missing:
        raise ValueError(
            f"{where}: not ranked preference data: missing required column {missing[0]!r} "
            f"(missing: {missing}; columns present: {sorted(schema.names)})"
        )
    for col in ("images", "scores", *(["models"] if "models" in schema.names else [])):
        t = schema.field(col).type
        if not (pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)):
            raise ValueError(f"{where}: column {col!r} has type {t}, expected a list per row")
    t = schema.field("images").type.value_type
    if not (_is_text(t) or pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_struct(t)):
        raise ValueError(f"{where}: column 'images' holds {t}, expected image bytes or path strings")


def ranked_parquet_files(p: Path, split: str) -> tuple[list[Path], Path]:
    """The parquet files of ``split`` at ``p`` (a file or a folder of shards) and the root their labels are relative to."""
    if p.is_file():
        if p.suffix != ".parquet":
            raise ValueError(f"{p}: ranked data must be a .parquet file, a folder of them, or a .jsonl file")
        return [p], p
    if p.is_dir():
        if is_save_to_disk(p):
            raise ValueError(f"{p}: datasets.save_to_disk folders are not supported for ranked data; export parquet")
        return select_split_files(p, split), p
    raise FileNotFoundError(
        f"{p}: no such file or directory; expected ranked data as a .parquet file, a folder of parquet "
        "shards, or a .jsonl file with one {\"prompt\", \"images\", \"scores\"} object per line"
    )
