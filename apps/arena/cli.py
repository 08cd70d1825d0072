"""``diffalign arena`` and ``diffalign export-votes``: the command-line side of the comparison arena."""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys
from pathlib import Path

from diffalign.data.report import SkipReport

__all__ = ["add_arena_parsers", "build_arena", "read_auth"]

AUTH_ENV = "DIFFALIGN_ARENA_AUTH"


def build_arena(sources: list[str], database: str | Path, seed: int | None = None, bootstrap_rounds: int = 200,
                limits=None):
    """Sources checked and matched, the vote store opened and told the items, the scheduler restored.

    ``limits``: the :class:`~diffalign.apps.arena.sessions.RateLimits` (default: its documented defaults).
    """
    from diffalign.apps.arena.app import Arena
    from diffalign.apps.arena.schedule import PairScheduler
    from diffalign.apps.arena.sessions import RateLimits
    from diffalign.apps.arena.sources import load_sources, match_pairs
    from diffalign.apps.arena.store import VoteStore

    report = SkipReport()
    loaded = load_sources(sources, report)
    if report.total:
        print(report.summary(), file=sys.stderr)
    items = {item.item_id: item for group in loaded.values() for item in group}
    pairs = match_pairs(loaded)
    store = VoteStore(database)
    store.register_items((i.item_id, i.model, i.prompt, str(i.path)) for i in items.values())
    database = Path(database)
    heatmap = database.with_name(database.stem + ".heatmap.png")
    return Arena(store, PairScheduler(pairs, seed=seed), items, heatmap, bootstrap_rounds=bootstrap_rounds,
                 limits=limits or RateLimits())


def read_auth(path: str | None) -> list[tuple[str, str]] | None:
    """``user:password`` lines from a file, else from $DIFFALIGN_ARENA_AUTH (never from argv, which ps shows)."""
    text = Path(path).read_text(encoding="utf-8") if path else os.environ.get(AUTH_ENV)
    if not text:
        return None
    where = path or f"${AUTH_ENV}"
    credentials = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        user, sep, password = line.strip().partition(":")
        if not sep or not user or not password:
            raise ValueError(f"{where} line {number}: expected user:password")
        credentials.append((user, password))
    if not credentials:
        raise ValueError(f"{where}: no user:password line")
    return credentials


def _arena(args: argparse.Namespace) -> int:
    from diffalign.apps.arena.app import serve
    from diffalign.apps.arena.page import PageOptions
    from diffalign.apps.arena.sessions import RateLimits
    from diffalign.apps.arena.sources import SourceError
    from diffalign.apps.arena.store import StoreError
    from diffalign.apps.ports import port_problem

    if (problem := port_problem(args.host, args.port)) is not None:  # before uvicorn, which exits 1 with a log line
        print(f"diffalign arena: error: {problem}", file=sys.stderr)
        return 2
    try:
        auth = read_auth(args.auth_file)
        limits = RateLimits(args.session_votes_per_minute, args.address_votes_per_minute, args.address_sessions_per_hour,
                            args.session_pairs_per_minute)
        options = PageOptions(args.display_size, args.upscale, args.reveal, args.reveal_seconds)
        arena = build_arena(args.source, args.db, seed=args.seed, bootstrap_rounds=args.bootstrap_rounds, limits=limits)
    except (SourceError, StoreError, ValueError) as error:
        print(f"diffalign arena: error: {error}", file=sys.stderr)
        return 2
    if not _is_loopback(args.host) and auth is None:
        print(f"diffalign arena: warning: serving on {args.host} without --auth-file: anyone who reaches it can vote",
              file=sys.stderr)
    serve(arena, host=args.host, port=args.port, auth=auth, concurrency=args.concurrency, options=options)
    return 0


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _export(args: argparse.Namespace) -> int:
    from diffalign.apps.arena.export import ExportFilters, export_votes

    report = SkipReport()
    filters = ExportFilters(args.drop_both_bad, args.min_session_votes, drop_suspicious=not args.keep_suspicious)
    counts = export_votes(args.db, args.out, filters, report)
    if report.total:
        print(report.summary(), file=sys.stderr)
    if counts["written"] == 0:
        print(f"diffalign export-votes: warning: 0 of {counts['votes']} votes exported, {args.out} not written "
              + ", ".join(f"{k}: {v}" for k, v in counts.items() if k not in ("written", "votes")), file=sys.stderr)
        return 1
    print(f"diffalign export-votes: wrote {counts['written']} of {counts['votes']} votes to {args.out} "
          + ", ".join(f"{k}: {v}" for k, v in counts.items() if k not in ("written", "votes")))
    if args.push is not None:
        from diffalign.apps.arena.export import push_votes
        from diffalign.trainers.hub import HubError

        try:
            url = push_votes(args.out, args.push, private=args.private, token=args.token)
        except HubError as error:
            print(f"diffalign export-votes: error: {error} (the parquet {args.out} is written)", file=sys.stderr)
            return 1
        print(f"diffalign export-votes: pushed {args.out} to {url}")
    return 0


def add_arena_parsers(commands: argparse._SubParsersAction) -> None:
    arena = commands.add_parser("arena", help="Gradio app for blind side-by-side votes between models' images")
    arena.add_argument("--source", action="append", required=True, metavar="[NAME=]PATH",
                       help="a model's images: manifest.jsonl ({image, prompt, model?} rows) or a folder with one; repeat")
    arena.add_argument("--db", required=True, help="SQLite vote database (created if missing)")
    arena.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback only)")
    arena.add_argument("--port", type=int, default=7860, help="port to serve on (default 7860)")
    arena.add_argument("--auth-file", default=None,
                       help=f"file of user:password lines (or set ${AUTH_ENV}); none: no login")
    arena.add_argument("--seed", type=int, default=None, help="seed of pair order and sides (default: random)")
    arena.add_argument("--concurrency", type=int, default=16, help="requests handled at once")
    arena.add_argument("--bootstrap-rounds", type=int, default=200, help="refits behind the leaderboard's intervals")
    arena.add_argument("--session-votes-per-minute", type=int, default=120,
                       help="most votes one session may cast in any minute (0: no limit)")
    arena.add_argument("--address-votes-per-minute", type=int, default=6000,
                       help="most votes from one client address in any minute (0: no limit)")
    arena.add_argument("--address-sessions-per-hour", type=int, default=60,
                       help="most new sessions one client address may start in any hour (0: no limit)")
    arena.add_argument("--session-pairs-per-minute", type=int, default=240,
                       help="most pairs (reloads included) one session may be shown in any minute (0: no limit)")
    arena.add_argument("--display-size", type=int, default=512,
                       help="height in CSS px of each image box; smaller images are scaled up to it (default 512)")
    arena.add_argument("--upscale", choices=("nearest", "bicubic", "none"), default="nearest",
                       help="filter for scaling small images up: nearest keeps pixel art crisp (default), "
                            "bicubic suits photos, none leaves scaling to the browser")
    arena.add_argument("--reveal", choices=("next", "pause"), default="next",
                       help="after a vote the model names stay under the images until: next (the voter presses "
                            "Next, Space or N; default) or pause (the next pair comes after --reveal-seconds)")
    arena.add_argument("--reveal-seconds", type=float, default=2.0, help="the pause of --reveal pause (default 2)")
    arena.set_defaults(run=_arena)

    export = commands.add_parser("export-votes", help="arena votes -> Pick-a-Pic v2-schema parquet for `diffalign train`")
    export.add_argument("db", help="the arena's SQLite vote database")
    export.add_argument("out", help="output parquet file")
    export.add_argument("--drop-both-bad", action="store_true", help="leave out 'both bad' votes (default: ties)")
    export.add_argument("--min-session-votes", type=int, default=0, help="leave out sessions with fewer votes")
    export.add_argument("--keep-suspicious", action="store_true",
                        help="keep sessions that look automated (default: dropped and counted; see arena.suspicion)")
    export.add_argument("--push", default=None, metavar="REPO_ID",
                        help="also upload the parquet to this Hugging Face dataset repo (created if missing) as its train split")
    export.add_argument("--private", action="store_true", help="with --push: create the dataset repo as private")
    export.add_argument("--token", default=None, help="with --push: a hub token (default: HF_TOKEN or `hf auth login`)")
    export.set_defaults(run=_export)
