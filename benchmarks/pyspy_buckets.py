"""Where a training run's time goes: py-spy samples sorted into the parts of a DPO/MaPO step.

    py-spy record --format raw --rate 20 -o RUN.txt -- diffalign train sdxl/dpo ...
    py-spy record --format raw --rate 20 -o PEER.txt -- python train_diffusion_dpo_sdxl.py ...
    python benchmarks/pyspy_buckets.py RUN.txt PEER.txt --steps 8 [--json OUT]

py-spy (pip install py-spy; it reads a running process from outside, so the peer runs unmodified)
writes one line per distinct stack, `frame;frame;...;frame COUNT`, each frame `function (file:line)`.
Each stack goes to the first part whose rule matches it (rules below, same for both sides where the
code is shared: diffusers' VAE, transformers' CLIP, torch's autograd and optimizer). The two forwards
of the UNet are told apart by where they are called: in diffalign through the LoRA reference's
`predict` (trainers/models.py) or not; in the peer script by the line of its `unet(` call (the one
assigned to `ref_...` is the reference). Seconds are samples / rate: time the thread was running or
runnable, so waiting for a CPU under load counts, waiting for I/O does not.
"""

from __future__ import annotations

import argparse
import json
import re
from collections import Counter
from pathlib import Path
from typing import Callable

STARTUP = "start-up (imports, loading, set-up)"
FINISH = "after the loop (saving)"
NO_FRAME = "no Python frame (interpreter start, exit)"
BACKGROUND = "background threads (mostly waiting)"
IN_LOOP = (
    "data loading", "VAE encode", "text encoders", "noise draw", "policy forward", "reference forward",
    "backward", "grad clipping", "optimizer", "logging & metrics", "other in the loop",
)
FRAME = re.compile(r"^(?P<function>.*) \((?P<file>.*?)(?::(?P<line>\d+))?\)$")


def parse_raw(text: str) -> Counter[tuple[str, ...]]:
    """py-spy's raw (collapsed) output: stack (outermost first) -> samples."""
    stacks: Counter[tuple[str, ...]] = Counter()
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            raise ValueError(f"line {number}: expected 'frame;frame;... COUNT', got {line[:80]!r}")
        stacks[tuple(stack.split(";")) if stack.strip() else ()] += int(count)  # () : no Python frame
    return stacks


def unet_call_lines(script: Path) -> dict[str, range]:
    """Line ranges of the peer script's `... = unet(` calls: the `ref_` one is the reference's."""
    lines = script.read_text().splitlines()
    calls: dict[str, range] = {}
    for index, line in enumerate(lines):
        if re.search(r"=\s*unet\(", line):
            end = index
            while end < len(lines) and ".sample" not in lines[end]:
                end += 1
            part = "reference forward" if line.strip().startswith("ref") else "policy forward"
            calls[part] = range(index + 1, end + 2)  # 1-based, inclusive of the `.sample` line
    return calls


def _has(stack: tuple[str, ...], *needles: str) -> bool:
    return any(needle in frame for frame in stack for needle in needles)


def _peer_line(stack: tuple[str, ...], script_name: str) -> int | None:
    """The line of the peer's `main` that is executing (its innermost frame in the script)."""
    for frame in reversed(stack):
        found = FRAME.match(frame)
        if found and found.group("file").endswith(script_name) and found.group("line"):
            return int(found.group("line"))
    return None


def classifier(peer_script: Path | None) -> Callable[[tuple[str, ...]], str]:
    """The rule set: diffalign's when `peer_script` is None, else the peer's (its forwards by line)."""
    calls = unet_call_lines(peer_script) if peer_script is not None else {}

    def classify(stack: tuple[str, ...]) -> str:
        if not stack:
            return NO_FRAME
        if _has(stack, "_bootstrap_inner (threading.py") or _has(stack, "_AsyncWriterThread"):
            return BACKGROUND  # another thread (tensorboard's writer, a DataLoader pin thread): not the step's time
        if _has(stack, "save_final", "save_checkpoint", "save_lora_weights", "end_training", "require_finite_weights"):
            return FINISH
        if _has(stack, "_find_and_load", "from_pretrained", "setup_training", "load_backbone", "load_dataset",
                "build_training_data", "init_trackers", "__init__ (accelerate", "prepare (accelerate",
                "load_train_config", "parse_args"):
            return STARTUP
        if _has(stack, "dataloader.py", "fetch (torch/utils/data", "collate"):
            return "data loading"
        if _has(stack, "autoencoder_kl.py", "encode_images"):
            return "VAE encode"
        if _has(stack, "modeling_clip.py", "encode_prompt"):
            return "text encoders"
        if _has(stack, "run_backward", "backward (torch", "backward (accelerate"):
            return "backward"
        if _has(stack, "clip_grad_norm_"):
            return "grad clipping"
        if _has(stack, "torch/optim/", "optimizer.py"):
            return "optimizer"
        if _has(stack, "draw_noise", "randn_like"):
            return "noise draw"
        if peer_script is None:
            if _has(stack, "unet_2d_condition.py"):
                return "reference forward" if _has(stack, "trainers/models.py") else "policy forward"
        elif _has(stack, "unet_2d_condition.py"):
            line = _peer_line(stack, peer_script.name)
            for part, lines in calls.items():
                if line in lines:
                    return part
        if _has(stack, "accelerate/tracking.py", "tensorboard", "set_postfix", "metrics.py", "MetricWindow", "log (accelerate"):
            return "logging & metrics"
        if peer_script is None and _has(stack, "trainers/loop.py", "trainers/step.py"):
            return "other in the loop"
        if peer_script is not None and _has(stack, peer_script.name):
            line = _peer_line(stack, peer_script.name)
            loop = _loop_lines(peer_script)
            if line is not None and loop.start <= line < loop.stop:
                return "other in the loop"
            return STARTUP if line is not None and line < loop.start else FINISH
        return STARTUP

    return classify


def _loop_lines(script: Path) -> range:
    """The peer's training loop: from `for epoch in range` to the final save comment."""
    lines = script.read_text().splitlines()
    start = next(i for i, line in enumerate(lines, 1) if line.strip().startswith("for epoch in range"))
    stop = next((i for i, line in enumerate(lines, 1) if i > start and "Save the lora layers" in line), len(lines) + 1)
    return range(start, stop)


def buckets(stacks: Counter[tuple[str, ...]], classify: Callable[[tuple[str, ...]], str], rate: float) -> dict[str, float]:
    """Seconds per part."""
    seconds: Counter[str] = Counter()
    for stack, count in stacks.items():
        seconds[classify(stack)] += count / rate
    return dict(seconds)


def table(sides: dict[str, dict[str, float]], steps: int) -> str:
    """Markdown: seconds per step of each in-loop part, share of the loop, and the out-of-loop totals."""
    names = list(sides)
    lines = ["| part | " + " | ".join(f"{name} s/step | {name} %" for name in names) + " |",
             "|---|" + "---|---|" * len(names)]
    loop_totals = {name: sum(parts.get(part, 0.0) for part in IN_LOOP) for name, parts in sides.items()}
    for part in IN_LOOP:
        cells = []
        for name, parts in sides.items():
            value = parts.get(part, 0.0)
            cells.append(f"{value / steps:.3f} | {100 * value / max(loop_totals[name], 1e-9):.0f}")
        lines.append(f"| {part} | " + " | ".join(cells) + " |")
    lines.append("| **loop total** | " + " | ".join(f"**{loop_totals[n] / steps:.3f}** | 100" for n in names) + " |")
    for part in (STARTUP, FINISH, NO_FRAME, BACKGROUND):
        lines.append(f"| {part} (s, whole run) | " + " | ".join(f"{sides[n].get(part, 0.0):.1f} | " for n in names) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("diffalign", type=Path, help="py-spy raw output of `diffalign train`")
    parser.add_argument("peer", type=Path, nargs="?", help="py-spy raw output of the peer script")
    parser.add_argument("--peer-script", type=Path,
                        default=Path("/tmp/diffusers-checkout/examples/research_projects/diffusion_dpo/train_diffusion_dpo_sdxl.py"))
    parser.add_argument("--steps", type=int, required=True, help="optimizer steps of each run")
    parser.add_argument("--rate", type=float, default=20.0, help="py-spy --rate of the recordings")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    sides = {"diffalign": buckets(parse_raw(args.diffalign.read_text()), classifier(None), args.rate)}
    if args.peer is not None:
        if not args.peer_script.is_file():
            raise SystemExit(f"pyspy_buckets: --peer-script {args.peer_script} not found (the script the peer profile ran)")
        sides["peer"] = buckets(parse_raw(args.peer.read_text()), classifier(args.peer_script), args.rate)
    print(table(sides, args.steps))
    if args.json:
        args.json.write_text(json.dumps(sides, indent=2))
    return sides


if __name__ == "__main__":
    main()
