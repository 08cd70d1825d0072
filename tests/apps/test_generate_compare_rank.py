"""``diffalign generate`` / ``compare`` / ``rank`` on a tiny SDXL-shaped pipeline and hand-made images.

generate: per-image seeds make the batch size irrelevant; a LoRA and a full
fine-tune (in diffalign's ``final/`` layout) change the images; manifest rows.
compare: win rates and bootstrap intervals on hand-made tables, and the whole
generate -> score -> compare chain. rank: k = 4 manifests, 2 scorers, phi
computed by hand, read back by the ranked and the Pick-a-Pic readers.
Nothing downloads.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from diffalign.apps.compare import bootstrap_interval, compare_tables, win_fractions
from diffalign.apps.eval_cli import add_eval_parsers
from diffalign.apps.generate import image_seed
from diffalign.apps.rank import soft_scores
from diffalign.scorers import base as scorer_base
from diffalign.scorers import register_scorer
from PIL import Image

from diffalign.data import SkipReport, open_preference_source

PROMPTS = ["a red circle", "a blue square", "a green triangle"]
SEEDS_PER_PROMPT = 2
STEPS = 2


REPO = Path(__file__).resolve().parents[2]

def _cli(argv: list[str]) -> int:
    """Parse with only the eval subcommands (apps/cli.py wires them in separately) and run."""
    parser = argparse.ArgumentParser(prog="diffalign")
    commands = parser.add_subparsers(dest="command", required=True)
    add_eval_parsers(commands)
    if argv[0] == "score":
        from diffalign.apps.score_cli import add_score_parsers

        add_score_parsers(commands)
    args = parser.parse_args(argv)
    return args.run(args)


def _pixels(folder: Path) -> dict[str, np.ndarray]:
    rows = [json.loads(line) for line in (folder / "manifest.jsonl").read_text().splitlines()]
    return {row["image"]: np.asarray(Image.open(folder / row["image"]), dtype=np.int16) for row in rows}


class _ChannelMean:
    """A cheap deterministic scorer: mean of some RGB channels (ignores the prompt)."""

    def __init__(self, name: str, channels: list[int]) -> None:
        self.name, self.channels = name, channels

    def score(self, images: list[Image.Image], prompts: list[str], batch_size: int | None = None) -> torch.Tensor:
        arrays = [np.asarray(image, dtype=np.float64)[..., self.channels].mean() for image in images]
        return torch.tensor(arrays, dtype=torch.float32)


@pytest.fixture(scope="module", autouse=True)
def test_scorers():
    """``test-brightness`` (all channels) and ``test-redness`` (red channel), removed afterwards."""
    specs = {"test-brightness": [0, 1, 2], "test-redness": [0]}
    for name, channels in specs.items():
        register_scorer(name, lambda weights, device, dtype, n=name, c=channels: _ChannelMean(n, c), overwrite=True)
    yield
    for name in specs:
        scorer_base._REGISTRY.pop(name, None)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tiny SDXL pipeline, a prompt file, and two runs' output dirs: a LoRA and a full fine-tune."""
    from diffusers import UNet2DConditionModel

    from diffalign.tiny import save_pipeline

    root = tmp_path_factory.mktemp("gcr")
    model = save_pipeline("sdxl", root / "sdxl", seed=0)
    prompts = root / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS[:1]) + "\n\n" + "\n".join(PROMPTS[1:]) + "\n")  # a blank line is skipped

    # LoRA: trained by `diffalign train` (4 LoRA steps of Diffusion-DPO on toy pairs; a large lr so the
    # adapter visibly changes the output), written to lora_run/final as every LoRA run is.
    from diffalign.apps.cli import main
    from diffalign.toy.world import write_pairs

    pairs = write_pairs(root / "pairs.parquet", n=8, seed=0)
    train_argv = [
        "train", str(REPO / "configs" / "sdxl" / "dpo.yaml"), f"model.path={model}", f"data.path={pairs}",
        f"train.output_dir={root / 'lora_run'}", "data.resolution=32", "train.mode=lora", "train.max_steps=4",
        "train.batch_size=2", "train.gradient_accumulation_steps=1", "train.learning_rate=5e-2", "train.scale_lr=false",
        "train.mixed_precision=no", "train.progress_bar=false", "train.report_to=none",
    ]  # fmt: skip
    assert main(train_argv) == 0
    assert json.loads((root / "lora_run" / "final" / "diffalign.json").read_text())["mode"] == "lora"

    # Full fine-tune: the base UNet with its output convolution perturbed, as final/unet.
    unet = UNet2DConditionModel.from_pretrained(model / "unet")
    with torch.no_grad():
        unet.conv_out.bias.add_(0.5)
    full_final = root / "full_run" / "final"
    unet.save_pretrained(full_final / "unet")
    (full_final / "diffalign.json").write_text(json.dumps({"mode": "full", "family": "sdxl", "base_model": str(model)}))
    return {
        "root": root,
        "model": model,
        "prompts": prompts,
        "lora_run": root / "lora_run",
        "full_run": root / "full_run",
    }


def _generate(setup: dict[str, Path], out: Path, *extra: str, batch_size: int = 4) -> Path:
    argv = ["generate", "--prompts", str(setup["prompts"]), "--out", str(out), "--seeds-per-prompt",
            str(SEEDS_PER_PROMPT), "--steps", str(STEPS), "--resolution", "32", "--batch-size", str(batch_size),
            "--device", "cpu", *extra]  # fmt: skip
    assert _cli(argv) == 0
    return out


@pytest.fixture(scope="module")
def base_run(setup: dict[str, Path]) -> Path:
    return _generate(setup, setup["root"] / "gen_base", "--model", str(setup["model"]), "--name", "base")


@pytest.fixture(scope="module")
def lora_run(setup: dict[str, Path]) -> Path:
    # No --model: the base model comes from final/diffalign.json; the run folder is found through final/.
    return _generate(setup, setup["root"] / "gen_lora", "--lora", str(setup["lora_run"]))


def test_generate_manifest_and_batch_size_invariance(setup: dict[str, Path], base_run: Path, tmp_path: Path) -> None:
    rows = [json.loads(line) for line in (base_run / "manifest.jsonl").read_text().splitlines()]
    expected = [
        {"image": f"images/{p:05d}_{s:02d}.png", "prompt": PROMPTS[p], "model": "base", "seed": image_seed(0, p, s)}
        for p in range(len(PROMPTS)) for s in range(SEEDS_PER_PROMPT)
    ]  # fmt: skip
    assert rows == expected
    assert len({row["seed"] for row in rows}) == len(rows)
    assert all(Image.open(base_run / row["image"]).size == (32, 32) for row in rows)
    assert sorted(p.name for p in base_run.iterdir()) == ["generate.json", "images", "manifest.jsonl"]
    assert not [p for p in setup["root"].iterdir() if p.name.startswith(".gen_base")]  # no staging left behind

    one_by_one = _generate(setup, tmp_path / "batch1", "--model", str(setup["model"]), "--name", "base", batch_size=1)
    batched, single = _pixels(base_run), _pixels(one_by_one)
    assert batched.keys() == single.keys()
    for key in batched:  # same seeds, same noise: at most float rounding of batched matmuls
        assert np.abs(batched[key] - single[key]).max() <= 1, key
    assert len({batched[key].tobytes() for key in batched}) == len(batched)  # different seeds, different images

    # An existing output is never replaced without --overwrite.
    assert (
        _cli(["generate", "--model", str(setup["model"]), "--prompts", str(setup["prompts"]), "--out", str(one_by_one)])
        == 2
    )


def test_generate_with_lora_and_finetuned_weights(
    setup: dict[str, Path], base_run: Path, lora_run: Path, tmp_path: Path
) -> None:
    full_run = _generate(
        setup, tmp_path / "gen_full", "--model", str(setup["model"]), "--finetuned", str(setup["full_run"] / "final")
    )
    base = _pixels(base_run)
    for run, kind in ((lora_run, "lora"), (full_run, "full")):
        rows = [json.loads(line) for line in (run / "manifest.jsonl").read_text().splitlines()]
        assert [row["seed"] for row in rows] == [image_seed(0, p, s) for p in range(3) for s in range(SEEDS_PER_PROMPT)]
        assert rows[0]["model"] == f"sdxl+{kind}:{kind}_run"
        changed = _pixels(run)
        # Same seeds, so any difference is the weights' doing. The trained LoRA (4 steps) moves every
        # image by 2-3 levels at most (measured); the perturbed full fine-tune by far more.
        assert all(np.abs(changed[key] - base[key]).max() >= (1 if kind == "lora" else 3) for key in base), kind
    # The wrong flag for the folder's kind is an error, not a silent fallback.
    assert (
        _cli(
            [
                "generate",
                "--lora",
                str(setup["full_run"]),
                "--prompts",
                str(setup["prompts"]),
                "--out",
                str(tmp_path / "x"),
            ]
        )
        == 2
    )
    assert not (tmp_path / "x").exists()


def test_generate_sd3_without_t5_from_jsonl_prompts(tmp_path: Path) -> None:
    """SD3 saved without T5 (text_encoder_3 = [null, null]) loads through the stock pipeline."""
    from diffalign.tiny import save_pipeline

    model = save_pipeline("sd3", tmp_path / "sd3", seed=0)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS[:2]))
    out = tmp_path / "gen"
    argv = ["generate", "--model", str(model), "--prompts", str(prompts), "--out", str(out), "--steps", "2"]
    assert _cli(argv) == 0
    rows = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert [(r["image"], r["prompt"], r["model"]) for r in rows] == [
        ("images/00000_00.png", PROMPTS[0], "sd3"),
        ("images/00001_00.png", PROMPTS[1], "sd3"),
    ]
    assert Image.open(out / rows[0]["image"]).size == (32, 32)


# --------------------------------------------------------------------------- compare


def _table(prompts: list[str], scores: list[float], **extra: list) -> pd.DataFrame:
    return pd.DataFrame({"image": [f"{i}.png" for i in range(len(prompts))], "prompt": prompts, "s": scores, **extra})


def test_compare_win_rates_by_hand() -> None:
    prompts = [f"p{i}" for i in range(5) for _ in range(2)]
    b = _table(prompts, list(np.linspace(0.0, 1.0, 10)))
    better = _table(prompts, list(np.linspace(0.0, 1.0, 10) + 1.0))
    (always,) = compare_tables(better, b, resamples=200, seed=0)
    assert (always.win_rate, always.low, always.high, always.prompts, always.comparisons) == (1.0, 1.0, 1.0, 5, 10)
    (same,) = compare_tables(b, b, resamples=200, seed=0)
    assert (same.win_rate, same.low, same.high) == (0.5, 0.5, 0.5)

    # Per-prompt fractions: p0 1 (win), p1 0 (loss), p2 0.5 (tie), p3 1 -> mean 0.625.
    a = _table(["p0", "p1", "p2", "p3"], [2.0, 0.0, 1.0, 3.0])
    b = _table(["p0", "p1", "p2", "p3"], [1.0, 1.0, 1.0, 1.0])
    (mixed,) = compare_tables(a, b, resamples=500, seed=0)
    assert mixed.win_rate == 0.625 and 0.0 <= mixed.low <= 0.625 <= mixed.high <= 1.0 and mixed.low < mixed.high
    fractions = np.array([1.0, 0.0, 0.5, 1.0])
    assert bootstrap_interval(fractions, 500, seed=0) == (mixed.low, mixed.high)  # the interval resamples prompts

    # Seeds pair images when both tables have them: 3 vs 2 and 5 vs 4 are wins (by order it would be 0.5).
    a = _table(["p", "p"], [3.0, 5.0], seed=[7, 8])
    b = _table(["p", "p"], [4.0, 2.0], seed=[8, 7])
    assert compare_tables(a, b, resamples=10)[0].win_rate == 1.0
    assert compare_tables(a.drop(columns="seed"), b.drop(columns="seed"), resamples=10)[0].win_rate == 0.5
    # Unequal counts: every A image meets every B image: 3 > 2, 1 < 2 -> 0.5.
    assert win_fractions([(np.array([3.0, 1.0]), np.array([2.0, 2.0]))])[0].tolist() == [0.5]


def test_compare_cli_reads_tables_and_draws_chart(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    prompts = [f"p{i}" for i in range(4)]
    _table(prompts, [2.0, 2.0, 2.0, 2.0], other=[1.0] * 4).to_csv(tmp_path / "a.csv", index=False)
    with (tmp_path / "b.jsonl").open("w") as handle:  # whole-number floats stay float columns
        for i, prompt in enumerate(prompts):
            handle.write(json.dumps({"image": f"{i}.png", "prompt": prompt, "s": 1.0}) + "\n")
    chart = tmp_path / "chart.png"
    assert (
        _cli(["compare", str(tmp_path / "a.csv"), str(tmp_path / "b.jsonl"), "--out", str(chart), "--bootstrap", "50"])
        == 0
    )
    printed = capsys.readouterr().out
    assert "1.000  [1.000, 1.000]" in printed and "scorers not in both tables (left out): other" in printed
    assert Image.open(chart).format == "PNG"


def test_generate_score_compare_end_to_end(
    base_run: Path, lora_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tables = {}
    for name, run in (("lora", lora_run), ("base", base_run)):
        tables[name] = tmp_path / f"{name}.parquet"
        argv = ["score", str(run), "--scorer", "test-brightness", "--scorer", "test-redness", "--out", str(tables[name]), "--no-progress"]
        assert _cli(argv) == 0
    capsys.readouterr()
    chart = tmp_path / "lora_vs_base.png"
    assert _cli(["compare", str(tables["lora"]), str(tables["base"]), "--out", str(chart), "--bootstrap", "100"]) == 0
    printed = capsys.readouterr().out

    # The expected brightness win rate, straight from the pixels: pairs (prompt, sample), mean over prompts.
    lora, base = _pixels(lora_run), _pixels(base_run)
    per_prompt = []
    for p in range(len(PROMPTS)):
        keys = [f"images/{p:05d}_{s:02d}.png" for s in range(SEEDS_PER_PROMPT)]
        wins = [
            1.0 if lora[k].mean() > base[k].mean() else 0.0 if lora[k].mean() < base[k].mean() else 0.5 for k in keys
        ]
        per_prompt.append(np.mean(wins))
    line = next(row for row in printed.splitlines() if row.startswith("test-brightness"))
    assert float(line.split()[1]) == pytest.approx(np.mean(per_prompt), abs=5e-4)
    assert "test-redness" in printed
    assert Image.open(chart).size[0] > 0


# --------------------------------------------------------------------------- rank


def test_soft_scores_by_hand() -> None:
    # n = 1, k = 3, rewards (3, 1, 1): C = (2, 0.5, 0.5), phi = C / 2.
    assert soft_scores(np.array([[[3.0, 1.0, 1.0]]])).tolist() == [[1.0, 0.25, 0.25]]
    # k = 2: the winner gets 1, the loser 0; an exact tie gives 0.5 each.
    assert soft_scores(np.array([[[2.0, 1.0], [1.0, 1.0]]])).tolist() == [[1.0, 0.0], [0.5, 0.5]]


def _write_source(folder: Path, items: dict[str, tuple[int, int, int] | bytes], model: str | None) -> Path:
    """A manifest of 32 px solid-colour PNGs (or raw bytes: a corrupt file), in its own folder."""
    (folder / "images").mkdir(parents=True)
    with (folder / "manifest.jsonl").open("w") as manifest:
        for i, (prompt, colour) in enumerate(items.items()):
            path = folder / "images" / f"{i}.png"
            if isinstance(colour, bytes):
                path.write_bytes(colour)
            else:
                Image.new("RGB", (32, 32), colour).save(path)
            manifest.write(
                json.dumps({"image": f"images/{i}.png", "prompt": prompt, **({"model": model} if model else {})}) + "\n"
            )
    return folder


def test_rank_four_sources_two_scorers(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    colours = {  # per source: P1, P2, P3 (missing from d), P4 (b's file is corrupt)
        "a": {"P1": (200, 0, 0), "P2": (255, 255, 255), "P3": (1, 1, 1), "P4": (1, 1, 1)},
        "b": {"P1": (0, 200, 0), "P2": (0, 0, 0), "P3": (2, 2, 2), "P4": b"not a png"},
        "c": {"P1": (100, 100, 100), "P2": (50, 50, 50), "P3": (3, 3, 3), "P4": (3, 3, 3)},
        "d": {"P1": (30, 30, 30), "P2": (60, 0, 0), "P4": (4, 4, 4)},
    }
    models = {"a": "model-a", "b": "model-b", "c": None, "d": None}  # c, d: named by their folders
    sources = [_write_source(tmp_path / name, items, models[name]) for name, items in colours.items()]
    ranked, pairs = tmp_path / "out" / "ranked.parquet", tmp_path / "out" / "pairs.parquet"
    argv = ["rank", *[arg for s in sources for arg in ("--source", str(s))], "--scorer", "test-brightness",
            "--scorer", "test-redness", "--out", str(ranked), "--pairs-out", str(pairs), "--device", "cpu"]  # fmt: skip
    assert _cli(argv) == 0
    printed = capsys.readouterr().out
    assert "ranked lists: 2, pairs: 2" in printed and "missing prompt" in printed and "undecodable image" in printed

    # P1 brightness: c 100 > a = b 66.7 > d 30 -> wins a 1.5, b 1.5, c 3, d 0;
    #    redness:    a 200 > c 100 > d 30 > b 0 -> wins a 3, b 0, c 2, d 1.
    #    C = (4.5, 1.5, 5, 1), n (k-1) = 6 -> phi c 5/6, a 3/4, b 1/4, d 1/6.
    # P2 brightness: a 255 > c 50 > d 20 > b 0; redness: a 255 > d 60 > c 50 > b 0.
    #    C = (6, 0, 3, 3) -> phi a 1, c 1/2, d 1/2 (tie: source order), b 0.
    report = SkipReport()
    source = open_preference_source(ranked, report=report)
    assert type(source).__name__ == "RankedSource" and len(source) == 2 and source.group_size == 4
    first, second = source.load(0), source.load(1)
    assert first.prompt == "P1" and first.models == ["c", "model-a", "model-b", "d"]
    assert first.scores == pytest.approx([5 / 6, 3 / 4, 1 / 4, 1 / 6])
    assert np.asarray(first.images[0])[0, 0].tolist() == [100, 100, 100]
    assert second.prompt == "P2" and second.models == ["model-a", "c", "d", "model-b"]
    assert second.scores == pytest.approx([1.0, 0.5, 0.5, 0.0])
    assert report.total == 0  # nothing all-tied, nothing malformed

    pair_source = open_preference_source(pairs, report=SkipReport())
    assert type(pair_source).__name__ == "PickapicSource" and len(pair_source) == 2
    pair = pair_source.load(0)
    assert pair.prompt == "P1" and pair.models == ["c", "d"]
    assert np.asarray(pair.images[0])[0, 0].tolist() == [100, 100, 100]
    assert np.asarray(pair.images[1])[0, 0].tolist() == [30, 30, 30]


def test_generate_manifests_open_as_arena_sources(base_run: Path, lora_run: Path) -> None:
    """`diffalign arena` reads generate's output folders as they are: one model each, same-seed pairs by prompt."""
    from diffalign.apps.arena.sources import load_sources, match_pairs
    from diffalign.data.report import SkipReport

    report = SkipReport()
    sources = load_sources([str(base_run), str(lora_run)], report)
    assert report.total == 0 and "base" in sources and len(sources) == 2
    pairs = match_pairs(sources)
    base_rows = [json.loads(line) for line in (base_run / "manifest.jsonl").read_text().splitlines()]
    assert len(pairs) == len(base_rows)
    seeds = {}
    for run in (base_run, lora_run):
        for line in (run / "manifest.jsonl").read_text().splitlines():
            row = json.loads(line)
            seeds[(run, str((run / row["image"]).resolve()))] = row["seed"]
    for pair in pairs:
        a_run, b_run = (base_run, lora_run) if pair.a.model == "base" else (lora_run, base_run)
        assert seeds[(a_run, str(pair.a.path))] == seeds[(b_run, str(pair.b.path))], "paired images share a seed"
