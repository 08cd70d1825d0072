"""``diffalign push OUT_DIR REPO_ID``: upload a run's final weights and model card to the Hugging Face Hub."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

__all__ = ["add_hub_parsers", "push_run"]


def push_run(output_dir: str | Path, repo_id: str, private: bool = False, token: str | None = None) -> str:
    """Upload ``output_dir/final`` (or ``output_dir`` itself when it is a final folder) as a model repo; returns its URL."""
    from diffalign.trainers.export import RECORD_FILE
    from diffalign.trainers.hub import HubError, push_folder

    output_dir = Path(output_dir)
    final = output_dir if (output_dir / RECORD_FILE).is_file() else output_dir / "final"
    if not (final / RECORD_FILE).is_file():
        raise HubError(
            f"{output_dir} holds no finished run: {final} with {RECORD_FILE} is missing. Push the output_dir of a "
            "`diffalign train` run that finished (its final/ folder is written at the last step)."
        )
    return push_folder(final, repo_id, repo_type="model", private=private, token=token)


def _push(args: argparse.Namespace) -> int:
    from diffalign.trainers.hub import HubError

    try:
        url = push_run(args.output_dir, args.repo_id, private=args.private, token=args.token)
    except HubError as error:
        print(f"diffalign push: error: {error}", file=sys.stderr)
        return 1
    print(f"diffalign push: uploaded {args.output_dir} to {url}")
    return 0


def add_hub_parsers(commands: argparse._SubParsersAction) -> None:
    push = commands.add_parser("push", help="upload a run's final/ (weights + model card) to the Hugging Face Hub")
    push.add_argument("output_dir", help="a training run's output_dir (or its final/ folder)")
    push.add_argument("repo_id", help="the model repo, user/name (created if missing)")
    push.add_argument("--private", action="store_true", help="create the repo as private")
    push.add_argument("--token", default=None, help="a hub token with write access (default: HF_TOKEN or `hf auth login`)")
    push.set_defaults(run=_push)
