"""Typed, validated configuration: YAML files plus ``key=value`` overrides.

Why pydantic with ``extra="forbid"``: a typo in a recipe (``lerning_rate``)
must be an error naming the key and the file, never a silently ignored
setting. Sections that belong to the core (model, data) live here; the
training sections live in :mod:`diffalign.trainers.config` and reuse the
loader and error formatting below.
"""

from __future__ import annotations

import os

from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

ModelT = TypeVar("ModelT", bound=BaseModel)


class ConfigError(ValueError):
    """A configuration problem, phrased for the person who wrote the file."""


class StrictModel(BaseModel):
    """Base for every config section: unknown keys are errors, fields are typed, numbers are finite."""

    # coerce_numbers_to_str: `model.path=12345` or `data.split=2024` from the command line stay strings.
    # allow_inf_nan=False: YAML reads `.inf` and `.nan` as floats, and `method.beta=.inf` or a NaN learning
    # rate passes every `gt=0` bound (inf > 0; NaN compares false both ways) only to poison the weights later.
    model_config = ConfigDict(
        extra="forbid", validate_assignment=True, protected_namespaces=(), coerce_numbers_to_str=True, allow_inf_nan=False
    )


class ModelConfig(StrictModel):
    """Which base model to align, and how its noise process is read."""

    path: str = Field(description="Hub id (e.g. stable-diffusion-v1-5/stable-diffusion-v1-5) or a local diffusers folder.")
    family: Literal["auto", "sd", "sdxl", "sd3"] = Field(
        "auto", description="Model family; 'auto' reads model_index.json (sd covers SD 1.x and 2.x)."
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit).")
    variant: str | None = Field(None, description="Weight variant on the hub, e.g. 'fp16'.")
    timestep_mode: Literal["uniform", "distilled"] = Field(
        "uniform",
        description="'distilled' maps t to 250*(t mod 4)+249 for Turbo-style few-step models (DDPM only).",
    )
    zero_terminal_snr: bool = Field(
        False,
        description="DDPM: rescale the schedule to zero terminal SNR (Lin et al. 2024), as the reference DPO scripts do "
        "for SDXL-Turbo; used by training, the few-step sampler and PSO's reference images alike.",
    )
    flow_weighting: Literal["logit_normal", "uniform", "mode"] = Field(
        "logit_normal", description="Rectified flow: density of the training timesteps (SD3 recipe: logit_normal)."
    )
    flow_logit_mean: float = 0.0
    flow_logit_std: float = 1.0
    flow_mode_scale: float = 1.29
    use_t5: bool = Field(True, description="SD3: use the T5 encoder when the model has one (False drops it, as the SD3 pipeline allows).")
    max_sequence_length: int = Field(256, gt=0, description="SD3: T5 token length (the pipeline's default is 256).")
    attention: Literal["sdpa", "xformers"] = Field(
        "sdpa", description="Attention kernel: PyTorch SDPA (default) or xformers (install the xformers extra)."
    )


class DataConfig(StrictModel):
    """Where the preference data is and how images are prepared."""

    # `validate` is the key users write, but a field of that name would shadow BaseModel.validate.
    model_config = ConfigDict(validate_by_name=True, validate_by_alias=True, serialize_by_alias=True)

    path: str = Field(description="Parquet file/folder, save_to_disk folder, JSONL manifest, or hub dataset id.")
    format: Literal["auto", "pickapic", "jsonl", "ranked"] = Field(
        "auto",
        description="Reader: 'pickapic' pairs (parquet), 'jsonl' pairs, 'ranked' lists of k scored images "
        "per prompt (parquet or JSONL); 'auto' detects ranked data by its images/scores fields.",
    )
    split: str = "train"
    resolution: int = Field(512, gt=0, description="Square training resolution in pixels.")
    center_crop: bool = Field(True, description="Centre crop (True) or one random crop per group (False).")
    sdxl_size_conditioning: Literal["official", "first_image", "per_image"] = Field(
        "official",
        description="SDXL micro-conditioning (time ids) of each image: 'official' = [res, res, 0, 0, res, res] for every "
        "image, as the official DiffusionDPO code (matches how images are sampled; tells the model nothing about "
        "the photo); 'first_image' = image 0's size and crop for the whole group, as diffusers' DPO/MaPO scripts; "
        "'per_image' = each image's own size and crop (winner and loser then differ in conditioning too).",
    )
    random_flip: bool = Field(True, description="Flip a whole group horizontally with probability 0.5.")
    drop_ties: bool = Field(True, description="Drop tie rows (label 0.5); they are counted and reported.")
    empty_prompt_prob: float = Field(
        0.0, ge=0.0, le=1.0, description="Replace a group's prompt by '' with this probability (official DPO: 0.2)."
    )
    max_rows: int | None = Field(None, gt=0, description="Use only the first N rows (debugging).")
    cache_dir: str | None = Field(None, description="Precomputed latents/embeddings from `diffalign cache`.")
    num_workers: Annotated[int, Field(ge=0)] | Literal["auto"] = Field(
        "auto",
        description="DataLoader worker processes that decode and transform images while the model steps. 'auto': "
        "none with a latent cache (nothing to decode), else min(4, CPU cores - 1) -- one on a 2-core machine.",
    )
    jpeg_draft: bool = Field(
        True,
        description="Decode JPEGs at the smallest 1/2, 1/4 or 1/8 scale whose shorter side still covers data.resolution "
        "(libjpeg's DCT scaling): a 1024 px photo for 256 px training decodes at 256 px. SDXL's size conditioning "
        "and the crop keep the full image's size. false: always decode at full size, then resize.",
    )
    validation: Literal["lazy", "full"] = Field(
        "lazy",
        alias="validate",
        description="'lazy': bad images are found when a batch decodes them (each reported once); 'full': decode "
        "every row before training, as `diffalign data check` does, and train on the good rows only.",
    )

    def loader_workers(self, reads_cache: bool) -> int:
        """DataLoader workers (``num_workers``, 'auto' resolved for this machine) for a loader that reads
        the latent cache (``reads_cache``) or decodes images (training without a cache, building one)."""
        if self.num_workers != "auto":
            return int(self.num_workers)
        if reads_cache:
            return 0  # cached tensors: a worker would only copy them between processes
        return max(1, min(4, (os.cpu_count() or 2) - 1))


def _format_location(loc: tuple[Any, ...]) -> str:
    return ".".join(str(part) for part in loc) or "<root>"


def format_validation_error(error: ValidationError, source: str, prefix: str = "") -> str:
    """Turn pydantic's report into lines that name the file and the dotted key."""
    lines = [f"invalid configuration in {source}:"]
    for item in error.errors():
        key = prefix + _format_location(item["loc"])
        if item["type"] == "extra_forbidden":
            lines.append(f"  {key}: unknown key")
        elif item["type"] == "missing":
            lines.append(f"  {key}: required key is missing")
        else:
            lines.append(f"  {key}: {item['msg']} (got {item.get('input')!r})")
    return "\n".join(lines)


def validate_section(model: type[ModelT], data: Any, source: str, prefix: str = "") -> ModelT:
    """Validate ``data`` into ``model`` or raise ConfigError naming ``source`` and the key."""
    try:
        return model.model_validate(data)
    except ValidationError as error:
        raise ConfigError(format_validation_error(error, source, prefix)) from None


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping; a missing file or a non-mapping is a clear error."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path} (and no shipped recipe has that name; `diffalign recipes` lists them)")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"{path} is not valid YAML: {error}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of sections at its top level, got {type(data).__name__}")
    return data


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides; values are parsed as YAML scalars (``3``, ``true``, ``null``)."""
    for override in overrides:
        if "=" not in override:
            raise ConfigError(f"override {override!r} must look like key.path=value")
        dotted, raw = override.split("=", 1)
        keys = dotted.strip().split(".")
        if not all(keys):
            raise ConfigError(f"override {override!r} has an empty key")
        node = data
        for key in keys[:-1]:
            child = node.setdefault(key, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {override!r}: {key} is a value, not a section")
            node = child
        node[keys[-1]] = yaml.safe_load(raw) if raw.strip() else ""
    return data


def read_config(path: str | Path | None, overrides: list[str] | None = None) -> tuple[dict[str, Any], str]:
    """A YAML recipe with ``key=value`` overrides applied, and how to name it in errors."""
    if path is not None:
        from diffalign import recipes  # the shipped recipes: `sdxl/dpo` works from any folder

        path = recipes.resolve(path)
    data = read_yaml(path) if path is not None else {}
    data = apply_overrides(data, list(overrides or []))
    source = str(path) if path is not None else "command-line overrides"
    if overrides:
        source += f" (with overrides {' '.join(overrides)})"
    return data, source
