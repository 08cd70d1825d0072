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


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_kept_folders_and_files_follow_the_umask(tmp_path, umask):
    """Staging is private (mkdtemp 0700, mkstemp 0600); what is kept has the modes the user's umask gives."""
    import os
    import stat

    from diffalign.atomic import staged_file, staged_folder

    previous = os.umask(umask)
    try:
        with staged_folder(tmp_path / "model") as staging:
            (staging / "weights.bin").write_bytes(b"w")
        with staged_file(tmp_path / "table.csv") as temporary:
            temporary.write_text("a,b\n")
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "model").stat().st_mode) == 0o777 & ~umask
    assert stat.S_IMODE((tmp_path / "table.csv").stat().st_mode) == 0o666 & ~umask
