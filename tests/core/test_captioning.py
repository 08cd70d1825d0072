"""Tests for the DCPO caption builder: rule perturbation, strategies, dataset I/O and ``diffalign captions``.

The paraphraser and captioner are tiny random models built in code and saved
in Hugging Face format (diffalign.tiny.text_models); any network connection
attempted during a test fails it.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import re
import socket
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import PIL.Image
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from diffalign.apps.captions_cli import add_captions_parser

from diffalign.captioning.dataset import CaptionStats, add_dual_captions
from diffalign.captioning.perturb import (
    ATTRIBUTE_LEXICON,
    RulePerturber,
    perturb_with_rules,
    row_rng,
)
from diffalign.captioning.strategies import (
    CaptionSettings,
    DualCaption,
    ImageCaptioner,
    PairToCaption,
    available_strategies,
    build_strategy,
    register_strategy,
)
from diffalign.data import SkipReport, decode_image, open_preference_source
from diffalign.tiny import save_tiny_captioner, save_tiny_paraphraser
from diffalign.toy.world import make_pairs

_KIND = {word: kind for kind, words in ATTRIBUTE_LEXICON.items() for word in words}
_ARTICLES = {"a", "an"}
PROMPT = "A small red circle next to two big dogs and a green cat"  # lexicon words: small red circle two big dogs green cat


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing may download: any socket connection raises."""

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError(f"a test tried to open a network connection: {args}")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(socket.socket, "connect", refuse)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("text-models")
    return {"paraphraser": str(save_tiny_paraphraser(root / "t5")), "captioner": str(save_tiny_captioner(root / "blip"))}


def _words(text: str) -> list[str]:
    return re.findall(r"[A-Za-z]+", text)


def _content_words(text: str) -> list[str]:
    return [w for w in _words(text) if w.lower() not in _ARTICLES]


def _read(path: Path) -> list[dict[str, Any]]:
    return pq.read_table(path).to_pylist()


def _open(path: Path, tmp_path: Path) -> Any:
    return open_preference_source(str(path), report=SkipReport(), cache_dir=str(tmp_path / "hf_cache"))


def _fingerprint(image: PIL.Image.Image) -> str:
    return hashlib.sha256(image.tobytes()).hexdigest()[:10]


class _FingerprintStrategy:
    """Captions each image with a hash of its pixels, tagged W (winner) or L (loser): placement becomes checkable."""

    name = "fingerprint"
    needs_images = True

    def caption_pairs(self, pairs: Sequence[PairToCaption], seed: int) -> list[DualCaption]:
        return [DualCaption(f"W {_fingerprint(p.winner)}", f"L {_fingerprint(p.loser)}") for p in pairs]


# --------------------------------------------------------------------------- rule perturbation


def test_rule_levels_change_one_two_or_all_attribute_words() -> None:
    """weak: exactly 1 word, medium: exactly 2, strong: every lexicon word swapped and one modifier dropped."""
    original = _content_words(PROMPT)
    n_attributes = sum(w.lower() in _KIND for w in original)
    assert n_attributes == 8
    for seed in range(5):
        for level, expected in (("weak", 1), ("medium", 2)):
            out = perturb_with_rules(PROMPT, level, row_rng(seed, "row"))
            changed = [(a, b) for a, b in zip(original, _content_words(out.text)) if a != b]
            assert len(_content_words(out.text)) == len(original) and len(changed) == expected, (level, out)
            assert all(_KIND[a.lower()] == _KIND[b.lower()] for a, b in changed)  # a colour stays a colour...
            assert out.edits == expected
        strong = perturb_with_rules(PROMPT, "strong", row_rng(seed, "row"))
        assert strong.edits == n_attributes + 1
        assert _all_swapped_after_one_drop(original, _content_words(strong.text)), strong


def _all_swapped_after_one_drop(original: list[str], out: list[str]) -> bool:
    """Some colour/size word of ``original`` was dropped and every other lexicon word became another of its kind."""
    for d, word in enumerate(original):
        if _KIND.get(word.lower()) not in ("colour", "size"):
            continue
        rest = original[:d] + original[d + 1 :]
        if len(rest) == len(out) and all(
            a == b if a.lower() not in _KIND else (a.lower() != b.lower() and _KIND[a.lower()] == _KIND.get(b.lower()))
            for a, b in zip(rest, out)
        ):
            return True
    return False


def test_rule_perturbation_is_deterministic_per_seed_and_row() -> None:
    perturber = RulePerturber("medium")
    rows = [f"pairs.parquet:{i}" for i in range(20)]
    first = perturber.perturb([PROMPT] * 20, rows, seed=3)
    assert first == perturber.perturb([PROMPT] * 20, rows, seed=3)
    assert first[:5] == perturber.perturb([PROMPT] * 5, rows[:5], seed=3)  # independent of batch composition
    assert len(set(first)) > 5  # rows get different edits
    assert first != perturber.perturb([PROMPT] * 20, rows, seed=4)
    assert all(text != PROMPT for text in first)


def test_rule_perturbation_without_lexicon_words_and_article_agreement() -> None:
    unchanged = perturb_with_rules("nothing here to swap", "strong", row_rng(0, "x"))
    assert (unchanged.text, unchanged.edits) == ("nothing here to swap", 0)
    # "orange" is the only vowel-initial colour, so any swap must turn "an" into "a"; capitals are kept.
    for seed in range(5):
        out = perturb_with_rules("An Orange", "weak", row_rng(seed, "x")).text
        assert out.startswith("A ") and out.split()[1][0].isupper() and out.split()[1].lower() in ATTRIBUTE_LEXICON["colour"]
    with pytest.raises(ValueError, match="weak, medium, strong"):
        RulePerturber("extreme")


# --------------------------------------------------------------------------- strategies end to end


def test_perturb_strategy_parquet(toy_pairs: Path, tmp_path: Path) -> None:
    stats = CaptionStats()
    out = add_dual_captions(toy_pairs, tmp_path / "out.parquet", "perturb", settings=CaptionSettings(level="weak"),
                            batch_size=10, seed=7, stats=stats)
    rows, source_rows = _read(out), _read(toy_pairs)
    assert len(rows) == 64 and stats.rows_written == 64 and stats.unperturbed == 0
    for row, before in zip(rows, source_rows):
        assert {k: row[k] for k in before} == before  # every input column unchanged
        winner, loser = (0, 1) if row["label_0"] == 1.0 else (1, 0)
        expected = perturb_with_rules(row["caption"], "weak", row_rng(7, f"pairs.parquet:{row['ranking_id']}")).text
        assert row[f"caption_{winner}"] == row["caption"]
        assert row[f"caption_{loser}"] == expected != row["caption"]
    source = _open(out, tmp_path)
    for i in range(len(source)):
        group = source.load(i)
        assert group.captions[0] == group.prompt and group.captions[1] != group.prompt


def test_placement_follows_label_0(toy_pairs: Path, tmp_path: Path) -> None:
    """caption_k describes jpg_k, and the winner's caption is the one for the image label_0 prefers."""
    register_strategy("fingerprint-test", lambda settings: _FingerprintStrategy(), overwrite=True)
    out = add_dual_captions(toy_pairs, tmp_path / "fp.parquet", "fingerprint-test", batch_size=7)
    rows = _read(out)
    assert {r["label_0"] for r in rows} == {0.0, 1.0}
    for row in rows:
        winner = 0 if row["label_0"] == 1.0 else 1
        for k in (0, 1):
            tag = "W" if k == winner else "L"
            assert row[f"caption_{k}"] == f"{tag} {_fingerprint(decode_image(row[f'jpg_{k}'], row_id='t', source='t'))}"


def test_caption_and_hybrid_strategies_with_tiny_models(toy_pairs: Path, tmp_path: Path, models: dict[str, str]) -> None:
    settings = CaptionSettings(caption_model=models["captioner"], max_new_tokens=6, level="medium")
    captioned = _read(add_dual_captions(toy_pairs, tmp_path / "cap.parquet", "caption", settings=settings, batch_size=4))
    assert len(captioned) == 64
    assert sum(r["caption_0"] != r["caption_1"] for r in captioned) > 48  # the captions depend on the images
    # The first batch (4 pairs -> 8 images, winner then loser) captioned directly gives the same text, column by column.
    captioner = ImageCaptioner(models["captioner"], max_new_tokens=6)
    images, row_ids = [], []
    for r in captioned[:4]:
        winner = 0 if r["label_0"] == 1.0 else 1
        images += [decode_image(r[f"jpg_{k}"], row_id="t", source="t") for k in (winner, 1 - winner)]
        row_ids += [f"x#{side}" for side in ("winner", "loser")]
    direct = captioner.caption(images, ["p"] * 8, row_ids, seed=0)
    for j, r in enumerate(captioned[:4]):
        winner = 0 if r["label_0"] == 1.0 else 1
        assert (r[f"caption_{winner}"], r[f"caption_{1 - winner}"]) == (direct[2 * j], direct[2 * j + 1])

    hybrid = _read(add_dual_captions(toy_pairs, tmp_path / "hyb.parquet", "hybrid", settings=settings, batch_size=4, seed=1))
    for c, h in zip(captioned, hybrid):
        winner = 0 if c["label_0"] == 1.0 else 1
        assert h[f"caption_{winner}"] == c[f"caption_{winner}"]  # the winner's caption is not perturbed
        rid = f"pairs.parquet:{c['ranking_id']}"
        loser = perturb_with_rules(c[f"caption_{1 - winner}"], "medium", row_rng(1, rid)).text
        assert h[f"caption_{1 - winner}"] == loser
    source = _open(tmp_path / "hyb.parquet", tmp_path)
    group = source.load(0)
    winner = 0 if hybrid[0]["label_0"] == 1.0 else 1
    assert group.captions == [hybrid[0][f"caption_{winner}"], hybrid[0][f"caption_{1 - winner}"]]


def test_prompt_conditioned_captions_continue_the_prompt(models: dict[str, str]) -> None:
    """Prompts of different lengths in one call give what each gives alone: no padding between prefix and caption."""
    captioner = ImageCaptioner(models["captioner"], max_new_tokens=4, condition_on_prompt=True)
    rows = make_pairs(3, seed=5)
    images = [decode_image(r[f"jpg_{k}"], row_id="t", source="t") for r in rows for k in (0, 1)]
    prompts = ["a red circle", "a small red circle next to two dogs", "two cats", "a star", "big dogs", "a blue cup"]
    together = captioner.caption(images, prompts, [str(i) for i in range(6)], seed=0)
    alone = [captioner.caption([im], [p], [str(i)], seed=0)[0] for i, (im, p) in enumerate(zip(images, prompts))]
    assert together == alone
    assert all(c.startswith(p + " ") and len(c.split()) == len(p.split()) + 4 for c, p in zip(together, prompts))


def test_text2text_perturber_is_seeded(toy_pairs: Path, tmp_path: Path, models: dict[str, str]) -> None:
    def run(name: str, level: str, seed: int) -> list[dict[str, Any]]:
        settings = CaptionSettings(perturb_model=models["paraphraser"], level=level, max_new_tokens=5)
        return _read(add_dual_captions(toy_pairs, tmp_path / f"{name}.parquet", "perturb", settings=settings, batch_size=16, seed=seed))

    strong_a, strong_b, strong_c = run("a", "strong", 0), run("b", "strong", 0), run("c", "strong", 1)
    losers = [[r[f"caption_{1 if r['label_0'] == 1.0 else 0}"] for r in rows] for rows in (strong_a, strong_b, strong_c)]
    assert losers[0] == losers[1]  # same seed, same captions
    assert losers[0] != losers[2]  # another seed samples other captions
    assert all(text.strip() and text != r["caption"] for text, r in zip(losers[0], strong_a))
    weak = run("w", "weak", 0)
    assert [r["caption_0"] for r in weak] != [r["caption_0"] for r in strong_a]  # levels decode differently


def test_strategy_registry_rejects_unknown_names_and_missing_models() -> None:
    assert {"perturb", "caption", "hybrid"} <= set(available_strategies())
    with pytest.raises(KeyError, match="caption, .*hybrid, .*perturb"):
        build_strategy("paraphrase")
    with pytest.raises(ValueError, match="already registered"):
        register_strategy("perturb", lambda settings: _FingerprintStrategy())
    with pytest.raises(ValueError, match="needs caption_model"):
        build_strategy("hybrid", CaptionSettings())
    with pytest.raises(ValueError, match="level"):
        CaptionSettings(level="extreme")


def test_tiny_text_models_are_seeded_and_load_back(tmp_path: Path, models: dict[str, str]) -> None:
    from safetensors.torch import load_file
    from transformers import AutoProcessor, AutoTokenizer

    again, other = save_tiny_paraphraser(tmp_path / "again", seed=0), save_tiny_paraphraser(tmp_path / "other", seed=1)
    weights = [load_file(Path(folder) / "model.safetensors") for folder in (models["paraphraser"], again, other)]
    assert all((weights[0][k] == weights[1][k]).all() for k in weights[0])
    assert not all((weights[0][k] == weights[2][k]).all() for k in weights[0])
    tokenizer = AutoTokenizer.from_pretrained(models["paraphraser"])
    ids = tokenizer("A red circle next to two dogs")["input_ids"]
    assert tokenizer.unk_token_id not in ids and tokenizer.decode(ids, skip_special_tokens=True) == "a red circle next to two dogs"
    processor = AutoProcessor.from_pretrained(models["captioner"])
    assert processor(images=[PIL.Image.new("RGB", (50, 40))], return_tensors="pt")["pixel_values"].shape == (1, 3, 32, 32)


# --------------------------------------------------------------------------- bad rows, JSONL, folders


def _jpeg(colour: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    PIL.Image.new("RGB", (32, 32), colour).save(buffer, format="JPEG")
    return buffer.getvalue()


def test_bad_rows_are_reported_by_row_id_and_left_out(tmp_path: Path, models: dict[str, str]) -> None:
    rows = make_pairs(8, seed=3)
    rows[1]["jpg_0"] = b"not a jpeg at all"
    rows[2]["caption"] = "   "
    rows[3]["label_0"], rows[3]["label_1"] = 0.5, 0.5
    rows[4]["label_0"] = 0.7
    path = tmp_path / "bad.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    ids = [f"bad.parquet:{r['ranking_id']}" for r in rows]

    report, stats = SkipReport(), CaptionStats()
    settings = CaptionSettings(caption_model=models["captioner"], max_new_tokens=4)
    out = _read(add_dual_captions(path, tmp_path / "out.parquet", "caption", settings=settings, batch_size=3, report=report, stats=stats))
    skipped = {e.row_id: category for category, examples in report.examples.items() for e in examples}
    assert skipped == {ids[1]: "undecodable image", ids[2]: "missing caption", ids[4]: "label out of {0, 0.5, 1}"}
    assert report.rows_seen == 8 and stats.ties == 1 and stats.rows_written == 5
    assert [r["ranking_id"] for r in out] == [rows[i]["ranking_id"] for i in (0, 3, 5, 6, 7)]
    tie = out[1]
    assert tie["caption_0"] == tie["caption_1"] == tie["caption"]

    class EmptyForOneRow(_FingerprintStrategy):
        def caption_pairs(self, pairs: Sequence[PairToCaption], seed: int) -> list[DualCaption]:
            out = super().caption_pairs(pairs, seed)
            return [DualCaption(d.winner, "" if p.row_id == ids[5] else d.loser) for p, d in zip(pairs, out)]

    report = SkipReport()
    out = _read(add_dual_captions(path, tmp_path / "empty.parquet", EmptyForOneRow(), report=report))
    assert [e.row_id for e in report.examples["empty generated caption"]] == [ids[5]]
    assert report.examples["empty generated caption"][0].reason == "empty generated caption: loser"
    assert len(out) == 4

    report = SkipReport()  # perturbing never decodes images, so the corrupt row is kept
    kept = _read(add_dual_captions(path, tmp_path / "perturbed.parquet", "perturb", report=report))
    assert len(kept) == 6 and set(report.counts) == {"missing caption", "label out of {0, 0.5, 1}"}


def test_jsonl_round_trip(tmp_path: Path, models: dict[str, str]) -> None:
    images = tmp_path / "data" / "images"
    images.mkdir(parents=True)
    for name, colour in (("r.jpg", (220, 20, 20)), ("b.jpg", (20, 20, 220)), ("g.jpg", (20, 200, 20))):
        (images / name).write_bytes(_jpeg(colour))
    (images / "broken.jpg").write_bytes(b"\xff\xd8 truncated")
    lines = [
        {"prompt": "a red circle", "chosen": "images/r.jpg", "rejected": "images/b.jpg", "extra": 1},
        {"prompt": "", "chosen": "images/r.jpg", "rejected": "images/b.jpg"},
        {"prompt": "a green star", "chosen": "images/g.jpg", "rejected": "images/broken.jpg"},
        {"prompt": "nothing to swap here", "chosen": str(images / "g.jpg"), "rejected": "images/r.jpg"},
    ]
    manifest = tmp_path / "data" / "pairs.jsonl"
    manifest.write_text("\n".join(json.dumps(line) for line in lines) + "\n\n")

    report, stats = SkipReport(), CaptionStats()
    settings = CaptionSettings(caption_model=models["captioner"], max_new_tokens=4, level="strong")
    out = add_dual_captions(manifest, tmp_path / "elsewhere" / "pairs.jsonl", "hybrid", settings=settings, report=report, stats=stats)
    assert {e.row_id: c for c, ex in report.examples.items() for e in ex} == {
        "pairs.jsonl:2": "missing caption", "pairs.jsonl:3": "undecodable image"}
    written = [json.loads(line) for line in out.read_text().splitlines()]
    assert [w["prompt"] for w in written] == ["a red circle", "nothing to swap here"]
    assert written[0]["extra"] == 1 and written[0]["chosen"] == "../data/images/r.jpg"  # relative to the new folder
    assert written[1]["chosen"] == str(images / "g.jpg")  # absolute paths stay as written
    assert all(w["chosen_caption"].strip() and w["rejected_caption"].strip() for w in written)

    source = _open(out, tmp_path)
    assert len(source) == 2
    group = source.load(0)
    assert group.captions == [written[0]["chosen_caption"], written[0]["rejected_caption"]]
    assert group.images[0].getpixel((16, 16))[0] > 150  # the chosen image is still the red one

    # Perturbing the prompts: the row without a lexicon word cannot change, and the stats say so.
    stats = CaptionStats()
    out = add_dual_captions(manifest, tmp_path / "data" / "perturbed.jsonl", "perturb", stats=stats)
    written = [json.loads(line) for line in out.read_text().splitlines()]
    assert written[0]["chosen"] == "images/r.jpg"  # same folder: paths untouched
    assert [w["chosen_caption"] == w["prompt"] for w in written] == [True, True, True]
    assert [w["rejected_caption"] == w["prompt"] for w in written] == [False, False, True]
    assert stats.unperturbed == 1 and stats.unperturbed_examples == ["pairs.jsonl:4"]
    assert "1 of 3 loser captions could not be perturbed" in stats.summary()


def test_folder_of_shards_keeps_its_layout(tmp_path: Path) -> None:
    root = tmp_path / "pickapic"
    for i, name in enumerate(("train/train-00000-of-00002.parquet", "train/train-00001-of-00002.parquet")):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pylist(make_pairs(5, seed=10 + i)), root / name)
    out = add_dual_captions(root, tmp_path / "captioned", "perturb", batch_size=2)
    shards = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.parquet"))
    assert shards == ["train/train-00000-of-00002.parquet", "train/train-00001-of-00002.parquet"]
    source = _open(out, tmp_path)
    assert len(source) == 10 and source.load(9).captions[0] == source.load(9).prompt
    assert source.row_id(7).startswith("train/train-00001-of-00002.parquet:")


# --------------------------------------------------------------------------- safety and the CLI


def test_refuses_to_overwrite_the_input_and_existing_outputs(toy_pairs: Path, tmp_path: Path) -> None:
    before = toy_pairs.read_bytes()
    with pytest.raises(ValueError, match="overwrite the input"):
        add_dual_captions(toy_pairs, toy_pairs, "perturb")
    with pytest.raises(ValueError, match="overwrite the input"):
        add_dual_captions(toy_pairs.parent, toy_pairs.parent / "inside", "perturb")
    assert toy_pairs.read_bytes() == before
    out = add_dual_captions(toy_pairs, tmp_path / "out.parquet", "perturb")
    with pytest.raises(FileExistsError):
        add_dual_captions(toy_pairs, out, "perturb")
    add_dual_captions(toy_pairs, out, "perturb", overwrite=True, seed=1)
    assert len(_read(out)) == 64


def test_a_failing_run_leaves_no_output_and_no_temporary_file(toy_pairs: Path, tmp_path: Path) -> None:
    class FailsOnSecondBatch(_FingerprintStrategy):
        calls = 0

        def caption_pairs(self, pairs: Sequence[PairToCaption], seed: int) -> list[DualCaption]:
            FailsOnSecondBatch.calls += 1
            if FailsOnSecondBatch.calls == 2:
                raise RuntimeError("model crashed")
            return super().caption_pairs(pairs, seed)

    with pytest.raises(RuntimeError, match="model crashed"):
        add_dual_captions(toy_pairs, tmp_path / "out.parquet", FailsOnSecondBatch(), batch_size=8)
    assert list(tmp_path.iterdir()) == []


def test_cli_writes_and_reports(toy_pairs: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser(prog="diffalign")
    add_captions_parser(parser.add_subparsers(dest="command", required=True))
    out = tmp_path / "cli.parquet"
    args = parser.parse_args(["captions", str(toy_pairs), str(out), "--strategy", "perturb", "--level", "strong",
                              "--batch-size", "32", "--seed", "2", "--device", "cpu"])
    assert args.run(args) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == str(out) and "wrote 64 rows" in printed[1] and printed[2] == "skipped 0 of 64 rows"
    row = _read(out)[0]
    loser = 1 if row["label_0"] == 1.0 else 0
    assert row[f"caption_{loser}"] == perturb_with_rules(row["caption"], "strong", row_rng(2, f"pairs.parquet:{row['ranking_id']}")).text
    args = parser.parse_args(["captions", str(toy_pairs), str(toy_pairs)])
    assert args.run(args) == 2
    assert "overwrite the input" in capsys.readouterr().err
