"""Keep only rows with per-image captions: what a dual-caption method (DCPO) can train on.

Readers know cheaply, without decoding an image, whether a row carries a caption per image
(``has_captions(index)``). Rows without are reported as ``"missing caption"`` and skipped;
data where no row has them is refused with the command that adds them.
"""

from __future__ import annotations

from typing import Any

from diffalign.config import ConfigError
from diffalign.data.check import SelectedRows
from diffalign.data.report import SkipReport

__all__ = ["CaptionedRows", "rows_with_captions"]


class CaptionedRows(SelectedRows):
    """The rows of a preference source that carry per-image captions (same fingerprint: the
    selection is a pure function of the source, and caches key it separately)."""

    def has_captions(self, index: int) -> bool:
        return True


def rows_with_captions(source: Any, report: SkipReport, method: str) -> Any:
    """The rows of ``source`` with per-image captions; the others are reported and skipped."""
    has_captions = getattr(source, "has_captions", None)
    if has_captions is None:
        raise ConfigError(f"method {method} needs per-image captions, which {source.name} cannot carry")
    keep = []
    for index in range(len(source)):
        if has_captions(index):
            keep.append(index)
        else:
            report.record(source.name, source.row_id(index), f"missing caption: {method} needs a caption per image")
    if not keep:
        raise ConfigError(
            f"{source.name}: no row has per-image captions (caption_0/caption_1, or chosen_caption/rejected_caption "
            f"in JSONL), which {method} needs; add them with `diffalign captions`"
        )
    return source if len(keep) == len(source) else CaptionedRows(source, keep)
