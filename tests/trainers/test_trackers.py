"""train.report_to: accelerate's tracker names, a clear error for a missing package, and what wandb records offline."""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path

import pytest
import torch

from diffalign.apps.cli import main
from diffalign.config import ConfigError
from diffalign.trainers.config import load_train_config
from diffalign.trainers.metrics import read_metrics
from diffalign.trainers.trackers import TRACKER_NAMES, flat_hyperparameters

RECIPE = str(Path(__file__).resolve().parents[2] / "configs/sd15/dpo.yaml")


def test_report_to_takes_accelerate_names_a_list_all_and_none():
    assert {"tensorboard", "wandb", "mlflow", "comet_ml"} <= set(TRACKER_NAMES)
    assert load_train_config(RECIPE, ["train.report_to=[tensorboard,wandb]"]).train.report_to == ["tensorboard", "wandb"]
    assert load_train_config(RECIPE, ["train.report_to=all"]).train.report_to == "all"
    with pytest.raises(ConfigError, match=r"train\.report_to: .*unknown tracker 'tensorbord'; choose from .*wandb"):
        load_train_config(RECIPE, ["train.report_to=tensorbord"])
    with pytest.raises(ConfigError, match=r"train\.report_to: .*'none' stand alone"):
        load_train_config(RECIPE, ["train.report_to=[none,wandb]"])


def test_a_tracker_that_is_not_installed_fails_before_the_run(tiny_models, toy_pairs, train_args, tmp_path, monkeypatch, capsys):
    import accelerate.utils

    monkeypatch.setattr(accelerate.utils, "is_comet_ml_available", lambda: False)
    out = tmp_path / "run"
    assert main(train_args("sd15", tiny_models["sd15"], toy_pairs, out, "train.report_to=[tensorboard,comet_ml]")) == 2
    error = capsys.readouterr().err
    assert "comet_ml is not installed" in error and "pip install comet_ml" in error
    assert not out.exists(), "nothing was loaded or written"


def test_flat_hyperparameters_are_scalars_under_dotted_keys():
    flat = flat_hyperparameters({"train": {"lr": 1e-5, "report_to": ["tensorboard", "wandb"], "resume_from": None},
                                 "method": {"name": "dpo", "beta": 5000}})
    assert flat == {"train.lr": 1e-5, "train.report_to": '["tensorboard", "wandb"]', "train.resume_from": "null",
                    "method.name": "dpo", "method.beta": 5000}


def wandb_records(path: Path):
    """The protobuf records of a .wandb file. Its framing is LevelDB's log format (wandb's own reader,
    wandb.sdk.internal.datastore, is gone from wandb >= 0.2x): a 7-byte file header (":W&B", magic, version),
    then 32 KiB blocks of chunks, each with a 7-byte header (crc32, length, type: 1 full, 2 first, 3 middle, 4 last)."""
    from wandb.proto import wandb_internal_pb2

    data, block, offset, pending = path.read_bytes(), 32768, 7, b""
    assert data[:4] == b":W&B"
    while offset + 7 <= len(data):
        if block - offset % block < 7:  # a block's tail too short for a header is padding
            offset += block - offset % block
            continue
        _, length, kind = struct.unpack("<IHB", data[offset : offset + 7])
        chunk, offset = data[offset + 7 : offset + 7 + length], offset + 7 + length
        if kind == 0 and length == 0:
            break
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record


def finished_wandb_records(path: Path, timeout_s: float = 60.0) -> list:
    """The records once wandb's service has written the run's exit record: run.finish() returns before
    the service has flushed the file (seen: a scan right after the run found no history yet)."""
    deadline = time.monotonic() + timeout_s
    while True:
        records = list(wandb_records(path))
        if any(record.WhichOneof("record_type") == "exit" for record in records) or time.monotonic() > deadline:
            return records
        time.sleep(0.2)


def test_wandb_offline_and_tensorboard_record_the_run(tiny_models, toy_pairs, train_args, tmp_path, monkeypatch):
    """report_to=[tensorboard, wandb]: wandb's offline run holds every logged loss and the whole config."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb-dir"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    (tmp_path / "wandb-dir").mkdir()
    out = tmp_path / "run"
    assert main(train_args("sd15", tiny_models["sd15"], toy_pairs, out, "train.max_steps=2", "train.mode=lora",
                           "train.learning_rate=1e-3", "train.report_to=[tensorboard,wandb]", "validation.enabled=true",
                           "validation.prompts=[a red circle]", "validation.every_n_steps=2", "validation.num_inference_steps=1")) == 0
    runs = list((tmp_path / "wandb-dir" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1
    history, config = {}, {}
    for record in finished_wandb_records(runs[0]):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            items = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            history[items["_step"]] = items
        elif kind == "config":
            config.update({item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.config.update})
    rows = read_metrics(out / "metrics.jsonl")
    assert [row["step"] for row in rows] == [1, 2]
    for row in rows:
        assert history[row["step"]]["loss"] == row["loss"], "wandb holds the loss metrics.jsonl holds, step for step"
    assert config["train.learning_rate"] == 1e-3 and config["method.name"] == "dpo"
    assert config["model.path"] == str(tiny_models["sd15"]), "the whole config, not only method and lr"
    assert history[2]["validation/policy/_type"] == "images/separated", "validation images reach wandb"
    assert history[0]["validation/reference/captions"] == ["a red circle"]
    media = runs[0].parent / "files" / "media" / "images" / "validation"
    assert len(list(media.glob("reference_*.png"))) == 1 and len(list(media.glob("policy_*.png"))) == 2  # steps 0, 2

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(next((out / "logs").rglob("events.out.tfevents*")).parent))
    events.Reload()
    logged = {event.step: event.value for event in events.Scalars("loss")}
    assert logged == {row["step"]: torch.tensor(row["loss"], dtype=torch.float32).item() for row in rows}
