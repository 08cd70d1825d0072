"""Per-step metrics: averaged over the accumulation window and the processes, written as JSONL."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)


class MetricWindow:
    """Collects each micro-step's metrics until the optimizer steps."""

    def __init__(self) -> None:
        self.values: dict[str, list[torch.Tensor]] = {}

    def add(self, metrics: dict[str, torch.Tensor]) -> None:
        for name, value in metrics.items():
            self.values.setdefault(name, []).append(value.detach().float().reshape(()))

    def reduce(self, accelerator: Any) -> dict[str, float]:
        """Mean over micro-steps, then over processes."""
        means = {name: torch.stack(values).mean() for name, values in self.values.items()}
        if not means:
            return {}
        names = sorted(means)
        stacked = torch.stack([means[name] for name in names]).to(accelerator.device)
        reduced = accelerator.reduce(stacked, reduction="mean")
        return {name: float(value) for name, value in zip(names, reduced.tolist())}

    def clear(self) -> None:
        self.values.clear()


class MetricsWriter:
    """Appends one JSON line per logged step; on resume, lines past the resumed step are dropped."""

    def __init__(self, path: Path, enabled: bool, truncate_after: int | None = None) -> None:
        self.path = Path(path)
        self.enabled = enabled
        if enabled and self.path.exists():
            keep = [line for line, row in _rows(self.path) if truncate_after and row["step"] <= truncate_after]
            temporary = self.path.with_suffix(".jsonl.tmp")
            temporary.write_text("".join(line + "\n" for line in keep))
            os.replace(temporary, self.path)

    def write(self, step: int, metrics: dict[str, float]) -> None:
        if self.enabled:
            with self.path.open("a") as handle:
                handle.write(json.dumps({"step": step, **metrics}) + "\n")


def _rows(path: Path) -> list[tuple[str, dict]]:
    """(line, row) of every complete line. A torn *last* line (disk full, power loss mid-write) is dropped
    with a warning, as the step it logged is redone on resume; a bad line before the end is an error."""
    lines = [line for line in Path(path).read_text().splitlines() if line.strip()]
    rows = []
    for number, line in enumerate(lines, 1):
        try:
            rows.append((line, json.loads(line)))
        except json.JSONDecodeError as error:
            if number == len(lines):
                logger.warning("%s: dropping a torn last line (%d): %.60r", path, number, line)
                break
            raise ValueError(f"{path} line {number} is not JSON ({error}); it is not a diffalign metrics file, or was edited") from None
    return rows


def read_metrics(path: str | Path) -> list[dict[str, float]]:
    return [row for _, row in _rows(Path(path))]
