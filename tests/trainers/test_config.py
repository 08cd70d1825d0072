"""Training recipes: YAML + key=value overrides into validated sections, errors that name the file and the key.

The last test walks every YAML preset under configs/ (as open_clip's tests walk
their model registry), so a preset that drifts from the schema fails here.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from diffalign.config import ConfigError
from diffalign.trainers.config import TrainConfig, load_train_config
from diffalign.trainers.objectives import DPOConfig, objective_entry

REPO = Path(__file__).resolve().parents[2]
PRESETS = sorted((REPO / "configs").rglob("*.yaml"))

RECIPE = """\
model:
  path: stable-diffusion-v1-5/stable-diffusion-v1-5
  timestep_mode: uniform
data:
  path: data/pickapic
  resolution: 256
  cache_dir: cache/latents
  empty_prompt_prob: 0.2
method:
  name: dpo
  beta: 5000
train:
  max_steps: 10
  learning_rate: 1e-5     # PyYAML reads this as the string '1e-5' (YAML 1.1 wants a dot); it must still be a float
  mode: full
lora:
  rank: 4
"""


@pytest.fixture
def recipe(tmp_path: Path) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(RECIPE)
    return path


def _error(path: Path | str | None, overrides: list[str] | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        load_train_config(path, overrides)
    return str(info.value)


# --------------------------------------------------------------------------- parsing


def test_values_are_parsed(recipe: Path) -> None:
    config = load_train_config(recipe)
    assert isinstance(config, TrainConfig)
    assert config.model.path == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert config.model.family == "auto" and config.model.max_sequence_length == 256  # defaults
    assert config.data.path == "data/pickapic"
    assert config.data.resolution == 256 and config.data.empty_prompt_prob == 0.2
    assert config.data.cache_dir == "cache/latents"
    assert isinstance(config.method, DPOConfig) and config.method.beta == 5000.0
    assert config.train.max_steps == 10 and config.train.mode == "full"
    assert config.train.learning_rate == 1e-5 and isinstance(config.train.learning_rate, float)
    assert config.lora.rank == 4
    assert config.train.batch_size == 1  # untouched default


def test_overrides_apply_with_yaml_typing(recipe: Path) -> None:
    config = load_train_config(recipe, ["train.max_steps=3", "method.beta=100", "data.cache_dir=null"])
    assert config.train.max_steps == 3 and isinstance(config.train.max_steps, int)
    assert config.method.beta == 100.0
    assert config.data.cache_dir is None
    # other values stay as the file set them
    assert config.data.resolution == 256 and config.train.mode == "full"


def test_more_override_types(recipe: Path) -> None:
    config = load_train_config(
        recipe,
        [
            "data.center_crop=false",
            "train.max_grad_norm=null",
            "lora.target_modules=[to_q, to_v]",
            "train.learning_rate=2.0e-4",
            "train.mixed_precision=no",  # YAML 1.1 reads a bare no as False; accelerate's spelling is "no"
            "model.path=other/model",  # the last value for a key wins over the file
        ],
    )
    assert config.data.center_crop is False
    assert config.train.max_grad_norm is None
    assert config.lora.target_modules == ["to_q", "to_v"]
    assert config.train.learning_rate == 2e-4
    assert config.train.mixed_precision == "no"
    assert config.model.path == "other/model"


def test_overrides_alone_build_a_recipe() -> None:
    config = load_train_config(None, ["model.path=m", "data.path=d", "method.name=dpo"])
    assert (config.model.path, config.data.path, config.method.beta) == ("m", "d", 5000.0)


def test_to_yaml_round_trips(recipe: Path, tmp_path: Path) -> None:
    config = load_train_config(recipe, ["method.beta=100"])
    dumped = tmp_path / "dumped.yaml"
    dumped.write_text(config.to_yaml())
    again = load_train_config(dumped)
    assert again.model_dump() == config.model_dump()
    assert again.method.beta == 100.0


# --------------------------------------------------------------------------- errors name the file and the key


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("trian.max_steps=3", "trian: unknown key"),
        ("train.lerning_rate=0.1", "train.lerning_rate: unknown key"),
        ("method.betta=100", "method.betta: unknown key"),
        ("data.resolutoin=64", "data.resolutoin: unknown key"),
        ("model.famly=sd", "model.famly: unknown key"),
    ],
)
def test_unknown_keys_name_the_file_and_the_dotted_key(recipe: Path, override: str, key: str) -> None:
    message = _error(recipe, [override])
    assert str(recipe) in message
    assert key in message


def test_unknown_key_inside_the_file(tmp_path: Path) -> None:
    path = tmp_path / "typo.yaml"
    path.write_text(RECIPE.replace("  max_steps: 10", "  max_steps: 10\n  lerning_rate: 0.1"))
    message = _error(path)
    assert str(path) in message and "train.lerning_rate: unknown key" in message


def test_wrong_type_names_the_key(recipe: Path) -> None:
    message = _error(recipe, ["train.max_steps=abc"])
    assert str(recipe) in message
    assert "train.max_steps" in message and "'abc'" in message
    message = _error(recipe, ["train.mode=lora2"])
    assert "train.mode" in message
    message = _error(recipe, ["method.beta=-1"])
    assert "method.beta" in message


def test_missing_required_keys(tmp_path: Path) -> None:
    path = tmp_path / "no_model_path.yaml"
    path.write_text(RECIPE.replace("  path: stable-diffusion-v1-5/stable-diffusion-v1-5\n", ""))
    message = _error(path)
    assert str(path) in message and "model.path: required key is missing" in message

    path = tmp_path / "no_data.yaml"
    path.write_text("model:\n  path: m\nmethod:\n  name: dpo\n")
    assert "data" in _error(path) and str(path) in _error(path)

    path = tmp_path / "no_method.yaml"
    path.write_text("model:\n  path: m\ndata:\n  path: d\n")
    assert "method.name" in _error(path)


def test_missing_file_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "recipe.yaml"
    message = _error(missing)
    assert str(missing) in message and "not found" in message


def test_unknown_method_lists_valid_ones(recipe: Path) -> None:
    message = _error(recipe, ["method.name=dpoo"])
    assert "method.name" in message and "'dpoo'" in message and "dpo" in message.split("valid")[-1]


def test_malformed_overrides(recipe: Path) -> None:
    assert "key.path=value" in _error(recipe, ["train.max_steps"])
    assert "not a section" in _error(recipe, ["train.max_steps.deeper=1"])


def test_top_level_must_be_a_mapping(tmp_path: Path) -> None:
    path = tmp_path / "list.yaml"
    path.write_text("- model\n- data\n")
    message = _error(path)
    assert str(path) in message and "mapping" in message


# --------------------------------------------------------------------------- the repo's presets


def test_there_are_presets() -> None:
    expected = {"configs/quickstart.yaml", "configs/sd15/dpo.yaml", "configs/sdxl/dpo.yaml", "configs/sd3/dpo.yaml"}
    assert expected <= {str(path.relative_to(REPO)) for path in PRESETS}


@pytest.mark.parametrize("preset", PRESETS, ids=[str(p.relative_to(REPO)) for p in PRESETS])
def test_every_preset_validates(preset: Path) -> None:
    config = load_train_config(preset, ["model.path=x", "data.path=y"])
    assert (config.model.path, config.data.path) == ("x", "y")
    assert isinstance(config.method, objective_entry(config.method.name).config_class)  # validated by its own schema
    # the preset survives a dump and reload unchanged
    assert load_train_config(None, _as_overrides(config)).model_dump() == config.model_dump()


def _as_overrides(config: TrainConfig) -> list[str]:
    """Flatten a config into key=value overrides (JSON flow style parses as YAML)."""
    import json

    overrides = []
    for section, values in config.model_dump(mode="json").items():
        for key, value in values.items():
            overrides.append(f"{section}.{key}={json.dumps(value)}")
    return overrides
