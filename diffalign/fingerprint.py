"""Short, stable hashes of JSON-ready payloads, to key caches and name cached folders.

One helper, so that every cache key (reader fingerprints, encoder caches, PSO
reference folders, toy worlds and bases) is spelled the same way: the payload
as JSON with sorted keys, hashed with sha256, the hex digest cut to a length
each caller keeps fixed (a new length would invalidate caches already on disk).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

__all__ = ["fingerprint"]


def fingerprint(payload: Any, length: int, *, compact: bool = False) -> str:
    """The first ``length`` hex digits of sha256 over ``payload`` as sorted-key JSON.

    Values JSON cannot write (paths, dtypes) are written as ``str(value)``.
    ``compact`` drops the spaces after ``,`` and ``:``; the toy world's
    fingerprints were first written that way, and its caches on disk are
    named by them, so it keeps that spelling.
    """
    separators = (",", ":") if compact else None
    blob = json.dumps(payload, sort_keys=True, default=str, separators=separators).encode()
    return hashlib.sha256(blob).hexdigest()[:length]
