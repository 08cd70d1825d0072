"""Offline PSO's reference images: sampled once from the *initial* distilled model, cached on disk.

Each training row (its best image and prompt) is paired with one image the initial model
draws for that prompt with its own few-step sampler (the distilled timesteps
999/749/499/249 for a Turbo-style model). The pairs are written as a JSONL pairs manifest
(``chosen`` = training image, ``rejected`` = reference image) inside a folder keyed by
everything the images depend on -- the data, the model's weights, the sampler settings, the
seed and the resolution -- so a second run (or a resumed one) reuses them, and another
model or setting gets its own folder. The folder is written atomically.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from diffalign.atomic import staged_folder
from diffalign.backbones import DENOISER_SUBFOLDERS, Backbone
from diffalign.cache import model_fingerprint
from diffalign.data import BadRowError, SkipReport, derive_seed, open_source
from diffalign.fingerprint import fingerprint
from diffalign.sampling import generate_images, to_pil

from ..config import TrainConfig

MANIFEST = "pairs.jsonl"
def _weights_fingerprint(config: TrainConfig) -> str:
    """The encoders' fingerprint plus the denoiser's files: the reference images depend on both."""
    root = Path(config.model.path)
    stats: dict[str, Any] = {"encoders": model_fingerprint(config.model), "timestep_mode": config.model.timestep_mode}
    if config.model.zero_terminal_snr:  # another schedule samples other references (absent when off: old keys stay valid)
        stats["zero_terminal_snr"] = True
    for folder in DENOISER_SUBFOLDERS:
        for file in sorted((root / folder).glob("*")) if (root / folder).is_dir() else []:
            stat = file.stat()
            stats[f"{folder}/{file.name}"] = (stat.st_size, stat.st_mtime_ns)
    return fingerprint(stats, 16)


def reference_folder(config: TrainConfig, data_fingerprint: str) -> Path:
    """Where this run's reference pairs live: ``<reference_dir>/<key>``."""
    method = config.method
    root = Path(method.reference_dir) if method.reference_dir else Path(config.train.output_dir) / "pso-references"  # type: ignore[attr-defined]
    key = fingerprint(
        {
            "data": data_fingerprint,
            "max_rows": config.data.max_rows,
            "model": _weights_fingerprint(config),
            "resolution": config.data.resolution,
            "steps": method.reference_steps,  # type: ignore[attr-defined]
            "eta": method.reference_eta,  # type: ignore[attr-defined]
            "seed": method.reference_seed,  # type: ignore[attr-defined]
        },
        16,
    )
    return root / key


def ensure_reference_pairs(config: TrainConfig, backbone: Backbone, accelerator: Any = None, batch_size: int = 16) -> Path:
    """The pairs manifest of (training image, reference image); built by the main process if missing."""
    report = SkipReport()
    source = open_source(config.data, report)
    folder = reference_folder(config, source.fingerprint())
    manifest = folder / MANIFEST
    is_main = accelerator is None or accelerator.is_main_process
    if is_main and not manifest.is_file():
        device = accelerator.device if accelerator is not None else torch.device("cpu")
        _build(config, backbone, source, report, folder, device, batch_size)
    if accelerator is not None:
        accelerator.wait_for_everyone()
    return manifest


@torch.no_grad()
def _build(config: TrainConfig, backbone: Backbone, source: Any, report: SkipReport, folder: Path, device: torch.device, batch_size: int) -> None:
    method = config.method
    backbone.to(device)
    denoiser = backbone.denoiser.to(device)
    print(f"PSO: sampling {len(source)} reference images from the initial model into {folder} (once)")
    with staged_folder(folder) as staging:
        (staging / "train").mkdir()
        (staging / "reference").mkdir()
        rows: list[dict[str, str]] = []
        pending: list[tuple[str, str, Any]] = []

        def flush() -> None:
            prompts = [prompt for _, prompt, _ in pending]
            seeds = [derive_seed("pso-reference", method.reference_seed, row_id) for row_id, _, _ in pending]  # type: ignore[attr-defined]
            images = generate_images(
                backbone, denoiser, prompts, config.data.resolution, seeds,
                num_steps=method.reference_steps, eta=method.reference_eta,  # type: ignore[attr-defined]
            )
            for (row_id, prompt, image), reference in zip(pending, to_pil(images)):
                name = f"{len(rows):07d}.png"
                image.save(staging / "train" / name)
                reference.save(staging / "reference" / name)
                rows.append({"prompt": prompt, "chosen": f"train/{name}", "rejected": f"reference/{name}", "source_row": row_id})
            pending.clear()

        for index in range(len(source)):
            try:
                group = source.load(index)
            except BadRowError as error:
                report.record(source.name, error.row_id, error.reason)
                continue
            pending.append((group.row_id, group.prompt, group.images[0]))
            if len(pending) == batch_size:
                flush()
        if pending:
            flush()
        if not rows:
            raise ValueError(f"PSO: no usable training rows in {config.data.path}: {report.summary()}")
        (staging / "skipped.json").write_text(json.dumps(report.to_dict(), indent=1))
        (staging / MANIFEST).write_text("".join(json.dumps(row) + "\n" for row in rows))
    print(f"PSO: {len(rows)} reference pairs written. {report.summary()}")
