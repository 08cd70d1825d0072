"""``final/README.md``: a diffusers-style model card of a finished run.

YAML front matter the Hub reads (base model, library, tags, data set, license), then what was
trained, on what, with which settings, the final metrics, and the diffusers code that loads exactly
what :mod:`.export` wrote. Metadata the Hub would reject is left out rather than guessed: a base
model or data set that is a local folder is named in the body only, and a license only when the
base model's is known.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from diffalign.backbones import Backbone

from .config import TrainConfig

LORA_WEIGHTS = "pytorch_lora_weights.safetensors"  # what the pipelines' save_lora_weights writes
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# Licenses of the common base models, as their hub cards declare them.
KNOWN_LICENSES = {
    "runwayml/stable-diffusion-v1-5": "creativeml-openrail-m",
    "stable-diffusion-v1-5/stable-diffusion-v1-5": "creativeml-openrail-m",
    "CompVis/stable-diffusion-v1-4": "creativeml-openrail-m",
    "stabilityai/stable-diffusion-2-1": "openrail++",
    "stabilityai/stable-diffusion-2-1-base": "openrail++",
    "stabilityai/stable-diffusion-xl-base-1.0": "openrail++",
    "stabilityai/sdxl-turbo": "other",
    "stabilityai/stable-diffusion-3-medium-diffusers": "other",
    "stabilityai/stable-diffusion-3.5-medium": "other",
    "stabilityai/stable-diffusion-3.5-large": "other",
}


def looks_like_hub_id(name: str) -> bool:
    """``user/name`` that is not a folder on this machine."""
    return bool(HUB_ID.match(name)) and not Path(name).expanduser().exists()


def front_matter(config: TrainConfig) -> dict[str, Any]:
    """The card's metadata (the Hub's model-card fields)."""
    meta: dict[str, Any] = {}
    if looks_like_hub_id(config.model.path):
        meta["base_model"] = config.model.path
    meta["library_name"] = "diffusers"
    if config.model.path in KNOWN_LICENSES:
        meta["license"] = KNOWN_LICENSES[config.model.path]
    meta["tags"] = ["diffalign", config.method.name, "text-to-image", "diffusers", config.train.mode]
    if config.train.mode == "lora":
        meta["tags"].append("diffusers-training")
    data_path = str(config.data.path or "")
    if looks_like_hub_id(data_path):
        meta["datasets"] = [data_path]
    return meta


def loading_code(config: TrainConfig, backbone: Backbone, denoiser_class: str, location: str) -> str:
    """The diffusers code that loads what save_final wrote from ``location`` (a hub repo or a folder)."""
    base = config.model.path
    dtype = "torch.bfloat16" if config.train.mixed_precision == "bf16" else "torch.float16"
    lines = ["import torch", f"from diffusers import {backbone.pipeline_class_name}"]
    if config.train.mode == "lora":
        lines += [
            "",
            f'pipe = {backbone.pipeline_class_name}.from_pretrained("{base}", torch_dtype={dtype}).to("cuda")',
            f'pipe.load_lora_weights("{location}", weight_name="{LORA_WEIGHTS}")',
        ]
    else:
        folder = backbone.denoiser_subfolder
        lines[1] += f", {denoiser_class}"
        lines += [
            "",
            f'{folder} = {denoiser_class}.from_pretrained("{location}", subfolder="{folder}", torch_dtype={dtype})',
            f'pipe = {backbone.pipeline_class_name}.from_pretrained("{base}", {folder}={folder}, torch_dtype={dtype}).to("cuda")',
        ]
    prompt = config.validation.prompts[0] if config.validation.prompts else "a photo of an astronaut riding a horse"
    lines.append(f"image = pipe({prompt!r}).images[0]")
    return "\n".join(lines)


def render_model_card(
    config: TrainConfig, backbone: Backbone, denoiser_class: str, steps: int, final_metrics: dict[str, Any], location: str,
) -> str:  # fmt: skip
    """The whole README.md text."""
    run = config.train
    method = config.method.model_dump(mode="json")
    settings = {
        "mode": run.mode, "steps": steps, "batch size per device": run.batch_size,
        "gradient accumulation": run.gradient_accumulation_steps, "learning rate": run.learning_rate,
        "scale lr": run.scale_lr, "optimizer": run.optimizer, "lr scheduler": run.lr_scheduler,
        "warmup steps": run.lr_warmup_steps, "mixed precision": run.mixed_precision, "resolution": config.data.resolution,
        "seed": run.seed,
    }  # fmt: skip
    if run.mode == "lora":
        settings.update({"lora rank": config.lora.rank, "lora alpha": config.lora.alpha or config.lora.rank})
    settings.update({f"method.{key}": value for key, value in method.items() if key != "name"})
    metrics = {key: value for key, value in final_metrics.items() if key != "step"}
    kind = "LoRA adapters for" if run.mode == "lora" else "A fine-tune of"
    body = [
        f"# {config.method.name} on {config.model.path}",
        "",
        f"{kind} `{config.model.path}` ({backbone.family}), trained with **{config.method.name}** by "
        f"diffalign on preference data `{config.data.path}` for {steps} steps.",
        "",
        "## Use with diffusers",
        "",
        "```python",
        loading_code(config, backbone, denoiser_class, location),
        "```",
        "",
        "## Training settings",
        "",
        "| setting | value |",
        "|---|---|",
        *(f"| {key} | {value} |" for key, value in settings.items()),
        "",
        f"## Final metrics (step {final_metrics.get('step', steps)})",
        "",
        *(["| metric | value |", "|---|---|", *(f"| {key} | {value:.6g} |" if isinstance(value, float) else f"| {key} | {value} |"
                                              for key, value in metrics.items())] if metrics else ["No metrics were logged."]),
        "",
        "The whole recipe is the run folder's `config.yaml`; `diffalign.json` here records the base model and mode.",
        "",
    ]  # fmt: skip
    return "---\n" + yaml.safe_dump(front_matter(config), sort_keys=False) + "---\n\n" + "\n".join(body)
