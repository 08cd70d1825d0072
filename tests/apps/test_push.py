"""Publishing: `diffalign push`, train.push_to_hub and `export-votes --push` end in one clear message when the
hub cannot be reached (offline mode, a connection error), and hand huggingface_hub the right folder/file."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import httpx
import huggingface_hub
import pytest
from huggingface_hub import constants

from diffalign.apps.cli import main


@pytest.fixture
def finished_run(tmp_path: Path) -> Path:
    """An output folder shaped like a finished run's (final/ with its record and card)."""
    final = tmp_path / "run" / "final"
    final.mkdir(parents=True)
    (final / "diffalign.json").write_text(json.dumps({"mode": "lora", "family": "sd", "steps": 2}))
    (final / "README.md").write_text("---\nlibrary_name: diffusers\n---\n")
    (final / "pytorch_lora_weights.safetensors").write_bytes(b"weights")
    return tmp_path / "run"


@pytest.fixture
def online(monkeypatch):
    """Offline mode off, and every hub call recorded instead of sent (nothing may reach a network here)."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    calls: list[tuple[str, dict]] = []

    def record(name):
        def call(*args, **kwargs):
            calls.append((name, {"args": args, **kwargs}))
            return f"https://huggingface.co/{args[0] if args else kwargs['repo_id']}"

        return call

    for name in ("create_repo", "upload_folder", "upload_file"):
        monkeypatch.setattr(huggingface_hub, name, record(name))
    return calls


def assert_one_clean_message(stderr: str, *needles: str) -> None:
    assert "Traceback" not in stderr
    assert len([line for line in stderr.splitlines() if line.strip()]) == 1, stderr
    for needle in needles:
        assert needle in stderr


def test_push_offline_is_one_clear_message(finished_run, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["push", str(finished_run), "me/model"]) == 1
    assert_one_clean_message(capsys.readouterr().err, "diffalign push: error:", "HF_HUB_OFFLINE", "me/model")


def test_push_connection_error_is_one_clear_message(finished_run, online, monkeypatch, capsys):
    def refuse(*args, **kwargs):
        raise httpx.ConnectError("[Errno 111] Connection refused")

    monkeypatch.setattr(huggingface_hub, "create_repo", refuse)
    assert main(["push", str(finished_run), "me/model"]) == 1
    assert_one_clean_message(capsys.readouterr().err, "could not push", "ConnectError", "Connection refused", "hf auth login")


def test_push_uploads_final_as_a_model_repo(finished_run, online, capsys):
    assert main(["push", str(finished_run), "me/model", "--private"]) == 0
    (create, create_args), (upload, upload_args) = online
    assert create == "create_repo" and create_args["args"] == ("me/model",)
    assert create_args["repo_type"] == "model" and create_args["private"] is True
    assert upload == "upload_folder" and Path(upload_args["folder_path"]) == finished_run / "final"
    assert "https://huggingface.co/me/model" in capsys.readouterr().out


def test_push_of_a_folder_without_final_says_what_to_push(tmp_path, online, capsys):
    (tmp_path / "half").mkdir()
    assert main(["push", str(tmp_path / "half"), "me/model"]) == 1
    assert_one_clean_message(capsys.readouterr().err, "holds no finished run", "final")
    assert online == [], "nothing was sent"


def test_train_push_to_hub_offline_stops_before_the_run(tiny_models, toy_pairs, train_args, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "run"
    assert main(train_args("sd15", tiny_models["sd15"], toy_pairs, out, "train.push_to_hub=true", "train.hub_model_id=me/m")) == 2
    assert_one_clean_message(capsys.readouterr().err, "train.push_to_hub=true", "HF_HUB_OFFLINE", "diffalign push")
    assert not out.exists()


def test_train_push_to_hub_uploads_final_with_its_card(tiny_models, toy_pairs, train_args, tmp_path, online):
    out = tmp_path / "run"
    assert main(train_args("sd15", tiny_models["sd15"], toy_pairs, out, "train.max_steps=1", "train.mode=lora",
                           "train.report_to=none", "train.push_to_hub=true", "train.hub_model_id=me/m")) == 0
    (_, create_args), (_, upload_args) = online
    assert create_args["args"] == ("me/m",) and Path(upload_args["folder_path"]) == out / "final"
    assert 'load_lora_weights("me/m"' in (out / "final" / "README.md").read_text(), "the card loads from the pushed repo"


@pytest.fixture
def voted_database(toy_arena_sources, tmp_path):
    """Four votes cast through the arena's own logic, on a private copy of the sources."""
    from diffalign.apps.arena.cli import build_arena

    database = tmp_path / "votes.sqlite"
    sources = [shutil.copytree(p.parent, tmp_path / "sources" / name) for name, p in toy_arena_sources.items()]
    arena = build_arena([str(p) for p in sources], database, seed=0)
    for choice in ("left", "right", "left", "tie"):
        issued = arena.issue("session-a")
        assert arena.vote("session-a", issued.token, choice).accepted
    arena.store.close()
    return database


def test_export_votes_push_uploads_the_parquet_as_a_dataset(voted_database, tmp_path, online):
    out = tmp_path / "votes.parquet"
    assert main(["export-votes", str(voted_database), str(out), "--keep-suspicious", "--push", "me/votes"]) == 0
    (_, create_args), (upload, upload_args) = online
    assert create_args["args"] == ("me/votes",) and create_args["repo_type"] == "dataset"
    assert upload == "upload_file" and upload_args["repo_type"] == "dataset"
    assert Path(upload_args["path_or_fileobj"]) == out and upload_args["path_in_repo"] == "data/train.parquet"


def test_export_votes_push_offline_keeps_the_parquet_and_says_so(voted_database, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "votes.parquet"
    assert main(["export-votes", str(voted_database), str(out), "--keep-suspicious", "--push", "me/votes"]) == 1
    assert out.is_file()
    assert_one_clean_message(capsys.readouterr().err, "diffalign export-votes: error:", "HF_HUB_OFFLINE", "is written")


def test_train_push_to_hub_needs_a_full_repo_id(tiny_models, toy_pairs, train_args, tmp_path):
    from diffalign.config import ConfigError
    from diffalign.trainers.config import load_train_config

    args = train_args("sd15", tiny_models["sd15"], toy_pairs, tmp_path, "train.push_to_hub=true", "train.hub_model_id=m")
    with pytest.raises(ConfigError, match=r"train.push_to_hub=true needs train.hub_model_id=user/name \(got 'm'\)"):
        load_train_config(args[1], args[2:])
