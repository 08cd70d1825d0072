"""Atomic checkpoints and exact resume.

``checkpoint-{step}`` holds the denoiser (LoRA adapters only, or the full
network via save_pretrained), optimizer, LR scheduler and RNG states (through
``accelerator.save_state``, which every rank must call: gating it on the main
process hangs under DeepSpeed) and ``trainer_state.json``. It is written under
a temporary name and renamed when complete, so a crash never leaves a
half-written checkpoint that ``resume_from=latest`` would pick up.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

from torch import nn

from diffalign.atomic import DiskFullError, full_disk_is_reported, replace_folder

from .finite import require_finite_weights

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
STATE_FILE = "trainer_state.json"
LORA_FILE = "denoiser_lora.safetensors"
FULL_FOLDER = "denoiser"


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints in ``output_dir``, oldest first."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := CHECKPOINT_PATTERN.match(p.name)) and p.is_dir()]
    return [path for _, path in sorted(found)]


def resolve_resume(resume_from: str | None, output_dir: str | Path) -> Path | None:
    """A checkpoint path, 'latest' (None when there is none yet: a fresh start), or None."""
    if resume_from is None:
        return None
    if resume_from == "latest":
        checkpoints = list_checkpoints(output_dir)
        return checkpoints[-1] if checkpoints else None
    path = Path(resume_from)
    if not (path / STATE_FILE).is_file():
        raise FileNotFoundError(f"train.resume_from={resume_from}: no checkpoint there (missing {STATE_FILE})")
    return path


def read_state(checkpoint: Path) -> dict[str, Any]:
    return json.loads((checkpoint / STATE_FILE).read_text())


def register_denoiser_hooks(accelerator: Any, lora: bool) -> None:
    """Save/load the denoiser compactly: adapters only under LoRA, save_pretrained for full fine-tuning."""
    from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
    from safetensors.torch import load_file, save_file

    def save_hook(models: list[nn.Module], weights: list[dict], output_dir: str) -> None:
        for model in models:
            network = accelerator.unwrap_model(model)
            if accelerator.is_main_process:
                if lora:
                    state = {k: v.detach().contiguous() for k, v in get_peft_model_state_dict(network).items()}
                    save_file(state, os.path.join(output_dir, LORA_FILE))
                else:
                    network.save_pretrained(os.path.join(output_dir, FULL_FOLDER))
            if weights:
                weights.pop()

    def load_hook(models: list[nn.Module], input_dir: str) -> None:
        while models:
            network = accelerator.unwrap_model(models.pop())
            if lora:
                result = set_peft_model_state_dict(network, load_file(os.path.join(input_dir, LORA_FILE)))
                if getattr(result, "unexpected_keys", None):
                    raise RuntimeError(f"checkpoint {input_dir} has adapter keys this model lacks: {result.unexpected_keys[:5]}")
            else:
                folder = os.path.join(input_dir, FULL_FOLDER)
                files = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))
                state: dict = {}
                for name in files:
                    state.update(load_file(os.path.join(folder, name)))
                network.load_state_dict(state, strict=True)

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def save_checkpoint(
    accelerator: Any, output_dir: str | Path, step: int, state: dict[str, Any], keep_last: int | None, model: nn.Module
) -> Path:
    """Write checkpoint-{step} atomically on every rank's behalf; prune to the last ``keep_last``.

    ``model``'s trainable weights are checked first: a checkpoint with NaN or infinite weights is never
    written (it would become ``latest`` and push a good one out of the rotation).
    """
    output_dir = Path(output_dir)
    final = output_dir / f"checkpoint-{step}"
    require_finite_weights(accelerator, model, f"refusing to write {final}")
    staging = output_dir / f".checkpoint-{step}.tmp"
    if accelerator.is_main_process and staging.exists():
        shutil.rmtree(staging)
    accelerator.wait_for_everyone()
    previous = list_checkpoints(output_dir)
    intact = f"the newest checkpoint {previous[-1]} is complete" if previous else "no checkpoint was written before this one"
    try:
        with full_disk_is_reported(final, intact):
            accelerator.save_state(str(staging))  # every rank calls it (DeepSpeed needs that)
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                (staging / STATE_FILE).write_text(json.dumps({"step": step, **state}, indent=2))
    except DiskFullError:
        shutil.rmtree(staging, ignore_errors=True)  # the half-written staging copy only: give the space back
        raise
    if accelerator.is_main_process:
        replace_folder(staging, final)
        if keep_last is not None:
            for old in checkpoints_to_prune(list_checkpoints(output_dir), keep_last, newest=final):
                shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def checkpoints_to_prune(checkpoints: list[Path], keep_last: int, newest: Path) -> list[Path]:
    """The checkpoints beyond the last ``keep_last`` (by step), never ``newest``, the one just written.

    Only finite checkpoints are written (save_checkpoint checks), so the one just written is the newest
    finite one. It may not be the highest step: a run resumed from an earlier checkpoint writes below
    later ones, and pruning by step alone would delete what it just saved and keep the steps it replaces.
    """
    if keep_last < 1:
        raise ValueError(f"keep_last must be at least 1, got {keep_last}")
    kept = set(checkpoints[-keep_last:]) | {newest}
    return [path for path in checkpoints if path not in kept]
