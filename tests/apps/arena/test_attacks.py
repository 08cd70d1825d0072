"""The attacks filed against the arena (issue 13, item 5), run against a live `diffalign arena`, and failing:
invented sessions, URLs that unblind, open uploads, the shared temp folder, floods, a rigged campaign."""

from __future__ import annotations

import io
import sqlite3
import tempfile
import uuid
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from diffalign.apps.arena.cli import build_arena
from diffalign.apps.arena.client import ArenaClient
from diffalign.apps.arena.sessions import COOKIE_NAME
from diffalign.apps.arena.store import VoteStore
from diffalign.apps.cli import main


def _run(http: httpx.Client, url: str, endpoint: str, data: list, session_hash: str, **kwargs) -> list:
    response = http.post(f"{url}/gradio_api/run/{endpoint}", json={"data": data, "session_hash": session_hash},
                         **kwargs)
    assert response.status_code == 200, response.text[:200]
    return response.json()["data"]


def test_invented_sessions_get_no_votes_counted(toy_arena_sources, start_arena, tmp_path):
    database = tmp_path / "votes.sqlite"
    url, _ = start_arena(toy_arena_sources.values(), database, "--address-sessions-per-hour", "0")
    with httpx.Client(trust_env=False) as http:
        # As filed: 40 invented sessions, each request naming its session (hash and a made-up cookie).
        for i in range(40):
            invented = {"cookie": f"{COOKIE_NAME}=invented{i}.{'A' * 43}"}
            http.cookies.clear()
            token = _run(http, url, "next_pair", [], f"invented-{i}", headers=invented)[3]
            http.cookies.clear()
            result = _run(http, url, "vote", ["left", token], f"invented-{i}", headers=invented)[0]
            assert not result["accepted"] and result["reason"] == "token was issued to another session"
        # One client keeping the server's cookie but sending a new session_hash every call is still one session.
        http.cookies.clear()
        for k in range(10):
            token = _run(http, url, "next_pair", [], f"hash-{k}")[3]
            assert _run(http, url, "vote", ["right", token], f"other-hash-{k}")[0]["accepted"]
    store = VoteStore(database)
    votes = store.votes()
    assert len(votes) == 10 and len({v.session_id for v in votes}) == 1
    assert store.rejection_counts() == {"token was issued to another session": 40}
    store.close()


def _served(http: httpx.Client, image: dict, sizes: set[int]) -> tuple[str, np.ndarray]:
    response = http.get(image["url"])
    assert response.status_code == 200
    sizes.add(len(response.content))
    return image["url"], np.asarray(Image.open(io.BytesIO(response.content)).convert("RGB"))


def test_image_urls_reveal_nothing_across_sessions_or_showings(toy_arena_sources, start_arena, tmp_path):
    """And (on the same server) uploads are refused, and a file another app left in /tmp/gradio is not served."""
    url, _ = start_arena(toy_arena_sources.values(), tmp_path / "votes.sqlite", "--seed", "0")
    learned: dict[str, str] = {}  # URL -> the model a vote revealed for it (what the filed attack collected)
    pixels_a = []
    sizes: set[int] = set()
    a, b = ArenaClient(url), ArenaClient(url)
    with httpx.Client(trust_env=False) as http:
        for _ in range(15):
            pair = a.next_pair()
            again = a.next_pair()  # the same pending pair, shown again: new names for the same images
            assert {pair["left"]["url"], pair["right"]["url"]}.isdisjoint({again["left"]["url"], again["right"]["url"]})
            result = a.vote("left", again["token"])
            for side, model in (("left", result["left_model"]), ("right", result["right_model"])):
                served_url, pixels = _served(http, again[side], sizes)
                learned[served_url] = model
                pixels_a.append(pixels)
        shared_images = 0
        for _ in range(15):
            pair = b.next_pair()
            pair_sizes: set[int] = set()
            for side in ("left", "right"):
                served_url, pixels = _served(http, pair[side], pair_sizes)
                assert served_url not in learned, "a URL seen in another session names its model"
                assert Path(served_url.rsplit("=", 1)[-1]).parent.name not in {
                    Path(u.rsplit("=", 1)[-1]).parent.name for u in learned}
                shared_images += any(np.array_equal(pixels, seen) for seen in pixels_a)
            assert len(pair_sizes) == 1, "both images of a showing are padded to one size: the size names no side"
            sizes |= pair_sizes
            b.vote("tie", pair["token"])
    assert shared_images > 0, "the sessions should have been shown some of the same images"
    assert all(size % 4096 == 0 for size in sizes), f"every file is padded to a size class, got {sizes}"
    assert Path(a.next_pair()["left"]["path"]).resolve().parts[-3].startswith("diffalign-arena-"), "a private folder"
    a.close()
    b.close()

    planted = Path(tempfile.gettempdir()) / "gradio" / uuid.uuid4().hex / "planted.txt"
    planted.parent.mkdir(parents=True)
    planted.write_text("left here by another app")
    try:
        with httpx.Client(trust_env=False) as http:
            upload = http.post(f"{url}/gradio_api/upload", files={"files": ("x.png", b"\x89PNG", "image/png")})
            assert upload.status_code == 403
            assert http.get(f"{url}/gradio_api/file={planted}").status_code == 403
    finally:
        planted.unlink()
        planted.parent.rmdir()


def test_rate_limits_per_session_and_per_address(toy_arena_sources, start_arena, tmp_path):
    database = tmp_path / "votes.sqlite"
    url, _ = start_arena(toy_arena_sources.values(), database, "--session-votes-per-minute", "5",
                         "--address-sessions-per-hour", "2", "--address-votes-per-minute", "7",
                         "--session-pairs-per-minute", "8")
    first, second, third = ArenaClient(url), ArenaClient(url), ArenaClient(url)
    results = [first.vote("left", first.next_pair()["token"])["reason"] for _ in range(6)]
    assert results == ["stored"] * 5 + ["rate limited: over 5 votes a minute in this session"]
    results = [second.vote("left", second.next_pair()["token"])["reason"] for _ in range(3)]
    # The address's 6th and 7th counted votes are stored; its 8th is refused.
    assert results == ["stored", "stored", "rate limited: over 7 votes a minute from this address"]
    pair = third.next_pair()  # a third new session from the same address within the hour
    assert pair["token"] == "" and "too many new sessions" in pair["prompt"]
    # Reloading to mint tokens: the second session has had 3 pairs; 5 more are allowed, then refused.
    reloads = [second.next_pair() for _ in range(6)]
    assert all(p["token"] for p in reloads[:5]) and reloads[5]["token"] == "" and "too many pairs" in reloads[5]["prompt"]
    for client in (first, second, third):
        client.close()
    store = VoteStore(database)
    assert store.vote_count() == 7
    store.close()


def test_rigged_campaign_is_flagged_left_off_the_leaderboard_and_out_of_the_export(toy_arena_sources, tmp_path,
                                                                                      capsys):
    """Bots that always click one side as fast as the server answers, next to one person; the person alone counts."""
    database = tmp_path / "votes.sqlite"
    arena = build_arena([str(p) for p in toy_arena_sources.values()], database, seed=0, bootstrap_rounds=20)
    for bot in range(4):
        for _ in range(12):
            arena.vote(f"bot{bot}", arena.issue(f"bot{bot}").token, "right")
    choices = ("left", "right", "tie", "left", "right", "both_bad")
    for k in range(12):
        assert arena.vote("person", arena.issue("person").token, choices[k % 6]).accepted
    with sqlite3.connect(database) as db:  # the person looked 2-6 s at each pair
        db.execute("UPDATE tokens SET issued_at = issued_at - 2 - rowid % 5 WHERE session_id = 'person'")
    table, _, summary = arena.leaderboard()
    assert summary.startswith("**12 votes**") and "left out: 4 suspicious sessions (48 votes" in summary
    assert sum(row[5] for row in table) == 24  # each of the 12 votes counts for two models
    arena.store.close()

    assert main(["export-votes", str(database), str(tmp_path / "v.parquet")]) == 0
    out = capsys.readouterr().out
    assert "wrote 12 of 60 votes" in out and "dropped suspicious session: 48" in out and "suspicious sessions: 4" in out
    assert main(["export-votes", str(database), str(tmp_path / "all.parquet"), "--keep-suspicious"]) == 0
    assert "wrote 60 of 60 votes" in capsys.readouterr().out


def test_export_of_zero_rows_warns_and_fails(toy_arena_sources, tmp_path, capsys):
    database = tmp_path / "votes.sqlite"
    arena = build_arena([str(p) for p in toy_arena_sources.values()], database, seed=0)
    for _ in range(10):
        arena.vote("bot", arena.issue("bot").token, "left")
    arena.store.close()
    out = tmp_path / "v.parquet"
    assert main(["export-votes", str(database), str(out)]) == 1
    err = capsys.readouterr().err
    assert "warning: 0 of 10 votes exported" in err and "dropped suspicious session: 10" in err
    assert not out.exists()
