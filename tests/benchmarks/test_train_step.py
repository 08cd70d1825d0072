"""Smoke test of benchmarks/train_step.py: it runs both modes end to end and reports sane figures.

Not a timing test: no threshold on speed, only that the script works and fills its JSON.
"""

from __future__ import annotations

import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_train_step_benchmark_reports_both_modes(load_benchmark, tiny_models, toy_pairs, tmp_path):
    benchmark = load_benchmark("train_step")
    out = tmp_path / "bench.json"
    cache = tmp_path / "cache"
    report = benchmark.main(
        [
            str(REPO / "configs" / "sd15" / "dpo.yaml"),
            f"model.path={tiny_models['sd15']}",
            f"data.path={toy_pairs}",
            "data.resolution=32",
            "train.batch_size=2",
            "train.mode=lora",
            "--warmup", "1",
            "--steps", "2",
            "--threads", "1",
            "--cache-dir", str(cache),
            "--json", str(out),
        ]
    )
    written = json.loads(out.read_text())
    assert written["modes"].keys() == {"raw", "cached"} == report["modes"].keys()
    for mode, result in written["modes"].items():
        assert result["steps"] == 2 and len(result["step_seconds"]) == 2, mode
        assert result["groups"] == 4, mode
        assert result["pairs_per_s"] > 0 and result["s_per_step"] > 0, mode
        assert result["peak_memory_mb"] > 0, mode
    assert written["modes"]["raw"]["encoders_loaded"] is True
    assert written["modes"]["cached"]["encoders_loaded"] is False, "the cached mode trains without VAE or text encoders"
    assert (cache / "manifest.json").is_file() and written["cache"]["num_groups"] == 64
