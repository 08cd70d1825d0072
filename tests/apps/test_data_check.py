"""Exact bad-row accounting: a fuzzed data set through `diffalign data check` and one short `diffalign train` each way.

Every kind of dirt below is decided once, here, as bad (skipped, with the category named) or as
acceptable (decoded, converted, trained on):

=============================  ============================  ===================================================
kind                           verdict                       why
=============================  ============================  ===================================================
truncated JPEG                 bad: undecodable image        half the scan data is gone; Pillow refuses it
zero-byte image                bad: undecodable image        nothing to decode
1x1 image                      bad: image too small          a placeholder, not a picture (both sides >= 8 px)
oversized header (1e5 x 1e5)   bad: image too large          a decompression bomb: Pillow refuses to allocate it
empty caption                  bad: missing caption          nothing to condition on
label NaN                      bad: label out of {0,0.5,1}   no preference
label 2.0                      bad: label out of {0,0.5,1}   not a probability
PNG bytes in a jpg column      fine                          Pillow reads the format from the bytes, not the name
CMYK JPEG                      fine                          converted to RGB (to_rgb)
16-bit grayscale PNG           fine                          rescaled to 8 bits, then RGB (not clipped to white)
palette PNG                    fine                          converted to RGB through its palette
10,000-character caption       fine                          the tokenizer truncates it (77 CLIP tokens)
JSONL: a missing key           bad: missing key              the row has no rejected image
JSONL: prompt of wrong type    bad: missing caption          a number is not a prompt
JSONL: image of wrong type     bad: bad value                a number is not a path
a missing parquet column       the data set: exit 2          a column is missing from every row: not a row problem
a mistyped parquet column      the data set: exit 2          labels stored as text: not a row problem
=============================  ============================  ===================================================
"""

from __future__ import annotations

import io
import json
import re
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from diffalign.apps.cli import main
from diffalign.apps.data_cli import check_data
from diffalign.trainers.data import TrainingData

PER_KIND = 100  # bad rows of every kind in the data-check fuzz


def encode(img: PIL.Image.Image, fmt: str = "JPEG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


def oversized_png(side: int = 100_000) -> bytes:
    """A PNG whose header claims side x side pixels (no pixel data): a decompression bomb."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)) + chunk(b"IEND", b"")


RED, BLUE = PIL.Image.new("RGB", (16, 16), (220, 30, 30)), PIL.Image.new("RGB", (16, 16), (30, 30, 220))
GOOD_JPG, BLUE_JPG = encode(RED), encode(BLUE)
PALETTE = PIL.Image.new("P", (16, 16), 1)
PALETTE.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
SIXTEEN_BIT = PIL.Image.fromarray(np.full((16, 16), 40000, dtype=np.uint16))

# kind -> (row overrides, expected category or None for a good row)
KINDS: dict[str, tuple[dict[str, Any], str | None]] = {
    "truncated": ({"jpg_1": BLUE_JPG[: len(BLUE_JPG) // 2]}, "undecodable image"),
    "zero_byte": ({"jpg_0": b""}, "undecodable image"),
    "one_pixel": ({"jpg_1": encode(PIL.Image.new("RGB", (1, 1)))}, "image too small"),
    "oversized_header": ({"jpg_0": oversized_png()}, "image too large"),
    "empty_caption": ({"caption": "  "}, "missing caption"),
    "label_nan": ({"label_0": float("nan"), "label_1": float("nan")}, "label out of {0, 0.5, 1}"),
    "label_two": ({"label_0": 2.0, "label_1": -1.0}, "label out of {0, 0.5, 1}"),
    "png_in_jpg": ({"jpg_0": encode(RED, "PNG")}, None),
    "cmyk": ({"jpg_1": encode(PIL.Image.new("CMYK", (16, 16), (0, 255, 255, 0)))}, None),
    "sixteen_bit": ({"jpg_0": encode(SIXTEEN_BIT, "PNG")}, None),
    "palette": ({"jpg_1": encode(PALETTE, "PNG")}, None),
    "long_caption": ({"caption": "a red circle " * 770}, None),  # 10,010 characters
    "good": ({}, None),
}


def write_fuzz_parquet(path: Path, per_kind: int, seed: int = 0) -> dict[str, str | None]:
    """Pick-a-Pic-schema pairs, ``per_kind`` rows of every kind, shuffled; returns row id -> expected category."""
    kinds = [k for k in KINDS for _ in range(per_kind)]
    np.random.default_rng(seed).shuffle(kinds)
    rows = []
    for i, kind in enumerate(kinds):
        row = {"jpg_0": GOOD_JPG, "jpg_1": BLUE_JPG, "label_0": float(i % 2), "label_1": float(1 - i % 2),
               "caption": "a red circle", "ranking_id": i}
        row.update(KINDS[kind][0])
        rows.append(row)
    types = {"jpg_0": pa.binary(), "jpg_1": pa.binary(), "label_0": pa.float64(), "label_1": pa.float64(),
             "caption": pa.string(), "ranking_id": pa.int64()}
    pq.write_table(pa.table({k: pa.array([r[k] for r in rows], type=t) for k, t in types.items()}), path)
    assert len(KINDS["long_caption"][0]["caption"]) >= 10_000
    return {f"{path.name}:{i}": KINDS[kind][1] for i, kind in enumerate(kinds)}


def write_fuzz_jsonl(folder: Path, per_kind: int) -> dict[str, str | None]:
    """A JSONL manifest with missing keys and wrongly typed values among good lines; row id -> expected category."""
    folder.mkdir(parents=True, exist_ok=True)
    RED.save(folder / "w.png")
    BLUE.save(folder / "l.png")
    good = {"prompt": "a red circle", "chosen": "w.png", "rejected": "l.png"}
    kinds = {
        "missing_key": ({"prompt": "a red circle", "chosen": "w.png"}, "missing key"),
        "prompt_type": ({**good, "prompt": 123}, "missing caption"),
        "image_type": ({**good, "chosen": 5}, "bad value"),
        "good": (good, None),
    }
    order = [k for k in kinds for _ in range(per_kind)]
    np.random.default_rng(1).shuffle(order)
    (folder / "pairs.jsonl").write_text("".join(json.dumps(kinds[k][0]) + "\n" for k in order))
    return {f"pairs.jsonl:{i + 1}": kinds[k][1] for i, k in enumerate(order)}


def ids_by_category(result: dict[str, Any]) -> dict[str, list[str]]:
    return {k: sorted(r["row_id"] for r in v) for k, v in result["rows"].items()}


def expected_by_category(expected: dict[str, str | None]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for rid, category in expected.items():
        if category is not None:
            out.setdefault(category, []).append(rid)
    return {k: sorted(v) for k, v in out.items()}


def test_data_check_reports_every_fuzzed_bad_row_once_with_its_reason(tmp_path, capsys):
    """>= 100 rows of every kind: each bad one listed once under its category; the acceptable kinds are usable."""
    data = tmp_path / "fuzz.parquet"
    expected = write_fuzz_parquet(data, PER_KIND)
    out = tmp_path / "report.json"
    assert main(["data", "check", str(data), "--json", str(out), "--no-progress"]) == 1
    result = json.loads(out.read_text())
    assert ids_by_category(result) == expected_by_category(expected)
    assert result["rows_seen"] == len(expected) == 13 * PER_KIND
    assert result["usable"] == sum(c is None for c in expected.values()) == 6 * PER_KIND
    assert result["bad"] == result["total"] == 7 * PER_KIND
    for r in result["rows"]["image too large"]:
        assert "DecompressionBombError" not in r["reason"] and "exceeds limit" in r["reason"]
    table = capsys.readouterr().out
    assert re.search(rf"undecodable image +{2 * PER_KIND} ", table) and re.search(rf"usable +{6 * PER_KIND}\n", table)

    jsonl_expected = write_fuzz_jsonl(tmp_path / "manifest", PER_KIND)
    jsonl_out = tmp_path / "jsonl.json"
    argv = ["data", "check", str(tmp_path / "manifest" / "pairs.jsonl"), "--json", str(jsonl_out), "--no-progress"]
    assert main(argv) == 1
    assert ids_by_category(json.loads(jsonl_out.read_text())) == expected_by_category(jsonl_expected)


def test_data_check_workers_agree_and_clean_data_exits_0(tmp_path):
    data = tmp_path / "fuzz.parquet"
    write_fuzz_parquet(data, 3)
    alone = check_data(str(data), progress=False)
    together = check_data(str(data), workers=2, progress=False)
    assert ids_by_category(alone) == ids_by_category(together) and alone["usable"] == together["usable"] == 18
    clean = tmp_path / "clean.parquet"
    rows = pq.read_table(data).to_pylist()
    keep = [r for r in rows if f"fuzz.parquet:{r['ranking_id']}" not in {x["row_id"] for v in alone["rows"].values() for x in v}]
    pq.write_table(pa.Table.from_pylist(keep, schema=pq.read_schema(data)), clean)
    assert main(["data", "check", str(clean), "--no-progress"]) == 0


def test_data_check_a_bad_data_set_exits_2_with_the_reason(tmp_path, capsys):
    """Missing or mistyped columns, an empty file, a missing path: the data set, not a row; no traceback."""
    good = {"jpg_0": GOOD_JPG, "jpg_1": GOOD_JPG, "label_0": 1.0, "caption": "a cat"}
    pq.write_table(pa.Table.from_pylist([{k: v for k, v in good.items() if k != "caption"}]), tmp_path / "nocap.parquet")
    pq.write_table(pa.Table.from_pylist([{**good, "label_0": "yes"}]), tmp_path / "textlabel.parquet")
    pq.write_table(pa.Table.from_pylist([good]).schema.empty_table(), tmp_path / "empty.parquet")
    (tmp_path / "empty.jsonl").write_text("")
    for name, message in [("nocap.parquet", "missing required column 'caption'"),
                          ("textlabel.parquet", "column 'label_0' has type string"),
                          ("empty.parquet", "the data set is empty"),
                          ("empty.jsonl", "the data set is empty"),
                          ("absent.parquet", "no such file")]:
        assert main(["data", "check", str(tmp_path / name), "--no-progress"]) == 2, name
        assert message in capsys.readouterr().err, name


def test_data_check_reads_ranked_lists(tmp_path):
    rows = [{"prompt": "p", "images": [GOOD_JPG, encode(BLUE), encode(RED, "PNG")], "scores": [0.1, 0.9, 0.5], "id": f"r{i}"}
            for i in range(4)]
    rows[2]["images"] = [GOOD_JPG, b"", GOOD_JPG]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "ranked.parquet")
    result = check_data(str(tmp_path / "ranked.parquet"), progress=False)
    assert result["reader"] == "RankedSource" and result["usable"] == 3
    assert ids_by_category(result) == {"undecodable image": ["ranked.parquet:r2"]}


# --------------------------------------------------------------------------- training


def _spy_on_trained_rows(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    trained: list[str] = []
    usable = TrainingData.usable

    def spy(self: TrainingData, batch: dict) -> bool:
        ok = usable(self, batch)
        trained.extend(batch["row_ids"])
        return ok

    monkeypatch.setattr(TrainingData, "usable", spy)
    return trained


@pytest.mark.parametrize("validate", ["lazy", "full"])
def test_training_on_fuzzed_data_counts_each_bad_row_once_and_trains_on_every_good_row(
    validate, tiny_models, train_args, tmp_path, capsys, monkeypatch
):
    """One row of every kind: lazy over several epochs, or checked in full first.

    lazy: 10 rows pass the cheap checks (5 batches of 2 per epoch); 6 steps draw more than one epoch, so
    some bad rows are drawn twice, yet each is counted once. full: the 6 good rows (5 acceptable kinds and
    a plain one) are known before step 1; 3 steps of 2 are one epoch: each is trained on exactly once.
    """
    data = tmp_path / "fuzz.parquet"
    expected = write_fuzz_parquet(data, 1)
    good = sorted(rid for rid, category in expected.items() if category is None)
    trained = _spy_on_trained_rows(monkeypatch)
    out = tmp_path / "run"
    steps = 6 if validate == "lazy" else 3
    assert main(train_args("sd15", tiny_models["sd15"], data, out, f"train.max_steps={steps}", f"data.validate={validate}")) == 0
    printed = capsys.readouterr().out
    assert f"data.validate={validate}" in printed
    skipped = json.loads((out / "skipped_rows.json").read_text())
    assert ids_by_category(skipped) == expected_by_category(expected)
    assert skipped["total"] == 7 and sum(skipped["counts"].values()) == 7
    if validate == "full":
        assert sorted(trained) == good and skipped["images_checked"].startswith("every row decoded")
    else:
        assert set(trained) == set(good) and "10 of 10 rows decoded" in skipped["images_checked"]


def test_training_refuses_empty_or_all_bad_data_with_a_clear_error(tiny_models, train_args, tmp_path, capsys):
    empty = tmp_path / "empty.parquet"
    pq.write_table(pa.Table.from_pylist([{"jpg_0": GOOD_JPG, "jpg_1": GOOD_JPG, "label_0": 1.0, "caption": "c"}]).schema.empty_table(), empty)
    assert main(train_args("sd15", tiny_models["sd15"], empty, tmp_path / "a")) == 2
    assert "the data set is empty" in capsys.readouterr().err
    broken = tmp_path / "broken.parquet"
    pq.write_table(pa.Table.from_pylist([{"jpg_0": b"x", "jpg_1": GOOD_JPG, "label_0": 1.0, "caption": "c"}] * 4), broken)
    for validate in ("lazy", "full"):
        assert main(train_args("sd15", tiny_models["sd15"], broken, tmp_path / validate, f"data.validate={validate}")) == 2
        err = capsys.readouterr().err
        assert "no usable rows" in err and "4 undecodable image" in err, validate
