"""Precomputed reference errors (train.reference_errors): the same training as a live reference, refused when stale."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from diffalign.apps.cli import main
from diffalign.trainers.metrics import read_metrics


def losses(output_dir: Path) -> list[float]:
    return [row["loss"] for row in read_metrics(output_dir / "metrics.jsonl")]


def final_tensors(output_dir: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted((output_dir / "final").rglob("*.safetensors")):
        tensors.update({f"{file.relative_to(output_dir)}:{name}": value for name, value in load_file(file).items()})
    return tensors


# beta=10 and lr 1e-3: the policy moves visibly in 3 steps, while rounding between a batched (store) and a
# per-step (live) reference forward, ~1e-7, is not amplified by the recipe's beta of 5000 (see the cache test).
COMMON = ("method.beta=10", "train.learning_rate=1e-3", "train.scale_lr=false", "train.max_steps=3")


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_training_from_precomputed_errors_equals_the_live_reference(mode, tiny_models, toy_pairs, train_args, tmp_path, monkeypatch):
    store = tmp_path / "reference"
    live = train_args("sd15", tiny_models["sd15"], toy_pairs, tmp_path / "live", f"train.mode={mode}", *COMMON)
    assert main(live) == 0
    assert main(["reference-errors", *live[1:], "--output", str(store), "--batch-size", "5"]) == 0
    manifest = json.loads((store / "manifest.json").read_text())
    assert manifest["coverage"]["groups"] == 3 * 2  # 3 steps x 2 groups: exactly what the run draws

    import diffalign.trainers.models as models

    def no_reference(*_, **__):
        raise AssertionError("a run from precomputed errors must not build or run a reference network")

    monkeypatch.setattr(models.FrozenCopyReference, "__init__", no_reference)
    monkeypatch.setattr(models.AdaptersDisabledReference, "predict", no_reference)
    stored = [arg.replace(str(tmp_path / "live"), str(tmp_path / "stored")) for arg in live]
    assert main([*stored, f"train.reference_errors={store}"]) == 0

    assert losses(tmp_path / "stored") == pytest.approx(losses(tmp_path / "live"), rel=1e-5)
    trained, reference = final_tensors(tmp_path / "stored"), final_tensors(tmp_path / "live")
    assert trained.keys() == reference.keys() and trained
    for name, value in trained.items():
        torch.testing.assert_close(value, reference[name], rtol=1e-4, atol=1e-6, msg=name)
    # The reference's own errors agree to rounding. implicit_acc is not compared: at step 1 the policy
    # equals the reference, so the live margin gap is exactly 0 (a tie, counted half) while the stored
    # one, from a differently batched forward, is +-1e-7 and lands on either side of 0 by CPU rounding.
    stored_rows, live_rows = read_metrics(tmp_path / "stored" / "metrics.jsonl"), read_metrics(tmp_path / "live" / "metrics.jsonl")
    for key in ("ref_err_winner", "ref_err_loser"):
        assert [row[key] for row in stored_rows] == pytest.approx([row[key] for row in live_rows], rel=1e-5), key
    assert [row["margin_gap"] for row in stored_rows] == pytest.approx([row["margin_gap"] for row in live_rows], abs=1e-5)


def forbid_reference_network(monkeypatch) -> None:
    """After this, building a frozen copy or running the adapters-off reference fails the test."""
    import diffalign.trainers.models as models

    def no_reference(*_, **__):
        raise AssertionError("a run from precomputed errors must not build or run a reference network")

    monkeypatch.setattr(models.FrozenCopyReference, "__init__", no_reference)
    monkeypatch.setattr(models.AdaptersDisabledReference, "predict", no_reference)


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_auto_computes_the_store_in_process_and_trains_as_the_live_reference(mode, tiny_models, toy_pairs, train_args, tmp_path, monkeypatch, capsys):
    live = train_args("sd15", tiny_models["sd15"], toy_pairs, tmp_path / "live", f"train.mode={mode}", *COMMON)
    assert main(live) == 0
    auto = [arg.replace(str(tmp_path / "live"), str(tmp_path / "auto")) for arg in live]
    import diffalign.trainers.reference_errors as reference_errors

    # the in-process pass runs the base model itself; the training steps then run no reference at all
    real_compute = reference_errors._compute

    def compute_then_forbid(*args, **kwargs):
        result = real_compute(*args, **kwargs)
        forbid_reference_network(monkeypatch)
        return result

    monkeypatch.setattr(reference_errors, "_compute", compute_then_forbid)
    capsys.readouterr()
    assert main([*auto, "train.reference_errors=auto", "train.reference_batch_size=4"]) == 0
    assert "reference errors of 6 groups" in capsys.readouterr().out
    manifest = json.loads((tmp_path / "auto" / "reference_errors" / "manifest.json").read_text())
    assert manifest["coverage"]["groups"] == 3 * 2

    assert losses(tmp_path / "auto") == pytest.approx(losses(tmp_path / "live"), rel=1e-5)
    trained, reference = final_tensors(tmp_path / "auto"), final_tensors(tmp_path / "live")
    assert trained.keys() == reference.keys() and trained
    for name, value in trained.items():
        torch.testing.assert_close(value, reference[name], rtol=1e-4, atol=1e-6, msg=name)


def test_auto_reuses_a_covering_store_and_recomputes_one_a_longer_resume_outgrows(tiny_models, toy_pairs, train_args, tmp_path, capsys):
    args = train_args("sd15", tiny_models["sd15"], toy_pairs, tmp_path / "out", "train.mode=lora", *COMMON,
                      "train.reference_errors=auto", "train.checkpointing_steps=1")
    two_steps = [*args, "train.max_steps=2"]
    assert main(two_steps) == 0
    assert "reference errors of 4 groups" in capsys.readouterr().out
    store = tmp_path / "out" / "reference_errors" / "errors.safetensors"
    written = store.stat().st_mtime_ns

    # a resume to 3 steps draws groups the 2-step store lacks: computed again, for 3 steps
    assert main([*args, "train.resume_from=latest"]) == 0
    out = capsys.readouterr().out
    assert "reference errors of 6 groups" in out and "reusing" not in out
    assert store.stat().st_mtime_ns != written
    assert len(losses(tmp_path / "out")) == 3

    # resuming from step 2 again, up to the same 3 steps: the store covers it and is read, not rebuilt
    rewritten = store.stat().st_mtime_ns
    assert main([*args, f"train.resume_from={tmp_path / 'out' / 'checkpoint-2'}"]) == 0
    out = capsys.readouterr().out
    assert "reusing the reference errors" in out and "reference errors of" not in out
    assert store.stat().st_mtime_ns == rewritten


def test_stale_or_short_store_is_refused_with_what_to_do(tiny_models, toy_pairs, train_args, tmp_path, capsys):
    store = tmp_path / "reference"
    args = train_args("sd15", tiny_models["sd15"], toy_pairs, tmp_path / "out", "train.mode=lora", *COMMON)
    assert main(["reference-errors", *args[1:], "--output", str(store)]) == 0

    # beta is not in the key: a sweep reuses one store.
    assert main([*args, f"train.reference_errors={store}", "method.beta=20"]) == 0
    capsys.readouterr()

    assert main([*args, f"train.reference_errors={store}", "train.seed=7", "train.overwrite=true"]) == 2
    error = capsys.readouterr().err
    assert "stale" in error and "seed (store: 0, config: 7)" in error and "diffalign reference-errors" in error

    assert main([*args, f"train.reference_errors={store}", "train.max_steps=40", "train.overwrite=true"]) == 2
    error = capsys.readouterr().err
    assert "cover the groups of a run of 3 steps" in error and "Recompute" in error and "Traceback" not in error


def test_a_method_without_reference_refuses_a_store(tiny_models, toy_pairs, train_args, tmp_path, capsys):
    args = train_args("sd15", tiny_models["sd15"], toy_pairs, tmp_path / "out", "train.max_steps=1")
    args[1] = "sd15/mapo"
    assert main(["reference-errors", *args[1:], "--output", str(tmp_path / "store")]) == 2
    assert "uses no reference model" in capsys.readouterr().err
    assert main([*args, f"train.reference_errors={tmp_path / 'store'}"]) == 2
    assert "train.reference_errors: method mapo uses no reference model" in capsys.readouterr().err
    assert main([*args, "train.reference_errors=auto"]) == 2
    assert "train.reference_errors: method mapo uses no reference model" in capsys.readouterr().err
