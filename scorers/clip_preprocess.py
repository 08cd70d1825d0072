"""CLIP image preprocessing in PIL + numpy, step for step as transformers' ``CLIPImageProcessor``.

transformers' CLIP processor (PIL backend, the one used without torchvision):

1. RGB: images with an alpha channel are composited onto white, others ``convert("RGB")``;
2. resize so the shortest edge is ``size`` (the long edge ``int(size * long / short)``,
   floored), PIL bicubic (``resample=3``);
3. centre crop ``crop_size`` at ``top = (H - h) // 2``, ``left = (W - w) // 2``
   (zero padding first when the image is smaller than the crop);
4. ``x.astype(float64) * rescale_factor`` (1/255), cast to float32;
5. ``(x - mean) / std`` in float32 with the OpenAI mean/std.

Sizes, mean/std, resample and the ``do_*`` switches are read from
``preprocessor_config.json`` next to the weights when present (old configs
write ``size: 224`` as an int, newer ones ``{"shortest_edge": 224}``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

__all__ = [
    "OPENAI_CLIP_MEAN",
    "OPENAI_CLIP_STD",
    "ClipPreprocessConfig",
    "preprocess_batch",
    "preprocess_image",
]

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PREPROCESSOR_CONFIG = "preprocessor_config.json"


@dataclass(frozen=True)
class ClipPreprocessConfig:
    """The fields of a CLIP ``preprocessor_config.json`` the pipeline uses (defaults: OpenAI CLIP at 224)."""

    shortest_edge: int | None = 224  # resize the shortest edge to this ...
    resize_hw: tuple[int, int] | None = (
        None  # ... or, for {"height", "width"} sizes, to exactly (h, w)
    )
    crop_hw: tuple[int, int] = (224, 224)
    mean: tuple[float, ...] = OPENAI_CLIP_MEAN
    std: tuple[float, ...] = OPENAI_CLIP_STD
    rescale_factor: float = 1 / 255
    resample: int = 3  # PIL.Image.BICUBIC
    do_convert_rgb: bool = True
    do_resize: bool = True
    do_center_crop: bool = True
    do_rescale: bool = True
    do_normalize: bool = True

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> ClipPreprocessConfig:
        """Parse a processor config dict (int or dict ``size`` / ``crop_size``)."""
        defaults = cls()
        shortest_edge, resize_hw = defaults.shortest_edge, defaults.resize_hw
        size = config.get("size")
        if isinstance(size, int):
            shortest_edge, resize_hw = size, None
        elif isinstance(size, Mapping):
            if size.get("shortest_edge") is not None:
                if size.get("longest_edge") is not None:
                    raise ValueError(
                        "size with both shortest_edge and longest_edge is not supported for CLIP"
                    )
                shortest_edge, resize_hw = int(size["shortest_edge"]), None
            elif size.get("height") is not None and size.get("width") is not None:
                shortest_edge, resize_hw = (
                    None,
                    (int(size["height"]), int(size["width"])),
                )
            else:
                raise ValueError(f"unsupported processor size {dict(size)}")
        crop = config.get("crop_size", defaults.crop_hw)
        if isinstance(crop, int):
            crop_hw = (crop, crop)
        elif isinstance(crop, Mapping):
            crop_hw = (int(crop["height"]), int(crop["width"]))
        else:
            crop_hw = (int(crop[0]), int(crop[1]))

        def flag(key: str) -> bool:
            value = config.get(key)
            return getattr(defaults, key) if value is None else bool(value)

        resample = config.get("resample")
        return cls(
            shortest_edge=shortest_edge,
            resize_hw=resize_hw,
            crop_hw=crop_hw,
            mean=tuple(float(m) for m in config.get("image_mean") or defaults.mean),
            std=tuple(float(s) for s in config.get("image_std") or defaults.std),
            rescale_factor=float(
                config.get("rescale_factor") or defaults.rescale_factor
            ),
            resample=defaults.resample if resample is None else int(resample),
            do_convert_rgb=flag("do_convert_rgb"),
            do_resize=flag("do_resize"),
            do_center_crop=flag("do_center_crop"),
            do_rescale=flag("do_rescale"),
            do_normalize=flag("do_normalize"),
        )

    @classmethod
    def from_pretrained(cls, path_or_id: str) -> ClipPreprocessConfig:
        """Read ``preprocessor_config.json`` from a local folder or a hub id.

        A local folder without that file gets the OpenAI CLIP defaults (224,
        OpenAI mean/std); a hub id must have it.
        """
        folder = Path(path_or_id)
        if folder.is_dir():
            file = folder / PREPROCESSOR_CONFIG
            return (
                cls.from_dict(json.loads(file.read_text())) if file.is_file() else cls()
            )
        from transformers.image_processing_base import ImageProcessingMixin

        config, _ = ImageProcessingMixin.get_image_processor_dict(path_or_id)
        return cls.from_dict(config)


def _to_rgb(image: Image.Image) -> Image.Image:
    """transformers' ``convert_to_rgb``: alpha is composited onto a white background."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _resize(image: Image.Image, config: ClipPreprocessConfig) -> Image.Image:
    if config.resize_hw is not None:
        height, width = config.resize_hw
    else:
        assert config.shortest_edge is not None
        width, height = image.size
        short, long = (width, height) if width <= height else (height, width)
        new_short, new_long = (
            config.shortest_edge,
            int(config.shortest_edge * long / short),
        )
        height, width = (
            (new_long, new_short) if width <= height else (new_short, new_long)
        )
    return image.resize((width, height), resample=config.resample)


def _center_crop(array: np.ndarray, crop_hw: tuple[int, int]) -> np.ndarray:
    """[H, W, C] -> [h, w, C]; zero-pads (centred, ceil on the leading side) when the image is smaller."""
    height, width = array.shape[:2]
    crop_h, crop_w = crop_hw
    top, left = (height - crop_h) // 2, (width - crop_w) // 2
    if top >= 0 and left >= 0 and top + crop_h <= height and left + crop_w <= width:
        return array[top : top + crop_h, left : left + crop_w]
    new_h, new_w = max(crop_h, height), max(crop_w, width)
    padded = np.zeros((new_h, new_w, *array.shape[2:]), dtype=array.dtype)
    top_pad, left_pad = math.ceil((new_h - height) / 2), math.ceil((new_w - width) / 2)
    padded[top_pad : top_pad + height, left_pad : left_pad + width] = array
    top, left = max(0, top + top_pad), max(0, left + left_pad)
    return padded[top : top + crop_h, left : left + crop_w]


def preprocess_image(image: Image.Image, config: ClipPreprocessConfig) -> np.ndarray:
    """One PIL image -> ``[3, h, w]`` float32 array, exactly as ``CLIPImageProcessor``."""
    if config.do_convert_rgb:
        image = _to_rgb(image)
    if config.do_resize:
        image = _resize(image, config)
    array = np.asarray(image)
    if array.ndim == 2:
        array = array[:, :, None]
    if config.do_center_crop:
        array = _center_crop(array, config.crop_hw)
    if config.do_rescale:
        array = (array.astype(np.float64) * config.rescale_factor).astype(np.float32)
    if config.do_normalize:
        array = array.astype(np.float32)
        mean = np.asarray(config.mean, dtype=np.float32)
        std = np.asarray(config.std, dtype=np.float32)
        array = (array - mean) / std
    return np.ascontiguousarray(array.transpose(2, 0, 1))


def preprocess_batch(
    images: Sequence[Image.Image], config: ClipPreprocessConfig
) -> torch.Tensor:
    """PIL images -> ``pixel_values`` ``[N, 3, h, w]`` float32."""
    return torch.from_numpy(
        np.stack([preprocess_image(image, config) for image in images])
    )
