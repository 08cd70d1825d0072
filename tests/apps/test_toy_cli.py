"""`diffalign toy ...` and `diffalign tiny clip|captioner|paraphraser`: each output is read back by the command it is for."""

from __future__ import annotations

import math

import numpy as np
import pyarrow.parquet as pq
import pytest

from diffalign.apps.cli import main
from diffalign.apps.data_cli import check_data


def test_toy_pairs_are_pickapic_pairs_that_data_check_passes(tmp_path):
    out = tmp_path / "data" / "pairs.parquet"
    assert main(["toy", "pairs", str(out), "--n", "6", "--seed", "3"]) == 0
    report = check_data(str(out), progress=False)
    assert report["usable"] == 6 and report["bad"] == 0
    assert {"jpg_0", "jpg_1", "label_0", "label_1", "caption"} <= set(pq.read_schema(out).names)


def test_toy_pairs_with_dual_captions_carry_a_caption_per_image(tmp_path):
    out = tmp_path / "dual.parquet"
    assert main(["toy", "pairs", str(out), "--n", "3", "--dual-captions"]) == 0
    table = pq.read_table(out).to_pydict()
    assert len(table["caption_0"]) == 3 and all(table["caption_0"]) and all(table["caption_1"])


def test_an_existing_output_is_refused_until_overwrite_and_then_replaced(tmp_path, capsys):
    out = tmp_path / "pairs.parquet"
    assert main(["toy", "pairs", str(out), "--n", "3", "--seed", "0"]) == 0
    before = out.read_bytes()
    assert main(["toy", "pairs", str(out), "--n", "3", "--seed", "1"]) == 2
    error = capsys.readouterr().err
    assert str(out) in error and "--overwrite" in error and "Traceback" not in error
    assert out.read_bytes() == before
    assert main(["toy", "pairs", str(out), "--n", "3", "--seed", "1", "--overwrite"]) == 0
    assert out.read_bytes() != before


@pytest.mark.parametrize("argv, says", [
    (["toy", "pairs", "pairs.csv"], "*.parquet"),
    (["toy", "ranked", "ranked.csv"], "*.jsonl"),
    (["toy", "ranked", "ranked.parquet", "--k", "5"], "k must be in 2..4"),
    (["toy", "prompts", "prompts.txt", "--n", "13"], "12 prompts"),
    (["toy", "world", "world", "--train-seed", "1"], "must differ"),
])  # fmt: skip
def test_bad_toy_arguments_end_in_one_message_and_write_nothing(tmp_path, monkeypatch, capsys, argv, says):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    error = capsys.readouterr().err
    assert says in error and "Traceback" not in error
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("command, out, existing", [
    ("prompts", "taken.txt", "folder"),
    ("ranked", "taken.jsonl", "folder"),
    ("arena-sources", "taken", "file"),
    ("world", "taken", "file"),
])  # fmt: skip
def test_an_output_of_the_wrong_kind_is_refused_even_with_overwrite(tmp_path, capsys, command, out, existing):
    path = tmp_path / out
    if existing == "folder":
        path.mkdir()
        (path / "keep.txt").write_text("mine")
    else:
        path.write_text("mine")
    assert main(["toy", command, str(path), "--overwrite"]) == 2
    error = capsys.readouterr().err
    assert f"is a {existing}" in error and "Traceback" not in error
    assert (path / "keep.txt" if existing == "folder" else path).read_text() == "mine"


def test_a_pair_count_below_one_is_an_argument_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["toy", "pairs", str(tmp_path / "p.parquet"), "--n", "0"])
    assert exit_.value.code == 2 and "must be >= 1" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["ranked.parquet", "ranked.jsonl"])
def test_toy_ranked_lists_are_read_as_ranked_data(tmp_path, name):
    out = tmp_path / name
    assert main(["toy", "ranked", str(out), "--n", "4", "--k", "3"]) == 0
    report = check_data(str(out), format="ranked", progress=False)
    assert report["usable"] == 4 and report["bad"] == 0


def test_toy_prompts_write_one_prompt_per_line(tmp_path):
    out = tmp_path / "prompts.txt"
    assert main(["toy", "prompts", str(out), "--n", "5"]) == 0
    lines = out.read_text().splitlines()
    assert len(lines) == 5 and len(set(lines)) == 5 and all(line.startswith("a ") for line in lines)


def test_toy_arena_sources_are_sources_the_arena_loads_and_matches_by_prompt(tmp_path):
    from diffalign.apps.arena.sources import load_sources, match_pairs
    from diffalign.data import SkipReport

    root = tmp_path / "sources"
    assert main(["toy", "arena-sources", str(root), "--models", "truth", "degraded"]) == 0
    assert sorted(p.name for p in root.iterdir()) == ["degraded", "truth"]
    report = SkipReport()
    sources = load_sources([str(root / "truth"), str(root / "degraded")], report)
    assert sorted(sources) == ["degraded", "truth"] and report.total == 0
    assert len(match_pairs(sources)) == len(sources["truth"]) == 12  # the toy world's 12 prompts, one image each


def test_toy_world_writes_disjoint_train_and_heldout_pairs(tmp_path):
    root = tmp_path / "world"
    assert main(["toy", "world", str(root), "--n-train", "6", "--n-heldout", "3"]) == 0
    train, heldout = (pq.read_table(root / f"{split}.parquet").to_pydict() for split in ("train", "heldout"))
    assert (len(train["caption"]), len(heldout["caption"])) == (6, 3)
    assert not set(train["ranking_id"]) & set(heldout["ranking_id"])


def test_tiny_clip_loads_as_the_clip_scorers_and_scores(tmp_path):
    from diffalign.scorers import load_scorer
    from diffalign.toy.world import ToyWorldSpec, render

    folder = tmp_path / "clip"
    assert main(["tiny", "clip", str(folder)]) == 0
    spec = ToyWorldSpec()
    images = [render("red", "circle", np.random.default_rng(0), spec), render("blue", "square", np.random.default_rng(1), spec)]
    prompts = ["a red circle", "a red circle"]
    clipscore = load_scorer("clipscore", weights=str(folder)).score(images, prompts)
    cosine_x100 = load_scorer("clipscore-100", weights=str(folder)).score(images, prompts)
    load_scorer("pickscore", weights=str(folder)).score(images, prompts)  # the online-PSO reward of the README walk
    assert all(0.0 <= score <= 2.5 for score in clipscore.tolist())  # 2.5 max(cos, 0)
    assert all(math.isfinite(score) and -100.0 <= score <= 100.0 for score in cosine_x100.tolist())  # 100 cos
    assert abs(cosine_x100[0] - cosine_x100[1]) > 1e-3  # the image reaches the score: two drawings, two scores


def test_tiny_models_are_a_pure_function_of_the_seed_and_refuse_a_full_folder(tmp_path, capsys):
    first, again, other = (tmp_path / name for name in ("a", "b", "c"))
    assert main(["tiny", "clip", str(first), "--seed", "0"]) == 0
    assert main(["tiny", "clip", str(again), "--seed", "0"]) == 0
    assert main(["tiny", "clip", str(other), "--seed", "1"]) == 0
    weights = [(folder / "model.safetensors").read_bytes() for folder in (first, again, other)]
    assert weights[0] == weights[1] != weights[2]
    capsys.readouterr()
    assert main(["tiny", "clip", str(first), "--seed", "1"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (first / "model.safetensors").read_bytes() == weights[0]
    assert main(["tiny", "clip", str(first), "--seed", "1", "--overwrite"]) == 0
    assert (first / "model.safetensors").read_bytes() == weights[2]


@pytest.mark.parametrize("flag", [["--scale", "full"], ["--t5"]])
def test_pipeline_only_flags_on_another_tiny_model_are_one_clear_error(tmp_path, capsys, flag):
    assert main(["tiny", "captioner", str(tmp_path / "out"), *flag]) == 2
    error = capsys.readouterr().err
    assert flag[0] in error and "sd15, sd2, sdxl, sd3" in error and "Traceback" not in error
    assert not (tmp_path / "out").exists()


def test_tiny_captioner_and_paraphraser_write_dcpo_captions(tmp_path):
    pairs, out = tmp_path / "pairs.parquet", tmp_path / "dual.parquet"
    assert main(["toy", "pairs", str(pairs), "--n", "4"]) == 0
    assert main(["tiny", "captioner", str(tmp_path / "captioner")]) == 0
    assert main(["tiny", "paraphraser", str(tmp_path / "paraphraser")]) == 0
    assert main(["captions", str(pairs), str(out), "--strategy", "hybrid", "--caption-model", str(tmp_path / "captioner"),
                 "--perturb-model", str(tmp_path / "paraphraser"), "--max-new-tokens", "4", "--device", "cpu"]) == 0  # fmt: skip
    table = pq.read_table(out).to_pydict()
    assert len(table["caption_0"]) == 4
    assert all(caption.strip() for caption in table["caption_0"] + table["caption_1"])
    # the captioner saw the images: the winner's and the loser's captions are not one fixed string
    assert len(set(table["caption_0"] + table["caption_1"])) > 1
