"""The arena's image sources: one model's images each, read from a manifest, checked, matched by prompt.

A source is a manifest of ``{"image", "prompt", "model"?}`` rows (what ``diffalign generate``
writes) or a folder holding ``manifest.jsonl``; ``NAME=PATH`` names the model, otherwise the
rows' ``model`` field or the folder's name does. Items of different sources are matched by
prompt: the k-th image of a prompt in one source meets the k-th image of that prompt in the
others (``generate`` derives the k-th seed the same way for every model, so these are
same-seed pairs).

Safety: the server only ever serves files listed here, and each must lie inside its
manifest's folder once symbolic links are resolved. A row that points outside is refused at
start-up with its row named (:class:`SourceError`): a manifest is not a way to publish
``/etc/passwd``. Rows whose file is missing, not a regular file or too large are reported
and skipped.
"""

from __future__ import annotations

import hashlib
import itertools
import os
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from diffalign.data.manifest import manifest_path, read_manifest
from diffalign.data.report import SkipReport

__all__ = ["ArenaItem", "ArenaPair", "SourceError", "load_sources", "match_pairs", "parse_source_spec"]

MAX_IMAGE_BYTES = 32 * 1024 * 1024
MAX_ROWS_PER_SOURCE = 100_000
MAX_PROMPT_CHARS = 2_000
MAX_MODEL_NAME_CHARS = 100


class SourceError(ValueError):
    """A source the arena refuses to start with; the message names the file and row."""


@dataclass(frozen=True)
class ArenaItem:
    """One servable image: ``path`` is resolved and checked to lie inside its manifest's folder."""

    item_id: str
    model: str
    prompt: str
    path: Path
    index: int  # the k-th image of this prompt in its source


@dataclass(frozen=True)
class ArenaPair:
    """Two items of one prompt from two different models; ``a`` and ``b`` in a fixed (sorted) order."""

    pair_id: str
    prompt: str
    a: ArenaItem
    b: ArenaItem

    @property
    def models(self) -> tuple[str, str]:
        return (self.a.model, self.b.model)


def parse_source_spec(spec: str) -> tuple[str | None, Path]:
    """``NAME=PATH`` or ``PATH`` (a path that itself contains '=' needs the NAME= form)."""
    name, sep, path = spec.partition("=")
    if sep and name and "/" not in name and os.sep not in name:
        return name, Path(path)
    return None, Path(spec)


def item_id(model: str, path: Path) -> str:
    """Stable across restarts: the same model and file give the same id, so votes stay attached."""
    return hashlib.sha256(f"{model}\0{path}".encode()).hexdigest()[:20]


def load_sources(specs: list[str], report: SkipReport) -> dict[str, list[ArenaItem]]:
    """Read and check every source; ``{model: items}``. Raises :class:`SourceError` on what must not start."""
    if len(specs) < 2:
        raise SourceError(f"the arena compares models: give at least two --source, got {len(specs)}")
    sources: dict[str, list[ArenaItem]] = {}
    for spec in specs:
        name, path = parse_source_spec(spec)
        model, items = _load_source(name, path, report)
        if model in sources:
            raise SourceError(f"{spec}: model name {model!r} is used by two sources (name them: --source NAME=PATH)")
        sources[model] = items
    return sources


def _load_source(name: str | None, path: Path, report: SkipReport) -> tuple[str, list[ArenaItem]]:
    manifest = manifest_path(path)
    folder = manifest.parent.resolve()
    rows = read_manifest(manifest, report, source=str(manifest))
    if len(rows) > MAX_ROWS_PER_SOURCE:
        raise SourceError(f"{manifest}: {len(rows)} rows, more than the arena's limit of {MAX_ROWS_PER_SOURCE}")
    model = name or _model_name(rows, manifest, folder)
    if not model.strip() or len(model) > MAX_MODEL_NAME_CHARS:
        raise SourceError(f"{manifest}: model name must be 1-{MAX_MODEL_NAME_CHARS} characters, got {model!r}")
    items: list[ArenaItem] = []
    seen_per_prompt: dict[str, int] = defaultdict(int)
    for row in rows:
        resolved = row.image.resolve()
        if not resolved.is_relative_to(folder):
            raise SourceError(
                f"{manifest} row {row.row_id}: image {row.key!r} resolves to {resolved}, outside the manifest's "
                f"folder {folder}; the arena serves only files inside each source's folder"
            )
        if len(row.prompt) > MAX_PROMPT_CHARS:
            report.record(str(manifest), row.row_id, f"prompt too long: {len(row.prompt)} > {MAX_PROMPT_CHARS} characters")
            continue
        if not resolved.is_file():
            report.record(str(manifest), row.row_id, f"missing image: {row.key} is not a file")
            continue
        size = resolved.stat().st_size
        if size > MAX_IMAGE_BYTES:
            report.record(str(manifest), row.row_id, f"image too large: {row.key} is {size} bytes > {MAX_IMAGE_BYTES}")
            continue
        index = seen_per_prompt[row.prompt]
        seen_per_prompt[row.prompt] += 1
        items.append(ArenaItem(item_id(model, resolved), model, row.prompt, resolved, index))
    if not items:
        raise SourceError(f"{manifest}: no usable images (see the report above)")
    return model, items


def _model_name(rows: list, manifest: Path, folder: Path) -> str:
    names = {row.model for row in rows if row.model}
    if len(names) > 1:
        raise SourceError(
            f"{manifest}: rows name {len(names)} models ({', '.join(sorted(names)[:5])}); a source is one model's "
            "images: split it, or name it with --source NAME=PATH"
        )
    if names:
        return names.pop()
    return folder.name if manifest.name == "manifest.jsonl" else manifest.stem


def match_pairs(sources: dict[str, list[ArenaItem]]) -> list[ArenaPair]:
    """Every cross-model pair of items with the same prompt and the same per-prompt index."""
    keyed = {model: {(item.prompt, item.index): item for item in items} for model, items in sources.items()}
    pairs: list[ArenaPair] = []
    for model_a, model_b in itertools.combinations(sorted(keyed), 2):
        for key in sorted(keyed[model_a].keys() & keyed[model_b].keys()):
            a, b = keyed[model_a][key], keyed[model_b][key]
            pairs.append(ArenaPair(f"{a.item_id}~{b.item_id}", key[0], a, b))
    return pairs
