"""The arena served for real (a `diffalign arena` process on loopback), driven through gradio_client and HTTP:
votes stored, forged / replayed / foreign / double votes rejected, blind faithful images, what is never served."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from diffalign.apps.arena.client import ArenaCallError, ArenaClient
from diffalign.apps.arena.display import display_image
from diffalign.apps.arena.store import VoteStore


def _source_pixels(sources: dict[str, Path], prompt: str) -> list[np.ndarray]:
    """Every source image of ``prompt`` (any model, any seed), as displayed: 32 px scaled to 512 px by nearest."""
    found = []
    for manifest in sources.values():
        for line in manifest.read_text().splitlines():
            row = json.loads(line)
            if row["prompt"] == prompt:
                source = Image.open(manifest.parent / row["image"]).convert("RGB")
                found.append(np.asarray(display_image(source, 512, "nearest")))
    return found


def test_gradio_client_votes_and_every_bad_vote_is_rejected(toy_arena_sources, start_arena, tmp_path):
    from gradio_client import Client

    database = tmp_path / "votes.sqlite"
    url, _ = start_arena(toy_arena_sources.values(), database, "--seed", "0")
    client = Client(url, verbose=False)
    prompt_md, left, right, token, progress = client.predict(api_name="/next_pair")
    prompt = prompt_md.removeprefix("### ")
    assert prompt.startswith("a ") and "pairs left for you: 107" in progress and len(token) >= 32
    # Blind but faithful: the served files carry no model name, and their pixels are a source image of the prompt.
    for served in (left, right):
        assert Path(served).name == "image.png" and not any(m in served for m in toy_arena_sources)
        pixels = np.asarray(Image.open(served).convert("RGB"))
        assert pixels.shape == (512, 512, 3), "toy images (32 px) are scaled up to the display size"
        assert any(np.array_equal(pixels, source) for source in _source_pixels(toy_arena_sources, prompt))

    accepted = client.predict("left", token, api_name="/vote")
    assert accepted["accepted"] and accepted["vote_id"] == 1
    assert {accepted["left_model"], accepted["right_model"]} <= set(toy_arena_sources)
    assert accepted["left_model"] != accepted["right_model"]

    replayed = client.predict("right", token, api_name="/vote")
    assert not replayed["accepted"] and "already used" in replayed["reason"]
    forged = client.predict("left", "F" * 32, api_name="/vote")
    assert not forged["accepted"] and "forged" in forged["reason"]

    # Asking again before voting shows the same pending pair with a fresh token; only one of the two votes counts.
    first = client.predict(api_name="/next_pair")
    again = client.predict(api_name="/next_pair")
    assert first[0] == again[0] and first[3] != again[3]
    assert client.predict("tie", first[3], api_name="/vote")["accepted"]
    double = client.predict("left", again[3], api_name="/vote")
    assert not double["accepted"] and double["reason"].startswith("double vote")

    # Another session cannot spend this session's token.
    other = Client(url, verbose=False)
    foreign_token = other.predict(api_name="/next_pair")[3]
    foreign = client.predict("left", foreign_token, api_name="/vote")
    assert not foreign["accepted"] and "another session" in foreign["reason"]
    assert other.predict("right", foreign_token, api_name="/vote")["accepted"]

    bad_choice = client.predict("much better", client.predict(api_name="/next_pair")[3], api_name="/vote")
    assert not bad_choice["accepted"] and "unknown choice" in bad_choice["reason"]

    store = VoteStore(database)
    votes = store.votes()
    assert [v.choice for v in votes] == ["left", "tie", "right"]
    assert len({v.session_id for v in votes}) == 2
    assert store.rejection_counts() == {
        "token already used (replayed vote)": 1,
        "unknown or forged token": 1,
        "double vote: this session already voted on this pair": 1,
        "token was issued to another session": 1,
        "unknown choice 'much better' (expected one of left, right, tie, both_bad)": 1,
    }
    store.close()

    table, _, summary = client.predict(api_name="/leaderboard")
    assert "3 votes" in summary and {row[1] for row in table["data"]} <= set(toy_arena_sources)
    assert (database.with_name("votes.heatmap.png")).is_file()


def _listening_addresses(port: int) -> set[str]:
    """Local addresses of LISTEN sockets on ``port``, read from /proc (no traffic sent anywhere)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, port_hex = local.rsplit(":", 1)
            if state == "0A" and int(port_hex, 16) == port:
                found.add(address)
    return found


def test_binds_loopback_serves_no_source_file_and_bounds_requests(toy_arena_sources, start_arena, tmp_path):
    url, _ = start_arena(toy_arena_sources.values(), tmp_path / "votes.sqlite")
    port = int(url.rsplit(":", 1)[1])
    assert _listening_addresses(port) == {"0100007F"}, "only 127.0.0.1 listens by default"

    source_image = next(Path(toy_arena_sources["truth"]).parent.glob("images/*.png")).resolve()
    with httpx.Client(trust_env=False) as http:
        for path in (str(source_image), "/etc/passwd", str(Path(toy_arena_sources["truth"]).resolve())):
            response = http.get(f"{url}/gradio_api/file={path}")
            assert response.status_code in (403, 404), (path, response.status_code)
        huge = http.post(f"{url}/gradio_api/run/vote", json={"data": ["left", "x" * 100_000], "session_hash": "s"})
        assert huge.status_code == 413
    # A long token within the body limit is rejected by the store's bounds, not looked up.
    voter = ArenaClient(url)
    assert voter.vote("left", "x" * 5000)["reason"] == "unknown or forged token"
    voter.close()


def test_auth_file_requires_login(toy_arena_sources, start_arena, tmp_path):
    credentials = tmp_path / "auth.txt"
    credentials.write_text("# arena users\nalice:s3cret\n")
    database = tmp_path / "votes.sqlite"
    url, _ = start_arena(toy_arena_sources.values(), database, "--auth-file", str(credentials))
    with pytest.raises(ArenaCallError, match="HTTP 40[13]"):
        ArenaClient(url).next_pair()
    with pytest.raises(ArenaCallError, match="login as 'alice' refused"):
        ArenaClient(url, auth=("alice", "wrong"))
    voter = ArenaClient(url, auth=("alice", "s3cret"))
    pair = voter.next_pair()
    # Alice in a second browser (another cookie) is still Alice: same pending pair, and one vote on it.
    second_browser = ArenaClient(url, auth=("alice", "s3cret"))
    again = second_browser.next_pair()
    assert again["prompt"] == pair["prompt"] and second_browser.session_id != voter.session_id
    assert voter.vote("right", pair["token"])["accepted"]
    double = second_browser.vote("left", again["token"])
    assert not double["accepted"] and double["reason"].startswith("double vote")
    voter.close()
    second_browser.close()
    store = VoteStore(database)
    assert [(v.session_id, v.choice) for v in store.votes()] == [("user:alice", "right")]
    store.close()


def test_bad_manifest_refuses_to_start_naming_the_row(toy_arena_sources, tmp_path):
    import subprocess
    import sys

    bad = tmp_path / "bad"
    (bad / "images").mkdir(parents=True)
    (bad / "manifest.jsonl").write_text('{"image": "../../etc/hostname", "prompt": "a red circle"}\n')
    result = subprocess.run(
        [sys.executable, "-m", "diffalign.apps.cli", "arena", "--source", str(toy_arena_sources["truth"]),
         "--source", str(bad), "--db", str(tmp_path / "v.sqlite")],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    assert "manifest.jsonl:1" in result.stderr and "outside the manifest's folder" in result.stderr
