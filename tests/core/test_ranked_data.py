"""Ranked preference lists (RankDPO data) and the toy world's ranked / dual-caption generators.

Images are solid colours, so "sorted best first" is checked on decoded pixels,
not on the reader's own bookkeeping. Everything is built in tmp_path.
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from diffalign.data import (
    BadRowError,
    GroupTransform,
    JsonlSource,
    PickapicSource,
    PreferenceDataset,
    PreferenceSource,
    RankedSource,
    SkipReport,
    collate_groups,
    open_preference_source,
)
from diffalign.toy.ranked import RANKED_SCORES, make_ranked, write_ranked
from diffalign.toy.world import ToyWorldSpec, make_pairs, write_pairs

COLOURS = {"red": (220, 20, 20), "green": (20, 200, 20), "blue": (20, 20, 220), "black": (10, 10, 10)}
SPEC = ToyWorldSpec()


# --------------------------------------------------------------------------- helpers


def jpeg(name: str, size: int = 16) -> bytes:
    buf = io.BytesIO()
    PIL.Image.new("RGB", (size, size), COLOURS[name]).save(buf, "JPEG", quality=95)
    return buf.getvalue()


def colour_of(img: PIL.Image.Image) -> str:
    mean = np.asarray(img, dtype=np.float64).reshape(-1, 3).mean(0)
    return min(COLOURS, key=lambda n: float(np.linalg.norm(mean - np.array(COLOURS[n]))))


def row(names: list[str], scores: list[Any], prompt: Any = "a thing", **extra: Any) -> dict[str, Any]:
    return {"prompt": prompt, "images": [jpeg(n) for n in names], "scores": scores, **extra}


def write_parquet(path: Path, rows: list[dict[str, Any]], **types: pa.DataType) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    base = {"prompt": pa.string(), "images": pa.list_(pa.binary()), "scores": pa.list_(pa.float64()),
            "models": pa.list_(pa.string()), "id": pa.string(), "ranking_id": pa.int64(), **types}
    keys = list(dict.fromkeys(k for r in rows for k in r))  # a column any row has; None elsewhere
    cols = {k: [r.get(k) for r in rows] for k in keys}
    pq.write_table(pa.table({k: pa.array(v, type=base.get(k)) for k, v in cols.items()}), path)
    return path


def image_files(folder: Path) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for name in COLOURS:
        out[name] = folder / f"{name}.jpg"
        out[name].write_bytes(jpeg(name))
    return out


def write_jsonl(path: Path, lines: list[Any]) -> Path:
    path.write_text("".join((ln if isinstance(ln, str) else json.dumps(ln)) + "\n" for ln in lines))
    return path


@pytest.fixture
def cache(tmp_path: Path) -> str:
    return str(tmp_path / "hf_cache")


def open_src(path: Path, cache: str, report: SkipReport | None = None, **kw: Any) -> PreferenceSource:
    return open_preference_source(path, report=report if report is not None else SkipReport(), cache_dir=cache, **kw)


def skipped(report: SkipReport) -> dict[str, list[str]]:
    return {k: [e.row_id for e in v] for k, v in report.examples.items()}


# --------------------------------------------------------------------------- reading and sorting


def test_parquet_sorted_best_first_with_row_ids(tmp_path: Path, cache: str) -> None:
    rows = [
        row(["blue", "red", "black", "green"], [0.25, 1.0, 0.0, 0.5], models=["mb", "mr", "mk", "mg"], id="a"),
        row(["black", "green", "red", "blue"], [0.0, 0.5, 0.9, 0.5], models=["mk", "mg", "mr", "mb"], id="b"),
    ]
    src = open_src(write_parquet(tmp_path / "ranked.parquet", rows), cache)
    assert isinstance(src, RankedSource) and isinstance(src, PreferenceSource)
    assert len(src) == 2 and src.group_size == 4
    g = src.load(0)
    assert [colour_of(im) for im in g.images] == ["red", "green", "blue", "black"]
    assert g.scores == [1.0, 0.5, 0.25, 0.0] and g.models == ["mr", "mg", "mb", "mk"]
    assert g.captions is None and g.prompt == "a thing" and g.row_id == "ranked.parquet:a"
    # equal scores keep file order (stable): green came before blue
    g1 = src.load(1)
    assert [colour_of(im) for im in g1.images] == ["red", "green", "blue", "black"]
    assert g1.scores == [0.9, 0.5, 0.5, 0.0] and g1.models == ["mr", "mg", "mb", "mk"]

    # no id column: ranking_id names rows; neither: the row number; no models column: None
    plain = [{k: v for k, v in r.items() if k not in ("id", "models")} for r in rows]
    by_rank = open_src(write_parquet(tmp_path / "r2.parquet", [r | {"ranking_id": 70 + i} for i, r in enumerate(plain)]), cache)
    assert [by_rank.row_id(i) for i in range(2)] == ["r2.parquet:70", "r2.parquet:71"]
    by_row = open_src(write_parquet(tmp_path / "r3.parquet", plain), cache)
    assert [by_row.row_id(i) for i in range(2)] == ["r3.parquet:0", "r3.parquet:1"]
    assert by_row.load(0).models is None


def test_jsonl_sorted_paths_relative_and_absolute(tmp_path: Path, cache: str) -> None:
    files = image_files(tmp_path / "imgs")
    rel = {n: f"imgs/{n}.jpg" for n in COLOURS}
    lines = [
        {"prompt": "p1", "images": [rel["black"], rel["red"], str(files["green"])], "scores": [0, 3, 2],
         "models": ["x", "y", "z"]},
        "",
        {"prompt": "p3", "images": [rel["green"], rel["blue"], rel["red"]], "scores": [0.1, 0.2, 0.3]},
    ]
    src = open_src(write_jsonl(tmp_path / "lists.jsonl", lines), cache)
    assert isinstance(src, RankedSource) and len(src) == 2
    assert [src.row_id(i) for i in range(2)] == ["lists.jsonl:1", "lists.jsonl:3"]
    g = src.load(0)
    assert [colour_of(im) for im in g.images] == ["red", "green", "black"]
    assert g.scores == [3.0, 2.0, 0.0] and g.models == ["y", "z", "x"] and g.prompt == "p1"
    g3 = src.load(1)
    assert [colour_of(im) for im in g3.images] == ["red", "blue", "green"] and g3.models is None
    assert g3.scores == pytest.approx([0.3, 0.2, 0.1])


def test_parquet_image_paths_relative_to_file(tmp_path: Path, cache: str) -> None:
    image_files(tmp_path / "data" / "imgs")
    rows = [{"prompt": "p", "images": ["imgs/blue.jpg", "imgs/red.jpg"], "scores": [0.0, 1.0]},
            {"prompt": "q", "images": ["imgs/blue.jpg", "imgs/gone.jpg"], "scores": [0.0, 1.0]}]
    report = SkipReport()
    src = open_src(write_parquet(tmp_path / "data" / "paths.parquet", rows, images=pa.list_(pa.string())), cache, report)
    assert len(src) == 1 and skipped(report) == {"missing image file": ["paths.parquet:1"]}
    assert "gone.jpg" in report.examples["missing image file"][0].reason
    assert [colour_of(im) for im in src.load(0).images] == ["red", "blue"]


# --------------------------------------------------------------------------- bad rows


def test_jsonl_bad_rows_reported_and_skipped(tmp_path: Path, cache: str) -> None:
    image_files(tmp_path / "imgs")
    im = [f"imgs/{n}.jpg" for n in ("red", "green", "blue")]
    lines = [
        {"prompt": "ok", "images": im, "scores": [3, 2, 1], "models": ["a", "b", "c"]},  # 1 ok, sets k = 3
        '{"prompt": "broken", "images": [',  # 2
        {"prompt": "no scores", "images": im},  # 3
        {"prompt": "p", "images": im, "scores": [1, 2]},  # 4 images vs scores
        {"prompt": "p", "images": im, "scores": [1, 2, 3], "models": ["a", "b"]},  # 5 images vs models
        {"prompt": "p", "images": im[:1], "scores": [1]},  # 6 too few
        '{"prompt": "p", "images": ["imgs/red.jpg", "imgs/green.jpg", "imgs/blue.jpg"], "scores": [1, NaN, 0]}',  # 7
        {"prompt": "p", "images": im, "scores": [1, "high", 0]},  # 8 non-numeric
        {"prompt": "  ", "images": im, "scores": [1, 2, 3]},  # 9
        {"prompt": "p", "images": [im[0], "imgs/missing.jpg", im[2]], "scores": [1, 2, 3]},  # 10
        {"prompt": "p", "images": im, "scores": [0.5, 0.5, 0.5]},  # 11 tie
        {"prompt": "p", "images": im[:2], "scores": [1, 0]},  # 12 k = 2 != 3
        {"prompt": "p", "images": im, "scores": [1, True, 0]},  # 13 a bool is not a score
        {"prompt": "last", "images": im, "scores": [0, 1, 2]},  # 14 ok
    ]
    manifest = write_jsonl(tmp_path / "dirty.jsonl", lines)
    report = SkipReport()
    src = open_src(manifest, cache, report)
    assert [src.row_id(i) for i in range(len(src))] == ["dirty.jsonl:1", "dirty.jsonl:14"]
    ids = lambda *ns: [f"dirty.jsonl:{n}" for n in ns]
    assert skipped(report) == {
        "invalid JSON": ids(2), "missing key": ids(3), "size mismatch": ids(4, 5), "too few images": ids(6),
        "bad score": ids(7, 8, 13), "missing caption": ids(9), "missing image file": ids(10), "tie": ids(11),
        "group size differs": ids(12),
    }
    assert report.rows_seen == 14 and "'scores'" in report.examples["missing key"][0].reason
    assert "3 images, 3 scores, 2 models" in report.examples["size mismatch"][1].reason

    report2 = SkipReport()
    kept = open_src(manifest, cache, report2, drop_ties=False)
    assert "dirty.jsonl:11" in [kept.row_id(i) for i in range(len(kept))] and "tie" not in report2.counts
    assert kept.load(1).scores == [0.5, 0.5, 0.5]

    # an undecodable image fails at load, naming the row
    (tmp_path / "imgs" / "blue.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(BadRowError, match="undecodable image") as exc:
        src.load(0)
    assert exc.value.row_id == "dirty.jsonl:1"


def test_parquet_bad_rows_reported_and_skipped(tmp_path: Path, cache: str) -> None:
    rows = [
        row(["red", "green"], [1.0, 0.0], id="ok"),
        row(["red", "green"], [1.0, 0.5, 0.0], id="mismatch"),
        row(["red"], [1.0], id="one"),
        row(["red", "green"], [1.0, math.nan], id="nan"),
        row(["red", "green"], [math.inf, 0.0], id="inf"),
        row(["red", "green"], [1.0, 0.0], prompt=None, id="noprompt"),
        row(["red", "green"], [0.3, 0.3], id="tie"),
        row(["red", "green", "blue"], [1.0, 0.5, 0.0], id="k3"),
        row(["red", "green"], [1.0, 0.0], id="badimg") | {"images": [jpeg("red"), b"garbage"]},
        row(["red", "green"], [1.0, 0.0], models=["only one"], id="models"),
    ]
    report = SkipReport()
    src = open_src(write_parquet(tmp_path / "d.parquet", rows), cache, report)
    assert [src.row_id(i) for i in range(len(src))] == ["d.parquet:ok", "d.parquet:badimg"]
    ids = lambda *ns: [f"d.parquet:{n}" for n in ns]
    assert skipped(report) == {
        "size mismatch": ids("mismatch", "models"), "too few images": ids("one"), "bad score": ids("nan", "inf"),
        "missing caption": ids("noprompt"), "tie": ids("tie"), "group size differs": ids("k3"),
    }
    with pytest.raises(BadRowError, match=r"d\.parquet: row d\.parquet:badimg: undecodable image"):
        src.load(1)
    # through the dataset, the bad row travels to the main process under "skipped"
    batch = collate_groups([PreferenceDataset(src, GroupTransform(8), seed=0)[(0, i)] for i in range(2)])
    assert batch["row_ids"] == ["d.parquet:ok"] and batch["skipped"][0][0] == "d.parquet:badimg"


def test_dataset_level_errors_name_file_and_column(tmp_path: Path, cache: str) -> None:
    f = write_parquet(tmp_path / "noscores.parquet", [{"prompt": "p", "images": [jpeg("red")] * 2, "scores": [1.0, 0.0]}])
    pq.write_table(pq.read_table(f).drop_columns(["scores"]), f)
    with pytest.raises(ValueError, match="missing required column 'scores'") as exc:
        open_src(f, cache, format="ranked")
    assert str(f) in str(exc.value)
    bad_type = write_parquet(tmp_path / "flat.parquet", [{"prompt": "p", "images": [jpeg("red")] * 2, "scores": 1.0}],
                             scores=pa.float64())
    with pytest.raises(ValueError, match="'scores' has type double") as exc2:
        open_src(bad_type, cache, format="ranked")
    assert str(bad_type) in str(exc2.value)
    for missing in (tmp_path / "none.jsonl", tmp_path / "none.parquet"):
        with pytest.raises(FileNotFoundError) as exc3:
            open_src(missing, cache, format="ranked")
        assert str(missing) in str(exc3.value)
    with pytest.raises(ValueError, match="group_size"):
        RankedSource(f, report=SkipReport(), group_size=1)


# --------------------------------------------------------------------------- detection, group size, fingerprint


def test_auto_detection_and_pairs_carry_scores(tmp_path: Path, cache: str) -> None:
    files = image_files(tmp_path / "imgs")
    ranked_jsonl = write_jsonl(tmp_path / "r.jsonl", ["", {"prompt": "p", "images": [str(files["red"]), str(files["blue"])],
                                                          "scores": [1, 0]}])
    pairs_jsonl = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "p", "chosen": str(files["red"]), "rejected": str(files["blue"])}])
    assert isinstance(open_src(ranked_jsonl, cache), RankedSource)
    pairs = open_src(pairs_jsonl, cache)
    assert isinstance(pairs, JsonlSource)
    assert pairs.load(0).scores == [1.0, 0.0]  # winner first: a k = 2 list for a listwise objective

    ranked_pq = write_parquet(tmp_path / "r.parquet", [row(["red", "blue"], [1.0, 0.0])])
    assert isinstance(open_src(ranked_pq, cache), RankedSource)
    toy_pairs = write_pairs(tmp_path / "toy" / "pairs.parquet", 3, seed=0)
    assert isinstance(open_src(toy_pairs, cache), PickapicSource)
    with pytest.raises(ValueError, match="group_size=4"):
        open_src(toy_pairs, cache, group_size=4)

    # a folder of ranked shards, split by file name, row ids naming the shard
    write_parquet(tmp_path / "shards" / "train-00000-of-00002.parquet", [row(["red", "blue"], [1.0, 0.0], prompt="t0")])
    write_parquet(tmp_path / "shards" / "train-00001-of-00002.parquet", [row(["red", "blue"], [0.0, 1.0], prompt="t1")])
    write_parquet(tmp_path / "shards" / "test-00000-of-00001.parquet", [row(["red", "blue"], [0.0, 1.0], prompt="x")])
    train = open_src(tmp_path / "shards", cache, split="train")
    assert isinstance(train, RankedSource) and [train.load(i).prompt for i in range(len(train))] == ["t0", "t1"]
    assert train.row_id(1) == "train-00001-of-00002.parquet:0" and train.name == "shards"
    assert [colour_of(im) for im in train.load(1).images] == ["blue", "red"]
    assert len(open_src(tmp_path / "shards", cache, split="test")) == 1


def test_group_size_fixed_or_from_first_valid_row(tmp_path: Path, cache: str) -> None:
    rows = [row(["red"], [1.0], id="r0"), row(["red", "green", "blue"], [3, 2, 1], id="r1"),
            row(["red", "green"], [1, 0], id="r2"), row(["red", "green", "blue", "black"], [4, 3, 2, 1], id="r3"),
            row(["blue", "green"], [0, 1], id="r4")]
    f = write_parquet(tmp_path / "mixed.parquet", rows)
    report = SkipReport()
    first = open_src(f, cache, report)  # r0 is invalid, so r1 fixes k = 3
    assert [first.row_id(i) for i in range(len(first))] == ["mixed.parquet:r1"] and first.group_size == 3
    assert skipped(report)["group size differs"] == ["mixed.parquet:r2", "mixed.parquet:r3", "mixed.parquet:r4"]
    two = open_src(f, cache, group_size=2)
    assert [two.row_id(i) for i in range(len(two))] == ["mixed.parquet:r2", "mixed.parquet:r4"]
    assert two.fingerprint() != first.fingerprint()
    report_max = SkipReport()
    capped = open_src(f, cache, report_max, group_size=2, max_rows=1)
    assert len(capped) == 1 and report_max.rows_seen == 3  # scanning stops at the first kept row


def test_fingerprint_tracks_data_and_options(tmp_path: Path, cache: str) -> None:
    f = write_parquet(tmp_path / "fp.parquet", [row(["red", "blue"], [1.0, 0.0])])
    a = open_src(f, cache)
    assert open_src(f, cache).fingerprint() == a.fingerprint()
    assert open_src(f, cache, drop_ties=False).fingerprint() != a.fingerprint()
    write_parquet(f, [row(["red", "blue"], [1.0, 0.0]), row(["red", "blue"], [0.0, 1.0])])
    assert open_src(f, cache).fingerprint() != a.fingerprint()

    files = image_files(tmp_path / "imgs")
    manifest = write_jsonl(tmp_path / "fp.jsonl", [{"prompt": "p", "images": ["imgs/red.jpg", "imgs/blue.jpg"], "scores": [1, 0]}])
    fp = open_src(manifest, cache).fingerprint()
    assert open_src(manifest, cache).fingerprint() == fp
    files["blue"].write_bytes(jpeg("blue", size=17))  # a referenced image changes, the manifest does not
    assert open_src(manifest, cache).fingerprint() != fp


def test_dataset_and_collate_batch_groups_of_four(tmp_path: Path, cache: str) -> None:
    path = write_ranked(tmp_path / "toy.parquet", 5, seed=0)
    src = open_src(path, cache)
    ds = PreferenceDataset(src, GroupTransform(16), seed=0)
    batch = collate_groups([ds[(0, i)] for i in range(4)])
    assert batch["pixel_values"].shape == (4, 4, 3, 16, 16) and batch["original_sizes"].shape == (4, 4, 2)
    assert batch["scores"].shape == (4, 4) and batch["captions"] is None and batch["skipped"] == []
    expected = torch.tensor(RANKED_SCORES, dtype=torch.float32).expand(4, 4)
    torch.testing.assert_close(batch["scores"], expected)  # best first in every group


# --------------------------------------------------------------------------- toy world


def _arr(data: bytes | PIL.Image.Image) -> np.ndarray:
    img = data if isinstance(data, PIL.Image.Image) else PIL.Image.open(io.BytesIO(data))
    return np.asarray(img.convert("RGB"), dtype=np.float64)


def _mask(a: np.ndarray) -> np.ndarray:
    return (255.0 - a.min(axis=-1)) > 80.0


def _toy_colour(a: np.ndarray) -> str:
    mean = a[_mask(a)].mean(axis=0)
    return min(SPEC.palette, key=lambda n: float(np.linalg.norm(mean - np.array(SPEC.palette[n]))))


def test_toy_ranked_lists_are_graded_and_shuffled() -> None:
    rows = make_ranked(40, seed=3)
    assert make_ranked(40, seed=3) == rows and make_ranked(5, seed=4)[0]["images"] != rows[0]["images"]
    unsorted = 0
    for r in rows:
        assert sorted(r["scores"], reverse=True) == list(RANKED_SCORES) == [1.0, 2 / 3, 1 / 3, 0.0]
        unsorted += r["scores"] != sorted(r["scores"], reverse=True)
        by_score = {s: (m, _arr(im)) for s, m, im in zip(r["scores"], r["models"], r["images"])}
        colour = r["prompt"].split(" ")[1]
        (m_truth, truth), (m_deg, deg), (m_one, one), (m_both, both) = (by_score[s] for s in RANKED_SCORES)
        assert (m_truth, m_deg, m_both) == ("toy-truth", "toy-degraded", "toy-wrong-both")
        assert _toy_colour(truth) == colour and _toy_colour(deg) == colour and _toy_colour(both) != colour
        rms = float(np.sqrt(np.mean((deg - truth) ** 2)))
        assert 10.0 < rms < 30.0, rms  # the truth degraded, lighter than the pairs' degrade (RMS ~40)
        if m_one == "toy-wrong-colour":
            assert _toy_colour(one) != colour
        else:
            assert m_one == "toy-wrong-shape" and _toy_colour(one) == colour
            assert (_mask(one) & _mask(truth)).sum() / (_mask(one) | _mask(truth)).sum() < 0.9
    assert unsorted >= 30  # storage order is shuffled, so the reader's sort matters
    assert {r["models"][0] for r in rows} >= {"toy-truth", "toy-wrong-both"}
    kinds = [m for r in rows for m in r["models"] if m.startswith("toy-wrong-") and m != "toy-wrong-both"]
    assert kinds.count("toy-wrong-colour") == kinds.count("toy-wrong-shape") == 20
    three = make_ranked(4, seed=0, k=3)
    assert all(sorted(r["scores"], reverse=True) == [1.0, 2 / 3, 1 / 3] for r in three)
    with pytest.raises(ValueError, match="k must be"):
        make_ranked(2, seed=0, k=5)


def test_toy_ranked_parquet_and_jsonl_read_the_same(tmp_path: Path, cache: str) -> None:
    pq_path = write_ranked(tmp_path / "r.parquet", 6, seed=1)
    js_path = write_ranked(tmp_path / "r.jsonl", 6, seed=1, format="jsonl")
    assert pq.read_schema(pq_path).field("images").type == pa.list_(pa.binary())
    assert (tmp_path / "r_images").is_dir() and not [p for p in tmp_path.iterdir() if ".tmp" in p.name]
    a, b = open_src(pq_path, cache), open_src(js_path, cache)
    assert isinstance(a, RankedSource) and isinstance(b, RankedSource) and len(a) == len(b) == 6
    for i, expected in enumerate(make_ranked(6, seed=1)):
        ga, gb = a.load(i), b.load(i)
        assert ga.prompt == gb.prompt == expected["prompt"]
        assert ga.scores == gb.scores == list(RANKED_SCORES) and ga.models == gb.models
        assert ga.models[0] == "toy-truth" and ga.models[3] == "toy-wrong-both"
        for x, y in zip(ga.images, gb.images):
            np.testing.assert_array_equal(_arr(x), _arr(y))
        truth = expected["images"][expected["scores"].index(1.0)]
        np.testing.assert_array_equal(_arr(ga.images[0]), _arr(truth))
    assert b.row_id(5) == "r.jsonl:6" and a.row_id(0) == f"r.parquet:{(1 << 32)}"


def test_toy_dual_captions(tmp_path: Path, cache: str) -> None:
    plain = write_pairs(tmp_path / "plain.parquet", 12, seed=5)
    dual = write_pairs(tmp_path / "dual.parquet", 12, seed=5, dual_captions=True)
    assert "caption_0" not in pq.read_schema(plain).names
    assert pq.read_table(dual).drop_columns(["caption_0", "caption_1"]).equals(pq.read_table(plain))
    src = open_src(dual, cache)
    assert isinstance(src, PickapicSource) and len(src) == 12
    for i, r in enumerate(make_pairs(12, seed=5, dual_captions=True)):
        g = src.load(i)
        _, colour, shape = g.prompt.split(" ")
        assert g.captions is not None and g.captions[0] == g.prompt
        loser_caption = g.captions[1]
        loser = np.asarray(g.images[1], dtype=np.float64)
        if r["loser_kind"] == "degraded":
            assert loser_caption == f"a blurry {colour} {shape}"
        else:
            _, l_colour, l_shape = loser_caption.split(" ")
            assert _toy_colour(loser) == l_colour  # the caption describes the loser's pixels
            if r["loser_kind"] == "colour":
                assert l_colour != colour and l_shape == shape
            else:
                assert l_colour == colour and l_shape != shape
