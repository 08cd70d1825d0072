"""Dual-caption datasets: run a caption strategy over a pairs file and write the captions beside each row.

Why a module of its own: the strategies (:mod:`diffalign.captioning.strategies`)
only turn pairs into captions; reading Pick-a-Pic parquet (a file or a folder
of shards) or a JSONL manifest, streaming it in batches, recording dropped
rows and writing the result atomically is dataset plumbing that no strategy
needs. This module imports the strategies, never the reverse.

:func:`add_dual_captions` writes the rows plus ``caption_0``/``caption_1``
(JSONL: ``chosen_caption``/``rejected_caption``).
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from diffalign.atomic import staged_file, staged_folder
from diffalign.captioning.strategies import CaptionSettings, CaptionStrategy, PairToCaption, build_strategy
from diffalign.data.images import decode_image
from diffalign.data.jsonl import parse_pair_line
from diffalign.data.parquet import image_payload
from diffalign.data.pickapic import LABEL_REASON, check_pickapic_schemas
from diffalign.data.report import SkipReport
from diffalign.data.types import BadRowError

if TYPE_CHECKING:
    import PIL.Image

__all__ = ["CaptionStats", "add_dual_captions"]

# Named after the `diffalign captions` command whose progress it reports.
logger = logging.getLogger("diffalign.captions")


@dataclass
class CaptionStats:
    """What :func:`add_dual_captions` did to the rows it kept (rows it dropped are in the SkipReport)."""

    rows_written: int = 0
    ties: int = 0
    perturbed_rows: int = 0  # rows whose loser caption went through a perturber
    unperturbed: int = 0  # ... and came back unchanged (kept: the pair is then plain DPO)
    unperturbed_examples: list[str] = field(default_factory=list)
    max_examples: int = 20

    def note_unperturbed(self, row_id: str) -> None:
        self.unperturbed += 1
        if len(self.unperturbed_examples) < self.max_examples:
            self.unperturbed_examples.append(row_id)

    def summary(self) -> str:
        text = f"wrote {self.rows_written} rows; {self.ties} ties got the prompt as both captions"
        if self.perturbed_rows:
            text += f"; {self.unperturbed} of {self.perturbed_rows} loser captions could not be perturbed"
            text += " (kept unchanged)"
            if self.unperturbed_examples:
                more = "..." if self.unperturbed > len(self.unperturbed_examples) else ""
                text += f": rows {', '.join(self.unperturbed_examples)}{more}"
        return text


@dataclass(frozen=True)
class _Pending:
    """A row that passed the cheap checks. ``images`` are undecoded payloads in the row's own order."""

    row_id: str
    prompt: str
    winner: int | None  # index of the preferred image in the row; None for a tie
    images: tuple[Any, Any]


class _Captioning:
    """Runs a strategy over batches of pending rows, recording every row it drops."""

    def __init__(
        self, strategy: CaptionStrategy, seed: int, report: SkipReport, stats: CaptionStats, bar: Any = None
    ) -> None:
        self.strategy, self.seed, self.report, self.stats = strategy, seed, report, stats
        self.bar = bar  # a tqdm bar over input rows, or None

    def advance(self, rows: int) -> None:
        """``rows`` more input rows are done (written or skipped)."""
        if self.bar is not None:
            self.bar.update(rows)

    def captions(self, rows: Sequence[_Pending], source: str) -> list[tuple[str, str] | None]:
        """``(caption of image 0, caption of image 1)`` per row in row order; None for a dropped row."""
        out: list[tuple[str, str] | None] = [None] * len(rows)
        todo: list[tuple[int, PairToCaption]] = []
        for i, row in enumerate(rows):
            if row.winner is None:  # a tie: neither image is preferred, so neither caption is perturbed
                out[i] = (row.prompt, row.prompt)
                self.stats.ties += 1
                continue
            images: list[Any] = [None, None]
            if self.strategy.needs_images:
                try:
                    images = [_decode(row.images[k], row.row_id, source) for k in (row.winner, 1 - row.winner)]
                except BadRowError as err:
                    self.report.record(source, row.row_id, err.reason)
                    continue
            todo.append((i, PairToCaption(row.row_id, row.prompt, *images)))
        results = self.strategy.caption_pairs([pair for _, pair in todo], self.seed) if todo else []
        if len(results) != len(todo):
            name = self.strategy.name
            raise RuntimeError(f"strategy {name!r} returned {len(results)} captions for {len(todo)} pairs")
        for (i, pair), dual in zip(todo, results):
            empty = [side for side, text in (("winner", dual.winner), ("loser", dual.loser)) if not text.strip()]
            if empty:
                self.report.record(source, pair.row_id, f"empty generated caption: {' and '.join(empty)}")
                continue
            if dual.loser_perturbed is not None:
                self.stats.perturbed_rows += 1
                if not dual.loser_perturbed:
                    self.stats.note_unperturbed(pair.row_id)
            winner = rows[i].winner
            out[i] = (dual.winner, dual.loser) if winner == 0 else (dual.loser, dual.winner)
        self.stats.rows_written += sum(o is not None for o in out)
        return out


def _decode(payload: Any, row_id: str, source: str) -> PIL.Image.Image:
    """A JSONL row holds paths, a parquet row bytes (or a datasets ``{"bytes", "path"}`` struct)."""
    data = payload if isinstance(payload, Path) else image_payload(payload, row_id, source)
    return decode_image(data, row_id=row_id, source=source)


def add_dual_captions(
    input_path: str | os.PathLike[str],
    output_path: str | os.PathLike[str],
    strategy: str | CaptionStrategy = "perturb",
    *,
    settings: CaptionSettings | None = None,
    batch_size: int = 16,
    seed: int = 0,
    report: SkipReport | None = None,
    stats: CaptionStats | None = None,
    overwrite: bool = False,
    progress: bool = False,
) -> Path:
    """Write ``input_path``'s pairs plus a caption per image to ``output_path``; return ``output_path``.

    Input: a Pick-a-Pic-schema ``.parquet`` file, a folder of parquet shards
    (the output is a folder with the same layout) or a ``.jsonl`` manifest.
    Parquet rows keep every column and gain ``caption_0``/``caption_1`` in
    ``jpg_0``/``jpg_1`` order (the winner is given by ``label_0``; existing
    caption columns are replaced); JSONL rows
    gain ``chosen_caption``/``rejected_caption`` (image paths are rewritten
    when the output lies in another folder). Ties get the prompt as both
    captions. Bad rows (bad label, missing caption, undecodable image when the
    strategy looks at images, empty generated caption) go to ``report`` by row
    id and are left out. Parquet is streamed ``batch_size`` rows at a time.
    The output appears atomically; it may never be, contain or lie inside the
    input, and an existing output is replaced only with ``overwrite``.
    ``stats`` (optional) receives ties and rows the perturber could not change.
    ``progress``: a bar over the input rows on stderr (a model captions a few rows a second).
    """
    src, dst = Path(input_path).expanduser(), Path(output_path).expanduser()
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    kind = _input_kind(src)
    _check_output(src, dst, kind, overwrite)
    files = sorted(p for p in src.rglob("*.parquet") if p.is_file()) if kind == "folder" else [src]
    if kind == "folder" and not files:
        raise FileNotFoundError(f"{src}: folder contains no .parquet files (searched recursively)")
    if kind != "jsonl":
        check_pickapic_schemas(files)  # a missing column fails now, before any model loads
    chosen = build_strategy(strategy, settings) if isinstance(strategy, str) else strategy
    report = report if report is not None else SkipReport()
    from tqdm.auto import tqdm

    bar = tqdm(total=_count_rows(src, files, kind), unit="pair", desc="captions") if progress else None
    run = _Captioning(chosen, seed, report, stats if stats is not None else CaptionStats(), bar)
    try:
        _caption_all(src, dst, kind, files, batch_size, run)
    finally:
        if bar is not None:
            bar.close()
    # The caller prints the summary (the CLI does, once); a log line here printed it a second time.
    logger.debug("diffalign captions: %s -> %s: %s", src, dst, run.stats.summary())
    return dst


def _count_rows(src: Path, files: list[Path], kind: str) -> int:
    """Input rows, for the progress bar: parquet footers, or the manifest's non-blank lines."""
    if kind == "jsonl":
        with src.open("r", encoding="utf-8") as lines:
            return sum(1 for line in lines if line.strip())
    import pyarrow.parquet as pq

    return sum(pq.ParquetFile(f).metadata.num_rows for f in files)


def _caption_all(src: Path, dst: Path, kind: str, files: list[Path], batch_size: int, run: _Captioning) -> None:
    """Caption every input file into ``dst``, which appears atomically."""
    if kind == "folder":
        with staged_folder(dst) as stage:
            for f in files:
                rel = f.relative_to(src)
                (stage / rel).parent.mkdir(parents=True, exist_ok=True)
                _caption_parquet(f, stage / rel, str(rel), batch_size, run)
    else:
        with staged_file(dst) as tmp:
            if kind == "jsonl":
                _caption_jsonl(src, tmp, dst.parent, batch_size, run)
            else:
                _caption_parquet(src, tmp, src.name, batch_size, run)


def _input_kind(src: Path) -> str:
    if src.is_dir():
        return "folder"
    if src.is_file() and src.suffix in (".parquet", ".jsonl"):
        return src.suffix[1:]
    if not src.exists():
        raise FileNotFoundError(f"{src}: no such file or folder")
    raise ValueError(f"{src}: expected a .parquet file, a folder of parquet shards or a .jsonl manifest")


def _check_output(src: Path, dst: Path, kind: str, overwrite: bool) -> None:
    s, d = src.resolve(), dst.resolve()
    if d == s or s in d.parents or d in s.parents:
        raise ValueError(f"refusing to write {dst}: it would overwrite the input {src} (pick another output path)")
    if kind in ("parquet", "jsonl") and dst.suffix != f".{kind}":
        raise ValueError(f"{dst}: the output of a .{kind} input must end in .{kind} so readers recognise it")
    if dst.exists() and not overwrite:
        raise FileExistsError(f"{dst} already exists; pass overwrite=True (--overwrite) to replace it")
    if dst.is_dir() != (kind == "folder") and dst.exists():
        raise ValueError(f"{dst}: cannot replace a {'folder' if dst.is_dir() else 'file'} with the output of {src}")


def _caption_parquet(src: Path, out: Path, label: str, batch_size: int, run: _Captioning) -> None:
    """Stream ``src`` in record batches; row ids are ``label:ranking_id`` (or the row number), as the reader's."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    parquet = pq.ParquetFile(src)
    schema = parquet.schema_arrow
    fields = [f for f in schema if f.name not in ("caption_0", "caption_1")]
    metadata = {k: v for k, v in (schema.metadata or {}).items() if k != b"huggingface"}  # its features would be stale
    captions = [pa.field("caption_0", pa.string()), pa.field("caption_1", pa.string())]
    out_schema = pa.schema([*fields, *captions], metadata=metadata)
    offset = 0
    with pq.ParquetWriter(out, out_schema) as writer:
        for batch in parquet.iter_batches(batch_size=batch_size):
            table = pa.Table.from_batches([batch])
            rows, kept = _parquet_rows(table, label, offset, run.report)
            offset += table.num_rows
            captions = run.captions(rows, label)
            keep = [c is not None for c in captions]
            table = table.take(pa.array([k for k, ok in zip(kept, keep) if ok], pa.int64()))
            written = [c for c in captions if c is not None]
            columns = [table.column(f.name) for f in fields]
            columns += [pa.array([c[side] for c in written], pa.string()) for side in (0, 1)]
            writer.write_table(pa.Table.from_arrays(columns, schema=out_schema))
            run.advance(batch.num_rows)


def _parquet_rows(table: Any, label: str, offset: int, report: SkipReport) -> tuple[list[_Pending], list[int]]:
    """Rows of one batch that pass the label and caption checks, and their positions in the batch."""
    import pyarrow as pa
    import pyarrow.compute as pc

    try:
        l0 = pc.cast(table.column("label_0"), pa.float64()).to_numpy(zero_copy_only=False)
        l1 = None
        if "label_1" in table.column_names:
            l1 = pc.cast(table.column("label_1"), pa.float64()).to_numpy(zero_copy_only=False)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
        raise ValueError(f"{label}: label columns must hold numbers (0, 0.5 or 1): {exc}") from exc
    prompts = table.column("caption").to_pylist()
    ids = table.column("ranking_id").to_pylist() if "ranking_id" in table.column_names else [None] * table.num_rows
    jpg_0, jpg_1 = table.column("jpg_0"), table.column("jpg_1")
    rows: list[_Pending] = []
    kept: list[int] = []
    for j in range(table.num_rows):
        report.add_rows(1)
        row_id = f"{label}:{ids[j] if ids[j] is not None else offset + j}"
        a, b = float(l0[j]), (1.0 - float(l0[j]) if l1 is None else float(l1[j]))
        if not (a in (0.0, 0.5, 1.0) and math.isfinite(b) and abs(a + b - 1.0) <= 1e-6):
            detail = f"label_0={a}" + (f", label_1={b}" if l1 is not None else "")
            report.record(label, row_id, f"{LABEL_REASON}: {detail}")
        elif not (isinstance(prompts[j], str) and prompts[j].strip()):
            report.record(label, row_id, "missing caption: 'caption' is empty or null")
        else:
            winner = None if a == 0.5 else (0 if a == 1.0 else 1)
            rows.append(_Pending(row_id, prompts[j], winner, (jpg_0[j].as_py(), jpg_1[j].as_py())))
            kept.append(j)
    return rows, kept


_JSONL_IMAGES = ("chosen", "rejected")


def _caption_jsonl(src: Path, out: Path, out_dir: Path, batch_size: int, run: _Captioning) -> None:
    """Caption a manifest line by line (blank lines are dropped, as the reader ignores them)."""
    pending: list[tuple[_Pending, dict[str, Any]]] = []

    def flush(fh: Any) -> None:
        captions = run.captions([row for row, _ in pending], src.name)
        for (row, obj), caption in zip(pending, captions):
            if caption is not None:
                moved = {k: _relocated(obj[k], row.images[i], src.parent, out_dir) for i, k in enumerate(_JSONL_IMAGES)}
                line = {**obj, **moved, "chosen_caption": caption[0], "rejected_caption": caption[1]}
                fh.write(json.dumps(line, ensure_ascii=False) + "\n")
        pending.clear()

    with src.open("r", encoding="utf-8") as lines, out.open("w", encoding="utf-8") as fh:
        for line_no, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            run.report.add_rows(1)
            row_id = f"{src.name}:{line_no}"
            try:
                pending.append(_jsonl_row(line, row_id, src))
            except BadRowError as err:
                run.report.record(src.name, row_id, err.reason)
            if len(pending) >= batch_size:
                flush(fh)
            run.advance(1)
        flush(fh)


def _jsonl_row(line: str, row_id: str, src: Path) -> tuple[_Pending, dict[str, Any]]:
    obj, paths = parse_pair_line(line, row_id, src.name, src.parent)
    return _Pending(row_id, obj["prompt"], 0, (paths[0], paths[1])), obj


def _relocated(original: str, resolved: Path, in_dir: Path, out_dir: Path) -> str:
    """Keep absolute paths and same-folder outputs as written; else make the path relative to the output's folder."""
    if Path(original).expanduser().is_absolute() or in_dir.resolve() == out_dir.resolve():
        return original
    return Path(os.path.relpath(resolved.resolve(), out_dir.resolve())).as_posix()
