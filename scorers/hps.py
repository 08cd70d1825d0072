"""HPSv2 and HPSv2.1 (Wu et al. 2023): an open_clip ViT-H-14 fine-tuned on HPD v2, scored as cos(image, prompt).

The reference (tgxs002/HPSv2 ``img_score.py``) builds open_clip ``ViT-H-14``, loads
``torch.load(HPS_v2[.1]_compressed.pt)["state_dict"]`` into it, and returns
``normalise(encode_image(x)) . normalise(encode_text(tokens))`` one image at a time.
diffalign does exactly that, batched, on open_clip itself (:mod:`.open_clip_scorer`).

Why open_clip and no longer a transformers ``CLIPModel`` port: the port existed only because
open_clip imports torchvision and no CPU torchvision paired with the CPU torch build. Now
torch and torchvision are installed as a matching pair and open_clip_torch is a dependency of
the scorers extra, so the reference network, its checkpoint keys and its tokenizer are used as
they are: no key renamer to keep right, one implementation shared with ``openclip:ARCH``.

Kept from the reference by hand, because open_clip 3 no longer ships it: the evaluation
transform of the HPSv2 fork (:func:`preprocess_hps_image`, ``ResizeMaxSize``), which resizes
the *float tensor* after ToTensor. The tokenizer is open_clip's ``SimpleTokenizer`` on the BPE
vocabulary bundled in open_clip (``get_tokenizer("ViT-H-14")``): nothing comes from the hub
but the checkpoint itself, and a local checkpoint needs no hub at all.
The reference scores under CUDA fp16 autocast; the default here is fp32
(``dtype="fp16"``/``"bf16"`` cast the whole model instead, as the other scorers).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from functools import partial
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from .base import load_checkpoint, register_scorer, resolve_file
from .clip_preprocess import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from .open_clip_scorer import OpenClipScorer, create_open_clip, open_clip_tokenizer

__all__ = [
    "HPS_ARCH",
    "HPS_CHECKPOINTS",
    "HPS_HUB_ID",
    "load_hps_state_dict",
    "preprocess_hps_image",
    "register_hps_scorers",
]

HPS_HUB_ID = "xswu/HPSv2"
HPS_CHECKPOINTS = {"hpsv2": "HPS_v2_compressed.pt", "hpsv2.1": "HPS_v2.1_compressed.pt"}
HPS_ARCH = "ViT-H-14"  # open_clip's architecture name, as img_score.py builds it
DEFAULT_BATCH_SIZE = 16


def load_hps_state_dict(path: str | Path, allow_pickle: bool = False) -> dict[str, torch.Tensor]:  # fmt: skip
    """``torch.load(path)["state_dict"]`` with ``weights_only=True``; a file that needs full unpickling
    raises ``ValueError`` naming it unless ``allow_pickle=True`` (arbitrary code can run: trusted files only)."""
    checkpoint = load_checkpoint(path, "hpsv2", allow_pickle)
    if not isinstance(checkpoint, Mapping) or "state_dict" not in checkpoint:
        found = sorted(checkpoint) if isinstance(checkpoint, Mapping) else type(checkpoint).__name__  # fmt: skip
        raise ValueError(f"{path}: expected a dict with key 'state_dict' (the HPS checkpoint format), found {found}")  # fmt: skip
    return dict(checkpoint["state_dict"])


def preprocess_hps_image(image: Image.Image, size: int) -> torch.Tensor:
    """PIL image -> ``[3, size, size]`` float32, in the order of the HPSv2 fork's eval transform.

    ``image_transform(size, is_train=False, resize_longest_max=True)`` in tgxs002/HPSv2
    ``hpsv2/src/open_clip/transform.py``: convert to RGB, **ToTensor first** (``x / 255``, float32),
    then ``ResizeMaxSize`` on that float tensor: scale = size / max(h, w), torchvision bicubic
    resize (antialiased, not clamped: bicubic may overshoot [0, 1], and it is kept) to
    ``(round(h * scale), round(w * scale))``, zero pad ``pad // 2`` left/top and the rest
    right/bottom; then Normalize with the OpenAI mean/std. No centre crop.

    Two departures, both where the reference cannot score at all: an RGBA image keeps its alpha
    there (4 channels, which the model rejects); here its colour channels are used, exactly the
    reference's first three (the resize works channel by channel). A non-square image whose long
    side already equals ``size`` is not padded there (so the model rejects it); here it is padded.
    """
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as TF

    pixels = TF.to_tensor(image if image.mode == "RGB" else image.convert("RGB"))
    height, width = pixels.shape[1:]
    scale = size / float(max(height, width))
    if scale != 1.0:
        height, width = round(height * scale), round(width * scale)
        pixels = TF.resize(pixels, [height, width], InterpolationMode.BICUBIC)
    if (height, width) != (size, size):
        pad_h, pad_w = size - height, size - width
        pixels = TF.pad(pixels, [pad_w // 2, pad_h // 2, pad_w - pad_w // 2, pad_h - pad_h // 2], fill=0)
    return TF.normalize(pixels, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)


def _load_strict(model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], path: Path, arch: str) -> None:
    """``load_state_dict(strict=True)``, its missing/unexpected keys reported against the file."""
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as error:
        detail = " ".join(str(error).split())[:600]
        raise ValueError(f"{path}: its state_dict does not fit open_clip {arch!r} ({detail})") from error


def _image_size(model: torch.nn.Module, arch: str) -> int:
    size = model.visual.image_size
    height, width = (size, size) if isinstance(size, int) else size
    if height != width:
        raise ValueError(f"open_clip {arch!r} takes {height}x{width} images; HPS preprocessing pads to a square")
    return int(height)


def _hps_loader(name: str) -> Callable[..., OpenClipScorer]:
    filename = HPS_CHECKPOINTS[name]

    def load(
        weights: str | None,
        device: torch.device,
        dtype: torch.dtype,
        arch: str = HPS_ARCH,
        allow_pickle: bool = False,
        batch_size: int = DEFAULT_BATCH_SIZE,
        **options: Any,
    ) -> OpenClipScorer:
        """``weights``: the checkpoint file, a folder holding it, or a hub id (None: ``xswu/HPSv2``).
        ``arch``: the open_clip architecture (tests register a tiny one with ``open_clip.add_model_config``)."""
        if options:
            raise TypeError(f"unknown options for scorer {name!r}: {sorted(options)}")
        # The checkpoint path first, before building a billion-parameter model: a typo fails fast.
        checkpoint = resolve_file(weights or HPS_HUB_ID, filename)
        state_dict = load_hps_state_dict(checkpoint, allow_pickle=allow_pickle)
        model = create_open_clip(arch)
        _load_strict(model, state_dict, checkpoint, arch)
        preprocess = partial(preprocess_hps_image, size=_image_size(model, arch))
        model = model.to(device=device, dtype=dtype)
        return OpenClipScorer(name, model, open_clip_tokenizer(arch), preprocess, 1.0, device, dtype, batch_size)

    return load


def register_hps_scorers() -> None:
    """Register ``hpsv2`` and ``hpsv2.1`` (idempotent)."""
    for name in HPS_CHECKPOINTS:
        register_scorer(name, _hps_loader(name), overwrite=True)
