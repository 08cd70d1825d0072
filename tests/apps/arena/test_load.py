"""Load: 50 concurrent voters x 100 votes each on loopback leave exactly 5,000 rows, none lost or duplicated.

Runs benchmarks/arena_load.py at its full size (about 2 minutes on 2 cores). The audit is the
test; the votes/s it prints are the benchmark's figure (benchmarks/README.md), not asserted here.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]


def test_fifty_clients_hundred_votes_each_exactly_5000_rows(tmp_path):
    spec = importlib.util.spec_from_file_location("arena_load", REPO / "benchmarks" / "arena_load.py")
    benchmark = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(benchmark)
    report = benchmark.main(["--clients", "50", "--votes", "100", "--workdir", str(tmp_path)])
    assert report["errors"] == []
    assert report["rows"] == report["expected"] == 5000
    assert report["distinct_session_pairs"] == 5000, "a (session, pair) was stored twice"
    assert report["sessions"] == 50
    assert report["acknowledged"] == 5000 and report["acknowledged_missing"] == 0
    assert report["rejections"] == 0
