"""Every registered scorer name loads through ``load_scorer(name, weights=...)`` from tiny local weights and scores.

The walk is driven by ``available_scorers()``: a scorer registered without a way to build its tiny
weights below fails here, so no reward model ships untested. The weights come from the same
fixtures the per-scorer tests check against step-by-step references (conftest.py); nothing downloads.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from diffalign.scorers import Scorer, available_scorers, load_scorer
from hps_checkpoint import hps_options, open_clip_options
from imagereward_checkpoint import imagereward_options
from PIL import Image

PROMPTS = ["a red circle", "two blue dogs on a green square", "a cat"]


@dataclass(frozen=True)
class TinyWeights:
    clip: Path
    aesthetic_head: Path
    hps: Path
    imagereward: dict[str, Path]


# name -> (weights, loader options) on the tiny models; one entry per registered scorer.
HOW_TO_LOAD: dict[str, Callable[[TinyWeights], tuple[Path, dict[str, object]]]] = {
    "pickscore": lambda tiny: (tiny.clip, {}),
    "clipscore": lambda tiny: (tiny.clip, {}),
    "clipscore-100": lambda tiny: (tiny.clip, {}),
    "aesthetic": lambda tiny: (tiny.clip, {"head": str(tiny.aesthetic_head)}),
    "hpsv2": lambda tiny: (tiny.hps, hps_options(tiny.hps)),
    "hpsv2.1": lambda tiny: (tiny.hps, hps_options(tiny.hps)),
    "imagereward": lambda tiny: (tiny.imagereward["weights"], imagereward_options(tiny.imagereward)),
    "openclip": lambda tiny: open_clip_options(tiny.hps),
}


def save_aesthetic_head(path: Path, embedding_dim: int) -> Path:
    """A random LAION aesthetic head under the reference Sequential's keys (Linear layers 0, 2, 4, 6, 7)."""
    generator = torch.Generator().manual_seed(0)
    dims = [embedding_dim, 1024, 128, 64, 16, 1]
    state = {}
    for index, (d_in, d_out) in zip((0, 2, 4, 6, 7), itertools.pairwise(dims), strict=True):
        state[f"layers.{index}.weight"] = torch.randn(d_out, d_in, generator=generator) / d_in**0.5
        state[f"layers.{index}.bias"] = torch.randn(d_out, generator=generator)
    torch.save(state, path)
    return path


@pytest.fixture(scope="module")
def tiny_weights(tiny_clip: Path, hps_folder: Path, tiny_imagereward: dict[str, Path], tmp_path_factory) -> TinyWeights:
    head = save_aesthetic_head(tmp_path_factory.mktemp("aesthetic") / "head.pth", embedding_dim=32)  # tiny CLIP's projection
    return TinyWeights(clip=tiny_clip, aesthetic_head=head, hps=hps_folder, imagereward=tiny_imagereward)


def tiny_images() -> list[Image.Image]:
    """Three small images of different shapes and modes: RGB, greyscale, RGBA."""
    rng = np.random.default_rng(0)
    return [
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)),
        Image.fromarray(rng.integers(0, 256, (32, 32), dtype=np.uint8)),
        Image.fromarray(rng.integers(0, 256, (50, 36, 4), dtype=np.uint8), "RGBA"),
    ]


def test_the_walk_knows_exactly_the_registered_scorers():
    assert set(HOW_TO_LOAD) == set(available_scorers()), "add how to build the new scorer's tiny weights to HOW_TO_LOAD"


@pytest.mark.parametrize("name", available_scorers())
def test_every_registered_scorer_scores_tiny_images(name: str, tiny_weights: TinyWeights):
    assert name in HOW_TO_LOAD, f"scorer {name!r} is registered but the walk cannot build its tiny weights"
    weights, options = HOW_TO_LOAD[name](tiny_weights)
    scorer = load_scorer(name, weights=str(weights), **options)
    assert isinstance(scorer, Scorer) and scorer.name.partition(":")[0] == name  # openclip:ARCH names its variant
    scores = scorer.score(tiny_images(), PROMPTS, batch_size=2)
    assert scores.shape == (3,) and scores.dtype == torch.float32 and scores.device.type == "cpu"
    assert torch.isfinite(scores).all(), scores
