"""``diffalign arena``: a Gradio app for blind side-by-side comparison of models' images.

Each pair is shown blind (no model names, images re-encoded without metadata) with a random side;
a vote reveals the names and loads the next pair. The server issues every pair with a one-time
token (:mod:`diffalign.apps.arena.store`).

Who votes: a session is minted by the server and kept in a signed HttpOnly cookie
(:mod:`.sessions`); the client's Gradio ``session_hash`` decides nothing. With a login
(``--auth-file``) the session is the user, so one person is one voter however many browsers or
cookies they use. Rate limits (:class:`.sessions.RateLimits`) cap votes per session and per
address, and new sessions per address.

Blinding: every time a pair is issued its images are written with a fresh random PNG text chunk,
so Gradio's content-hash file names differ per session and per issue: a URL seen once (and the
models a vote revealed for it) says nothing about any other showing. The chunk also pads the file
to a size class, so the byte size does not name the image either.

API (what the page itself calls; ``gradio_client`` can call it too, keeping the cookie):

- ``/next_pair`` → ``(prompt, left image, right image, token, progress)``: the session's pending
  pair if it has one (with a fresh token), else the next balanced pair.
- ``/vote`` ``(choice, token)`` → ``{"accepted", "reason", "left_model", "right_model", "vote_id"}``;
  choice is one of ``left``, ``right``, ``tie``, ``both_bad``.
- ``/leaderboard`` → ``(table, heatmap, summary)``; sessions that look automated
  (:mod:`.suspicion`) are left out and counted.

Safety: binds 127.0.0.1 unless told otherwise; optional username/password; every request
body is capped (:data:`MAX_BODY_BYTES`); uploads are refused (403); Gradio's files live in a
private temporary folder made for this process (not the shared ``/tmp/gradio`` any app can
fill); only images listed by the sources are ever read, and they reach the browser as
re-encoded copies, so no source path is served directly.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr
import PIL.Image
from gradio.processing_utils import encode_pil_to_bytes

from diffalign.apps.arena.rank import leaderboard, outcomes, write_heatmap
from diffalign.apps.arena.schedule import PairScheduler, Showing
from diffalign.apps.arena.sources import ArenaItem
from diffalign.apps.arena.sessions import COOKIE_NAME, RateLimits, SessionCookieMiddleware, SessionSigner, SlidingWindow, load_key
from diffalign.apps.arena.store import MAX_SESSION_CHARS, MAX_TOKEN_CHARS, VoteResult, VoteStore
from diffalign.apps.arena.suspicion import SuspicionRules, flag_sessions

__all__ = ["Arena", "RateLimited", "build_blocks", "serve", "MAX_BODY_BYTES"]

IMAGE_HEIGHT = 384  # display size; small images are scaled up so that people can judge them
MAX_BODY_BYTES = 64 * 1024  # the largest request the app accepts: votes and page loads are tiny
_CHOICE_LABELS = {"left": "Left is better", "right": "Right is better", "tie": "Tie", "both_bad": "Both bad"}
_SHORTCUTS = """
<script>
// Keyboard voting: 1 / ArrowLeft, 2 / ArrowRight, 3 / t (tie), 4 / b (both bad).
document.addEventListener("keydown", (event) => {
  const t = event.target;
  if (t && (t.tagName === "INPUT" || t.tagName === "TEXTAREA" || t.isContentEditable)) return;
  if (event.ctrlKey || event.metaKey || event.altKey) return;
  const ids = {"1": "vote-left", "ArrowLeft": "vote-left", "2": "vote-right", "ArrowRight": "vote-right",
               "3": "vote-tie", "t": "vote-tie", "4": "vote-both-bad", "b": "vote-both-bad"};
  const id = ids[event.key];
  const button = id && document.getElementById(id);
  if (button && !button.disabled) { event.preventDefault(); button.click(); }
});
</script>
"""


@dataclass(frozen=True)
class Issued:
    """A pair issued to a session: what the page shows, and the token its vote must carry."""

    showing: Showing
    token: str
    votes_so_far: int
    pairs_left: int


class RateLimited(RuntimeError):
    """A request over one of the :class:`RateLimits` (the message says which)."""


class Arena:
    """The arena's logic without Gradio: issue pairs, take votes, rank (the Gradio handlers call this)."""

    def __init__(self, store: VoteStore, scheduler: PairScheduler, items: dict[str, ArenaItem], heatmap_path: Path,
                 bootstrap_rounds: int = 200, limits: RateLimits = RateLimits(),
                 suspicion: SuspicionRules = SuspicionRules()) -> None:
        self.store = store
        self.scheduler = scheduler
        self.items = items
        self.heatmap_path = heatmap_path
        self.bootstrap_rounds = bootstrap_rounds
        self.limits = limits
        self.suspicion = suspicion
        self._session_votes = SlidingWindow(limits.session_votes_per_minute, 60.0)
        self._address_votes = SlidingWindow(limits.address_votes_per_minute, 60.0)
        self._address_sessions = SlidingWindow(limits.address_sessions_per_hour, 3600.0)
        self._session_pairs = SlidingWindow(limits.session_pairs_per_minute, 60.0)
        self._issue_lock = threading.Lock()
        scheduler.restore(store.issued_pairs())

    def issue(self, session_id: str, address: str | None = None) -> Issued | None:
        """The session's pending pair again (fresh token), else a new one; ``None`` when it has seen every pair.

        A session's first pair counts as a new session of ``address``; over that limit, or over the session's
        pairs a minute, raises :class:`RateLimited`.
        """
        if not self._session_pairs.allow(session_id):
            raise RateLimited(f"too many pairs asked for (limit {self.limits.session_pairs_per_minute} a minute "
                              "in one session); wait a minute")
        with self._issue_lock:  # one session's reload and vote must not both draw a new pair
            if (address is not None and self.scheduler.seen_count(session_id) == 0
                    and not self._address_sessions.allow(address)):
                raise RateLimited(f"too many new sessions from this address (limit "
                                  f"{self.limits.address_sessions_per_hour} an hour); log in or try later")
            showing = self._pending(session_id) or self.scheduler.next(session_id)
            if showing is None:
                return None
            token = self.store.issue(session_id, showing.pair.pair_id, showing.left.item_id, showing.right.item_id)
        votes = self.store.vote_count(session_id)
        return Issued(showing, token, votes, self.scheduler.pair_count - self.scheduler.seen_count(session_id))

    def _pending(self, session_id: str) -> Showing | None:
        pending = self.store.pending(session_id)
        if pending is None:
            return None
        pair = self.scheduler.pair(pending[0])
        left, right = self.items.get(pending[1]), self.items.get(pending[2])
        if pair is None or left is None or right is None:
            return None  # shown under other sources; no longer servable
        return Showing(pair, left, right)

    def vote(self, session_id: str, token: str, choice: str, address: str | None = None) -> VoteResult:
        """Store the vote unless the session or its address is over its rate limit (then counted as rejected)."""
        if not self._session_votes.allow(session_id):
            return self.store.reject(session_id, f"rate limited: over {self.limits.session_votes_per_minute} "
                                                 "votes a minute in this session")
        if address is not None and not self._address_votes.allow(address):
            return self.store.reject(session_id, f"rate limited: over {self.limits.address_votes_per_minute} "
                                                 "votes a minute from this address")
        return self.store.vote(session_id, token, choice)

    def leaderboard(self) -> tuple[list[list[Any]], PIL.Image.Image | None, str]:
        """``(rows, heatmap, summary)``: the table of models, the win-rate heatmap (also written to disk).

        Votes of sessions :func:`.suspicion.flag_sessions` flags are left out; the summary counts them.
        """
        every_vote = self.store.votes()
        flagged = flag_sessions(every_vote, self.suspicion)
        votes = [v for v in every_vote if v.session_id not in flagged]
        data = outcomes([(v.left_model, v.right_model, v.choice) for v in votes])
        rejections = self.store.rejection_counts()
        summary = f"**{len(votes)} votes** · {len(data.models)} models"
        if flagged:
            summary += (f" · left out: {len(flagged)} suspicious sessions ({len(every_vote) - len(votes)} votes; "
                        "one side always, too fast, or machine timing)")
        if rejections:
            summary += " · rejected: " + ", ".join(f"{reason} ×{n}" for reason, n in sorted(rejections.items()))
        if not votes:
            return [], None, summary
        rows = leaderboard(data, rounds=self.bootstrap_rounds)
        table = [
            [rank, r.model, round(r.score, 1), f"{r.low:.0f} – {r.high:.0f}", round(r.win_rate, 3), r.votes,
             r.wins, r.ties, r.losses]
            for rank, r in enumerate(rows, start=1)
        ]
        write_heatmap(data, self.heatmap_path)
        with PIL.Image.open(self.heatmap_path) as image:
            heatmap = image.copy()
        return table, heatmap, summary + f" · heatmap: `{self.heatmap_path}`"


LEADERBOARD_HEADERS = ["rank", "model", "Bradley-Terry (Elo scale)", "95% CI", "win rate", "votes", "wins", "ties", "losses"]


def _blind_image(item: ArenaItem) -> PIL.Image.Image:
    """The item's pixels only, plus a random nonce that also pads the PNG to a size class.

    Metadata (which may name the model) does not travel. The nonce becomes a PNG text chunk when
    Gradio encodes the image, so its content-hash file name is new at every showing: without it
    the same image had the same URL in every session, and one revealing vote named its model for
    all. Its length pads the file to :func:`_padded_size`, so the byte size names no image either.
    """
    with PIL.Image.open(item.path) as image:
        image.load()
        clean = image.convert("RGBA" if image.mode in ("RGBA", "LA", "PA") else "RGB")
    clean.info = {}
    bare = len(encode_pil_to_bytes(clean, "png"))  # what Gradio's encoder writes, less the chunk below
    overhead = 12 + len(_NONCE_KEY) + 1  # a tEXt chunk: length, type, CRC, keyword, NUL separator
    text = _padded_size(bare + overhead + 32) - bare - overhead
    clean.info = {_NONCE_KEY: secrets.token_hex((text + 1) // 2)[:text]}
    return clean


_NONCE_KEY = "nonce"


def _padded_size(size: int) -> int:
    """``size`` rounded up to a size class: a multiple of 4 KiB, or of 1/16 of the power of two above it."""
    quantum = max(4096, (1 << (size - 1).bit_length()) // 16)
    return -(-size // quantum) * quantum


def _user_session(username: str) -> str:
    """A logged-in user's session id: the user, so their votes de-duplicate across browsers and cookies."""
    session = f"user:{username}"
    if len(session) <= MAX_SESSION_CHARS:
        return session
    return "user:" + hashlib.sha256(username.encode()).hexdigest()[:48]  # still unique, within the store's bound


def build_blocks(arena: Arena, signer: SessionSigner):
    """The Gradio Blocks app: a Vote tab and a Leaderboard tab; sessions come from ``signer``'s cookies."""

    def session_of(request: gr.Request | None) -> str:
        username = getattr(request, "username", None) if request is not None else None
        if username:
            return _user_session(str(username))
        cookies = (getattr(request, "cookies", None) or {}) if request is not None else {}
        session = signer.verify(cookies.get(COOKIE_NAME))
        if session is None:  # SessionCookieMiddleware gives every request one; this is another way in
            raise gr.Error("no server session: the arena's session cookie is missing or not signed by this server")
        return session

    def address_of(request: gr.Request | None) -> str | None:
        client = getattr(request, "client", None) if request is not None else None
        return getattr(client, "host", None)

    def next_pair(request: gr.Request):
        try:
            issued = arena.issue(session_of(request), address_of(request))
        except RateLimited as error:
            return f"### {error}", None, None, "", ""
        if issued is None:
            return "### You have compared every pair. Thank you!", None, None, "", "All pairs done."
        showing = issued.showing
        progress = f"Votes this session: **{issued.votes_so_far}** · pairs left for you: {issued.pairs_left}"
        return (f"### {showing.pair.prompt}", _blind_image(showing.left), _blind_image(showing.right),
                issued.token, progress)

    def vote(choice: str, token: str, request: gr.Request) -> dict:
        """Vote on the pair a token was issued for: choice is left, right, tie or both_bad."""
        result = arena.vote(session_of(request), token, choice, address_of(request))
        return {"accepted": result.accepted, "reason": result.reason, "vote_id": result.vote_id,
                "left_model": result.left_model, "right_model": result.right_model}

    def reveal(result: dict, choice: str) -> str:
        if not result["accepted"]:
            return f"**Vote not counted:** {result['reason']}"
        return (f"Previous pair: you chose **{_CHOICE_LABELS[choice]}**. Left was **{result['left_model']}**, "
                f"right was **{result['right_model']}**.")

    with gr.Blocks(title="diffalign arena") as demo:
        gr.Markdown("# diffalign arena\nWhich image fits the prompt better? Models are hidden until you vote. "
                    "Keys: **1** / ← left, **2** / → right, **3** / t tie, **4** / b both bad.")
        with gr.Tab("Vote"):
            prompt = gr.Markdown(elem_id="arena-prompt")
            with gr.Row():
                left = gr.Image(label="Left", type="pil", format="png", interactive=False, height=IMAGE_HEIGHT,
                                buttons=["fullscreen"], elem_id="arena-left")
                right = gr.Image(label="Right", type="pil", format="png", interactive=False, height=IMAGE_HEIGHT,
                                 buttons=["fullscreen"], elem_id="arena-right")
            with gr.Row():
                buttons = {
                    "left": gr.Button("⬅ Left is better [1]", elem_id="vote-left", variant="primary"),
                    "tie": gr.Button("Tie [3]", elem_id="vote-tie"),
                    "both_bad": gr.Button("Both bad [4]", elem_id="vote-both-bad"),
                    "right": gr.Button("Right is better [2] ➡", elem_id="vote-right", variant="primary"),
                }
            revealed = gr.Markdown(elem_id="arena-reveal")
            progress = gr.Markdown(elem_id="arena-progress")
            token = gr.Textbox(visible=False, max_length=MAX_TOKEN_CHARS, elem_id="arena-token")
        with gr.Tab("Leaderboard"):
            refresh = gr.Button("Refresh", elem_id="leaderboard-refresh")
            summary = gr.Markdown(elem_id="leaderboard-summary")
            table = gr.Dataframe(headers=LEADERBOARD_HEADERS, interactive=False, elem_id="leaderboard-table")
            heatmap = gr.Image(label="pairwise win rate", type="pil", format="png", interactive=False)

        shown = [prompt, left, right, token, progress]
        demo.load(next_pair, None, shown, api_name="next_pair", queue=False)
        def vote_from_page(choice: str):
            def handler(token_value: str, request: gr.Request) -> str:
                return reveal(vote(choice, token_value, request), choice)

            return handler

        for choice, button in buttons.items():
            button.click(vote_from_page(choice), [token], [revealed], api_visibility="private").then(
                next_pair, None, shown, api_visibility="private"
            )
        gr.api(vote, api_name="vote", queue=False)
        refresh.click(arena.leaderboard, None, [table, heatmap, summary], api_name="leaderboard")
    return demo


class _BodyLimit:
    """ASGI middleware: refuse any request whose body exceeds ``limit`` bytes (413), declared or streamed."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await _reject_too_large(send, self.limit)
            return
        received = 0

        async def limited_receive() -> dict:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise _TooLarge()
            return message

        try:
            await self.app(scope, limited_receive, send)
        except _TooLarge:
            await _reject_too_large(send, self.limit)


class _NoUploads:
    """ASGI middleware: refuse Gradio's upload routes (403); nothing in the arena takes a file from a client."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope.get("path", "").rstrip("/").rsplit("/", 1)[-1] in ("upload",
                                                                                                  "upload_progress"):
            body = json.dumps({"error": "uploads are disabled in the arena"}).encode()
            await send({"type": "http.response.start", "status": 403,
                        "headers": [(b"content-type", b"application/json"),
                                    (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})
            return
        await self.app(scope, receive, send)


class _TooLarge(Exception):
    pass


async def _reject_too_large(send: Any, limit: int) -> None:
    body = json.dumps({"error": f"request body larger than {limit} bytes"}).encode()
    await send({"type": "http.response.start", "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def serve(arena: Arena, host: str = "127.0.0.1", port: int = 7860, auth: list[tuple[str, str]] | None = None,
          concurrency: int = 16) -> None:
    """Run the app with uvicorn until interrupted (Ctrl-C); every acknowledged vote is already committed.

    Gradio's files go to a private temporary folder (mode 0700, removed on exit): Gradio serves any
    file in its temp folder, and the default one (``/tmp/gradio``) is shared by every Gradio app.
    The session key is kept beside the database (``<db>.session-key``), so sessions survive a restart.
    """
    import fastapi
    import uvicorn

    private = tempfile.mkdtemp(prefix="diffalign-arena-")
    os.environ["GRADIO_TEMP_DIR"] = private  # read when the Blocks and the app are built, below
    signer = SessionSigner(load_key(arena.store.path.with_name(arena.store.path.name + ".session-key")))
    try:
        demo = build_blocks(arena, signer)
        demo.queue(default_concurrency_limit=concurrency, max_size=1024)
        app = fastapi.FastAPI()
        app = gr.mount_gradio_app(app, demo, path="", server_name=host, server_port=port, auth=auth or None,
                                  head=_SHORTCUTS, show_error=True, max_file_size=MAX_BODY_BYTES, ssr_mode=False)
        app.add_middleware(SessionCookieMiddleware, signer=signer)
        app.add_middleware(_NoUploads)
        app.add_middleware(_BodyLimit, limit=MAX_BODY_BYTES)
        print(f"diffalign arena: http://{host}:{port}  ({arena.scheduler.pair_count} pairs, votes in "
              f"{arena.store.path})", flush=True)
        uvicorn.run(app, host=host, port=port, log_level="warning")
    finally:
        shutil.rmtree(private, ignore_errors=True)
