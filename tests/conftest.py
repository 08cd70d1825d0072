"""Shared fixtures: tiny saved pipelines, small toy preference sets, the toy base.

Everything is built in code, saved in diffusers / Pick-a-Pic format and loaded
back through the same paths a user's real model and data take. Nothing downloads.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Torch's OpenMP threads spin while they wait for work. When the 2 cores are shared (a second pytest,
# the arena's server, a build), the spinning thread starves the working one: 10 toy DPO steps took
# 55-100 s instead of 12 s, a held-out pass 33-90 s instead of 6 s (2-core AMD EPYC, under load).
# PASSIVE changes only how an idle thread waits, not the thread count or how work is split, so every
# figure is bit-identical (checked: trained weights' held-out scores equal). libgomp reads it when
# torch loads, which is after this file (no pytest plugin here imports torch); subprocesses inherit it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

REPO = Path(__file__).resolve().parents[1]
FAMILY_CONFIGS = {"sd15": "configs/sd15/dpo.yaml", "sd2": "configs/sd15/dpo.yaml", "sdxl": "configs/sdxl/dpo.yaml", "sd3": "configs/sd3/dpo.yaml"}


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny sd15 (eps), sd2 (v-pred), sdxl and sd3 pipelines saved in diffusers format."""
    from diffalign.tiny import save_pipeline

    root = tmp_path_factory.mktemp("tiny")
    return {family: save_pipeline(family, root / family, seed=0) for family in ("sd15", "sd2", "sdxl", "sd3")}


@pytest.fixture(scope="session")
def toy_pairs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """64 toy pairs in Pick-a-Pic v2 parquet schema (32 px images)."""
    from diffalign.toy.world import write_pairs

    return write_pairs(tmp_path_factory.mktemp("pairs") / "pairs.parquet", n=64, seed=0)


@pytest.fixture(scope="session")
def toy_cache_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where the session's toy world and toy base live (built once, ~2.5 min on 2 cores)."""
    from diffalign.toy.base import ensure_toy_world_and_base

    root = tmp_path_factory.mktemp("toy-cache")
    ensure_toy_world_and_base(root)
    return root


def tiny_train_args(family: str, model: Path, data: Path, output_dir: Path, *extra: str) -> list[str]:
    """`diffalign train` arguments that run a real recipe for a few steps on a tiny model."""
    return [
        "train",
        str(REPO / FAMILY_CONFIGS[family]),
        f"model.path={model}",
        f"data.path={data}",
        f"train.output_dir={output_dir}",
        "data.resolution=32",
        "train.max_steps=3",
        "train.batch_size=2",
        "train.gradient_accumulation_steps=1",
        "train.mixed_precision=no",
        "train.progress_bar=false",
        *extra,
    ]


@pytest.fixture(scope="session")
def train_args():
    """The tiny_train_args builder (test modules cannot import conftest under importlib mode)."""
    return tiny_train_args


@pytest.fixture(scope="session")
def toy_arena_sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Three toy models' image folders with manifests (12 prompts x 3 seeds each: 108 cross-model pairs)."""
    from diffalign.toy.arena import write_toy_sources

    return write_toy_sources(tmp_path_factory.mktemp("arena-sources"), seeds_per_prompt=3)


@pytest.fixture
def start_arena(tmp_path: Path):
    """Start `diffalign arena` processes on free loopback ports; ``start(sources, db, *args) -> (url, process)``.

    Every process is ended when the test ends (killed if it does not stop on SIGTERM).
    """
    from diffalign.apps.arena.client import free_port, launch_arena, wait_until_up

    processes = []

    def start(sources, database, *extra: str):
        port = free_port()
        process = launch_arena(list(sources), database, port, *extra, log=tmp_path / f"arena-{port}.log")
        processes.append(process)
        url = f"http://127.0.0.1:{port}"
        wait_until_up(url, process)
        return url, process

    yield start
    for process in processes:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=20)
            except Exception:  # noqa: BLE001
                process.kill()
                process.wait()
