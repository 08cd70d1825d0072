"""Decode preference images to fully loaded RGB.

Why a dedicated decoder: ``PIL.Image.open`` is lazy, so a truncated JPEG only
fails when pixels are first touched -- deep inside a DataLoader worker. And
``img.convert("RGB")`` is wrong for several modes that appear in scraped data:
it drops alpha (transparent pixels turn into whatever colour they stored,
often black), and it clips 16-bit grayscale (most pixels become white).
"""

from __future__ import annotations

import io
import math
import re
from pathlib import Path

import numpy as np
import PIL.Image
import PIL.ImageOps

from diffalign.data.types import BadRowError

__all__ = ["MIN_IMAGE_SIDE", "ORIGINAL_SIZE", "check_image_sizes", "decode_image", "original_size", "to_rgb"]

# Preference images smaller than this on a side are placeholders (tracking pixels, failed generations),
# not pictures: upscaled to the training resolution they become flat colour. The toy world's smallest images are 8 px.
MIN_IMAGE_SIDE = 8

_WHITE = (255, 255, 255, 255)
# Where a reduced-size decode keeps the image's full (h, w): SDXL's size conditioning and the crop geometry
# must be those of the full image, not of the smaller one the decoder returned.
ORIGINAL_SIZE = "diffalign_original_size"
# EXIF orientations that turn the image by 90 degrees (its width and height swap).
_SIDEWAYS = {5, 6, 7, 8}


def decode_image(data: bytes | str | Path, *, row_id: str, source: str, min_side: int | None = None) -> PIL.Image.Image:
    """Decode ``data`` (encoded bytes or a file path) into a loaded RGB image.

    ``min_side``: the image will only be used with its shorter side resized to this many pixels, so a
    JPEG may be decoded at 1/2, 1/4 or 1/8 of its size (libjpeg's DCT scaling, Pillow's ``draft``) as long
    as the shorter side stays at least ``min_side``. A 1024 px photo for 256 px training decodes 4x
    smaller and several times faster. The full (h, w) is kept in ``image.info[ORIGINAL_SIZE]``
    (read it with :func:`original_size`). Other formats ignore it.

    The EXIF orientation is applied (images come out as a viewer shows them).
    Any decoding error -- unknown format, truncation, an empty file,
    unreadable file -- becomes ``BadRowError("undecodable image: ...")`` naming
    ``source`` and ``row_id``; a header that claims more than twice Pillow's
    ``Image.MAX_IMAGE_PIXELS`` (a decompression bomb) ``"image too large: ..."``. Note that Pillow's global
    ``ImageFile.LOAD_TRUNCATED_IMAGES = True`` would make truncated files load.
    """
    if isinstance(data, (bytes, bytearray, memoryview)):
        opener: str | Path | io.BytesIO = io.BytesIO(bytes(data))
        what = f"{len(data)} bytes"
    elif isinstance(data, (str, Path)):
        opener = Path(data)
        what = str(data)
    else:
        raise TypeError(
            f"{source}: row {row_id}: decode_image expects bytes or a path, got {type(data).__name__}"
        )
    try:
        with PIL.Image.open(opener) as opened:
            width, height = opened.size
            if min_side is not None and opened.format == "JPEG":
                scale = min_side / min(width, height)
                if scale < 1:  # draft keeps both sides >= the request, so the shorter one stays >= min_side
                    opened.draft("RGB", (math.ceil(width * scale), math.ceil(height * scale)))
            opened.load()  # force full decode here, so truncated files fail now
            drafted = opened.size != (width, height)
            rgb = to_rgb(PIL.ImageOps.exif_transpose(opened))
            if rgb is opened:  # closing `opened` would invalidate it
                rgb = rgb.copy()
            rgb.info.pop(ORIGINAL_SIZE, None)  # a PNG text chunk of that name must not pose as one
            if drafted:
                if opened.getexif().get(0x0112) in _SIDEWAYS:  # exif_transpose turned it: the sides swap
                    width, height = height, width
                rgb.info[ORIGINAL_SIZE] = (height, width)
            return rgb
    except PIL.Image.DecompressionBombError as exc:  # the header claims more than 2x Image.MAX_IMAGE_PIXELS
        raise BadRowError(source, row_id, f"image too large: {exc} ({what})") from exc
    except Exception as exc:  # Pillow raises OSError, SyntaxError, ValueError...
        detail = re.sub(r" <_io\.BytesIO object at 0x[0-9a-f]+>", "", str(exc))  # no memory addresses in reports
        raise BadRowError(source, row_id, f"undecodable image: {type(exc).__name__}: {detail} ({what})") from exc


def to_rgb(img: PIL.Image.Image) -> PIL.Image.Image:
    """Convert a loaded image of any common mode to RGB.

    * transparency (RGBA, LA, PA, RGBa, La, P/L/RGB with a ``transparency``
      entry) is composited onto white;
    * 16/32-bit integer grayscale (I;16*, I) is rescaled to 8 bits: I;16 by
      /257, I by /257 when its maximum exceeds 255 (16-bit PNGs load as I);
    * float grayscale (F) is taken as [0, 1] when its maximum is <= 1, else
      clipped to [0, 255];
    * CMYK, YCbCr, LAB, HSV, L, 1 and opaque P go through Pillow's converter.
    """
    mode = img.mode
    if mode == "RGB":
        return img
    if mode.startswith("I;16") or mode == "I":
        arr = np.asarray(img).astype(np.float64)
        if mode.startswith("I;16") or (arr.size and arr.max() > 255):
            arr = arr / 257.0
        gray = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
        return PIL.Image.fromarray(gray, mode="L").convert("RGB")
    if mode == "F":
        arr = np.asarray(img).astype(np.float64)
        if arr.size and np.nanmax(arr) <= 1.0:
            arr = arr * 255.0
        gray = np.clip(np.rint(np.nan_to_num(arr)), 0, 255).astype(np.uint8)
        return PIL.Image.fromarray(gray, mode="L").convert("RGB")
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info
    if has_alpha:
        rgba = img.convert("RGBA")
        background = PIL.Image.new("RGBA", rgba.size, _WHITE)
        return PIL.Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def original_size(image: PIL.Image.Image) -> tuple[int, int]:
    """(h, w) of the image as stored, before any reduced-size decode (see :func:`decode_image`)."""
    return image.info.get(ORIGINAL_SIZE, (image.height, image.width))


def check_image_sizes(images: list[PIL.Image.Image], *, row_id: str, source: str) -> None:
    """BadRowError ``"image too small: ..."`` when an image of a preference row has a side under MIN_IMAGE_SIDE."""
    for i, img in enumerate(images):
        height, width = original_size(img)
        if min(height, width) < MIN_IMAGE_SIDE:
            raise BadRowError(
                source, row_id,
                f"image too small: image {i} is {width}x{height} px (preference images need both sides >= {MIN_IMAGE_SIDE})",
            )
