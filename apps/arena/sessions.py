"""Who is voting: server-issued sessions in a signed HttpOnly cookie, and sliding-window rate limits.

Why a cookie the server signs: Gradio's ``session_hash`` is whatever the client sends, so a script
that invents 40 hashes was 40 voters. Here the server mints every session id
(``secrets.token_urlsafe``) and hands it out as ``<id>.<HMAC-SHA256(key, id)>`` in an HttpOnly,
SameSite=Lax cookie; a request without a valid cookie is given a fresh session, so an invented or
altered cookie is never anyone's session, and a vote carrying another session's token is refused
by the store. The key lives beside the vote database (mode 0600) so a restart keeps sessions.

A client can still drop its cookie and be handed a new session: that is what the per-address
limit on new sessions, the login (:mod:`.app`: a logged-in user is one session however many
cookies) and the suspicious-session flags (:mod:`.suspicion`) are for.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
import threading
import time
from collections import defaultdict, deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["COOKIE_NAME", "RateLimits", "SessionCookieMiddleware", "SessionSigner", "SlidingWindow", "load_key"]

COOKIE_NAME = "diffalign_arena_session"
KEY_BYTES = 32
_SIGNATURE_CHARS = 43  # base64url of 32 bytes, unpadded


def load_key(path: str | os.PathLike[str]) -> bytes:
    """The signing key at ``path``, created (32 random bytes, mode 0600) if absent."""
    path = Path(path)
    try:
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        key = path.read_bytes()
        if len(key) != KEY_BYTES:
            raise ValueError(f"{path}: session key must be {KEY_BYTES} bytes, found {len(key)}") from None
        return key
    key = secrets.token_bytes(KEY_BYTES)
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(key)
    return key


class SessionSigner:
    """Mints session ids and signs / checks their cookie values with one secret key."""

    def __init__(self, key: bytes) -> None:
        if len(key) < 16:
            raise ValueError("session key must be at least 16 bytes")
        self._key = key

    def _signature(self, session_id: str) -> str:
        digest = hmac.new(self._key, session_id.encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()

    def mint(self) -> tuple[str, str]:
        """A new ``(session_id, cookie_value)``."""
        session_id = secrets.token_urlsafe(18)
        return session_id, f"{session_id}.{self._signature(session_id)}"

    def verify(self, cookie_value: str | None) -> str | None:
        """The session id a cookie value carries if the server signed it, else ``None``."""
        if not cookie_value or len(cookie_value) > 128:
            return None
        session_id, dot, signature = cookie_value.partition(".")
        if not dot or not session_id or len(signature) != _SIGNATURE_CHARS:
            return None
        return session_id if hmac.compare_digest(signature, self._signature(session_id)) else None


class SessionCookieMiddleware:
    """ASGI: every HTTP request reaches the app with a valid session cookie.

    A request without one (or with an invented one) gets a freshly minted session: the cookie
    header the app sees is rewritten to carry it, and the response sets it (HttpOnly).
    """

    def __init__(self, app: Any, signer: SessionSigner) -> None:
        self.app, self.signer = app, signer

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = list(scope.get("headers") or [])
        cookie_header = b"; ".join(value for name, value in headers if name == b"cookie").decode("latin-1")
        cookies = _parse_cookies(cookie_header)
        if self.signer.verify(cookies.get(COOKIE_NAME)) is not None:
            await self.app(scope, receive, send)
            return
        _, value = self.signer.mint()
        cookies[COOKIE_NAME] = value
        rewritten = "; ".join(f"{name}={v}" for name, v in cookies.items()).encode("latin-1")
        scope = dict(scope, headers=[(n, v) for n, v in headers if n != b"cookie"] + [(b"cookie", rewritten)])
        set_cookie = f"{COOKIE_NAME}={value}; Path=/; HttpOnly; SameSite=Lax".encode()

        async def send_with_cookie(message: dict) -> None:
            if message["type"] == "http.response.start":
                message = dict(message, headers=[*message.get("headers", []), (b"set-cookie", set_cookie)])
            await send(message)

        await self.app(scope, receive, send_with_cookie)


def _parse_cookies(header: str) -> dict[str, str]:
    cookies = {}
    for part in header.split(";"):
        name, eq, value = part.strip().partition("=")
        if eq and name:
            cookies[name] = value
    return cookies


@dataclass(frozen=True)
class RateLimits:
    """Limits per sliding window; 0 turns one off. Defaults leave a person (and the 50-voter load test) alone."""

    session_votes_per_minute: int = 120  # a person needs a second or more to look at two images
    address_votes_per_minute: int = 6000  # many people behind one NAT or proxy share an address
    address_sessions_per_hour: int = 60  # new sessions (cookies) one address may start
    session_pairs_per_minute: int = 240  # pairs (re)issued to one session: each stores a token

    def __post_init__(self) -> None:
        for name in ("session_votes_per_minute", "address_votes_per_minute", "address_sessions_per_hour",
                     "session_pairs_per_minute"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0 (0: no limit), got {getattr(self, name)}")


class SlidingWindow:
    """At most ``limit`` events per key in any ``window_s`` seconds (thread-safe); ``limit`` 0: no limit."""

    def __init__(self, limit: int, window_s: float, clock=time.monotonic) -> None:
        self.limit, self.window_s, self._clock = limit, window_s, clock
        self._events: dict[str, deque[float]] = defaultdict(deque)
        self._lock = threading.Lock()

    def allow(self, key: str) -> bool:
        """Count one event for ``key`` if under the limit; ``False`` (nothing counted) if over it."""
        if self.limit == 0:
            return True
        now = self._clock()
        with self._lock:
            events = self._events[key]
            while events and events[0] <= now - self.window_s:
                events.popleft()
            if len(events) >= self.limit:
                return False
            events.append(now)
            return True
