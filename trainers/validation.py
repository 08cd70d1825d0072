"""Validation images: fixed prompts and seeds, sampled from the reference once and the policy as it trains.

Why here and not a pipeline: the loop already holds the policy (LoRA adapters or the full network),
the reference and the backbone's encoders, so the diffalign sampler (:mod:`diffalign.sampling`) draws
them without loading a second copy of the model. Each image has its own generator seeded by its seed,
so the training RNG stream is untouched (exact resume holds with validation on) and a grid at step N
is comparable with the reference and with step 0 image for image.

Sampling is deterministic DDIM (Euler for flow models) with optional classifier-free guidance; only
the main process samples (under DDP the others wait at the next gradient all-reduce).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Callable

import PIL.Image
import torch
from torch import Tensor, nn

from diffalign.atomic import staged_file
from diffalign.backbones import Backbone, Conditioning
from diffalign.prediction import Network, predict
from diffalign.sampling import generate_images, sampling_conditioning, to_pil

from .config import TrainConfig, ValidationSection
from .trackers import log_images

Scorer = Callable[[list[PIL.Image.Image], list[str]], Any]  # -> [N] scores, higher is better
REFERENCE_GRID = "reference.png"


class GuidedNetwork:
    """Classifier-free guidance around a network (a Predictor): ``u + g (c - u)`` on the prediction.

    Guidance is linear in the network's output, so it applies alike to epsilon, v and flow velocity
    (what diffusers' pipelines do). The unconditional half is the empty prompt.
    """

    def __init__(self, network: Network, unconditional: Conditioning, scale: float) -> None:
        self.network, self.unconditional, self.scale = network, unconditional, scale

    def predict(self, backbone: Backbone, noisy: Tensor, timesteps: Tensor, conditioning: Conditioning) -> Tensor:
        both = {
            key: torch.cat([value, self.unconditional[key].to(value.device, value.dtype)]) for key, value in conditioning.items()
        }
        output = predict(backbone, self.network, torch.cat([noisy, noisy]), torch.cat([timesteps, timesteps]), both)
        conditional, unconditional = output.chunk(2)
        return unconditional + self.scale * (conditional - unconditional)


def image_grid(images: Sequence[PIL.Image.Image], columns: int) -> PIL.Image.Image:
    """Images (row-major, equal sizes) pasted into rows of ``columns``."""
    width, height = images[0].size
    rows = math.ceil(len(images) / columns)
    grid = PIL.Image.new("RGB", (columns * width, rows * height))
    for index, image in enumerate(images):
        grid.paste(image, ((index % columns) * width, (index // columns) * height))
    return grid


class Validator:
    """Samples the validation grids of one run into ``output_dir/validation`` and logs them."""

    def __init__(
        self, section: ValidationSection, resolution: int, backbone: Backbone, output_dir: Path,
        weight_dtype: torch.dtype, scorer: Scorer | None = None,
    ) -> None:  # fmt: skip
        self.section, self.backbone, self.scorer, self.weight_dtype = section, backbone, scorer, weight_dtype
        self.resolution = section.resolution or resolution
        self.folder = Path(output_dir) / "validation"
        # Row-major grid: one row per prompt, one column per seed.
        self.prompts = [prompt for prompt in section.prompts for _ in section.seeds]
        self.seeds = [seed for _ in section.prompts for seed in section.seeds]

    @classmethod
    def for_run(
        cls, config: TrainConfig, accelerator: Any, backbone: Backbone, weight_dtype: torch.dtype, scorer: Scorer | None
    ) -> Validator | None:
        """The run's validator on the main process when ``validation`` is active on this device, else None."""
        section, device = config.validation, accelerator.device.type
        if not accelerator.is_main_process:
            return None
        if section.prompts and not section.active(device):
            print(f"diffalign: validation images are off on the {device} (validation.enabled={section.enabled}); "
                  "validation.enabled=true samples them anyway")
        if not section.active(device):
            return None
        return cls(section, config.data.resolution, backbone, Path(config.train.output_dir), weight_dtype, scorer)

    def before_training(self, accelerator: Any, policy: nn.Module, reference: Network | None) -> dict[str, float]:
        """The reference's grid, then the policy's at step 0. Reference-free methods (MaPO): the policy before
        its first update is the base model, so it stands in for the reference."""
        if reference is None:
            scores = self.run(accelerator, policy, None)
        else:  # a frozen copy is held in the weight dtype: cast its inputs (predict's dtype)
            scores = self.run(accelerator, reference, None, self.weight_dtype)
        return scores | self.run(accelerator, policy, 0)

    def due(self, step: int, max_steps: int) -> bool:
        return step % self.section.every_n_steps == 0 or step == max_steps

    @property
    def reference_grid(self) -> Path:
        return self.folder / REFERENCE_GRID

    def step_grid(self, step: int) -> Path:
        return self.folder / f"step-{step:06d}.png"

    def sample(self, network: Network, dtype: torch.dtype | None = None) -> list[PIL.Image.Image]:
        """One image per (prompt, seed), prompt by prompt (bounded memory), in eval mode and without gradients."""
        module = network if isinstance(network, nn.Module) else getattr(network, "network", None)
        was_training = module.training if isinstance(module, nn.Module) else False
        if isinstance(module, nn.Module):
            module.eval()
        images: list[PIL.Image.Image] = []
        try:
            with torch.no_grad():
                for start in range(0, len(self.prompts), len(self.section.seeds)):
                    prompts = self.prompts[start : start + len(self.section.seeds)]
                    seeds = self.seeds[start : start + len(self.section.seeds)]
                    guided: Network = network
                    if self.section.guidance_scale != 1.0:
                        empty = sampling_conditioning(self.backbone, [""] * len(prompts), self.resolution)
                        guided = GuidedNetwork(network, empty, self.section.guidance_scale)
                    pixels = generate_images(
                        self.backbone, guided, prompts, self.resolution, seeds,
                        num_steps=self.section.num_inference_steps, eta=0.0, dtype=dtype,
                    )  # fmt: skip
                    images.extend(to_pil(pixels))
        finally:
            if was_training and isinstance(module, nn.Module):
                module.train()
        return images

    def run(self, accelerator: Any, network: Network, step: int | None, dtype: torch.dtype | None = None) -> dict[str, float]:
        """Sample ``network``, save its grid (``step=None``: the reference's) and log it; returns the score metrics."""
        with accelerator.autocast():
            images = self.sample(network, dtype)
        path = self.reference_grid if step is None else self.step_grid(step)
        self.folder.mkdir(parents=True, exist_ok=True)
        with staged_file(path) as temporary:
            image_grid(images, len(self.section.seeds)).save(temporary, format="PNG")
        key = "validation/reference" if step is None else "validation/policy"
        log_images(accelerator, key, images, self.prompts, step or 0)
        if self.scorer is None:
            return {}
        scores = torch.as_tensor(self.scorer(images, self.prompts), dtype=torch.float32).flatten()
        if scores.numel() != len(images) or not torch.isfinite(scores).all():
            raise ValueError(f"validation.scorer returned {scores.numel()} scores for {len(images)} images (or a non-finite one)")
        return {"validation/reference_score" if step is None else "validation/score": float(scores.mean())}
