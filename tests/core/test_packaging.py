"""The package installs as users get it: diffalign + trainers/, scorers/, apps/ mapped into its namespace."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import diffalign
import diffalign.apps
import diffalign.scorers
import diffalign.trainers

REPO = Path(__file__).resolve().parents[2]


def test_every_package_folder_is_listed_in_pyproject():
    """A subpackage missing from [tool.setuptools] packages works editable but vanishes from the wheel."""
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    mapping = config["package-dir"]
    found = set()
    for package, folder in mapping.items():
        for init in (REPO / folder).rglob("__init__.py"):
            relative = init.parent.relative_to(REPO / folder)
            found.add(".".join([package, *relative.parts]))
    assert found == listed


def test_namespace_mapping_points_at_the_installed_location():
    expect = os.environ.get("DIFFALIGN_EXPECT_INSTALL", "editable")
    trainers = Path(diffalign.trainers.__file__).resolve()
    if expect == "wheel":
        assert "site-packages" in str(trainers) and REPO not in trainers.parents
        assert Path(diffalign.__file__).resolve().parent == trainers.parent.parent
    else:
        assert trainers == REPO / "trainers" / "__init__.py"
        assert Path(diffalign.apps.__file__).resolve() == REPO / "apps" / "__init__.py"


def test_core_does_not_import_upward():
    """Imports point one way: apps -> scorers/trainers -> diffalign core."""
    offenders = []
    for path in (REPO / "diffalign").rglob("*.py"):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            stripped = line.strip()
            if stripped.startswith(("from diffalign.trainers", "from diffalign.scorers", "from diffalign.apps",
                                    "import diffalign.trainers", "import diffalign.scorers", "import diffalign.apps")):
                offenders.append(f"{path.relative_to(REPO)}:{number}: {stripped}")
    for folder in ("trainers", "scorers"):
        for path in (REPO / folder).rglob("*.py"):
            if "diffalign.apps" in path.read_text():
                offenders.append(str(path.relative_to(REPO)))
    assert offenders == []


def test_console_entry_point_runs():
    result = subprocess.run([sys.executable, "-P", "-m", "diffalign.apps.cli", "--help"], capture_output=True, text=True, cwd="/")
    assert result.returncode == 0
    for command in ("train", "cache", "quickstart"):
        assert command in result.stdout


def test_shipped_recipes_list_show_and_train_from_any_folder(tiny_models, toy_pairs, tmp_path):
    """A pip user outside the checkout: `diffalign recipes`, `recipes show`, `recipes cp` and `train sd15/dpo`
    find the recipes inside the package (in CI's wheel check, the installed wheel's copy)."""
    import diffalign.recipes

    expect = os.environ.get("DIFFALIGN_EXPECT_INSTALL", "editable")
    if expect == "wheel":
        assert "site-packages" in str(diffalign.recipes.FOLDER)
    shipped = {p.relative_to(REPO / "configs").with_suffix("").as_posix() for p in (REPO / "configs").rglob("*.yaml")}
    assert set(diffalign.recipes.available()) == shipped

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-P", "-m", "diffalign.apps.cli", *args], capture_output=True, text=True, cwd=tmp_path)

    listing = cli("recipes")
    assert listing.returncode == 0 and all(name in listing.stdout for name in shipped)
    shown = cli("recipes", "show", "sdxl/pso", "method.beta=7")
    assert shown.returncode == 0, shown.stderr
    assert "beta: 7.0  # default 5.0. β (paper: 5" in shown.stdout and "zero_terminal_snr: true  # default false." in shown.stdout
    assert cli("recipes", "cp", "sd15/dpo", "mine.yaml").returncode == 0 and (tmp_path / "mine.yaml").is_file()
    again = cli("recipes", "cp", "sd15/dpo", "mine.yaml")
    assert again.returncode == 2 and "nothing was overwritten" in again.stderr
    run = cli("train", "sd15/dpo", f"model.path={tiny_models['sd15']}", f"data.path={toy_pairs}", "train.output_dir=run",
              "data.resolution=32", "train.max_steps=2", "train.batch_size=2", "train.gradient_accumulation_steps=1",
              "train.mixed_precision=no", "train.progress_bar=false")  # the recipe accumulates 128 micro-batches
    assert run.returncode == 0, run.stderr[-2000:]
    assert (tmp_path / "run" / "final").is_dir()
    missing = cli("train", "sdxl/nope")
    assert missing.returncode == 2 and "`diffalign recipes` lists them" in missing.stderr


def test_recipes_show_prints_a_config_that_loads_back_unchanged(tmp_path):
    """`recipes show` is the full effective config as YAML: saved and loaded again it is the same config."""
    from diffalign.apps.recipes_cli import effective_config_yaml
    from diffalign.trainers.config import load_train_config

    for name in ("sdxl/dpo", "sd3/mapo", "sdxl/pso_online", "quickstart"):
        config = load_train_config(name, ["data.path=x.parquet", "model.path=m"])
        saved = tmp_path / f"{name.replace('/', '-')}.yaml"
        saved.write_text(effective_config_yaml(config))
        assert load_train_config(saved) == config, name
