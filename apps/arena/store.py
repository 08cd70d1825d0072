"""The arena's vote store: SQLite in WAL mode, one transaction per vote, nothing acknowledged is ever lost.

Why SQLite: one file the user keeps, readable by anything, safe under many threads of one
server (writes serialise on the database lock, reads run beside them in WAL mode), and a
committed vote survives a killed process (``synchronous=FULL``).

Trust model: the server issues every pair shown with a one-time token bound to the session
and the pair (:meth:`VoteStore.issue`). A vote (:meth:`VoteStore.vote`) is stored only if
its token was issued, belongs to the voting session, is unused, and the session has not
voted on that pair already (also a ``UNIQUE`` constraint). Anything else is rejected, and the
rejection is counted in ``rejections`` -- never stored as a vote.

Schema version is ``PRAGMA user_version``; a database of another version is refused, never
silently rewritten.
"""

from __future__ import annotations

import os
import secrets
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

__all__ = ["CHOICES", "LEFT_SCORE", "SCHEMA_VERSION", "StoredVote", "VoteResult", "VoteStore", "StoreError"]

SCHEMA_VERSION = 1
CHOICES = ("left", "right", "tie", "both_bad")
# What a choice means for the left image: a win, a loss, or half of each ("both bad" prefers neither).
# The leaderboard's outcomes and the export's label_0 both read it.
LEFT_SCORE = {"left": 1.0, "right": 0.0, "tie": 0.5, "both_bad": 0.5}
TOKEN_BYTES = 24  # secrets.token_urlsafe(24): 32 characters, 192 bits
MAX_TOKEN_CHARS = 64
MAX_SESSION_CHARS = 64

_SCHEMA = """
CREATE TABLE items (
    item_id   TEXT PRIMARY KEY,
    model     TEXT NOT NULL,
    prompt    TEXT NOT NULL,
    path      TEXT NOT NULL
);
CREATE TABLE tokens (
    token      TEXT PRIMARY KEY,
    session_id TEXT NOT NULL,
    pair_id    TEXT NOT NULL,
    left_item  TEXT NOT NULL REFERENCES items(item_id),
    right_item TEXT NOT NULL REFERENCES items(item_id),
    issued_at  REAL NOT NULL,
    used_at    REAL
);
CREATE INDEX tokens_session_pair ON tokens(session_id, pair_id);
CREATE TABLE votes (
    vote_id    INTEGER PRIMARY KEY AUTOINCREMENT,
    session_id TEXT NOT NULL,
    pair_id    TEXT NOT NULL,
    left_item  TEXT NOT NULL REFERENCES items(item_id),
    right_item TEXT NOT NULL REFERENCES items(item_id),
    choice     TEXT NOT NULL CHECK (choice IN ('left', 'right', 'tie', 'both_bad')),
    token      TEXT NOT NULL UNIQUE,
    created_at REAL NOT NULL,
    UNIQUE (session_id, pair_id)
);
CREATE TABLE rejections (
    rejection_id INTEGER PRIMARY KEY AUTOINCREMENT,
    session_id   TEXT,
    reason       TEXT NOT NULL,
    created_at   REAL NOT NULL
);
"""


class StoreError(RuntimeError):
    """The database cannot be used as a vote store (wrong schema version, not a database)."""


@dataclass(frozen=True)
class VoteResult:
    """What a vote came to: accepted (with its id and the revealed models) or rejected with a reason."""

    accepted: bool
    reason: str
    vote_id: int | None = None
    left_model: str | None = None
    right_model: str | None = None


@dataclass(frozen=True)
class StoredVote:
    """One vote joined with its items, as the leaderboard and the export read it."""

    vote_id: int
    session_id: str
    pair_id: str
    choice: str
    created_at: float
    prompt: str
    left_model: str
    right_model: str
    left_path: str
    right_path: str
    left_item: str
    right_item: str
    issued_at: float  # when the pair was shown (its token issued): created_at - issued_at is the look time


class VoteStore:
    """A vote database at ``path`` (created on first use); safe to share between threads.

    Each thread gets its own connection; every write is one ``BEGIN IMMEDIATE`` transaction.
    """

    def __init__(self, path: str | os.PathLike[str], busy_timeout_s: float = 30.0) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._busy_timeout_s = busy_timeout_s
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []
        self._connections_lock = threading.Lock()
        self._migrate()

    # -- connections -----------------------------------------------------------------------------

    def _connection(self) -> sqlite3.Connection:
        connection = getattr(self._local, "connection", None)
        if connection is None:
            connection = sqlite3.connect(
                self.path, timeout=self._busy_timeout_s, isolation_level=None, check_same_thread=False
            )
            connection.execute("PRAGMA journal_mode=WAL")
            connection.execute("PRAGMA synchronous=FULL")  # a committed vote survives a crash, not only a kill
            connection.execute("PRAGMA foreign_keys=ON")
            self._local.connection = connection
            with self._connections_lock:
                self._connections.append(connection)
        return connection

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction: taken with BEGIN IMMEDIATE so concurrent writers queue, never deadlock."""
        connection = self._connection()
        connection.execute("BEGIN IMMEDIATE")
        try:
            yield connection
        except BaseException:
            connection.execute("ROLLBACK")
            raise
        connection.execute("COMMIT")

    def close(self) -> None:
        """Close every thread's connection (the database itself stays as committed)."""
        with self._connections_lock:
            for connection in self._connections:
                connection.close()
            self._connections.clear()
        self._local = threading.local()

    def _migrate(self) -> None:
        """Create the schema in an empty database; refuse one of another version (never rewrite it)."""
        try:
            with self._transaction() as db:
                version = db.execute("PRAGMA user_version").fetchone()[0]
                tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
                if version == 0 and not tables:
                    for statement in _SCHEMA.split(";"):
                        if statement.strip():
                            db.execute(statement)
                    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
                    version = SCHEMA_VERSION
        except sqlite3.DatabaseError as error:
            self.close()
            raise StoreError(f"{self.path}: not a usable SQLite vote database ({error})") from error
        if version != SCHEMA_VERSION:
            self.close()
            hint = " (tables without a schema version: not a diffalign vote store)" if version == 0 else ""
            raise StoreError(
                f"{self.path}: vote database schema version {version}, this diffalign reads version {SCHEMA_VERSION}{hint}"
            )

    # -- items and tokens --------------------------------------------------------------------------

    def register_items(self, items: Iterable[tuple[str, str, str, str]]) -> None:
        """Record ``(item_id, model, prompt, path)`` rows; an id already known keeps its first record."""
        with self._transaction() as db:
            db.executemany("INSERT OR IGNORE INTO items(item_id, model, prompt, path) VALUES (?, ?, ?, ?)", items)

    def issue(self, session_id: str, pair_id: str, left_item: str, right_item: str) -> str:
        """A fresh one-time token for showing ``pair_id`` to ``session_id`` with these sides."""
        if not _bounded_text(session_id, MAX_SESSION_CHARS):
            raise ValueError(f"session id must be a non-empty string of at most {MAX_SESSION_CHARS} characters")
        token = secrets.token_urlsafe(TOKEN_BYTES)
        with self._transaction() as db:
            db.execute(
                "INSERT INTO tokens(token, session_id, pair_id, left_item, right_item, issued_at) VALUES (?, ?, ?, ?, ?, ?)",
                (token, session_id, pair_id, left_item, right_item, time.time()),
            )
        return token

    def pending(self, session_id: str) -> tuple[str, str, str] | None:
        """The session's newest issued pair it has not voted on yet, as ``(pair_id, left, right)``."""
        row = self._connection().execute(
            "SELECT t.pair_id, t.left_item, t.right_item FROM tokens t WHERE t.session_id = ? AND NOT EXISTS "
            "(SELECT 1 FROM votes v WHERE v.session_id = t.session_id AND v.pair_id = t.pair_id) "
            "ORDER BY t.issued_at DESC LIMIT 1",
            (session_id,),
        ).fetchone()
        return None if row is None else (row[0], row[1], row[2])

    # -- votes -------------------------------------------------------------------------------------

    def vote(self, session_id: str, token: str, choice: str) -> VoteResult:
        """Store one vote, or reject it (and count the rejection) with the reason; one transaction either way."""
        reason = _input_problem(session_id, token, choice)
        with self._transaction() as db:
            row = None
            if reason is None:
                row = db.execute(
                    "SELECT session_id, pair_id, left_item, right_item, used_at FROM tokens WHERE token = ?", (token,)
                ).fetchone()
                if row is None:
                    reason = "unknown or forged token"
                elif row[0] != session_id:
                    reason = "token was issued to another session"
                elif row[4] is not None:
                    reason = "token already used (replayed vote)"
                elif db.execute(
                    "SELECT 1 FROM votes WHERE session_id = ? AND pair_id = ?", (session_id, row[1])
                ).fetchone():
                    reason = "double vote: this session already voted on this pair"
            if reason is not None:
                db.execute(
                    "INSERT INTO rejections(session_id, reason, created_at) VALUES (?, ?, ?)",
                    (session_id[:MAX_SESSION_CHARS] if isinstance(session_id, str) else None, reason, time.time()),
                )
                return VoteResult(False, reason)
            assert row is not None
            now = time.time()
            db.execute("UPDATE tokens SET used_at = ? WHERE token = ?", (now, token))
            cursor = db.execute(
                "INSERT INTO votes(session_id, pair_id, left_item, right_item, choice, token, created_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (session_id, row[1], row[2], row[3], choice, token, now),
            )
            models = dict(
                db.execute("SELECT item_id, model FROM items WHERE item_id IN (?, ?)", (row[2], row[3])).fetchall()
            )
            return VoteResult(True, "stored", cursor.lastrowid, models.get(row[2]), models.get(row[3]))

    def reject(self, session_id: str, reason: str) -> VoteResult:
        """Count a vote refused before it reached the store (a rate limit), with the reason."""
        with self._transaction() as db:
            db.execute("INSERT INTO rejections(session_id, reason, created_at) VALUES (?, ?, ?)",
                       (session_id[:MAX_SESSION_CHARS], reason, time.time()))
        return VoteResult(False, reason)

    # -- reading -----------------------------------------------------------------------------------

    def votes(self) -> list[StoredVote]:
        """Every stored vote with its items, oldest first."""
        rows = self._connection().execute(
            "SELECT v.vote_id, v.session_id, v.pair_id, v.choice, v.created_at, l.prompt, l.model, r.model, "
            "l.path, r.path, v.left_item, v.right_item, t.issued_at FROM votes v "
            "JOIN items l ON l.item_id = v.left_item JOIN items r ON r.item_id = v.right_item "
            "JOIN tokens t ON t.token = v.token ORDER BY v.vote_id"
        ).fetchall()
        return [StoredVote(*row) for row in rows]

    def vote_count(self, session_id: str | None = None) -> int:
        """Stored votes in all, or of one session."""
        if session_id is None:
            return self._connection().execute("SELECT COUNT(*) FROM votes").fetchone()[0]
        return self._connection().execute("SELECT COUNT(*) FROM votes WHERE session_id = ?", (session_id,)).fetchone()[0]

    def rejection_counts(self) -> dict[str, int]:
        """Rejected votes by reason."""
        rows = self._connection().execute("SELECT reason, COUNT(*) FROM rejections GROUP BY reason").fetchall()
        return {reason: count for reason, count in rows}

    def issued_pairs(self) -> list[tuple[str, str]]:
        """Distinct ``(session_id, pair_id)`` shown so far: what the scheduler rebuilds its exposure from."""
        return self._connection().execute("SELECT DISTINCT session_id, pair_id FROM tokens").fetchall()


def _bounded_text(value: object, limit: int) -> bool:
    return isinstance(value, str) and 0 < len(value) <= limit


def _input_problem(session_id: object, token: object, choice: object) -> str | None:
    """Why a vote's inputs are malformed, before the database is consulted (bounded sizes, known choice)."""
    if not _bounded_text(session_id, MAX_SESSION_CHARS):
        return "malformed session id"
    if not _bounded_text(token, MAX_TOKEN_CHARS):
        return "unknown or forged token"
    if choice not in CHOICES:
        return f"unknown choice {str(choice)[:20]!r} (expected one of {', '.join(CHOICES)})"
    return None
