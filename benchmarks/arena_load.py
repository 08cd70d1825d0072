"""Load benchmark of the arena: N concurrent voters × M votes each on loopback, then an exact audit.

Starts ``diffalign arena`` on toy sources in its own process, runs ``--clients`` threads, each one
session (its own keep-alive connection) that asks for a pair and votes on it ``--votes`` times,
then checks the database: exactly clients × votes rows, no (session, pair) twice, every
acknowledged vote id present, nothing rejected. Prints votes/s (wall clock, issue + vote).

    python benchmarks/arena_load.py --clients 50 --votes 100
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import sys
import tempfile
import threading
import time
from pathlib import Path

from diffalign.apps.arena.client import ArenaClient, free_port, launch_arena, wait_until_up
from diffalign.toy.arena import write_toy_sources

CHOICES = ("left", "right", "tie", "both_bad")


def run_voter(url: str, votes: int, index: int, acknowledged: list[int], errors: list[str]) -> None:
    client = ArenaClient(url)
    try:
        for k in range(votes):
            pair = client.next_pair()
            result = client.vote(CHOICES[(index + k) % 4], pair["token"])
            if not result["accepted"]:
                errors.append(f"client {index} vote {k}: rejected: {result['reason']}")
                continue
            acknowledged.append(result["vote_id"])
    except Exception as error:  # noqa: BLE001 (reported, and fails the audit)
        errors.append(f"client {index}: {type(error).__name__}: {error}")
    finally:
        client.close()


def audit(database: Path, clients: int, votes: int, acknowledged: list[int]) -> dict:
    with sqlite3.connect(database) as db:
        rows = db.execute("SELECT COUNT(*) FROM votes").fetchone()[0]
        distinct = db.execute("SELECT COUNT(*) FROM (SELECT DISTINCT session_id, pair_id FROM votes)").fetchone()[0]
        sessions = db.execute("SELECT COUNT(DISTINCT session_id) FROM votes").fetchone()[0]
        ids = {row[0] for row in db.execute("SELECT vote_id FROM votes")}
        rejected = db.execute("SELECT COUNT(*) FROM rejections").fetchone()[0]
    return {
        "rows": rows,
        "expected": clients * votes,
        "distinct_session_pairs": distinct,
        "sessions": sessions,
        "acknowledged": len(acknowledged),
        "acknowledged_missing": len(set(acknowledged) - ids),
        "rejections": rejected,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--votes", type=int, default=100)
    parser.add_argument("--workdir", default=None, help="default: a temporary folder")
    parser.add_argument("--concurrency", type=int, default=16, help="the server's --concurrency")
    args = parser.parse_args(argv)

    root = Path(args.workdir or tempfile.mkdtemp(prefix="arena-load-"))
    # 3 models x 12 prompts x 3 seeds = 108 pairs: every voter can cast 100 votes on distinct pairs.
    sources = write_toy_sources(root / "sources", seeds_per_prompt=3)
    database = root / "votes.sqlite"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = launch_arena(list(sources.values()), database, port, "--concurrency", str(args.concurrency),
                           log=root / "arena.log")
    try:
        wait_until_up(url, process)
        acknowledged: list[int] = []
        errors: list[str] = []
        threads = [threading.Thread(target=run_voter, args=(url, args.votes, i, acknowledged, errors))
                   for i in range(args.clients)]
        start = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        seconds = time.perf_counter() - start
    finally:
        process.terminate()
        process.wait(timeout=30)
    report = audit(database, args.clients, args.votes, acknowledged)
    report.update(clients=args.clients, votes_per_client=args.votes, seconds=round(seconds, 2),
                  votes_per_s=round(report["rows"] / seconds, 1), errors=errors[:10])
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    result = main()
    ok = (result["rows"] == result["expected"] == result["distinct_session_pairs"] == result["acknowledged"]
          and result["acknowledged_missing"] == 0 and not result["errors"])
    sys.exit(0 if ok else 1)
