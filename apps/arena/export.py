"""``diffalign export-votes``: arena votes as a Pick-a-Pic v2-schema parquet that ``diffalign train`` reads.

Each vote becomes one row: image 0 is the image shown on the left, image 1 the one on the
right; ``label_0`` is 1 when the left image won, 0 when the right one did, 0.5 for a tie
and for "both bad" (neither is preferred; training drops ties by default and counts them).
``jpg_0``/``jpg_1`` hold the image files' bytes unchanged (PNG stays PNG: re-encoding to JPEG
would lose what people judged; the reader decodes any format). ``user_id`` is the arena
session, ``ranking_id`` the vote id, ``created_at`` the vote's time (UTC).

A vote whose image file is gone or unreadable is reported with its vote id and skipped; the
file is written under a temporary name and renamed when complete, and not at all when no vote
is left to write. Sessions that look automated (:mod:`.suspicion`: one side always, too fast to
have looked, machine timing) are dropped by default and counted ("dropped suspicious session").
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from diffalign.apps.arena.store import LEFT_SCORE, StoredVote, VoteStore
from diffalign.apps.arena.suspicion import SuspicionRules, flag_sessions
from diffalign.atomic import staged_file
from diffalign.data.pickapic import pickapic_core_fields
from diffalign.data.report import SkipReport

__all__ = ["ExportFilters", "export_votes", "push_votes"]

VOTES_IN_REPO = "data/train.parquet"  # the hub's data set viewer and `datasets` read data/train*.parquet as the train split


def _schema():
    import pyarrow as pa

    return pa.schema(
        [
            *pickapic_core_fields(),
            ("user_id", pa.string()),
            ("ranking_id", pa.int64()),
            ("created_at", pa.timestamp("us", tz="UTC")),
            ("image_0_uid", pa.string()),
            ("image_1_uid", pa.string()),
            ("best_image_uid", pa.string()),
            ("has_label", pa.bool_()),
            ("are_different", pa.bool_()),
            ("choice", pa.string()),
        ]
    )


@dataclass(frozen=True)
class ExportFilters:
    """What to leave out: "both bad" votes, sessions with fewer than ``min_session_votes`` votes, and
    (by default) the sessions ``suspicion`` flags as automated."""

    drop_both_bad: bool = False
    min_session_votes: int = 0
    drop_suspicious: bool = True
    suspicion: SuspicionRules = SuspicionRules()

    def __post_init__(self) -> None:
        if self.min_session_votes < 0:
            raise ValueError(f"min_session_votes must be >= 0, got {self.min_session_votes}")


def export_votes(
    database: str | Path, out: str | Path, filters: ExportFilters = ExportFilters(), report: SkipReport | None = None
) -> dict[str, int]:
    """Write the votes of ``database`` to the parquet file ``out``; returns counts of what was written and left out."""
    import datetime

    import pyarrow as pa
    import pyarrow.parquet as pq

    database = Path(database)
    if not database.is_file():
        raise FileNotFoundError(f"{database}: no such vote database")
    report = report or SkipReport()
    store = VoteStore(database)
    try:
        votes = store.votes()
    finally:
        store.close()
    per_session = Counter(vote.session_id for vote in votes)
    flagged = flag_sessions(votes, filters.suspicion)
    counts = Counter(votes=len(votes))
    if flagged:
        counts["suspicious sessions"] = len(flagged)
    rows = []
    for vote in votes:
        if filters.drop_suspicious and vote.session_id in flagged:
            counts["dropped suspicious session"] += 1
            continue
        if filters.drop_both_bad and vote.choice == "both_bad":
            counts["dropped both bad"] += 1
            continue
        if per_session[vote.session_id] < filters.min_session_votes:
            counts["dropped short session"] += 1
            continue
        images = _read_images(vote, report, str(database))
        if images is None:
            counts["skipped unreadable image"] += 1
            continue
        label_0 = LEFT_SCORE[vote.choice]
        best = vote.left_item if label_0 == 1.0 else vote.right_item if label_0 == 0.0 else None
        rows.append(
            {
                "jpg_0": images[0],
                "jpg_1": images[1],
                "label_0": label_0,
                "label_1": 1.0 - label_0,
                "caption": vote.prompt,
                "model_0": vote.left_model,
                "model_1": vote.right_model,
                "user_id": vote.session_id,
                "ranking_id": vote.vote_id,
                "created_at": datetime.datetime.fromtimestamp(vote.created_at, tz=datetime.timezone.utc),
                "image_0_uid": vote.left_item,
                "image_1_uid": vote.right_item,
                "best_image_uid": best,
                "has_label": True,
                "are_different": True,
                "choice": vote.choice,
            }
        )
    counts["written"] = len(rows)
    if not rows:
        return dict(counts)  # nothing to train on: the caller warns; no empty file to mistake for data
    table = pa.Table.from_pylist(rows, schema=_schema())
    with staged_file(out) as temporary:
        pq.write_table(table, temporary)
    return dict(counts)


def _read_images(vote: StoredVote, report: SkipReport, source: str) -> tuple[bytes, bytes] | None:
    try:
        return Path(vote.left_path).read_bytes(), Path(vote.right_path).read_bytes()
    except OSError as error:
        report.record(source, f"vote {vote.vote_id}", f"unreadable image: {error}")
        return None


def push_votes(parquet: str | Path, repo_id: str, private: bool = False, token: str | None = None) -> str:
    """Upload an exported votes parquet to the dataset repo ``repo_id`` as its train split; returns the repo's URL.

    Raises :class:`diffalign.trainers.hub.HubError` (offline, no network, no access) with what to do.
    """
    from diffalign.trainers.hub import push_file

    return push_file(parquet, repo_id, VOTES_IN_REPO, repo_type="dataset", private=private, token=token,
                     commit_message=f"diffalign export-votes: {Path(parquet).name}")
