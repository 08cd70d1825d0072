"""How arena images are displayed (scaled up, blind, padded per pair) and what the page says at a reveal."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from diffalign.apps.arena.display import (
    blind_pair_files,
    display_image,
    display_png,
    padded_size,
    with_text_chunk,
)
from diffalign.apps.arena.page import PageOptions, caption_classes, reveal_captions, reveal_summary


def random_image(width: int, height: int, seed: int) -> Image.Image:
    """Random RGB pixels from a private generator: every pixel differs from its neighbours."""
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def colours(image: Image.Image) -> set[tuple[int, ...]]:
    return {tuple(c) for c in np.asarray(image.convert("RGB")).reshape(-1, 3)}


def test_nearest_scales_32px_to_512px_as_16px_blocks_of_the_original_colours():
    source = random_image(32, 32, seed=1)
    shown = display_image(source, 512, "nearest")
    assert shown.size == (512, 512)
    pixels = np.asarray(shown)
    assert colours(shown) == colours(source), "nearest adds no colour"
    blocks = pixels.reshape(32, 16, 32, 16, 3)
    assert np.array_equal(blocks, np.broadcast_to(np.asarray(source)[:, None, :, None], blocks.shape)), \
        "each source pixel becomes one 16x16 square"


def test_bicubic_scales_smoothly_and_none_leaves_the_pixels():
    source = random_image(32, 32, seed=2)
    smooth = display_image(source, 512, "bicubic")
    assert smooth.size == (512, 512)
    assert len(colours(smooth) - colours(source)) > 1000, "bicubic blends neighbours into new colours"
    def largest_step(image: Image.Image) -> int:
        return int(np.abs(np.diff(np.asarray(image).astype(int), axis=1)).max())

    assert largest_step(smooth) < largest_step(display_image(source, 512, "nearest")) / 2, "no hard block edges"
    assert display_image(source, 512, "none") is source


def test_only_small_images_are_scaled_keeping_their_aspect():
    wide = random_image(64, 32, seed=3)
    assert display_image(wide, 512, "nearest").size == (512, 256)
    large = random_image(600, 300, seed=4)
    assert display_image(large, 512, "bicubic") is large, "already as large as the display: untouched"
    with pytest.raises(ValueError, match="unknown upscale filter 'lanczos'; valid: nearest, bicubic, none"):
        display_image(wide, 512, "lanczos")


def test_display_png_drops_metadata_and_keeps_alpha(tmp_path):
    rgba = Image.fromarray(np.dstack([np.asarray(random_image(16, 16, seed=5)),
                                      np.full((16, 16), 128, np.uint8)]), "RGBA")
    path = tmp_path / "a.png"
    rgba.save(path, pnginfo=_text_info("model", "secret-model-name"))
    png = display_png(path, 64, "nearest", path.stat().st_mtime_ns)
    assert b"secret-model-name" not in png
    shown = Image.open(io.BytesIO(png))
    assert shown.mode == "RGBA" and shown.size == (64, 64) and np.all(np.asarray(shown)[..., 3] == 128)


def _text_info(key: str, value: str):
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text(key, value)
    return info


def test_text_chunk_pads_exactly_and_keeps_the_pixels():
    source = random_image(32, 32, seed=6)
    buffer = io.BytesIO()
    source.save(buffer, format="png")
    png = buffer.getvalue()
    padded = with_text_chunk(png, 8192)
    assert len(padded) == 8192
    decoded = Image.open(io.BytesIO(padded))
    decoded.load()
    assert np.array_equal(np.asarray(decoded), np.asarray(source)) and len(decoded.info["nonce"]) > 0
    assert with_text_chunk(png, 8192) != padded, "a fresh nonce every time"
    with pytest.raises(ValueError, match="cannot pad"):
        with_text_chunk(png, len(png))


def test_a_pair_is_padded_to_one_size_class_in_fresh_folders(tmp_path):
    small, large = (_png(random_image(8, 8, seed=7)), _png(random_image(64, 64, seed=8)))
    assert padded_size(len(small)) != padded_size(len(large))
    first = blind_pair_files(small, large, tmp_path)
    second = blind_pair_files(small, large, tmp_path)
    sizes = {len(open(path, "rb").read()) for path in first + second}
    assert len(sizes) == 1 and sizes.pop() % 4096 == 0, "both sides, every showing: one size"
    assert len({path.rsplit("/", 2)[-2] for path in first + second}) == 4, "a new folder (URL) per image and showing"
    assert all(path.endswith("/image.png") for path in first)
    assert not list(tmp_path.rglob("*.tmp")), "written under a temporary name, then renamed"


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="png")
    return buffer.getvalue()


def test_reveal_captions_name_both_models_and_mark_the_pick():
    left, right = reveal_captions("left", "model-a", "model-b")
    assert "model-a" in left and "your pick" in left and "model-b" in right and "your pick" not in right
    assert all("tie" in caption for caption in reveal_captions("tie", "a", "b"))
    assert all("both bad" in caption for caption in reveal_captions("both_bad", "a", "b"))
    assert caption_classes("right", "right") == ["arena-caption", "arena-picked"]
    assert caption_classes("right", "left") == caption_classes(None, "right") == ["arena-caption"]
    summary = reveal_summary({"accepted": True, "left_model": "a", "right_model": "b"}, "right",
                             PageOptions(reveal="pause", reveal_seconds=1.5))
    assert "Right is better" in summary and "next pair comes in 1.5 s" in summary
    refused = reveal_summary({"accepted": False, "reason": "token already used"}, "left", PageOptions())
    assert refused.startswith("**Vote not counted:** token already used") and "Next" in refused


@pytest.mark.parametrize("kwargs, message", [
    ({"upscale": "lanczos"}, "--upscale 'lanczos': expected one of nearest, bicubic, none"),
    ({"display_size": 10}, "--display-size 10: expected 64 to 4096"),
    ({"reveal": "never"}, "--reveal 'never': expected one of next, pause"),
    ({"reveal_seconds": 0}, "--reveal-seconds 0: expected more than 0 and at most 60"),
])
def test_page_options_refuse_bad_values_naming_the_flag(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PageOptions(**kwargs)


def test_arena_command_refuses_bad_display_options_with_a_message(toy_arena_sources, tmp_path, capsys):
    from diffalign.apps.cli import main

    sources = [arg for path in toy_arena_sources.values() for arg in ("--source", str(path))]
    database = tmp_path / "votes.sqlite"
    assert main(["arena", *sources, "--db", str(database), "--reveal", "pause", "--reveal-seconds", "0"]) == 2
    assert "diffalign arena: error: --reveal-seconds 0: expected more than 0" in capsys.readouterr().err
    assert main(["arena", *sources, "--db", str(database), "--display-size", "8"]) == 2
    assert "--display-size 8: expected 64 to 4096 pixels" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["arena", *sources, "--db", str(database), "--upscale", "lanczos"])
    assert "invalid choice: 'lanczos'" in capsys.readouterr().err
