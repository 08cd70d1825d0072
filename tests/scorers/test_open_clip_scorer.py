"""``openclip:ARCH``: any open_clip architecture as a CLIP-score scorer, on a tiny registered architecture.

The tiny ViT (hps_checkpoint.py) is registered with open_clip under ``TINY_ARCH`` and its
random weights saved as a bare state dict (``open_clip_pytorch_model.bin``, open_clip's release
form); the scorer loads them back through ``weights``. The reference is open_clip's own habit,
one image per forward: ``create_model_and_transforms`` + ``get_tokenizer`` + ``model(image, text)``.
Nothing downloads: the pretrained-tag path is checked with the network and the hub patched out.
"""

from __future__ import annotations

import argparse
import socket
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from diffalign.apps.score_cli import add_score_parsers, parse_scorer_specs
from diffalign.scorers import Scorer, load_scorer
from PIL import Image

from hps_checkpoint import OPEN_CLIP_WEIGHTS, TINY_ARCH, open_clip_state_dict

PROMPTS = ["a red circle", "two blue dogs on a green square", "a cat", "A PHOTO of a   Star"]


def _images(seed: int = 0) -> list[Image.Image]:
    """Non-square, square, greyscale and RGBA images (open_clip's transform converts them to RGB)."""
    rng = np.random.default_rng(seed)
    return [
        Image.fromarray(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)),
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)),
        Image.fromarray(rng.integers(0, 256, (64, 30), dtype=np.uint8)),
        Image.fromarray(rng.integers(0, 256, (50, 36, 4), dtype=np.uint8), "RGBA"),
    ]


def _open_clip_one_by_one(weights: Path, images: list[Image.Image], prompts: list[str]) -> torch.Tensor:
    """open_clip's own habit: its factory, transform and tokenizer, one (image, prompt) per forward, cos."""
    import open_clip

    model, _, preprocess = open_clip.create_model_and_transforms(TINY_ARCH, pretrained=str(weights))
    tokenizer = open_clip.get_tokenizer(TINY_ARCH)
    model.eval()
    cosines = []
    with torch.no_grad():
        for image, prompt in zip(images, prompts, strict=True):
            image_features, text_features, _ = model(preprocess(image)[None], tokenizer([prompt]))
            cosines.append((image_features @ text_features.T)[0, 0])
    return torch.stack(cosines)


def test_scores_are_100_cos_of_open_clips_own_forward(hps_folder: Path, tmp_path: Path):
    """Batched scorer == 100 x open_clip's per-image cosine; other weights give other scores (the file is used)."""
    weights = hps_folder / OPEN_CLIP_WEIGHTS
    scorer = load_scorer(f"openclip:{TINY_ARCH}", weights=str(weights))
    assert isinstance(scorer, Scorer) and scorer.name == f"openclip:{TINY_ARCH}"
    images = _images()
    scores = scorer.score(images, PROMPTS, batch_size=3)
    assert scores.shape == (4,) and scores.dtype == torch.float32 and scores.device.type == "cpu"
    expected_cos = _open_clip_one_by_one(weights, images, PROMPTS)
    torch.testing.assert_close(scores / 100, expected_cos, atol=1e-6, rtol=0)
    torch.testing.assert_close(scorer.score(images, PROMPTS, batch_size=1), scores, atol=1e-4, rtol=0)  # 1e-6 of cos

    other = tmp_path / "other.bin"
    torch.save(open_clip_state_dict(seed=5), other)
    assert (load_scorer(f"openclip:{TINY_ARCH}", weights=str(other)).score(images, PROMPTS) - scores).abs().max() > 0.1


def test_a_training_checkpoint_loads_too(hps_folder: Path, tmp_path: Path):
    """``{"state_dict": {"module.<key>": ...}}`` (a DDP training checkpoint) loads as open_clip unwraps it."""
    wrapped = tmp_path / "epoch_3.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in open_clip_state_dict(seed=2).items()}}, wrapped)
    images = _images(1)[:2]
    direct = load_scorer(f"openclip:{TINY_ARCH}", weights=str(hps_folder / OPEN_CLIP_WEIGHTS)).score(images, PROMPTS[:2])
    torch.testing.assert_close(load_scorer(f"openclip:{TINY_ARCH}", weights=str(wrapped)).score(images, PROMPTS[:2]), direct, atol=1e-6, rtol=0)  # fmt: skip


def test_a_folder_holding_the_hub_file_names_loads(hps_folder: Path, tmp_path: Path):
    """A downloaded hub repo: the folder's ``open_clip_pytorch_model.bin`` is the weights; an empty folder is named."""
    images = _images(2)[:2]
    from_folder = load_scorer(f"openclip:{TINY_ARCH}", weights=str(hps_folder)).score(images, PROMPTS[:2])
    from_file = load_scorer(f"openclip:{TINY_ARCH}", weights=str(hps_folder / OPEN_CLIP_WEIGHTS)).score(images, PROMPTS[:2])
    torch.testing.assert_close(from_folder, from_file, atol=0, rtol=0)
    with pytest.raises(FileNotFoundError, match=r"holds none of open_clip_model\.safetensors, open_clip_pytorch_model\.bin"):
        load_scorer(f"openclip:{TINY_ARCH}", weights=str(tmp_path))


def test_cli_spec_openclip_arch_equals_weights(hps_folder: Path):
    """``--scorer openclip:ARCH=WEIGHTS`` parses to the name and the weights load_scorer takes;
    ``--scorer-option openclip:ARCH:KEY=VALUE`` reaches it (the option's KEY follows the last colon)."""
    weights = hps_folder / OPEN_CLIP_WEIGHTS
    [spec] = parse_scorer_specs([f"openclip:{TINY_ARCH}={weights}"])
    assert (spec.name, spec.weights, spec.column) == (f"openclip:{TINY_ARCH}", str(weights), f"openclip:{TINY_ARCH}")
    scorer = load_scorer(spec.name, spec.weights, **spec.options)
    assert scorer.name == f"openclip:{TINY_ARCH}" and scorer.batch_size == 16
    [spec] = parse_scorer_specs([f"openclip:{TINY_ARCH}={weights}"], [f"openclip:{TINY_ARCH}:batch_size=3"])
    assert spec.options == {"batch_size": 3} and load_scorer(spec.name, spec.weights, **spec.options).batch_size == 3


def test_wrong_names_weights_and_files_raise_with_the_fix(hps_folder: Path, tmp_path: Path):
    weights = str(hps_folder / OPEN_CLIP_WEIGHTS)
    with pytest.raises(ValueError, match="openclip:ARCH"):
        load_scorer("openclip", weights=weights)
    with pytest.raises(ValueError, match="not an open_clip architecture.*did you mean.*ViT-B-32"):
        load_scorer("openclip:ViT-B-23", weights=weights)
    with pytest.raises(ValueError, match="needs weights.*laion2b_s34b_b79k"):
        load_scorer("openclip:ViT-B-32")
    with pytest.raises(FileNotFoundError, match="neither a file nor a pretrained tag of ViT-B-32.*openai"):
        load_scorer("openclip:ViT-B-32", weights=str(tmp_path / "missing.bin"))
    foreign = tmp_path / "foreign.bin"
    torch.save({**open_clip_state_dict(seed=0), "visual.attn_pool.query": torch.zeros(4, 32)}, foreign)
    with pytest.raises(ValueError, match=r"foreign\.bin.*visual\.attn_pool\.query"):
        load_scorer(f"openclip:{TINY_ARCH}", weights=str(foreign))
    with pytest.raises(TypeError, match="unknown options"):
        load_scorer(f"openclip:{TINY_ARCH}", weights=weights, head="x")


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every connection fails at once and every download raises: what was attempted is recorded."""
    import huggingface_hub
    import open_clip

    attempts: list[str] = []

    def refuse(*args: object, **kwargs: object) -> None:
        attempts.append(repr(args[:1]))
        raise OSError("network is unreachable (test)")

    def no_download(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"a download was attempted: {args} {kwargs}")

    # tests/conftest.py sets HF_HUB_OFFLINE; switched off here so the probe itself is exercised.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_download)
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda *a, **k: None)  # nothing cached
    monkeypatch.setattr(open_clip, "download_pretrained", no_download)
    return attempts


def test_a_pretrained_tag_offline_is_one_clean_message_without_retries(no_network: list[str], tmp_path: Path, capsys):
    """``openclip:ViT-B-32=laion2b_s34b_b79k`` with no network: at most one probe, no download, no retries, and
    through ``diffalign score`` an exit status 2 with the advice to pass the file (no traceback)."""
    start = time.monotonic()
    with pytest.raises(ValueError, match="laion2b_s34b_b79k.*not cached.*cannot be reached.*pass the file"):
        load_scorer("openclip:ViT-B-32", weights="laion2b_s34b_b79k")
    assert time.monotonic() - start < 5 and len(no_network) <= 1  # load_scorer may have probed (cached) already

    folder = tmp_path / "images"
    folder.mkdir()
    _images()[0].save(folder / "a.png")
    (folder / "a.txt").write_text("a red circle")
    parser = argparse.ArgumentParser(prog="diffalign")
    add_score_parsers(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["score", str(folder), "--scorer", "openclip:ViT-B-32=laion2b_s34b_b79k", "--no-progress"])
    capsys.readouterr()
    status = args.run(args)
    err = capsys.readouterr().err
    assert status == 2 and "openclip:ViT-B-32" in err and "pass the file" in err and "Traceback" not in err
