"""Accounting for rows that preference data readers drop.

Real preference sets are dirty (Pick-a-Pic v2 has ~10% ties, some broken
JPEGs, empty captions). Dropping rows silently hides data problems and makes
"trained on N pairs" claims wrong, so every reader records each dropped row
here and the training loop prints :meth:`SkipReport.summary` at the end.

Reasons follow the convention ``"<category>: <detail>"`` (e.g.
``"undecodable image: cannot identify image file"``); counts are kept per
category (the part before the first ``": "``), and every skipped row is kept
with its full reason (:meth:`SkipReport.to_dict` lists the ids per category).

Each row counts once per report: a row is identified by ``(source, row_id)``
and recording it again (the next epoch draws the same broken image) changes
nothing, so "33 undecodable" can never be said of 14 rows.

Process model: a report is guarded by a lock, so it is safe from threads and
from a ``DataLoader`` with ``num_workers=0``. A report copied into DataLoader
worker *processes* is a separate object whose counts are never merged back;
that is why :func:`diffalign.data.dataset.collate_groups` returns decode
failures to the main process under ``batch["skipped"]``, where the training
loop records them with :meth:`SkipReport.record_all`.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger("diffalign.data")

__all__ = ["SkipReport", "SkippedRow", "reason_category"]


def reason_category(reason: str) -> str:
    """Category of a reason string: the text before the first ``": "``."""
    return reason.split(": ", 1)[0].strip()


@dataclass(frozen=True)
class SkippedRow:
    """One recorded skip, kept verbatim for the summary."""

    source: str
    row_id: str
    reason: str


class SkipReport:
    """Counts and examples of skipped rows, grouped by reason category.

    Args:
        max_examples: how many skipped rows to keep per category for the summary.
        log_first: how many skips are logged in full (one warning each).
        log_every: after that, one progress warning every ``log_every`` skips.
    """

    images_checked: str | None = None
    """How completely images were decoded (set by whoever knows: ``data check``, training); shown in the summary."""

    def __init__(self, max_examples: int = 20, log_first: int = 20, log_every: int = 1000) -> None:
        if max_examples < 0 or log_first < 0 or log_every < 1:
            raise ValueError(
                f"SkipReport: max_examples ({max_examples}) and log_first ({log_first}) must be >= 0, "
                f"log_every ({log_every}) >= 1"
            )
        self.max_examples = max_examples
        self.log_first = log_first
        self.log_every = log_every
        self.total: int = 0
        self.rows_seen: int = 0
        self.counts: dict[str, int] = {}
        self.rows: dict[str, list[SkippedRow]] = {}  # every skipped row, per category, in recording order
        self._recorded: set[tuple[str, str]] = set()  # (source, row_id) of every row in self.rows
        self._lock = threading.Lock()

    @property
    def examples(self) -> dict[str, list[SkippedRow]]:
        """The first ``max_examples`` skipped rows of each category (what the summary names)."""
        with self._lock:
            return {k: v[: self.max_examples] for k, v in self.rows.items()}

    def is_recorded(self, source: str, row_id: str) -> bool:
        """Whether ``row_id`` of ``source`` is already counted."""
        with self._lock:
            return (source, row_id) in self._recorded

    # -- pickling: locks cannot be pickled (DataLoader workers pickle datasets).
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        del state["_lock"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def add_rows(self, n: int) -> None:
        """Count ``n`` rows as examined (the denominator of the summary)."""
        with self._lock:
            self.rows_seen += n

    def record(self, source: str, row_id: str, reason: str) -> bool:
        """Record that ``row_id`` of ``source`` was skipped because of ``reason``; False if it already was.

        A row recorded again (drawn in a later epoch) keeps its first reason and counts once.
        """
        category = reason_category(reason)
        with self._lock:
            if (source, row_id) in self._recorded:
                return False
            self._recorded.add((source, row_id))
            self.total += 1
            total = self.total
            self.counts[category] = self.counts.get(category, 0) + 1
            self.rows.setdefault(category, []).append(SkippedRow(source, row_id, reason))
            counts = dict(self.counts)
        if total <= self.log_first:
            logger.warning("skipping row %s of %s: %s", row_id, source, reason)
            if total == self.log_first:
                logger.warning(
                    "further skipped rows are summarised every %d skips; see SkipReport.summary()",
                    self.log_every,
                )
        elif total % self.log_every == 0:
            logger.warning("skipped %d rows so far: %s", total, _format_counts(counts))
        return True

    def record_all(self, source: str, skipped: Iterable[tuple[str, str]]) -> None:
        """Record ``(row_id, reason)`` pairs, e.g. a collated batch's ``"skipped"`` list."""
        for row_id, reason in skipped:
            self.record(source, row_id, reason)

    def merge(self, snapshot: dict[str, Any]) -> None:
        """Add an earlier report's :meth:`to_dict` (rows a cache builder skipped) to this one.

        The rows were skipped in another run, so they keep counting, with their ids, in this run's
        summary; a row this report already holds counts once.
        """
        with self._lock:
            self.rows_seen += int(snapshot.get("rows_seen", 0))
        for rows in snapshot["rows"].values():
            for row in rows:
                self.record(row["source"], row["row_id"], row["reason"])

    def summary(self) -> str:
        """Human-readable multi-line summary, one line per reason category."""
        examples = self.examples
        with self._lock:
            total, seen = self.total, self.rows_seen
            counts = dict(self.counts)
        checked = [f"  images: {self.images_checked}"] if self.images_checked else []
        if total == 0:
            return "\n".join([f"skipped 0 of {seen} rows" if seen else "skipped 0 rows", *checked])
        of = f" of {seen}" if seen else ""
        lines = [f"skipped {total}{of} rows: {_format_counts(counts)}", *checked]
        for category, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
            ex = examples.get(category, [])
            rows = ", ".join(e.row_id for e in ex)
            more = "..." if n > len(ex) else ""
            lines.append(f"  {category} ({n}): rows {rows}{more}")
            details = [e for e in ex if e.reason.strip() != category]
            if details:
                lines.append(f"    e.g. {details[0].row_id}: {details[0].reason}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly snapshot (``skipped_rows.json``, ``data check --json``, run logs)::

            {"total": 2, "rows_seen": 14, "images_checked": "every row decoded" | ... | None,
             "counts": {"undecodable image": 1, "tie": 1},
             "rows": {"undecodable image": [{"source": "p.parquet", "row_id": "p.parquet:3",
                                             "reason": "undecodable image: ..."}], "tie": [...]}}
        """
        with self._lock:
            return {
                "total": self.total,
                "rows_seen": self.rows_seen,
                "images_checked": self.images_checked,
                "counts": dict(self.counts),
                "rows": {
                    k: [{"source": e.source, "row_id": e.row_id, "reason": e.reason} for e in v]
                    for k, v in self.rows.items()
                },
            }

    def ids(self) -> dict[str, list[str]]:
        """The skipped row ids of each category, in recording order."""
        with self._lock:
            return {k: [e.row_id for e in v] for k, v in self.rows.items()}

    def __repr__(self) -> str:
        return f"SkipReport(total={self.total}, rows_seen={self.rows_seen}, counts={self.counts})"


def _format_counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{n} {k}" for k, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))
