"""AdamW step time by implementation (for-loop, foreach, fused) on a real denoiser's parameters.

Why: for full fine-tuning the optimizer touches every parameter each step (four tensors per
parameter: weight, gradient, two moments), so its implementation is a lever `train.adam_impl`
chooses. Rounds interleave the implementations, so a drift of machine load hits each alike;
the figure to read is each implementation's median step time relative to the for-loop's.

    python benchmarks/optimizer_step.py MODEL_DIR [--subfolder unet] [--rounds 5] [--threads 1] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

IMPLEMENTATIONS = ("for-loop", "foreach", "fused")


def adamw(parameters: list, implementation: str):
    import torch

    flags = {"for-loop": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}[implementation]
    return torch.optim.AdamW(parameters, lr=1e-5, weight_decay=1e-2, **flags)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="a diffusers pipeline folder (its denoiser's parameters are stepped)")
    parser.add_argument("--subfolder", default="unet")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)

    import torch
    from diffusers import UNet2DConditionModel

    torch.set_num_threads(args.threads)
    network = UNet2DConditionModel.from_pretrained(args.model, subfolder=args.subfolder)
    sets = {}
    for implementation in IMPLEMENTATIONS:  # each its own copy of the weights, gradients and moments
        parameters = [torch.nn.Parameter(p.detach().clone()) for p in network.parameters()]
        generator = torch.Generator().manual_seed(0)
        for parameter in parameters:
            parameter.grad = torch.randn(parameter.shape, generator=generator) * 1e-3
        optimizer = adamw(parameters, implementation)
        optimizer.step()  # allocates the moments: not timed
        sets[implementation] = optimizer
    times: dict[str, list[float]] = {name: [] for name in IMPLEMENTATIONS}
    for round_index in range(args.rounds):
        order = IMPLEMENTATIONS if round_index % 2 == 0 else tuple(reversed(IMPLEMENTATIONS))
        for implementation in order:
            started = time.perf_counter()
            sets[implementation].step()
            times[implementation].append(time.perf_counter() - started)
    count = sum(p.numel() for p in network.parameters())
    baseline = statistics.median(times["for-loop"])
    report = {
        "parameters": count,
        "threads": args.threads,
        "rounds": args.rounds,
        "median_s": {name: statistics.median(values) for name, values in times.items()},
        "ratio_to_for_loop": {name: statistics.median(values) / baseline for name, values in times.items()},
    }
    print(f"AdamW step over {count / 1e6:.1f} M parameters, {args.threads} thread(s), median of {args.rounds} rounds")
    for name in IMPLEMENTATIONS:
        print(f"  {name:9s} {report['median_s'][name]:.3f} s  {report['ratio_to_for_loop'][name]:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
