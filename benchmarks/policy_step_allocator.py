"""CPU time and peak RSS of one policy forward + backward under glibc's own or a fixed mmap threshold.

Why: `train.malloc_mmap_threshold` trades page faults (every large activation a fresh mapping) for
peak memory (freed activations not kept in the heap). This isolates that trade from a training run.
Run each setting in its own process, since the threshold stays for the process's life:

    python benchmarks/policy_step_allocator.py MODEL_DIR glibc
    python benchmarks/policy_step_allocator.py MODEL_DIR 131072 [--latents 8] [--repeats 4]
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="an SDXL-shaped diffusers folder (benchmarks/medium_pipeline.py)")
    parser.add_argument("threshold", help="'glibc' (its moving threshold) or bytes")
    parser.add_argument("--latents", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=4)
    args = parser.parse_args(argv)

    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from diffalign.trainers.performance import set_malloc_mmap_threshold

    torch.set_num_threads(1)
    if args.threshold != "glibc" and not set_malloc_mmap_threshold(int(args.threshold)):
        raise SystemExit("no glibc mallopt here")
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(args.model, subfolder="unet").requires_grad_(False)
    next(module for module in unet.modules() if isinstance(module, torch.nn.Linear)).weight.requires_grad_(True)
    n, config = args.latents, unet.config
    latents = torch.randn(n, config.in_channels, 32, 32, requires_grad=True)
    text = torch.randn(n, 77, config.cross_attention_dim)
    added = {"text_embeds": torch.randn(n, config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim),
             "time_ids": torch.randn(n, 6)}
    cpu = []
    for _ in range(args.repeats):
        started = time.process_time()
        unet(latents, torch.randint(0, 1000, (n,)), text, added_cond_kwargs=added).sample.square().mean().backward()
        cpu.append(round(time.process_time() - started, 2))
    high_water = int(re.search(r"VmHWM:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) / 1024
    print(f"threshold {args.threshold}: CPU s per forward+backward {cpu}, peak RSS (VmHWM) {high_water:.0f} MiB")


if __name__ == "__main__":
    main()
