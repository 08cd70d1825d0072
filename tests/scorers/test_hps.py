"""HPSv2 / HPSv2.1 on a tiny random open_clip ViT saved in the reference checkpoint format.

The checkpoint is built by hand with open_clip's key names and shapes (the ViT-H-14
form with tiny widths, hps_checkpoint.py), saved as ``{"state_dict": ...}`` under the
reference file names (the ``hps_folder`` fixture), and loaded through ``load_scorer``. Scores are compared with an independent
step-by-step computation written from open_clip's math (``CLIP.encode_image`` /
``encode_text``): the fork's ResizeMaxSize preprocessing in plain torch, patchify, class token,
pre-LN blocks with ``in_proj`` attention, EOT pooling by argmax, projections,
normalise, cosine; prompts tokenized by transformers' CLIPTokenizer on the same BPE file
(not open_clip's tokenizer). Nothing downloads.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffalign.scorers import Scorer, available_scorers, load_scorer
from diffalign.scorers.hps import preprocess_hps_image
from PIL import Image

from diffalign.tiny.clip_vocab import build_clip_tokenizer
from hps_checkpoint import (
    CONTEXT,
    LAYERS,
    PATCH,
    SIZE,
    TEXT_HEADS,
    TINY_ARCH,
    VISION_HEADS,
    WIDTH,
    open_clip_state_dict,
)

PROMPTS = ["a red circle", "a blue square on a green background", "a cat", "two dogs", "a yellow star", "a photo"]  # fmt: skip
MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(3, 1, 1)
STD = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(3, 1, 1)


# ----------------------------------------------------------------- the independent computation


def _float_resize(x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """Bicubic resize of a float ``[3, h, w]`` tensor, antialiased, unclamped (torchvision's tensor path)."""
    return F.interpolate(x[None], size=hw, mode="bicubic", align_corners=False, antialias=True)[0]


def _reference_pixels(image: Image.Image) -> torch.Tensor:
    """The HPSv2 fork's eval order: RGB -> /255 -> ResizeMaxSize on the float tensor
    (bicubic, zero pad: pad // 2 left/top) -> normalise."""
    x = torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1).float() / 255
    height, width = x.shape[1:]
    scale = SIZE / max(width, height)
    new_h, new_w = round(height * scale), round(width * scale)
    x = _float_resize(x, (new_h, new_w)) if scale != 1 else x
    pad_w, pad_h = SIZE - new_w, SIZE - new_h
    pads = (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2)
    return (F.pad(x, pads, value=0.0) - MEAN) / STD


def _layer_norm(
    x: torch.Tensor, sd: dict[str, torch.Tensor], name: str
) -> torch.Tensor:
    weight, bias = sd[name + ".weight"], sd[name + ".bias"]
    return F.layer_norm(x, x.shape[-1:], weight, bias, eps=1e-5)


def _linear(x: torch.Tensor, sd: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    return F.linear(x, sd[name + ".weight"], sd[name + ".bias"])


def _block(
    x: torch.Tensor,
    sd: dict[str, torch.Tensor],
    p: str,
    heads: int,
    mask: torch.Tensor | None,
) -> torch.Tensor:
    """open_clip ResidualAttentionBlock: x + attn(ln_1(x)); x + mlp(ln_2(x)), exact GELU."""
    h = _layer_norm(x, sd, p + "ln_1")
    qkv = F.linear(h, sd[p + "attn.in_proj_weight"], sd[p + "attn.in_proj_bias"])
    n, length, width = h.shape
    q, k, v = (
        t.reshape(n, length, heads, width // heads).transpose(1, 2)
        for t in qkv.chunk(3, dim=-1)
    )
    logits = q @ k.transpose(-1, -2) / (width // heads) ** 0.5
    if mask is not None:
        logits = logits + mask
    attended = (logits.softmax(-1) @ v).transpose(1, 2).reshape(n, length, width)
    x = x + _linear(attended, sd, p + "attn.out_proj")
    hidden = F.gelu(_linear(_layer_norm(x, sd, p + "ln_2"), sd, p + "mlp.c_fc"))
    return x + _linear(hidden, sd, p + "mlp.c_proj")


def _reference_scores(
    sd: dict[str, torch.Tensor], images: list[Image.Image], prompts: list[str]
) -> torch.Tensor:
    """cos(normalise(encode_image), normalise(encode_text)) step by step, as open_clip's
    CLIP computes them (``prompts`` already cleaned)."""
    pixels = torch.stack([_reference_pixels(image) for image in images])
    x = F.conv2d(pixels, sd["visual.conv1.weight"], stride=PATCH)
    x = x.flatten(2).transpose(1, 2)  # [N, grid², W]
    cls = sd["visual.class_embedding"].expand(len(x), 1, -1)
    x = torch.cat([cls, x], dim=1) + sd["visual.positional_embedding"]
    x = _layer_norm(x, sd, "visual.ln_pre")
    for i in range(LAYERS):
        x = _block(x, sd, f"visual.transformer.resblocks.{i}.", VISION_HEADS, None)
    image = _layer_norm(x[:, 0], sd, "visual.ln_post") @ sd["visual.proj"]

    # open_clip's layout: [SOT] tokens [EOT], then zeros (its pad id) to the context.
    ids = build_clip_tokenizer()(prompts)["input_ids"]
    tokens = torch.zeros(len(prompts), CONTEXT, dtype=torch.long)
    for row, seq in enumerate(ids):
        tokens[row, : len(seq)] = torch.tensor(seq)
    causal = torch.full((CONTEXT, CONTEXT), float("-inf")).triu(1)
    t = sd["token_embedding.weight"][tokens] + sd["positional_embedding"]
    for i in range(LAYERS):
        t = _block(t, sd, f"transformer.resblocks.{i}.", TEXT_HEADS, causal)
    t = _layer_norm(t, sd, "ln_final")
    eot = tokens.argmax(dim=-1)  # EOT has the largest id
    text = t[torch.arange(len(t)), eot] @ sd["text_projection"]

    image = image / image.norm(dim=-1, keepdim=True)
    text = text / text.norm(dim=-1, keepdim=True)
    return (image * text).sum(-1)


def _images(n: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    sizes = [(48, 40), (40, 64), (SIZE, SIZE), (80, 36), (7, 90), (50, 45)]  # (w, h)
    return [
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        for (w, h) in sizes[:n]
    ]


# ----------------------------------------------------------------- loading


def _load(name: str, weights: Path, hps_folder: Path, **options: object) -> Scorer:
    """The scorer on the tiny architecture (registered with open_clip by the hps_folder fixture)."""
    return load_scorer(name, weights=str(weights), arch=TINY_ARCH, **options)


# ----------------------------------------------------------------- tests


def test_both_versions_are_registered():
    assert {"hpsv2", "hpsv2.1"} <= set(available_scorers())
    with pytest.raises(KeyError, match="hpsv2.1"):
        load_scorer("hps2.1")


@pytest.mark.parametrize(("name", "seed"), [("hpsv2.1", 0), ("hpsv2", 1)])
def test_scores_match_the_step_by_step_open_clip_computation(
    name: str, seed: int, hps_folder: Path
):
    """Loading by folder picks the version's file; by file path gives the same scores."""
    scorer = _load(name, hps_folder, hps_folder)
    assert isinstance(scorer, Scorer) and scorer.name == name
    images = _images(6)
    prompts = [*PROMPTS[:5], "  A   PHOTO &amp;amp; a CAT\n"]
    cleaned = [*PROMPTS[:5], "a photo & a cat"]  # open_clip's cleaning, by hand
    expected = _reference_scores(open_clip_state_dict(seed), images, cleaned)
    scores = scorer.score(images, prompts, batch_size=4)
    assert (
        scores.dtype == torch.float32
        and scores.device.type == "cpu"
        and scores.shape == (6,)
    )
    torch.testing.assert_close(scores, expected, atol=1e-5, rtol=0)
    assert (
        expected - _reference_scores(open_clip_state_dict(1 - seed), images, cleaned)
    ).abs().max() > 1e-3
    file = hps_folder / (
        "HPS_v2.1_compressed.pt" if name == "hpsv2.1" else "HPS_v2_compressed.pt"
    )
    torch.testing.assert_close(
        _load(name, file, hps_folder).score(images, prompts), scores, atol=1e-6, rtol=0
    )


def test_batch_size_does_not_change_scores(hps_folder: Path):
    scorer = _load("hpsv2.1", hps_folder, hps_folder)
    images = _images(6, seed=3)
    reference = scorer.score(images, PROMPTS, batch_size=1)
    for batch_size in (2, 5, None):
        torch.testing.assert_close(
            scorer.score(images, PROMPTS, batch_size=batch_size),
            reference,
            atol=1e-6,
            rtol=0,
        )
    with pytest.raises(ValueError, match="prompts"):
        scorer.score(images, PROMPTS[:2])


# (w, h) -> resized (w, h) and padding (left, top, right, bottom), worked by hand:
# 60x30: 30 * 32/60 = 16 rows, pad 16 = 8 above + 8 below;
# 60x29: 29 * 32/60 = 15.47 -> 15 rows, pad 17 = 8 above + 9 below (the extra row at the bottom);
# 20x64: 20 * 32/64 = 10 columns, pad 22 = 11 left + 11 right;
# 90x66: 66 * 32/90 = 23.47 -> 23 rows, pad 9 = 4 above + 5 below.
GEOMETRY = [
    ((60, 30), (32, 16), (0, 8, 0, 8)),
    ((60, 29), (32, 15), (0, 8, 0, 9)),
    ((20, 64), (10, 32), (11, 0, 11, 0)),
    ((90, 66), (32, 23), (0, 4, 0, 5)),
]


@pytest.mark.parametrize(("wh", "resized_wh", "pad_ltrb"), GEOMETRY)
def test_preprocess_resizes_the_longest_side_and_pads_symmetrically(
    wh, resized_wh, pad_ltrb
):
    """A solid block: the image fills exactly the centred box, every padded pixel is the normalised 0."""
    rng = np.random.default_rng(0)
    noise = Image.fromarray(rng.integers(0, 256, (wh[1], wh[0], 3), dtype=np.uint8))
    ours = preprocess_hps_image(noise, SIZE)
    # Independent: /255, float resize to the hand-computed size, torch zero pad, normalise.
    x = torch.from_numpy(np.array(noise)).permute(2, 0, 1).float() / 255
    x = _float_resize(x, resized_wh[::-1])
    left, top, right, bottom = pad_ltrb
    expected = (F.pad(x, (left, right, top, bottom), value=0.0) - MEAN) / STD
    assert ours.shape == (3, SIZE, SIZE) and ours.dtype == torch.float32
    torch.testing.assert_close(ours, expected, atol=1e-6, rtol=0)

    solid = Image.new("RGB", wh, (200, 100, 50))
    pixels = preprocess_hps_image(solid, SIZE) * STD + MEAN
    inside = torch.zeros(SIZE, SIZE, dtype=torch.bool)
    inside[top : SIZE - bottom, left : SIZE - right] = True
    assert inside.sum() == resized_wh[0] * resized_wh[1]
    torch.testing.assert_close(
        pixels[:, ~inside], torch.zeros(3, int((~inside).sum())), atol=1e-6, rtol=0
    )
    colour = torch.tensor([200.0, 100.0, 50.0]).view(3, 1) / 255
    torch.testing.assert_close(
        pixels[:, inside], colour.expand(3, int(inside.sum())), atol=1e-6, rtol=0
    )


def test_preprocess_keeps_a_square_image_and_drops_alpha_without_compositing():
    """Already SIZE x SIZE: no resize, pixels as they are, alpha dropped (not composited onto white).
    Larger RGBA: its colour channels resized as they are (the reference's first three channels, not premultiplied)."""
    rng = np.random.default_rng(1)
    square = rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    expected = (torch.from_numpy(square).permute(2, 0, 1).float() / 255 - MEAN) / STD
    torch.testing.assert_close(
        preprocess_hps_image(Image.fromarray(square), SIZE),
        expected,
        atol=1e-6,
        rtol=0,
    )
    transparent = Image.new("RGBA", (SIZE, SIZE), (10, 20, 30, 0))
    pixels = preprocess_hps_image(transparent, SIZE) * STD + MEAN
    torch.testing.assert_close(
        pixels,
        (torch.tensor([10.0, 20.0, 30.0]) / 255).view(3, 1, 1).expand(3, SIZE, SIZE),
        atol=1e-6,
        rtol=0,
    )
    rgba = Image.fromarray(rng.integers(0, 256, (40, 70, 4), dtype=np.uint8), "RGBA")
    torch.testing.assert_close(
        preprocess_hps_image(rgba, SIZE),
        _reference_pixels(rgba),
        atol=1e-6,
        rtol=0,
    )


def test_checkpoint_needing_pickle_requires_allow_pickle(
    hps_folder: Path, tmp_path: Path
):
    """Training checkpoints carry argparse Namespaces: weights_only=True refuses them; the error names the file."""
    torch.save(
        {
            "state_dict": open_clip_state_dict(seed=0),
            "args": argparse.Namespace(lr=1e-5),
        },
        tmp_path / "HPS_v2.1_compressed.pt",
    )
    with pytest.raises(
        ValueError, match=r"HPS_v2\.1_compressed\.pt.*allow_pickle=True"
    ):
        _load("hpsv2.1", tmp_path, hps_folder)
    images = _images(3)
    scores = _load("hpsv2.1", tmp_path, hps_folder, allow_pickle=True).score(
        images, PROMPTS[:3]
    )
    torch.testing.assert_close(
        scores,
        _load("hpsv2.1", hps_folder, hps_folder).score(images, PROMPTS[:3]),
        atol=1e-6,
        rtol=0,
    )


def test_bad_checkpoints_configs_and_paths_raise(hps_folder: Path, tmp_path: Path):
    with pytest.raises(FileNotFoundError, match=r"HPS_v2\.1_compressed\.pt"):
        _load("hpsv2.1", tmp_path, hps_folder)
    with pytest.raises(FileNotFoundError, match="hub id"):
        load_scorer("hpsv2", weights=str(tmp_path / "missing" / "HPS_v2_compressed.pt"))
    torch.save(
        open_clip_state_dict(seed=0), tmp_path / "HPS_v2.1_compressed.pt"
    )  # no "state_dict" key
    with pytest.raises(ValueError, match="state_dict"):
        _load("hpsv2.1", tmp_path, hps_folder)
    foreign = {
        **open_clip_state_dict(seed=0),
        "visual.attn_pool.query": torch.zeros(4, WIDTH),
    }
    torch.save({"state_dict": foreign}, tmp_path / "HPS_v2.1_compressed.pt")
    with pytest.raises(ValueError, match="visual.attn_pool.query"):
        _load("hpsv2.1", tmp_path, hps_folder)
    with pytest.raises(ValueError, match="not an open_clip architecture.*did you mean.*ViT-H-14"):
        load_scorer("hpsv2.1", weights=str(hps_folder), arch="ViT-H-41")
    with pytest.raises(TypeError, match="unknown options"):
        _load("hpsv2.1", hps_folder, hps_folder, processor="x")


def test_bf16_option(hps_folder: Path):
    scorer = _load("hpsv2.1", hps_folder, hps_folder, dtype="bf16")
    assert next(scorer.model.parameters()).dtype == torch.bfloat16
    images = _images(3)
    scores = scorer.score(images, PROMPTS[:3])
    assert scores.dtype == torch.float32 and torch.isfinite(scores).all()
    torch.testing.assert_close(
        scores,
        _reference_scores(open_clip_state_dict(0), images, PROMPTS[:3]),
        atol=5e-2,
        rtol=0,
    )


# ----------------------------------------------------------------- full size, and no hub


FULL_SIZE = 224


def _full_size_images() -> list[Image.Image]:
    """Two non-square images, landscape and portrait, 224 on neither side (both are resized and padded)."""
    rng = np.random.default_rng(7)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for (w, h) in [(300, 200), (180, 261)]]


def _full_size_reference_pixels(image: Image.Image) -> torch.Tensor:
    """The fork's eval transform at 224 (as ``_reference_pixels``): /255, float bicubic resize, zero pad, normalise."""
    x = torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1).float() / 255
    height, width = x.shape[1:]
    scale = FULL_SIZE / max(width, height)
    new_h, new_w = round(height * scale), round(width * scale)
    x = _float_resize(x, (new_h, new_w))
    pad_w, pad_h = FULL_SIZE - new_w, FULL_SIZE - new_h
    return (F.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2), value=0.0) - MEAN) / STD


@pytest.fixture(scope="module")
def vit_h_14() -> torch.nn.Module:
    """open_clip's own ViT-H-14 (986M parameters) with random weights from a local seed, fp32, eval."""
    import open_clip

    with torch.random.fork_rng():  # open_clip initialises from the global RNG: seed it here only
        torch.manual_seed(0)
        return open_clip.create_model("ViT-H-14", pretrained=None).eval().requires_grad_(False)


def test_full_size_vit_h_14_scores_equal_open_clips_own_forward_one_image_at_a_time(
    vit_h_14: torch.nn.Module, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """``load_scorer("hpsv2.1")`` at full ViT-H-14 size, batched, equals the reference habit to 1e-5:
    img_score.py's ``create_model("ViT-H-14")`` + ``load_state_dict(checkpoint["state_dict"])``, one
    image per forward, ``get_tokenizer("ViT-H-14")``, ``diag(image_features @ text_features.T)``.

    The reference's 4 GB state dict is handed to the loader in place of ``torch.load`` (the file is only
    looked up), so no checkpoint is written; the loader still builds its own ViT-H-14 and loads strictly.
    """
    import open_clip
    from diffalign.scorers import hps

    images, prompts = _full_size_images(), ["a red circle on a blue square", "  Two DOGS &amp;amp; a cat\n"]
    tokenizer = open_clip.get_tokenizer("ViT-H-14")
    expected = []
    with torch.no_grad():
        for image, prompt in zip(images, prompts, strict=True):
            image_features, text_features, _ = vit_h_14(_full_size_reference_pixels(image)[None], tokenizer([prompt]))
            expected.append(torch.diagonal(image_features @ text_features.T)[0])

    checkpoint = tmp_path / "HPS_v2.1_compressed.pt"
    checkpoint.touch()
    monkeypatch.setattr(hps, "load_hps_state_dict", lambda path, allow_pickle=False: vit_h_14.state_dict())
    scores = load_scorer("hpsv2.1", weights=str(checkpoint)).score(images, prompts, batch_size=2)
    torch.testing.assert_close(scores, torch.stack(expected), atol=1e-5, rtol=0)


def test_hpsv2_loads_with_no_hub_at_all(hps_folder: Path, monkeypatch: pytest.MonkeyPatch):
    """HF_HUB_OFFLINE=1 and every hub download raising: a local checkpoint still loads, with open_clip's
    bundled BPE tokenizer (ids equal to transformers' CLIPTokenizer on the same BPE file)."""
    import huggingface_hub
    import open_clip

    def no_hub(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"the hub was asked: {args} {kwargs}")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for name in ("hf_hub_download", "snapshot_download"):
        monkeypatch.setattr(huggingface_hub, name, no_hub)
        monkeypatch.setattr(huggingface_hub.file_download, name, no_hub, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    scorer = load_scorer("hpsv2", weights=str(hps_folder / "HPS_v2_compressed.pt"), arch=TINY_ARCH)
    prompts = ["a photo of a cat", "café <3 rock &amp; roll"]
    assert isinstance(scorer.tokenizer, open_clip.SimpleTokenizer)
    ours = scorer.tokenizer(prompts)
    for row, ids in enumerate(build_clip_tokenizer()(["a photo of a cat", "café <3 rock & roll"])["input_ids"]):
        assert ours[row, : len(ids)].tolist() == ids and not ours[row, len(ids) :].any()
    images = _images(2)
    torch.testing.assert_close(
        scorer.score(images, prompts), _reference_scores(open_clip_state_dict(1), images, ["a photo of a cat", "café <3 rock & roll"]),
        atol=1e-5, rtol=0,
    )  # fmt: skip


# ----------------------------------------------------------------- against the reference transform itself


def _hpsv2_eval_transform(size: int):
    """The HPSv2 package's own ``image_transform(size, is_train=False, resize_longest_max=True)``.

    hpsv2 cannot be a dependency (it pins pytest 7.2 and protobuf < 4), so this runs where its source
    is present: an installed ``hpsv2`` (``pip install hpsv2 --no-deps``) or ``HPSV2_SOURCE`` pointing at
    a folder holding the ``hpsv2`` package (an unpacked wheel). Only ``src/open_clip/transform.py`` and
    its ``constants.py`` are loaded, by path: ``hpsv2/__init__`` pulls in network helpers.
    """
    import importlib.util
    import os
    import sys
    import types

    root = os.environ.get("HPSV2_SOURCE")
    if root is None:
        spec = importlib.util.find_spec("hpsv2")
        if spec is None or spec.origin is None:
            pytest.skip("the hpsv2 package is not here: pip install hpsv2 --no-deps, or HPSV2_SOURCE=<unpacked wheel>")
        root = str(Path(spec.origin).parent.parent)
    folder = Path(root) / "hpsv2" / "src" / "open_clip"
    package = types.ModuleType("hpsv2_reference")
    package.__path__ = [str(folder)]
    sys.modules.setdefault("hpsv2_reference", package)
    for name in ("constants", "transform"):
        spec = importlib.util.spec_from_file_location(f"hpsv2_reference.{name}", folder / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
    return module.image_transform(size, is_train=False, resize_longest_max=True)


@pytest.mark.parametrize("size", [SIZE, 224])
def test_preprocess_equals_the_hpsv2_packages_own_eval_transform(size: int):
    """Non-square images (both orientations, odd padding, upscaled and downscaled), square ones, greyscale
    and palette images: identical to the reference transform's output, element for element."""
    transform = _hpsv2_eval_transform(size)
    rng = np.random.default_rng(size)
    shapes = [(300, 200), (200, 301), (97, 31), (13, 40), (size, size), (size + 9, size + 9), (512, 288)]
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for (w, h) in shapes]
    images.append(Image.fromarray(rng.integers(0, 256, (70, 50), dtype=np.uint8)))  # L
    images.append(images[0].convert("P"))
    for image in images:
        expected = transform(image)
        assert expected.shape == (3, size, size)
        torch.testing.assert_close(preprocess_hps_image(image, size), expected, atol=0, rtol=0)
