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
# Under `pytest -n N` (make test runs 2 workers) each worker gets one torch thread: on this 2-core
# machine a toy training step takes 0.25 s on 1 thread and 0.18 s on 2, so two 1-thread workers do
# 1.4x the work of one 2-thread process, while two 2-thread workers do no more (measured: 0.40 s/step
# each). Thread count changes float rounding, like a different CPU does; no test may depend on it.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")

REPO = Path(__file__).resolve().parents[1]
FAMILY_CONFIGS = {"sd15": "configs/sd15/dpo.yaml", "sd2": "configs/sd15/dpo.yaml", "sdxl": "configs/sdxl/dpo.yaml", "sd3": "configs/sd3/dpo.yaml",
                  "sd35-medium": "configs/sd35/dpo.yaml", "sd35-large": "configs/sd35/dpo.yaml"}


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny sd15 (eps), sd2 (v-pred), sdxl, sd3 and SD3.5 (medium, large) pipelines saved in diffusers format."""
    from diffalign.tiny import FAMILIES, save_pipeline

    root = tmp_path_factory.mktemp("tiny")
    return {family: save_pipeline(family, root / family, seed=0) for family in FAMILIES}


@pytest.fixture(scope="session")
def toy_pairs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """64 toy pairs in Pick-a-Pic v2 parquet schema (32 px images)."""
    from diffalign.toy.world import write_pairs

    return write_pairs(tmp_path_factory.mktemp("pairs") / "pairs.parquet", n=64, seed=0)


@pytest.fixture(scope="session")
def toy_cache_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where the session's toy world and toy base live (built once, ~4.5 min on 2 cores).

    Parallel workers share one folder beside their own temp folders; the builders lock it, so the
    first worker builds and the others wait for it.
    """
    from diffalign.toy.base import ensure_toy_world_and_base

    shared = os.environ.get("PYTEST_XDIST_WORKER") is not None
    root = tmp_path_factory.getbasetemp().parent / "toy-cache" if shared else tmp_path_factory.mktemp("toy-cache")
    seed_toy_cache(root)
    ensure_toy_world_and_base(root)
    return root


# The toy turbo and the flow toy base as `python -m diffalign.toy.shipped --test-bases` built them: the
# learning tests start from these instead of a 2-6 minute build each. Their folder names are the cache's
# own (fingerprints of the recipes), so after a recipe change they are simply not used, and
# tests/core/test_toy_shipped.py fails until they are rebuilt.
TOY_TEST_BASES = REPO / "tests" / "fixtures" / "toy_bases"


def seed_toy_cache(root: Path) -> None:
    """Copy the committed test bases into the session's toy cache (once, under the builders' lock)."""
    import shutil

    from filelock import FileLock

    from diffalign.atomic import staged_folder

    root.mkdir(parents=True, exist_ok=True)
    with FileLock(root / ".toy-test-bases.lock"):
        for folder in sorted(TOY_TEST_BASES.iterdir()) if TOY_TEST_BASES.is_dir() else []:
            if (folder / "toy_base.json").is_file() and not (root / folder.name / "toy_base.json").is_file():
                with staged_folder(root / folder.name) as staging:
                    shutil.copytree(folder, staging, dirs_exist_ok=True)


# The learning tests, longest first, run before everything else. Under `--dist worksteal` the first
# worker starts on them (building the toy base) while the other runs the rest, then takes learning
# tests from the end of the first worker's queue: the short ones, so both finish together.
LEARNING_ORDER = (
    "test_pso_offline_in_the_few_step_setting_raises_heldout_accuracy",
    "test_pso_online_raises_the_heldout_reward",
    "test_lora_dpo_with_adapters_disabled_reference_learns",
    "test_flow_dpo_raises_heldout_accuracy",
    "test_flow_mapo_raises_the_heldout_margin",
    "test_quickstart_dpo_raises_heldout_accuracy_on_every_loser_kind",
    "test_dcpo_with_perturbed_loser_captions_raises_heldout_accuracy",
    "test_rankdpo_raises_heldout_pairwise_accuracy_on_ranked_lists",
    "test_mapo_raises_the_heldout_margin_without_a_reference",
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    rank = {name: index for index, name in enumerate(LEARNING_ORDER)}

    def position(item: pytest.Item) -> int:
        if "toy_cache_root" not in getattr(item, "fixturenames", ()):
            return len(rank) + 1
        return rank.get(getattr(item, "originalname", item.name), len(rank))

    items.sort(key=position)  # stable: everything else keeps its order


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
