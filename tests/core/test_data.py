"""Tests for diffalign.data: readers, decoding, transforms, dataset, sampler.

Everything is built in tmp_path (tiny parquet files, JPEG/PNG bytes); nothing
touches the network or the user's HF cache.
"""

from __future__ import annotations

import io
import json
import logging
import math
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from torch.utils.data import DataLoader

from diffalign.data import (
    BadRowError,
    EpochBatchSampler,
    GroupTransform,
    PreferenceDataset,
    PreferenceSource,
    SkipReport,
    collate_groups,
    decode_image,
    open_preference_source,
)

RED = (220, 20, 20)
BLUE = (20, 20, 220)
GREEN = (20, 200, 20)


# --------------------------------------------------------------------------- helpers


def encode(img: PIL.Image.Image, fmt: str = "JPEG", **kw: Any) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def jpeg(color: tuple[int, int, int], size: tuple[int, int] = (16, 16)) -> bytes:
    return encode(PIL.Image.new("RGB", size, color), quality=95)


def noisy_jpeg(seed: int = 0, size: int = 64) -> bytes:
    rng = np.random.default_rng(seed)
    return encode(PIL.Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)), quality=90)


def mean_color(img: PIL.Image.Image) -> tuple[float, ...]:
    return tuple(np.asarray(img, dtype=np.float64).reshape(-1, 3).mean(0))


def close_to(img: PIL.Image.Image, color: tuple[int, int, int], tol: float = 12.0) -> bool:
    return bool(np.all(np.abs(np.array(mean_color(img)) - np.array(color)) < tol))


def pair_row(label_0: float, caption: str | None = "a cat", c0: tuple[int, int, int] = RED,
             c1: tuple[int, int, int] = BLUE, **extra: Any) -> dict[str, Any]:
    row = {"jpg_0": jpeg(c0), "jpg_1": jpeg(c1), "label_0": label_0,
           "label_1": None if label_0 is None or math.isnan(label_0) else 1.0 - label_0, "caption": caption}
    row.update(extra)
    return row


def write_parquet(path: Path, rows: list[dict[str, Any]], drop: tuple[str, ...] = ()) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    cols: dict[str, list[Any]] = {k: [r[k] for r in rows] for k in rows[0] if k not in drop}
    types = {"jpg_0": pa.binary(), "jpg_1": pa.binary(), "label_0": pa.float64(), "label_1": pa.float64(),
             "caption": pa.string(), "ranking_id": pa.int64()}
    table = pa.table({k: pa.array(v, type=types.get(k)) for k, v in cols.items()})
    pq.write_table(table, path)
    return path


@pytest.fixture
def cache(tmp_path: Path) -> str:
    return str(tmp_path / "hf_cache")


def open_src(path: Path | str, cache: str, report: SkipReport | None = None, **kw: Any) -> PreferenceSource:
    return open_preference_source(str(path), report=report if report is not None else SkipReport(), cache_dir=cache, **kw)


# --------------------------------------------------------------------------- Pick-a-Pic rows


def test_winner_first_and_ties(tmp_path: Path, cache: str) -> None:
    f = write_parquet(tmp_path / "pairs.parquet", [pair_row(1.0), pair_row(0.0), pair_row(0.5)])
    report = SkipReport()
    src = open_src(f, cache, report)
    assert isinstance(src, PreferenceSource)
    assert len(src) == 2
    g0, g1 = src.load(0), src.load(1)
    assert close_to(g0.images[0], RED) and close_to(g0.images[1], BLUE)  # label_0 == 1: image 0 wins
    assert close_to(g1.images[0], BLUE) and close_to(g1.images[1], RED)  # label_0 == 0: image 1 wins
    assert g0.scores == [1.0, 0.0] and g1.scores == [1.0, 0.0]
    assert g0.prompt == "a cat" and g0.captions is None
    assert all(im.mode == "RGB" for im in g0.images)
    assert (g0.row_id, g1.row_id) == ("pairs.parquet:0", "pairs.parquet:1")
    assert report.counts == {"tie": 1} and report.total == 1 and report.rows_seen == 3
    assert "skipped 1 of 3 rows: 1 tie" in report.summary()
    assert "pairs.parquet:2" in report.summary()

    report2 = SkipReport()
    kept = open_src(f, cache, report2, drop_ties=False)
    assert len(kept) == 3 and report2.total == 0
    tie = kept.load(2)
    assert close_to(tie.images[0], RED) and tie.scores == [0.5, 0.5]
    assert kept.fingerprint() != src.fingerprint()


def test_bad_rows_reported_and_skipped(tmp_path: Path, cache: str) -> None:
    truncated = noisy_jpeg()
    rows = [
        pair_row(1.0, ranking_id=100),
        pair_row(1.0, ranking_id=101) | {"jpg_1": b"definitely not an image"},
        pair_row(0.0, ranking_id=102) | {"jpg_0": truncated[: len(truncated) // 2]},
        pair_row(1.0, caption="", ranking_id=103),
        pair_row(1.0, caption=None, ranking_id=104),
        pair_row(1.0, caption="   ", ranking_id=105),
        pair_row(0.7, ranking_id=106),
        pair_row(float("nan"), ranking_id=107),
        pair_row(1.0, ranking_id=108) | {"label_1": 1.0},  # labels do not sum to 1
        pair_row(0.0, ranking_id=109),
    ]
    f = write_parquet(tmp_path / "dirty.parquet", rows)
    report = SkipReport()
    src = open_src(f, cache, report)

    # cheap checks: labels and captions, images untouched
    assert report.counts == {"missing caption": 3, "label out of {0, 0.5, 1}": 3}
    skipped_ids = {e.row_id for ex in report.examples.values() for e in ex}
    assert skipped_ids == {f"dirty.parquet:{i}" for i in (103, 104, 105, 106, 107, 108)}
    assert [src.row_id(i) for i in range(len(src))] == [f"dirty.parquet:{i}" for i in (100, 101, 102, 109)]

    # decode failures surface at load time as BadRowError naming file and row
    assert close_to(src.load(0).images[0], RED)
    with pytest.raises(BadRowError, match=r"dirty\.parquet: row dirty\.parquet:101: undecodable image") as e1:
        src.load(1)
    assert e1.value.row_id == "dirty.parquet:101"
    with pytest.raises(BadRowError, match="truncated") as e2:
        src.load(2)
    assert e2.value.reason.startswith("undecodable image")

    # ... and through the dataset/collate path they reach the report in the main process
    ds = PreferenceDataset(src, GroupTransform(8), seed=0)
    batch = collate_groups([ds[(0, i)] for i in range(len(src))])
    assert batch["row_ids"] == ["dirty.parquet:100", "dirty.parquet:109"]
    assert [rid for rid, _ in batch["skipped"]] == ["dirty.parquet:101", "dirty.parquet:102"]
    report.record_all(src.name, batch["skipped"])
    assert report.counts["undecodable image"] == 2
    summary = report.summary()
    assert "skipped 8 of 10 rows" in summary and "dirty.parquet:101" in summary


def test_label_only_label_0_and_optional_columns(tmp_path: Path, cache: str) -> None:
    rows = [pair_row(0.0, caption_0="red thing", caption_1="blue thing", model_0="m-a", model_1="m-b"),
            pair_row(2.0, caption_0="x", caption_1="y", model_0="m-a", model_1="m-b")]
    f = write_parquet(tmp_path / "extra.parquet", rows, drop=("label_1",))
    report = SkipReport()
    src = open_src(f, cache, report)
    assert len(src) == 1 and report.counts == {"label out of {0, 0.5, 1}": 1}
    g = src.load(0)
    assert g.captions == ["blue thing", "red thing"]  # winner first
    assert g.models == ["m-b", "m-a"]
    assert g.scores == [1.0, 0.0]


def test_max_rows_stops_scanning(tmp_path: Path, cache: str) -> None:
    f = write_parquet(tmp_path / "m.parquet", [pair_row(0.5), pair_row(1.0), pair_row(0.5), pair_row(0.0), pair_row(0.5)])
    report = SkipReport()
    src = open_src(f, cache, report, max_rows=2)
    assert [src.row_id(i) for i in range(len(src))] == ["m.parquet:1", "m.parquet:3"]
    assert report.counts == {"tie": 2} and report.rows_seen == 4


def test_missing_column_names_column_and_file(tmp_path: Path, cache: str) -> None:
    f = write_parquet(tmp_path / "nolabel.parquet", [pair_row(1.0)], drop=("label_0",))
    with pytest.raises(ValueError, match="label_0") as exc:
        open_src(f, cache)
    assert str(f) in str(exc.value)


def test_missing_path_names_path(tmp_path: Path, cache: str) -> None:
    missing = tmp_path / "nowhere" / "pairs.parquet"
    with pytest.raises(FileNotFoundError, match="expected a .parquet file") as exc:
        open_src(missing, cache)
    assert str(missing) in str(exc.value)
    manifest = tmp_path / "nope.jsonl"
    with pytest.raises(FileNotFoundError, match="JSONL manifest") as exc2:
        open_src(manifest, cache)
    assert str(manifest) in str(exc2.value)


def test_directory_of_shards_selects_split(tmp_path: Path, cache: str) -> None:
    root = tmp_path / "pickapic"
    write_parquet(root / "data" / "train-00000-of-00002.parquet", [pair_row(1.0, caption="train a0"), pair_row(1.0, caption="train a1")])
    write_parquet(root / "data" / "train-00001-of-00002.parquet", [pair_row(1.0, caption="train b0")])
    write_parquet(root / "data" / "validation-00000-of-00001.parquet", [pair_row(1.0, caption="val 0")])
    write_parquet(root / "data" / "validation_unique-00000-of-00001.parquet", [pair_row(1.0, caption="val u")])

    train = open_src(root, cache, split="train")
    assert [train.load(i).prompt for i in range(len(train))] == ["train a0", "train a1", "train b0"]
    assert train.row_id(2) == "data/train-00001-of-00002.parquet:0"  # row ids name the shard
    val = open_src(root, cache, split="validation")
    assert [val.load(i).prompt for i in range(len(val))] == ["val 0"]
    with pytest.raises(FileNotFoundError, match="splits found") as exc:
        open_src(root, cache, split="test")
    assert "validation_unique" in str(exc.value)

    # split as sub-folders
    sub = tmp_path / "bysplit"
    write_parquet(sub / "train" / "part0.parquet", [pair_row(1.0, caption="t")])
    write_parquet(sub / "test" / "part0.parquet", [pair_row(1.0, caption="x"), pair_row(0.0, caption="y")])
    test = open_src(sub, cache, split="test")
    assert [test.load(i).prompt for i in range(len(test))] == ["x", "y"]

    # a directory with no split names is one split
    flat = tmp_path / "flat"
    write_parquet(flat / "a.parquet", [pair_row(1.0, caption="a")])
    write_parquet(flat / "b.parquet", [pair_row(1.0, caption="b")])
    assert len(open_src(flat, cache, split="train")) == 2


def test_save_to_disk_folder_loads(tmp_path: Path, cache: str) -> None:
    import datasets

    rows = [pair_row(0.0, ranking_id=7), pair_row(0.5, ranking_id=8)]
    data = {k: [r[k] for r in rows] for k in rows[0]}
    datasets.Dataset.from_dict(data).save_to_disk(str(tmp_path / "saved"))
    report = SkipReport()
    src = open_src(tmp_path / "saved", cache, report)
    assert len(src) == 1 and src.row_id(0) == "saved:7" and report.counts == {"tie": 1}
    assert close_to(src.load(0).images[0], BLUE)

    dd = datasets.DatasetDict({"train": datasets.Dataset.from_dict(data), "test": datasets.Dataset.from_dict(data)})
    dd.save_to_disk(str(tmp_path / "saved_dict"))
    assert len(open_src(tmp_path / "saved_dict", cache, split="test", drop_ties=False)) == 2
    with pytest.raises(KeyError, match="validation"):
        open_src(tmp_path / "saved_dict", cache, split="validation")


def test_fingerprint_stable_and_tracks_data(tmp_path: Path, cache: str) -> None:
    f = write_parquet(tmp_path / "fp.parquet", [pair_row(1.0), pair_row(0.0)])
    a, b = open_src(f, cache), open_src(f, cache)
    assert a.fingerprint() == b.fingerprint()
    assert open_src(f, cache, max_rows=1).fingerprint() != a.fingerprint()
    write_parquet(f, [pair_row(1.0), pair_row(0.0), pair_row(1.0)])
    assert open_src(f, cache).fingerprint() != a.fingerprint()


# --------------------------------------------------------------------------- JSONL


def test_jsonl_manifest(tmp_path: Path, cache: str) -> None:
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    (imgs / "r.jpg").write_bytes(jpeg(RED))
    (imgs / "b.jpg").write_bytes(jpeg(BLUE))
    abs_green = tmp_path / "g.png"
    abs_green.write_bytes(encode(PIL.Image.new("RGB", (8, 8), GREEN), "PNG"))
    lines = [
        json.dumps({"prompt": "p1", "chosen": "imgs/r.jpg", "rejected": "imgs/b.jpg"}),  # 1 ok
        '{"prompt": "p2", "chosen": "imgs/r.jpg"',  # 2 bad json
        json.dumps({"prompt": "p3", "chosen": "imgs/r.jpg"}),  # 3 missing key
        json.dumps({"prompt": "p4", "chosen": "imgs/r.jpg", "rejected": "imgs/missing.jpg"}),  # 4 missing file
        "",  # 5 blank: ignored
        json.dumps({"prompt": "", "chosen": "imgs/r.jpg", "rejected": "imgs/b.jpg"}),  # 6 empty prompt
        json.dumps({"prompt": "p7", "chosen": str(abs_green), "rejected": "imgs/r.jpg",
                    "chosen_caption": "green", "rejected_caption": "red"}),  # 7 ok, absolute path
    ]
    manifest = tmp_path / "pairs.jsonl"
    manifest.write_text("\n".join(lines) + "\n")
    report = SkipReport()
    src = open_src(manifest, cache, report)
    assert len(src) == 2
    assert [src.row_id(i) for i in range(2)] == ["pairs.jsonl:1", "pairs.jsonl:7"]
    assert report.counts == {"invalid JSON": 1, "missing key": 1, "missing image file": 1, "missing caption": 1}
    by_cat = {k: [e.row_id for e in v] for k, v in report.examples.items()}
    assert by_cat == {"invalid JSON": ["pairs.jsonl:2"], "missing key": ["pairs.jsonl:3"],
                      "missing image file": ["pairs.jsonl:4"], "missing caption": ["pairs.jsonl:6"]}
    assert "rejected" in report.examples["missing key"][0].reason
    assert "missing.jpg" in report.examples["missing image file"][0].reason
    g = src.load(0)
    assert g.prompt == "p1" and close_to(g.images[0], RED) and close_to(g.images[1], BLUE)
    g7 = src.load(1)
    assert g7.captions == ["green", "red"] and close_to(g7.images[0], GREEN)
    fp = src.fingerprint()
    assert open_src(manifest, cache).fingerprint() == fp
    (imgs / "b.jpg").write_bytes(jpeg(BLUE, size=(17, 16)))  # a referenced image changes
    assert open_src(manifest, cache).fingerprint() != fp


# --------------------------------------------------------------------------- decoding


def test_decode_modes_to_rgb() -> None:
    kw = {"row_id": "r", "source": "s"}
    cmyk = decode_image(encode(PIL.Image.new("CMYK", (8, 8), (0, 255, 255, 0))), **kw)
    assert cmyk.mode == "RGB" and close_to(cmyk, (255, 0, 0), tol=20)

    rgba = PIL.Image.new("RGBA", (2, 1), (0, 0, 0, 0))
    rgba.putpixel((1, 0), (0, 0, 255, 128))
    out = np.asarray(decode_image(encode(rgba, "PNG"), **kw))
    assert out[0, 0].tolist() == [255, 255, 255]  # fully transparent black -> white
    assert abs(int(out[0, 1, 0]) - 127) <= 2 and out[0, 1, 2] == 255  # half blue over white

    la = decode_image(encode(PIL.Image.new("LA", (4, 4), (0, 0)), "PNG"), **kw)
    assert np.asarray(la).min() == 255

    gray = decode_image(encode(PIL.Image.new("L", (8, 8), 90)), **kw)
    assert gray.mode == "RGB" and close_to(gray, (90, 90, 90), tol=3)

    i16 = PIL.Image.fromarray(np.array([[0, 32768, 65535]], dtype=np.uint16))
    assert np.asarray(decode_image(encode(i16, "PNG"), **kw))[0, :, 0].tolist() == [0, 128, 255]
    i32 = PIL.Image.fromarray(np.array([[0, 65535]], dtype=np.int32), mode="I")
    assert np.asarray(decode_image(encode(i32, "TIFF"), **kw))[0, :, 0].tolist() == [0, 255]

    pal = PIL.Image.new("P", (4, 4), 1)
    pal.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    assert np.asarray(decode_image(encode(pal, "PNG"), **kw))[0, 0].tolist() == [10, 200, 30]
    pal_t = pal.copy()
    pal_t.putpixel((0, 0), 0)
    buf = encode(pal_t, "PNG", transparency=0)
    out_t = np.asarray(decode_image(buf, **kw))
    assert out_t[0, 0].tolist() == [255, 255, 255] and out_t[1, 1].tolist() == [10, 200, 30]


def test_decode_errors_name_row(tmp_path: Path) -> None:
    with pytest.raises(BadRowError, match=r"src\.parquet: row src\.parquet:5: undecodable image"):
        decode_image(b"\x00\x01", row_id="src.parquet:5", source="src.parquet")
    with pytest.raises(BadRowError, match="undecodable image"):
        decode_image(tmp_path / "gone.jpg", row_id="m:1", source="m")
    err = BadRowError("s", "s:1", "undecodable image: x")
    assert pickle.loads(pickle.dumps(err)).reason == err.reason


# --------------------------------------------------------------------------- transforms


def halves(w: int, h: int) -> PIL.Image.Image:
    """Left half black, right half white: shows flips."""
    arr = np.zeros((h, w, 3), dtype=np.uint8)
    arr[:, w // 2 :] = 255
    return PIL.Image.fromarray(arr)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_sdxl_size_conditioning_official_first_image_and_per_image() -> None:
    """A group of a portrait winner and a landscape loser: the three reference conventions, and the default
    training config uses the official code's [res, res, 0, 0, res, res]; the pixels never change."""
    from diffalign.backbones import sdxl_time_ids
    from diffalign.config import DataConfig

    images = [PIL.Image.new("RGB", (512, 768)), PIL.Image.new("RGB", (768, 512))]
    out = {mode: GroupTransform(512, size_conditioning=mode)(images, gen(0)) for mode in ("official", "first_image", "per_image")}
    ids = {mode: sdxl_time_ids(o.original_sizes, o.crop_top_lefts, 512).tolist() for mode, o in out.items()}
    assert ids["official"] == [[512, 512, 0, 0, 512, 512]] * 2
    assert ids["first_image"] == [[768, 512, 128, 0, 512, 512]] * 2
    assert ids["per_image"] == [[768, 512, 128, 0, 512, 512], [512, 768, 0, 128, 512, 512]]
    assert torch.equal(out["official"].pixel_values, out["per_image"].pixel_values)
    assert DataConfig(path="x").sdxl_size_conditioning == "official"
    with pytest.raises(ValueError, match="size_conditioning"):
        GroupTransform(512, size_conditioning="mine")  # type: ignore[arg-type]


def test_transform_center_crop_sdxl_coords() -> None:
    t = GroupTransform(512)
    out = t([PIL.Image.new("RGB", (512, 768)), PIL.Image.new("RGB", (768, 512))], gen(0))
    assert out.pixel_values.shape == (2, 3, 512, 512) and out.pixel_values.dtype == torch.float32
    assert out.original_sizes.tolist() == [[768, 512], [512, 768]]  # (h, w)
    assert out.crop_top_lefts.tolist() == [[128, 0], [0, 128]]  # (top, left)
    assert out.original_sizes.dtype == torch.int64 and out.crop_top_lefts.dtype == torch.int64

    # 330x200 -> shorter side 100 -> 165x100; slack 65; centre left = round(32.5) = 32
    small = GroupTransform(100, center_crop=True)
    assert small([PIL.Image.new("RGB", (330, 200))], gen(0)).crop_top_lefts.tolist() == [[0, 32]]


def test_transform_flip_mirrors_left_and_is_group_wide() -> None:
    t_flip = GroupTransform(100, center_crop=True, random_flip=True)
    t_plain = GroupTransform(100, center_crop=True)
    img = halves(330, 200)
    base = t_plain([img], gen(0))
    flips = 0
    for seed in range(16):
        out = t_flip([img, img.copy()], gen(seed))
        assert torch.equal(out.pixel_values[0], out.pixel_values[1])  # one decision per group
        if torch.equal(out.pixel_values[0], base.pixel_values[0]):
            assert out.crop_top_lefts.tolist() == [[0, 32], [0, 32]]
        else:
            assert torch.equal(out.pixel_values[0], torch.flip(base.pixel_values[0], dims=[-1]))
            assert out.crop_top_lefts.tolist() == [[0, 165 - 32 - 100]] * 2  # w_resized - left - res
            flips += 1
    assert 0 < flips < 16


def test_transform_random_crop_shared_fraction_and_deterministic() -> None:
    t = GroupTransform(100, center_crop=False)
    a, b = halves(400, 200), halves(800, 200)  # resized 200x100 (slack 100) and 400x100 (slack 300)
    out = t([a, b], gen(3))
    (ta, la), (tb, lb) = out.crop_top_lefts.tolist()
    assert ta == tb == 0 and abs(lb - 3 * la) <= 2
    again = t([a, b], gen(3))
    assert torch.equal(out.pixel_values, again.pixel_values) and torch.equal(out.crop_top_lefts, again.crop_top_lefts)
    lefts = {tuple(t([a], gen(s)).crop_top_lefts[0].tolist()) for s in range(8)}
    assert len(lefts) > 1
    assert out.pixel_values.min() >= -1.0 and out.pixel_values.max() <= 1.0
    assert out.pixel_values.min() == -1.0 and out.pixel_values.max() == 1.0


def test_transform_identical_pair_identical_tensors() -> None:
    rng = np.random.default_rng(1)
    img = PIL.Image.fromarray(rng.integers(0, 256, (90, 130, 3), dtype=np.uint8))
    out = GroupTransform(64, center_crop=False, random_flip=True)([img, img.copy()], gen(5))
    assert torch.equal(out.pixel_values[0], out.pixel_values[1])


# --------------------------------------------------------------------------- sampler


def flatten(batches: list[list[tuple[int, int]]]) -> list[tuple[int, int]]:
    return [k for b in batches for k in b]


def take(it: Any, n: int) -> list[Any]:
    return [next(it) for _ in range(n)]


def test_sampler_order_epochs_and_coverage() -> None:
    s = EpochBatchSampler(10, 3, seed=1)
    assert len(s) == 3
    first = take(iter(s), 9)
    assert first == take(iter(EpochBatchSampler(10, 3, seed=1)), 9)
    assert first != take(iter(EpochBatchSampler(10, 3, seed=2)), 9)
    assert all(len(b) == 3 for b in first)
    for e in range(3):
        keys = flatten(first[3 * e : 3 * e + 3])
        assert {ep for ep, _ in keys} == {e}
        assert len(set(i for _, i in keys)) == 9  # each index at most once, one dropped (drop_last)
    assert s.permutation(0) != s.permutation(1)
    assert sorted(s.permutation(4)) == list(range(10))

    full = list(EpochBatchSampler(10, 3, seed=1, drop_last=False, num_epochs=2))
    assert [len(b) for b in full] == [3, 3, 3, 1] * 2
    for e in range(2):
        assert sorted(i for ep, i in flatten(full) if ep == e) == list(range(10))
    assert [i for _, i in flatten(list(EpochBatchSampler(5, 2, seed=0, shuffle=False, num_epochs=1)))] == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="no batches"):
        EpochBatchSampler(2, 3, seed=0)


@pytest.mark.parametrize("k", [0, 1, 2, 3, 7, 11])
def test_sampler_start_batch_is_exact_tail(k: int) -> None:
    whole = take(iter(EpochBatchSampler(10, 3, seed=5)), 15)
    resumed = take(iter(EpochBatchSampler(10, 3, seed=5, start_batch=k)), 15 - k)
    assert resumed == whole[k:]


# --------------------------------------------------------------------------- dataset + collate


def test_dataset_collate_and_dataloader(tmp_path: Path, cache: str) -> None:
    rows = [pair_row(float(i % 2)) for i in range(6)]
    rows[3]["jpg_0"] = b"broken"
    f = write_parquet(tmp_path / "dl.parquet", rows)
    report = SkipReport()
    src = open_src(f, cache, report)
    ds = PreferenceDataset(src, GroupTransform(8, center_crop=False, random_flip=True), seed=0)

    item = ds[(0, 0)]
    assert set(item) == {"row_id", "prompt", "captions", "pixel_values", "original_sizes", "crop_top_lefts", "scores"}
    assert item["pixel_values"].shape == (2, 3, 8, 8) and item["scores"].tolist() == [1.0, 0.0]
    assert torch.equal(ds[(2, 4)]["pixel_values"], ds[(2, 4)]["pixel_values"])
    assert ds[(0, 3)] == {"row_id": "dl.parquet:3", "bad": ds[(0, 3)]["bad"]}
    with pytest.raises(TypeError, match=r"\(epoch, index\)"):
        ds[0]  # type: ignore[index]

    sampler = EpochBatchSampler(len(ds), 3, seed=0, num_epochs=1)
    batches = list(DataLoader(ds, batch_sampler=sampler, collate_fn=collate_groups, num_workers=0))
    assert len(batches) == 2
    for b in batches:
        report.record_all(src.name, b["skipped"])
        n = len(b["row_ids"])
        assert b["pixel_values"].shape == (n, 2, 3, 8, 8)
        assert b["original_sizes"].shape == (n, 2, 2) and b["crop_top_lefts"].shape == (n, 2, 2)
        assert b["scores"].shape == (n, 2) and len(b["prompts"]) == n and b["captions"] is None
    assert report.counts == {"undecodable image": 1}
    assert sorted(r for b in batches for r in b["row_ids"]) == [f"dl.parquet:{i}" for i in (0, 1, 2, 4, 5)]

    # pure function of (seed, epoch, index): workers give the same batches, dataset pickles
    ds2 = pickle.loads(pickle.dumps(ds))
    assert torch.equal(ds2[(1, 2)]["pixel_values"], ds[(1, 2)]["pixel_values"])
    multi = list(DataLoader(ds, batch_sampler=sampler, collate_fn=collate_groups, num_workers=2))
    for b0, b1 in zip(batches, multi):
        assert b0["row_ids"] == b1["row_ids"] and torch.equal(b0["pixel_values"], b1["pixel_values"])


def test_collate_all_bad_and_captions() -> None:
    out = collate_groups([{"row_id": "a:1", "bad": "undecodable image: x"}, {"row_id": "a:2", "bad": "undecodable image: y"}])
    assert out["row_ids"] == [] and out["skipped"] == [("a:1", "undecodable image: x"), ("a:2", "undecodable image: y")]
    assert "pixel_values" not in out

    def item(rid: str) -> dict[str, Any]:
        return {"row_id": rid, "prompt": "p", "captions": ["w", "l"], "pixel_values": torch.zeros(2, 3, 4, 4),
                "original_sizes": torch.zeros(2, 2, dtype=torch.int64), "crop_top_lefts": torch.zeros(2, 2, dtype=torch.int64),
                "scores": None}

    b = collate_groups([item("x:1"), {"row_id": "x:2", "bad": "undecodable image: z"}, item("x:3")])
    assert b["captions"] == [["w", "l"], ["w", "l"]] and b["scores"] is None
    assert b["pixel_values"].shape == (2, 2, 3, 4, 4) and b["skipped"] == [("x:2", "undecodable image: z")]


# --------------------------------------------------------------------------- report


def test_skip_report_logging_and_summary(caplog: pytest.LogCaptureFixture) -> None:
    report = SkipReport(max_examples=2, log_first=3, log_every=5)
    with caplog.at_level(logging.WARNING, logger="diffalign.data"):
        for i in range(10):
            report.record("src", f"src:{i}", "tie" if i % 2 else "undecodable image: bad bytes")
    msgs = [r.getMessage() for r in caplog.records]
    assert msgs[0] == "skipping row src:0 of src: undecodable image: bad bytes"
    assert sum(m.startswith("skipping row") for m in msgs) == 3
    assert sum(m.startswith("skipped 5 rows so far") or m.startswith("skipped 10 rows so far") for m in msgs) == 2
    report.add_rows(120)
    assert report.counts == {"tie": 5, "undecodable image": 5} and report.total == 10
    s = report.summary()
    assert s.splitlines()[0] == "skipped 10 of 120 rows: 5 tie, 5 undecodable image"
    assert "rows src:1, src:3..." in s and "bad bytes" in s
    clone = pickle.loads(pickle.dumps(report))  # DataLoader workers pickle it
    clone.record("src", "src:x", "tie")
    assert clone.counts["tie"] == 6 and report.counts["tie"] == 5


def test_hub_id_uses_load_dataset(tmp_path: Path, cache: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The Hub path is exercised without network: load_dataset is replaced for the hub id only."""
    import datasets

    calls: list[tuple[str, str | None]] = []
    real = datasets.load_dataset
    rows = [pair_row(1.0, ranking_id=11), pair_row(0.0, ranking_id=12), pair_row(0.5, ranking_id=13)]
    fake = datasets.Dataset.from_dict({k: [r[k] for r in rows] for k in rows[0]})

    def load_dataset(path: str, *args: Any, split: str | None = None, **kw: Any) -> Any:
        if path == "someone/pickapic_mini":
            calls.append((path, split))
            return fake
        return real(path, *args, split=split, **kw)

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    monkeypatch.chdir(tmp_path)  # make sure no local "someone/" folder exists
    report = SkipReport()
    src = open_preference_source("someone/pickapic_mini", split="validation", report=report, cache_dir=cache)
    assert calls == [("someone/pickapic_mini", "validation")]
    assert src.name == "someone/pickapic_mini[validation]"
    assert [src.row_id(i) for i in range(len(src))] == ["someone/pickapic_mini[validation]:11", "someone/pickapic_mini[validation]:12"]
    assert close_to(src.load(1).images[0], BLUE) and report.counts == {"tie": 1}


def test_image_manifest_reader_reports_bad_lines_and_resolves_paths(tmp_path):
    """The {"image", "prompt", "model"?} manifests generate writes and score/rank/the arena read."""
    from diffalign.data.manifest import read_manifest

    lines = [
        json.dumps({"image": "a.png", "prompt": "a red circle", "model": "m1"}),
        "not json",
        json.dumps({"prompt": "no image"}),
        json.dumps({"image": "b.png", "prompt": " "}),
        "",
        json.dumps({"image": str(tmp_path / "abs.png"), "prompt": "a blue square"}),
    ]
    (tmp_path / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    report, named = SkipReport(), set()
    rows = read_manifest(tmp_path, report, named=named)  # a folder means DIR/manifest.jsonl
    assert [(r.row_id, r.key, r.prompt, r.model) for r in rows] == [
        ("manifest.jsonl:1", "a.png", "a red circle", "m1"),
        ("manifest.jsonl:6", str(tmp_path / "abs.png"), "a blue square", None),
    ]
    assert rows[0].image == tmp_path / "a.png"
    assert report.counts == {"bad manifest row": 2, "missing prompt": 1} and report.rows_seen == 5
    assert (tmp_path / "b.png").resolve() in named  # prompt-less rows still name their image
    with pytest.raises(FileNotFoundError, match="no such manifest"):
        read_manifest(tmp_path / "missing", SkipReport())


def test_a_report_merges_an_earlier_reports_counts() -> None:
    """Rows a cache builder skipped keep counting in the run that trains from the cache."""
    earlier = SkipReport(log_first=0)
    earlier.add_rows(10)
    earlier.record("pairs.parquet", "3", "tie")
    earlier.record("pairs.parquet", "7", "undecodable image: bad bytes")
    run = SkipReport(log_first=0)
    run.add_rows(5)
    run.record("cache", "1", "tie")
    run.merge(earlier.to_dict())
    assert (run.total, run.rows_seen) == (3, 15)
    assert run.counts == {"tie": 2, "undecodable image": 1}
