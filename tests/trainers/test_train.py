"""The training loop end to end: every family's recipe, LoRA and full, artifacts, resume, invariances, cache."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from diffalign.apps.cli import main
from diffalign.tiny import SD3_FAMILIES
from diffalign.trainers.metrics import read_metrics


def losses(output_dir: Path) -> list[float]:
    return [row["loss"] for row in read_metrics(output_dir / "metrics.jsonl")]


@pytest.mark.parametrize("family", ["sd15", "sd2", "sdxl", "sd3", "sd35-medium", "sd35-large"])
@pytest.mark.parametrize("mode", ["lora", "full"])
def test_recipe_runs_on_tiny_model(family, mode, tiny_models, toy_pairs, train_args, tmp_path):
    """Each family's DPO recipe runs a few steps through `diffalign train` and saves what stock diffusers loads."""
    out = tmp_path / "run"
    code = main(train_args(family, tiny_models[family], toy_pairs, out, f"train.mode={mode}", "train.checkpointing_steps=2"))
    assert code == 0
    rows = read_metrics(out / "metrics.jsonl")
    assert [row["step"] for row in rows] == [1, 2, 3]
    assert all(math.isfinite(row["loss"]) and 0.0 <= row["implicit_acc"] <= 1.0 for row in rows)
    assert (out / "checkpoint-2").is_dir() and (out / "checkpoint-3").is_dir()
    assert not list(out.glob(".*tmp*")), "no staging folder is left behind"
    record = json.loads((out / "final" / "diffalign.json").read_text())
    assert record["mode"] == mode and record["steps"] == 3
    if mode == "lora":
        assert (out / "final" / "pytorch_lora_weights.safetensors").is_file()
    else:
        subfolder = "transformer" if family in SD3_FAMILIES else "unet"
        assert (out / "final" / subfolder / "config.json").is_file()
    assert list((out / "logs").rglob("events.out.tfevents*")), "TensorBoard events are written"


def _stock_pipeline(family: str, path: Path):
    from diffusers import DiffusionPipeline

    extra = {"text_encoder_3": None, "tokenizer_3": None} if family in SD3_FAMILIES else {}
    pipeline = DiffusionPipeline.from_pretrained(path, **extra)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def _generate(pipeline) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    output = pipeline("a red circle", num_inference_steps=2, height=32, width=32, output_type="latent", generator=generator)
    return output.images


@pytest.mark.parametrize("family", ["sd15", "sdxl", "sd3", "sd35-medium", "sd35-large"])
def test_saved_lora_loads_into_stock_pipeline_and_changes_output(family, tiny_models, toy_pairs, train_args, tmp_path):
    out = tmp_path / "run"
    assert main(train_args(family, tiny_models[family], toy_pairs, out, "train.mode=lora", "train.learning_rate=1e-2", "train.scale_lr=false")) == 0
    pipeline = _stock_pipeline(family, tiny_models[family])
    before = _generate(pipeline)
    pipeline.load_lora_weights(str(out / "final"))
    from safetensors.torch import load_file

    saved = load_file(out / "final" / "pytorch_lora_weights.safetensors")
    denoiser = pipeline.transformer if family in SD3_FAMILIES else pipeline.unet
    loaded = {n.replace(".default_0.", "."): p for n, p in denoiser.named_parameters() if ".lora_" in n}
    prefix = "transformer." if family in SD3_FAMILIES else "unet."
    if family == "sd35-medium":  # MMDiT-X: the second, image-only attention is adapted too
        assert any(".attn2.to_q.lora_A" in key for key in saved), sorted(saved)[:8]
    assert saved and {k.removeprefix(prefix) for k in saved} == set(loaded), "every saved adapter is loaded"
    assert all(torch.equal(loaded[k.removeprefix(prefix)], v) for k, v in saved.items()), "with the saved values"
    after = _generate(pipeline)
    pipeline.unload_lora_weights()
    unloaded = _generate(pipeline)
    assert before.shape == after.shape
    assert (after - before).abs().max() > 1e-6, "the trained LoRA must change the stock pipeline's output (generation is deterministic)"
    assert torch.equal(unloaded, before), "the change is the LoRA's: unloading it restores the base output"

    from diffalign.backbones import load_backbone
    from diffalign.config import ModelConfig
    from diffalign.trainers.export import load_trained_denoiser

    model = ModelConfig(path=str(tiny_models[family]))
    base, trained = load_backbone(model, load_encoders=False).denoiser, load_backbone(model, load_encoders=False).denoiser
    trained = load_trained_denoiser(out / "final", trained)
    assert sum(p.numel() for n, p in trained.named_parameters() if "lora" in n) > 0
    assert sum(p.numel() for n, p in base.named_parameters() if "lora" in n) == 0


def test_full_fine_tune_saves_a_loadable_changed_unet(tiny_models, toy_pairs, train_args, tmp_path):
    from diffusers import UNet2DConditionModel

    out = tmp_path / "run"
    assert main(train_args("sd15", tiny_models["sd15"], toy_pairs, out, "train.mode=full", "train.learning_rate=1e-4", "train.scale_lr=false")) == 0
    trained = UNet2DConditionModel.from_pretrained(out / "final" / "unet")
    base = UNet2DConditionModel.from_pretrained(tiny_models["sd15"], subfolder="unet")
    diffs = [(a - b).abs().max().item() for a, b in zip(trained.state_dict().values(), base.state_dict().values())]
    assert max(diffs) > 0


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_resume_reproduces_the_uninterrupted_losses(mode, tiny_models, toy_pairs, train_args, tmp_path):
    """10 straight steps and 5 + resume + 5 give the same losses (torchtune's resume invariance)."""
    common = [f"train.mode={mode}", "train.checkpointing_steps=5", "train.lr_scheduler=constant_with_warmup",
              "train.lr_warmup_steps=3", "train.learning_rate=1e-3", "train.scale_lr=false"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert main(train_args("sd15", tiny_models["sd15"], toy_pairs, straight, *common, "train.max_steps=10")) == 0
    assert main(train_args("sd15", tiny_models["sd15"], toy_pairs, resumed, *common, "train.max_steps=5")) == 0
    assert main(train_args("sd15", tiny_models["sd15"], toy_pairs, resumed, *common, "train.max_steps=10", "train.resume_from=latest")) == 0
    assert len(losses(straight)) == 10
    assert losses(resumed) == losses(straight)


def test_resume_survives_a_torn_last_metrics_line(tiny_models, toy_pairs, train_args, tmp_path):
    """Disk full or power loss mid-write leaves half a JSON line at the end of metrics.jsonl: the resume
    drops it (its step is redone) and gives the uninterrupted run's losses; a bad line elsewhere is an error."""
    from diffalign.trainers.metrics import read_metrics

    common = ["train.checkpointing_steps=2", "train.learning_rate=1e-3", "train.scale_lr=false"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert main(train_args("sd15", tiny_models["sd15"], toy_pairs, straight, *common, "train.max_steps=4")) == 0
    assert main(train_args("sd15", tiny_models["sd15"], toy_pairs, resumed, *common, "train.max_steps=2")) == 0
    with (resumed / "metrics.jsonl").open("a") as handle:
        handle.write('{"step": 3, "loss": 0.69')  # torn: no closing brace, no newline
    assert main(train_args("sd15", tiny_models["sd15"], toy_pairs, resumed, *common, "train.max_steps=4", "train.resume_from=latest")) == 0
    assert losses(resumed) == losses(straight)
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(ValueError, match="line 2 is not JSON"):
        read_metrics(broken)


def test_gradient_accumulation_1x4_equals_4x1(tiny_models, toy_pairs, train_args, tmp_path):
    """One step on 4 pairs, as one batch of 4 or as 4 accumulated batches of 1 (trl's invariance test).

    Per-group noise seeds make the two see identical noise; the logged loss and the norm of the
    accumulated gradient (before clipping) must agree. (Parameters after one AdamW step are not
    compared: Adam's first update is ~lr*sign(g), which flips for gradients near zero.)

    Why beta = 1, not the recipe's 5000: at step 0 the policy equals its frozen reference, so the
    loss is log 2 up to float32 rounding, and float32 CPU kernels round differently for a batch of
    1 and of 4 (and differently on AVX2 and AVX-512/AMX). The loss sees that rounding times beta:
    at beta = 5000 an Intel Xeon gave 0.693222 against 0.693147. At beta = 1 the same rounding
    (~1e-7 in the error gap) moves the loss by ~1e-8, below float32's resolution at log 2, so
    no CPU's rounding can decide the test. Beta's own scaling is tested separately below.

    Tolerance of the gradient norm: at beta = 5000 the two norms were 1.0e-4 apart (relatively) on
    an AMD EPYC, because beta x rounding also moved the sigmoid weight; at beta = 1 they are
    0.01927365 and 0.01927364 there (5e-7 apart). rel 1e-3 leaves three orders of magnitude for
    another CPU's rounding and still catches an accumulation bug by far (a missing 1/4 loss scale
    makes the accumulated gradient 4 times too large).
    """
    common = ["train.mode=full", "train.max_steps=1", "train.learning_rate=1e-3", "train.scale_lr=false",
              "train.lr_scheduler=constant", "method.beta=1"]
    one_batch, accumulated = tmp_path / "b4", tmp_path / "ga4"
    assert main(train_args("sd15", tiny_models["sd15"], toy_pairs, one_batch, *common, "train.batch_size=4")) == 0
    assert main(train_args("sd15", tiny_models["sd15"], toy_pairs, accumulated, *common, "train.batch_size=1", "train.gradient_accumulation_steps=4")) == 0
    a, b = read_metrics(one_batch / "metrics.jsonl")[0], read_metrics(accumulated / "metrics.jsonl")[0]
    assert a["loss"] == pytest.approx(math.log(2), abs=1e-6), "at step 0 the policy is its reference"
    assert b["loss"] == pytest.approx(a["loss"], abs=1e-6)
    assert a["grad_norm"] > 0
    assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-3)
    # Metrics are averaged over the 4 micro-batches: the mean errors equal the batch of 4's. (Not
    # implicit_acc: at step 0 every pair's margin is 0 up to rounding, so its sign, and the accuracy,
    # is decided by the kernels: 0.5 for the batch of 4 and 0.625 for batches of 1 on one torch thread.)
    for key in ("policy_err_winner", "policy_err_loser", "ref_err_winner", "ref_err_loser"):
        assert a[key] > 0 and b[key] == pytest.approx(a[key], rel=1e-5), key


def test_dpo_gradient_scales_with_beta(tiny_models, toy_pairs, train_args, tmp_path):
    """At step 0 DPO's gradient is beta/2 * sigmoid(0) * d(error gap): doubling beta doubles it.

    Both runs use the same batch of 4 and the same kernels, so the error gradients are bitwise the
    same; only the scalar weight beta/2 * sigmoid(-beta/2 * gap) differs. The gap is float32
    rounding (~1e-7 at most), so the sigmoid stays 1/2 to ~1e-7 at beta <= 2 and the ratio is 2 to
    well inside rel 1e-4 on any CPU. A loss that ignored beta gives a ratio of 1.
    """
    common = ["train.mode=full", "train.max_steps=1", "train.learning_rate=1e-3", "train.scale_lr=false",
              "train.lr_scheduler=constant", "train.batch_size=4"]
    norms = {}
    for beta in (1, 2):
        out = tmp_path / f"beta{beta}"
        assert main(train_args("sd15", tiny_models["sd15"], toy_pairs, out, *common, f"method.beta={beta}")) == 0
        norms[beta] = read_metrics(out / "metrics.jsonl")[0]["grad_norm"]
    assert norms[1] > 0
    assert norms[2] / norms[1] == pytest.approx(2.0, rel=1e-4)


@pytest.mark.parametrize("family", ["sd15", "sdxl", "sd3"])
def test_training_from_cache_matches_and_never_loads_encoders(family, tiny_models, toy_pairs, train_args, tmp_path, monkeypatch):
    import diffusers
    import transformers

    cache = tmp_path / "cache"
    # beta=10: with the recipe's 5000, float rounding between batched and unbatched VAE calls (~1e-7)
    # is amplified into visibly different trajectories; the comparison is about the cache, not beta.
    args = train_args(family, tiny_models[family], toy_pairs, tmp_path / "plain", "data.random_flip=false", "train.mode=lora",
                      "train.learning_rate=1e-3", "train.scale_lr=false", "method.beta=10")
    assert main(args) == 0
    assert main(["cache", args[1], *args[2:], f"data.cache_dir={cache}", "--batch-size", "8", "--shard-size", "16"]) == 0
    manifest = json.loads((cache / "manifest.json").read_text())
    assert manifest["num_groups"] == 64 and len(manifest["group_shards"]) == 4

    def refuse(*_, **__):
        raise AssertionError("training from a cache must not load the VAE or text encoders")

    monkeypatch.setattr(diffusers.AutoencoderKL, "from_pretrained", refuse)
    monkeypatch.setattr(transformers.CLIPTextModel, "from_pretrained", refuse)
    monkeypatch.setattr(transformers.CLIPTextModelWithProjection, "from_pretrained", refuse)
    cached_args = [a.replace(str(tmp_path / "plain"), str(tmp_path / "cached")) for a in args]
    assert main([*cached_args, f"data.cache_dir={cache}"]) == 0
    assert losses(tmp_path / "cached") == pytest.approx(losses(tmp_path / "plain"), rel=1e-5)


@pytest.mark.parametrize("cache_dtype", ["float16", "bfloat16"])
def test_half_precision_cache_trains_in_fp32_and_bf16_runs(cache_dtype, tiny_models, toy_pairs, train_args, tmp_path):
    """A cache written in half precision (half the disk and RAM) feeds fp32 and bf16 runs; it used to crash
    with a Half/Float mismatch. At step 0 the policy is its reference, so the fp32 run's DPO loss is log 2."""
    cache = tmp_path / "cache"
    args = train_args("sdxl", tiny_models["sdxl"], toy_pairs, tmp_path / "run", "data.random_flip=false", f"data.cache_dir={cache}")
    assert main(["cache", *args[1:], "--dtype", cache_dtype]) == 0
    assert json.loads((cache / "manifest.json").read_text())["dtype"] == cache_dtype
    for precision in ("no", "bf16"):
        out = tmp_path / f"run-{precision}"
        run = [a.replace(str(tmp_path / "run"), str(out)) for a in args]
        assert main([*run, f"train.mixed_precision={precision}"]) == 0, precision
        values = losses(out)
        assert len(values) == 3 and all(math.isfinite(v) for v in values), (precision, values)
        if precision == "no":
            assert values[0] == pytest.approx(math.log(2), abs=1e-6)


def test_zero_terminal_snr_on_a_flow_model_is_a_clear_error(tiny_models, toy_pairs, train_args, tmp_path, capsys):
    assert main(train_args("sd3", tiny_models["sd3"], toy_pairs, tmp_path / "run", "model.zero_terminal_snr=true")) == 2
    message = capsys.readouterr().err
    assert "zero_terminal_snr applies to DDPM" in message and str(tiny_models["sd3"]) in message


def test_fp16_mixed_precision_on_cpu_is_a_clear_error(tiny_models, toy_pairs, train_args, tmp_path, capsys):
    assert main(train_args("sd15", tiny_models["sd15"], toy_pairs, tmp_path / "run", "train.mixed_precision=fp16")) == 2
    message = capsys.readouterr().err
    assert "fp16 needs a GPU" in message and "bf16" in message


def test_stale_cache_is_refused_with_what_changed(tiny_models, toy_pairs, train_args, tmp_path, capsys):
    cache = tmp_path / "cache"
    args = train_args("sd15", tiny_models["sd15"], toy_pairs, tmp_path / "run", "data.random_flip=false", f"data.cache_dir={cache}")
    assert main(["cache", *args[1:]]) == 0
    assert main([*args, "data.resolution=64"]) == 2
    message = capsys.readouterr().err
    assert "stale" in message and "resolution" in message and "diffalign cache" in message
    assert main([*args, f"model.path={tiny_models['sd2']}"]) == 2
    assert "model" in capsys.readouterr().err


def test_unknown_config_key_names_key_and_file(tiny_models, toy_pairs, train_args, tmp_path, capsys):
    args = train_args("sd15", tiny_models["sd15"], toy_pairs, tmp_path / "run", "train.lerning_rate=1e-4")
    assert main(args) == 2
    message = capsys.readouterr().err
    assert "train.lerning_rate" in message and "unknown key" in message and "configs/sd15/dpo.yaml" in message


def test_missing_data_file_is_a_clear_error(tiny_models, train_args, tmp_path, capsys):
    missing = tmp_path / "nowhere" / "pairs.parquet"
    assert main(train_args("sd15", tiny_models["sd15"], missing, tmp_path / "run")) == 2
    assert str(missing) in capsys.readouterr().err


def test_optional_optimizer_without_its_package_says_how_to_install(tiny_models, toy_pairs, train_args, tmp_path, capsys):
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("bitsandbytes is installed here")
    assert main(train_args("sd15", tiny_models["sd15"], toy_pairs, tmp_path / "run", "train.optimizer=adamw8bit")) == 2
    assert "pip install 'diffalign[bnb]'" in capsys.readouterr().err


def test_two_process_ddp_equals_one_process_at_the_same_global_batch(tiny_models, toy_pairs, train_args, tmp_path):
    """CPU DDP (gloo, 2 processes x 2 pairs) takes the same first step as 1 process x 4 pairs.

    Launched with torchrun, as `accelerate launch` does on GPUs; ACCELERATE_USE_CPU selects accelerate's
    multi-CPU backend. Per-group noise seeds make the two runs see the same noise for the same rows.
    """
    import os
    import socket
    import subprocess
    import sys

    common = ["train.mode=full", "train.max_steps=1", "train.learning_rate=1e-3", "train.scale_lr=false", "train.lr_scheduler=constant"]
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    assert main(train_args("sd15", tiny_models["sd15"], toy_pairs, single, *common, "train.batch_size=4")) == 0
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(port), "-m", "diffalign.apps.cli",
               *train_args("sd15", tiny_models["sd15"], toy_pairs, ddp, *common, "train.batch_size=2")]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "x 2 processes" in result.stdout
    a, b = read_metrics(single / "metrics.jsonl"), read_metrics(ddp / "metrics.jsonl")
    assert len(b) == 1, "only the main process writes metrics"
    for key in ("loss", "policy_err_winner", "policy_err_loser", "grad_norm"):
        assert a[0][key] == pytest.approx(b[0][key], rel=1e-5), key


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_bf16_mixed_precision_runs_on_cpu(mode, tiny_models, toy_pairs, train_args, tmp_path):
    """bf16 autocast (CPU here, GPU in the recipes): frozen parts in bf16, trainable weights stay fp32."""
    out = tmp_path / "run"
    assert main([*train_args("sd15", tiny_models["sd15"], toy_pairs, out, f"train.mode={mode}"), "train.mixed_precision=bf16"]) == 0
    rows = read_metrics(out / "metrics.jsonl")
    assert len(rows) == 3 and all(math.isfinite(r["loss"]) for r in rows)


def test_cache_never_replaces_a_folder_that_is_not_a_cache(tiny_models, toy_pairs, train_args, tmp_path, capsys):
    precious = tmp_path / "mine"
    precious.mkdir()
    (precious / "notes.txt").write_text("not a cache")
    args = train_args("sd15", tiny_models["sd15"], toy_pairs, tmp_path / "run", "data.random_flip=false", f"data.cache_dir={precious}")
    assert main(["cache", *args[1:]]) == 2
    assert "not a diffalign cache" in capsys.readouterr().err
    assert (precious / "notes.txt").read_text() == "not a cache"


def test_bad_rows_are_skipped_and_summarised_at_the_end_of_a_run(tiny_models, toy_pairs, train_args, tmp_path, capsys):
    """A corrupt image, a tie and a bad label in the training data: the run goes on and says what it skipped."""
    import pyarrow.parquet as pq

    table = pq.read_table(toy_pairs).to_pylist()[:16]
    table[1]["jpg_0"] = b"not a jpeg"
    table[2]["label_0"], table[2]["label_1"] = 0.5, 0.5
    table[3]["label_0"], table[3]["label_1"] = 0.7, 0.3
    bad = tmp_path / "bad.parquet"
    pq.write_table(pq.read_table(toy_pairs).schema.empty_table().from_pylist(table, schema=pq.read_table(toy_pairs).schema), bad)
    out = tmp_path / "run"
    assert main(train_args("sd15", tiny_models["sd15"], bad, out, "train.max_steps=8", "train.batch_size=2")) == 0
    printed = capsys.readouterr().out
    skipped = json.loads((out / "skipped_rows.json").read_text())
    assert skipped["counts"] == {"tie": 1, "label out of {0, 0.5, 1}": 1, "undecodable image": 1}  # 8 steps = 2 epochs: once
    assert {k: [r["row_id"] for r in v] for k, v in skipped["rows"].items()} == {
        "tie": ["bad.parquet:2"], "label out of {0, 0.5, 1}": ["bad.parquet:3"], "undecodable image": ["bad.parquet:1"]}
    assert "skipped" in printed and "undecodable image" in printed and "tie" in printed
    assert "data.validate=lazy" in printed and "rows decoded" in printed
    assert len(read_metrics(out / "metrics.jsonl")) == 8
