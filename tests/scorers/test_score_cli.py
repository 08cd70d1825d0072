"""``diffalign score`` / ``score-pairs`` and their cores (scorers/folder.py, scorers/preference.py).

A tiny random CLIPModel (saved to a tmp folder, as a user's local weights would be) and
trivial brightness scorers registered for the duration of a test; nothing downloads.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from diffalign.apps.score_cli import add_score_parsers, parse_scorer_specs
from diffalign.scorers import base, load_scorer
from diffalign.scorers.folder import (
    FolderItem,
    ScoreTable,
    collect_items,
    hpsv2_benchmark,
    score_items,
    summarize,
    write_table,
)
from diffalign.scorers.preference import (
    PairScores,
    evaluate_preference,
    pair_credits,
    preference_accuracy,
    tune_threshold,
)
from PIL import Image

from diffalign.data.images import to_rgb
from diffalign.data.report import SkipReport

REPO = Path(__file__).resolve().parents[2]


class Brightness:
    """Test scorer: ``mean(pixels) / divisor`` per image (prompts ignored); cheap and exactly predictable."""

    def __init__(self, name: str, divisor: float):
        self.name, self.divisor, self.calls = name, divisor, []

    def score(self, images, prompts, batch_size=None) -> torch.Tensor:
        assert len(images) == len(prompts) and all(image.mode == "RGB" for image in images)
        self.calls.append(len(images))
        return torch.tensor([np.asarray(image, np.float64).mean() / self.divisor for image in images], dtype=torch.float32)


@pytest.fixture
def brightness(monkeypatch: pytest.MonkeyPatch) -> None:
    """Register ``hpsv2-brightness`` (pixels / 255, so x100 in the benchmark) and ``brightness`` (pixels / 10)."""
    for name, divisor in (("hpsv2-brightness", 255.0), ("brightness", 10.0)):
        monkeypatch.setitem(base._REGISTRY, name, lambda weights, device, dtype, n=name, d=divisor: Brightness(n, d))


def _run(argv: list[str]) -> int:
    """Dispatch like ``diffalign.apps.cli.main`` does, on a parser holding only the score commands."""
    parser = argparse.ArgumentParser(prog="diffalign")
    add_score_parsers(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.run(args)


def _rgb(seed: int, size: tuple[int, int] = (40, 48)) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def _manifest_folder(root: Path) -> Path:
    """rgb.jpg, rgba.png, gray.png (prompted), corrupt.jpg (prompted, not an image), noprompt.png (row without prompt)."""
    root.mkdir()
    rng = np.random.default_rng(3)
    _rgb(0).save(root / "rgb.jpg")
    Image.fromarray(rng.integers(0, 256, (36, 44, 4), dtype=np.uint8), "RGBA").save(root / "rgba.png")
    Image.fromarray(rng.integers(0, 256, (50, 38), dtype=np.uint8), "L").save(root / "gray.png")
    (root / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    _rgb(1).save(root / "noprompt.png")
    rows = [
        {"image": "rgb.jpg", "prompt": "a red circle"},
        {"image": "rgba.png", "prompt": "a blue square"},
        {"image": "gray.png", "prompt": "a cat"},
        {"image": "corrupt.jpg", "prompt": "two dogs"},
        {"image": "noprompt.png"},
    ]
    (root / "meta.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def test_manifest_folder_reports_bad_images_and_summary_matches_table(tiny_clip: Path, tmp_path: Path, capsys):
    folder = _manifest_folder(tmp_path / "imgs")
    table, summary_json = tmp_path / "out" / "table.csv", tmp_path / "summary.json"
    argv = ["score", str(folder), "--manifest", str(folder / "meta.jsonl"), "--scorer", f"clipscore={tiny_clip}",
            "--scorer", f"pickscore={tiny_clip}", "--batch-size", "2", "--out", str(table),
            "--summary-json", str(summary_json), "--no-progress"]  # fmt: skip
    assert _run(argv) == 0
    rows = list(csv.DictReader(table.open()))
    assert [r["image"] for r in rows] == ["rgb.jpg", "rgba.png", "gray.png"]
    summary = json.loads(summary_json.read_text())
    assert summary["layout"] == "manifest" and summary["images"] == 3
    skipped = summary["skipped"]
    assert skipped["counts"] == {"undecodable image": 1, "missing prompt": 1} and skipped["rows_seen"] == 5
    assert [e["row_id"] for e in skipped["rows"]["undecodable image"]] == ["corrupt.jpg"]
    assert [e["row_id"] for e in skipped["rows"]["missing prompt"]] == ["noprompt.png"]
    for name in ("clipscore", "pickscore"):
        values = np.array([float(r[name]) for r in rows])
        assert summary["scorers"][name] == pytest.approx(
            {"mean": values.mean(), "std": values.std(), "count": 3}, rel=1e-12, abs=1e-12
        )
    printed = capsys.readouterr().out
    assert "clipscore: mean" in printed and "corrupt.jpg" in printed and "noprompt.png" in printed
    # RGBA is composited onto white and grayscale expanded (diffalign.data.images.to_rgb), then scored.
    scorer = load_scorer("pickscore", weights=str(tiny_clip))
    expected = scorer.score([to_rgb(Image.open(folder / n)) for n in ("rgba.png", "gray.png")], ["a blue square", "a cat"])
    got = torch.tensor([float(rows[1]["pickscore"]), float(rows[2]["pickscore"])])
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_two_scorers_in_one_pass_equal_two_separate_passes(tiny_clip: Path, tmp_path: Path):
    folder = _manifest_folder(tmp_path / "imgs")
    found = collect_items(folder, manifest=folder / "meta.jsonl", report=SkipReport())
    scorers = {name: load_scorer(name, weights=str(tiny_clip)) for name in ("clipscore-100", "pickscore")}
    together = score_items(found.items, scorers, batch_size=2, report=SkipReport(), progress=False)
    for name, scorer in scorers.items():
        alone = score_items(found.items, {name: scorer}, batch_size=3, report=SkipReport(), progress=False)
        assert [i.key for i in alone.items] == [i.key for i in together.items]
        np.testing.assert_allclose(alone.scores[name], together.scores[name], atol=1e-5, rtol=1e-5)


def test_sidecar_layout_and_jsonl_output(tmp_path: Path, brightness):
    folder = tmp_path / "side"
    (folder / "sub").mkdir(parents=True)
    for i, (name, prompt) in enumerate([("a.png", "a cat\n"), ("sub/b.png", "a dog"), ("c.png", None), ("d.png", " ")]):
        Image.new("RGB", (8, 8), (10 * i, 20 * i, 30 * i)).save(folder / name)
        if prompt is not None:
            (folder / name).with_suffix(".txt").write_text(prompt)
    out, report = tmp_path / "t.jsonl", SkipReport()
    found = collect_items(folder, report=report)
    assert found.layout == "sidecar" and [(i.key, i.prompt) for i in found.items] == [("a.png", "a cat"), ("sub/b.png", "a dog")]
    assert report.counts == {"missing prompt": 2} and report.rows_seen == 4
    assert [e.row_id for e in report.examples["missing prompt"]] == ["c.png", "d.png"]
    assert _run(["score", str(folder), "--scorer", "brightness", "--out", str(out), "--no-progress"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["image"] for r in rows] == ["a.png", "sub/b.png"]
    assert rows[1]["brightness"] == pytest.approx((10 + 20 + 30) / 3 / 10)


def _hpsv2_folder(root: Path) -> Path:
    """anime: 160 PNGs, pixel value i (i = prompt index); photo: 160 JPEGs of value 255 - i, index 85 missing,
    plus photo/extra.png (no prompt index); drafts/ has no prompts file."""
    for style, values, suffix in (("anime", range(160), ".png"), ("photo", (255 - i for i in range(160)), ".jpg")):
        (root / style).mkdir(parents=True)
        for i, v in enumerate(values):
            if not (style == "photo" and i == 85):
                Image.new("RGB", (8, 8), (v, v, v)).save(root / style / f"{i:05d}{suffix}", quality=100)
        (root / f"{style}.json").write_text(json.dumps([f"{style} prompt {i}" for i in range(160)]))
    Image.new("RGB", (8, 8)).save(root / "photo" / "extra.png")
    (root / "drafts").mkdir()
    Image.new("RGB", (8, 8)).save(root / "drafts" / "00000.jpg")
    return root


def test_hpsv2_layout_chunk_of_80_protocol_by_hand(tmp_path: Path, brightness):
    """anime (160 images, score i / 255): chunk means 39.5/255 and 119.5/255, x100 -> 15.490 and 46.863;
    style = their mean 100 * 79.5 / 255 = 31.176, std = 100 * 40 / 255 = 15.686 (np.std of two values).
    photo (score (255 - i) / 255, index 85 missing): chunk 0 mean 215.5/255; chunk 1 = 255 - mean of
    {80..159} minus {85} = 255 - 9475/79; the chunk keeps its 79 images."""
    root, report = _hpsv2_folder(tmp_path / "bench"), SkipReport()
    found = collect_items(root, report=report)
    assert found.layout == "hpsv2" and len(found.items) == 319
    assert report.counts == {"missing prompt": 2, "missing image": 1}
    assert {e.row_id for e in report.examples["missing prompt"]} == {"photo/extra.png", "drafts/00000.jpg"}
    assert [e.row_id for e in report.examples["missing image"]] == ["photo/00085.jpg"]
    assert found.items[5].prompt == "anime prompt 5" and found.items[5].index == 5

    scorers = {name: load_scorer(name) for name in ("hpsv2-brightness", "brightness")}
    table = score_items(found.items, scorers, batch_size=64, report=report, layout=found.layout, progress=False)
    assert scorers["brightness"].calls == [64, 64, 64, 64, 63]  # one pass, batches of --batch-size
    anime = hpsv2_benchmark(table, "hpsv2-brightness")["styles"]["anime"]
    assert anime["mean"] == pytest.approx(100 * 79.5 / 255) and anime["std"] == pytest.approx(100 * 40 / 255)
    assert anime["chunks"] == 2 and anime["count"] == 160
    # photo: JPEG may shift a flat grey by a level, so the per-image truth is the decoded pixel value.
    photo = np.array([np.asarray(Image.open(root / "photo" / f"{i:05d}.jpg"), np.float64).mean() if i != 85 else np.nan
                      for i in range(160)]) / 255  # fmt: skip
    assert np.nanmax(np.abs(photo * 255 - (255 - np.arange(160)))) <= 1
    chunks = 100 * np.array([np.nanmean(photo[:80]), np.nanmean(photo[80:])])
    summary = summarize(table)
    bench = summary.hpsv2["hpsv2-brightness"]
    assert bench["styles"]["photo"] == pytest.approx({"mean": chunks.mean(), "std": chunks.std(), "chunks": 2, "count": 159})
    everything = np.concatenate([np.arange(160) / 255, photo[~np.isnan(photo)]])
    assert bench["average"] == pytest.approx(100 * everything.mean()) and bench["count"] == 319
    assert summary.hpsv2["brightness"]["scale"] == 1.0 and bench["scale"] == 100.0  # x100 only for hpsv2 scorers
    assert summary.hpsv2["brightness"]["styles"]["anime"]["mean"] == pytest.approx(79.5 / 10)
    assert "anime" in summary.format() and "average" in summary.format()


def test_table_formats_round_trip_and_atomic_write(tmp_path: Path):
    import pyarrow.parquet as pq

    values = np.array([0.1, -2.5, 3.0e-7], dtype=np.float32)
    items = [FolderItem(Path(f"{s}/{i:05d}.jpg"), f"p, \"{i}\"\n", f"{s}/{i:05d}.jpg", s, i)
             for i, s in enumerate(["anime", "photo", "photo"])]  # fmt: skip
    table = ScoreTable(items, {"hpsv2": values}, layout="hpsv2")
    read = {
        ".parquet": lambda p: pq.read_table(p).to_pylist(),
        ".csv": lambda p: list(csv.DictReader(io.StringIO(p.read_text(), newline=""))),
        ".jsonl": lambda p: [json.loads(line) for line in p.read_text().splitlines()],
    }
    for suffix, reader in read.items():
        rows = reader(write_table(table, tmp_path / f"t{suffix}"))
        assert [r["prompt"] for r in rows] == [i.prompt for i in items], suffix
        assert [int(r["index"]) for r in rows] == [0, 1, 2] and [r["style"] for r in rows] == ["anime", "photo", "photo"]
        np.testing.assert_array_equal(np.array([float(r["hpsv2"]) for r in rows], np.float32), values)
    with pytest.raises(ValueError, match="unknown table format"):
        write_table(table, tmp_path / "t.txt")
    # A failed write leaves the previous table whole and no temporary file behind.
    target = tmp_path / "keep.jsonl"
    target.write_text("old\n")
    unwritable = ScoreTable([FolderItem(Path("x.jpg"), "\ud800", "x.jpg")], {"s": values[:1]})  # no UTF-8 for it
    with pytest.raises(UnicodeEncodeError):
        write_table(unwritable, target)
    assert target.read_text() == "old\n" and sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_preference_protocol_on_a_hand_example():
    """Tune pairs (logits s0, s1; label_0), |p0 - p1| = tanh(|s0 - s1| / 2):
    A (2, 0) 1: 0.762;  B (0, 1) 0: 0.462;  C (0.1, 0) tie: 0.050;  D (0, 0.3) 1: 0.149 (predicts image 1).
    t=0   : A 1, B 1, C 0.5 (tie label only), D 0       -> 2.5/4
    t=0.1 : C predicted tie on a tie label -> 1           -> 3/4
    t=0.2..0.4: D predicted tie -> 0.5                   -> 3.5/4  (best: 0.2, the first)
    t=0.5..0.7: B tie -> 0.5 -> 3/4;  t=0.8..1: A tie too -> 2.5/4.
    Eval at 0.2: (3, 0) label 0 -> 0; (0, 0) tie/tie -> 1; (1, 0) tie label, 0.462 > 0.2 -> 0.5; (0, 2) 0 -> 1: 2.5/4."""
    tune_scores = np.array([[2.0, 0.0], [0.0, 1.0], [0.1, 0.0], [0.0, 0.3]])
    tune_labels = np.array([1.0, 0.0, 0.5, 1.0])
    best, accuracies = tune_threshold(tune_scores, tune_labels)
    expected = [2.5, 3, 3.5, 3.5, 3.5, 3, 3, 3, 2.5, 2.5, 2.5]
    assert best == 0.2 and list(accuracies.values()) == pytest.approx([e / 4 for e in expected])
    eval_scores, eval_labels = np.array([[3.0, 0.0], [0.0, 0.0], [1.0, 0.0], [0.0, 2.0]]), np.array([0.0, 0.5, 0.5, 0.0])
    assert preference_accuracy(eval_scores, eval_labels, 0.2) == 0.625
    np.testing.assert_array_equal(pair_credits(np.array([1.0, 0.5, 0.5, 0.0]), np.array([1.0, 0.5, 1.0, 1.0])), [1, 1, 0.5, 0])
    # Swapping the two images of every pair (and the labels) changes nothing; logit_scale sharpens p.
    assert preference_accuracy(eval_scores[:, ::-1], 1 - eval_labels, 0.2) == 0.625
    assert preference_accuracy(eval_scores / 10, eval_labels, 0.2, logit_scale=10) == 0.625
    results = evaluate_preference(PairScores(["a"] * 4, eval_labels, {"s": eval_scores}),
                                  PairScores(["b"] * 4, tune_labels, {"s": tune_scores}))  # fmt: skip
    result = results["s"]
    assert (result.threshold, result.accuracy, result.tune_accuracy, result.tuned) == (0.2, 0.625, 0.875, True)
    assert (result.label_ties, result.predicted_ties, result.pairs) == (2, 1, 4)
    given = evaluate_preference(PairScores(["a"] * 4, eval_labels, {"s": eval_scores}), threshold=0.0)["s"]
    assert not given.tuned and given.accuracy == pytest.approx((0 + 1 + 0.5 + 1) / 4)


def _pairs_parquet(path: Path, pairs: list[tuple[int, int, float]], corrupt: bool = False) -> None:
    """Pick-a-Pic schema; image i is a flat grey of value v (PNG bytes: exact), label_0 as given."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    def png(v: int) -> bytes:
        buffer = io.BytesIO()
        Image.new("RGB", (8, 8), (v, v, v)).save(buffer, format="PNG")
        return buffer.getvalue()

    rows = [{"jpg_0": png(a), "jpg_1": png(b), "label_0": l0, "label_1": 1 - l0, "caption": "a cat", "ranking_id": i}
            for i, (a, b, l0) in enumerate(pairs)]  # fmt: skip
    if corrupt:
        rows.append(dict(rows[0], jpg_1=b"broken", ranking_id=99))
    pq.write_table(pa.Table.from_pylist(rows), path)


def test_score_pairs_cli_tunes_on_one_split_and_reports_on_the_other(tmp_path: Path, brightness, capsys):
    """The hand example above through the CLI: ``brightness`` scores grey value / 10, so value 20 -> logit 2."""
    data = tmp_path / "pickapic"
    data.mkdir()
    _pairs_parquet(data / "validation_unique.parquet", [(20, 0, 1.0), (0, 10, 0.0), (1, 0, 0.5), (0, 3, 1.0)])
    _pairs_parquet(data / "test_unique.parquet", [(30, 0, 0.0), (0, 0, 0.5), (10, 0, 0.5), (0, 20, 0.0)], corrupt=True)
    out = tmp_path / "pairs.json"
    argv = ["score-pairs", str(data), "--scorer", "brightness", "--tune-split", "validation_unique",
            "--eval-split", "test_unique", "--summary-json", str(out), "--no-progress", "--batch-size", "3"]  # fmt: skip
    assert _run(argv) == 0
    report = json.loads(out.read_text())
    result = report["scorers"]["brightness"]
    assert result["threshold"] == 0.2 and result["accuracy"] == 0.625 and result["tune_accuracy"] == 0.875
    assert result["pairs"] == 4 and result["label_ties"] == 2 and result["tune_pairs"] == 4
    assert report["skipped"]["eval"]["counts"] == {"undecodable image": 1}
    assert "62.50%" in capsys.readouterr().out
    assert _run([*argv, "--threshold", "0"]) == 0  # given, not tuned: the tune split is not read
    given = json.loads(out.read_text())
    assert given["tune_split"] is None and given["scorers"]["brightness"]["tuned"] is False
    assert given["scorers"]["brightness"]["accuracy"] == 0.625  # (0 + 1 + 0.5 + 1) / 4


def test_cli_errors_and_scorer_specs(tiny_clip: Path, tmp_path: Path, capsys):
    folder = _manifest_folder(tmp_path / "imgs")
    assert _run(["score", str(folder), "--scorer", "pickscorer", "--manifest", str(folder / "meta.jsonl")]) == 2
    assert "pickscore" in capsys.readouterr().err  # the valid names are listed
    assert _run(["score", str(folder), "--scorer", "pickscore", "--out", str(tmp_path / "t.xlsx")]) == 2
    assert _run(["score", str(folder), "--scorer", f"pickscore={tiny_clip}", "--scorer-option", "pickscore:heads=1",
                 "--manifest", str(folder / "meta.jsonl"), "--no-progress"]) == 2  # fmt: skip
    assert "unknown options" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError):  # cli.main turns this into exit status 2
        _run(["score", str(tmp_path / "nowhere"), "--scorer", "pickscore"])
    specs = parse_scorer_specs(["pickscore", "pickscore=/w", "aesthetic=/l14"], ["aesthetic:head=/h.pth", "pickscore:batch_size=8"])
    assert [s.column for s in specs] == ["pickscore", "pickscore=/w", "aesthetic"]
    assert specs[2].options == {"head": "/h.pth"} and specs[0].options == {"batch_size": 8} == specs[1].options
    with pytest.raises(ValueError, match="no --scorer named"):
        parse_scorer_specs(["pickscore"], ["clipscore:x=1"])


def test_throughput_benchmark_smoke(tmp_path: Path):
    """Not a timing test: the script runs its three modes on a tiny model and fills its JSON."""
    spec = importlib.util.spec_from_file_location("score_throughput", REPO / "benchmarks" / "score_throughput.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "bench.json"
    threads = torch.get_num_threads()
    report = module.main(["--tiny", "--images", "5", "--reload-images", "2", "--batch-size", "4", "--threads", "1",
                          "--json", str(out)])  # fmt: skip
    written = json.loads(out.read_text())
    assert written["modes"].keys() == {"batched", "per-image", "per-image-reload"} == report["modes"].keys()
    assert [written["modes"][m]["images"] for m in ("batched", "per-image", "per-image-reload")] == [5, 5, 2]
    assert all(r["images_per_s"] > 0 and math.isfinite(r["mean_score"]) for r in written["modes"].values())
    assert written["max_abs_diff_batched_vs_per_image"] < 1e-4
    assert written["threads"] == 1 and torch.get_num_threads() == threads  # the caller's setting is restored
