"""How the arena's images reach the browser: scaled up for judging, re-encoded blind, padded per pair.

Why scale on the server: a 32 px toy image, or a 256 px thumbnail, shown in a 512 px box is
scaled by the browser with its own smoothing, which blurs pixel art into mush. ``nearest``
keeps every source pixel a crisp square and adds no colour the model did not paint (the right
choice for toy and pixel-art models, and the default); ``bicubic`` is smoother and suits small
photographs; ``none`` leaves the pixels alone and lets the browser scale them. Only images whose
longer side is under ``display_size`` are scaled, up to that size, keeping the aspect ratio.

Blinding: the encoded PNG of each item is computed once (metadata dropped, only pixels), and
every showing gets a copy with a fresh random ``tEXt`` chunk, written under a new random folder:
the URL of one showing says nothing about another. Both images of a pair are padded to the same
size class (:func:`padded_size`), so neither the byte size nor the side names a model.
Adding the chunk to cached bytes costs a CRC, where re-encoding a 512 px PNG costs ~10 ms.
"""

from __future__ import annotations

import functools
import io
import secrets
import struct
import zlib
from pathlib import Path

import PIL.Image

from diffalign.atomic import staged_file

__all__ = ["DEFAULT_DISPLAY_SIZE", "UPSCALE_FILTERS", "blind_pair_files", "display_image", "display_png",
           "padded_size", "with_text_chunk"]

DEFAULT_DISPLAY_SIZE = 512
UPSCALE_FILTERS = {"nearest": PIL.Image.Resampling.NEAREST, "bicubic": PIL.Image.Resampling.BICUBIC, "none": None}
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
NONCE_KEY = b"nonce"
CHUNK_OVERHEAD = 12 + len(NONCE_KEY) + 1  # length, type, CRC, keyword and its NUL separator
MIN_NONCE_CHARS = 32


def display_image(image: PIL.Image.Image, display_size: int = DEFAULT_DISPLAY_SIZE,
                  upscale: str = "nearest") -> PIL.Image.Image:
    """``image`` scaled so its longer side is ``display_size`` if it is shorter (else unchanged).

    ``upscale`` is a key of :data:`UPSCALE_FILTERS`; ``none`` never scales.
    """
    if upscale not in UPSCALE_FILTERS:
        raise ValueError(f"unknown upscale filter {upscale!r}; valid: {', '.join(UPSCALE_FILTERS)}")
    if display_size < 1:
        raise ValueError(f"display size must be a positive number of pixels, got {display_size}")
    longer = max(image.size)
    resample = UPSCALE_FILTERS[upscale]
    if resample is None or longer >= display_size:
        return image
    scale = display_size / longer
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(size, resample)


@functools.lru_cache(maxsize=64)  # the recent images: ~100 MB at most for 1024 px PNGs, far less for small ones
def display_png(path: Path, display_size: int, upscale: str, mtime_ns: int) -> bytes:
    """The PNG bytes (pixels only, no metadata) of the image at ``path`` as displayed; cached per file version."""
    del mtime_ns  # part of the cache key only: an edited file is read again
    with PIL.Image.open(path) as image:
        image.load()
        clean = image.convert("RGBA" if image.mode in ("RGBA", "LA", "PA") else "RGB")
    shown = display_image(clean, display_size, upscale)
    with io.BytesIO() as buffer:
        shown.save(buffer, format="png")
        return buffer.getvalue()


def padded_size(size: int) -> int:
    """``size`` rounded up to a size class: a multiple of 4 KiB, or of 1/16 of the power of two above it."""
    quantum = max(4096, (1 << (size - 1).bit_length()) // 16)
    return -(-size // quantum) * quantum


def with_text_chunk(png: bytes, total_size: int) -> bytes:
    """``png`` with a random ``tEXt`` nonce chunk after its header, making the file exactly ``total_size`` bytes."""
    if not png.startswith(PNG_SIGNATURE):
        raise ValueError("not a PNG: the signature is missing")
    header_end = len(PNG_SIGNATURE) + 8 + struct.unpack(">I", png[8:12])[0] + 4  # IHDR: length, type, data, CRC
    text_chars = total_size - len(png) - CHUNK_OVERHEAD
    if text_chars < 1:
        raise ValueError(f"cannot pad a {len(png)}-byte PNG to {total_size} bytes")
    data = NONCE_KEY + b"\0" + secrets.token_hex((text_chars + 1) // 2)[:text_chars].encode()
    chunk = struct.pack(">I", len(data)) + b"tEXt" + data + struct.pack(">I", zlib.crc32(b"tEXt" + data))
    return png[:header_end] + chunk + png[header_end:]


def blind_pair_files(left: bytes, right: bytes, folder: str | Path) -> tuple[str, str]:
    """Both PNGs with fresh nonces, padded to one size class, each written as ``folder/<random>/image.png``.

    Each file is written under a temporary name and renamed; the random folder names make the URLs new.
    """
    total = padded_size(max(len(left), len(right)) + CHUNK_OVERHEAD + MIN_NONCE_CHARS)
    paths = []
    for png in (left, right):
        target = Path(folder) / secrets.token_hex(16) / "image.png"
        with staged_file(target) as staging:
            staging.write_bytes(with_text_chunk(png, total))
        paths.append(str(target))
    return paths[0], paths[1]
