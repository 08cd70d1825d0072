"""The training recipe: model + data (core sections) + method + train + lora.

``method`` is validated by the chosen Objective's own config class, so each
method owns its hyperparameters and their help text; an unknown key there is
reported as ``method.<key>`` with the file's name, like everywhere else.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field, SerializeAsAny, field_validator, model_validator

from diffalign.config import (
    ConfigError,
    DataConfig,
    ModelConfig,
    StrictModel,
    read_config,
    validate_section,
)

from .objectives import objective_entry
from .trackers import TRACKER_NAMES, check_tracker_names


class LoraSection(StrictModel):
    """LoRA adapters (peft) on the denoiser's attention projections."""

    rank: int = Field(8, gt=0, description="Adapter rank (DPO LoRA recipe: 8).")
    alpha: float | None = Field(None, gt=0, description="LoRA alpha; defaults to the rank (scale 1).")
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: list[str] | None = Field(
        None, description="Module names to adapt; default: the family's attention projections."
    )


class TrainSection(StrictModel):
    """Optimisation, precision, checkpointing and logging."""

    output_dir: str = Field("outputs/run", description="Checkpoints, logs, metrics.jsonl and the final weights.")
    seed: int = 0
    mode: Literal["lora", "full"] = Field("lora", description="LoRA adapters or full fine-tuning of the denoiser.")
    max_steps: int = Field(2000, gt=0, description="Optimizer steps.")
    batch_size: int = Field(1, gt=0, description="Groups (pairs) per device per micro-step.")
    gradient_accumulation_steps: int = Field(1, gt=0)
    learning_rate: float = Field(1e-5, gt=0)
    scale_lr: bool = Field(False, description="Multiply the lr by batch_size x accumulation x processes (official DPO).")
    optimizer: Literal["adamw", "adafactor", "adamw8bit"] = "adamw"
    adam_implementation: Literal["fused", "foreach", "for-loop"] = Field(
        "fused", description="AdamW's kernels: 'fused' updates every parameter in one kernel per device (CPU: 3.7x faster "
        "than the for-loop, 6.8x than foreach on a 98 M-parameter UNet, benchmarks/optimizer_step.py); the others are "
        "torch's multi-tensor and per-parameter loops. Results agree to float rounding."
    )
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    weight_decay: float = 1e-2
    lr_scheduler: Literal[
        "constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"
    ] = "constant_with_warmup"
    lr_warmup_steps: int = Field(0, ge=0)
    max_grad_norm: float | None = Field(1.0, gt=0, description="Clip the gradient norm; null logs it without clipping.")
    max_nonfinite_steps: int = Field(
        5,
        gt=0,
        description="An optimizer step whose loss or gradient norm is NaN or infinite is skipped (no update) and counted; "
        "this many in a row stop the run with an error (1: stop at the first).",
    )
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    gradient_checkpointing: bool = False
    channels_last: bool = Field(
        False, description="Keep the denoiser's convolution weights NHWC (channels_last), which oneDNN and cuDNN "
        "convolve without layout reorders; same results up to float rounding. CPU: -10 % step time (AVX2) / -4.7 % (AMX, "
        "bf16) for +7-11 % peak RSS (benchmarks/README.md)."
    )
    compile: Literal["none", "blocks", "full"] = Field(
        "none", description="torch.compile the denoiser: 'blocks' compiles its repeated transformer blocks once "
        "(regional compilation, short compile), 'full' the whole network, 'none' runs eagerly."
    )
    malloc_mmap_threshold: int | None = Field(
        None, gt=0, description="Bytes from which glibc serves an allocation with its own mapping, fixed at training "
        "start (mallopt), so freed activations return to the system instead of staying in the heap. null (default) keeps "
        "glibc's moving threshold. 131072 cut peak RSS by a third and cost about a fifth more step time on CPU (page "
        "faults; medium UNet, fp32, benchmarks/README.md): a memory lever, not a free one. No effect without glibc."
    )
    checkpointing_steps: int = Field(500, gt=0, description="Save checkpoint-{step} every N steps.")
    checkpoints_total_limit: int | None = Field(None, gt=0, description="Keep only the last K checkpoints.")
    resume_from: str | None = Field(None, description="A checkpoint folder, or 'latest' in output_dir.")
    overwrite: bool = Field(
        False,
        description="A new run in an output_dir that holds another run's checkpoints or final/ moves that run aside to "
        "<output_dir>.moved-<time> (never deletes it); without this the new run is refused.",
    )
    allow_resume_changes: bool = Field(
        False,
        description="Resume even if the batch geometry (batch size, accumulation, processes), data or method changed; "
        "the changes are recorded in run.json. Without this such a resume is refused with the list of changes.",
    )
    reference_errors: str | None = Field(
        None,
        description="'auto': compute the reference's errors for every group this run draws in this process, before the "
        "first step (inference mode, reference_batch_size groups per forward), into <output_dir>/reference_errors, "
        "reused by a resume; or a folder precomputed by `diffalign reference-errors CONFIG` (shared by a sweep over beta "
        "or the learning rate). Either way training runs only the policy (no reference forward; no frozen copy in full "
        "fine-tuning). A store computed for another model, data, seed or precision is refused with what changed.",
    )
    reference_batch_size: int = Field(
        16, gt=0, description="Groups per inference forward when train.reference_errors=auto computes the store."
    )
    log_every: int = Field(1, gt=0)
    report_to: str | list[str] = Field(
        "tensorboard",
        description="Trackers, as accelerate names them: one name or a list of "
        f"{', '.join(TRACKER_NAMES)}; 'all': every installed one; 'none': metrics.jsonl only. "
        "The whole config is logged as the run's hyperparameters.",
    )
    progress_bar: bool = True
    push_to_hub: bool = Field(
        False, description="Upload final/ (weights + model card) with huggingface_hub when training ends."
    )
    hub_model_id: str | None = Field(
        None, description="The hub repo of push_to_hub, user/name (the model card's loading code names it)."
    )
    hub_private: bool = Field(False, description="Create the push_to_hub repo as private.")

    @field_validator("report_to")
    @classmethod
    def _known_trackers(cls, value: str | list[str]) -> str | list[str]:
        return check_tracker_names(value)

    @model_validator(mode="after")
    def _push_names_its_repo(self) -> "TrainSection":
        if self.push_to_hub and not (self.hub_model_id and "/" in self.hub_model_id):
            raise ValueError(f"train.push_to_hub=true needs train.hub_model_id=user/name (got {self.hub_model_id!r})")
        return self

    @field_validator("mixed_precision", mode="before")
    @classmethod
    def _yaml_no_is_false(cls, value: Any) -> Any:
        # YAML 1.1 reads a bare `no` as False; accelerate's spelling is the string "no".
        return "no" if value is False else value


class ValidationSection(StrictModel):
    """Validation images: fixed prompts and seeds sampled from the policy during training.

    Runs when ``prompts`` is not empty and ``enabled`` says so (``auto``: on a GPU, not on the CPU,
    where the GPU recipes' 25-step guided samples of every prompt would cost more than a tiny
    trial's training). The reference (the base model) is sampled once before the first step into
    ``validation/reference.png``; the policy at step 0, every ``every_n_steps`` and at the last
    step into ``validation/step-NNNNNN.png`` (one row per prompt, one column per seed), and each
    grid is logged to every tracker.
    """

    enabled: bool | Literal["auto"] = Field(
        "auto", description="true / false, or auto: sample the prompts when the run is on a GPU, not on the CPU."
    )
    prompts: list[str] = Field(default_factory=list, description="Prompts to sample; empty: no validation.")
    seeds: list[int] = Field([0], min_length=1, description="One image per prompt and seed (the grid's columns).")
    every_n_steps: int = Field(200, gt=0, description="Sample every N optimizer steps (diffusers' DPO script: 200).")
    num_inference_steps: int = Field(25, gt=0, description="Deterministic DDIM (flow: Euler) steps.")
    guidance_scale: float = Field(
        1.0, ge=1.0, description="Classifier-free guidance scale; 1: unguided (distilled models)."
    )
    resolution: int | None = Field(None, gt=0, description="Image size; default: data.resolution.")
    scorer: str | None = Field(
        None, description="A diffalign scorer (hpsv2, pickscore, ...) that scores every grid: validation/score."
    )
    scorer_weights: str | None = Field(None, description="Local weights file or folder of the scorer.")

    @model_validator(mode="after")
    def _enabled_needs_prompts(self) -> "ValidationSection":
        if self.enabled is True and not self.prompts:
            raise ValueError("validation.enabled=true needs validation.prompts (a list of prompts to sample)")
        return self

    def active(self, device_type: str) -> bool:
        """Whether a run on ``device_type`` ("cpu", "cuda", ...) samples validation images."""
        return bool(self.prompts) and (self.enabled is True or (self.enabled == "auto" and device_type != "cpu"))


class TrainConfig(StrictModel):
    """A whole training recipe."""

    model: ModelConfig
    data: DataConfig
    method: SerializeAsAny[BaseModel]
    train: TrainSection = TrainSection()
    lora: LoraSection = LoraSection()
    validation: ValidationSection = ValidationSection()

    @field_validator("method", mode="before")
    @classmethod
    def _method_is_validated_by_loader(cls, value: Any) -> Any:
        if not isinstance(value, BaseModel):
            raise ValueError("build TrainConfig with load_train_config (method needs its objective's schema)")
        return value

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def train_config_from_dict(data: dict[str, Any], source: str) -> TrainConfig:
    """Validate a recipe mapping; errors name ``source`` and the dotted key."""
    data = dict(data)
    method = data.pop("method", None)
    if not isinstance(method, dict) or "name" not in method:
        raise ConfigError(f"invalid configuration in {source}:\n  method.name: required key is missing")
    try:
        entry = objective_entry(str(method["name"]))
    except KeyError as error:
        raise ConfigError(f"invalid configuration in {source}:\n  method.name: {error.args[0]}") from None
    method_config = validate_section(entry.config_class, method, source, prefix="method.")
    for key in ("model", "data"):
        if key not in data:
            raise ConfigError(f"invalid configuration in {source}:\n  {key}: required section is missing")
    data["method"] = method_config
    return validate_section(TrainConfig, data, source)


def load_train_config(path: str | Path | None, overrides: list[str] | None = None) -> TrainConfig:
    """Read a YAML recipe, apply ``key=value`` overrides, validate every section."""
    data, source = read_config(path, overrides)
    return train_config_from_dict(data, source)
