"""Validation images: grids of fixed prompts and seeds from the reference and the policy, scores, and no
effect on training (the same losses with and without, across a resume)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import PIL.Image
import pytest

from diffalign.apps.cli import main
from diffalign.config import ConfigError
from diffalign.trainers.config import load_train_config
from diffalign.trainers.loop import train
from diffalign.trainers.metrics import read_metrics

PROMPTS = "validation.prompts=[a red circle on a blue background,a green square on a white background]"
SEEDS = [0, 1, 2]
VALIDATION = ["validation.enabled=true", PROMPTS, f"validation.seeds={SEEDS}", "validation.every_n_steps=1",
              "validation.num_inference_steps=2", "validation.guidance_scale=2.0"]


def brightness(images: list[PIL.Image.Image], prompts: list[str]) -> list[float]:
    """A stand-in scorer: each image's mean pixel value."""
    assert len(prompts) == len(images)
    return [float(np.asarray(image, dtype=np.float64).mean()) for image in images]


def pixels(path) -> np.ndarray:
    return np.asarray(PIL.Image.open(path).convert("RGB"))


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_grids_reference_and_scores(mode, tiny_models, toy_pairs, train_args, tmp_path):
    """2 prompts x 3 seeds, every step of 2: the reference and step-0 grids are the same model with the same
    seeds (LoRA: adapters start at zero; full: the frozen copy), training with a large lr changes the grid,
    and the scorer's mean lands in metrics.jsonl."""
    out = tmp_path / "run"
    args = train_args("sd15", tiny_models["sd15"], toy_pairs, out, f"train.mode={mode}", "train.max_steps=2",
                      "train.learning_rate=5e-2", "train.scale_lr=false", *VALIDATION)
    train(load_train_config(args[1], args[2:]), validation_scorer=brightness)
    folder = out / "validation"
    assert sorted(p.name for p in folder.iterdir()) == ["reference.png", "step-000000.png", "step-000001.png", "step-000002.png"]
    reference = pixels(folder / "reference.png")
    assert reference.shape == (2 * 32, len(SEEDS) * 32, 3), "one row per prompt, one column per seed"
    assert np.array_equal(pixels(folder / "step-000000.png"), reference), "the untrained policy is the reference"
    assert not np.array_equal(pixels(folder / "step-000002.png"), reference), "training changed the policy's images"
    columns = [reference[:32, 32 * k : 32 * (k + 1)] for k in range(len(SEEDS))]
    assert not np.array_equal(columns[0], columns[1]), "each seed draws its own image"

    rows = {row["step"]: row for row in read_metrics(out / "metrics.jsonl")}
    assert sorted(rows) == [0, 1, 2]
    assert rows[0]["validation/reference_score"] == rows[0]["validation/score"]
    for step in (1, 2):
        assert "loss" in rows[step]
        grid_mean = pixels(folder / f"step-{step:06d}.png").astype(np.float64).mean()
        # Scores pass through float32 (one rounding, relative 6e-8); the grid is the scored images' pixels.
        assert rows[step]["validation/score"] == pytest.approx(grid_mean, rel=1e-6)
    assert list((out / "logs").rglob("events.out.tfevents*")), "grids are logged to TensorBoard"


def test_validation_leaves_training_unchanged_across_a_resume(tiny_models, toy_pairs, train_args, tmp_path):
    """4 steps without validation = 2 steps with it + resume to 4 with it every 2nd step: validation draws from
    its own generators only, so the data order, the noise and the weights see nothing of it (and changing its
    settings does not make the resume another run)."""
    common = ["train.mode=lora", "train.checkpointing_steps=2", "train.learning_rate=1e-3", "train.scale_lr=false",
              "train.report_to=none"]
    plain, validated = tmp_path / "plain", tmp_path / "validated"
    assert main(train_args("sd15", tiny_models["sd15"], toy_pairs, plain, *common, "train.max_steps=4", "validation.enabled=false")) == 0
    assert main(train_args("sd15", tiny_models["sd15"], toy_pairs, validated, *common, *VALIDATION, "train.max_steps=2")) == 0
    assert main(train_args("sd15", tiny_models["sd15"], toy_pairs, validated, *common, *VALIDATION, "train.max_steps=4",
                           "train.resume_from=latest", "validation.every_n_steps=2")) == 0
    losses = [row["loss"] for row in read_metrics(plain / "metrics.jsonl")]
    assert len(losses) == 4
    assert [row["loss"] for row in read_metrics(validated / "metrics.jsonl")] == losses
    assert sorted(p.name for p in (validated / "validation").iterdir()) == [
        "reference.png", *(f"step-{step:06d}.png" for step in (0, 1, 2, 4))
    ]


def test_gpu_recipes_validate_on_a_gpu_only_unless_asked(tiny_models, toy_pairs, train_args, tmp_path, capsys):
    """The sd15 recipe ships prompts with enabled=auto: a CPU run says validation is off and samples nothing."""
    config = load_train_config(train_args("sd15", tiny_models["sd15"], toy_pairs, tmp_path)[1], ["model.path=x", "data.path=y"])
    assert config.validation.prompts and config.validation.active("cuda") and not config.validation.active("cpu")
    out = tmp_path / "run"
    assert main(train_args("sd15", tiny_models["sd15"], toy_pairs, out, "train.max_steps=1", "train.report_to=none")) == 0
    assert "validation images are off on the cpu" in capsys.readouterr().out
    assert not (out / "validation").exists()
    quickstart = load_train_config(str(Path(__file__).resolve().parents[2] / "configs/quickstart.yaml"), ["model.path=x", "data.path=y"])
    assert not quickstart.validation.prompts, "the CPU quickstart samples no validation images"


def test_enabled_without_prompts_is_a_config_error(tiny_models, toy_pairs, train_args, tmp_path):
    args = train_args("sd15", tiny_models["sd15"], toy_pairs, tmp_path, "validation.enabled=true", "validation.prompts=[]")
    with pytest.raises(ConfigError, match=r"validation.enabled=true needs validation.prompts"):
        load_train_config(args[1], args[2:])


@pytest.mark.parametrize(("family", "method"), [("sdxl", "dpo"), ("sd3", "dpo"), ("sd15", "mapo")])
def test_every_family_samples_guided_grids(family, method, tiny_models, toy_pairs, train_args, tmp_path):
    """SDXL's time ids and pooled embeddings, SD3's flow sampler, MaPO without a reference (its reference grid is
    the policy before the first step): guided grids of the right size, the untrained LoRA policy's equal to the
    reference's."""
    out = tmp_path / "run"
    args = train_args(family, tiny_models[family], toy_pairs, out, "train.mode=lora", "train.max_steps=1",
                      "train.report_to=none", *VALIDATION[:4], "validation.seeds=[0]", "validation.num_inference_steps=2",
                      "validation.guidance_scale=3.0")
    args[1] = str(Path(args[1]).with_name(f"{method}.yaml"))
    assert main(args) == 0
    reference = pixels(out / "validation" / "reference.png")
    assert reference.shape == (2 * 32, 32, 3)
    assert np.array_equal(pixels(out / "validation" / "step-000000.png"), reference)
    assert (out / "validation" / "step-000001.png").is_file()


def test_an_unknown_validation_scorer_is_a_clear_error(tiny_models, toy_pairs, train_args, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(train_args("sd15", tiny_models["sd15"], toy_pairs, out, *VALIDATION, "validation.scorer=hpsv9")) == 2
    error = capsys.readouterr().err
    assert "validation.scorer" in error and "hpsv9" in error and "hpsv2" in error, "names the key and the choices"
    assert not out.exists()
