"""Precomputed reference errors: the frozen reference's per-sample errors, computed once, before training.

Why this is possible: the reference never changes, and every group's noise, timestep and empty-prompt
dropout are a pure function of ``(seed, epoch, row)`` (``KeyedDataset``'s noise seed). So the reference's
errors for every group a run will draw are known before its first step. Computing them in one
inference-mode pass at a large batch, and reading them during training, leaves the training step
only the policy: a third less compute per step for Diffusion-DPO LoRA (no reference forward), no
frozen copy in memory for full fine-tuning, and one reference pass shared by a sweep over beta or the
learning rate (neither is in the key).

Layout of a store folder (written under a temporary name, renamed when complete)::

    manifest.json                 format marker, the key (model, data, seed, precision, ...), coverage
    errors.safetensors            noise_seed [N] int64 and errors [N, K] float32, one row per group

The key holds everything a stored error depends on; a training config whose key differs is refused
with what changed. Which groups are stored is the run's own draw order (the first
``max_steps x accumulation x processes`` batches of ``batch_size`` groups): a run that draws a group
the store lacks (a longer run, another batch size) stops with what to rebuild.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from diffalign.atomic import staged_folder
from diffalign.backbones import Backbone, load_backbone
from diffalign.cache import model_fingerprint
from diffalign.config import ConfigError
from diffalign.data import EpochBatchSampler, SkipReport, open_source
from diffalign.dtypes import parse_dtype
from diffalign.fingerprint import fingerprint

from .config import TrainConfig
from .data import TrainingData, build_training_data
from .models import FrozenCopyReference
from .objectives import objective_entry
from .step import group_errors, draw_noise, prepare_groups

STORE_FORMAT = "diffalign-reference-errors"
STORE_VERSION = 1
MANIFEST = "manifest.json"
ERRORS_FILE = "errors.safetensors"
DENOISER_FOLDERS = ("unet", "transformer")


class StaleReferenceErrorsError(ConfigError):
    """The store was computed for another model, data, seed or precision than the config names."""


class MissingReferenceErrorsError(ConfigError):
    """The run drew a group whose reference errors the store does not hold."""


def denoiser_fingerprint(model_path: str) -> str:
    """Identity of the reference's weights: configs and weight files (size, mtime) of a local folder's denoiser."""
    root = Path(model_path)
    payload: dict[str, Any] = {"path": model_path}
    for folder in DENOISER_FOLDERS:
        for file in sorted((root / folder).glob("*")) if (root / folder).is_dir() else []:
            stat = file.stat()
            payload[f"{folder}/{file.name}"] = file.read_text() if file.suffix == ".json" else (stat.st_size, stat.st_mtime_ns)
    return fingerprint(payload, 16)


def reference_key(config: TrainConfig) -> dict[str, Any]:
    """Everything a stored reference error depends on. Not beta, the learning rate or the batch geometry:
    those change training, not what the frozen reference predicts for a given group."""
    layout = objective_entry(config.method.name).data
    data = config.data.model_dump(mode="json", exclude={"num_workers", "validation", "cache_dir"})
    key: dict[str, Any] = {
        "version": STORE_VERSION,
        "model": config.model.model_dump(mode="json"),
        "encoders": model_fingerprint(config.model),
        "denoiser": denoiser_fingerprint(config.model.path),
        "data": data,
        "data_fingerprint": open_source(config.data, SkipReport()).fingerprint() if config.data.cache_dir is None else None,
        "cache_dir": config.data.cache_dir,
        "layout": layout,
        "seed": config.train.seed,
        "mixed_precision": config.train.mixed_precision,
        # A LoRA reference runs under accelerate's autocast, a full fine-tune's frozen copy without it.
        "autocast": config.train.mode == "lora" and config.train.mixed_precision != "no",
    }
    if layout == "captioned_pairs":  # which caption columns a captioned method reads
        key["method"] = config.method.name
    return key


def _weight_dtype(config: TrainConfig) -> torch.dtype:
    return torch.float32 if config.train.mixed_precision == "no" else parse_dtype(config.train.mixed_precision)


def _drawn_batches(config: TrainConfig, num_processes: int) -> int:
    """Micro-batches a run draws (all processes together): the store covers exactly these."""
    return config.train.max_steps * config.train.gradient_accumulation_steps * num_processes


def build_reference_errors(
    config: TrainConfig,
    folder: str | Path,
    num_processes: int = 1,
    batch_size: int = 32,
    device: str | torch.device = "cpu",
    log=print,
) -> Path:
    """Compute and store the reference errors of every group the run ``config`` will draw.

    ``num_processes``: the processes the training run will use (each draws its own batches).
    ``batch_size``: groups per inference forward (any value: each group's noise is its own).
    """
    _check_method(config)
    device = torch.device(device)
    backbone = load_backbone(config.model, load_encoders=config.data.cache_dir is None)
    data = build_training_data(config, backbone, objective_entry(config.method.name).data)
    backbone.to(device, _weight_dtype(config))
    return store_reference_errors(config, backbone, data, folder, num_processes, batch_size, device, log)


def _check_method(config: TrainConfig) -> None:
    entry = objective_entry(config.method.name)
    if not entry.build(config.method).needs_reference:  # type: ignore[arg-type]
        raise ConfigError(f"method {config.method.name} uses no reference model: there are no reference errors to compute")
    if entry.step == "sampled":
        raise ConfigError(f"method {config.method.name} samples its own images online: its reference cannot be precomputed")


def store_reference_errors(
    config: TrainConfig,
    backbone: Backbone,
    data: TrainingData,
    folder: str | Path,
    num_processes: int,
    batch_size: int,
    device: torch.device,
    log=print,
) -> Path:
    """The store of ``config``'s run from an already loaded base model (on ``device``, in the run's
    weight dtype, no adapters yet) and training data: `diffalign train` calls this in-process
    (``train.reference_errors=auto``), so the pass pays no second start-up or model load."""
    _check_method(config)
    weight_dtype = _weight_dtype(config)
    reference = FrozenCopyReference(backbone.denoiser)
    drawn = _drawn_batches(config, num_processes)
    sampler = EpochBatchSampler(len(data.dataset), config.train.batch_size, config.train.seed, shuffle=True, drop_last=True)
    keys = _first_keys(sampler, drawn)
    log(f"diffalign: reference errors of {len(keys)} groups ({drawn} batches of {config.train.batch_size}) "
        f"for {config.train.max_steps} steps, {batch_size} groups per forward")
    seeds, errors = _compute(config, backbone, reference, data, keys, batch_size, weight_dtype, device)
    manifest = {
        "format": STORE_FORMAT,
        "format_version": STORE_VERSION,
        "key": reference_key(config),
        "coverage": _coverage(config, num_processes) | {"groups": len(seeds)},
        "skipped": data.report.to_dict(),
    }
    with staged_folder(Path(folder)) as staging:
        save_file({"noise_seed": seeds, "errors": errors}, str(staging / ERRORS_FILE))
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return Path(folder)


def _coverage(config: TrainConfig, num_processes: int) -> dict[str, int]:
    return {"max_steps": config.train.max_steps, "batch_size": config.train.batch_size,
            "gradient_accumulation_steps": config.train.gradient_accumulation_steps, "num_processes": num_processes}


def stored_reference_covers(folder: str | Path, config: TrainConfig, num_processes: int) -> bool:
    """Whether ``folder`` holds a current store (same key) for every group this run draws: what
    ``train.reference_errors=auto`` reuses (a resume) instead of computing again."""
    try:
        store = ReferenceErrors(folder, config)
    except (OSError, ValueError):  # none yet, stale (a ConfigError), or unreadable: computed again
        return False
    wanted = _coverage(config, num_processes)
    same_geometry = all(store.coverage.get(name) == value for name, value in wanted.items() if name != "max_steps")
    return same_geometry and int(store.coverage["max_steps"]) >= config.train.max_steps


def _first_keys(sampler: EpochBatchSampler, batches: int) -> list[tuple[int, int]]:
    keys: list[tuple[int, int]] = []
    for count, batch in enumerate(sampler):
        if count == batches:
            break
        keys.extend(batch)
    return keys


@torch.inference_mode()
def _compute(
    config: TrainConfig, backbone: Backbone, reference: FrozenCopyReference, data: TrainingData,
    keys: list[tuple[int, int]], batch_size: int, weight_dtype: torch.dtype, device: torch.device,
) -> tuple[Tensor, Tensor]:
    """The training step's own reference path (prepare_groups -> draw_noise -> group_errors), batched."""
    from tqdm.auto import tqdm

    autocast = (
        torch.autocast(device.type, dtype=weight_dtype)
        if config.train.mode == "lora" and weight_dtype != torch.float32 else contextlib.nullcontext()
    )
    seeds: list[int] = []
    errors: list[Tensor] = []
    for start in tqdm(range(0, len(keys), batch_size), desc="reference errors", unit="batch", leave=False):
        batch = data.collate([data.dataset[key] for key in keys[start:start + batch_size]])
        data.usable(batch)  # records undecodable rows, as training does
        if not batch["noise_seeds"]:
            continue
        batch = _to_device(batch, device)
        groups, generators = prepare_groups(backbone, batch, config.data.resolution, config.data.empty_prompt_prob)
        eps, timesteps = draw_noise(groups, backbone, generators)
        with autocast:
            group_error = group_errors(backbone, reference, groups, eps, timesteps, dtype=weight_dtype)
        seeds.extend(int(seed) for seed in batch["noise_seeds"])
        errors.append(group_error.float().cpu())
    if not errors:
        raise ConfigError("no usable group to compute reference errors for: every drawn row failed to decode")
    return torch.tensor(seeds, dtype=torch.int64), torch.cat(errors)


def _to_device(batch: dict, device: torch.device) -> dict:
    def move(value: Any) -> Any:
        if isinstance(value, Tensor):
            return value.to(device)
        if isinstance(value, dict):
            return {key: move(item) for key, item in value.items()}
        return value

    return {key: move(value) for key, value in batch.items()}


AUTO = "auto"  # train.reference_errors=auto: computed by `diffalign train` itself, before its first step
AUTO_FOLDER = "reference_errors"  # ... into this folder of the run's output_dir


class ReferenceErrors:
    """A checked store: the reference errors [G, K] of a batch, by its groups' noise seeds."""

    def __init__(self, folder: str | Path, config: TrainConfig) -> None:
        self.folder = Path(folder)
        manifest_file = self.folder / MANIFEST
        if not manifest_file.is_file():
            raise FileNotFoundError(
                f"train.reference_errors={self.folder} holds no reference errors ({MANIFEST} missing); "
                f"compute them with `diffalign reference-errors CONFIG [overrides]`"
            )
        manifest = json.loads(manifest_file.read_text())
        if manifest.get("format") != STORE_FORMAT:
            raise ConfigError(f"train.reference_errors={self.folder} is not a diffalign reference-errors folder")
        expected, stored = reference_key(config), manifest.get("key", {})
        changed = [f"{name} (store: {stored.get(name)!r}, config: {value!r})" for name, value in expected.items() if stored.get(name) != value]
        if changed:
            raise StaleReferenceErrorsError(
                f"reference errors in {self.folder} are stale: " + "; ".join(changed)
                + ". Recompute them with `diffalign reference-errors CONFIG [overrides]`."
            )
        self.coverage = manifest["coverage"]
        tensors = load_file(str(self.folder / ERRORS_FILE))
        self._row = {int(seed): row for row, seed in enumerate(tensors["noise_seed"].tolist())}
        self._errors = tensors["errors"]

    def __len__(self) -> int:
        return len(self._row)

    def lookup(self, noise_seeds: list[int], device: torch.device | str = "cpu") -> Tensor:
        """[G, K] float32 errors of these groups, in order; a group the store lacks stops the run."""
        try:
            rows = [self._row[int(seed)] for seed in noise_seeds]
        except KeyError:
            covered = self.coverage
            raise MissingReferenceErrorsError(
                f"the reference errors in {self.folder} cover the groups of a run of {covered['max_steps']} steps x "
                f"{covered['batch_size']} groups x {covered['gradient_accumulation_steps']} accumulation x "
                f"{covered['num_processes']} processes; this run drew a group outside them (a longer run, or another "
                f"batch size, accumulation or process count). Recompute them with `diffalign reference-errors` and this "
                f"run's config and --num-processes."
            ) from None
        return self._errors[rows].to(device)
