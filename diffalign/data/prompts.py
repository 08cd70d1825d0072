"""Prompt lists for methods that make their own images (online PSO samples from the policy).

Accepted files: ``.txt`` (one prompt per line), ``.jsonl`` (``{"prompt": ...}`` per line),
``.parquet`` (a ``prompt`` or ``caption`` column: a Pick-a-Pic pairs file gives its captions,
without decoding a single image). Empty prompts and bad lines are reported by row id and
skipped. Items are addressed by ``(epoch, index)`` like the preference datasets, so the
training loop's sampler, resume and noise seeds work unchanged.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from diffalign.data.common import stat_entry
from diffalign.data.report import SkipReport
from diffalign.fingerprint import fingerprint

__all__ = ["PromptSource", "PromptDataset", "collate_prompts"]


class PromptSource:
    """The prompts of a text, JSONL or parquet file, bad rows reported and skipped."""

    def __init__(self, path: str | Path, report: SkipReport, max_rows: int | None = None) -> None:
        self.path = Path(path).expanduser()
        self.name = self.path.name
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: no such prompt file (.txt, .jsonl with 'prompt', or .parquet with 'prompt'/'caption')")
        rows = self._read(report)
        self.row_ids = [row_id for row_id, _ in rows][:max_rows]
        self.prompts = [prompt for _, prompt in rows][:max_rows]
        if not self.prompts:
            raise ValueError(f"{self.path}: no usable prompts ({report.summary()})")
        self._fingerprint = fingerprint({"reader": "prompts", "file": stat_entry(self.path), "max_rows": max_rows}, 20)

    def _read(self, report: SkipReport) -> list[tuple[str, str]]:
        suffix = self.path.suffix
        if suffix == ".parquet":
            return self._read_parquet(report)
        rows: list[tuple[str, str]] = []
        with self.path.open(encoding="utf-8") as lines:
            for number, line in enumerate(lines, start=1):
                if not line.strip():
                    continue
                row_id = f"{self.name}:{number}"
                report.add_rows(1)
                prompt: Any = line.strip()
                if suffix == ".jsonl":
                    try:
                        obj = json.loads(line)
                    except json.JSONDecodeError as error:
                        report.record(self.name, row_id, f"invalid JSON: {error}")
                        continue
                    if not isinstance(obj, dict) or "prompt" not in obj:
                        report.record(self.name, row_id, "missing key: 'prompt'")
                        continue
                    prompt = obj["prompt"]
                if not isinstance(prompt, str) or not prompt.strip():
                    report.record(self.name, row_id, "missing caption: empty prompt")
                    continue
                rows.append((row_id, prompt))
        return rows

    def _read_parquet(self, report: SkipReport) -> list[tuple[str, str]]:
        import pyarrow.parquet as pq

        names = pq.read_schema(self.path).names
        column = next((name for name in ("prompt", "caption") if name in names), None)
        if column is None:
            raise ValueError(f"{self.path}: no 'prompt' or 'caption' column (columns: {', '.join(names)})")
        values = pq.read_table(self.path, columns=[column]).column(column).to_pylist()
        rows = []
        for number, prompt in enumerate(values):
            row_id = f"{self.name}:{number}"
            report.add_rows(1)
            if not isinstance(prompt, str) or not prompt.strip():
                report.record(self.name, row_id, "missing caption: empty prompt")
                continue
            rows.append((row_id, prompt))
        return rows

    def __len__(self) -> int:
        return len(self.prompts)

    def fingerprint(self) -> str:
        return self._fingerprint


class PromptDataset:
    """``dataset[(epoch, index)] -> {"row_id", "prompt"}`` (the loop adds the noise seed)."""

    def __init__(self, source: PromptSource) -> None:
        self.source = source

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        _, index = key
        return {"row_id": self.source.row_ids[index], "prompt": self.source.prompts[index]}


def collate_prompts(items: list[dict[str, Any]]) -> dict[str, Any]:
    """A batch of prompts; prompt files have no undecodable rows, so ``skipped`` is empty."""
    return {"row_ids": [item["row_id"] for item in items], "prompts": [item["prompt"] for item in items], "skipped": []}
