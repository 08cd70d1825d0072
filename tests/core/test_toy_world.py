"""The toy world's generator: deterministic, Pick-a-Pic-shaped, and its labels mean what they say.

The learning tests trust these pairs as ground truth, so the checks here look
at decoded pixels, not at the generator's own bookkeeping.
"""

from __future__ import annotations

import io
import json
import math
from collections import Counter

import numpy as np
import PIL.Image
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from diffalign.toy.world import (
    LOSER_KINDS,
    ToyWorldSpec,
    caption,
    make_pairs,
    prompts,
    render,
    write_pairs,
    write_toy_world,
)

SPEC = ToyWorldSpec()
PALETTE = SPEC.palette
EXPECTED_SCHEMA = {
    "jpg_0": pa.binary(),
    "jpg_1": pa.binary(),
    "label_0": pa.float64(),
    "label_1": pa.float64(),
    "caption": pa.string(),
    "model_0": pa.string(),
    "model_1": pa.string(),
    "ranking_id": pa.int64(),
    "loser_kind": pa.string(),
}


def _decode(data: bytes) -> np.ndarray:
    with PIL.Image.open(io.BytesIO(data)) as img:
        assert img.format == "JPEG"
        return np.asarray(img.convert("RGB"), dtype=np.float64)


def _shape_mask(img: np.ndarray) -> np.ndarray:
    """Pixels clearly away from white (the darkest channel is well below 255)."""
    return (255.0 - img.min(axis=-1)) > 80.0


def _dominant_colour(img: np.ndarray) -> str:
    """Palette name nearest to the mean colour of the shape's pixels."""
    mean = img[_shape_mask(img)].mean(axis=0)
    return min(PALETTE, key=lambda name: float(np.linalg.norm(mean - np.array(PALETTE[name]))))


def _hf_energy(img: np.ndarray) -> float:
    """Mean squared difference between neighbouring pixels: high for noise."""
    return float(np.mean(np.diff(img, axis=0) ** 2) + np.mean(np.diff(img, axis=1) ** 2))


def _winner_loser(row: dict) -> tuple[np.ndarray, np.ndarray]:
    if row["label_0"] == 1.0:
        return _decode(row["jpg_0"]), _decode(row["jpg_1"])
    return _decode(row["jpg_1"]), _decode(row["jpg_0"])


@pytest.fixture(scope="module")
def pairs() -> list[dict]:
    return make_pairs(300, seed=7, spec=SPEC)


def test_same_seed_gives_identical_bytes_and_other_seeds_differ(tmp_path):
    a = write_pairs(tmp_path / "a.parquet", 24, seed=0)
    b = write_pairs(tmp_path / "sub" / "b.parquet", 24, seed=0)  # parent folder is created
    c = write_pairs(tmp_path / "c.parquet", 24, seed=1)
    assert a.read_bytes() == b.read_bytes()
    assert a.read_bytes() != c.read_bytes()
    # Atomic write leaves no temporary files behind.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.parquet", "c.parquet", "sub"]


def test_parquet_has_pick_a_pic_columns_and_dtypes(tmp_path):
    table = pq.read_table(write_pairs(tmp_path / "p.parquet", 9, seed=3))
    assert table.column_names == list(EXPECTED_SCHEMA)
    for name, dtype in EXPECTED_SCHEMA.items():
        assert table.schema.field(name).type == dtype, name
    labels_0 = table.column("label_0").to_numpy()
    labels_1 = table.column("label_1").to_numpy()
    assert set(labels_0.tolist()) <= {0.0, 1.0}
    np.testing.assert_array_equal(labels_0 + labels_1, 1.0)
    assert len(set(table.column("ranking_id").to_pylist())) == 9


def test_winner_follows_caption_and_each_loser_breaks_it(pairs):
    checked = Counter()
    for row in pairs:
        _, colour, shape = row["caption"].split(" ")
        kind = row["loser_kind"]
        win_pos = 0 if row["label_0"] == 1.0 else 1
        assert row["label_1"] == 1.0 - row["label_0"]
        assert row[f"model_{win_pos}"] == "toy-truth"
        assert row[f"model_{1 - win_pos}"] == f"toy-{kind}"

        winner, loser = _winner_loser(row)
        assert winner.shape == (SPEC.image_size, SPEC.image_size, 3)
        assert _dominant_colour(winner) == colour, row["caption"]
        if kind == "colour":
            assert _dominant_colour(loser) != colour
        elif kind == "shape":
            assert _dominant_colour(loser) == colour
            mw, ml = _shape_mask(winner), _shape_mask(loser)
            iou = (mw & ml).sum() / (mw | ml).sum()
            assert iou < 0.9, iou  # circle vs square is the closest pair (~0.8 at worst)
            checked["shape_iou"] += iou
        else:
            assert _hf_energy(loser) > 1.5 * _hf_energy(winner)
        checked[kind] += 1
    assert all(checked[k] > 50 for k in LOSER_KINDS)
    assert checked["shape_iou"] / checked["shape"] < 0.7  # on average the masks differ a lot


def test_winner_position_and_loser_kinds_are_balanced(pairs):
    share_0 = np.mean([row["label_0"] for row in pairs])
    assert 0.4 <= share_0 <= 0.6
    kinds = Counter(row["loser_kind"] for row in pairs)
    assert set(kinds) == set(LOSER_KINDS)
    for kind in LOSER_KINDS:
        assert abs(kinds[kind] / len(pairs) - 1 / 3) < 0.05, kinds
    # Captions cover the whole world.
    assert {row["caption"] for row in pairs} == set(prompts(SPEC))


def test_heldout_seed_shares_no_pair_with_train():
    train = make_pairs(60, seed=0)
    held = make_pairs(30, seed=1)
    train_images = {row[col] for row in train for col in ("jpg_0", "jpg_1")}
    assert not any(row["jpg_0"] in train_images or row["jpg_1"] in train_images for row in held)
    assert not {r["ranking_id"] for r in train} & {r["ranking_id"] for r in held}


def test_render_geometry_is_big_and_upright():
    """Radius 0.40-0.47 of the side (6.5-7.5 px on a 16 px latent), triangles apex up."""
    rng = np.random.default_rng(0)
    size = SPEC.image_size
    for _ in range(5):
        img = render("blue", "circle", rng, SPEC)
        assert img.mode == "RGB" and img.size == (size, size)
        r_est = math.sqrt(_shape_mask(np.asarray(img, np.float64)).sum() / math.pi) / size
        assert 0.37 <= r_est <= 0.50, r_est

        sq = _shape_mask(np.asarray(render("blue", "square", rng, SPEC), np.float64))
        rows, cols = np.nonzero(sq)
        # Axis-aligned square: as tall as it is wide.
        assert abs((rows.max() - rows.min()) - (cols.max() - cols.min())) <= 1
        assert 2 * 0.85 * 0.37 <= (cols.max() - cols.min() + 1) / size <= 2 * 0.85 * 0.50

        tri = _shape_mask(np.asarray(render("red", "triangle", rng, SPEC), np.float64))
        widths = tri.sum(axis=1)
        filled = np.nonzero(widths)[0]
        assert widths[filled[0]] < widths[filled[-1]] / 3  # narrow at the top, wide at the bottom


def test_render_rejects_unknown_names():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="unknown colour"):
        render("purple", "circle", rng, SPEC)
    with pytest.raises(ValueError, match="unknown shape"):
        render("red", "hexagon", rng, SPEC)


def test_prompts_and_caption():
    ps = prompts(SPEC)
    assert len(ps) == 12 == len(set(ps))
    assert caption("red", "circle") == "a red circle" and "a yellow triangle" in ps


def test_spec_recipe_and_fingerprint():
    recipe = SPEC.recipe()
    assert json.loads(json.dumps(recipe)) == recipe
    assert ToyWorldSpec().fingerprint() == SPEC.fingerprint()
    assert ToyWorldSpec(jpeg_quality=90).fingerprint() != SPEC.fingerprint()
    assert len(SPEC.fingerprint()) == 16
    assert {c for c, _ in SPEC.colours} == {"red", "green", "blue", "yellow"}
    with pytest.raises(ValueError):
        ToyWorldSpec(radius_range=(0.3, 0.6))
    with pytest.raises(ValueError):
        ToyWorldSpec(shapes=("circle", "star"))


def test_write_toy_world_skips_when_recipe_matches_and_regenerates_on_change(tmp_path):
    kwargs = dict(n_train=12, n_heldout=6)
    paths = write_toy_world(tmp_path / "toy", SPEC, **kwargs)
    assert paths.train.exists() and paths.heldout.exists() and paths.recipe.exists()
    assert pq.read_table(paths.train).num_rows == 12 and pq.read_table(paths.heldout).num_rows == 6
    stamps = {p: p.stat().st_mtime_ns for p in (paths.train, paths.heldout, paths.recipe)}

    again = write_toy_world(tmp_path / "toy", SPEC, **kwargs)
    assert again == paths
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps

    old_bytes = paths.train.read_bytes()
    write_toy_world(tmp_path / "toy", ToyWorldSpec(jpeg_quality=80), **kwargs)
    assert paths.train.read_bytes() != old_bytes
    assert json.loads(paths.recipe.read_text())["spec"]["jpeg_quality"] == 80

    write_toy_world(tmp_path / "toy", ToyWorldSpec(jpeg_quality=80), n_train=15, n_heldout=6)
    assert pq.read_table(paths.train).num_rows == 15  # split size is part of the recipe too
    assert not [p for p in paths.folder.iterdir() if p.name.endswith(".tmp")]


def test_pick_a_pic_reader_reads_the_toy_world_unchanged(tmp_path):
    """The point of the schema: the real reader puts the winner first with no adapter."""
    sources = pytest.importorskip("diffalign.data.sources")
    report_mod = pytest.importorskip("diffalign.data.report")
    paths = write_toy_world(tmp_path / "toy", SPEC, n_train=9, n_heldout=6)
    expected = make_pairs(6, seed=1, spec=SPEC)
    report = report_mod.SkipReport()
    src = sources.open_preference_source(
        paths.folder, split="heldout", report=report, cache_dir=tmp_path / "hf"
    )
    assert len(src) == 6 and report.total == 0
    for i, row in enumerate(expected):
        group = src.load(i)
        assert group.prompt == row["caption"]
        assert group.models == ["toy-truth", f"toy-{row['loser_kind']}"]
        winner, _ = _winner_loser(row)
        np.testing.assert_array_equal(np.asarray(group.images[0], np.float64), winner)


def test_two_processes_sharing_a_toy_cache_build_the_base_once(tmp_path, monkeypatch):
    """Parallel test workers (and two quickstarts) share one cache folder: the builder holds a file lock, so
    the second caller waits and then finds the finished base instead of building (or clobbering) it again.
    The build itself is replaced by a slow stand-in; two threads take the lock as two processes would."""
    import threading
    import time

    from diffalign.toy import base as toy_base

    builds = []

    def slow_build(folder, recipe, train_parquet, log=print):
        builds.append(folder)
        time.sleep(0.5)
        folder.mkdir(parents=True)
        (folder / "toy_base.json").write_text("{}")
        return folder

    monkeypatch.setattr(toy_base, "write_toy_world", lambda folder, *a, **k: type("W", (), {"train": folder / "train.parquet"})())
    monkeypatch.setattr(toy_base, "build_toy_base", slow_build)
    results = []
    recipe = toy_base.ToyBaseRecipe(unet_steps=1)  # not the default recipe, whose base ships with the package
    threads = [threading.Thread(target=lambda: results.append(toy_base.ensure_toy_world_and_base(tmp_path, recipe)[1])) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(builds) == 1 and len(results) == 2 and results[0] == results[1] == builds[0]
