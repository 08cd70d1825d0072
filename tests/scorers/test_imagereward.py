"""The ``imagereward`` scorer on a tiny random checkpoint in the reference's own format.

The ``tiny_imagereward`` fixture (built in imagereward_checkpoint.py) writes ``ImageReward.pt``
with THUDM/ImageReward's key names (``blip.visual_encoder.*``, ``blip.text_encoder.*``,
``mlp.layers.*``, plus the unused projections) and a ``med_config.json``, straight from tensors:
the scorer's converter and transformers' BLIP classes are not used to make it. The expected scores come from a direct functional transcription of the reference
forward pass (BLIP ``vit.py``, ``med.py``, ``ImageReward.score``) over those tensors.
"""

from __future__ import annotations

import collections
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffalign.scorers import Scorer, available_scorers, load_scorer
from diffalign.scorers.blip_med import ours_to_reference, reference_to_ours
from diffalign.scorers.imagereward import MAX_LENGTH, preprocess_image
from imagereward_checkpoint import MED, PATCH, SIZE, VIT, WORDS, reference_state
from PIL import Image

MEAN, STD = 0.16717362830052426, 1.0333394966054072  # ImageReward.__init__
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # ImageReward._transform's Normalize
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PROMPTS = ["a red cat", "two blue dogs on a green square", "a photo of a big circle", "the cat",
           "a small dog with a red circle", "green", "an [DEC] photo"]  # fmt: skip


def _load(paths: dict[str, Path], **options: object) -> Scorer:
    options.setdefault("weights", str(paths["weights"]))
    return load_scorer(
        "imagereward",
        tokenizer=str(paths["tokenizer"]),
        vision_heads=VIT["heads"],
        **options,
    )


def _images(n: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    sizes = [(48, 40), (40, 64), (32, 32), (80, 36), (35, 32), (64, 40), (33, 90)]
    images = [
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        for (w, h) in sizes[:n]
    ]
    if n > 2:
        images[2] = Image.fromarray(
            rng.integers(0, 256, (32, 32), dtype=np.uint8)
        )  # greyscale
    if (
        n > 3
    ):  # alpha, resized: PIL resizes RGBA premultiplied, and the reference drops alpha only after the crop
        images[3] = Image.fromarray(
            rng.integers(0, 256, (36, 80, 4), dtype=np.uint8), "RGBA"
        )
    return images


# ---------------------------------------------------------------- the reference, step by step


def _reference_pixels(image: Image.Image) -> torch.Tensor:
    """torchvision Resize(S, bicubic) -> CenterCrop(S) -> RGB -> ToTensor -> Normalize, written out."""
    w, h = image.size
    if min(w, h) != SIZE:  # torchvision: new_long = int(size * long / short)
        short = min(w, h)
        image = image.resize(
            (SIZE, int(SIZE * h / short)) if w <= h else (int(SIZE * w / short), SIZE),
            Image.Resampling.BICUBIC,
        )
    w, h = image.size
    top, left = round((h - SIZE) / 2.0), round((w - SIZE) / 2.0)
    image = image.crop((left, top, left + SIZE, top + SIZE)).convert("RGB")
    x = torch.from_numpy(np.array(image)).permute(2, 0, 1).float().div(255)
    return (x - torch.tensor(CLIP_MEAN)[:, None, None]) / torch.tensor(CLIP_STD)[
        :, None, None
    ]


def _lin(x: torch.Tensor, s: dict[str, torch.Tensor], prefix: str) -> torch.Tensor:
    return F.linear(x, s[prefix + "weight"], s[prefix + "bias"])


def _ln(
    x: torch.Tensor, s: dict[str, torch.Tensor], prefix: str, eps: float
) -> torch.Tensor:
    return F.layer_norm(x, x.shape[-1:], s[prefix + "weight"], s[prefix + "bias"], eps)


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    return x.reshape(*x.shape[:2], heads, -1).transpose(
        1, 2
    )  # [N, T, D] -> [N, H, T, D/H]


def _attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    heads: int,
    mask: torch.Tensor | None,
) -> torch.Tensor:
    q, k, v = _heads(q, heads), _heads(k, heads), _heads(v, heads)
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if mask is not None:
        scores = scores + mask
    out = scores.softmax(-1) @ v
    return out.transpose(1, 2).flatten(2)


def _reference_vit(s: dict[str, torch.Tensor], pixels: torch.Tensor) -> torch.Tensor:
    """BLIP vit.py VisionTransformer.forward (pre-LN blocks, LayerNorm eps 1e-6, final norm)."""
    v, d = "blip.visual_encoder.", VIT["width"]
    x = F.conv2d(
        pixels,
        s[v + "patch_embed.proj.weight"],
        s[v + "patch_embed.proj.bias"],
        stride=PATCH,
    )
    x = torch.cat(
        [s[v + "cls_token"].expand(len(x), -1, -1), x.flatten(2).transpose(1, 2)], dim=1
    )
    x = x + s[v + "pos_embed"]
    for i in range(VIT["depth"]):
        b = f"{v}blocks.{i}."
        q, k, val = _lin(_ln(x, s, b + "norm1.", 1e-6), s, b + "attn.qkv.").split(
            d, dim=-1
        )
        x = x + _lin(_attend(q, k, val, VIT["heads"], None), s, b + "attn.proj.")
        x = x + _lin(
            F.gelu(_lin(_ln(x, s, b + "norm2.", 1e-6), s, b + "mlp.fc1.")),
            s,
            b + "mlp.fc2.",
        )
    return _ln(x, s, v + "norm.", 1e-6)


def _reference_med_bert(
    s: dict[str, torch.Tensor],
    ids: torch.Tensor,
    mask: torch.Tensor,
    image: torch.Tensor,
) -> torch.Tensor:
    """med.py BertModel.forward, mode='multimodal': self-attn -> cross-attn -> FFN, post-LN, mask -10000."""
    t, eps, heads = (
        "blip.text_encoder.",
        MED["layer_norm_eps"],
        MED["num_attention_heads"],
    )
    x = (
        s[t + "embeddings.word_embeddings.weight"][ids]
        + s[t + "embeddings.position_embeddings.weight"][: ids.shape[1]]
    )
    x = _ln(x, s, t + "embeddings.LayerNorm.", eps)
    additive = (1.0 - mask[:, None, None, :].float()) * -10000.0
    for i in range(MED["num_hidden_layers"]):
        layer = f"{t}encoder.layer.{i}."
        for block, context, block_mask in (
            ("attention.", None, additive),
            ("crossattention.", image, None),
        ):
            kv = x if context is None else context
            a = _attend(_lin(x, s, layer + block + "self.query."), _lin(kv, s, layer + block + "self.key."),
                        _lin(kv, s, layer + block + "self.value."), heads, block_mask)  # fmt: skip
            x = _ln(
                _lin(a, s, layer + block + "output.dense.") + x,
                s,
                layer + block + "output.LayerNorm.",
                eps,
            )
        h = F.gelu(_lin(x, s, layer + "intermediate.dense."))
        x = _ln(
            _lin(h, s, layer + "output.dense.") + x, s, layer + "output.LayerNorm.", eps
        )
    return x


def _reference_scores(
    paths: dict[str, Path], images: list[Image.Image], prompts: list[str]
) -> torch.Tensor:
    """ImageReward.score per pair: preprocess -> ViT -> BERT with cross-attention -> [CLS] -> MLP -> normalise."""
    from transformers import AutoTokenizer

    s = torch.load(paths["weights"] / "ImageReward.pt", weights_only=True)
    tokenizer = AutoTokenizer.from_pretrained(paths["tokenizer"])
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})  # BLIP init_tokenizer
    tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    scores = []
    with torch.no_grad():
        for image, prompt in zip(
            images, prompts, strict=True
        ):  # one pair at a time, as the reference
            tokens = tokenizer(
                prompt,
                padding="max_length",
                truncation=True,
                max_length=35,
                return_tensors="pt",
            )
            image_embeds = _reference_vit(s, _reference_pixels(image)[None])
            cls = _reference_med_bert(
                s, tokens["input_ids"], tokens["attention_mask"], image_embeds
            )[:, 0]
            for index in (
                0,
                2,
                4,
                6,
                7,
            ):  # Linear, Dropout, ..., Linear, Linear: no activations
                cls = _lin(cls, s, f"mlp.layers.{index}.")
            scores.append((cls.squeeze() - MEAN) / STD)
    return torch.stack(scores)


# ---------------------------------------------------------------- tests


def test_scores_match_the_reference_procedure(tiny_imagereward: dict[str, Path]):
    scorer = _load(tiny_imagereward)
    assert isinstance(scorer, Scorer) and scorer.name == "imagereward"
    images = _images(7)
    expected = _reference_scores(tiny_imagereward, images, PROMPTS)
    scores = scorer.score(images, PROMPTS, batch_size=3)
    assert (
        scores.dtype == torch.float32
        and scores.device.type == "cpu"
        and scores.shape == (7,)
    )
    assert (
        expected.std() > 0.1
    )  # the tiny model separates the pairs, so the comparison means something
    torch.testing.assert_close(scores, expected, atol=1e-5, rtol=1e-5)


def test_batching_does_not_change_scores(tiny_imagereward: dict[str, Path]):
    scorer = _load(tiny_imagereward)
    images = _images(7, seed=3)
    one = scorer.score(images, PROMPTS, batch_size=1)
    for batch_size in (2, 4, 16):
        torch.testing.assert_close(
            scorer.score(images, PROMPTS, batch_size=batch_size), one, atol=1e-5, rtol=0
        )


@pytest.mark.parametrize(
    ("width", "height", "box"),
    [
        (35, 32, (2, 0)),  # no resize; left = round(1.5) = 2 (a floor would give 1)
        (
            32,
            37,
            (0, 2),
        ),  # no resize; top = round(2.5) = 2: half to even, as Python's round
        (64, 40, (10, 0)),  # resized to 51x32; left = round(9.5) = 10
    ],
)
def test_preprocess_resize_and_centre_crop_geometry(
    width: int, height: int, box: tuple[int, int]
):
    """Column/row-coded image: the output is exactly the reference's crop window, normalised."""
    cols = np.arange(width, dtype=np.int64)[None, :] * 7 % 256
    rows = np.arange(height, dtype=np.int64)[:, None] * 13 % 256
    array = np.stack([np.broadcast_to(cols, (height, width)), np.broadcast_to(rows, (height, width)),
                      (cols + rows) % 256], axis=-1).astype(np.uint8)  # fmt: skip
    image = Image.fromarray(array)
    if min(width, height) != SIZE:
        short = min(width, height)
        resized = (
            (int(SIZE * width / short), SIZE)
            if height <= width
            else (SIZE, int(SIZE * height / short))
        )
        image_for_crop = image.resize(resized, Image.Resampling.BICUBIC)
    else:
        image_for_crop = image
    left, top = box
    window = (
        np.asarray(image_for_crop)[top : top + SIZE, left : left + SIZE].astype(
            np.float32
        )
        / 255
    )
    expected = (window - np.float32(CLIP_MEAN)) / np.float32(CLIP_STD)
    out = preprocess_image(image, SIZE)
    assert out.shape == (3, SIZE, SIZE) and out.dtype == np.float32
    np.testing.assert_allclose(out.transpose(1, 2, 0), expected, atol=1e-6, rtol=0)


def test_preprocess_drops_alpha_after_the_crop():
    """The reference converts to RGB after cropping: transparent pixels keep their colour (no white background)."""
    rgba = np.zeros((SIZE, SIZE, 4), dtype=np.uint8)
    rgba[..., :3] = (200, 10, 10)  # alpha 0 everywhere
    out = preprocess_image(Image.fromarray(rgba, "RGBA"), SIZE)
    expected = (np.float32([200, 10, 10]) / 255 - np.float32(CLIP_MEAN)) / np.float32(
        CLIP_STD
    )
    np.testing.assert_allclose(out[:, 5, 7], expected, atol=1e-6, rtol=0)


def test_preprocess_converts_to_rgb_after_resize_and_crop():
    """Resize and crop run in the image's own mode (RGBA: premultiplied alpha), then alpha is dropped."""
    rgba = Image.fromarray(
        np.random.default_rng(5).integers(0, 256, (40, 48, 4), dtype=np.uint8), "RGBA"
    )
    resized = rgba.resize(
        (38, SIZE), Image.Resampling.BICUBIC
    )  # int(32 * 48 / 40) = 38
    window = (
        np.asarray(resized.crop((3, 0, 3 + SIZE, SIZE)).convert("RGB")).astype(
            np.float32
        )
        / 255
    )  # round(3.0)
    expected = ((window - np.float32(CLIP_MEAN)) / np.float32(CLIP_STD)).transpose(
        2, 0, 1
    )
    out = preprocess_image(rgba, SIZE)
    np.testing.assert_allclose(out, expected, atol=1e-6, rtol=0)
    assert (
        np.abs(out - preprocess_image(rgba.convert("RGB"), SIZE)).max() > 0.1
    )  # converting first differs


def test_tokens_are_padded_and_truncated_to_35(tiny_imagereward: dict[str, Path]):
    scorer = _load(tiny_imagereward)
    vocab = {word: index for index, word in enumerate(WORDS)}
    long_prompt = " ".join(
        ["red", "cat"] * 30
    )  # 60 words -> 62 tokens with [CLS]/[SEP]
    tokens = scorer.tokens(["a red cat", long_prompt, "an [DEC] photo"])
    ids, mask = tokens["input_ids"], tokens["attention_mask"]
    assert ids.shape == mask.shape == (3, MAX_LENGTH) == (3, 35)
    assert ids[0, :5].tolist() == [
        vocab["[CLS]"],
        vocab["a"],
        vocab["red"],
        vocab["cat"],
        vocab["[SEP]"],
    ]
    assert (
        ids[0, 5:].eq(vocab["[PAD]"]).all() and mask[0].tolist() == [1] * 5 + [0] * 30
    )
    assert ids[1, -1] == vocab["[SEP]"] and mask[1].all()
    assert ids[1, 1:34].tolist() == [vocab["red"], vocab["cat"]] * 16 + [vocab["red"]]
    assert ids[2, 2] == len(
        WORDS
    )  # BLIP's added [DEC] special token is one token, not "[", "dec", "]"


def test_words_past_35_tokens_do_not_change_the_score(
    tiny_imagereward: dict[str, Path],
):
    scorer = _load(tiny_imagereward)
    image = _images(1)
    long_prompt = " ".join(["red", "cat"] * 20)
    base = scorer.score(image, [long_prompt])
    torch.testing.assert_close(
        scorer.score(image, [long_prompt + " blue dog green square"]),
        base,
        atol=0,
        rtol=0,
    )
    assert (scorer.score(image, ["blue " + long_prompt]) - base).abs().item() > 1e-4


def test_pickled_checkpoint_needs_allow_pickle(
    tiny_imagereward: dict[str, Path], tmp_path: Path
):
    """A file weights_only=True refuses (here a defaultdict) raises naming the file and allow_pickle=True."""
    state = torch.load(
        tiny_imagereward["weights"] / "ImageReward.pt", weights_only=True
    )
    torch.save(collections.defaultdict(list, state), tmp_path / "ImageReward.pt")
    (tmp_path / "med_config.json").write_text(json.dumps(MED))
    with pytest.raises(ValueError, match="allow_pickle=True") as error:
        _load(tiny_imagereward, weights=str(tmp_path))
    assert str(tmp_path / "ImageReward.pt") in str(error.value)
    images = _images(3)
    torch.testing.assert_close(
        _load(tiny_imagereward, weights=str(tmp_path), allow_pickle=True).score(
            images, PROMPTS[:3]
        ),
        _load(tiny_imagereward).score(images, PROMPTS[:3]),
        atol=0,
        rtol=0,
    )


@pytest.mark.parametrize(
    ("edit", "named"),
    [
        ("drop", "blip.visual_encoder.blocks.1.attn.qkv.weight"),
        ("drop", "blip.text_encoder.encoder.layer.0.crossattention.self.key.bias"),
        ("drop", "mlp.layers.7.bias"),
        ("add", "blip.text_encoder.pooler.dense.weight"),
        ("add", "blip.visual_encoder.head.weight"),
    ],
)
def test_checkpoint_key_mismatches_fail_loudly(
    tiny_imagereward: dict[str, Path], tmp_path: Path, edit: str, named: str
):
    state = torch.load(
        tiny_imagereward["weights"] / "ImageReward.pt", weights_only=True
    )
    if edit == "drop":
        del state[named]
    else:
        state[named] = torch.zeros(2, 2)
    torch.save(state, tmp_path / "ImageReward.pt")
    (tmp_path / "med_config.json").write_text(json.dumps(MED))
    with pytest.raises(
        ValueError, match=("missing" if edit == "drop" else "unexpected")
    ) as error:
        _load(tiny_imagereward, weights=str(tmp_path))
    assert named in str(error.value)


def test_key_mapping_round_trips_over_every_parameter(
    tiny_imagereward: dict[str, Path],
):
    scorer = _load(tiny_imagereward)
    keys = list(scorer.network.state_dict())
    assert (
        len(keys) == len(reference_state()) - 5
    )  # all but the projections and position_ids
    for key in keys:
        reference = ours_to_reference(key)
        assert reference is not None and reference_to_ours(reference) == key


def test_loader_options(tiny_imagereward: dict[str, Path]):
    """A .pt path works like its folder; unknown widths need vision_heads; unknown options raise."""
    images = _images(2)
    via_file = _load(
        tiny_imagereward, weights=str(tiny_imagereward["weights"] / "ImageReward.pt")
    )
    torch.testing.assert_close(
        via_file.score(images, PROMPTS[:2]),
        _load(tiny_imagereward).score(images, PROMPTS[:2]),
    )
    with pytest.raises(ValueError, match="vision_heads"):
        load_scorer(
            "imagereward",
            weights=str(tiny_imagereward["weights"]),
            tokenizer=str(tiny_imagereward["tokenizer"]),
        )
    with pytest.raises(TypeError, match="unknown options"):
        _load(tiny_imagereward, max_len=35)
    with pytest.raises(FileNotFoundError, match="med_config"):
        _load(tiny_imagereward, med_config=str(tiny_imagereward["root"] / "nope.json"))
    with pytest.raises(ValueError, match="prompts"):
        _load(tiny_imagereward).score(images, PROMPTS[:3])
    assert "imagereward" in available_scorers()


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_half_precision_runs_the_towers_in_that_dtype(
    tiny_imagereward: dict[str, Path], dtype: str
):
    scorer = _load(tiny_imagereward, dtype=dtype)
    half = {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    assert scorer.network.vision.embeddings.patch_embedding.weight.dtype == half
    assert scorer.network.text.embeddings.word_embeddings.weight.dtype == half
    assert scorer.network.mlp.layers[0].weight.dtype == torch.float32
    images = _images(4)
    scores = scorer.score(images, PROMPTS[:4])
    assert scores.dtype == torch.float32 and torch.isfinite(scores).all()
    torch.testing.assert_close(
        scores, _load(tiny_imagereward).score(images, PROMPTS[:4]), atol=0.15, rtol=0.05
    )
