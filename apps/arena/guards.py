"""The arena's ASGI guards: a cap on request bodies (413) and no uploads (403).

Why: nothing in the arena takes more than a vote from a client, so a large body is an attack or
a mistake, and Gradio's upload routes are a way to put files on the server that the arena never needs.
"""

from __future__ import annotations

import json
from typing import Any

__all__ = ["BodyLimit", "NoUploads"]


class BodyLimit:
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


class NoUploads:
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
