"""Arena sources: manifests checked at start-up (outside paths refused with the row named), matched by prompt;
the scheduler's balanced exposure and no-repeat rule."""

from __future__ import annotations

import json
import os
from collections import Counter

import pytest

from diffalign.apps.arena.schedule import PairScheduler
from diffalign.apps.arena.sources import SourceError, load_sources, match_pairs
from diffalign.data.report import SkipReport
from diffalign.toy.arena import write_toy_sources


def _manifest(folder, rows):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "manifest.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return folder


def _png(path):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), "red").save(path)


def test_entry_outside_its_folder_is_refused_with_the_row(tmp_path):
    _png(tmp_path / "secret.png")
    _png(tmp_path / "a" / "ok.png")
    a = _manifest(tmp_path / "a", [{"image": "ok.png", "prompt": "p"}, {"image": "../secret.png", "prompt": "p"}])
    b = _manifest(tmp_path / "b", [{"image": "/etc/passwd", "prompt": "p"}])
    with pytest.raises(SourceError, match=r"manifest.jsonl row manifest.jsonl:2: image '../secret.png' resolves to .*outside"):
        load_sources([str(a), str(b)], SkipReport())


def test_symlink_out_of_the_folder_is_refused(tmp_path):
    _png(tmp_path / "outside.png")
    (tmp_path / "a").mkdir()
    os.symlink(tmp_path / "outside.png", tmp_path / "a" / "link.png")
    _png(tmp_path / "b" / "x.png")
    a = _manifest(tmp_path / "a", [{"image": "link.png", "prompt": "p"}])
    b = _manifest(tmp_path / "b", [{"image": "x.png", "prompt": "p"}])
    with pytest.raises(SourceError, match="link.png.*outside"):
        load_sources([str(a), str(b)], SkipReport())


def test_missing_files_are_reported_and_skipped_and_names_resolved(tmp_path):
    _png(tmp_path / "a" / "1.png")
    _png(tmp_path / "b" / "1.png")
    a = _manifest(tmp_path / "a", [{"image": "1.png", "prompt": "p", "model": "alpha"}, {"image": "gone.png", "prompt": "q"}])
    b = tmp_path / "b"
    (b / "manifest.jsonl").write_text('{"image": "1.png", "prompt": "p"}\nnot json\n')
    report = SkipReport()
    sources = load_sources([str(a), f"beta={b}"], report)
    assert sorted(sources) == ["alpha", "beta"]
    assert report.counts == {"missing image": 1, "bad manifest row": 1}
    [pair] = match_pairs(sources)
    assert pair.prompt == "p" and pair.models == ("alpha", "beta")


def test_duplicate_model_names_and_single_sources_are_refused(tmp_path):
    roots = write_toy_sources(tmp_path, models=("truth", "degraded"))
    with pytest.raises(SourceError, match="at least two"):
        load_sources([str(roots["truth"])], SkipReport())
    with pytest.raises(SourceError, match="used by two sources"):
        load_sources([f"x={roots['truth']}", f"x={roots['degraded']}"], SkipReport())


def test_items_match_by_prompt_and_index_across_every_model_pair(tmp_path):
    roots = write_toy_sources(tmp_path, seeds_per_prompt=2)
    sources = load_sources([str(p) for p in roots.values()], SkipReport())
    pairs = match_pairs(sources)
    assert len(pairs) == 3 * 12 * 2  # 3 model pairs x 12 prompts x 2 seeds
    assert all(p.a.prompt == p.b.prompt == p.prompt and p.a.index == p.b.index for p in pairs)
    assert Counter(p.models for p in pairs) == {("degraded", "truth"): 24, ("degraded", "wrong-colour"): 24,
                                                ("truth", "wrong-colour"): 24}
    assert len({p.pair_id for p in pairs}) == len(pairs)


def test_scheduler_balances_model_pairs_and_never_repeats(tmp_path):
    roots = write_toy_sources(tmp_path, seeds_per_prompt=2)
    pairs = match_pairs(load_sources([str(p) for p in roots.values()], SkipReport()))
    scheduler = PairScheduler(pairs, seed=0)
    shown = []
    while (showing := scheduler.next("s1")) is not None:
        shown.append(showing)
        if len(shown) % 3 == 0:  # after every 3 pairs each model pair has been shown equally often
            assert len(set(scheduler.model_exposure().values())) == 1
    assert len(shown) == len(pairs) and len({s.pair.pair_id for s in shown}) == len(pairs)
    lefts = Counter(s.left.item_id == s.pair.a.item_id for s in shown)
    assert 20 < lefts[True] < 52, f"sides should be random, got {lefts}"
    # A second session's exposure is balanced with the first one's; restoring reproduces the counts.
    second = scheduler.next("s2")
    assert second is not None
    restored = PairScheduler(pairs, seed=1)
    restored.restore([("s1", s.pair.pair_id) for s in shown] + [("s2", second.pair.pair_id)])
    assert restored.model_exposure() == scheduler.model_exposure()
    assert restored.next("s1") is None
