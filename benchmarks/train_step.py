"""Training-step throughput and peak memory, with and without the latent/embedding cache.

Usage::

    python benchmarks/train_step.py CONFIG [key=value ...] [--steps N] [--warmup W]
                                    [--cache-dir DIR] [--json OUT] [--modes raw,cached]
                                    [--repeats R] [--threads T]

e.g. ``python benchmarks/train_step.py configs/sdxl/dpo.yaml model.path=/tmp/tiny-sdxl
data.path=pairs.parquet data.resolution=32 train.batch_size=8 train.mode=lora --json out.json``.

Two modes of the *real* training step, one recipe:

* ``raw``    -- images are decoded, resized, VAE-encoded and the prompts run through the
                text encoder(s) on every step (``data.cache_dir`` unset, encoders loaded);
* ``cached`` -- latents and embeddings are read from a cache built once with
                :func:`diffalign.cache.build_cache` (``--cache-dir`` or a temporary folder);
                only the denoiser is loaded, as ``diffalign train`` does from a cache.

``data.random_flip`` is forced false in both (a cache holds unflipped latents), so the two
modes train on the same tensors. Each step is timed whole: fetch a batch from the DataLoader,
``encode_groups``, ``objective_step``, backward, gradient clipping, optimizer and LR-schedule step -- data
loading included, since skipping decoding and encoders is the cache's point. The step is
assembled from the library's own pieces (``load_train_config``, ``load_backbone``,
``build_training_data``, ``build_policy_and_reference``, ``build_optimizer``,
``build_lr_scheduler``, ``encode_groups``, ``objective_step``) in the order
``trainers/loop.py`` uses them, under the same ``Accelerator`` (mixed precision, backward,
clipping). No checkpoints, metrics or logging.

Every step is one optimizer step on one micro-batch of ``train.batch_size`` groups:
``train.gradient_accumulation_steps`` is ignored (it would only change how often the
optimizer runs). Pairs/s counts groups (pairs, for DPO) per second. The JSON also splits each
step into ``data`` (DataLoader fetch), ``encode`` (``encode_groups``) and ``train`` (the rest).
``--repeats R`` measures each mode R times in fresh processes (order raw, cached, cached,
raw, ...) and reports medians; ``--threads T`` sets torch's CPU threads in every mode.

Memory: on CUDA ``torch.cuda.max_memory_allocated`` (reset at the start of each mode); on
CPU the growth of the process's peak RSS (``ru_maxrss``) over its resident size when the mode
started. ``ru_maxrss`` is a high-water mark for the whole process, so each mode (and the
cache build) runs in a fresh subprocess (``--mode raw|cached|cache``, internal).

Device: CUDA when available (``train.mixed_precision`` honoured), else CPU in fp32.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

MODES = ("raw", "cached")
FORCED = ["data.random_flip=false"]  # a cache holds unflipped latents: both modes see the same tensors


# --- helpers shared by parent and children ------------------------------------------------------


def _rss_mb() -> float:
    """Current resident set size in MiB (Linux /proc; falls back to the peak elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return _maxrss_mb()


def _maxrss_mb() -> float:
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, KiB on Linux


def _loadavg() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:  # pragma: no cover - not on every platform
        return None


def _preimport() -> None:
    """Import the code every mode may load lazily, so the RSS baseline is taken after it.

    diffusers and transformers import model classes on first use; without this the
    imports (hundreds of MiB of code and tables) would count as the mode's memory.
    """
    import accelerate  # noqa: F401
    import datasets  # noqa: F401
    import peft  # noqa: F401
    from diffusers import AutoencoderKL, SD3Transformer2DModel, UNet2DConditionModel  # noqa: F401
    from diffusers.optimization import get_scheduler  # noqa: F401
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel  # noqa: F401
    from transformers.optimization import Adafactor  # noqa: F401


def _load_config(config: str, overrides: list[str], cache_dir: str | None):
    from diffalign.trainers.config import load_train_config

    extra = [*FORCED, f"data.cache_dir={cache_dir}" if cache_dir else "data.cache_dir=null"]
    return load_train_config(config, [*overrides, *extra])


def _device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


# --- children: one mode each, in a fresh process -------------------------------------------------


def build_cache_child(config_path: str, overrides: list[str], cache_dir: str) -> dict[str, Any]:
    """Build (or reuse, when it matches) the cache for this recipe; returns what was done."""
    import torch

    from diffalign.backbones import load_backbone
    from diffalign.cache import build_cache, check_cache
    from diffalign.config import ConfigError

    config = _load_config(config_path, overrides, cache_dir)
    try:
        manifest = check_cache(cache_dir, config.model, config.data)
        return {"dir": cache_dir, "reused": True, "build_s": None, "num_groups": manifest["num_groups"]}
    except (FileNotFoundError, ConfigError):
        pass  # missing or stale: (re)build it
    device = _device()
    start = time.perf_counter()
    backbone = load_backbone(config.model)
    backbone.to(device)
    build_cache(backbone, config.model, config.data, cache_dir, dtype=torch.float32, seed=config.train.seed)
    manifest = check_cache(cache_dir, config.model, config.data)
    return {"dir": cache_dir, "reused": False, "build_s": time.perf_counter() - start, "num_groups": manifest["num_groups"]}


def measure_mode(config_path: str, overrides: list[str], mode: str, cache_dir: str | None, steps: int, warmup: int) -> dict[str, Any]:
    """Set up training exactly as the loop does, then time ``warmup + steps`` whole steps."""
    import math

    import torch
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from torch.utils.data import DataLoader

    from diffalign.trainers.loop import setup_training
    from diffalign.trainers.step import objective_step, prepare_groups

    _preimport()
    device = _device()
    cuda = device == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    rss_start, maxrss_start = _rss_mb(), _maxrss_mb()

    config = _load_config(config_path, overrides, cache_dir if mode == "cached" else None)
    run = config.train
    if not cuda:
        run.mixed_precision = "no"  # CPU: fp32 (fp16 autocast is CUDA-only; bf16 on CPU is not what a GPU run measures)
    run.gradient_accumulation_steps = 1  # one micro-batch per optimizer step, as the table reports
    accelerator = Accelerator(mixed_precision=run.mixed_precision, gradient_accumulation_steps=1)
    set_seed(run.seed)

    setup_start = time.perf_counter()
    setup = setup_training(config, accelerator)  # the loop's own set-up
    objective, backbone, data, reference = setup.objective, setup.backbone, setup.data, setup.reference
    policy, optimizer, lr_scheduler, trainable = setup.policy, setup.optimizer, setup.lr_scheduler, setup.trainable
    weight_dtype = setup.weight_dtype
    loader = DataLoader(
        data.dataset,
        batch_sampler=data.batch_sampler(run.batch_size, run.seed, start_batch=0),
        collate_fn=data.collate,
        num_workers=config.data.loader_workers(reads_cache=config.data.cache_dir is not None),
    )
    loader = accelerator.prepare(loader)  # as in the loop: batches arrive on the device
    setup_s = time.perf_counter() - setup_start

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    policy.train()
    load_before = _loadavg()
    loader_iter = iter(loader)
    durations: list[float] = []
    phases: list[tuple[float, float, float]] = []  # (data, encode, train) seconds of each step
    groups_per_step: list[int] = []
    losses: list[float] = []
    empty_batches = 0
    while len(durations) < warmup + steps:
        sync()
        start = time.perf_counter()
        batch = next(loader_iter)
        fetched = time.perf_counter()
        if not data.usable(batch):  # every row failed to decode: nothing to train on, as in the loop
            empty_batches += 1
            continue
        with accelerator.accumulate(policy):  # the loop's step, verbatim (one micro-batch per optimizer step)
            groups, generators = prepare_groups(backbone, batch, config.data.resolution, config.data.empty_prompt_prob)
            sync()  # phase boundary (CUDA only; a no-op on CPU)
            encoded = time.perf_counter()
            output = objective_step(backbone, policy, reference, objective, groups, generators, weight_dtype)
            accelerator.backward(output.loss)
            accelerator.clip_grad_norm_(trainable, run.max_grad_norm or math.inf)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        loss = float(output.loss.detach())  # a host sync on CUDA, as the loop's logging has
        sync()
        end = time.perf_counter()
        durations.append(end - start)
        phases.append((fetched - start, encoded - fetched, end - encoded))
        groups_per_step.append(len(batch["noise_seeds"]))
        losses.append(loss)

    timed, timed_groups = durations[warmup:], groups_per_step[warmup:]
    total = sum(timed)
    timed_phases = phases[warmup:]
    result: dict[str, Any] = {
        "mode": mode,
        "device": device,
        "mixed_precision": run.mixed_precision,
        "steps": steps,
        "warmup": warmup,
        "groups": sum(timed_groups),
        "seconds": total,
        "s_per_step": total / steps,
        "s_per_step_median": sorted(timed)[len(timed) // 2],
        "s_per_step_min": min(timed),
        # Mean seconds per step in each phase: DataLoader fetch (decode/resize or cache read + collate),
        # encode_groups (VAE + text encoders, or a pass-through of cached tensors), and the rest
        # (noise, policy/reference forward, loss, backward, clipping, optimizer).
        "phase_s": {
            name: sum(p[i] for p in timed_phases) / steps for i, name in enumerate(("data", "encode", "train"))
        },
        "pairs_per_s": sum(timed_groups) / total,
        "setup_s": setup_s,
        "encoders_loaded": bool(backbone.has_encoders),
        "empty_batches": empty_batches,
        "final_loss": losses[-1],
        "torch_threads": torch.get_num_threads(),
        "step_seconds": timed,
        "loadavg_1min": [load_before, _loadavg()],  # other work on the machine skews CPU timings
    }
    if cuda:
        result["peak_memory_mb"] = torch.cuda.max_memory_allocated() / 2**20
        result["memory_kind"] = "cuda max_memory_allocated"
    else:
        maxrss_end = _maxrss_mb()
        result["peak_memory_mb"] = maxrss_end - rss_start
        result["memory_kind"] = "peak RSS growth (ru_maxrss - RSS at mode start)"
        result["peak_rss_mb"] = maxrss_end
        result["rss_at_start_mb"] = rss_start
        # The high-water mark may predate the mode (e.g. a transient peak while importing):
        # then the figure above is an upper bound of what the mode itself needed.
        result["peak_predates_mode"] = maxrss_end <= maxrss_start
    return result


# --- parent: build the cache, run each mode in its own process, report ---------------------------


def _child(argv_tail: list[str], result_file: Path) -> dict[str, Any]:
    command = [sys.executable, str(Path(__file__).resolve()), *argv_tail, "--result-file", str(result_file)]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    completed = subprocess.run(command, env=env)
    if completed.returncode != 0:
        raise RuntimeError(f"benchmark child failed ({completed.returncode}): {' '.join(command)}")
    return json.loads(result_file.read_text())


def combine_repeats(results: list[dict[str, Any]]) -> dict[str, Any]:
    """One mode's figures over repeats: median throughput and step time, highest peak memory."""
    if len(results) == 1:
        return {**results[0], "repeats": 1}

    def median(values: list[float]) -> float:
        ordered = sorted(values)
        middle = len(ordered) // 2
        return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2

    by_throughput = sorted(results, key=lambda r: r["pairs_per_s"])
    combined = dict(by_throughput[len(results) // 2])  # the other fields from the median repeat
    combined.update(
        repeats=len(results),
        pairs_per_s=median([r["pairs_per_s"] for r in results]),
        s_per_step=median([r["s_per_step"] for r in results]),
        s_per_step_median=median([r["s_per_step_median"] for r in results]),
        phase_s={name: median([r["phase_s"][name] for r in results]) for name in results[0]["phase_s"]},
        peak_memory_mb=max(r["peak_memory_mb"] for r in results),
        pairs_per_s_each=[r["pairs_per_s"] for r in results],
        peak_memory_mb_each=[r["peak_memory_mb"] for r in results],
        runs=results,
    )
    return combined


def format_table(report: dict[str, Any]) -> str:
    repeated = report.get("repeats", 1) > 1
    rows = [
        ("mode", "pairs/s", "s/step", "median s/step", "data+encode s/step", "peak mem (MiB)", "vs raw")
        + (("pairs/s per repeat",) if repeated else ())
    ]
    raw = report["modes"].get("raw")
    for mode, r in report["modes"].items():
        ratio = f"{r['pairs_per_s'] / raw['pairs_per_s']:.2f}x" if raw else "-"
        row = (
            mode,
            f"{r['pairs_per_s']:.2f}",
            f"{r['s_per_step']:.4f}",
            f"{r['s_per_step_median']:.4f}",
            f"{r['phase_s']['data']:.4f}+{r['phase_s']['encode']:.4f}",
            f"{r['peak_memory_mb']:.1f}",
            ratio,
        )
        if repeated:
            row += (" ".join(f"{x:.2f}" for x in r.get("pairs_per_s_each", [r["pairs_per_s"]])),)
        rows.append(row)
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths))) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config", help="YAML recipe, e.g. configs/sd15/dpo.yaml")
    parser.add_argument("overrides", nargs="*", help="key.path=value overrides, as for `diffalign train`")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per mode")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first, per mode")
    parser.add_argument(
        "--cache-dir", default=None, help="cache folder: reused when it matches the recipe, else (re)built there; default: a temp dir"
    )
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--repeats", type=int, default=1, help="measure each mode this many times (fresh processes, A-B-B-A order)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads in each mode (default: torch's)")
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated subset of raw,cached")
    parser.add_argument("--mode", choices=[*MODES, "cache"], default=None, help=argparse.SUPPRESS)
    parser.add_argument("--result-file", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 0 or args.repeats < 1:
        parser.error("--steps and --repeats must be >= 1, --warmup >= 0")

    if args.mode is not None:  # internal: one measurement in this (fresh) process
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        if args.mode == "cache":
            result = build_cache_child(args.config, args.overrides, args.cache_dir)
        else:
            result = measure_mode(args.config, args.overrides, args.mode, args.cache_dir, args.steps, args.warmup)
        if args.result_file:
            Path(args.result_file).write_text(json.dumps(result))
        return result

    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not modes or any(m not in MODES for m in modes):
        parser.error(f"--modes: expected a subset of {','.join(MODES)}, got {args.modes!r}")
    if args.cache_dir is not None:
        folder = Path(args.cache_dir)
        if folder.is_dir() and any(folder.iterdir()) and not (folder / "manifest.json").is_file():
            parser.error(f"--cache-dir {folder} is a non-empty folder that holds no cache; building would replace it")
    try:  # on kill, still delete the temporary cache and stop the running child (subprocess.run kills it)
        previous_handler = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    except ValueError:  # not the main thread
        previous_handler = None
    try:
        report = _run_modes(args, modes)
    finally:
        if previous_handler is not None:
            signal.signal(signal.SIGTERM, previous_handler)
    print(f"\n{args.config} {' '.join(args.overrides)}")
    print(
        f"device {report['device']}, mixed precision {report['mixed_precision']}, torch threads {report['torch_threads']}, "
        f"{args.steps} timed steps after {args.warmup} warm-up" + (f", median of {args.repeats} repeats" if args.repeats > 1 else "")
    )
    if report["cache"] and report["cache"].get("build_s") is not None:
        print(f"cache built in {report['cache']['build_s']:.1f} s ({report['cache']['num_groups']} groups)")
    print(format_table(report))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2))
        print(f"wrote {args.json}")
    return report


def _run_modes(args: argparse.Namespace, modes: list[str]) -> dict[str, Any]:
    """Build (or reuse) the cache, then measure each mode in fresh subprocesses."""
    common = [args.config, *args.overrides, "--steps", str(args.steps), "--warmup", str(args.warmup)]
    if args.threads:
        common += ["--threads", str(args.threads)]
    with tempfile.TemporaryDirectory(prefix="diffalign-bench-") as scratch:
        scratch_path = Path(scratch)
        cache_dir = args.cache_dir or str(scratch_path / "cache")
        report: dict[str, Any] = {
            "config": args.config,
            "overrides": [*args.overrides, *FORCED],
            "steps": args.steps,
            "warmup": args.warmup,
            "repeats": args.repeats,
            "cache": None,
            "modes": {},
        }
        if "cached" in modes:
            print(f"train_step: cache in {cache_dir}", flush=True)
            report["cache"] = _child([*common, "--mode", "cache", "--cache-dir", cache_dir], scratch_path / "cache.json")
        runs: dict[str, list[dict[str, Any]]] = {mode: [] for mode in modes}
        for repeat in range(args.repeats):
            # A B B A ...: slow drift of other load on the machine hits both modes alike.
            for mode in modes if repeat % 2 == 0 else modes[::-1]:
                print(
                    f"train_step: measuring {mode} ({args.warmup} warm-up + {args.steps} timed steps)"
                    + (f", repeat {repeat + 1}/{args.repeats}" if args.repeats > 1 else ""),
                    flush=True,
                )
                tail = [*common, "--mode", mode] + (["--cache-dir", cache_dir] if mode == "cached" else [])
                runs[mode].append(_child(tail, scratch_path / f"{mode}-{repeat}.json"))
        report["modes"] = {mode: combine_repeats(results) for mode, results in runs.items()}
        if args.cache_dir is None and report["cache"] is not None:
            report["cache"]["dir"] = "(temporary, deleted)"

    first = next(iter(report["modes"].values()))
    report["device"] = first["device"]
    report["mixed_precision"] = first["mixed_precision"]
    report["torch_threads"] = first["torch_threads"]
    if "raw" in report["modes"] and "cached" in report["modes"]:
        report["speedup"] = report["modes"]["cached"]["pairs_per_s"] / report["modes"]["raw"]["pairs_per_s"]
    return report


if __name__ == "__main__":
    main()
    sys.exit(0)
