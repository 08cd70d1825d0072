"""Group-consistent image augmentation for preference data.

Why group-consistent: preference objectives compare the model's fit to the
winner and the loser of the *same* prompt. If the two images were cropped or
flipped differently, part of the measured preference would be the
augmentation, not the image. So one crop decision and one flip decision are
drawn per group and applied to every image of it.

The recorded ``original_sizes`` / ``crop_top_lefts`` are SDXL's
micro-conditioning inputs, recorded the way diffusers'
``train_text_to_image_sdxl.py`` does: the size of the decoded image (its full size when a JPEG was
decoded at a reduced scale, ``decode_image(min_side=...)``) and the
(top, left) of the crop in the resized image -- mirrored to
``w_resized - left - resolution`` when the crop is flipped.

Which sizes SDXL is conditioned on differs between the reference implementations; ``size_conditioning``
offers all three (``DataConfig.sdxl_size_conditioning`` documents the trade-off):

* ``official``: every image as an uncropped square, ``[res, res, 0, 0, res, res]``, as the official
  DiffusionDPO code (Wallace et al., 2023) trains SDXL. The model is told nothing about the photo's
  size or crop; sampling uses the same ids, so training and generation agree.
* ``first_image``: image 0's original size and crop for the whole group, as diffusers' DPO and MaPO
  scripts do (one ``add_time_ids`` per row, repeated for both images).
* ``per_image``: each image's own size and crop, as diffusers' SDXL fine-tuning script does for
  single images; winner and loser then differ in conditioning as well as in content.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import PIL.Image
import torch

from diffalign.data.images import original_size

__all__ = ["GroupPixels", "GroupTransform", "SizeConditioning"]

SizeConditioning = Literal["official", "first_image", "per_image"]


@dataclass
class GroupPixels:
    """Pixels and SDXL size conditioning for one group of K images."""

    pixel_values: torch.Tensor  # [K, 3, res, res] float32 in [-1, 1]
    original_sizes: torch.Tensor  # [K, 2] int64 (h, w) of the decoded image
    crop_top_lefts: torch.Tensor  # [K, 2] int64 (top, left) in the resized image


class GroupTransform:
    """Resize shorter side to ``resolution``, square-crop, optionally flip, to [-1, 1].

    Args:
        resolution: output side length in pixels.
        center_crop: centre crop; otherwise a random crop whose position is
            the same *fraction* (u, v) of each image's slack, so images of
            different aspect in one group are cropped alike.
        random_flip: horizontally flip the whole group with probability 0.5.
        size_conditioning: which sizes and crops are recorded for SDXL (see the module docstring).

    Randomness comes only from the generator passed to ``__call__``; three
    numbers (u, v, flip) are always drawn, so the generator advances the same
    way whatever the options.
    """

    def __init__(
        self, resolution: int, center_crop: bool = True, random_flip: bool = False, size_conditioning: SizeConditioning = "per_image"
    ) -> None:
        if resolution <= 0:
            raise ValueError(f"GroupTransform: resolution must be positive, got {resolution}")
        if size_conditioning not in ("official", "first_image", "per_image"):
            raise ValueError(f"GroupTransform: size_conditioning must be official, first_image or per_image, got {size_conditioning!r}")
        self.resolution = resolution
        self.center_crop = center_crop
        self.random_flip = random_flip
        self.size_conditioning = size_conditioning

    def __repr__(self) -> str:
        return (
            f"GroupTransform(resolution={self.resolution}, center_crop={self.center_crop}, "
            f"random_flip={self.random_flip}, size_conditioning={self.size_conditioning!r})"
        )

    def resized_size(self, height: int, width: int) -> tuple[int, int]:
        """(h, w) after resizing the shorter side to ``resolution`` (torchvision's rounding)."""
        res = self.resolution
        if height <= width:
            return res, max(res, int(res * width / height))
        return max(res, int(res * height / width)), res

    def __call__(self, images: list[PIL.Image.Image], generator: torch.Generator) -> GroupPixels:
        if not images:
            raise ValueError("GroupTransform: got an empty image group")
        res = self.resolution
        draws = torch.rand(3, generator=generator, dtype=torch.float64).tolist()
        u, v = (0.5, 0.5) if self.center_crop else (draws[0], draws[1])
        flip = self.random_flip and draws[2] < 0.5

        pixels: list[torch.Tensor] = []
        sizes: list[tuple[int, int]] = []
        crops: list[tuple[int, int]] = []
        for img in images:
            if img.mode != "RGB":
                raise ValueError(f"GroupTransform expects RGB images (see decode_image), got mode {img.mode}")
            h, w = original_size(img)  # the full image's, also when it was decoded at a reduced size
            rh, rw = self.resized_size(h, w)
            resized = img.resize((rw, rh), resample=PIL.Image.Resampling.BILINEAR, reducing_gap=None)
            if self.center_crop:
                # Same rounding as torchvision's CenterCrop and the SDXL script.
                top = int(round((rh - res) / 2.0))
                left = int(round((rw - res) / 2.0))
            else:
                top = int(round(u * (rh - res)))
                left = int(round(v * (rw - res)))
            crop = resized.crop((left, top, left + res, top + res))
            if flip:
                crop = crop.transpose(PIL.Image.Transpose.FLIP_LEFT_RIGHT)
                left = rw - left - res
            arr = np.asarray(crop, dtype=np.uint8)
            t = torch.from_numpy(arr.copy()).permute(2, 0, 1).to(torch.float32)
            pixels.append(t / 127.5 - 1.0)
            sizes.append((h, w))
            crops.append((top, left))
        if self.size_conditioning == "official":
            sizes, crops = [(res, res)] * len(images), [(0, 0)] * len(images)
        elif self.size_conditioning == "first_image":
            sizes, crops = [sizes[0]] * len(images), [crops[0]] * len(images)
        return GroupPixels(
            pixel_values=torch.stack(pixels),
            original_sizes=torch.tensor(sizes, dtype=torch.int64),
            crop_top_lefts=torch.tensor(crops, dtype=torch.int64),
        )
