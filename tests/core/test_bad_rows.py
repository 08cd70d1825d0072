"""Bad-row accounting in the data layer: each row once per report, by id; a full check; the data.validate key."""

from __future__ import annotations

import io
from pathlib import Path

import PIL.Image
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from diffalign.config import ConfigError, DataConfig, validate_section
from diffalign.data import (
    NoUsableRowsError,
    PreferenceDataset,
    SelectedRows,
    SkipReport,
    check_rows,
    open_preference_source,
)
from diffalign.data.transforms import GroupTransform


def jpeg(size: tuple[int, int] = (16, 16)) -> bytes:
    buf = io.BytesIO()
    PIL.Image.new("RGB", size, (200, 20, 20)).save(buf, "JPEG")
    return buf.getvalue()


def test_a_row_recorded_again_counts_once_and_keeps_its_first_reason() -> None:
    """The next epoch draws the same broken image: the report must not say 2 (the "33 of 14" bug)."""
    report = SkipReport(log_first=0)
    assert report.record("p.parquet", "p.parquet:3", "undecodable image: truncated")
    for _epoch in range(3):
        report.record_all("p.parquet", [("p.parquet:3", "undecodable image: truncated"), ("p.parquet:5", "tie")])
    assert not report.record("p.parquet", "p.parquet:5", "undecodable image: other")
    assert report.total == 2 and report.counts == {"undecodable image": 1, "tie": 1}
    assert report.record("other.parquet", "p.parquet:3", "tie")  # the same id in another source is another row
    assert report.ids() == {"undecodable image": ["p.parquet:3"], "tie": ["p.parquet:5", "p.parquet:3"]}
    snapshot = report.to_dict()
    assert snapshot["rows"]["undecodable image"] == [
        {"source": "p.parquet", "row_id": "p.parquet:3", "reason": "undecodable image: truncated"}
    ]
    again = SkipReport(log_first=0)
    again.record("p.parquet", "p.parquet:5", "tie")
    again.merge(snapshot)  # a cache's skipped rows: ids merge, duplicates count once
    assert again.total == 3 and again.counts == {"tie": 2, "undecodable image": 1}


def test_every_row_is_listed_beyond_the_summary_examples() -> None:
    report = SkipReport(max_examples=2, log_first=0)
    for i in range(50):
        report.record("s", f"s:{i}", "tie")
    assert len(report.examples["tie"]) == 2 and report.ids()["tie"] == [f"s:{i}" for i in range(50)]
    assert len(report.to_dict()["rows"]["tie"]) == 50


def test_check_rows_finds_what_the_lazy_dataset_finds_and_selected_rows_keep_the_good(tmp_path: Path) -> None:
    rows = [{"jpg_0": jpeg(), "jpg_1": jpeg(), "label_0": 1.0, "caption": "c"} for _ in range(6)]
    rows[1]["jpg_0"] = b"broken"
    rows[4]["jpg_1"] = jpeg((7, 40))  # one side under 8 px
    f = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist(rows), f)
    report = SkipReport(log_first=0)
    source = open_preference_source(f, report=report, cache_dir=str(tmp_path / "hf"))
    good = check_rows(source, report)
    assert good == [0, 2, 3, 5]
    assert report.ids() == {"undecodable image": ["d.parquet:1"], "image too small": ["d.parquet:4"]}
    assert "image 1 is 7x40 px" in report.rows["image too small"][0].reason
    lazy = PreferenceDataset(source, GroupTransform(8), seed=0)
    assert [i for i in range(len(source)) if "bad" not in lazy[(0, i)]] == good
    selected = SelectedRows(source, good)
    assert len(selected) == 4 and selected.row_id(1) == "d.parquet:2" and selected.fingerprint() == source.fingerprint()
    assert selected.load(3).row_id == "d.parquet:5"


def test_an_empty_ranked_parquet_is_a_clear_error(tmp_path: Path) -> None:
    f = tmp_path / "ranked.parquet"
    schema = pa.schema([("prompt", pa.string()), ("images", pa.list_(pa.binary())), ("scores", pa.list_(pa.float64()))])
    pq.write_table(schema.empty_table(), f)
    with pytest.raises(NoUsableRowsError, match="the data set is empty"):
        open_preference_source(f, format="ranked", report=SkipReport(), cache_dir=str(tmp_path / "hf"))


def test_data_validate_key() -> None:
    """Users write data.validate; the field is `validation` (a field named validate would shadow BaseModel.validate)."""
    assert DataConfig(path="p").validation == "lazy"
    config = validate_section(DataConfig, {"path": "p", "validate": "full"}, "recipe.yaml")
    assert config.validation == "full" and config.model_dump()["validate"] == "full"
    with pytest.raises(ConfigError, match=r"validate: Input should be 'lazy' or 'full'"):
        validate_section(DataConfig, {"path": "p", "validate": "yes"}, "recipe.yaml")
