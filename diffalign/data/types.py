"""Value types shared by the preference-data readers.

Every reader (Pick-a-Pic parquet, JSONL manifests, ...) normalises its rows to
:class:`PreferenceGroup`, always *winner first*, so objectives never need to
know which column held the preferred image.
"""

from __future__ import annotations

from dataclasses import dataclass

import PIL.Image

__all__ = ["PreferenceGroup", "BadRowError", "NoUsableRowsError"]


@dataclass
class PreferenceGroup:
    """One prompt and its images ranked best -> worst (2 for pairs)."""

    row_id: str
    prompt: str
    images: list[PIL.Image.Image]  # RGB, best first
    captions: list[str] | None = None  # per-image captions (dual-caption data); None for plain pairs
    scores: list[float] | None = None  # soft scores, best first (ranked data)
    models: list[str] | None = None  # generating model per image, best first, when the data says

    def __post_init__(self) -> None:
        k = len(self.images)
        for field_name in ("captions", "scores", "models"):
            value = getattr(self, field_name)
            if value is not None and len(value) != k:
                raise ValueError(
                    f"PreferenceGroup {self.row_id}: {field_name} has {len(value)} entries "
                    f"but there are {k} images"
                )


class BadRowError(ValueError):
    """A single row cannot be used (bad image, label, caption...).

    It is a *row* problem, not a dataset problem: callers skip the row and
    record it in a :class:`~diffalign.data.report.SkipReport`. ``reason``
    follows the ``"<category>: <detail>"`` convention of the report.
    """

    def __init__(self, source: str, row_id: str, reason: str) -> None:
        self.source = source
        self.row_id = row_id
        self.reason = reason
        super().__init__(f"{source}: row {row_id}: {reason}")

    def __reduce__(self) -> tuple[type[BadRowError], tuple[str, str, str]]:
        # Keeps the exception picklable across DataLoader worker processes.
        return (type(self), (self.source, self.row_id, self.reason))


class NoUsableRowsError(ValueError):
    """A data set with no rows, or none that can be used: a dataset problem, never a row to skip.

    Raised instead of what would follow (a ``datasets`` traceback on an empty
    parquet file, a training loop drawing empty batches forever); the message
    names the data and, when rows were skipped, why.
    """
