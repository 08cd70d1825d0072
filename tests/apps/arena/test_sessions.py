"""Server-issued sessions (signed cookies), sliding-window rate limits and the automated-session rules, without a server."""

from __future__ import annotations

import pytest

from diffalign.apps.arena.sessions import SessionSigner, SlidingWindow, load_key
from diffalign.apps.arena.store import StoredVote
from diffalign.apps.arena.suspicion import SuspicionRules, flag_sessions


def test_only_cookies_this_server_signed_name_a_session(tmp_path):
    key = load_key(tmp_path / "votes.sqlite.session-key")
    assert load_key(tmp_path / "votes.sqlite.session-key") == key and len(key) == 32
    assert (tmp_path / "votes.sqlite.session-key").stat().st_mode & 0o777 == 0o600
    signer = SessionSigner(key)
    session, cookie = signer.mint()
    assert signer.verify(cookie) == session and session != signer.mint()[0]
    sid, _, signature = cookie.partition(".")
    for forged in ("invented-1", f"invented.{signature}", f"{sid}x.{signature}", f"{sid}.{'A' * 43}", "", None,
                   cookie + "A"):
        assert signer.verify(forged) is None, forged
    assert SessionSigner(bytes(32)).verify(cookie) is None, "another server's key"


def test_sliding_window_allows_limit_events_per_window():
    now = [0.0]
    window = SlidingWindow(3, 60.0, clock=lambda: now[0])
    assert [window.allow("a") for _ in range(4)] == [True, True, True, False]
    assert window.allow("b"), "keys are counted apart"
    now[0] = 59.9
    assert not window.allow("a")
    now[0] = 60.0  # the first three fall out of the window
    assert window.allow("a")
    assert all(SlidingWindow(0, 60.0).allow("a") for _ in range(100)), "limit 0: no limit"


def _votes(session: str, choices: list[str], looks: list[float]) -> list[StoredVote]:
    return [StoredVote(k, session, f"p{k}", choice, 100.0 * k + look, "a cat", "m1", "m2", "", "", "i", "j", 100.0 * k)
            for k, (choice, look) in enumerate(zip(choices, looks, strict=True))]


def test_suspicion_rules_by_hand():
    """10 votes each. person: 4 left, 4 right, 2 tie, looks 2..6.5 s -> not flagged.
    lefty: 9 of 10 left = 0.9 >= 0.9 -> one side. fast: looks sorted 0.2 0.2 0.3 0.3 0.4 | 0.4 0.6 0.6 5 5, median 0.4 s < 1 s -> too fast.
    metronome: every look 2.0 s -> std/mean 0 < 0.05 -> machine timing. short: 3 votes, all left, < min_votes."""
    varied = [2.0 + 0.5 * k for k in range(10)]
    votes = (_votes("person", ["left", "right"] * 4 + ["tie"] * 2, varied)
             + _votes("lefty", ["left"] * 9 + ["right"], varied)
             + _votes("fast", ["left", "right", "tie", "both_bad", "tie"] * 2, [0.2, 0.4, 0.6, 5.0, 0.3] * 2)
             + _votes("metronome", ["left", "right", "tie", "both_bad", "tie"] * 2, [2.0] * 10)
             + _votes("short", ["left"] * 3, [0.1] * 3))
    assert flag_sessions(votes) == {
        "lefty": ["one side: left"],
        "fast": ["too fast: median 0.40 s to look"],
        "metronome": ["machine timing"],
    }
    assert flag_sessions(votes, SuspicionRules(min_votes=3))["short"][0] == "one side: left"
    with pytest.raises(ValueError, match="one_side_share"):
        SuspicionRules(one_side_share=0.5)
