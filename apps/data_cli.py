"""``diffalign data check PATH``: decode every row of a preference data set and report each bad row exactly.

Reads whatever ``train`` reads (Pick-a-Pic-style pairs, ranked lists, JSONL
manifests, arena exports) through the same readers and the same row
judgement (:func:`diffalign.data.check_rows`), so the rows it reports are the
rows a ``data.validate=full`` run skips. Exit status: 0 when every row is
usable, 1 when it found bad rows (ties are reported but dropped by choice,
``data.drop_ties``, so they alone do not make it 1), 2 when the data set
itself cannot be read (missing file or column, no rows at all).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

__all__ = ["add_data_parsers", "check_data", "format_table"]

TIE = "tie"  # the category readers record a dropped tie under


def add_data_parsers(commands: Any) -> None:
    data = commands.add_parser("data", help="inspect preference data (data check PATH)")
    actions = data.add_subparsers(dest="data_command", required=True)
    check = actions.add_parser(
        "check", help="decode every row of a data set and report each bad row, with its reason",
        description="Exit status: 0 no bad rows, 1 bad rows found, 2 the data set cannot be read.",
    )
    check.add_argument("path", help="parquet file/folder, save_to_disk folder, JSONL manifest or Hub id, as data.path")
    check.add_argument("--format", choices=["auto", "pickapic", "jsonl", "ranked"], default="auto",
                       help="reader, as data.format ('auto' detects ranked lists and JSONL by their fields)")
    check.add_argument("--split", default="train", help="split of a multi-split folder or hub data set, as data.split")
    check.add_argument("--keep-ties", action="store_true", help="as data.drop_ties=false: ties are rows, not skips")
    check.add_argument("--workers", type=int, default=0, help="decoding processes (0: decode in this process)")
    check.add_argument("--json", dest="json_out", default=None, help="also write the report, with the row ids per reason, here")
    check.add_argument("--no-progress", action="store_true", help="no progress bar (none is drawn when stderr is not a terminal)")
    check.set_defaults(run=_check)


def check_data(
    path: str, *, format: str = "auto", split: str = "train", drop_ties: bool = True, workers: int = 0, progress: bool = True
) -> dict[str, Any]:
    """The report of ``data check`` as a dict: ``SkipReport.to_dict()`` plus the path, reader, usable rows and ``bad``.

    ``bad`` counts skipped rows other than ties. Dataset-level problems raise (FileNotFoundError,
    NoUsableRowsError for a data set without rows, ValueError for a missing or mistyped column).
    """
    from diffalign.data import SkipReport, check_rows, open_preference_source

    report = SkipReport(log_first=0, log_every=10**9)  # the table at the end names every row; no log line per row
    source = open_preference_source(path, format=format, split=split, drop_ties=drop_ties, report=report)  # type: ignore[arg-type]
    if len(source) == 0 and report.total == 0:
        from diffalign.data import require_rows

        require_rows(0, report, source.name)
    good = check_rows(source, report, workers=workers, progress=progress)
    out = {"path": str(path), "reader": type(source).__name__, "usable": len(good), **report.to_dict()}
    out["bad"] = report.total - report.counts.get(TIE, 0)
    return out


def format_table(result: dict[str, Any], max_ids: int = 5) -> str:
    """The summary table: one line per reason with its count and first ids, then the usable rows."""
    counts: dict[str, int] = result["counts"]
    rows = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    width = max([len("reason"), len("usable"), *(len(k) for k in counts)])
    lines = [f"{result['path']} ({result['reader']}): {result['rows_seen']} rows, {result['usable']} usable, {result['bad']} bad"
             + (f", {counts[TIE]} ties dropped" if TIE in counts else ""),
             f"  {'reason':<{width}}  {'rows':>7}  ids"]
    for category, n in rows:
        ids = [r["row_id"] for r in result["rows"][category]]
        shown = ", ".join(ids[:max_ids]) + (f", ... (+{len(ids) - max_ids})" if len(ids) > max_ids else "")
        lines.append(f"  {category:<{width}}  {n:>7}  {shown}")
    lines.append(f"  {'usable':<{width}}  {result['usable']:>7}")
    for category, _ in rows:  # one full reason per category: the detail the ids alone do not give
        first = result["rows"][category][0]
        if first["reason"].strip() != category:
            lines.append(f"  e.g. {first['row_id']}: {first['reason']}")
    return "\n".join(lines)


def _check(args: argparse.Namespace) -> int:
    from diffalign.apps.output import show_progress
    from diffalign.atomic import staged_file
    from diffalign.writable import check_writable

    try:
        if args.json_out is not None:
            check_writable(args.json_out, "--json", "file")  # before decoding every row, not after
        result = check_data(
            args.path, format=args.format, split=args.split, drop_ties=not args.keep_ties, workers=args.workers,
            progress=show_progress(not args.no_progress),
        )
    except (ValueError, KeyError) as error:  # a bad data set (missing or mistyped column, no such split): not a row
        print(f"diffalign data check: error: {error}", file=sys.stderr)
        return 2
    print(format_table(result))
    if args.json_out is not None:
        with staged_file(args.json_out) as temporary:  # a reader never sees half a report
            temporary.write_text(json.dumps(result, indent=1))
        print(f"diffalign data check: wrote {args.json_out}")
    if result["usable"] == 0:
        print(f"diffalign data check: no usable rows in {args.path}", file=sys.stderr)
    return 1 if result["bad"] else 0
