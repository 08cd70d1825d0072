"""Toy "models" for the arena: image folders with manifests, in the layout ``diffalign generate`` writes.

Why: the arena, its tests, its load benchmark and a demo need several models' images of the
same prompts without sampling a diffusion model. Each toy model renders the toy world's
prompts its own way -- ``truth`` follows the prompt, ``wrong-colour`` paints the wrong colour,
``degraded`` blurs and noises the right picture -- so there is a known best model.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from diffalign.atomic import staged_folder
from diffalign.toy.world import ToyWorldSpec, caption, degrade, draw_other, render

__all__ = ["TOY_MODELS", "write_toy_source", "write_toy_sources"]

TOY_MODELS = ("truth", "wrong-colour", "degraded")


def write_toy_source(folder: str | Path, model: str, seeds_per_prompt: int = 1, seed: int = 0,
                     spec: ToyWorldSpec = ToyWorldSpec()) -> Path:
    """``folder/images/*.png`` and ``folder/manifest.jsonl`` for every toy prompt × ``seeds_per_prompt``."""
    if model not in TOY_MODELS:
        raise ValueError(f"unknown toy model {model!r}; valid: {', '.join(TOY_MODELS)}")
    folder = Path(folder)
    with staged_folder(folder) as staging:
        (staging / "images").mkdir()
        lines = []
        for p, (colour, shape) in enumerate((c, s) for c in spec.colour_names for s in spec.shapes):
            for k in range(seeds_per_prompt):
                rng = np.random.default_rng([seed, p, k])  # same geometry for every model at (prompt, k)
                shown = draw_other(spec.colour_names, colour, np.random.default_rng([seed, p, k, 1])) if model == "wrong-colour" else colour
                image = render(shown, shape, rng, spec)
                if model == "degraded":
                    image = degrade(image, rng, spec)
                name = f"images/{p:05d}_{k:02d}.png"
                image.save(staging / name)
                lines.append(json.dumps({"image": name, "prompt": caption(colour, shape), "model": model, "seed": k}))
        (staging / "manifest.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder / "manifest.jsonl"


def write_toy_sources(root: str | Path, models: tuple[str, ...] = TOY_MODELS, seeds_per_prompt: int = 1,
                      seed: int = 0) -> dict[str, Path]:
    """One toy source per model under ``root/<model>``; ``{model: manifest path}``."""
    return {model: write_toy_source(Path(root) / model, model, seeds_per_prompt, seed) for model in models}
