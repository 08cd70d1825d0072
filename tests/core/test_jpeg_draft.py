"""Reduced-size JPEG decoding (``data.jpeg_draft``) and the DataLoader worker default.

Why these tests: a reduced-size decode must change only how the pixels are computed, never what the model
is told about the image (SDXL's original size and crop) or which rows are judged too small; and the
pixels it gives must be those of the full decode to within a resize's rounding.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import PIL.Image
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from diffalign.config import DataConfig
from diffalign.data import PreferenceDataset, SkipReport, open_preference_source
from diffalign.data.images import ORIGINAL_SIZE, decode_image, original_size
from diffalign.data.transforms import GroupTransform


def photo(width: int, height: int, seed: int = 0) -> PIL.Image.Image:
    """A smooth picture with some texture, as photos are (pure noise has no meaning at a lower scale)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    channels = [np.sin(6 * x + 2 * k) * np.cos(5 * y - k) for k in range(3)]
    smooth = (np.stack(channels, -1) * 0.5 + 0.5) * 230
    noise = rng.normal(0, 6, (height, width, 3))
    return PIL.Image.fromarray(np.clip(smooth + noise, 0, 255).astype(np.uint8))


def encoded(img: PIL.Image.Image, fmt: str = "JPEG", **options) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, fmt, **options)
    return buffer.getvalue()


def test_a_large_jpeg_decodes_at_the_smallest_scale_that_covers_the_side():
    data = encoded(photo(1024, 768), quality=90)
    full = decode_image(data, row_id="r", source="s")
    drafted = decode_image(data, row_id="r", source="s", min_side=96)
    assert full.size == (1024, 768) and ORIGINAL_SIZE not in full.info
    assert drafted.size == (128, 96)  # 1/8: the shorter side 768 / 8 = 96 still covers 96
    assert original_size(drafted) == original_size(full) == (768, 1024)
    assert decode_image(data, row_id="r", source="s", min_side=97).size == (256, 192)  # 1/8 would be too small: 1/4
    assert decode_image(data, row_id="r", source="s", min_side=2048).size == (1024, 768)  # never upscaled


def test_other_formats_and_small_jpegs_decode_at_full_size():
    png = decode_image(encoded(photo(512, 512), "PNG"), row_id="r", source="s", min_side=64)
    assert png.size == (512, 512) and original_size(png) == (512, 512)
    small = decode_image(encoded(photo(64, 48)), row_id="r", source="s", min_side=64)
    assert small.size == (64, 48)


def test_a_png_text_chunk_cannot_pose_as_the_original_size():
    from PIL.PngImagePlugin import PngInfo

    chunk = PngInfo()
    chunk.add_text(ORIGINAL_SIZE, "(9999, 9999)")
    decoded = decode_image(encoded(photo(32, 24), "PNG", pnginfo=chunk), row_id="r", source="s", min_side=8)
    assert original_size(decoded) == (24, 32)


def test_the_exif_rotated_jpeg_keeps_its_turned_full_size():
    exif = PIL.Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees: the viewer shows it 768 wide, 1024 high
    data = encoded(photo(1024, 768), quality=90, exif=exif.tobytes())
    drafted = decode_image(data, row_id="r", source="s", min_side=96)
    assert drafted.size == (96, 128)
    assert original_size(drafted) == original_size(decode_image(data, row_id="r", source="s")) == (1024, 768)


@pytest.mark.parametrize("size_conditioning", ["per_image", "first_image"])
def test_the_transform_of_a_drafted_decode_matches_the_full_decode(size_conditioning):
    """Same sizes and crops exactly; pixels within a resize's rounding. Measured (AMD EPYC, Pillow's
    libjpeg-turbo): mean |diff| 0.0023 (128 px) and 0.0045 (96 px) of the [-1, 1] range, max 0.016 and 0.031
    (2 and 4 grey levels of 255). The bounds, 0.01 and 0.08 (10 levels), leave room for another CPU's
    SIMD DCT, and still fail a crop one pixel off (mean 0.014 on these pictures), a flip (0.57) or swapped
    channels (0.34)."""
    images = [encoded(photo(1024, 768, seed=1), quality=92), encoded(photo(900, 1200, seed=2), quality=92)]
    for resolution in (128, 96):
        transform = GroupTransform(resolution, center_crop=False, random_flip=True, size_conditioning=size_conditioning)
        full = transform([decode_image(d, row_id="r", source="s") for d in images], torch.Generator().manual_seed(3))
        drafted_images = [decode_image(d, row_id="r", source="s", min_side=resolution) for d in images]
        assert all(min(img.size) < 768 for img in drafted_images), "the test must exercise a reduced decode"
        drafted = transform(drafted_images, torch.Generator().manual_seed(3))
        assert torch.equal(drafted.original_sizes, full.original_sizes)
        assert torch.equal(drafted.crop_top_lefts, full.crop_top_lefts)
        difference = (drafted.pixel_values - full.pixel_values).abs()
        assert float(difference.mean()) < 0.01 and float(difference.max()) < 0.08, (resolution, difference.mean(), difference.max())


def test_the_training_dataset_decodes_reduced_only_when_asked(tmp_path: Path):
    rows = {"jpg_0": [encoded(photo(640, 480, seed=4))], "jpg_1": [encoded(photo(480, 640, seed=5))],
            "label_0": [1.0], "label_1": [0.0], "caption": ["a picture"]}
    path = tmp_path / "pairs.parquet"
    pq.write_table(pa.table(rows), path)
    source = open_preference_source(str(path), report=SkipReport(), cache_dir=str(tmp_path / "hf"))
    transform = GroupTransform(64, center_crop=True, size_conditioning="per_image")
    full = PreferenceDataset(source, transform, seed=0)
    drafted = PreferenceDataset(source, transform, seed=0, jpeg_draft=True)
    assert drafted.decode_min_side == 64 and full.decode_min_side is None
    assert [img.size for img in source.load(0, 64).images] == [(160, 120), (120, 160)]  # 1/4: 1/8 would leave 60 px
    a, b = full[(0, 0)], drafted[(0, 0)]
    assert torch.equal(a["original_sizes"], b["original_sizes"]) and a["original_sizes"].tolist() == [[480, 640], [640, 480]]
    assert float((a["pixel_values"] - b["pixel_values"]).abs().mean()) < 0.01


def test_a_tiny_image_is_judged_by_its_full_size_not_the_drafted_one(tmp_path: Path):
    """check_image_sizes must see the stored size: a 4 x 4 px placeholder stays bad, a 64 px image decoded at 8 px stays good."""
    from diffalign.data.images import check_image_sizes

    drafted = decode_image(encoded(photo(64, 64)), row_id="r", source="s", min_side=8)
    assert drafted.size == (8, 8)
    check_image_sizes([drafted], row_id="r", source="s")  # the full 64 px decides
    from diffalign.data.types import BadRowError

    with pytest.raises(BadRowError, match="image too small: image 0 is 4x4 px"):
        check_image_sizes([decode_image(encoded(photo(4, 4)), row_id="r", source="s", min_side=2)], row_id="r", source="s")


def test_loader_workers_auto_decodes_in_workers_but_reads_a_cache_in_process(monkeypatch):
    data = DataConfig(path="pairs.parquet")
    assert data.num_workers == "auto" and data.jpeg_draft is True
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    assert data.loader_workers(reads_cache=False) == 1
    assert data.loader_workers(reads_cache=True) == 0
    monkeypatch.setattr("os.cpu_count", lambda: 32)
    assert data.loader_workers(reads_cache=False) == 4
    assert DataConfig(path="p", num_workers=0).loader_workers(reads_cache=False) == 0
    assert DataConfig(path="p", num_workers=3).loader_workers(reads_cache=True) == 3
    with pytest.raises(ValueError):
        DataConfig(path="p", num_workers=-1)


def test_the_latent_cache_key_records_a_drafted_decode():
    from diffalign.cache import cache_key
    from diffalign.config import ModelConfig

    model = ModelConfig(path="/nowhere")
    drafted = cache_key(model, DataConfig(path="p"), "fp")
    full = cache_key(model, DataConfig(path="p", jpeg_draft=False), "fp")
    assert drafted["jpeg_draft"] is True and "jpeg_draft" not in full
