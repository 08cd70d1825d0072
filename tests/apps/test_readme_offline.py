"""README's "Try it offline" walk, run as a new user would: every ```bash offline block, in order, in an empty folder.

Why: the README promises that those lines run as written with no hub and no GPU. The blocks run in bash -e
(the first failing line stops its block) with the interpreter's own ``bin/`` first on PATH, so the test
exercises the installed ``diffalign`` entry point whether the package came from a checkout or a wheel;
the recipes are named (``sd15/dpo``), never ``configs/`` paths, for the same reason.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

README = Path(__file__).resolve().parents[2] / "README.md"
OFFLINE_BLOCK = re.compile(r"^```bash offline[ \t]*\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)
# Deleting or unmarking the walk's blocks must fail this test, not make it pass by running nothing.
MIN_BLOCKS = 4
BLOCK_TIMEOUT_S = 600


def offline_blocks(text: str) -> list[tuple[int, str]]:
    """(first line number, body) of every ```bash offline block in ``text``."""
    return [(text.count("\n", 0, match.start()) + 1, match.group(1)) for match in OFFLINE_BLOCK.finditer(text)]


def promised_paths(blocks: list[str], pattern: str) -> list[str]:
    """Every value of ``pattern`` (a regex with one group) in the blocks, in order."""
    return [value for block in blocks for value in re.findall(pattern, block)]


def test_the_block_finder_reads_a_marked_block_and_skips_plain_ones():
    text = "intro\n```bash offline\necho a\necho b\n```\n```bash\necho server\n```\n```bash offline\necho c\n```\n"
    assert offline_blocks(text) == [(2, "echo a\necho b\n"), (9, "echo c\n")]


@pytest.fixture(scope="module")
def walk(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """Run the README's offline blocks in order in an empty folder; the folder and the blocks."""
    blocks = offline_blocks(README.read_text(encoding="utf-8"))
    assert len(blocks) >= MIN_BLOCKS, f"README.md has {len(blocks)} ```bash offline blocks, expected >= {MIN_BLOCKS}"
    folder = tmp_path_factory.mktemp("readme-offline")
    bin_dir = str(Path(sys.executable).parent)  # the venv's bin/, not resolved: a symlinked python stays in it
    env = {
        **os.environ,
        "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "MPLCONFIGDIR": str(folder / ".matplotlib"),
    }
    for line, body in blocks:
        try:
            result = subprocess.run(["bash", "-e", "-x", "-c", body], cwd=folder, env=env, capture_output=True,
                                    text=True, timeout=BLOCK_TIMEOUT_S)  # fmt: skip
        except subprocess.TimeoutExpired as timeout:
            streams = (timeout.stdout, timeout.stderr)  # bytes or str, depending on where it timed out
            parts = [part.decode(errors="replace") if isinstance(part, bytes) else part or "" for part in streams]
            output = "".join(parts)[-8000:]
            pytest.fail(f"README.md's offline block at line {line} ran past {BLOCK_TIMEOUT_S} s:\n{body}\n{output}")
        if result.returncode != 0:
            output = (result.stdout + result.stderr)[-8000:]
            pytest.fail(f"README.md's offline block at line {line} exited {result.returncode}:\n{body}\n"
                        f"--- its output (last 8000 characters; `+` lines are the commands) ---\n{output}")  # fmt: skip
    return folder, [body for _, body in blocks]


def test_every_training_run_of_the_walk_saves_final_weights_after_its_steps(walk):
    folder, blocks = walk
    runs = promised_paths(blocks, r"train\.output_dir=(\S+)")
    assert len(runs) >= 6, f"expected a run per method (dpo, mapo, rankdpo, dcpo, pso, pso-online), found {runs}"
    for run in runs:
        assert any((folder / run / "final").iterdir()), f"{run}/final is empty"
        steps = [json.loads(line)["step"] for line in (folder / run / "metrics.jsonl").read_text().splitlines()]
        assert steps and steps[-1] == 2, f"{run}: logged steps {steps}, the walk asks for train.max_steps=2"


def test_every_output_the_walk_names_exists(walk):
    folder, blocks = walk
    outputs = promised_paths(blocks, r"--(?:out|pairs-out) (\S+)") + promised_paths(blocks, r"data\.cache_dir=(\S+)")
    assert len(outputs) >= 7
    missing = [path for path in outputs if not (folder / path).exists()]
    assert not missing, f"the walk names these outputs but did not write them: {missing}"


def test_the_dcpo_data_has_a_caption_per_image_from_the_tiny_models(walk):
    folder, _ = walk
    table = pq.read_table(folder / "data/dual.parquet").to_pydict()
    assert len(table["caption"]) == 16  # toy pairs --n 16, none of them bad
    for row, (first, second) in enumerate(zip(table["caption_0"], table["caption_1"])):
        assert first.strip() and second.strip(), f"row {row}: an empty caption"


def test_the_scores_cover_every_generated_image(walk):
    folder, _ = walk
    for name in ("base", "dpo"):
        manifest = (folder / f"gen/{name}/manifest.jsonl").read_text().splitlines()
        assert len(manifest) == 4 * 2  # toy prompts --n 4, --seeds-per-prompt 2
        scores = pq.read_table(folder / f"scores/{name}.parquet").to_pydict()
        assert len(scores["image"]) == len(manifest)
        assert all(math.isfinite(value) for value in scores["clipscore"])
    assert (folder / "scores/dpo-vs-base.png").stat().st_size > 0


def test_the_ranked_lists_rank_every_toy_prompt_across_the_three_sources(walk):
    folder, _ = walk
    ranked = pq.read_table(folder / "data/ranked-by-clip.parquet").to_pydict()
    assert len(ranked["prompt"]) == 12 and len(set(ranked["prompt"])) == 12  # the toy world's 12 prompts
    assert all(len(images) == 3 for images in ranked["images"])
    assert pq.read_metadata(folder / "data/pairs-by-clip.parquet").num_rows == 12
