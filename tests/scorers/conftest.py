"""Tiny reward models for the scorer tests, each saved in the format its loader reads; nothing downloads.

The checkpoint builders live beside this file (hps_checkpoint.py, imagereward_checkpoint.py) because
the tests also need their constants and tensors for the step-by-step reference scores. Under
``--import-mode=importlib`` a test module imports a sibling only from a folder on ``sys.path``,
so this conftest (loaded before any test module here) puts this folder there.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from hps_checkpoint import save_hps_folder  # noqa: E402  (needs the path above)
from imagereward_checkpoint import save_imagereward  # noqa: E402


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny random CLIPModel + local tokenizer + a 32-pixel CLIP image processor, saved together."""
    from diffalign.tiny import save_tiny_clip

    return save_tiny_clip(tmp_path_factory.mktemp("tiny_clip") / "clip", logit_scale=2.0)


@pytest.fixture(scope="session")
def hps_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Both HPS reference checkpoints (v2.1 seed 0, v2 seed 1) and a local CLIP-form tokenizer in one folder."""
    return save_hps_folder(tmp_path_factory.mktemp("hps"))


@pytest.fixture(scope="session")
def tiny_imagereward(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """``weights/`` (ImageReward.pt + med_config.json) and ``tokenizer/`` (a tiny WordPiece BERT tokenizer)."""
    return save_imagereward(tmp_path_factory.mktemp("imagereward"))
