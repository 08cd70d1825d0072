"""Every method's recipe runs through `diffalign train` on every family's tiny model, LoRA and full;
MaPO builds no reference; RankDPO on pairs is Diffusion-DPO; DCPO conditions each image on its caption."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from diffalign.apps.cli import main
from diffalign.trainers.metrics import read_metrics

REPO = Path(__file__).resolve().parents[2]
FOLDER = {"sd15": "sd15", "sd2": "sd15", "sdxl": "sdxl", "sd3": "sd3"}


def method_args(method: str, family: str, model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return [
        "train",
        str(REPO / "configs" / FOLDER[family] / f"{method}.yaml"),
        f"model.path={model}",
        f"data.path={data}",
        f"train.output_dir={out}",
        "data.resolution=32",
        "train.max_steps=2",
        "train.batch_size=2",
        "train.gradient_accumulation_steps=1",
        "train.mixed_precision=no",
        "train.gradient_checkpointing=false",
        "train.progress_bar=false",
        "train.report_to=none",
        *extra,
    ]


@pytest.fixture(scope="module")
def method_data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Toy data in each method's format: pairs (MaPO), ranked lists of 4 (RankDPO), dual-caption pairs (DCPO)."""
    from diffalign.toy.ranked import write_ranked
    from diffalign.toy.world import write_pairs

    root = tmp_path_factory.mktemp("method-data")
    return {
        "mapo": write_pairs(root / "pairs.parquet", n=16, seed=0),
        "rankdpo": write_ranked(root / "ranked.parquet", n=16, seed=0, k=4),
        "dcpo": write_pairs(root / "dual.parquet", n=16, seed=0, dual_captions=True),
    }


@pytest.mark.parametrize("method", ["mapo", "rankdpo", "dcpo"])
@pytest.mark.parametrize("family", ["sd15", "sd2", "sdxl", "sd3"])
@pytest.mark.parametrize("mode", ["lora", "full"])
def test_method_recipe_runs_on_every_family(method, family, mode, tiny_models, method_data, tmp_path):
    out = tmp_path / "run"
    assert main(method_args(method, family, tiny_models[family], method_data[method], out, f"train.mode={mode}")) == 0
    rows = read_metrics(out / "metrics.jsonl")
    assert [row["step"] for row in rows] == [1, 2]
    assert all(math.isfinite(row["loss"]) for row in rows)
    accuracy = "margin_acc" if method == "mapo" else "implicit_acc"
    assert all(0.0 <= row[accuracy] <= 1.0 for row in rows)
    if method == "rankdpo":
        assert all(0.0 < row["ndcg"] <= 1.0 for row in rows)
    record = json.loads((out / "final" / "diffalign.json").read_text())
    assert record["method"] == method and record["steps"] == 2


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_mapo_builds_no_reference(mode, tiny_models, method_data, tmp_path, monkeypatch):
    """Neither a frozen copy nor an adapters-disabled view is made, and the network is never deep-copied."""
    from diffalign.trainers import models

    def forbidden(*args, **kwargs):
        raise AssertionError("MaPO must not build a reference")

    monkeypatch.setattr(models.FrozenCopyReference, "__init__", forbidden)
    monkeypatch.setattr(models.AdaptersDisabledReference, "__init__", forbidden)
    monkeypatch.setattr(models, "copy", SimpleNamespace(deepcopy=forbidden))  # the module's copy only
    out = tmp_path / "run"
    assert main(method_args("mapo", "sd15", tiny_models["sd15"], method_data["mapo"], out, f"train.mode={mode}")) == 0
    assert len(read_metrics(out / "metrics.jsonl")) == 2


def test_rankdpo_on_pairs_trains_exactly_like_diffusion_dpo(tiny_models, method_data, tmp_path):
    """k = 2 Pick-a-Pic pairs: RankDPO's losses and errors equal Diffusion-DPO's at the same β, step by step.

    β = 100 rather than 5000: the loss moves by β times an error difference, and the two objectives
    sum the same float32 terms in another order; at β = 5000 that rounding alone shows at 1e-4."""
    runs = {}
    for method in ("rankdpo", "dpo"):
        out = tmp_path / method
        args = method_args(method, "sd15", tiny_models["sd15"], method_data["mapo"], out, "train.mode=full", "method.beta=100",
                           "train.max_steps=3", "train.learning_rate=1e-4", "train.scale_lr=false",
                           "train.lr_warmup_steps=0", "data.empty_prompt_prob=0", "train.adam_epsilon=1e-4")
        assert main(args) == 0
        runs[method] = read_metrics(out / "metrics.jsonl")
    first_ranked, first_dpo = runs["rankdpo"][0], runs["dpo"][0]
    # Step 1 (before any update): the same errors, loss and gradient.
    assert first_ranked["policy_err_best"] == pytest.approx(first_dpo["policy_err_winner"], rel=1e-6)
    assert first_ranked["policy_err_worst"] == pytest.approx(first_dpo["policy_err_loser"], rel=1e-6)
    assert first_ranked["grad_norm"] == pytest.approx(first_dpo["grad_norm"], rel=1e-5)
    # Every step: the same loss and accuracy. Adam's epsilon is raised to 1e-4 because with the
    # default 1e-8 its first steps move each weight by ~lr * sign(g): rounding-level differences
    # of near-zero gradients (the two losses sum the same terms in another order) would move a few
    # weights by a whole lr in one run and not the other.
    for ranked, dpo in zip(runs["rankdpo"], runs["dpo"]):
        assert ranked["loss"] == pytest.approx(dpo["loss"], rel=1e-5)
        assert ranked["implicit_acc"] == dpo["implicit_acc"]


def _encoded_step(family: str, model: Path, captions: list[list[str]] | None, method: str = "dpo"):
    """One objective step on two fixed groups of a tiny model, with optional per-image captions."""
    from diffalign.backbones import load_backbone
    from diffalign.config import ModelConfig
    from diffalign.trainers.models import FrozenCopyReference
    from diffalign.trainers.objectives import objective_entry
    from diffalign.trainers.step import encode_groups, objective_step, group_generators

    torch.manual_seed(0)
    backbone = load_backbone(ModelConfig(path=str(model)))
    reference = FrozenCopyReference(__import__("copy").deepcopy(backbone.denoiser))
    with torch.no_grad():  # make the policy differ from the reference so the margin is not zero
        for parameter in backbone.denoiser.parameters():
            parameter.add_(0.01 * torch.randn_like(parameter))
    batch = {
        "pixel_values": torch.rand(2, 2, 3, 32, 32) * 2 - 1,
        "prompts": ["a red circle", "a blue square"],
        "captions": captions,
        "original_sizes": torch.full((2, 2, 2), 32),
        "crop_top_lefts": torch.zeros(2, 2, 2, dtype=torch.long),
        "scores": None,
    }
    groups = encode_groups(backbone, batch, 32)
    objective = objective_entry(method).build(objective_entry(method).config_class(beta=50))
    with torch.no_grad():
        output = objective_step(backbone, backbone.denoiser, reference, objective, groups, group_generators([1, 2]))
    return backbone, groups, output


@pytest.mark.parametrize("family", ["sd15", "sdxl", "sd3"])
def test_dcpo_with_identical_captions_equals_dpo_and_conditions_each_image_on_its_own(family, tiny_models):
    same = [["a red circle", "a red circle"], ["a blue square", "a blue square"]]
    _, _, dpo = _encoded_step(family, tiny_models[family], None, "dpo")
    _, _, dcpo_same = _encoded_step(family, tiny_models[family], same, "dcpo")
    # Equal up to float32 rounding: the per-image captions are encoded as a batch of 4, the prompts as a batch of 2.
    assert dcpo_same.loss.item() == pytest.approx(dpo.loss.item(), rel=1e-5)
    for key in ("policy_err_winner", "policy_err_loser", "ref_err_winner", "ref_err_loser"):
        assert dcpo_same.metrics[key].item() == pytest.approx(dpo.metrics[key].item(), rel=1e-5)

    dual = [["a red circle", "a green circle"], ["a blue square", "a blue triangle"]]
    backbone, groups, dcpo_dual = _encoded_step(family, tiny_models[family], dual, "dcpo")
    assert dcpo_dual.loss.item() != pytest.approx(dpo.loss.item(), rel=1e-6)
    flat = groups.flat_conditioning()  # K-major: winners of both groups, then losers
    expected = backbone.encode_prompts(["a red circle", "a blue square", "a green circle", "a blue triangle"])
    for key, value in expected.items():
        assert torch.allclose(flat[key], value, atol=1e-6), f"{family}: {key} is not per-image"


def test_dcpo_reports_and_skips_rows_without_dual_captions(tiny_models, tmp_path, capsys):
    from PIL import Image

    images = tmp_path / "images"
    images.mkdir()
    lines = []
    for i in range(8):
        for name, colour in (("w", (220, 30, 30)), ("l", (30, 30, 220))):
            Image.new("RGB", (32, 32), colour).save(images / f"{name}{i}.png")
        row = {"prompt": "a red circle", "chosen": f"images/w{i}.png", "rejected": f"images/l{i}.png"}
        if i % 4:  # rows 0 and 4 lack the per-image captions
            row.update(chosen_caption="a red circle", rejected_caption="a blue circle")
        lines.append(json.dumps(row))
    manifest = tmp_path / "pairs.jsonl"
    manifest.write_text("\n".join(lines) + "\n")
    out = tmp_path / "run"
    assert main(method_args("dcpo", "sd15", tiny_models["sd15"], manifest, out)) == 0
    counts = json.loads((out / "skipped_rows.json").read_text())["counts"]
    assert counts["missing caption"] == 2
    assert "missing caption" in capsys.readouterr().out


def test_dcpo_refuses_pairs_without_caption_columns(tiny_models, method_data, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(method_args("dcpo", "sd15", tiny_models["sd15"], method_data["mapo"], out)) == 2
    assert "diffalign captions" in capsys.readouterr().err


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from diffalign.toy.world import prompts

    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("\n".join(prompts()) + "\n\n")
    return path


def pso_args(method: str, family: str, model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    """The SDXL-Turbo PSO recipes on a tiny model; a flow model (sd3) has no distilled timesteps."""
    args = method_args(method, family, model, data, out, *extra)
    args[1] = str(REPO / "configs" / "sdxl" / f"{'pso' if method == 'pso' else 'pso_online'}.yaml")
    if family == "sd3":  # neither distilled timesteps nor a zero-SNR rescale exist for a flow schedule
        args += ["model.timestep_mode=uniform", "model.zero_terminal_snr=false"]
    if method == "pso":
        args.append(f"method.reference_dir={out.parent / 'references'}")
    else:
        args.append("method.reward=toy")
    return args


@pytest.mark.parametrize("family", ["sd15", "sd2", "sdxl", "sd3"])
@pytest.mark.parametrize("mode", ["lora", "full"])
def test_pso_offline_runs_on_every_family_and_samples_references_once(family, mode, tiny_models, method_data, tmp_path, monkeypatch):
    out = tmp_path / "run"
    assert main(pso_args("pso", family, tiny_models[family], method_data["mapo"], out, f"train.mode={mode}")) == 0
    rows = read_metrics(out / "metrics.jsonl")
    assert [row["step"] for row in rows] == [1, 2] and all(math.isfinite(row["loss"]) for row in rows)
    (folder,) = (tmp_path / "references").iterdir()
    manifest = [json.loads(line) for line in (folder / "pairs.jsonl").read_text().splitlines()]
    assert len(manifest) == 16 and all((folder / row["rejected"]).is_file() for row in manifest)

    from diffalign.trainers.pso import references as pso_references

    def no_sampling(*args, **kwargs):
        raise AssertionError("the cached reference images must be reused")

    monkeypatch.setattr(pso_references, "generate_images", no_sampling)
    assert main(pso_args("pso", family, tiny_models[family], method_data["mapo"], tmp_path / "again", f"train.mode={mode}")) == 0


def test_pso_hinge_variant_builds_no_reference(tiny_models, method_data, tmp_path):
    out = tmp_path / "run"
    assert main(pso_args("pso", "sdxl", tiny_models["sdxl"], method_data["mapo"], out, "method.variant=hinge")) == 0
    rows = read_metrics(out / "metrics.jsonl")
    assert all(0.0 <= row["hinge_active"] <= 1.0 for row in rows)


@pytest.mark.parametrize("family", ["sd15", "sd2", "sdxl", "sd3"])
@pytest.mark.parametrize("mode", ["lora", "full"])
def test_pso_online_runs_on_every_family(family, mode, tiny_models, prompt_file, tmp_path):
    out = tmp_path / "run"
    assert main(pso_args("pso-online", family, tiny_models[family], prompt_file, out, f"train.mode={mode}")) == 0
    rows = read_metrics(out / "metrics.jsonl")
    assert [row["step"] for row in rows] == [1, 2]
    assert all(math.isfinite(row["loss"]) and row["reward_mean"] <= 0 for row in rows)  # the toy reward is -MSE
    assert rows[0]["log_ratio_winner"] == pytest.approx(0.0, abs=1e-6)  # the first step's policy is the reference


def test_pso_online_heldout_measures_are_exactly_neutral_when_policy_is_reference(tiny_models):
    """Policy = reference: every log-ratio is 0 and both samples of a seed are the same chain, so the
    implicit accuracy and the reward win rate are exactly 0.5 (no bias in the measures themselves;
    checked here on the tiny model so the learning test need not spend a held-out pass on it)."""
    from diffalign.backbones import load_backbone
    from diffalign.config import ModelConfig
    from diffalign.toy.reward import toy_reward
    from diffalign.trainers.pso.online import heldout_online

    backbone = load_backbone(ModelConfig(path=str(tiny_models["sd15"])))
    measures = heldout_online(backbone, backbone.denoiser, backbone.denoiser, ["a red circle", "a blue square"],
                              toy_reward, 32, seeds_per_prompt=3)
    assert measures["implicit_acc"] == 0.5 and measures["reward_win_rate"] == 0.5
    assert measures["reward_policy"] == measures["reward_reference"]


def test_pso_online_with_a_custom_reward_callable(tiny_models, prompt_file, tmp_path):
    """Any reward(images, prompts) -> scores works; a reward that returns the wrong count is a clear error."""
    from diffalign.trainers.config import load_train_config
    from diffalign.trainers.loop import train

    args = pso_args("pso-online", "sd15", tiny_models["sd15"], prompt_file, tmp_path / "run")
    config = load_train_config(args[1], args[2:])
    seen: list[int] = []

    def brightness(images, prompts):
        seen.append(len(images))
        return [float(np.asarray(image.convert("L"), dtype=np.float64).sum()) for image in images]

    result = train(config, reward=brightness)
    assert result.steps == 2 and seen == [4, 4]  # 2 prompts x 2 samples per step
    config = load_train_config(args[1], [*args[2:], f"train.output_dir={tmp_path / 'bad'}"])
    with pytest.raises(ValueError, match="scores for 4 images"):
        train(config, reward=lambda images, prompts: [1.0])


def test_rankdpo_run_reports_and_skips_bad_ranked_rows(tiny_models, method_data, tmp_path):
    """A k mismatch between images and scores, a NaN score and an undecodable image: skipped, counted, run goes on."""
    import pyarrow.parquet as pq

    table = pq.read_table(method_data["rankdpo"])
    rows = table.to_pylist()
    rows[1]["scores"] = rows[1]["scores"][:3]
    rows[2]["scores"] = [float("nan"), *rows[2]["scores"][1:]]
    rows[3]["images"] = [b"not an image", *rows[3]["images"][1:]]
    bad = tmp_path / "bad-ranked.parquet"
    pq.write_table(table.schema.empty_table().from_pylist(rows, schema=table.schema), bad)
    out = tmp_path / "run"
    assert main(method_args("rankdpo", "sd15", tiny_models["sd15"], bad, out, "train.max_steps=8")) == 0
    counts = json.loads((out / "skipped_rows.json").read_text())["counts"]
    assert counts["size mismatch"] == 1 and counts["bad score"] == 1 and counts["undecodable image"] == 1
    assert len(read_metrics(out / "metrics.jsonl")) == 8


def test_dcpo_trains_from_a_cache_of_its_captioned_rows(tiny_models, method_data, tmp_path):
    """`diffalign cache` with a DCPO recipe keeps per-image captions; training from it equals training without."""
    common = ["train.mode=lora", "data.random_flip=false", "data.empty_prompt_prob=0"]
    raw = tmp_path / "raw"
    assert main(method_args("dcpo", "sdxl", tiny_models["sdxl"], method_data["dcpo"], raw, *common)) == 0
    cache = tmp_path / "cache"
    args = method_args("dcpo", "sdxl", tiny_models["sdxl"], method_data["dcpo"], tmp_path / "cached", *common, f"data.cache_dir={cache}")
    assert main(["cache", *args[1:]]) == 0
    assert main(args) == 0
    for a, b in zip(read_metrics(raw / "metrics.jsonl"), read_metrics(tmp_path / "cached" / "metrics.jsonl")):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    manifest = json.loads((cache / "manifest.json").read_text())
    assert manifest["key"]["captioned_rows_only"] is True
    import pyarrow.parquet as pq

    table = pq.read_table(method_data["dcpo"], columns=["caption", "caption_0", "caption_1"]).to_pydict()
    per_image = set(table["caption_0"]) | set(table["caption_1"])
    assert per_image != set(table["caption"])  # the losers' captions are texts of their own
    assert manifest["num_texts"] == 1 + len(per_image)  # '' + every distinct per-image caption
