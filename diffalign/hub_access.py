"""One place that decides whether the Hugging Face Hub can be used, so an unreachable hub fails fast and cleanly.

Why: with no network and no ``HF_HUB_OFFLINE``, huggingface_hub retries each request five times
with backoff (about a minute per scorer or model) and then transformers raises a 60-line
traceback. Here the hub is probed once (a TCP connect, a few milliseconds when DNS fails); when
it cannot be reached, huggingface_hub's offline mode is switched on for this process, so files
already in the local cache still load and anything else fails at once. :func:`hub_errors_as`
turns the errors that follow into one :class:`HubUnavailableError` that names the thing and says
what to pass instead.
"""

from __future__ import annotations

import functools
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlparse

__all__ = [
    "HubUnavailableError", "go_offline_if_unreachable", "hub_errors_as", "hub_unavailable_reason", "load_errors_as",
    "looks_like_hub_id",
]

_PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")
_TRUE = ("1", "true", "yes", "on")


class HubUnavailableError(FileNotFoundError):
    """Weights or data named by a hub id that is neither local nor cached, while the hub cannot be used."""


def looks_like_hub_id(text: str) -> bool:
    """``owner/name`` with no path syntax: not ``./x``, ``~/x``, ``/x``, ``a/b/c`` or a data/weight file name."""
    import re

    if text.startswith((".", "~", "/")) or text.count("/") != 1:
        return False
    suffix = os.path.splitext(text)[1].lower()
    if suffix in (".parquet", ".jsonl", ".json", ".arrow", ".csv", ".txt", ".pt", ".pth", ".bin", ".safetensors", ".yaml"):
        return False
    return re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", text) is not None


def _endpoint_host() -> tuple[str, int]:
    endpoint = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    return endpoint.hostname or "huggingface.co", endpoint.port or (443 if endpoint.scheme != "http" else 80)


@functools.lru_cache(maxsize=1)
def _probe(host: str, port: int, timeout: float) -> str | None:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except OSError as error:
        return f"the hub ({host}) cannot be reached: {error}"


def hub_unavailable_reason(timeout: float = 3.0) -> str | None:
    """Why the hub cannot be used now (offline mode set, or no connection), or None when it can.

    Behind a proxy the direct probe says nothing, so the hub is then assumed reachable.
    """
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE:
        return "HF_HUB_OFFLINE is set"
    try:
        from huggingface_hub import constants

        if constants.HF_HUB_OFFLINE:
            return "huggingface_hub is in offline mode"
    except ImportError:
        return "huggingface_hub is not installed"
    if any(os.environ.get(name) for name in _PROXY_VARIABLES):
        return None
    return _probe(*_endpoint_host(), timeout)


def go_offline_if_unreachable() -> str | None:
    """Switch huggingface_hub (and datasets, when loaded) to offline mode when the hub cannot be reached.

    Cached files keep loading; an uncached one fails at once instead of after retries. Returns the reason.
    """
    import sys

    reason = hub_unavailable_reason()
    if reason is not None:
        from huggingface_hub import constants

        constants.HF_HUB_OFFLINE = True
        datasets_config = sys.modules.get("datasets.config")
        if datasets_config is not None:
            datasets_config.HF_HUB_OFFLINE = True  # type: ignore[attr-defined]
    return reason


def _is_hub_failure(error: BaseException) -> bool:
    """huggingface_hub's not-found/offline/connection errors, also when transformers rewraps them in OSError."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        module = type(error).__module__ or ""
        name = type(error).__name__
        if module.startswith("huggingface_hub") and name in (
            "LocalEntryNotFoundError", "OfflineModeIsEnabled", "RepositoryNotFoundError", "EntryNotFoundError",
            "RemoteEntryNotFoundError", "GatedRepoError", "HfHubHTTPError",
        ):
            return True
        if module.startswith(("httpx", "requests", "urllib3")) and "Connect" in name or name == "ConnectError":
            return True
        text = str(error)
        if isinstance(error, OSError) and ("huggingface.co" in text or "offline mode" in text or "cached files" in text):
            return True
        error = error.__cause__ or error.__context__  # type: ignore[assignment]
    return False


@contextmanager
def hub_errors_as(what: str, fix: str) -> Iterator[None]:
    """Run a load that may touch the hub; its hub failures become one HubUnavailableError naming ``what``.

    ``what``: e.g. ``"scorer 'pickscore' (weights yuvalkirstain/PickScore_v1)"``; ``fix``: what to pass instead.
    Switches to offline mode first when the hub cannot be reached, so the failure comes at once.
    """
    reason = go_offline_if_unreachable()
    try:
        yield
    except Exception as error:
        if not _is_hub_failure(error):
            raise
        why = reason or hub_unavailable_reason() or f"the hub refused it ({type(error).__name__})"
        raise HubUnavailableError(
            f"{what}: not a local path and not in the local hub cache, and {why}. {fix}"
        ) from None


@contextmanager
def load_errors_as(what: str, path: str | None, fix: str) -> Iterator[None]:
    """Load weights named by ``path``: a local one's unreadable files, or a hub id's unreachable hub, end in one message.

    ``what`` names the setting (``"--model nobody/x"``); ``fix`` says what to pass instead.
    A local path's OSError (a file missing from the folder) becomes FileNotFoundError naming it.
    """
    if path is not None and Path(path).expanduser().exists():
        try:
            yield
        except OSError as error:
            text = str(error).strip()
            first = text.splitlines()[0] if text else type(error).__name__
            raise FileNotFoundError(f"{what}: cannot load it: {first}. {fix}") from None
        return
    with hub_errors_as(what, fix):
        yield
