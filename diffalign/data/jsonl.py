"""JSONL manifest reader: one ``{"prompt", "chosen", "rejected"}`` object per line.

Use it through :func:`diffalign.data.sources.open_preference_source`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from diffalign.data.common import READER_VERSION, check_index, json_object, stat_entry
from diffalign.data.images import decode_image
from diffalign.data.report import SkipReport
from diffalign.data.types import BadRowError, PreferenceGroup

__all__ = ["JsonlSource"]


@dataclass(frozen=True)
class _JsonlRow:
    row_id: str
    prompt: str
    chosen: Path
    rejected: Path
    captions: tuple[str, str] | None


class JsonlSource:
    """A JSONL manifest of pairs: ``{"prompt", "chosen", "rejected"}`` per line.

    Image paths are relative to the manifest's folder (absolute paths allowed);
    optional ``"chosen_caption"`` and ``"rejected_caption"`` (both or neither)
    fill ``captions``. Blank lines are ignored. Bad lines (invalid JSON,
    missing key, missing image file, empty prompt -> ``"missing caption"``) are
    reported as ``"<manifest>:<line number>"`` and skipped. The fingerprint
    covers the manifest and every referenced image (path, size, mtime).
    """

    def __init__(
        self, path: Path, *, max_rows: int | None, report: SkipReport, options: dict[str, Any]
    ) -> None:
        self.name = path.name
        self.path = path
        base = path.parent
        rows: list[_JsonlRow] = []
        hasher = hashlib.sha256()
        hasher.update(json.dumps(
            {"reader": "jsonl", "version": READER_VERSION, "manifest": stat_entry(path), **options},
            sort_keys=True, default=str,
        ).encode())
        with path.open("r", encoding="utf-8") as fh:
            for line_no, line in enumerate(fh, start=1):
                if max_rows is not None and len(rows) >= max_rows:
                    break
                if not line.strip():
                    continue
                report.add_rows(1)
                rid = f"{self.name}:{line_no}"
                try:
                    row, stats = self._parse(line, rid, base)
                except BadRowError as err:
                    report.record(self.name, rid, err.reason)
                    continue
                rows.append(row)
                for s in stats:
                    hasher.update(json.dumps(s).encode())
        self._rows = rows
        self._fingerprint = hasher.hexdigest()[:20]

    def _parse(self, line: str, rid: str, base: Path) -> tuple[_JsonlRow, list[list[Any]]]:
        obj, paths = parse_pair_line(line, rid, self.name, base)
        captions: tuple[str, str] | None = None
        has = [k in obj for k in ("chosen_caption", "rejected_caption")]
        if any(has):
            if not all(has):
                missing = "rejected_caption" if has[0] else "chosen_caption"
                raise BadRowError(self.name, rid, f"missing key: {missing!r} (per-image captions need both)")
            c0, c1 = obj["chosen_caption"], obj["rejected_caption"]
            if not (isinstance(c0, str) and c0.strip() and isinstance(c1, str) and c1.strip()):
                raise BadRowError(self.name, rid, "missing caption: chosen_caption/rejected_caption empty or not a string")
            captions = (c0, c1)
        stats = [stat_entry(path) for path in paths]
        return _JsonlRow(rid, obj["prompt"], paths[0], paths[1], captions), stats

    def __len__(self) -> int:
        return len(self._rows)

    def row_id(self, index: int) -> str:
        check_index(self.name, index, len(self))
        return self._rows[index].row_id

    def load(self, index: int, min_side: int | None = None) -> PreferenceGroup:
        check_index(self.name, index, len(self))
        r = self._rows[index]
        images = [decode_image(p, row_id=r.row_id, source=self.name, min_side=min_side) for p in (r.chosen, r.rejected)]
        return PreferenceGroup(
            row_id=r.row_id,
            prompt=r.prompt,
            images=images,
            captions=list(r.captions) if r.captions is not None else None,
            scores=[1.0, 0.0],  # winner first: a listwise objective reads a pair as a k = 2 list
        )

    def has_captions(self, index: int) -> bool:
        """Whether row ``index`` carries per-image captions (cheap: no image is decoded)."""
        check_index(self.name, index, len(self))
        return self._rows[index].captions is not None

    def fingerprint(self) -> str:
        return self._fingerprint

    def __repr__(self) -> str:
        return f"JsonlSource(path={str(self.path)!r}, rows={len(self)})"


def parse_pair_line(line: str, row_id: str, source: str, base: Path) -> tuple[dict[str, Any], list[Path]]:
    """One ``{"prompt", "chosen", "rejected"}`` line -> (the object, [chosen, rejected] resolved paths).

    Image paths are relative to ``base`` (absolute allowed) and must exist; every problem is a
    :class:`BadRowError` naming the row (the manifest reader and the caption builder share this).
    """
    obj = json_object(line, row_id, source)
    for key in ("prompt", "chosen", "rejected"):
        if key not in obj:
            raise BadRowError(source, row_id, f"missing key: {key!r}")
    prompt = obj["prompt"]
    if not isinstance(prompt, str) or not prompt.strip():
        raise BadRowError(source, row_id, "missing caption: 'prompt' is empty or not a string")
    paths: list[Path] = []
    for key in ("chosen", "rejected"):
        value = obj[key]
        if not isinstance(value, str) or not value:
            raise BadRowError(source, row_id, f"bad value: {key!r} must be a non-empty path string")
        path = Path(value).expanduser()
        path = path if path.is_absolute() else base / path
        if not path.is_file():
            raise BadRowError(source, row_id, f"missing image file: {key!r} -> {path}")
        paths.append(path)
    return obj, paths
