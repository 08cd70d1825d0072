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
