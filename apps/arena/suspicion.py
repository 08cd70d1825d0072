"""Sessions whose votes look automated: one side always, faster than a person can look, metronome timing.

Why these three: a rigging script that cannot see the models (pairs are blind) either clicks one
button -- always left, always right -- or votes as fast as the server answers; a person needs
time to look at two images and varies in how long. Each rule needs ``min_votes`` votes in the
session before it judges, so a person who casts three quick votes is never flagged.

- ``one side``: left (or right) is at least ``one_side_share`` of the session's votes.
- ``too fast``: the median time from a pair being shown to its vote is under ``min_look_s``.
- ``machine timing``: the look times' coefficient of variation (std / mean) is under
  ``min_timing_variation`` (people are irregular; a ``sleep(2)`` loop is not).

The leaderboard leaves flagged sessions out and says how many; ``export-votes`` drops them by
default (``--keep-suspicious`` keeps them) and counts them.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass

from diffalign.apps.arena.store import StoredVote

__all__ = ["SuspicionRules", "flag_sessions"]


@dataclass(frozen=True)
class SuspicionRules:
    """Thresholds of :func:`flag_sessions` (the documented defaults)."""

    min_votes: int = 10  # judge a session only once it has this many votes
    one_side_share: float = 0.9  # share of votes on one side (left or right) that flags it
    min_look_s: float = 1.0  # median seconds from showing to voting below which a person cannot have looked
    min_timing_variation: float = 0.05  # std/mean of look times below which the timing is a machine's

    def __post_init__(self) -> None:
        if self.min_votes < 2:
            raise ValueError(f"min_votes must be >= 2, got {self.min_votes}")
        if not 0.5 < self.one_side_share <= 1.0:
            raise ValueError(f"one_side_share must be in (0.5, 1], got {self.one_side_share}")
        if self.min_look_s < 0 or self.min_timing_variation < 0:
            raise ValueError("min_look_s and min_timing_variation must be >= 0")


def flag_sessions(votes: Iterable[StoredVote], rules: SuspicionRules = SuspicionRules()) -> dict[str, list[str]]:
    """``{session_id: [reasons]}`` for every session a rule flags (sessions not flagged are absent)."""
    by_session: dict[str, list[StoredVote]] = defaultdict(list)
    for vote in votes:
        by_session[vote.session_id].append(vote)
    flagged = {}
    for session_id, mine in by_session.items():
        if len(mine) < rules.min_votes:
            continue
        reasons = []
        for side in ("left", "right"):
            if sum(v.choice == side for v in mine) >= rules.one_side_share * len(mine):
                reasons.append(f"one side: {side}")
        looks = [max(0.0, v.created_at - v.issued_at) for v in mine]
        median = statistics.median(looks)
        if median < rules.min_look_s:
            reasons.append(f"too fast: median {median:.2f} s to look")
        mean = statistics.fmean(looks)
        if mean > 0 and statistics.pstdev(looks) / mean < rules.min_timing_variation:
            reasons.append("machine timing")
        if reasons:
            flagged[session_id] = reasons
    return flagged
