"""Write folders and files the user keeps (models, caches, checkpoints, tables) so they are never half-written.

Everything is written into a staging folder beside the target and swapped in
by rename; a folder already at the target is kept until the swap has happened.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path


class DiskFullError(OSError):
    """A write ran out of space (or hit a file-size or quota limit); what was there before is intact."""


# How a full disk surfaces: OSError errnos, or the messages of writers that wrap them (torch's
# PytorchStreamWriter, safetensors' Rust IoError).
_FULL_ERRNOS = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}
_FULL_MESSAGES = ("no space left", "file too large", "filetoolarge", "storagefull", "disk quota", "file write failed")


def is_disk_full(error: BaseException) -> bool:
    while error is not None:
        if isinstance(error, OSError) and error.errno in _FULL_ERRNOS:
            return True
        if any(text in str(error).lower() for text in _FULL_MESSAGES):
            return True
        error = error.__cause__ or error.__context__
    return False


@contextlib.contextmanager
def full_disk_is_reported(target: str | Path, intact: str) -> Iterator[None]:
    """Turn a full disk while writing ``target`` into a DiskFullError naming the path and what is intact."""
    try:
        yield
    except DiskFullError:
        raise
    except Exception as error:
        if not is_disk_full(error):
            raise
        raise DiskFullError(
            errno.ENOSPC,
            f"writing {target}: the disk is full (or a file-size/quota limit was reached: {error}). Nothing was "
            f"replaced: {intact}. Free space, then resume with train.resume_from=latest.",
        ) from error


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def follow_umask(path: Path, folder: bool) -> None:
    """mkdtemp/mkstemp create 0700/0600 for privacy while staging; what the user keeps gets the modes any
    other file of theirs would (0755/0644 under the usual umask), so others on a shared machine can read it."""
    path.chmod((0o777 if folder else 0o666) & ~_umask())


def replace_folder(staging: str | Path, final: str | Path) -> None:
    """Move a complete ``staging`` folder to ``final``, replacing what was there only once the move is done."""
    staging, final = Path(staging), Path(final)
    previous = final.with_name(f".{final.name}.old-{uuid.uuid4().hex[:8]}")
    if final.exists():
        os.replace(final, previous)  # a folder cannot be renamed over a non-empty one
    try:
        os.replace(staging, final)
    except BaseException:
        if previous.exists() and not final.exists():
            os.replace(previous, final)  # put the old one back
        raise
    shutil.rmtree(previous, ignore_errors=True)


@contextlib.contextmanager
def staged_folder(final: str | Path, before_replace: Callable[[Path], None] | None = None) -> Iterator[Path]:
    """Yield an empty staging folder beside ``final``; on success it becomes ``final``, on error it is removed.

    ``before_replace(final)`` runs just before the swap and may raise to keep ``final`` as it is: a long
    build checks again that what it is about to replace is still its own (someone may have written there).
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield staging
        follow_umask(staging, folder=True)
        if before_replace is not None:
            before_replace(final)
        replace_folder(staging, final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


@contextlib.contextmanager
def staged_file(final: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``final`` (same suffix); on success it replaces ``final``, on error it is removed."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp" + final.suffix)
    os.close(fd)
    try:
        yield Path(temporary)
        follow_umask(Path(temporary), folder=False)
        os.replace(temporary, final)
    finally:
        Path(temporary).unlink(missing_ok=True)
