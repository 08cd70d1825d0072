"""Kill the arena mid-campaign (SIGKILL, no clean shutdown) and restart it: every acknowledged vote is there."""

from __future__ import annotations

import os
import signal
import sqlite3
import threading
import time

from diffalign.apps.arena.client import ArenaClient
from diffalign.apps.arena.store import VoteStore

CHOICES = ("left", "right", "tie", "both_bad")


def test_killed_arena_keeps_every_acknowledged_vote(toy_arena_sources, start_arena, tmp_path):
    database = tmp_path / "votes.sqlite"
    url, process = start_arena(toy_arena_sources.values(), database)
    acknowledged: dict[int, tuple[str, str]] = {}
    stop = threading.Event()
    lock = threading.Lock()

    def voter(index: int) -> None:
        client = ArenaClient(url, timeout_s=10.0)
        try:
            while not stop.is_set():
                pair = client.next_pair()
                choice = CHOICES[index % 4]
                result = client.vote(choice, pair["token"])
                if result["accepted"]:  # the server said so: this vote must survive
                    with lock:
                        acknowledged[result["vote_id"]] = (client.session_id, choice)
        except Exception:  # noqa: BLE001 -- the server is killed under us; that is the point
            pass
        finally:
            client.close()

    threads = [threading.Thread(target=voter, args=(i,)) for i in range(6)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 60
    while len(acknowledged) < 60 and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)  # mid-campaign: requests are in flight
    process.wait()
    stop.set()
    for thread in threads:
        thread.join(timeout=30)
    assert len(acknowledged) >= 60, "the campaign should have been running when the server was killed"

    with sqlite3.connect(database) as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    restarted_url, _ = start_arena(toy_arena_sources.values(), database)
    store = VoteStore(database)
    stored = {v.vote_id: (v.session_id, v.choice) for v in store.votes()}
    store.close()
    missing = {k: v for k, v in acknowledged.items() if stored.get(k) != v}
    assert not missing, f"acknowledged votes lost or changed after the kill: {missing}"
    # The restarted server takes votes again, numbering after the old ones.
    client = ArenaClient(restarted_url)
    result = client.vote("left", client.next_pair()["token"])
    client.close()
    assert result["accepted"] and result["vote_id"] > max(stored)
