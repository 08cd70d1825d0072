"""Quiet by default: a run prints diffalign's lines, not the libraries' bars and warnings; ``--verbose`` brings them back.

Both runs are real ``diffalign train`` subprocesses (one step of a tiny model): the noise comes from
library code the command imports lazily, which only a fresh process shows as a user sees it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from diffalign.apps.output import QUIET_ENVIRONMENT  # the keys the CLI sets: not to be inherited by the runs here

# What the libraries print on a one-step run, and what must stay hidden unless --verbose.
LIBRARY_NOISE = ("Loading weights", "should be kept in float32", "Generating train split")


def _run(argv: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {key: value for key, value in os.environ.items() if key not in QUIET_ENVIRONMENT}
    env["HF_HUB_OFFLINE"] = "1"
    command = [sys.executable, "-m", "diffalign.apps.cli", *argv]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def one_step(tiny_models, toy_pairs, tmp_path_factory, train_args):
    def run(*flags: str) -> subprocess.CompletedProcess[str]:
        root = tmp_path_factory.mktemp("quiet")
        argv = train_args("sd15", tiny_models["sd15"], toy_pairs, root / "run", "train.max_steps=1")
        result = _run([*flags, *argv], root)
        assert result.returncode == 0, result.stderr[-3000:]
        return result

    return run


def test_a_run_is_quiet_by_default(one_step) -> None:
    result = one_step()
    output = result.stdout + result.stderr
    for noise in LIBRARY_NOISE:
        assert noise not in output, f"{noise!r} printed without --verbose"
    assert "UserWarning" not in output
    assert "diffalign: final weights in" in result.stdout  # diffalign's own summary stays


def test_verbose_brings_the_library_output_back(one_step) -> None:
    result = one_step("--verbose")
    output = result.stdout + result.stderr
    assert "Loading weights" in output and "should be kept in float32" in output
    assert "diffalign: final weights in" in result.stdout
