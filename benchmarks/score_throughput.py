"""Scoring throughput: the folder scorer's batches vs one image per forward, with and without reloading.

Usage::

    python benchmarks/score_throughput.py [--images N] [--batch-size 32] [--reload-images K]
                                          [--image-size 512] [--threads T] [--model-dir DIR]
                                          [--tiny] [--json OUT]

Why: the reference scoring packages run one image per forward and load the weights again
on every call; ``diffalign score`` loads once and batches. Three modes on the same images,
the same scorer (``pickscore``: ``logit_scale.exp() * cos``) and the same decode
(:func:`diffalign.data.images.decode_image`), all on CPU in float32:

* ``batched``          -- :func:`diffalign.scorers.folder.score_items`, ``--batch-size`` images per forward;
* ``per-image``        -- a loop of decode + ``score([image], [prompt])``, weights loaded once;
* ``per-image-reload`` -- the same loop, with ``load_scorer`` (weights from disk) inside every call,
                          timed on the first ``--reload-images`` images (it is a rate, and slow).

Model: a transformers ``CLIPModel`` with ViT-B/32's sizes (vision: width 768, 12 layers,
12 heads, patch 32, image 224; text: width 512, 12 layers, 8 heads, context 77; projection
512) and random weights, saved once to a temporary folder (or ``--model-dir``, reused when
it holds a model) with diffalign's local tokenizer. Random weights cost the same FLOPs as
trained ones. ``--tiny`` swaps in a 32-pixel, 2-layer model for smoke tests.

Images: ``--images`` smooth random RGB JPEGs of ``--image-size`` pixels with sidecar
prompts, written once. Timed: everything after the scorer is loaded (``per-image-reload``:
the load too), after one untimed warm-up call. Reported: images/s per mode, the speed-ups
of ``batched``, and the largest difference between batched and per-image scores.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

MODES = ("batched", "per-image", "per-image-reload")
SCORER = "pickscore"
VIT_B32 = {
    "vision": {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
               "image_size": 224, "patch_size": 32},
    "text": {"hidden_size": 512, "intermediate_size": 2048, "num_hidden_layers": 12, "num_attention_heads": 8,
             "vocab_size": 49408},
    "projection_dim": 512,
}  # fmt: skip
TINY = {
    "vision": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
               "image_size": 32, "patch_size": 8},
    "text": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4},
    "projection_dim": 32,
}  # fmt: skip


def save_model(folder: Path, tiny: bool, seed: int = 0) -> Path:
    """Save a random-weight CLIPModel (ViT-B/32 sizes, or tiny), tokenizer and processor config into ``folder``."""
    from diffalign.tiny import save_clip

    sizes = TINY if tiny else VIT_B32
    return save_clip(folder, sizes["vision"], sizes["text"], sizes["projection_dim"], seed=seed)


def write_images(folder: Path, n: int, size: int, seed: int = 0) -> Path:
    """``n`` smooth random RGB JPEGs (upsampled 8x8 noise, like a generated image compresses) + sidecar prompts."""
    from PIL import Image

    from diffalign.tiny import TOY_WORDS

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        low = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
        low.resize((size, size), Image.BICUBIC).save(folder / f"{i:05d}.jpg", quality=90)
        words = rng.choice(TOY_WORDS, size=6)
        (folder / f"{i:05d}.txt").write_text("a " + " ".join(words))
    return folder


def _timed_batched(weights: str, items: list[Any], batch_size: int) -> dict[str, Any]:
    from diffalign.scorers import load_scorer
    from diffalign.scorers.folder import score_items

    from diffalign.data.report import SkipReport

    start = time.perf_counter()
    scorer = load_scorer(SCORER, weights)
    loaded = time.perf_counter()
    score_items(items[:1], {SCORER: scorer}, batch_size=1, report=SkipReport(), progress=False)  # warm-up
    begin = time.perf_counter()
    table = score_items(items, {SCORER: scorer}, batch_size=batch_size, report=SkipReport(), progress=False)
    seconds = time.perf_counter() - begin
    parameters = sum(p.numel() for p in scorer.model.parameters())  # type: ignore[attr-defined]
    return {
        "images": len(items), "seconds": seconds, "load_seconds": loaded - start, "scores": table.scores[SCORER],
        "parameters": parameters,
    }  # fmt: skip


def _score_one(scorer: Any, item: Any) -> float:
    from diffalign.data.images import decode_image

    image = decode_image(item.image, row_id=item.key, source="bench")
    return float(scorer.score([image], [item.prompt], batch_size=1)[0])


def _timed_per_image(weights: str, items: list[Any], reload: bool) -> dict[str, Any]:
    from diffalign.scorers import load_scorer

    start = time.perf_counter()
    scorer = load_scorer(SCORER, weights)
    loaded = time.perf_counter()
    _score_one(scorer, items[0])  # warm-up (and, for reload, the file cache)
    begin = time.perf_counter()
    scores = []
    for item in items:
        if reload:  # the reference packages' habit: weights from disk on every call
            scorer = load_scorer(SCORER, weights)
        scores.append(_score_one(scorer, item))
    seconds = time.perf_counter() - begin
    return {"images": len(items), "seconds": seconds, "load_seconds": loaded - start, "scores": np.array(scores)}


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Build model and images (once), time the three modes, return the report."""
    import torch
    from diffalign.scorers.folder import collect_items
    from transformers.utils import logging as hf_logging

    from diffalign.data.report import SkipReport

    hf_logging.disable_progress_bar()  # one "Loading weights" bar per reload would bury the table
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    model_dir = Path(args.model_dir) if args.model_dir else work / "model"
    if not (model_dir / "config.json").is_file():
        save_model(model_dir, args.tiny)
    size = args.image_size or (64 if args.tiny else 512)
    items = collect_items(write_images(work / "images", args.images, size), layout="sidecar", report=SkipReport()).items
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    results = {
        "batched": _timed_batched(str(model_dir), items, args.batch_size),
        "per-image": _timed_per_image(str(model_dir), items, reload=False),
        "per-image-reload": _timed_per_image(str(model_dir), items[: max(1, args.reload_images)], reload=True),
    }
    batched, single = results["batched"]["scores"], results["per-image"]["scores"]
    modes = {}
    for mode, result in results.items():
        scores = result.pop("scores")
        result["images_per_s"] = result["images"] / result["seconds"] if result["seconds"] > 0 else float("inf")
        result["mean_score"] = float(np.mean(scores))
        modes[mode] = result
    params = modes["batched"].pop("parameters")
    return {
        "device": "cpu",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "model": "tiny" if args.tiny else "ViT-B/32-sized CLIPModel, random weights",
        "parameters": params,
        "image_size": size,
        "batch_size": args.batch_size,
        "modes": modes,
        "speedup_batched_vs_per_image": modes["batched"]["images_per_s"] / modes["per-image"]["images_per_s"],
        "speedup_batched_vs_reload": modes["batched"]["images_per_s"] / modes["per-image-reload"]["images_per_s"],
        "max_abs_diff_batched_vs_per_image": float(np.max(np.abs(batched - single))),
        "loadavg_1min": [load_before, os.getloadavg()[0] if hasattr(os, "getloadavg") else None],
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=64, help="images scored by batched and per-image")
    parser.add_argument("--batch-size", type=int, default=32, help="images per forward in the batched mode")
    parser.add_argument("--reload-images", type=int, default=8, help="images timed in the reload mode")
    parser.add_argument("--image-size", type=int, default=None, help="side of the JPEGs (default 512; tiny: 64)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--model-dir", default=None, help="save the random model here once and reuse it")
    parser.add_argument("--tiny", action="store_true", help="a 2-layer 32-pixel CLIP instead of ViT-B/32 (smoke tests)")
    parser.add_argument("--json", default=None, metavar="OUT", help="write the report as JSON")
    args = parser.parse_args(argv)
    if args.images < 1 or args.batch_size < 1 or args.reload_images < 1:
        parser.error("--images, --batch-size and --reload-images must be >= 1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    threads = torch.get_num_threads()
    try:
        with tempfile.TemporaryDirectory(prefix="score-throughput-") as work:
            report = run(args, Path(work))
    finally:  # main() also runs in-process (tests): leave the caller's thread count as it was
        torch.set_num_threads(threads)
    print(f"{report['model']}, {report['parameters']} parameters, {report['threads']} threads, "
          f"{report['image_size']} px JPEGs")  # fmt: skip
    print(f"{'mode':<18}{'images':>8}{'seconds':>10}{'images/s':>10}")
    for mode, result in report["modes"].items():
        print(f"{mode:<18}{result['images']:>8}{result['seconds']:>10.2f}{result['images_per_s']:>10.2f}")
    print(f"batched is {report['speedup_batched_vs_per_image']:.1f}x per-image and "
          f"{report['speedup_batched_vs_reload']:.1f}x per-image-reload; max |batched - per-image| = "
          f"{report['max_abs_diff_batched_vs_per_image']:.2e}")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
