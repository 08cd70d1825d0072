"""``rank`` and ``captions`` show how far they are, on a terminal and unless ``--quiet``; the captions summary prints once."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffalign.apps.output import configure_output, show_progress
from diffalign.apps.rank import rank_sources
from diffalign.captioning.dataset import add_dual_captions
from diffalign.data.report import SkipReport
from diffalign.scorers import base


class _Brightness:
    name = "brightness"

    def score(self, images, prompts, batch_size=None) -> torch.Tensor:
        return torch.tensor([float(np.asarray(image, np.float64).mean()) for image in images])


@pytest.fixture
def brightness(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(base._REGISTRY, "progress-brightness", lambda weights, device, dtype: _Brightness())  # noqa: SLF001


def _source(folder: Path, values: list[int]) -> Path:
    (folder / "images").mkdir(parents=True)
    with (folder / "manifest.jsonl").open("w") as manifest:
        for i, value in enumerate(values):
            Image.new("RGB", (16, 16), (value, value, value)).save(folder / "images" / f"{i}.png")
            manifest.write(json.dumps({"image": f"images/{i}.png", "prompt": f"prompt {i}"}) + "\n")
    return folder


@pytest.mark.parametrize("progress", [True, False])
def test_rank_progress_bar(tmp_path: Path, brightness, capsys, progress: bool) -> None:
    sources = [_source(tmp_path / "a", [10, 200, 30]), _source(tmp_path / "b", [20, 100, 40])]
    stats = rank_sources(sources, [("progress-brightness", None)], tmp_path / "ranked.parquet", device="cpu",
                         report=SkipReport(), progress=progress)  # fmt: skip
    assert stats.lists == 3
    err = capsys.readouterr().err
    assert ("rank: 100%" in err and "3/3" in err) is progress


@pytest.mark.parametrize("progress", [True, False])
def test_captions_progress_bar_and_one_summary(toy_pairs: Path, tmp_path: Path, capsys, caplog, progress: bool) -> None:
    caplog.set_level(logging.INFO)
    add_dual_captions(toy_pairs, tmp_path / "out.parquet", "perturb", batch_size=16, progress=progress)
    err = capsys.readouterr().err
    assert ("captions: 100%" in err and "64/64" in err) is progress
    # The summary is the caller's to print (the CLI prints it once); the library no longer logs it as well.
    assert not [r for r in caplog.records if r.name == "diffalign.captions" and r.levelno >= logging.INFO]


def test_bars_only_on_a_terminal_and_not_when_quiet(monkeypatch: pytest.MonkeyPatch) -> None:
    class Terminal:
        def isatty(self) -> bool:
            return True

    monkeypatch.setattr("sys.stderr", Terminal())
    try:
        configure_output()
        assert show_progress() and not show_progress(requested=False)
        configure_output(quiet=True)
        assert not show_progress()
    finally:
        configure_output()
    monkeypatch.undo()
    assert not show_progress()  # pytest's captured stderr is not a terminal
