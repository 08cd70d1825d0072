"""Check a whole preference data set: decode every row once and report each bad row exactly.

Why a full pass exists: readers check only the cheap columns when a source is
opened (labels, captions, file existence); images are decoded lazily, when a
batch draws them. A short run therefore sees only some broken images. This
pass decodes every row through :func:`~diffalign.data.dataset.load_group` --
the same judgement training applies -- so ``diffalign data check`` and a
``data.validate=full`` run skip exactly the rows the lazy path would, all of
them, each once, before the first step.

Decoding runs in ``workers`` DataLoader processes (as training's
``data.num_workers``); only verdicts (index, row id, reason) travel back to
the main process, which alone writes the :class:`SkipReport`.
"""

from __future__ import annotations

from typing import Any

from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from diffalign.data.dataset import load_group
from diffalign.data.report import SkipReport
from diffalign.data.types import BadRowError, NoUsableRowsError, PreferenceGroup

__all__ = ["SelectedRows", "check_rows", "require_rows"]

Verdict = tuple[int, str, str | None]  # (index, row id, reason or None for a good row)


class _Verdicts(Dataset[Verdict]):
    """Row ``index`` -> its verdict; the decoded pixels are dropped in the worker."""

    def __init__(self, source: Any) -> None:
        self.source = source

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> Verdict:
        try:
            group = load_group(self.source, index)
        except BadRowError as err:
            return index, err.row_id, err.reason
        return index, group.row_id, None


def _as_list(items: list[Verdict]) -> list[Verdict]:
    return items


def check_rows(source: Any, report: SkipReport, *, workers: int = 0, progress: bool = False, chunk: int = 16) -> list[int]:
    """Decode every row of ``source``; record each bad one in ``report``; return the good rows' indices (ascending).

    Anything but a :class:`BadRowError` (a bug, a full disk) propagates: only row problems are skipped.
    """
    if workers < 0:
        raise ValueError(f"check_rows: workers must be >= 0, got {workers}")
    loader = DataLoader(_Verdicts(source), batch_size=chunk, num_workers=workers, collate_fn=_as_list)
    good: list[int] = []
    bar = tqdm(total=len(source), desc=f"check {source.name}", unit="row", disable=not progress)
    for verdicts in loader:
        for index, row_id, reason in verdicts:
            if reason is None:
                good.append(index)
            else:
                report.record(source.name, row_id, reason)
        bar.update(len(verdicts))
        bar.set_postfix(bad=report.total, refresh=False)
    bar.close()
    report.images_checked = f"every row decoded before use ({len(source)} rows past the cheap checks, {len(good)} good)"
    return good


def require_rows(n_usable: int, report: SkipReport, where: str) -> None:
    """NoUsableRowsError naming ``where`` when no row is usable: empty data, or every row skipped (with why)."""
    if n_usable > 0:
        return
    if report.total == 0:
        raise NoUsableRowsError(f"{where}: the data set is empty: it has no rows")
    raise NoUsableRowsError(f"{where}: no usable rows: all {report.rows_seen or report.total} were skipped.\n{report.summary()}")


class SelectedRows:
    """A source restricted to some of its rows (e.g. those :func:`check_rows` found good).

    The fingerprint is the source's: the selection is a pure function of the data and the reader.
    """

    def __init__(self, source: Any, indices: list[int]) -> None:
        self.source = source
        self.indices = indices
        self.name = source.name

    def __len__(self) -> int:
        return len(self.indices)

    def load(self, index: int, min_side: int | None = None) -> PreferenceGroup:
        return self.source.load(self.indices[index], min_side)

    def row_id(self, index: int) -> str:
        return self.source.row_id(self.indices[index])

    def fingerprint(self) -> str:
        return self.source.fingerprint()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.source!r}, {len(self)} of {len(self.source)} rows)"
