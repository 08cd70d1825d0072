"""``diffalign arena``: a Gradio app for blind side-by-side comparison of models' images.

Each pair is shown blind (no model names, images re-encoded without metadata) with a random side,
small images scaled up to the display size (:mod:`.display`); a vote reveals the names under the
images until the next pair is shown (:mod:`.page`: a Next button, or a pause). The server issues
every pair with a one-time token (:mod:`diffalign.apps.arena.store`).

Who votes: a session is minted by the server and kept in a signed HttpOnly cookie
(:mod:`.sessions`); the client's Gradio ``session_hash`` decides nothing. With a login
(``--auth-file``) the session is the user, so one person is one voter however many browsers or
cookies they use. Rate limits (:class:`.sessions.RateLimits`) cap votes per session and per
address, and new sessions per address.

Blinding: every time a pair is issued its images are written with a fresh random PNG text chunk
under a new random folder, so URLs differ per session and per issue: a URL seen once (and the
models a vote revealed for it) says nothing about any other showing. The chunk also pads both
files of the pair to one size class, so the byte size does not name the image or the side either.

API (what the page itself calls; ``gradio_client`` can call it too, keeping the cookie):

- ``/next_pair`` → ``(prompt, left image, right image, token, progress)``: the session's pending
  pair if it has one (with a fresh token), else the next balanced pair.
- ``/vote`` ``(choice, token)`` → ``{"accepted", "reason", "left_model", "right_model", "vote_id"}``;
  choice is one of ``left``, ``right``, ``tie``, ``both_bad``.
- ``/leaderboard`` → ``(table, heatmap, summary)``; sessions that look automated
  (:mod:`.suspicion`) are left out and counted. The page also offers the table as a CSV download.

Safety: binds 127.0.0.1 unless told otherwise; optional username/password; every request
body is capped (:data:`MAX_BODY_BYTES`); uploads are refused (403); Gradio's files live in a
private temporary folder made for this process (not the shared ``/tmp/gradio`` any app can
fill); only images listed by the sources are ever read, and they reach the browser as
re-encoded copies, so no source path is served directly.
"""

from __future__ import annotations

import hashlib
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

from diffalign.apps.arena.display import blind_pair_files, display_png
from diffalign.apps.arena.guards import BodyLimit, NoUploads
from diffalign.apps.arena.page import (SHORTCUTS, PageOptions, caption_classes, page_css, progress_line,
                                       reveal_captions, reveal_summary)
from diffalign.apps.arena.rank import leaderboard, outcomes, write_heatmap, write_leaderboard_csv
from diffalign.apps.arena.schedule import PairScheduler, Showing
from diffalign.apps.arena.sources import ArenaItem
from diffalign.apps.arena.sessions import COOKIE_NAME, RateLimits, SessionCookieMiddleware, SessionSigner, SlidingWindow, load_key
from diffalign.apps.arena.store import MAX_SESSION_CHARS, MAX_TOKEN_CHARS, VoteResult, VoteStore
from diffalign.apps.arena.suspicion import SuspicionRules, flag_sessions
from diffalign.atomic import staged_file

__all__ = ["Arena", "PageOptions", "RateLimited", "build_blocks", "serve", "MAX_BODY_BYTES"]

MAX_BODY_BYTES = 64 * 1024  # the largest request the app accepts: votes and page loads are tiny
IMAGE_FRAME_PX = 2  # Gradio's image box height includes its 1 px border: the image itself gets the display size


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
                 suspicion: SuspicionRules = SuspicionRules(), leaderboard_csv: Path | None = None) -> None:
        self.store = store
        self.scheduler = scheduler
        self.items = items
        self.heatmap_path = heatmap_path
        # Beside the heatmap: votes.heatmap.png -> votes.leaderboard.csv
        self.leaderboard_csv = leaderboard_csv or heatmap_path.with_name(
            heatmap_path.name.removesuffix(".png").removesuffix(".heatmap") + ".leaderboard.csv")
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

    def counts(self, session_id: str) -> tuple[int, int]:
        """``(votes stored, pairs not yet shown)`` of a session."""
        return self.store.vote_count(session_id), self.scheduler.pair_count - self.scheduler.seen_count(session_id)

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
        """``(rows, heatmap, summary)``: the table of models (also written as CSV), the win-rate heatmap.

        The heatmap (:attr:`heatmap_path`) and the CSV (:attr:`leaderboard_csv`) are written to disk, in rank order.

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
        write_heatmap(data, self.heatmap_path, order=[r.model for r in rows])
        write_leaderboard_csv(rows, self.leaderboard_csv)
        with PIL.Image.open(self.heatmap_path) as image:
            heatmap = image.copy()
        return table, heatmap, summary + f" · heatmap: `{self.heatmap_path}` · table: `{self.leaderboard_csv}`"


LEADERBOARD_HEADERS = ["rank", "model", "Bradley-Terry (Elo scale)", "95% CI", "win rate", "votes", "wins", "ties", "losses"]


def _user_session(username: str) -> str:
    """A logged-in user's session id: the user, so their votes de-duplicate across browsers and cookies."""
    session = f"user:{username}"
    if len(session) <= MAX_SESSION_CHARS:
        return session
    return "user:" + hashlib.sha256(username.encode()).hexdigest()[:48]  # still unique, within the store's bound


def build_blocks(arena: Arena, signer: SessionSigner, options: PageOptions = PageOptions(),
                 image_folder: str | Path | None = None):
    """The Gradio Blocks app: a Vote tab and a Leaderboard tab; sessions come from ``signer``'s cookies.

    ``image_folder``: where each showing's blind images are written (Gradio's private temp folder
    when served, so Gradio serves them without copying).
    """
    folder = Path(image_folder or os.environ.get("GRADIO_TEMP_DIR") or tempfile.mkdtemp(prefix="diffalign-arena-"))

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

    def shown_png(item: ArenaItem) -> bytes:
        return display_png(item.path, options.display_size, options.upscale, item.path.stat().st_mtime_ns)

    def next_pair(request: gr.Request):
        try:
            issued = arena.issue(session_of(request), address_of(request))
        except RateLimited as error:
            return f"### {error}", None, None, "", ""
        if issued is None:
            return "### You have compared every pair. Thank you!", None, None, "", "All pairs done."
        showing = issued.showing
        progress = progress_line(issued.votes_so_far, issued.pairs_left)
        left_file, right_file = blind_pair_files(shown_png(showing.left), shown_png(showing.right), folder)
        return f"### {showing.pair.prompt}", left_file, right_file, issued.token, progress

    def vote(choice: str, token: str, request: gr.Request) -> dict:
        """Vote on the pair a token was issued for: choice is left, right, tie or both_bad."""
        result = arena.vote(session_of(request), token, choice, address_of(request))
        return {"accepted": result.accepted, "reason": result.reason, "vote_id": result.vote_id,
                "left_model": result.left_model, "right_model": result.right_model}

    with gr.Blocks(title="diffalign arena") as demo:
        gr.Markdown("## diffalign arena · which image fits the prompt better? Models are hidden until you vote.",
                    elem_id="arena-title")
        with gr.Tab("Vote"):
            prompt = gr.Markdown(elem_id="arena-prompt")
            sides = {}
            with gr.Row(equal_height=True):
                for side, key, label in (("left", 1, "⬅ Left is better [1]"), ("right", 2, "Right is better [2] ➡")):
                    with gr.Column(min_width=300):  # stacks on a phone: each button stays under its image
                        image = gr.Image(label=side.title(), type="pil", format="png", interactive=False,
                                         height=options.display_size + IMAGE_FRAME_PX, buttons=["fullscreen"], elem_id=f"arena-{side}")
                        caption = gr.Markdown(elem_id=f"arena-{side}-caption", elem_classes=caption_classes(None, side))
                        button = gr.Button(label, elem_id=f"vote-{side}", variant="primary")
                    sides[side] = (image, caption, button)
            with gr.Row():
                tie = gr.Button("Tie [3]", elem_id="vote-tie", min_width=120)
                both_bad = gr.Button("Both bad [4]", elem_id="vote-both-bad", min_width=120)
                next_button = gr.Button("Next pair [Space]", elem_id="next-pair", variant="secondary", visible=False,
                                        min_width=120)
            revealed = gr.Markdown(elem_id="arena-reveal")
            progress = gr.Markdown(elem_id="arena-progress")
            gr.Markdown("Keys: **1** / ← left, **2** / → right, **3** / t tie, **4** / b both bad"
                        + (", **Space** / n next." if options.reveal == "next" else "."), elem_id="arena-keys")
            token = gr.Textbox(visible=False, max_length=MAX_TOKEN_CHARS, elem_id="arena-token")
        with gr.Tab("Leaderboard"):
            refresh = gr.Button("Refresh", elem_id="leaderboard-refresh")
            summary = gr.Markdown(elem_id="leaderboard-summary")
            table = gr.Dataframe(headers=LEADERBOARD_HEADERS, interactive=False, elem_id="leaderboard-table")
            download = gr.DownloadButton("Download CSV", elem_id="leaderboard-csv", visible=False)
            heatmap = gr.Image(label="pairwise win rate, best first", type="pil", format="png", interactive=False)

        buttons = {"left": sides["left"][2], "right": sides["right"][2], "tie": tie, "both_bad": both_bad}
        shown = [prompt, sides["left"][0], sides["right"][0], token, progress]
        reveal_outputs = [sides["left"][1], sides["right"][1], revealed, progress, *buttons.values(), next_button]
        next_outputs = shown + [output for output in reveal_outputs if output is not progress]  # progress is in shown
        demo.load(next_pair, None, shown, api_name="next_pair", queue=False)

        def show_next(request: gr.Request) -> tuple:
            """The next pair with the previous reveal cleared in the same update: no name meets a new image."""
            hidden = (*(gr.update(value="", elem_classes=caption_classes(None, side)) for side in ("left", "right")),
                      "", *(gr.update(interactive=True) for _ in buttons), gr.update(visible=False))
            return (*next_pair(request), *hidden)

        def vote_from_page(choice: str):
            def handler(token_value: str, request: gr.Request) -> tuple:
                result = vote(choice, token_value, request)
                texts = (reveal_captions(choice, result["left_model"], result["right_model"])
                         if result["accepted"] else ("", ""))
                captions = (gr.update(value=text, elem_classes=caption_classes(choice if result["accepted"] else None,
                                                                                side))
                            for text, side in zip(texts, ("left", "right")))
                locked = (gr.update(interactive=False) for _ in buttons)  # a second vote on this pair is refused anyway
                standing = progress_line(*arena.counts(session_of(request)))
                return (*captions, reveal_summary(result, choice, options), standing, *locked,
                        gr.update(visible=options.reveal == "next"))

            return handler

        for choice, button in buttons.items():
            revealing = button.click(vote_from_page(choice), [token], reveal_outputs, api_visibility="private")
            if options.reveal == "pause":
                pause_ms = round(options.reveal_seconds * 1000)
                revealing = revealing.then(None, None, None, js=f"() => new Promise(r => setTimeout(r, {pause_ms}))")
                revealing.then(show_next, None, next_outputs, api_visibility="private")
        next_button.click(show_next, None, next_outputs, api_visibility="private")
        gr.api(vote, api_name="vote", queue=False)

        def leaderboard_file() -> dict:
            """A copy of the leaderboard CSV in the served folder (new name per refresh), or no button without votes."""
            if not arena.leaderboard_csv.is_file():
                return gr.update(visible=False)
            target = folder / secrets.token_hex(16) / arena.leaderboard_csv.name
            with staged_file(target) as staging:
                shutil.copyfile(arena.leaderboard_csv, staging)
            return gr.update(value=str(target), visible=True)

        refresh.click(arena.leaderboard, None, [table, heatmap, summary], api_name="leaderboard").then(
            leaderboard_file, None, [download], api_visibility="private")
    return demo

def serve(arena: Arena, host: str = "127.0.0.1", port: int = 7860, auth: list[tuple[str, str]] | None = None,
          concurrency: int = 16, options: PageOptions = PageOptions()) -> None:
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
        demo = build_blocks(arena, signer, options, private)
        demo.queue(default_concurrency_limit=concurrency, max_size=1024)
        app = fastapi.FastAPI()
        app = gr.mount_gradio_app(app, demo, path="", server_name=host, server_port=port, auth=auth or None,
                                  head=SHORTCUTS, css=page_css(options), show_error=True, max_file_size=MAX_BODY_BYTES, ssr_mode=False)
        app.add_middleware(SessionCookieMiddleware, signer=signer)
        app.add_middleware(NoUploads)
        app.add_middleware(BodyLimit, limit=MAX_BODY_BYTES)
        print(f"diffalign arena: http://{host}:{port}  ({arena.scheduler.pair_count} pairs, votes in "
              f"{arena.store.path})", flush=True)
        uvicorn.run(app, host=host, port=port, log_level="warning")
    finally:
        shutil.rmtree(private, ignore_errors=True)
