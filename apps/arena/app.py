"""``diffalign arena``: a Gradio app for blind side-by-side comparison of models' images.

Each pair is shown blind (no model names, images re-encoded without metadata under
Gradio's anonymous cache names) with a random side; a vote reveals the names and loads the
next pair. The server issues every pair with a one-time token (:mod:`diffalign.apps.arena.store`), and a
session is Gradio's own per-connection ``session_hash``, so a browser tab and a
``gradio_client.Client`` are each one session.

API (what the page itself calls; ``gradio_client`` can call it too):

- ``/next_pair`` → ``(prompt, left image, right image, token, progress)``: the session's pending
  pair if it has one (with a fresh token), else the next balanced pair.
- ``/vote`` ``(choice, token)`` → ``{"accepted", "reason", "left_model", "right_model", "vote_id"}``;
  choice is one of ``left``, ``right``, ``tie``, ``both_bad``.
- ``/leaderboard`` → ``(table, heatmap, summary)``.

Safety: binds 127.0.0.1 unless told otherwise; optional username/password; every request
body is capped (:data:`MAX_BODY_BYTES`); only images listed by the sources are ever read, and
they reach the browser as re-encoded copies, so no source path is served directly.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr
import PIL.Image

from diffalign.apps.arena.rank import leaderboard, outcomes, write_heatmap
from diffalign.apps.arena.schedule import PairScheduler, Showing
from diffalign.apps.arena.sources import ArenaItem
from diffalign.apps.arena.store import MAX_SESSION_CHARS, MAX_TOKEN_CHARS, VoteResult, VoteStore

__all__ = ["Arena", "build_blocks", "serve", "MAX_BODY_BYTES"]

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


class Arena:
    """The arena's logic without Gradio: issue pairs, take votes, rank (the Gradio handlers call this)."""

    def __init__(self, store: VoteStore, scheduler: PairScheduler, items: dict[str, ArenaItem], heatmap_path: Path,
                 bootstrap_rounds: int = 200) -> None:
        self.store = store
        self.scheduler = scheduler
        self.items = items
        self.heatmap_path = heatmap_path
        self.bootstrap_rounds = bootstrap_rounds
        self._issue_lock = threading.Lock()
        scheduler.restore(store.issued_pairs())

    def issue(self, session_id: str) -> Issued | None:
        """The session's pending pair again (fresh token), else a new one; ``None`` when it has seen every pair."""
        with self._issue_lock:  # one session's reload and vote must not both draw a new pair
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

    def vote(self, session_id: str, token: str, choice: str) -> VoteResult:
        return self.store.vote(session_id, token, choice)

    def leaderboard(self) -> tuple[list[list[Any]], PIL.Image.Image | None, str]:
        """``(rows, heatmap, summary)``: the table of models, the win-rate heatmap (also written to disk)."""
        votes = self.store.votes()
        data = outcomes([(v.left_model, v.right_model, v.choice) for v in votes])
        rejections = self.store.rejection_counts()
        summary = f"**{len(votes)} votes** · {len(data.models)} models"
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
    """The item's pixels only: metadata (which may name the model) does not travel."""
    with PIL.Image.open(item.path) as image:
        image.load()
        clean = image.convert("RGBA" if image.mode in ("RGBA", "LA", "PA") else "RGB")
    clean.info = {}
    return clean


def build_blocks(arena: Arena):
    """The Gradio Blocks app: a Vote tab and a Leaderboard tab."""

    def session_of(request: gr.Request | None) -> str:
        session = getattr(request, "session_hash", None) if request is not None else None
        if not session:
            raise gr.Error("no session: connect through the Gradio page or gradio_client")
        return str(session)[:MAX_SESSION_CHARS]

    def next_pair(request: gr.Request):
        issued = arena.issue(session_of(request))
        if issued is None:
            return "### You have compared every pair. Thank you!", None, None, "", "All pairs done."
        showing = issued.showing
        progress = f"Votes this session: **{issued.votes_so_far}** · pairs left for you: {issued.pairs_left}"
        return (f"### {showing.pair.prompt}", _blind_image(showing.left), _blind_image(showing.right),
                issued.token, progress)

    def vote(choice: str, token: str, request: gr.Request) -> dict:
        """Vote on the pair a token was issued for: choice is left, right, tie or both_bad."""
        result = arena.vote(session_of(request), token, choice)
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


class _TooLarge(Exception):
    pass


async def _reject_too_large(send: Any, limit: int) -> None:
    body = json.dumps({"error": f"request body larger than {limit} bytes"}).encode()
    await send({"type": "http.response.start", "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def serve(arena: Arena, host: str = "127.0.0.1", port: int = 7860, auth: list[tuple[str, str]] | None = None,
          concurrency: int = 16) -> None:
    """Run the app with uvicorn until interrupted (Ctrl-C); every acknowledged vote is already committed."""
    import fastapi
    import uvicorn

    demo = build_blocks(arena)
    demo.queue(default_concurrency_limit=concurrency, max_size=1024)
    app = fastapi.FastAPI()
    app = gr.mount_gradio_app(app, demo, path="", server_name=host, server_port=port, auth=auth or None,
                              head=_SHORTCUTS, show_error=True, max_file_size=MAX_BODY_BYTES, ssr_mode=False)
    app.add_middleware(_BodyLimit, limit=MAX_BODY_BYTES)
    print(f"diffalign arena: http://{host}:{port}  ({arena.scheduler.pair_count} pairs, votes in {arena.store.path})",
          flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")
