"""Non-finite training: configs refuse NaN/inf, bad steps are skipped and counted, persisting ones stop the run
with a non-zero exit, and no checkpoint or final/ is ever written with non-finite weights (issue 13, item 1)."""

from __future__ import annotations

import math
import typing
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import load_file
from torch import nn

import diffalign.trainers.objectives  # noqa: F401  (registers every method's config class)
import diffalign.trainers.config  # noqa: F401
from diffalign.apps.cli import main
from diffalign.config import StrictModel
from diffalign.trainers.checkpoint import checkpoints_to_prune, save_checkpoint
from diffalign.trainers.finite import NonFiniteGuard, NonFiniteTrainingError, require_finite_weights
from diffalign.trainers.metrics import read_metrics
from diffalign.trainers.step import DenoisingStep

# --- config validation ---------------------------------------------------------------------------


def _all_subclasses(cls: type) -> list[type]:
    found = []
    for sub in cls.__subclasses__():
        found += [sub, *_all_subclasses(sub)]
    return found


def _mentions_float(annotation: typing.Any) -> bool:
    return annotation is float or any(_mentions_float(arg) for arg in typing.get_args(annotation))


def _float_fields() -> list[tuple[type, str, typing.Any]]:
    fields = []
    for model in _all_subclasses(StrictModel):
        for name, info in model.model_fields.items():
            if _mentions_float(info.annotation):
                fields.append((model, name, info.annotation))
    return fields


def test_the_walk_finds_the_float_fields_of_every_section():
    owners = {model.__name__ for model, _, _ in _float_fields()}
    assert {"TrainSection", "LoraSection", "ModelConfig", "DataConfig", "DPOConfig", "MaPOConfig"} <= owners


@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan, "inf", "1e309"])
def test_every_float_field_of_every_config_refuses_non_finite_numbers(bad):
    """allow_inf_nan=False in StrictModel: inf passes `gt=0` and NaN passes every bound, so bounds alone cannot."""
    for model, name, annotation in _float_fields():
        value = [bad] if typing.get_origin(annotation) is list else bad
        with pytest.raises(ValidationError) as caught:
            model.model_validate({name: value})
        errors = [e for e in caught.value.errors() if e["loc"][:1] == (name,)]
        assert errors and all(e["type"] == "finite_number" for e in errors), (model.__name__, name, errors)


def test_infinite_beta_on_the_command_line_is_refused(tiny_models, toy_pairs, train_args, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(train_args("sd15", tiny_models["sd15"], toy_pairs, out, "method.beta=.inf")) == 2
    message = capsys.readouterr().err
    assert "method.beta" in message and "finite" in message
    assert not out.exists()


# --- the guard's policy --------------------------------------------------------------------------


def test_guard_skips_and_counts_then_stops_after_n_consecutive():
    guard = NonFiniteGuard(max_consecutive=3)
    assert guard.should_update(1, True, 0.5)
    assert not guard.should_update(2, False, 0.5) and not guard.exhausted
    assert guard.should_update(3, True, 0.5), "a finite step resets the streak"
    assert not guard.should_update(4, True, math.nan)
    assert not guard.should_update(5, False, math.inf)
    assert not guard.exhausted
    assert not guard.should_update(6, True, math.inf)
    assert guard.exhausted and guard.skipped == 4 and guard.consecutive == 3
    message = guard.stop_message(6)
    assert "step 6" in message and "steps 4-6" in message and "gradient norm was not finite" in message
    assert "after step 3" in message
    assert "learning_rate" in message and "method.beta" in message and "mixed_precision" in message


def test_guard_set_to_one_stops_at_the_first_bad_step():
    guard = NonFiniteGuard(max_consecutive=1)
    assert not guard.should_update(7, False, None)
    assert guard.exhausted and "the loss was not finite" in guard.stop_message(7)


def test_under_loss_scaling_an_overflowing_gradient_is_the_scalers_business_but_a_nan_loss_is_not():
    guard = NonFiniteGuard(max_consecutive=2, scaler_handles_overflow=True)
    assert guard.should_update(1, True, math.inf), "fp16 GradScaler skips it and lowers its scale"
    assert guard.skipped == 0
    assert not guard.should_update(2, False, math.inf)


def test_guard_state_travels_in_a_checkpoint():
    guard = NonFiniteGuard(max_consecutive=5)
    guard.should_update(1, False, None)
    restored = NonFiniteGuard(max_consecutive=5)
    restored.load_state(guard.state())
    assert (restored.skipped, restored.consecutive) == (1, 1)
    restored.load_state({})  # checkpoints written before the guard existed
    assert (restored.skipped, restored.consecutive) == (0, 0)


# --- weights and checkpoints ---------------------------------------------------------------------


class _OneProcess:
    """The two things require_finite_weights asks of an accelerator, for one CPU process."""

    device = torch.device("cpu")
    is_main_process = True

    def reduce(self, tensor, reduction="sum"):
        return tensor

    def wait_for_everyone(self):
        pass

    def save_state(self, folder):
        raise AssertionError("nothing may be saved from non-finite weights")


def test_non_finite_weights_are_never_written_to_a_checkpoint(tmp_path):
    model = nn.Linear(2, 2)
    require_finite_weights(_OneProcess(), model, "refusing")  # finite: passes
    with torch.no_grad():
        model.weight[0, 0] = math.nan
    with pytest.raises(NonFiniteTrainingError, match="refusing to write .*checkpoint-3.*weight"):
        save_checkpoint(_OneProcess(), tmp_path, 3, {}, keep_last=1, model=model)
    assert list(tmp_path.iterdir()) == []
    model.weight.requires_grad_(False)  # frozen weights do not change during a run: only trainable ones are checked
    require_finite_weights(_OneProcess(), model, "refusing")


def test_rotation_never_deletes_the_checkpoint_just_written(tmp_path):
    paths = [tmp_path / f"checkpoint-{step}" for step in (2, 4, 6, 8)]
    assert checkpoints_to_prune(paths, 2, newest=paths[-1]) == paths[:2]
    # resumed from checkpoint-2 and just wrote checkpoint-4 while 6 and 8 exist: 4 is kept
    assert checkpoints_to_prune(paths, 1, newest=paths[1]) == [paths[0], paths[2]]
    with pytest.raises(ValueError):
        checkpoints_to_prune(paths, 0, newest=paths[-1])


def _finite_safetensors(folder: Path) -> None:
    files = list(folder.rglob("*.safetensors"))
    assert files, folder
    for file in files:
        for name, tensor in load_file(file).items():
            assert torch.isfinite(tensor).all(), (file, name)


# --- end to end ----------------------------------------------------------------------------------


def test_a_diverging_run_stops_non_zero_and_writes_nothing_non_finite(tiny_models, toy_pairs, train_args, tmp_path, capsys):
    """The issue's reproduction: lr=1e6 made every checkpoint and final/ NaN while the run exited 0."""
    out = tmp_path / "run"
    args = train_args("sd15", tiny_models["sd15"], toy_pairs, out, "train.mode=full", "train.learning_rate=1e6",
                      "train.max_steps=12", "train.checkpointing_steps=1", "train.checkpoints_total_limit=2")
    assert main(args) == 1
    message = capsys.readouterr().err
    assert "training stopped at step" in message and "not finite" in message
    assert "train.learning_rate" in message and "method.beta" in message and "mixed_precision" in message
    assert "Traceback" not in message
    assert not (out / "final").exists()
    checkpoints = sorted(out.glob("checkpoint-*"))
    assert len(checkpoints) == 2
    for checkpoint in checkpoints:
        _finite_safetensors(checkpoint)
    rows = read_metrics(out / "metrics.jsonl")
    assert rows[-1]["nonfinite_skipped"] == 5 and rows[-1]["step"] < 12


def _poison(monkeypatch, calls: set[int]) -> None:
    """Make the loss NaN (with NaN gradients) on these calls of the denoising step, counted from 1 in this run."""
    original = DenoisingStep.__call__
    seen = []

    def poisoned(self, policy, reference, batch):
        output = original(self, policy, reference, batch)
        seen.append(1)
        if len(seen) in calls:
            output.loss = output.loss * math.nan
        return output

    monkeypatch.setattr(DenoisingStep, "__call__", poisoned)


def _same(a: list[float], b: list[float]) -> bool:
    return len(a) == len(b) and all(x == y or (math.isnan(x) and math.isnan(y)) for x, y in zip(a, b))


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_a_skipped_step_keeps_the_run_finite_and_resume_exact(mode, tiny_models, toy_pairs, train_args, tmp_path, monkeypatch, capsys):
    """One NaN step is skipped and counted; the run finishes finite; 6 straight steps equal 3 + resume + 3."""
    common = [f"train.mode={mode}", "train.checkpointing_steps=3", "train.learning_rate=1e-3", "train.scale_lr=false",
              "train.lr_scheduler=constant"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    with monkeypatch.context() as patch:
        _poison(patch, {2})
        assert main(train_args("sd15", tiny_models["sd15"], toy_pairs, straight, *common, "train.max_steps=6")) == 0
    assert "skipped the updates of 1 optimizer step" in capsys.readouterr().out
    with monkeypatch.context() as patch:
        _poison(patch, {2})
        assert main(train_args("sd15", tiny_models["sd15"], toy_pairs, resumed, *common, "train.max_steps=3")) == 0
    assert main(train_args("sd15", tiny_models["sd15"], toy_pairs, resumed, *common, "train.max_steps=6",
                           "train.resume_from=latest")) == 0
    rows = read_metrics(straight / "metrics.jsonl")
    values = [row["loss"] for row in rows]
    assert math.isnan(values[1]) and all(math.isfinite(v) for i, v in enumerate(values) if i != 1)
    assert "nonfinite_skipped" not in rows[0] and rows[1]["nonfinite_skipped"] == 1 == rows[-1]["nonfinite_skipped"]
    assert _same([row["loss"] for row in read_metrics(resumed / "metrics.jsonl")], values)
    _finite_safetensors(straight / "final")


def test_a_skipped_step_does_not_change_the_numbers_before_it(tiny_models, toy_pairs, train_args, tmp_path, monkeypatch):
    """The guard only acts on a bad step: a clean run and a run poisoned at step 3 agree on steps 1-3's inputs."""
    common = ["train.learning_rate=1e-3", "train.scale_lr=false", "train.max_steps=3"]
    clean, poisoned = tmp_path / "clean", tmp_path / "poisoned"
    assert main(train_args("sd15", tiny_models["sd15"], toy_pairs, clean, *common)) == 0
    with monkeypatch.context() as patch:
        _poison(patch, {3})
        assert main(train_args("sd15", tiny_models["sd15"], toy_pairs, poisoned, *common)) == 0
    a, b = read_metrics(clean / "metrics.jsonl"), read_metrics(poisoned / "metrics.jsonl")
    assert [row["loss"] for row in a[:2]] == [row["loss"] for row in b[:2]]
    assert [row["grad_norm"] for row in a[:2]] == [row["grad_norm"] for row in b[:2]]


def test_stop_at_once_when_configured(tiny_models, toy_pairs, train_args, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    _poison(monkeypatch, {2})
    assert main(train_args("sd15", tiny_models["sd15"], toy_pairs, out, "train.max_nonfinite_steps=1")) == 1
    assert "training stopped at step 2" in capsys.readouterr().err
    assert not (out / "final").exists()


def test_a_resume_that_goes_nan_keeps_the_last_good_checkpoint(tiny_models, toy_pairs, train_args, tmp_path, monkeypatch, capsys):
    """Before: NaN checkpoints were written and the limit rotated the good ones out."""
    out = tmp_path / "run"
    common = ["train.mode=full", "train.checkpointing_steps=2", "train.checkpoints_total_limit=1"]
    assert main(train_args("sd15", tiny_models["sd15"], toy_pairs, out, *common, "train.max_steps=2")) == 0
    good = load_file(next((out / "checkpoint-2").rglob("*.safetensors")))
    _poison(monkeypatch, set(range(1, 100)))
    assert main(train_args("sd15", tiny_models["sd15"], toy_pairs, out, *common, "train.max_steps=20",
                           "train.resume_from=latest")) == 1
    assert "training stopped at step 7" in capsys.readouterr().err
    checkpoints = sorted(out.glob("checkpoint-*"))
    assert [c.name for c in checkpoints] == ["checkpoint-6"]
    kept = load_file(next(checkpoints[0].rglob("*.safetensors")))
    assert all(torch.equal(kept[name], good[name]) for name in good), "skipped steps left the weights as they were"


def test_resuming_from_a_non_finite_checkpoint_is_refused(tiny_models, toy_pairs, train_args, tmp_path, capsys):
    """A checkpoint written before diffalign checked weights may be NaN: resuming it would train nothing."""
    from safetensors.torch import save_file

    out = tmp_path / "run"
    common = ["train.mode=lora", "train.checkpointing_steps=2"]
    assert main(train_args("sd15", tiny_models["sd15"], toy_pairs, out, *common, "train.max_steps=2")) == 0
    adapters = out / "checkpoint-2" / "denoiser_lora.safetensors"
    save_file({name: torch.full_like(value, math.nan) for name, value in load_file(adapters).items()}, adapters)
    assert main(train_args("sd15", tiny_models["sd15"], toy_pairs, out, *common, "train.max_steps=4",
                           "train.resume_from=latest")) == 1
    assert "cannot resume from" in capsys.readouterr().err
    assert not (out / "checkpoint-4").exists()
