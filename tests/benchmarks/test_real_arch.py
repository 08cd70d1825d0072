"""Smoke test of benchmarks/real_arch.py at tiny size: one timed LoRA DPO step, its FLOPs, the LoRA loads back.

The script's children run in this process here (a fresh interpreter per child would cost more than the step);
no threshold on speed, only that every figure the README reports is produced and sane.
"""

from __future__ import annotations

import json


def test_one_step_is_timed_counted_and_its_lora_loads_into_the_stock_pipeline(load_benchmark, tiny_models, toy_pairs, tmp_path):
    benchmark = load_benchmark("real_arch")
    from diffalign.trainers import loop

    patched = (loop.MetricsWriter, loop.save_checkpoint)
    overrides = benchmark._train_overrides("sd15", tiny_models["sd15"], toy_pairs, 32, 2, "cpu", tmp_path / "run")
    figures_file = tmp_path / "figures.json"
    benchmark._child_train(overrides, figures_file, count_flops=True)
    assert (loop.MetricsWriter, loop.save_checkpoint) == patched, "the timing hooks are removed after the run"
    figures = json.loads(figures_file.read_text())
    assert figures["rc"] == 0 and len(figures["step_seconds"]) == 2 and all(s > 0 for s in figures["step_seconds"])
    assert figures["flops"] > 0 and figures["peak_rss_mb"] > 0

    load_file = tmp_path / "load.json"
    benchmark._child_load(str(tiny_models["sd15"]), str(tmp_path / "run" / "final"), load_file)
    loaded = json.loads(load_file.read_text())
    assert loaded["pipeline"] == "StableDiffusionPipeline" and loaded["lora_layers"] > 0 and loaded["adapters"]

    result = {"family": "sd15", "resolution": 32, "denoiser_parameters": benchmark._denoiser_parameters(tiny_models["sd15"]),
              "s_per_step": figures["step_seconds"][-1], "pairs_per_s": 1 / figures["step_seconds"][-1],
              "peak_rss_mb": figures["peak_rss_mb"], "flops_per_step": figures["flops"], "mfu": 0.5,
              "lora_loads": loaded}  # fmt: skip
    assert result["denoiser_parameters"] > 0
    assert "| sd15 | 32 |" in benchmark._table([result]) and "50.0%" in benchmark._table([result])


def test_paper_memory_table_uses_the_published_parameter_counts(load_benchmark):
    table = load_benchmark("real_arch").paper_table()
    assert "| sd15 | 859.5 M |" in table and "| sdxl | 2,567.5 M |" in table and "| sd3 | 2,028.3 M |" in table
