"""An output folder belongs to one run.

Why: a new run started in a folder that holds a finished run used to replace its ``final/``,
truncate its metrics and overwrite its config, and then delete its own new checkpoints because
the old run's sorted as newer; ``resume_from=latest`` would afterwards have continued the *old*
run. So every run records who it is (``run.json``: a run id, a config fingerprint and the parts
a resume must not change), a new run refuses a folder that holds another run's checkpoints or
``final/``, and a resume whose batch geometry, data or method changed is refused with the list of
what changed unless ``train.allow_resume_changes`` says so (and the change is recorded).
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

from diffalign.atomic import staged_file
from diffalign.config import ConfigError
from diffalign.fingerprint import fingerprint
from diffalign.writable import check_writable

from .checkpoint import list_checkpoints
from .config import TrainConfig

logger = logging.getLogger(__name__)

RUN_FILE = "run.json"
# Settings a run may change between its start and a resume without becoming another run.
RESUMABLE_TRAIN_KEYS = ("output_dir", "resume_from", "max_steps", "overwrite", "allow_resume_changes", "progress_bar",
                        "log_every", "checkpointing_steps", "checkpoints_total_limit", "report_to",
                        "push_to_hub", "hub_model_id", "hub_private")


def run_record(config: TrainConfig, processes: int) -> dict[str, Any]:
    """What identifies a run: its batch geometry, data and method, and a fingerprint of everything else."""
    payload = config.model_dump(mode="json")
    for key in RESUMABLE_TRAIN_KEYS:
        payload["train"].pop(key, None)
    payload["data"].pop("num_workers", None)
    payload.pop("validation", None)  # validation images never touch the training stream (validation.py)
    return {
        "geometry": {
            "train.batch_size": config.train.batch_size,
            "train.gradient_accumulation_steps": config.train.gradient_accumulation_steps,
            "processes": processes,
        },
        "data": {f"data.{key}": value for key, value in payload["data"].items()},
        "method": {f"method.{key}": value for key, value in payload["method"].items()},
        "config_fingerprint": fingerprint(payload, 16),
    }


def previous_run(output_dir: Path) -> list[str]:
    """What in ``output_dir`` belongs to a run: its checkpoints and ``final/``."""
    found = [path.name for path in list_checkpoints(output_dir)]
    if (output_dir / "final").exists():
        found.append("final/")
    return found


def remove_staging_leftovers(output_dir: Path) -> list[str]:
    """Staging folders and files of a killed run (``.<name>.tmp-*``: never complete, never the only copy).

    ``.<name>.old-*`` folders are kept: a kill between the two renames of a swap can leave the only
    complete copy there.
    """
    removed = []
    for path in output_dir.glob(".*.tmp*") if output_dir.is_dir() else []:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
        removed.append(path.name)
    if removed:
        logger.warning("removed %d leftover staging item(s) of an interrupted run in %s: %s", len(removed), output_dir, removed)
    return removed


def move_aside(output_dir: Path) -> Path:
    """``train.overwrite=true``: the old run moves to ``<name>.moved-<UTC time>`` beside it, never deleted."""
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%S")
    target = output_dir.with_name(f"{output_dir.name}.moved-{stamp}")
    suffix = 1
    while target.exists():
        target = output_dir.with_name(f"{output_dir.name}.moved-{stamp}-{suffix}")
        suffix += 1
    os.replace(output_dir, target)
    return target


def changes(recorded: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """``key: old -> new`` for every geometry, data or method setting that differs."""
    found = []
    for part in ("geometry", "data", "method"):
        before, after = recorded.get(part, {}), current[part]
        for key in sorted(set(before) | set(after)):
            if before.get(key) != after.get(key):
                found.append(f"{key}: {before.get(key)!r} -> {after.get(key)!r}")
    return found


def check_output_dir(output_dir: Path) -> None:
    """``train.output_dir`` must be a folder that exists or can be made: say so before any model loads."""
    check_writable(output_dir, "train.output_dir", "folder")


def make_output_dir(output_dir: Path) -> None:
    """``mkdir -p``, with an OSError (permission, read-only file system, disk full) told as a ConfigError."""
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ConfigError(
            f"train.output_dir={output_dir} cannot be created ({error.strerror or error}); choose a writable folder"
        ) from None


def claim_output_dir(config: TrainConfig, processes: int, resuming: bool, write: bool = True) -> dict[str, Any]:
    """Make ``train.output_dir`` this run's, before anything is written; return run.json's content.

    ``resuming``: a checkpoint of this folder will be loaded. Raises ConfigError, naming the folder and
    the ways out, when the folder holds another run or a resume would change what the run is. Every
    process calls it, so all of them stop alike; only the one with ``write`` moves or writes anything.
    """
    run = config.train
    output_dir = Path(run.output_dir)
    check_output_dir(output_dir)
    if write:
        remove_staging_leftovers(output_dir)
    current = run_record(config, processes)
    record_path = output_dir / RUN_FILE
    if not resuming:
        found = previous_run(output_dir)
        if found:
            if not run.overwrite:
                raise ConfigError(
                    f"train.output_dir={output_dir} holds another run ({', '.join(found[-3:])}"
                    f"{', ...' if len(found) > 3 else ''}). Resume it with train.resume_from=latest, "
                    f"or set train.overwrite=true to move it aside to {output_dir.name}.moved-<time> (nothing is deleted), "
                    "or choose another train.output_dir."
                )
            if write:
                moved = move_aside(output_dir)
                print(f"diffalign: train.overwrite=true: the previous run in {output_dir} was moved to {moved}")
        record = {"run_id": uuid.uuid4().hex, "started": _now(), **current, "resumes": []}
    else:
        recorded = json.loads(record_path.read_text()) if record_path.is_file() else None
        if recorded is None:  # a folder from before run.json existed: adopt it as it is
            logger.warning("%s has no %s (an older diffalign wrote it): recording this run's settings", output_dir, RUN_FILE)
            recorded = {"run_id": uuid.uuid4().hex, "started": _now(), **current, "resumes": []}
        changed = changes(recorded, current)
        if changed and not run.allow_resume_changes:
            raise ConfigError(
                f"train.resume_from={run.resume_from}: resuming {output_dir} with settings that make it another run:\n  "
                + "\n  ".join(changed)
                + "\nRestore them, start a new run in another train.output_dir, or set train.allow_resume_changes=true "
                "(the changes are then recorded in " + RUN_FILE + ")."
            )
        record = {**recorded, **{key: current[key] for key in ("geometry", "data", "method", "config_fingerprint")}}
        record["resumes"] = [*recorded.get("resumes", []), {"at": _now(), "changed": changed}]
        if changed and write:
            print("diffalign: resuming with changed settings (train.allow_resume_changes=true):\n  " + "\n  ".join(changed))
    if write:
        make_output_dir(output_dir)
        with staged_file(record_path) as temporary:
            temporary.write_text(json.dumps(record, indent=2))
    return record


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
