"""A tiny CLIP reward model, saved in the transformers CLIPModel + processor format the CLIP scorers read.

Why here: ``load_scorer("clipscore" | "clipscore-100" | "pickscore", weights=FOLDER)`` loads a CLIP through
``from_pretrained``; the scorer tests, the recipe walk (online PSO's reward) and the README's offline walk
(``diffalign tiny clip OUT``) all need one without the hub, and should share one builder.
"""

from __future__ import annotations

import os
from pathlib import Path

from diffalign.tiny.pipelines import save_clip

__all__ = ["TINY_CLIP_IMAGE_SIZE", "TINY_CLIP_TOWER", "save_tiny_clip"]

# Both towers: 2 layers of width 32 (about 60k parameters); the vision tower sees 32-pixel crops in 8-pixel patches.
TINY_CLIP_TOWER: dict[str, int] = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}
TINY_CLIP_IMAGE_SIZE = 32
_PATCH_SIZE = 8
_PROJECTION_DIM = 32


def save_tiny_clip(path: str | os.PathLike, seed: int = 0, logit_scale: float | None = None) -> Path:
    """Save a random-weight tiny CLIP (model, local tokenizer, 32-pixel CLIP processor) to ``path``; return it.

    ``logit_scale`` (None: CLIP's initial log(1/0.07)) sets the model's learned temperature, which PickScore
    multiplies its scores by. Refuses a non-empty ``path`` (FileExistsError); written atomically.
    """
    vision = dict(TINY_CLIP_TOWER, image_size=TINY_CLIP_IMAGE_SIZE, patch_size=_PATCH_SIZE)
    return save_clip(path, vision, dict(TINY_CLIP_TOWER), projection_dim=_PROJECTION_DIM, seed=seed, logit_scale=logit_scale)
