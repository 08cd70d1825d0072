"""The toy base shipped inside the package: it is the default recipe's, it is served only for that recipe,
and its build script still builds."""

from __future__ import annotations

import json

from diffalign.toy import base as toy_base
from diffalign.toy.base import SHIPPED_TOY_BASE, ToyBaseRecipe, ensure_toy_world_and_base, shipped_toy_base


def test_the_shipped_base_is_the_default_recipes():
    marker = SHIPPED_TOY_BASE / "toy_base.json"
    assert marker.is_file(), f"{SHIPPED_TOY_BASE} is missing: run `python -m diffalign.toy.shipped` and commit it"
    assert shipped_toy_base(ToyBaseRecipe()) == SHIPPED_TOY_BASE, (
        "the shipped toy base was built from another recipe than ToyBaseRecipe(): rebuild it with "
        "`python -m diffalign.toy.shipped` and commit diffalign/toy/shipped_base"
    )
    assert json.loads(marker.read_text())["fingerprint"] == ToyBaseRecipe().fingerprint()


def test_the_cache_copies_the_shipped_base_for_its_recipe_and_builds_any_other(tmp_path, monkeypatch):
    built = []

    def build(folder, recipe, train_parquet, log=print):
        built.append(recipe)
        folder.mkdir(parents=True)
        (folder / "toy_base.json").write_text(json.dumps({"fingerprint": recipe.fingerprint()}))
        return folder

    monkeypatch.setattr(toy_base, "build_toy_base", build)
    small_world = ToyBaseRecipe(n_train=16)  # a world of 16 pairs: a different recipe, built, never the shipped copy
    _, base = ensure_toy_world_and_base(tmp_path, small_world, n_heldout=8, log=lambda _: None)
    assert built == [small_world] and shipped_toy_base(small_world) is None

    _, base = ensure_toy_world_and_base(tmp_path, ToyBaseRecipe(), n_heldout=8, log=lambda _: None)
    assert built == [small_world]  # the default recipe's base came from the package
    shipped = sorted(path.relative_to(SHIPPED_TOY_BASE) for path in SHIPPED_TOY_BASE.rglob("*") if path.is_file())
    copied = sorted(path.relative_to(base) for path in base.rglob("*") if path.is_file())
    assert copied == shipped and len(shipped) > 5
    assert all((base / name).read_bytes() == (SHIPPED_TOY_BASE / name).read_bytes() for name in shipped)


def test_the_build_script_builds_a_loadable_pretrained_base(tmp_path):
    import torch
    from diffusers import StableDiffusionPipeline

    from diffalign.tiny import build_pipeline
    from diffalign.toy.shipped import rebuild_shipped_base

    recipe = ToyBaseRecipe(n_train=32, vae_steps=2, unet_steps=2, batch_size=8)  # the script's build, in seconds
    out = rebuild_shipped_base(tmp_path / "base", recipe, log=lambda _: None)
    assert json.loads((out / "toy_base.json").read_text())["fingerprint"] == recipe.fingerprint()
    trained = StableDiffusionPipeline.from_pretrained(out).unet.state_dict()
    initial = build_pipeline("sd15", seed=recipe.seed, sample_size=recipe.world.image_size).unet.state_dict()
    assert trained.keys() == initial.keys()
    assert any(not torch.equal(trained[name], initial[name]) for name in trained)  # pretraining moved the UNet


def test_the_committed_test_bases_are_the_current_recipes():
    """The learning tests start from tests/fixtures/toy_bases (conftest.seed_toy_cache); under a changed
    recipe their names would no longer match and every session would build them again, silently slow."""
    from pathlib import Path

    from diffalign.toy.base import FlowToyBaseRecipe, flow_toy_base_folder_name, toy_turbo_folder_name

    fixtures = Path(__file__).resolve().parents[1] / "fixtures" / "toy_bases"
    committed = sorted(path.name for path in fixtures.iterdir() if (path / "toy_base.json").is_file())
    assert committed == sorted([toy_turbo_folder_name(), flow_toy_base_folder_name(FlowToyBaseRecipe())]), (
        "rebuild them: python -m diffalign.toy.shipped --test-bases tests/fixtures/toy_bases (and remove the old ones)"
    )
