"""Every shipped recipe (configs/**/*.yaml) validates and trains through `diffalign train` on its family's tiny model.

A recipe is run as shipped, with only what a tiny CPU run must change overridden: the model and
data paths, 32 px, one step of two groups, fp32, no gradient checkpointing, and the paths a
method would otherwise write or download outside the run (PSO's reference folder, online PSO's
reward weights). The data is built in the layout the recipe's method declares in the registry,
so a recipe for a new layout fails here until the walk learns to build that layout.
Every shipped recipe runs here; none is left out.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from diffalign.apps.cli import main
from diffalign.trainers import load_train_config
from diffalign.trainers.metrics import read_metrics
from diffalign.trainers.objectives import objective_entry

REPO = Path(__file__).resolve().parents[2]
RECIPES = sorted((REPO / "configs").rglob("*.yaml"))
# The quickstart's toy base is an SD 1.5-shaped pipeline; every other recipe sits in its family's folder,
# SD3.5's on the tiny SD3.5 Medium (MMDiT-X) except the Large recipe.
FAMILY = {"configs/quickstart.yaml": "sd15", "configs/sd35/dpo_large.yaml": "sd35-large"}
FOLDER_FAMILY = {"sd35": "sd35-medium"}


def recipe_name(recipe: Path) -> str:
    return recipe.relative_to(REPO).as_posix()


def tiny_family(recipe: Path) -> str:
    return FAMILY.get(recipe_name(recipe), FOLDER_FAMILY.get(recipe.parent.name, recipe.parent.name))


@pytest.fixture(scope="module")
def layout_data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Four groups of toy data in each data layout a method can declare."""
    from diffalign.toy.ranked import write_ranked
    from diffalign.toy.world import prompts, write_pairs

    root = tmp_path_factory.mktemp("recipe-data")
    pairs = write_pairs(root / "pairs.parquet", n=4, seed=0)
    prompt_file = root / "prompts.txt"
    prompt_file.write_text("\n".join(prompts()[:4]) + "\n")
    return {
        "pairs": pairs,
        "ranked": write_ranked(root / "ranked.parquet", n=4, seed=0, k=4),
        "captioned_pairs": write_pairs(root / "dual.parquet", n=4, seed=0, dual_captions=True),
        "sampled_reference_pairs": pairs,
        "prompts": prompt_file,
    }


@pytest.fixture(scope="module")
def tiny_reward_clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random CLIP saved as a PickScore-style folder: online PSO's scorer reward without the hub."""
    from diffalign.tiny import save_tiny_clip

    return save_tiny_clip(tmp_path_factory.mktemp("reward") / "clip")


def method_overrides(method: str, run: Path, reward_weights: Path) -> list[str]:
    """Paths a method's recipe points outside the run (a shared folder, hub weights), redirected for the test."""
    return {
        "pso": [f"method.reference_dir={run / 'references'}"],
        "pso-online": [f"method.reward_weights={reward_weights}"],
    }.get(method, [])


def test_the_walk_finds_the_recipes_and_a_tiny_model_for_each():
    """An empty glob would make the walk below pass by running nothing."""
    assert {"configs/quickstart.yaml", "configs/sd15/dpo.yaml", "configs/sdxl/pso_online.yaml"} <= {recipe_name(r) for r in RECIPES}
    from diffalign.tiny import FAMILIES

    assert {tiny_family(recipe) for recipe in RECIPES} <= set(FAMILIES)  # the tiny_models fixture's families
    assert {"sd35-medium", "sd35-large"} <= {tiny_family(recipe) for recipe in RECIPES}  # SD3.5's two transformers


@pytest.mark.parametrize("recipe", RECIPES, ids=recipe_name)
def test_every_recipe_trains_on_its_tiny_model(recipe, tiny_models, layout_data, tiny_reward_clip, tmp_path):
    method = load_train_config(recipe, ["model.path=x", "data.path=y"]).method.name
    entry = objective_entry(method)
    assert entry.data in layout_data, f"{recipe_name(recipe)}: the walk cannot build {entry.data!r} data yet"
    run = tmp_path / "run"
    overrides = [
        f"model.path={tiny_models[tiny_family(recipe)]}",
        f"data.path={layout_data[entry.data]}",
        f"train.output_dir={run}",
        "data.resolution=32",
        "train.max_steps=1",
        "train.batch_size=2",
        "train.gradient_accumulation_steps=1",
        "train.mixed_precision=no",
        "train.gradient_checkpointing=false",
        "train.progress_bar=false",
        "train.report_to=none",
        *method_overrides(method, tmp_path, tiny_reward_clip),
    ]
    config = load_train_config(recipe, overrides)  # validated by the method's own schema
    assert isinstance(config.method, entry.config_class)
    assert main(["train", str(recipe), *overrides]) == 0
    rows = read_metrics(run / "metrics.jsonl")
    assert [row["step"] for row in rows] == [1] and math.isfinite(rows[0]["loss"])
    assert (run / "final").is_dir()
