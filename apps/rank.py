"""``diffalign rank``: turn images of k models into RankDPO's ranked lists (and best-vs-worst pairs).

Why: RankDPO (Karthik et al., 2024, "Scalable Ranked Preference Optimization for
Text-to-Image Generation") trains on k images per prompt -- one from each of
several text-to-image models -- labelled by n reward models: ``C_i`` = the
number of (reward model, other image) pairs where image i scores strictly
higher (ties count half), and the soft score ``phi_i = C_i / (n (k-1))``.
This command computes exactly that from k ``diffalign generate`` manifests
(or any ``{"image", "prompt", "model"?}`` JSONL) and writes the ranked format
:class:`diffalign.data.ranked.RankedSource` reads::

    prompt (str), images (list<bytes>: the files' PNG/JPEG bytes, best first),
    scores (list<float64>: phi), models (list<str>), ranking_id (int64),
    score_<scorer> (list<float64>: the raw reward per image, same order)

and optionally one best-vs-worst pair per list in Pick-a-Pic v2 schema
(``jpg_0`` = best, ``label_0 = 1``) for the pairwise methods. Lists whose
images all tie get no pair.

Matching: the j-th image of a prompt in every source forms one list (one
list per prompt when each source has one image per prompt). Prompts missing
from a source, images beyond the smallest source's count, unreadable or
undecodable images and non-finite rewards are reported and skipped. Each
image file is read and decoded once; scorers see batches of whole lists.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from diffalign.atomic import staged_file

from diffalign.data.images import decode_image
from diffalign.data.manifest import MANIFEST_NAME, ManifestRow, manifest_path, read_manifest
from diffalign.data.report import SkipReport
from diffalign.data.types import BadRowError

__all__ = ["RankedList", "match_lists", "parse_scorer_spec", "rank_sources", "soft_scores"]

_CHUNK_IMAGES = 256  # images decoded and scored at a time (whole lists), bounding memory on large runs


@dataclass(frozen=True)
class RankedList:
    """One prompt's k candidates, one per source, in source order."""

    prompt: str
    rows: tuple[ManifestRow, ...]
    sources: tuple[str, ...]
    models: tuple[str, ...]


@dataclass
class RankStats:
    """What ``rank`` wrote."""

    lists: int = 0
    pairs: int = 0
    all_tied: int = 0  # lists whose phi are all equal (the ranked reader drops them by default; no pair)

    def summary(self) -> str:
        return f"ranked lists: {self.lists}, pairs: {self.pairs}, lists with all scores tied: {self.all_tied}"


def parse_scorer_spec(spec: str) -> tuple[str, str | None]:
    """``NAME`` or ``NAME=WEIGHTS`` (a hub id or a folder) -> ``(name, weights or None)``."""
    name, _, weights = spec.partition("=")
    if not name:
        raise ValueError(f"bad --scorer {spec!r}; expected NAME or NAME=WEIGHTS")
    return name, weights or None


def soft_scores(rewards: np.ndarray) -> np.ndarray:
    """RankDPO's soft scores ``phi [G, k]`` from rewards ``[n, G, k]`` (n scorers, G lists of k images).

    ``C_i = sum_m sum_{j != i} (1[r_mi > r_mj] + 0.5 1[r_mi == r_mj])`` and
    ``phi_i = C_i / (n (k-1))`` (Karthik et al., 2024). Example, n = 1, k = 3,
    rewards (3, 1, 1): C = (2, 0.5, 0.5), phi = (1, 0.25, 0.25).
    """
    n, _, k = rewards.shape
    if k < 2:
        raise ValueError(f"a ranked list needs k >= 2 images, got {k}")
    diff = rewards[..., :, None] - rewards[..., None, :]  # [n, G, k, k]: r_i - r_j
    wins = (diff > 0).astype(np.float64) + 0.5 * (diff == 0)
    counts = wins.sum(axis=(0, 3)) - 0.5 * n  # the diagonal (i == j) adds 0.5 per scorer
    return counts / (n * (k - 1))


def _read_source(path: str | os.PathLike[str], report: SkipReport) -> tuple[str, list[ManifestRow]]:
    """(model name, rows): the manifest's ``model`` field names images; the fallback is the generate
    folder's name for ``DIR/manifest.jsonl``, else the file's stem."""
    p = manifest_path(path)
    name = p.parent.name if p.name == MANIFEST_NAME else p.stem
    return name, read_manifest(p, report, source=name)


def match_lists(sources: Sequence[tuple[str, list[ManifestRow]]], report: SkipReport) -> list[RankedList]:
    """Lists of one image per source for the prompts every source has (prompts in first-seen order)."""
    by_prompt: list[dict[str, list[ManifestRow]]] = []
    order: dict[str, None] = {}
    for _, rows in sources:
        table: dict[str, list[ManifestRow]] = {}
        for row in rows:
            table.setdefault(row.prompt, []).append(row)
            order.setdefault(row.prompt, None)
        by_prompt.append(table)
    names = [name for name, _ in sources]
    lists: list[RankedList] = []
    for prompt in order:
        missing = [name for name, table in zip(names, by_prompt, strict=True) if prompt not in table]
        if missing:
            report.record("rank", repr(prompt[:80]), f"missing prompt: not in {', '.join(missing)}")
            continue
        counts = [len(table[prompt]) for table in by_prompt]
        shortest = min(counts)
        for name, table, count in zip(names, by_prompt, counts, strict=True):
            for row in table[prompt][shortest:]:
                report.record(
                    name,
                    row.row_id,
                    f"unmatched image: {count} images of this prompt here, {shortest} in another source",
                )
        for j in range(shortest):
            rows = tuple(table[prompt][j] for table in by_prompt)
            models = tuple(row.model or name for row, name in zip(rows, names, strict=True))
            lists.append(RankedList(prompt, rows, tuple(names), models))
    return lists


def _read_list(item: RankedList, report: SkipReport) -> tuple[list[bytes], list[Any]] | None:
    """The files' bytes and decoded RGB images of one list, or None (reported) when one fails."""
    payloads, images = [], []
    for row, source in zip(item.rows, item.sources, strict=True):
        try:
            payload = row.image.read_bytes()
            images.append(decode_image(payload, row_id=row.row_id, source=source))
        except OSError as error:
            report.record(source, row.row_id, f"missing image file: {row.image} ({error.strerror or error})")
            return None
        except BadRowError as error:
            report.record(error.source, error.row_id, error.reason)
            return None
        payloads.append(payload)
    return payloads, images


def _chunks(items: list[RankedList], k: int) -> Iterator[list[RankedList]]:
    size = max(1, _CHUNK_IMAGES // k)
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _schemas(labels: list[str]) -> tuple[Any, Any]:
    import pyarrow as pa

    ranked = pa.schema(
        [("prompt", pa.string()), ("images", pa.list_(pa.binary())), ("scores", pa.list_(pa.float64())),
         ("models", pa.list_(pa.string())), ("ranking_id", pa.int64()),
         *[(f"score_{label}", pa.list_(pa.float64())) for label in labels]]
    )  # fmt: skip
    pairs = pa.schema(
        [("jpg_0", pa.binary()), ("jpg_1", pa.binary()), ("label_0", pa.float64()), ("label_1", pa.float64()),
         ("caption", pa.string()), ("model_0", pa.string()), ("model_1", pa.string()), ("ranking_id", pa.int64())]
    )  # fmt: skip
    return ranked, pairs


def _labels(specs: Sequence[tuple[str, str | None]]) -> list[str]:
    """Column labels of the scorers: the name, suffixed with its position when a name repeats."""
    names = [name for name, _ in specs]
    return [name if names.count(name) == 1 else f"{name}_{i}" for i, name in enumerate(names)]


def rank_sources(
    sources: Sequence[str | os.PathLike[str]],
    scorers: Sequence[tuple[str, str | None]],
    out: str | os.PathLike[str],
    *,
    pairs_out: str | os.PathLike[str] | None = None,
    batch_size: int = 16,
    device: str | None = None,
    dtype: str = "fp32",
    report: SkipReport,
    progress: bool = False,
) -> RankStats:
    """Score k sources' images with n scorers and write the ranked file (and the pairs), atomically.

    ``progress``: a bar over the prompts' lists on stderr (scoring k images per prompt with n models is slow).
    """
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch
    from diffalign.scorers import load_scorer

    if len(sources) < 2:
        raise ValueError(f"rank needs k >= 2 sources, got {len(sources)}")
    if not scorers:
        raise ValueError("rank needs at least one --scorer")
    for path in (out, pairs_out):
        if path is not None and Path(path).suffix != ".parquet":
            raise ValueError(f"{path}: rank writes parquet; name the output *.parquet")
    manifests = [_read_source(path, report) for path in sources]
    lists = match_lists(manifests, report)
    if not lists:
        raise ValueError(f"no prompt is present in all {len(sources)} sources ({report.summary()})")
    k = len(sources)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    models = [load_scorer(name, weights=weights, device=device, dtype=dtype) for name, weights in scorers]
    labels = _labels(scorers)
    ranked_schema, pairs_schema = _schemas(labels)
    stats = RankStats()
    from tqdm.auto import tqdm

    with contextlib.ExitStack() as stack:
        bar = stack.enter_context(tqdm(total=len(lists), unit="list", desc="rank", disable=not progress))
        ranked_tmp = stack.enter_context(staged_file(out))
        pairs_tmp = stack.enter_context(staged_file(pairs_out)) if pairs_out is not None else None
        ranked_writer = stack.enter_context(pq.ParquetWriter(ranked_tmp, ranked_schema, compression="none"))
        pairs_writer = (
            stack.enter_context(pq.ParquetWriter(pairs_tmp, pairs_schema, compression="none")) if pairs_tmp else None
        )
        for chunk in _chunks(lists, k):
            bar.update(len(chunk))
            kept = []
            for item in chunk:
                got = _read_list(item, report)
                if got is not None:
                    kept.append((item, *got))
            if not kept:
                continue
            images = [image for _, _, group in kept for image in group]
            prompts = [item.prompt for item, _, _ in kept for _ in range(k)]
            rewards = np.stack(
                [
                    model.score(images, prompts, batch_size=batch_size).double().numpy().reshape(len(kept), k)
                    for model in models
                ]
            )  # [n, G, k]
            finite = np.isfinite(rewards).all(axis=(0, 2))
            for (item, _, _), ok in zip(kept, finite, strict=True):
                if not ok:
                    report.record("rank", item.rows[0].row_id, "bad score: a scorer gave a non-finite reward")
            rewards = rewards[:, finite]
            kept = [entry for entry, ok in zip(kept, finite, strict=True) if ok]
            phi = soft_scores(rewards) if kept else np.zeros((0, k))
            ranked_rows, pair_rows = [], []
            for g, (item, payloads, _) in enumerate(kept):
                order = np.argsort(-phi[g], kind="stable").tolist()  # best first; ties keep source order
                ranking_id = stats.lists
                stats.lists += 1
                ranked_rows.append({
                    "prompt": item.prompt, "images": [payloads[i] for i in order],
                    "scores": [float(phi[g, i]) for i in order], "models": [item.models[i] for i in order],
                    "ranking_id": ranking_id,
                    **{f"score_{label}": [float(rewards[m, g, i]) for i in order] for m, label in enumerate(labels)},
                })  # fmt: skip
                best, worst = order[0], order[-1]
                if phi[g, best] == phi[g, worst]:
                    stats.all_tied += 1
                    continue
                pair_rows.append({
                    "jpg_0": payloads[best], "jpg_1": payloads[worst], "label_0": 1.0, "label_1": 0.0,
                    "caption": item.prompt, "model_0": item.models[best], "model_1": item.models[worst],
                    "ranking_id": ranking_id,
                })  # fmt: skip
            if ranked_rows:
                ranked_writer.write_table(pa.Table.from_pylist(ranked_rows, schema=ranked_schema))
            if pairs_writer is not None and pair_rows:
                pairs_writer.write_table(pa.Table.from_pylist(pair_rows, schema=pairs_schema))
                stats.pairs += len(pair_rows)
        if stats.lists == 0:
            raise ValueError(f"no list survived reading and scoring ({report.summary()})")
        # ExitStack unwinds in reverse: the writers close (footers written) before the files are renamed.
    return stats
