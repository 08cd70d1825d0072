"""A cache build replaces only a folder that is diffalign's own cache, and nothing else (issue 13, item 3)."""

from __future__ import annotations

import json

import pytest

from diffalign.atomic import staged_folder
from diffalign.cache import CACHE_FORMAT, CACHE_VERSION, MANIFEST, NotACacheError, require_replaceable_cache


def _our_cache(folder, **extra):
    folder.mkdir()
    manifest = {"format": CACHE_FORMAT, "format_version": CACHE_VERSION, "group_shards": ["groups-00000.safetensors"],
                "text_shards": ["texts-00000.safetensors"], **extra}
    (folder / MANIFEST).write_text(json.dumps(manifest))
    (folder / "groups-00000.safetensors").write_bytes(b"g")
    (folder / "texts-00000.safetensors").write_bytes(b"t")
    return folder


def test_absent_empty_and_own_caches_may_be_replaced(tmp_path):
    require_replaceable_cache(tmp_path / "new")
    (tmp_path / "empty").mkdir()
    require_replaceable_cache(tmp_path / "empty")
    require_replaceable_cache(_our_cache(tmp_path / "cache"))


@pytest.mark.parametrize(
    "manifest",
    [
        {"images": ["IMG_0001.jpg"], "title": "holidays"},  # a photo album's manifest
        {"format": CACHE_FORMAT},  # marker without a version
        {"format": "other-tool", "format_version": 1},
        {"format": CACHE_FORMAT, "format_version": "1"},
        {"key": {"version": 1}, "group_shards": [], "text_shards": []},  # a cache built before the marker
        ["not", "a", "mapping"],
    ],
)
def test_a_folder_without_our_marker_is_refused_untouched(tmp_path, manifest):
    album = tmp_path / "album"
    album.mkdir()
    (album / MANIFEST).write_text(json.dumps(manifest))
    (album / "IMG_0001.jpg").write_bytes(b"photo")
    with pytest.raises(NotACacheError, match="not a diffalign cache"):
        require_replaceable_cache(album)
    assert sorted(p.name for p in album.iterdir()) == ["IMG_0001.jpg", MANIFEST]


def test_unreadable_manifest_file_and_foreign_files_are_refused(tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / MANIFEST).write_text("{not json")
    with pytest.raises(NotACacheError, match="no readable manifest.json"):
        require_replaceable_cache(broken)
    plain_file = tmp_path / "file"
    plain_file.write_text("x")
    with pytest.raises(NotACacheError, match="not a plain folder"):
        require_replaceable_cache(plain_file)
    cache = _our_cache(tmp_path / "cache")
    (cache / "notes.txt").write_text("mine")
    with pytest.raises(NotACacheError, match="also holds files it did not write \\(notes.txt\\)"):
        require_replaceable_cache(cache)


def test_the_check_runs_again_just_before_the_swap(tmp_path):
    """A build takes hours: a folder that someone filled meanwhile is kept, and the staging folder removed."""
    target = tmp_path / "cache"
    with pytest.raises(NotACacheError):
        with staged_folder(target, before_replace=require_replaceable_cache) as staging:
            (staging / MANIFEST).write_text("{}")
            target.mkdir()
            (target / "photo.jpg").write_bytes(b"photo")
    assert [p.name for p in target.iterdir()] == ["photo.jpg"]
    assert [p.name for p in tmp_path.iterdir()] == ["cache"]


def test_cache_command_refuses_an_album_and_rebuilds_its_own_cache(tiny_models, toy_pairs, train_args, tmp_path, capsys):
    from diffalign.apps.cli import main

    album = tmp_path / "album"
    album.mkdir()
    (album / MANIFEST).write_text(json.dumps({"photos": ["a.jpg"]}))
    (album / "a.jpg").write_bytes(b"photo")
    args = train_args("sd15", tiny_models["sd15"], toy_pairs, tmp_path / "run", "data.random_flip=false", "data.max_rows=8")
    assert main(["cache", *args[1:], f"data.cache_dir={album}"]) == 2
    assert "not a diffalign cache" in capsys.readouterr().err
    assert sorted(p.name for p in album.iterdir()) == ["a.jpg", MANIFEST]
    assert json.loads((album / MANIFEST).read_text()) == {"photos": ["a.jpg"]}

    cache = tmp_path / "cache"
    assert main(["cache", *args[1:], f"data.cache_dir={cache}"]) == 0
    manifest = json.loads((cache / MANIFEST).read_text())
    assert manifest["format"] == CACHE_FORMAT and manifest["format_version"] == CACHE_VERSION
    assert main(["cache", *args[1:], f"data.cache_dir={cache}", "data.max_rows=4"]) == 0, "its own cache is rebuilt"
    assert json.loads((cache / MANIFEST).read_text())["num_groups"] == 4
    assert not list(tmp_path.glob(".cache*")), "no staging or old folder is left behind"
