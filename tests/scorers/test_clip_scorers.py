"""Scorers on a tiny random CLIPModel saved to a tmp folder: each score equals an
independent step-by-step computation, batching does not change scores, and the
CLIP preprocessing equals transformers' CLIPImageProcessor."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import torch
from diffalign.scorers import Scorer, available_scorers, load_scorer
from diffalign.scorers.clip_preprocess import ClipPreprocessConfig, preprocess_image
from diffalign.scorers.clip_scorers import CLIP_PRESETS
from PIL import Image

CROP = 32
PROMPTS = [
    "a red circle",
    "a blue square on a green background",
    "a cat",
    "two dogs",
    "a yellow star",
    "a photo",
]


def _images(n: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    sizes = [(48, 40), (40, 64), (33, 33), (80, 36), (36, 36), (50, 45)]
    return [
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        for (w, h) in sizes[:n]
    ]


def _reference_cos(
    folder: Path, images: list[Image.Image], texts: list[str]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Independent pipeline: transformers' processor + tokenizer, CLIPModel features, normalise, dot."""
    from transformers import AutoTokenizer, CLIPModel
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    model = CLIPModel.from_pretrained(folder).eval()
    pixels = CLIPImageProcessorPil.from_pretrained(folder)(
        images=images, return_tensors="pt"
    )["pixel_values"]
    tokens = AutoTokenizer.from_pretrained(folder)(
        texts, padding="max_length", max_length=77, return_tensors="pt"
    )
    with torch.no_grad():
        img = model.get_image_features(pixel_values=pixels)
        txt = model.get_text_features(
            input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]
        )
    img = img if isinstance(img, torch.Tensor) else img.pooler_output
    txt = txt if isinstance(txt, torch.Tensor) else txt.pooler_output
    img, txt = (
        img / img.norm(dim=-1, keepdim=True),
        txt / txt.norm(dim=-1, keepdim=True),
    )
    return (img * txt).sum(-1), img


def test_preprocess_centre_crop_keeps_only_the_middle_third():
    """300x100, thirds red/green/blue: resize to 96x32, crop the centre 32x32 -> only green.

    Bicubic resampling bleeds a little red/blue into the outermost columns, so
    green dominates every pixel and the interior is exactly green.
    """
    array = np.zeros((100, 300, 3), dtype=np.uint8)
    array[:, :100, 0] = 255
    array[:, 100:200, 1] = 255
    array[:, 200:, 2] = 255
    config = ClipPreprocessConfig.from_dict(
        {"size": {"shortest_edge": CROP}, "crop_size": {"height": CROP, "width": CROP}}
    )
    out = preprocess_image(Image.fromarray(array), config)
    assert out.shape == (3, CROP, CROP) and out.dtype == np.float32
    mean, std = np.array(config.mean, np.float32), np.array(config.std, np.float32)
    pixels = out.transpose(1, 2, 0) * std + mean
    interior = pixels[:, 2:-2]
    np.testing.assert_allclose(
        interior, np.broadcast_to([0.0, 1.0, 0.0], interior.shape), atol=1e-5
    )
    assert np.all(pixels[..., 1] > 0.9) and np.all(pixels[..., [0, 2]] < 0.1)


@pytest.mark.parametrize("size", [224, CROP])
def test_preprocess_equals_transformers_clip_image_processor(size: int, tmp_path: Path):
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    processor = CLIPImageProcessorPil(
        size={"shortest_edge": size}, crop_size={"height": size, "width": size}
    )
    processor.save_pretrained(tmp_path)
    config = ClipPreprocessConfig.from_pretrained(str(tmp_path))
    left_right = np.zeros((200, 300, 3), dtype=np.uint8)
    left_right[:, :150] = (250, 10, 30)
    left_right[:, 150:] = (5, 200, 120)
    rng = np.random.default_rng(1)
    images = [
        Image.fromarray(left_right),
        Image.fromarray(rng.integers(0, 256, (301, 199, 3), dtype=np.uint8)),
        Image.fromarray(
            rng.integers(0, 256, (13, 17, 4), dtype=np.uint8), "RGBA"
        ),  # alpha, smaller than the crop
        Image.fromarray(rng.integers(0, 256, (64, 50), dtype=np.uint8)),  # greyscale
    ]
    reference = processor(images=images, return_tensors="np")["pixel_values"]
    for image, expected in zip(images, reference, strict=True):
        np.testing.assert_allclose(
            preprocess_image(image, config), expected, atol=1e-5, rtol=0
        )


def test_old_style_int_sizes_parse_like_the_processor():
    config = ClipPreprocessConfig.from_dict({"size": 224, "crop_size": 224})
    assert (
        config.shortest_edge == 224
        and config.crop_hw == (224, 224)
        and config.resample == 3
    )


def test_unknown_scorer_lists_the_valid_names():
    with pytest.raises(KeyError) as error:
        load_scorer("pickscorer")
    for name in ("clipscore", "clipscore-100", "pickscore", "aesthetic"):
        assert name in str(error.value)


@pytest.mark.parametrize("name", sorted(CLIP_PRESETS))
def test_similarity_scorers_match_the_step_by_step_formula(name: str, tiny_clip: Path):
    """Walks every CLIP preset: score = rule(cos(image, prefix + prompt)); batch 1 == batch 8."""
    scorer = load_scorer(name, weights=str(tiny_clip))
    assert isinstance(scorer, Scorer) and scorer.name == name
    images, prompts = _images(6), PROMPTS
    prefix = "A photo depicts " if name == "clipscore" else ""
    cos, _ = _reference_cos(tiny_clip, images, [prefix + p for p in prompts])
    expected = {
        "clipscore": 2.5 * cos.clamp(min=0),
        "clipscore-100": 100 * cos,
        "pickscore": torch.tensor(2.0).exp() * cos,
    }[name]
    scores = scorer.score(images, prompts, batch_size=1)
    assert (
        scores.dtype == torch.float32
        and scores.device.type == "cpu"
        and scores.shape == (6,)
    )
    # 1e-5 on the cosine scale: float32 sums differ with padding length and batch composition.
    torch.testing.assert_close(scores, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        scorer.score(images, prompts, batch_size=8), scores, atol=1e-5, rtol=1e-5
    )


def test_prefix_only_for_clipscore_and_the_clamp_at_zero(tiny_clip: Path):
    images, prompts = _images(6), PROMPTS
    cos_plain, _ = _reference_cos(tiny_clip, images, prompts)
    cos_prefixed, _ = _reference_cos(
        tiny_clip, images, ["A photo depicts " + p for p in prompts]
    )
    assert (cos_plain - cos_prefixed).abs().max() > 1e-4  # the prefix matters
    torch.testing.assert_close(
        load_scorer("clipscore-100", weights=str(tiny_clip)).score(images, prompts),
        100 * cos_plain,
        atol=1e-5,
        rtol=1e-5,
    )
    # Negating the text projection negates every cosine: each pair is clamped in exactly one of the two models.
    scorer = load_scorer("clipscore", weights=str(tiny_clip))
    before = scorer.score(images, prompts)
    scorer.model.text_projection.weight.data.neg_()
    after = scorer.score(images, prompts)
    torch.testing.assert_close(
        after, 2.5 * (-cos_prefixed).clamp(min=0), atol=1e-5, rtol=0
    )
    assert (before == 0).any() or (after == 0).any()
    assert torch.all((before == 0) | (after == 0))


def test_aesthetic_loads_the_reference_key_format_and_matches(
    tiny_clip: Path, tmp_path: Path
):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        dims = [32, 1024, 128, 64, 16, 1]
        # The reference Sequential: Linear, Dropout, Linear, Dropout, Linear, Dropout, Linear, Linear.
        state = {}
        for index, (d_in, d_out) in zip(
            (0, 2, 4, 6, 7), itertools.pairwise(dims), strict=True
        ):
            state[f"layers.{index}.weight"] = torch.randn(d_out, d_in) / d_in**0.5
            state[f"layers.{index}.bias"] = torch.randn(d_out)
    torch.save(state, tmp_path / "head.pth")
    scorer = load_scorer(
        "aesthetic", weights=str(tiny_clip), head=str(tmp_path / "head.pth")
    )
    images = _images(5)
    _, embedding = _reference_cos(tiny_clip, images, PROMPTS[:5])
    x = embedding
    for index in (0, 2, 4, 6, 7):  # no activations in the reference head
        x = x @ state[f"layers.{index}.weight"].T + state[f"layers.{index}.bias"]
    scores = scorer.score(images, PROMPTS[:5], batch_size=2)
    torch.testing.assert_close(scores, x.squeeze(-1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        scorer.score(images, PROMPTS[:5], batch_size=8), scores, atol=1e-5, rtol=0
    )
    with pytest.raises(ValueError, match="head"):
        load_scorer("aesthetic", weights=str(tiny_clip))

    # A head saved with a pickled non-tensor object (a class instance) loads only with allow_pickle.
    pickled = tmp_path / "pickled-head.pth"
    torch.save(_PickledState(state), pickled)
    with pytest.raises(ValueError, match=r"pickled-head\.pth.*allow_pickle=True"):
        load_scorer("aesthetic", weights=str(tiny_clip), head=str(pickled))
    unpickled = load_scorer("aesthetic", weights=str(tiny_clip), head=str(pickled), allow_pickle=True)
    torch.testing.assert_close(unpickled.score(images, PROMPTS[:5]), scores, atol=1e-6, rtol=0)


class _PickledState(dict):
    """A dict subclass: torch.load(weights_only=True) refuses it, as it refuses old pickled checkpoints."""


def test_bf16_option_and_input_checks(tiny_clip: Path):
    scorer = load_scorer("pickscore", weights=str(tiny_clip), dtype="bf16")
    assert next(scorer.model.parameters()).dtype == torch.bfloat16
    scores = scorer.score(_images(2), PROMPTS[:2])
    assert scores.dtype == torch.float32 and torch.isfinite(scores).all()
    with pytest.raises(ValueError, match="prompts"):
        scorer.score(_images(2), PROMPTS[:3])
    with pytest.raises(TypeError, match="unknown options"):
        load_scorer("pickscore", weights=str(tiny_clip), heads="x")


def test_registry_walk():
    assert set(available_scorers()) >= {*CLIP_PRESETS, "aesthetic"}
