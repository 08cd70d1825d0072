"""Upload a folder (a run's ``final/``, a vote data set) to the Hugging Face Hub.

Every failure a user can meet here (offline mode, no network, no token, no permission) ends in a
:class:`HubError` whose message says what happened and what to do; the CLI prints it, no traceback.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Literal

RepoType = Literal["model", "dataset"]
TRUE_VALUES = {"1", "on", "yes", "true"}


class HubError(RuntimeError):
    """An upload that did not happen; the message is for the user."""


def hub_is_offline() -> bool:
    """HF_HUB_OFFLINE as huggingface_hub reads it (read now: the library reads it once, at import)."""
    from huggingface_hub import constants

    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in TRUE_VALUES or bool(constants.HF_HUB_OFFLINE)


def _network_errors() -> tuple[type[BaseException], ...]:
    """What huggingface_hub raises when the hub cannot be reached or refuses (its HTTP client's errors included)."""
    from huggingface_hub import errors

    found: list[type[BaseException]] = [OSError, errors.HfHubHTTPError, errors.OfflineModeIsEnabled, errors.LocalTokenNotFoundError]
    for module, name in (("httpx", "HTTPError"), ("requests", "RequestException")):
        try:
            found.append(getattr(__import__(module), name))
        except ImportError:
            pass
    return tuple(found)


def push_folder(
    folder: str | Path, repo_id: str, repo_type: RepoType = "model", private: bool = False, token: str | None = None,
    commit_message: str = "Upload with diffalign",
) -> str:  # fmt: skip
    """Create ``repo_id`` if needed and upload ``folder`` into it; returns the repo's URL."""
    import huggingface_hub

    folder = Path(folder)
    if not folder.is_dir():
        raise HubError(f"nothing to upload: {folder} is not a folder")
    return _upload(folder, repo_id, repo_type, private, token, lambda: huggingface_hub.upload_folder(
        repo_id=repo_id, folder_path=str(folder), repo_type=repo_type, token=token, commit_message=commit_message
    ))  # fmt: skip


def push_file(
    path: str | Path, repo_id: str, path_in_repo: str, repo_type: RepoType = "dataset", private: bool = False,
    token: str | None = None, commit_message: str = "Upload with diffalign",
) -> str:  # fmt: skip
    """Create ``repo_id`` if needed and upload one file as ``path_in_repo``; returns the repo's URL."""
    import huggingface_hub

    path = Path(path)
    if not path.is_file():
        raise HubError(f"nothing to upload: {path} is not a file")
    return _upload(path, repo_id, repo_type, private, token, lambda: huggingface_hub.upload_file(
        path_or_fileobj=str(path), path_in_repo=path_in_repo, repo_id=repo_id, repo_type=repo_type, token=token,
        commit_message=commit_message,
    ))  # fmt: skip


def _upload(source: Path, repo_id: str, repo_type: RepoType, private: bool, token: str | None, upload: Callable[[], object]) -> str:
    """create_repo + ``upload()``, with every failure turned into a HubError that says what to do."""
    import huggingface_hub
    from huggingface_hub.errors import HFValidationError

    if hub_is_offline():
        raise HubError(
            f"cannot push {source} to {repo_id}: huggingface_hub is offline (HF_HUB_OFFLINE is set, or this process "
            "found the hub unreachable), so it makes no network calls. "
            f"Unset it (and log in with `hf auth login` or pass a token) on a machine that reaches the hub, then push again."
        )
    try:
        url = huggingface_hub.create_repo(repo_id, repo_type=repo_type, private=private, token=token, exist_ok=True)
        upload()
    except HFValidationError as error:
        raise HubError(f"{repo_id!r} is not a valid repo id (user/name): {error}") from None
    except _network_errors() as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise HubError(
            f"could not push {source} to the hub {repo_type} repo {repo_id} ({type(error).__name__}: {first_line}). "
            "Check the network, and that you are logged in (`hf auth login`, or pass a token / set HF_TOKEN) with write "
            f"access to {repo_id}; nothing was changed locally, so you can push again."
        ) from None
    return str(url)
