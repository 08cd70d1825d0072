"""Arena votes -> Pick-a-Pic v2 parquet -> `diffalign train`: labels, filters, bad rows, and a real training run."""

from __future__ import annotations

import json
import shutil

import pyarrow.parquet as pq
import pytest

from diffalign.apps.arena.cli import build_arena
from diffalign.apps.cli import main
from diffalign.apps.arena.export import ExportFilters, export_votes
from diffalign.data.report import SkipReport
from diffalign.trainers.metrics import read_metrics


@pytest.fixture
def voted_database(toy_arena_sources, tmp_path):
    """Votes cast through the arena's own logic: session A 10 votes (left/right/tie/both bad in turn), B 2 votes.

    On a private copy of the sources: a test here deletes an image, which must not reach other tests.
    The pairs are backdated 3-7 s before their votes, as a person looks, so no session is flagged as automated.
    """
    database = tmp_path / "votes.sqlite"
    sources = [shutil.copytree(p.parent, tmp_path / "sources" / name) for name, p in toy_arena_sources.items()]
    arena = build_arena([str(p) for p in sources], database, seed=0)
    choices = ("left", "right", "tie", "both_bad")
    for session, n in (("session-a", 10), ("session-b", 2)):
        for k in range(n):
            issued = arena.issue(session)
            assert arena.vote(session, issued.token, choices[k % 4]).accepted
    arena.store.close()
    import sqlite3

    with sqlite3.connect(database) as db:
        db.execute("UPDATE tokens SET issued_at = issued_at - 3 - rowid % 5")
    return database


def test_export_writes_pickapic_schema_with_labels(voted_database, tmp_path):
    out = tmp_path / "votes.parquet"
    counts = export_votes(voted_database, out)
    assert counts == {"votes": 12, "written": 12}
    table = pq.read_table(out)
    for column in ("jpg_0", "jpg_1", "label_0", "label_1", "caption", "model_0", "model_1", "user_id", "ranking_id",
                   "created_at"):
        assert column in table.column_names, column
    rows = table.to_pylist()
    expected = {"left": 1.0, "right": 0.0, "tie": 0.5, "both_bad": 0.5}
    for row in rows:
        assert row["label_0"] == expected[row["choice"]] and row["label_0"] + row["label_1"] == 1.0
        assert row["jpg_0"][:8] == b"\x89PNG\r\n\x1a\n" and row["model_0"] != row["model_1"]
        assert row["caption"].startswith("a ")
    assert [r["ranking_id"] for r in rows] == list(range(1, 13))
    assert {r["user_id"] for r in rows} == {"session-a", "session-b"}


def test_export_filters_and_unreadable_images(voted_database, tmp_path):
    counts = export_votes(voted_database, tmp_path / "a.parquet", ExportFilters(drop_both_bad=True, min_session_votes=5))
    # session-b (2 votes) is dropped whole; session-a loses its 2 both-bad votes (k = 3, 7).
    assert counts["written"] == 8 and counts["dropped short session"] == 2 and counts["dropped both bad"] == 2
    assert set(pq.read_table(tmp_path / "a.parquet").column("user_id").to_pylist()) == {"session-a"}

    first = pq.read_table(tmp_path / "a.parquet").slice(0, 1).to_pylist()[0]
    from diffalign.apps.arena.store import VoteStore

    store = VoteStore(voted_database)
    [vote] = [v for v in store.votes() if v.vote_id == first["ranking_id"]]
    store.close()
    import pathlib

    pathlib.Path(vote.left_path).unlink()
    report = SkipReport()
    counts = export_votes(voted_database, tmp_path / "b.parquet", report=report)
    assert counts["skipped unreadable image"] >= 1 and counts["written"] == 12 - counts["skipped unreadable image"]
    assert report.counts == {"unreadable image": counts["skipped unreadable image"]}
    assert report.examples["unreadable image"][0].row_id == f"vote {vote.vote_id}"


def test_exported_votes_train_with_diffalign_train(voted_database, tiny_models, train_args, tmp_path, capsys):
    data = tmp_path / "votes.parquet"
    assert main(["export-votes", str(voted_database), str(data)]) == 0
    assert "wrote 12 of 12 votes" in capsys.readouterr().out
    out = tmp_path / "run"
    assert main(train_args("sd15", tiny_models["sd15"], data, out, "train.max_steps=2")) == 0
    rows = read_metrics(out / "metrics.jsonl")
    assert [row["step"] for row in rows] == [1, 2]
    assert (out / "final" / "diffalign.json").is_file()
    # The 4 tie / both-bad votes (label 0.5) are dropped by the trainer, and counted.
    assert json.loads((out / "skipped_rows.json").read_text())["counts"] == {"tie": 4}
