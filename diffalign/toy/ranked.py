"""Ranked lists for RankDPO from the toy world: k images per prompt with graded scores.

Why a module of its own: the pairs generator (:mod:`diffalign.toy.world`)
is what the quickstart and most tests need; ranked lists only feed RankDPO.
They reuse the world's drawing, degradation and JPEG helpers, so this module
imports :mod:`diffalign.toy.world`, never the reverse.

:func:`make_ranked` / :func:`write_ranked`: per prompt the truth (score 1), a
lightly degraded truth (2/3), a one-attribute mistake -- colour or shape --
(1/3) and a two-attribute mistake (0), stored in a shuffled order so that
readers must sort them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from diffalign.atomic import staged_file, staged_folder
from diffalign.toy.world import (
    WINNER_MODEL,
    ToyWorldSpec,
    caption,
    degrade,
    draw_other,
    jpeg_bytes,
    ranking_ids,
    render,
)

__all__ = ["RANKED_SCHEMA", "RANKED_SCORES", "make_ranked", "write_ranked"]

# Graded scores of a ranked list's images, best first: truth, lightly degraded truth,
# one attribute wrong (colour or shape), both wrong.
RANKED_SCORES: tuple[float, ...] = (1.0, 2.0 / 3.0, 1.0 / 3.0, 0.0)
_LIGHT_DEGRADE = 0.5  # the ranked lists' "degraded" image: half the pairs' blur and noise
RANKED_SCHEMA = pa.schema(
    [
        ("prompt", pa.string()),
        ("images", pa.list_(pa.binary())),
        ("scores", pa.list_(pa.float64())),
        ("models", pa.list_(pa.string())),
        ("ranking_id", pa.int64()),
    ]
)


def make_ranked(n: int, seed: int, spec: ToyWorldSpec = ToyWorldSpec(), k: int = 4) -> list[dict]:
    """Generate ``n`` ranked lists of ``k`` images per prompt, deterministically from ``seed``.

    Best first, ``models`` names each image's kind and :data:`RANKED_SCORES`
    its score: ``toy-truth`` (1), ``toy-degraded`` (2/3, the truth at half the
    pairs' degradation), ``toy-wrong-colour`` or ``toy-wrong-shape`` (1/3; an
    exact half of the rows each, in random order) and ``toy-wrong-both`` (0);
    ``k < 4`` keeps the ``k`` best. Each row's images are stored in a random
    order, ``scores`` and ``models`` alongside. Rows carry :data:`RANKED_SCHEMA`.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if not 2 <= k <= len(RANKED_SCORES):
        raise ValueError(f"k must be in 2..{len(RANKED_SCORES)}, got {k}")
    rng = np.random.default_rng(seed)
    ids = ranking_ids(n, seed)
    colours, shapes = spec.colour_names, spec.shapes
    wrong_shape = rng.permutation(np.arange(n) % 2)
    rows: list[dict] = []
    for i in range(n):
        colour = colours[rng.integers(len(colours))]
        shape = shapes[rng.integers(len(shapes))]
        truth = render(colour, shape, rng, spec)
        images = [truth, degrade(truth, rng, spec, strength=_LIGHT_DEGRADE)]
        if wrong_shape[i]:
            images.append(render(colour, draw_other(shapes, shape, rng), rng, spec))
        else:
            images.append(render(draw_other(colours, colour, rng), shape, rng, spec))
        images.append(render(draw_other(colours, colour, rng), draw_other(shapes, shape, rng), rng, spec))
        one_wrong = "toy-wrong-shape" if wrong_shape[i] else "toy-wrong-colour"
        models = [WINNER_MODEL, "toy-degraded", one_wrong, "toy-wrong-both"]
        order = rng.permutation(k).tolist()
        rows.append(
            {
                "prompt": caption(colour, shape),
                "images": [jpeg_bytes(images[j], spec) for j in order],
                "scores": [RANKED_SCORES[j] for j in order],
                "models": [models[j] for j in order],
                "ranking_id": int(ids[i]),
            }
        )
    return rows


def write_ranked(
    path: str | Path,
    n: int,
    seed: int,
    spec: ToyWorldSpec = ToyWorldSpec(),
    k: int = 4,
    format: Literal["parquet", "jsonl"] = "parquet",
) -> Path:
    """Generate ``n`` ranked lists (:func:`make_ranked`) and write them atomically.

    ``"parquet"``: :data:`RANKED_SCHEMA`, images as JPEG bytes. ``"jsonl"``: one
    ``{"prompt", "images", "scores", "models", "ranking_id"}`` object per line,
    images as JPEG files in the folder ``<stem>_images`` beside it (paths
    relative to the manifest). The manifest is removed first and written
    last, so a manifest on disk always has all its images.
    """
    path = Path(path)
    rows = make_ranked(n, seed, spec, k)
    if format == "parquet":
        table = pa.Table.from_pylist(rows, schema=RANKED_SCHEMA)
        with staged_file(path) as temporary:
            pq.write_table(table, temporary, compression="none")
        return path
    if format != "jsonl":
        raise ValueError(f"unknown format {format!r}; expected 'parquet' or 'jsonl'")
    folder = path.with_name(f"{path.stem}_images")
    path.unlink(missing_ok=True)
    lines = []
    with staged_folder(folder) as staging:
        for i, row in enumerate(rows):
            names = [f"{i:06d}_{j}.jpg" for j in range(len(row["images"]))]
            for name, data in zip(names, row["images"]):
                (staging / name).write_bytes(data)
            entry = {**row, "images": [f"{folder.name}/{name}" for name in names]}
            lines.append(json.dumps(entry, sort_keys=True))
    text = "".join(line + "\n" for line in lines)
    with staged_file(path) as temporary:
        temporary.write_text(text)
    return path
