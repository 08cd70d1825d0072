"""The raw-data path, measured: groups/s of decode + transform, and the cost of tokenizing a batch's prompts.

Why: without a latent cache every step decodes its images and resizes them to the training
resolution. `data.jpeg_draft` lets libjpeg decode at 1/2, 1/4 or 1/8 scale instead, and
`data.num_workers=auto` moves the work into DataLoader workers. This script times the
decode + transform of Pick-a-Pic-sized JPEG pairs with the draft off and on (rounds interleave
the two, so a drift of machine load hits both alike), and, given a pipeline folder, the
tokenization of a batch of prompts, to show whether it is worth caching.

    python benchmarks/data_path.py [--pairs 64] [--size 1024 768] [--resolution 512 256]
        [--rounds 3] [--tokenizer-model PIPELINE_DIR] [--json OUT]
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import time
from pathlib import Path


def photo_jpeg(width: int, height: int, seed: int) -> bytes:
    """A smooth, textured picture as a quality-90 JPEG (Pick-a-Pic images are generated JPEGs of this size)."""
    import numpy as np
    import PIL.Image

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    channels = [np.sin(6 * x + 2 * k + seed) * np.cos(5 * y - k) for k in range(3)]
    pixels = np.clip((np.stack(channels, -1) * 0.5 + 0.5) * 230 + rng.normal(0, 6, (height, width, 3)), 0, 255)
    buffer = io.BytesIO()
    PIL.Image.fromarray(pixels.astype(np.uint8)).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def time_groups(payloads: list[tuple[bytes, bytes]], resolution: int, draft: bool) -> float:
    """Seconds to decode and transform every pair, as a training DataLoader worker does."""
    import torch

    from diffalign.data.images import decode_image
    from diffalign.data.transforms import GroupTransform

    transform = GroupTransform(resolution, center_crop=True, size_conditioning="first_image")
    generator = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    for i, pair in enumerate(payloads):
        images = [decode_image(data, row_id=str(i), source="bench", min_side=resolution if draft else None) for data in pair]
        transform(images, generator)
    return time.perf_counter() - start


def time_tokenizer(model: str, batch: int, rounds: int) -> dict:
    """Median seconds to tokenize ``batch`` distinct prompts with the pipeline's tokenizer(s)."""
    from transformers import AutoTokenizer

    from diffalign.backbones.base import tokenize

    tokenizers = [AutoTokenizer.from_pretrained(model, subfolder=sub) for sub in ("tokenizer", "tokenizer_2") if (Path(model) / sub).is_dir()]
    prompts = [f"a photo of a red fox number {i} in the snow, highly detailed, 8k" for i in range(batch)]
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        for tokenizer in tokenizers:
            tokenize(tokenizer, prompts)
        times.append(time.perf_counter() - start)
    return {"tokenizers": len(tokenizers), "batch": batch, "median_s": statistics.median(times)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=64)
    parser.add_argument("--size", type=int, nargs=2, default=(1024, 768), metavar=("W", "H"))
    parser.add_argument("--resolution", type=int, nargs="+", default=[512, 256])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--tokenizer-model", default=None, help="a pipeline folder whose tokenizer(s) to time")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    width, height = args.size
    payloads = [(photo_jpeg(width, height, 2 * i), photo_jpeg(width, height, 2 * i + 1)) for i in range(args.pairs)]
    results: dict = {"pairs": args.pairs, "size": [width, height], "resolutions": {}}
    for resolution in args.resolution:
        times: dict[str, list[float]] = {"full": [], "draft": []}
        for round_index in range(args.rounds):
            order = ("full", "draft") if round_index % 2 == 0 else ("draft", "full")
            for arm in order:
                times[arm].append(time_groups(payloads, resolution, arm == "draft"))
        full, draft = statistics.median(times["full"]), statistics.median(times["draft"])
        results["resolutions"][resolution] = {
            "full_groups_per_s": args.pairs / full, "draft_groups_per_s": args.pairs / draft, "speedup": full / draft,
        }
        print(f"{width}x{height} JPEG pairs -> {resolution} px: full decode {args.pairs / full:.1f} groups/s, "
              f"draft {args.pairs / draft:.1f} groups/s ({full / draft:.2f}x)")
    if args.tokenizer_model:
        results["tokenize"] = time_tokenizer(args.tokenizer_model, batch=8, rounds=20)
        print(f"tokenize 8 prompts with {results['tokenize']['tokenizers']} tokenizer(s): {1e3 * results['tokenize']['median_s']:.2f} ms")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
