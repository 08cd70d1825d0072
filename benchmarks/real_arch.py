"""One LoRA Diffusion-DPO step on the real architectures (random weights), through `diffalign train`.

    python benchmarks/real_arch.py [--families sd15 sdxl sd3] [--scale full|tiny] [--device cpu|cuda]
        [--resolution PX] [--steps N] [--models DIR] [--work DIR] [--flops] [--peak-tflops T] [--json OUT]
    python benchmarks/real_arch.py --paper       # full fine-tuning memory per optimizer, from parameter counts

For each family: save the pipeline once (``--scale full``: `diffalign tiny FAMILY --scale full`, the published
architecture; ``tiny``: the test-size one) under ``--models``, write 4 toy pairs, then run ``configs/FAMILY/dpo.yaml``
with train.mode=lora, batch 1, ``--steps`` steps (SD3 with model.use_t5=false) in a fresh child process that calls
the CLI's ``main`` and records:

* step time: from the moment the loop has finished its setup (it creates its MetricsWriter) to the checkpoint
  after each step (checkpointing_steps=1), so loading, LoRA injection and saving are outside it; data loading,
  VAE/text encoding, policy + reference forward, backward and the optimizer step are inside, as in training;
* peak RSS: the child's ``ru_maxrss``; on CUDA also ``torch.cuda.max_memory_allocated``;
* FLOPs (``--flops``, on by default on CUDA): a second child runs one step under
  ``torch.utils.flop_counter.FlopCounterMode`` (counting slows a step, so it is never the timed run),
  with gradient checkpointing off so the count is the model's FLOPs without the recomputed forward
  (VAE encoding and text encoders included: they are part of every raw step);
  MFU = FLOPs / step time / the accelerator's peak dense bf16 FLOP/s.

A third child loads the stock diffusers pipeline and ``load_lora_weights`` the saved LoRA, counting the
LoRA layers it injected. Each child is its own process so ``ru_maxrss`` is that run's alone.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FAMILIES = ("sd15", "sdxl", "sd3")
DEFAULT_RESOLUTION = {"cpu": {"sd15": 256, "sdxl": 256, "sd3": 256}, "cuda": {"sd15": 512, "sdxl": 1024, "sd3": 1024}}
TINY_RESOLUTION = 32
# Peak dense bf16 tensor FLOP/s by device name (vendor data sheets, SXM parts, no sparsity).
PEAK_TFLOPS = {"H200": 989.4, "H100": 989.4, "A100": 312.0, "L40S": 362.0, "A10G": 70.0, "4090": 165.2}


# --------------------------------------------------------------------------- children


def _child_train(argv: list[str], out: Path, count_flops: bool) -> None:
    """Run `diffalign train ARGV` in this process, timing each step; write figures to ``out``."""
    import torch

    from diffalign.apps import cli
    from diffalign.trainers import loop

    marks: list[tuple[str, float]] = []
    original_writer, original_save = loop.MetricsWriter, loop.save_checkpoint

    def writer(*args, **kwargs):  # the loop builds it once, right after its setup: the clock starts here
        marks.append(("start", time.perf_counter()))
        return original_writer(*args, **kwargs)

    def save(*args, **kwargs):  # called after every step (checkpointing_steps=1); its own time is excluded
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        marks.append(("step", time.perf_counter()))
        result = original_save(*args, **kwargs)
        marks.append(("saved", time.perf_counter()))
        return result

    loop.MetricsWriter, loop.save_checkpoint = writer, save
    flops = None
    try:
        if count_flops:
            from torch.utils.flop_counter import FlopCounterMode

            with FlopCounterMode(display=False) as counter:
                rc = cli.main(["train", *argv])
            flops = counter.get_total_flops()
        else:
            rc = cli.main(["train", *argv])
    finally:
        loop.MetricsWriter, loop.save_checkpoint = original_writer, original_save
    step_seconds, last = [], None
    for kind, moment in marks:
        if kind == "step":
            step_seconds.append(moment - last)
        last = moment
    figures = {
        "rc": rc,
        "step_seconds": step_seconds,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # KiB on Linux
        "flops": flops,
    }
    if torch.cuda.is_available():
        figures["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
        figures["gpu"] = torch.cuda.get_device_name()
    out.write_text(json.dumps(figures))
    if rc != 0:
        sys.exit(rc)


def _child_load(model: str, lora: str, out: Path) -> None:
    """The stock pipeline takes the saved LoRA: ``DiffusionPipeline.from_pretrained`` + ``load_lora_weights``."""
    from diffusers import DiffusionPipeline
    from peft.tuners.tuners_utils import BaseTunerLayer

    # components saved as absent (SD3 without T5: text_encoder_3 = [null, null]) are passed as None, as a user does
    index = json.loads((Path(model) / "model_index.json").read_text())
    absent = {name: None for name, value in index.items() if isinstance(value, list) and value == [None, None]}
    pipeline = DiffusionPipeline.from_pretrained(model, **absent)
    pipeline.load_lora_weights(lora)
    denoiser = getattr(pipeline, "unet", None) or pipeline.transformer
    layers = sum(isinstance(m, BaseTunerLayer) for m in denoiser.modules())
    out.write_text(json.dumps({"pipeline": type(pipeline).__name__, "lora_layers": layers,
                               "adapters": pipeline.get_active_adapters()}))  # fmt: skip


def _spawn(args: list[str], env: dict[str, str]) -> tuple[int, float, float]:
    """Run this script as a child; returns (exit status, wall seconds, the child's own peak RSS in MB)."""
    start = time.perf_counter()
    process = subprocess.Popen([sys.executable, __file__, *args], env=env)
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    return process.returncode, time.perf_counter() - start, usage.ru_maxrss / 1024


# --------------------------------------------------------------------------- the benchmark


def _ensure_model(family: str, scale: str, models: Path) -> Path:
    path = models / f"{family}-{scale}"
    if (path / "model_index.json").is_file():
        return path
    if scale == "full":
        from diffalign.tiny import save_full_scale_pipeline

        print(f"real_arch: saving the full-scale {family} pipeline to {path} (once)", flush=True)
        return save_full_scale_pipeline(family, path)
    from diffalign.tiny import save_pipeline

    return save_pipeline(family, path)


def _train_overrides(family, model, pairs, resolution, steps, device, output_dir) -> list[str]:
    overrides = [
        str(REPO / "configs" / family / "dpo.yaml"),
        f"model.path={model}", f"data.path={pairs}", f"data.resolution={resolution}",
        "train.mode=lora", "train.batch_size=1", "train.gradient_accumulation_steps=1", "train.scale_lr=false",
        f"train.max_steps={steps}", "train.checkpointing_steps=1", "train.checkpoints_total_limit=1",
        "train.lr_warmup_steps=0", f"train.mixed_precision={'bf16' if device == 'cuda' else 'no'}",
        "train.progress_bar=false", f"train.output_dir={output_dir}",
    ]  # fmt: skip
    if family == "sd3":
        overrides.append("model.use_t5=false")
    return overrides


def _peak_tflops(gpu: str | None, given: float | None) -> float | None:
    if given is not None:
        return given
    for name, tflops in PEAK_TFLOPS.items():
        if gpu and name in gpu:
            return tflops
    return None


def run_family(family: str, args: argparse.Namespace, work: Path) -> dict:
    model = _ensure_model(family, args.scale, Path(args.models))
    from diffalign.toy.world import write_pairs

    pairs = write_pairs(work / "pairs.parquet", n=4, seed=0) if not (work / "pairs.parquet").exists() else work / "pairs.parquet"
    resolution = args.resolution or (TINY_RESOLUTION if args.scale == "tiny" else DEFAULT_RESOLUTION[args.device][family])
    env = dict(os.environ)
    if args.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # accelerate would otherwise pick a GPU
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    output_dir = work / f"{family}-run"
    overrides = _train_overrides(family, model, pairs, resolution, args.steps, args.device, output_dir)
    figures_file = work / f"{family}-train.json"
    rc, wall, child_rss = _spawn(["--child-train", str(figures_file), "--", *overrides], env)
    if rc != 0:
        return {"family": family, "error": f"diffalign train exited with {rc} (see its output above)", "peak_rss_mb": child_rss}
    figures = json.loads(figures_file.read_text())
    result = {
        "family": family, "scale": args.scale, "device": args.device, "resolution": resolution,
        "denoiser_parameters": _denoiser_parameters(model),
        "step_seconds": figures["step_seconds"], "s_per_step": figures["step_seconds"][-1],
        "pairs_per_s": 1 / figures["step_seconds"][-1], "peak_rss_mb": child_rss, "wall_s": wall,
    }  # fmt: skip
    if "peak_gpu_mb" in figures:
        result.update(peak_gpu_mb=figures["peak_gpu_mb"], gpu=figures["gpu"])
    if args.flops or (args.flops is None and args.device == "cuda"):
        flops_file = work / f"{family}-flops.json"
        flop_overrides = _train_overrides(family, model, pairs, resolution, 1, args.device, work / f"{family}-flops-run")
        # model FLOPs: checkpointing's recomputed forward is work the model does not need, so MFU leaves it out
        flop_overrides.append("train.gradient_checkpointing=false")
        rc, _, _ = _spawn(["--child-train", str(flops_file), "--flops", "--", *flop_overrides], env)
        if rc == 0:
            result["flops_per_step"] = json.loads(flops_file.read_text())["flops"]
            peak = _peak_tflops(result.get("gpu"), args.peak_tflops)
            if peak is not None:
                result["mfu"] = result["flops_per_step"] / result["s_per_step"] / (peak * 1e12)
    load_file = work / f"{family}-load.json"
    rc, _, load_rss = _spawn(["--child-load", str(load_file), str(model), str(output_dir / "final")], env)
    result["lora_loads"] = json.loads(load_file.read_text()) if rc == 0 else {"error": f"load_lora_weights failed ({rc})"}
    return result


def _denoiser_parameters(model: Path) -> int:
    """Parameters (not buffers: SD3 saves its 57 M-entry position table) of the saved denoiser, built on the meta device."""
    import diffusers
    import torch

    folder = model / "unet" if (model / "unet").is_dir() else model / "transformer"
    config = json.loads((folder / "config.json").read_text())
    model_class = getattr(diffusers, config["_class_name"])
    with torch.device("meta"):
        denoiser = model_class.from_config(config)
    return sum(p.numel() for p in denoiser.parameters())


# --------------------------------------------------------------------------- memory on paper

# Bytes per trained parameter for full fine-tuning with fp32 master weights (mixed precision keeps them):
# weights 4 + gradients 4 + optimizer state. AdamW: two fp32 moments (8). Adafactor (beta1=None, factored
# second moment): a row and a column vector per matrix, ~0 per parameter. 8-bit AdamW (bitsandbytes):
# two 1-byte moments (2; block-wise scales add ~0.03).
OPTIMIZER_BYTES = {"AdamW (fp32)": 16, "Adafactor": 8, "8-bit AdamW": 10}


def paper_table() -> str:
    from diffalign.tiny import full_scale_parameter_counts

    lines = ["| family | denoiser params | frozen params (VAE + text) | " + " | ".join(OPTIMIZER_BYTES) + " |",
             "|---|---:|---:|" + "---:|" * len(OPTIMIZER_BYTES)]  # fmt: skip
    for family in FAMILIES:
        counts = full_scale_parameter_counts(family)
        denoiser = counts.get("unet") or counts["transformer"]
        frozen = sum(counts.values()) - denoiser
        # + the DPO reference denoiser and the frozen encoders in bf16 (2 B/param); activations not included
        cells = [f"{(denoiser * b + (denoiser + frozen) * 2) / 1e9:.1f} GB" for b in OPTIMIZER_BYTES.values()]
        lines.append(f"| {family} | {denoiser / 1e6:,.1f} M | {frozen / 1e6:,.1f} M | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _table(results: list[dict]) -> str:
    lines = ["| family | px | denoiser params | s/step | pairs/s | peak RSS | peak GPU | TFLOP/step | MFU | LoRA loads |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]  # fmt: skip
    for r in results:
        if "error" in r:
            lines.append(f"| {r['family']} | | | {r['error']} | | {r['peak_rss_mb'] / 1024:.1f} GB | | | | |")
            continue
        gpu = f"{r['peak_gpu_mb'] / 1024:.1f} GB" if "peak_gpu_mb" in r else "-"
        tflop = f"{r['flops_per_step'] / 1e12:.2f}" if "flops_per_step" in r else "-"
        mfu = f"{r['mfu']:.1%}" if "mfu" in r else "-"
        loads = r["lora_loads"]
        loaded = f"yes, {loads['lora_layers']} layers" if "lora_layers" in loads and loads["lora_layers"] > 0 else str(loads)
        lines.append(f"| {r['family']} | {r['resolution']} | {r['denoiser_parameters'] / 1e6:,.1f} M | {r['s_per_step']:.2f} | "
                     f"{r['pairs_per_s']:.3f} | {r['peak_rss_mb'] / 1024:.2f} GB | {gpu} | {tflop} | {mfu} | {loaded} |")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", nargs="+", choices=FAMILIES, default=list(FAMILIES))
    parser.add_argument("--scale", choices=["full", "tiny"], default="full")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--resolution", type=int, default=None, help="default: 256 on CPU; 512 sd15 / 1024 sdxl, sd3 on CUDA")
    parser.add_argument("--steps", type=int, default=1, help="steps per run; the last one is reported")
    parser.add_argument("--models", default=str(Path(tempfile.gettempdir()) / "diffalign-real-arch"), help="saved pipelines (reused)")
    parser.add_argument("--work", default=None, help="pairs, runs and figures (default: a temporary folder)")
    parser.add_argument("--flops", action=argparse.BooleanOptionalAction, default=None, help="count FLOPs (default: on CUDA)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="peak bf16 TFLOP/s for MFU (default: by GPU name)")
    parser.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS for the children")
    parser.add_argument("--json", default=None)
    parser.add_argument("--paper", action="store_true", help="print full fine-tuning memory per optimizer and exit")
    args = parser.parse_args(argv)

    if args.paper:
        print(paper_table())
        return []
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            parser.error("--device cuda: no CUDA device is visible to torch")
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="real-arch-"))
    work.mkdir(parents=True, exist_ok=True)
    results = []
    for family in args.families:
        results.append(run_family(family, args, work))
        print(_table(results[-1:]), flush=True)
    print(_table(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child-train":
        count = sys.argv[3] == "--flops"
        rest = sys.argv[sys.argv.index("--") + 1 :]
        _child_train(rest, Path(sys.argv[2]), count)
    elif len(sys.argv) > 1 and sys.argv[1] == "--child-load":
        _child_load(sys.argv[3], sys.argv[4], Path(sys.argv[2]))
    else:
        main()
