"""Smoke test of benchmarks/data_path.py: both decode arms and the tokenizer run and fill the JSON.

Not a timing test: no threshold on speed. What it checks that could break: the draft arm really
decodes at a reduced size (otherwise the benchmark would compare a path with itself).
"""

from __future__ import annotations

import json


def test_data_path_benchmark_times_both_arms_and_the_tokenizer(load_benchmark, tiny_models, tmp_path):
    from diffalign.data.images import decode_image

    benchmark = load_benchmark("data_path")
    assert decode_image(benchmark.photo_jpeg(256, 192, 0), row_id="r", source="s", min_side=24).size == (32, 24)
    out = tmp_path / "bench.json"
    report = benchmark.main(["--pairs", "2", "--rounds", "1", "--size", "256", "192", "--resolution", "24",
                             "--tokenizer-model", str(tiny_models["sdxl"]), "--json", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    arms = report["resolutions"]["24"] if "24" in report["resolutions"] else report["resolutions"][24]
    assert arms["full_groups_per_s"] > 0 and arms["draft_groups_per_s"] > 0
    assert report["tokenize"]["tokenizers"] == 2 and report["tokenize"]["median_s"] > 0
