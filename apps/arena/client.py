"""A small client of a running arena: Gradio's REST protocol (``/gradio_api/call/<endpoint>``) over one
keep-alive connection, and a launcher that starts ``diffalign arena`` as a process and waits for it.

Why not only ``gradio_client``: it opens a new HTTPS-capable client per call (≈50 ms of client CPU
here), which makes a 50-client load test measure the client, not the server. This one speaks the
same public protocol a ``curl`` user would: ``POST /gradio_api/call/NAME {"data": [...],
"session_hash": ...}`` returns an event id, ``GET /gradio_api/call/NAME/ID`` streams the result.
The server issues the session in a signed cookie on the first answer and the client's cookie jar
sends it back, so one :class:`ArenaClient` is one voter (the ``session_hash`` it sends decides nothing).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from typing import Any

import httpx

__all__ = ["ArenaClient", "ArenaCallError", "free_port", "launch_arena", "wait_until_up"]


class ArenaCallError(RuntimeError):
    """The server answered a call with an error event (or not at all)."""


class ArenaClient:
    """One voter: a session hash and a keep-alive HTTP connection to the arena at ``url``."""

    def __init__(self, url: str, session_hash: str | None = None, timeout_s: float = 60.0,
                 auth: tuple[str, str] | None = None) -> None:
        self.url = url.rstrip("/")
        self.session_hash = session_hash or uuid.uuid4().hex
        self._http = httpx.Client(timeout=timeout_s, trust_env=False)
        if auth is not None:
            response = self._http.post(f"{self.url}/login", data={"username": auth[0], "password": auth[1]})
            if response.status_code != 200:
                raise ArenaCallError(f"login as {auth[0]!r} refused: HTTP {response.status_code}")

    @property
    def session_id(self) -> str | None:
        """The arena session the server issued this client (``None`` before the first call)."""
        from diffalign.apps.arena.sessions import COOKIE_NAME

        value = self._http.cookies.get(COOKIE_NAME)
        return value.partition(".")[0] if value else None

    def call(self, endpoint: str, *data: Any) -> list[Any]:
        """Run ``endpoint`` with positional ``data``; the list of its outputs."""
        response = self._http.post(
            f"{self.url}/gradio_api/run/{endpoint}", json={"data": list(data), "session_hash": self.session_hash}
        )
        if response.status_code != 200:
            raise ArenaCallError(f"/{endpoint}: HTTP {response.status_code}: {response.text[:200]}")
        return response.json()["data"]

    def next_pair(self) -> dict[str, Any]:
        """The pair to vote on: ``{"prompt", "token", "progress", "left", "right"}`` (images as served)."""
        prompt, left, right, token, progress = self.call("next_pair")
        return {"prompt": prompt, "left": left, "right": right, "token": token, "progress": progress}

    def vote(self, choice: str, token: str) -> dict[str, Any]:
        return self.call("vote", choice, token)[0]

    def close(self) -> None:
        self._http.close()


def launch_arena(sources: list[str | os.PathLike[str]], database: str | os.PathLike[str], port: int,
                 *extra: str, log: str | os.PathLike[str] | None = None) -> subprocess.Popen:
    """Start ``diffalign arena`` (this interpreter) in its own process; call :func:`wait_until_up` next."""
    command = [sys.executable, "-m", "diffalign.apps.cli", "arena", "--db", str(database), "--port", str(port), *extra]
    for source in sources:
        command += ["--source", str(source)]
    output = open(log, "ab") if log is not None else subprocess.DEVNULL  # noqa: SIM115 (the child owns it)
    return subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, start_new_session=True)


def wait_until_up(url: str, process: subprocess.Popen | None = None, timeout_s: float = 90.0) -> None:
    """Return once ``url`` answers; raise if the process died or the time ran out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise ArenaCallError(f"the arena process exited with code {process.returncode} before serving {url}")
        try:
            if httpx.get(f"{url.rstrip('/')}/gradio_api/info", timeout=2.0, trust_env=False).status_code in (200, 401):
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise ArenaCallError(f"{url} did not answer within {timeout_s:.0f} s")


def free_port() -> int:
    """A TCP port on loopback that was free a moment ago."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]

