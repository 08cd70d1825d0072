"""`diffalign tiny FAMILY OUT --scale full`: what a user can get wrong ends in one clear line, not a traceback."""

from __future__ import annotations

from diffalign.apps.cli import main


def test_a_family_without_a_published_full_scale_architecture_is_named(tmp_path, capsys):
    assert main(["tiny", "sd2", str(tmp_path / "out"), "--scale", "full"]) == 2
    assert "sd15, sdxl, sd3" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_missing_clip_vocabulary_says_how_to_get_it(tmp_path, capsys):
    missing = tmp_path / "bpe_simple_vocab_16e6.txt.gz"
    assert main(["tiny", "sd15", str(tmp_path / "out"), "--scale", "full", "--clip-bpe", str(missing)]) == 2
    error = capsys.readouterr().err
    assert "pip download open_clip_torch --no-deps" in error and "Traceback" not in error
    assert not (tmp_path / "out").exists()
