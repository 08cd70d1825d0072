"""``diffalign generate``: sample images from a base model, a LoRA or a fine-tune, with a manifest.

Why: evaluating an aligned model (``diffalign score`` / ``compare``), building
ranked lists from several models (``diffalign rank``) and the arena all start
from the same thing -- images of fixed prompts under fixed seeds, listed in a
manifest. The pipeline is stock diffusers (``DiffusionPipeline.from_pretrained``),
so what is sampled here is what a user of the exported weights gets.

Output folder (written into a staging folder, renamed into place when complete)::

    OUT/images/{prompt_idx:05d}_{sample:02d}.png
    OUT/manifest.jsonl   {"image": "images/00000_00.png", "prompt": ..., "model": ..., "seed": ...}
    OUT/generate.json    the settings, to reproduce the run

``image`` paths are relative to the manifest's folder. Every image has its own
seed, ``derive_seed(seed, prompt_idx, sample)``, and its own CPU generator, so
the batch size and the device never change which noise an image starts from.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from diffalign.atomic import staged_folder
from diffalign.data.manifest import MANIFEST_NAME
from diffalign.data.report import SkipReport
from diffalign.dtypes import parse_dtype
from diffalign.hub_access import load_errors_as

__all__ = [
    "GenerateSettings",
    "TrainedWeights",
    "detect_trained",
    "generate",
    "image_seed",
]

MANIFEST = MANIFEST_NAME
_RECORD = "diffalign.json"  # trainers.export.RECORD_FILE; read here as plain JSON


@dataclass(frozen=True)
class GenerateSettings:
    """What ``diffalign generate`` samples; ``None`` means the pipeline's own default."""

    model: str | None  # hub id or folder; None: the base model recorded in the trained folder's diffalign.json
    prompts: str
    out: str
    lora: str | None = None
    finetuned: str | None = None
    seeds_per_prompt: int = 1
    seed: int = 0
    steps: int = 30
    guidance: float | None = None
    resolution: int | None = None
    batch_size: int = 4
    device: str | None = None
    dtype: str = "fp32"
    name: str | None = None
    overwrite: bool = False
    progress: bool = True  # a bar over the batches on stderr

    def __post_init__(self) -> None:
        if self.lora is not None and self.finetuned is not None:
            raise ValueError("pass --lora or --finetuned, not both")
        for field, value in (
            ("seeds_per_prompt", self.seeds_per_prompt),
            ("steps", self.steps),
            ("batch_size", self.batch_size),
        ):
            if value < 1:
                raise ValueError(f"{field} must be >= 1, got {value}")
        if self.seeds_per_prompt > 100:
            raise ValueError(
                f"seeds_per_prompt must be <= 100 (file names keep two digits), got {self.seeds_per_prompt}"
            )
        if self.resolution is not None and self.resolution < 8:
            raise ValueError(f"resolution must be >= 8, got {self.resolution}")
        parse_dtype(self.dtype)  # a bad spelling fails here, naming the valid ones


@dataclass(frozen=True)
class TrainedWeights:
    """A trained result found on disk: a LoRA folder, or a denoiser folder of a full fine-tune."""

    kind: str  # "lora" | "full"
    folder: Path  # lora: the folder with the .safetensors; full: the denoiser's own folder
    denoiser: str | None  # full: "unet" | "transformer"
    record: dict[str, Any]  # diffalign.json when present (mode, family, base_model, method, steps)


# --------------------------------------------------------------------------- seeds and layouts


def image_seed(seed: int, prompt_idx: int, sample: int) -> int:
    """The seed of image ``(prompt_idx, sample)``: independent of batch size, sample count and device."""
    from diffalign.data.dataset import derive_seed

    return derive_seed("generate", seed, prompt_idx, sample)


def detect_trained(path: str | os.PathLike[str]) -> TrainedWeights:
    """Find what a trained folder holds: a run's output dir, its ``final/``, a LoRA folder or a denoiser folder.

    diffalign's ``final/`` layout (``trainers/export.py``): ``pytorch_lora_weights.safetensors``
    (LoRA) or ``unet/`` / ``transformer/`` (full), plus ``diffalign.json``.
    """
    from diffalign.backbones import DENOISER_SUBFOLDERS

    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such folder (expected a LoRA or fine-tuned weights folder)")
    if not (folder / _RECORD).is_file() and (folder / "final" / _RECORD).is_file():
        folder = folder / "final"  # a run's output_dir
    record = json.loads((folder / _RECORD).read_text()) if (folder / _RECORD).is_file() else {}
    for denoiser in DENOISER_SUBFOLDERS:
        if (folder / denoiser / "config.json").is_file():
            return TrainedWeights("full", folder / denoiser, denoiser, record)
    config = folder / "config.json"
    if config.is_file():  # the denoiser folder itself
        class_name = str(json.loads(config.read_text()).get("_class_name", ""))
        denoiser = "transformer" if "Transformer" in class_name else "unet"
        return TrainedWeights("full", folder, denoiser, record)
    if any(folder.glob("*.safetensors")) or any(folder.glob("*.bin")):
        return TrainedWeights("lora", folder, None, record)
    raise ValueError(f"{folder}: neither LoRA weights (*.safetensors) nor a fine-tuned unet/ or transformer/ folder")


# --------------------------------------------------------------------------- the pipeline


def _resolve_model(settings: GenerateSettings, trained: TrainedWeights | None) -> str:
    """``--model``, else the base model the trained folder's diffalign.json records."""
    if settings.model:
        return settings.model
    base = trained.record.get("base_model") if trained is not None else None
    if not base:
        raise ValueError("--model is required (no diffalign.json with a base_model in the trained folder)")
    return str(base)


def _model_name(settings: GenerateSettings, model: str, trained: TrainedWeights | None) -> str:
    """``--name``, else the base model (a hub id as is, a folder by its name) plus the trained folder's name."""
    if settings.name:
        return settings.name
    base = model if not Path(model).expanduser().exists() else Path(model).expanduser().resolve().name
    if trained is None:
        return base
    where = trained.folder.parent if trained.kind == "full" else trained.folder
    where = where.parent if where.name == "final" else where
    return f"{base}+{trained.kind}:{where.name}"


def load_pipeline(model: str, trained: TrainedWeights | None, dtype: str, device: str) -> Any:
    """The stock diffusers pipeline of ``model`` with the trained weights applied, on ``device``."""
    import diffusers
    from diffusers.utils import deprecation_utils

    # diffusers since huggingface/diffusers#14205 takes `dtype` (and warns on `torch_dtype`);
    # older releases know only `torch_dtype`.
    dtype_option = {
        "dtype" if hasattr(deprecation_utils, "_resolve_dtype") else "torch_dtype": parse_dtype(dtype)
    }
    components: dict[str, Any] = {}
    if trained is not None and trained.kind == "full":
        config = json.loads((trained.folder / "config.json").read_text())
        network_class = getattr(diffusers, config["_class_name"])
        components[trained.denoiser or "unet"] = network_class.from_pretrained(str(trained.folder), **dtype_option)
    # Components saved as absent (SD3 without T5: text_encoder_3 = [null, null]) must be passed as None.
    with load_errors_as(f"--model {model}", model, "Pass a local diffusers pipeline folder as --model."):
        index = diffusers.DiffusionPipeline.load_config(model)
        absent = {name: None for name, value in index.items() if isinstance(value, list) and value == [None, None]}
        pipeline = diffusers.DiffusionPipeline.from_pretrained(model, **dtype_option, **absent, **components)
    if trained is not None and trained.kind == "lora":
        with load_errors_as(f"--lora {trained.folder}", str(trained.folder), "Pass a run's output folder or a local LoRA folder."):
            pipeline.load_lora_weights(str(trained.folder))
    pipeline.set_progress_bar_config(disable=True)
    return pipeline.to(device)


def generate(settings: GenerateSettings, prompts: list[str]) -> Path:
    """Sample ``seeds_per_prompt`` images per prompt into ``settings.out`` (atomically); returns the folder."""
    import torch
    from tqdm.auto import tqdm

    out = Path(settings.out).expanduser()
    if out.exists() and not settings.overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite to replace it")
    trained = None
    if settings.lora is not None and not Path(settings.lora).expanduser().exists():
        trained = TrainedWeights("lora", Path(settings.lora), None, {})  # a hub id: load_lora_weights fetches it
    elif settings.lora is not None or settings.finetuned is not None:
        flag, wanted = ("--lora", "lora") if settings.lora is not None else ("--finetuned", "full")
        trained = detect_trained(settings.lora or settings.finetuned or "")
        if trained.kind != wanted:
            other = "--finetuned" if trained.kind == "full" else "--lora"
            raise ValueError(f"{flag} {trained.folder}: this folder holds {trained.kind} weights; pass it with {other}")
    model = _resolve_model(settings, trained)
    name = _model_name(settings, model, trained)
    device = settings.device or ("cuda" if torch.cuda.is_available() else "cpu")
    pipeline = load_pipeline(model, trained, settings.dtype, device)

    jobs = [(p, s) for p in range(len(prompts)) for s in range(settings.seeds_per_prompt)]
    options: dict[str, Any] = {"num_inference_steps": settings.steps, "output_type": "pil"}
    if settings.guidance is not None:
        options["guidance_scale"] = settings.guidance
    if settings.resolution is not None:
        options["height"] = options["width"] = settings.resolution
    with staged_folder(out) as staging:
        (staging / "images").mkdir()
        with (staging / MANIFEST).open("w", encoding="utf-8") as manifest:
            for start in tqdm(range(0, len(jobs), settings.batch_size), desc="generate", unit="batch", disable=not settings.progress):
                batch = jobs[start : start + settings.batch_size]
                seeds = [image_seed(settings.seed, p, s) for p, s in batch]
                # One CPU generator per image: its noise depends on its own seed only.
                generators = [torch.Generator("cpu").manual_seed(seed) for seed in seeds]
                images = pipeline(prompt=[prompts[p] for p, _ in batch], generator=generators, **options).images
                for (p, s), seed, image in zip(batch, seeds, images, strict=True):
                    relative = f"images/{p:05d}_{s:02d}.png"
                    image.save(staging / relative)
                    row = {"image": relative, "prompt": prompts[p], "model": name, "seed": seed}
                    manifest.write(json.dumps(row, ensure_ascii=False) + "\n")
        record = {
            **{key: value for key, value in asdict(settings).items() if key != "progress"},  # what made the images
            "model": model,
            "name": name,
            "device": device,
            "images": len(jobs),
            "trained": None if trained is None else {"kind": trained.kind, "folder": str(trained.folder)},
        }
        (staging / "generate.json").write_text(json.dumps(record, indent=2) + "\n")
    return out


def read_prompts(path: str, report: SkipReport) -> list[str]:
    """Prompts of a ``.txt`` (one per line) or ``.jsonl`` (``{"prompt": ...}``) file, bad lines reported."""
    from diffalign.data.prompts import PromptSource

    return list(PromptSource(path, report).prompts)
