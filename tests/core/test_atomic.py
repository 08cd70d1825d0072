"""Folders the user keeps are replaced only once their new contents are complete."""

from __future__ import annotations

import pytest

from diffalign.atomic import staged_folder


def test_staged_folder_replaces_the_target_when_complete(tmp_path):
    target = tmp_path / "model"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with staged_folder(target) as staging:
        assert not target.joinpath("new.txt").exists()
        (staging / "new.txt").write_text("new")
        assert (target / "old.txt").read_text() == "old", "the old folder stays until the swap"
    assert [p.name for p in target.iterdir()] == ["new.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["model"], "no staging or old folder is left behind"


def test_staged_folder_keeps_the_old_target_when_writing_fails(tmp_path):
    target = tmp_path / "cache"
    target.mkdir()
    (target / "manifest.json").write_text("{}")
    with pytest.raises(RuntimeError):
        with staged_folder(target) as staging:
            (staging / "half.bin").write_bytes(b"\0")
            raise RuntimeError("crash while writing")
    assert [p.name for p in target.iterdir()] == ["manifest.json"]
    assert [p.name for p in tmp_path.iterdir()] == ["cache"]
