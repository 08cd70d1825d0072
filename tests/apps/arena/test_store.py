"""The arena's vote store: one-time tokens, rejections counted not stored, durability, schema version."""

from __future__ import annotations

import sqlite3
import threading

import pytest

from diffalign.apps.arena.store import SCHEMA_VERSION, StoreError, VoteStore


@pytest.fixture
def store(tmp_path):
    store = VoteStore(tmp_path / "votes.sqlite")
    store.register_items([("a", "model-a", "a cat", "/x/a.png"), ("b", "model-b", "a cat", "/x/b.png"),
                          ("c", "model-c", "a cat", "/x/c.png")])
    yield store
    store.close()


def test_vote_is_stored_once_and_reveals_models(store):
    token = store.issue("s1", "a~b", "b", "a")
    result = store.vote("s1", token, "left")
    assert result.accepted and result.vote_id == 1
    assert (result.left_model, result.right_model) == ("model-b", "model-a")
    [vote] = store.votes()
    assert (vote.session_id, vote.pair_id, vote.choice, vote.left_model, vote.right_model, vote.prompt) == (
        "s1", "a~b", "left", "model-b", "model-a", "a cat")


def test_forged_replayed_foreign_and_double_votes_are_rejected_and_counted(store):
    token = store.issue("s1", "a~b", "a", "b")
    assert store.vote("s1", token, "right").accepted
    replay = store.vote("s1", token, "left")
    assert not replay.accepted and "already used" in replay.reason
    forged = store.vote("s1", "x" * 32, "left")
    assert not forged.accepted and "forged" in forged.reason
    # A second token for the same pair (the page reloaded) cannot add a second vote.
    second = store.issue("s1", "a~b", "b", "a")
    double = store.vote("s1", second, "left")
    assert not double.accepted and double.reason.startswith("double vote")
    # A token is bound to the session it was issued to.
    other = store.issue("s2", "a~c", "a", "c")
    stolen = store.vote("s1", other, "left")
    assert not stolen.accepted and "another session" in stolen.reason
    assert store.vote("s2", other, "tie").accepted
    assert store.vote_count() == 2
    assert store.rejection_counts() == {
        "token already used (replayed vote)": 1,
        "unknown or forged token": 1,
        "double vote: this session already voted on this pair": 1,
        "token was issued to another session": 1,
    }


@pytest.mark.parametrize(
    ("session", "token", "choice", "reason"),
    [
        ("s1", "t" * 65, "left", "unknown or forged token"),  # longer than any issued token
        ("s1", "", "left", "unknown or forged token"),
        ("s" * 65, "tok", "left", "malformed session id"),
        ("s1", "tok", "better", "unknown choice 'better'"),
    ],
)
def test_malformed_inputs_are_rejected_before_lookup(store, session, token, choice, reason):
    result = store.vote(session, token, choice)
    assert not result.accepted and result.reason.startswith(reason)
    assert store.vote_count() == 0 and sum(store.rejection_counts().values()) == 1


def test_pending_pair_is_the_newest_unvoted_one(store):
    assert store.pending("s1") is None
    token = store.issue("s1", "a~b", "b", "a")
    assert store.pending("s1") == ("a~b", "b", "a")
    store.vote("s1", token, "tie")
    assert store.pending("s1") is None


def test_votes_survive_reopening_and_concurrent_writers(tmp_path):
    path = tmp_path / "votes.sqlite"
    store = VoteStore(path)
    store.register_items([("a", "A", "p", "/a"), ("b", "B", "p", "/b")])
    results: list[bool] = []

    def voter(k: int) -> None:
        for j in range(25):
            session = f"s{k}-{j}"
            results.append(store.vote(session, store.issue(session, "a~b", "a", "b"), "left").accepted)

    threads = [threading.Thread(target=voter, args=(k,)) for k in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    store.close()
    assert results.count(True) == 200
    reopened = VoteStore(path)
    assert reopened.vote_count() == 200
    assert len({v.session_id for v in reopened.votes()}) == 200
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    reopened.close()


def test_other_schema_versions_and_foreign_databases_are_refused(tmp_path):
    newer = tmp_path / "newer.sqlite"
    VoteStore(newer).close()
    with sqlite3.connect(newer) as db:
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(StoreError, match=f"schema version {SCHEMA_VERSION + 1}"):
        VoteStore(newer)
    foreign = tmp_path / "foreign.sqlite"
    with sqlite3.connect(foreign) as db:
        db.execute("CREATE TABLE notes (x)")
    with pytest.raises(StoreError, match="not a diffalign vote store"):
        VoteStore(foreign)
    garbage = tmp_path / "garbage.sqlite"
    garbage.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(StoreError, match="not a usable SQLite"):
        VoteStore(garbage)
