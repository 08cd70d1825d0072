"""Which pair a session sees next: balanced exposure across model pairs, never the same pair twice.

Why balanced: a Bradley-Terry fit is only as good as its thinnest comparison; sampling
pairs uniformly over *items* would show the model pairs with the most shared prompts most
often. So the scheduler first picks the model pair shown least so far (across all sessions,
ties broken at random), then that model pair's least-shown prompt pair the session has not
seen, then a random left/right side. A session that reloads its pending pair gets the same
pair back (with a fresh token), so skipping by reload cannot bias exposure.

Exposure counts are rebuilt from the vote store at start-up, so a restart does not reset them.
"""

from __future__ import annotations

import random
import threading
from collections import defaultdict
from dataclasses import dataclass

from diffalign.apps.arena.sources import ArenaItem, ArenaPair

__all__ = ["PairScheduler", "Showing"]


@dataclass(frozen=True)
class Showing:
    """A pair as shown to one session: which item is on which side."""

    pair: ArenaPair
    left: ArenaItem
    right: ArenaItem


class PairScheduler:
    """Thread-safe choice of the next pair per session; ``seed`` makes the sequence reproducible."""

    def __init__(self, pairs: list[ArenaPair], seed: int | None = None) -> None:
        if not pairs:
            raise ValueError("no pairs to show: the sources share no prompt (items are matched by prompt)")
        self._pairs = {pair.pair_id: pair for pair in pairs}
        self._by_models: dict[tuple[str, str], list[ArenaPair]] = defaultdict(list)
        for pair in pairs:
            self._by_models[pair.models].append(pair)
        self._model_exposure: dict[tuple[str, str], int] = {models: 0 for models in self._by_models}
        self._pair_exposure: dict[str, int] = defaultdict(int)
        self._seen: dict[str, set[str]] = defaultdict(set)
        self._rng = random.Random(seed)
        self._lock = threading.Lock()

    @property
    def pair_count(self) -> int:
        return len(self._pairs)

    def pair(self, pair_id: str) -> ArenaPair | None:
        return self._pairs.get(pair_id)

    def restore(self, issued: list[tuple[str, str]]) -> None:
        """Count ``(session_id, pair_id)`` already shown (from the store); unknown pairs are ignored."""
        with self._lock:
            for session_id, pair_id in issued:
                self._mark(session_id, pair_id)

    def _mark(self, session_id: str, pair_id: str) -> None:
        pair = self._pairs.get(pair_id)
        if pair is None or pair_id in self._seen[session_id]:
            return
        self._seen[session_id].add(pair_id)
        self._pair_exposure[pair_id] += 1
        self._model_exposure[pair.models] += 1

    def seen_count(self, session_id: str) -> int:
        return len(self._seen.get(session_id, ()))

    def next(self, session_id: str) -> Showing | None:
        """A new pair for ``session_id`` (marked as shown), or ``None`` when it has seen them all."""
        with self._lock:
            seen = self._seen[session_id]
            open_model_pairs = [m for m, pairs in self._by_models.items() if any(p.pair_id not in seen for p in pairs)]
            if not open_model_pairs:
                return None
            fewest = min(self._model_exposure[m] for m in open_model_pairs)
            models = self._rng.choice(sorted(m for m in open_model_pairs if self._model_exposure[m] == fewest))
            unseen = [p for p in self._by_models[models] if p.pair_id not in seen]
            least = min(self._pair_exposure[p.pair_id] for p in unseen)
            pair = self._rng.choice([p for p in unseen if self._pair_exposure[p.pair_id] == least])
            self._mark(session_id, pair.pair_id)
            flip = self._rng.random() < 0.5
            return Showing(pair, pair.b, pair.a) if flip else Showing(pair, pair.a, pair.b)

    def model_exposure(self) -> dict[tuple[str, str], int]:
        with self._lock:
            return dict(self._model_exposure)
