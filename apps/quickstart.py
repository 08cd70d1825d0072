"""``diffalign quickstart``: the whole loop on 2 CPU cores, in minutes.

1. the toy world (Pick-a-Pic-schema parquet) and the toy base model, built on
   first run and cached under ``~/.cache/diffalign`` (keyed by their recipes);
2. held-out implicit accuracy before training (0.5: policy == reference);
3. Diffusion-DPO through the one training loop (``configs/quickstart.yaml``);
4. held-out implicit accuracy after, per loser kind; a PNG of the loss,
   accuracy and winner/loser error curves; a before/after sample grid.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pyarrow.parquet as pq
import torch

DEFAULT_CONFIG = Path("quickstart")  # the shipped recipe (diffalign.recipes): works from any folder


def default_cache_root() -> Path:
    return Path(os.environ.get("DIFFALIGN_CACHE", Path.home() / ".cache" / "diffalign"))


def accuracy_by_kind(scores, heldout_parquet: Path) -> dict[str, float]:
    """Held-out accuracy overall and per loser kind (the toy world's ``loser_kind`` column)."""
    table = pq.read_table(heldout_parquet, columns=["ranking_id", "loser_kind"])
    kinds = dict(zip((str(r) for r in table.column("ranking_id").to_pylist()), table.column("loser_kind").to_pylist()))
    row_kinds = [kinds[row_id.rsplit(":", 1)[-1]] for row_id in scores.row_ids]  # row ids are "file:ranking_id"
    result = {"overall": scores.accuracy()}
    for kind in sorted(set(row_kinds)):
        result[kind] = scores.accuracy(torch.tensor([k == kind for k in row_kinds]))
    return result


def plot_curves(metrics_file: Path, out_png: Path) -> Path:
    """Loss, training implicit accuracy and winner/loser errors (likelihood displacement shows here)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from diffalign.trainers.metrics import read_metrics

    rows = read_metrics(metrics_file)
    steps = [r["step"] for r in rows]
    figure, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    axes[0].plot(steps, [r["loss"] for r in rows])
    axes[0].set_title("DPO loss")
    axes[1].plot(steps, [r["implicit_acc"] for r in rows])
    axes[1].set_ylim(0, 1.02)
    axes[1].set_title("implicit accuracy (training batches)")
    def smooth(values: list[float], width: int = 5) -> list[float]:
        return [sum(values[max(0, i - width + 1) : i + 1]) / len(values[max(0, i - width + 1) : i + 1]) for i in range(len(values))]

    for image, colour in (("winner", "tab:green"), ("loser", "tab:red")):
        shift = [r[f"policy_err_{image}"] - r[f"ref_err_{image}"] for r in rows]
        axes[2].plot(steps, smooth(shift), color=colour, label=f"{image}: L_policy - L_ref")
    axes[2].axhline(0.0, color="gray", linewidth=0.8)
    axes[2].set_title("error shift vs reference (5-step mean)")
    axes[2].legend(fontsize=7)
    for axis in axes:
        axis.set_xlabel("step")
    figure.tight_layout()
    figure.savefig(out_png, dpi=110)
    plt.close(figure)
    return out_png


def sample_grid(base_path: Path, trained_unet, prompts: list[str], out_png: Path, seed: int = 0, steps: int = 25) -> Path:
    """Rows: base model, tuned model; one column per prompt; same seeds. Upscaled for viewing."""
    from diffusers import StableDiffusionPipeline
    from PIL import Image, ImageDraw

    pipeline = StableDiffusionPipeline.from_pretrained(base_path, safety_checker=None, requires_safety_checker=False)
    pipeline.set_progress_bar_config(disable=True)
    rows = []
    for unet in (pipeline.unet, trained_unet):
        pipeline.unet = unet
        generator = torch.Generator().manual_seed(seed)
        images = pipeline(prompts, num_inference_steps=steps, guidance_scale=3.0, generator=generator, output_type="pil").images
        rows.append(images)
    cell, label = 96, 14
    grid = Image.new("RGB", (cell * len(prompts), (cell + label) * 2), "white")
    draw = ImageDraw.Draw(grid)
    for r, (name, images) in enumerate(zip(("base", "DPO"), rows)):
        for c, image in enumerate(images):
            grid.paste(image.resize((cell, cell), Image.NEAREST), (c * cell, r * (cell + label) + label))
            draw.text((c * cell + 2, r * (cell + label)), f"{name}: {prompts[c][2:]}", fill="black")
    grid.save(out_png)
    return out_png


def base_heldout_store(cache_root: Path, config, heldout_file: Path) -> Path:
    """Where the base's held-out scores for ``config`` live: keyed by the model settings (path, schedule,
    prediction type...), the held-out file's folder (the toy world's fingerprint) and the resolution."""
    from diffalign.fingerprint import fingerprint

    model = fingerprint(config.model.model_dump(mode="json"), 12)
    return Path(cache_root) / f"heldout-errors-{model}-{Path(heldout_file).parent.name}-{config.data.resolution}px.pt"


def base_heldout_scores(backbone, heldout, resolution: int, store: Path):
    """The base's held-out scores ("before training"), computed once per toy base and reused.

    Why: the base never changes, so its errors on the held-out pairs are the same for every quickstart
    (and every learning test) that starts from it; a later run skips that pass (20-30 s on 2 cores).
    An unreadable or mismatched store is reported and computed again, never trusted.
    """
    from diffalign.trainers.evaluate import HeldoutScores, heldout_scores

    if store.is_file():
        try:
            stored = HeldoutScores.load(store)
        except Exception as error:  # a torn or foreign file: say so, then recompute and replace it
            print(f"diffalign: {store} is unreadable ({type(error).__name__}: {error}); computing the base's held-out errors again")
        else:
            if stored.row_ids == [heldout.row_id(i) for i in range(len(heldout))]:
                return stored
            print(f"diffalign: {store} scored other held-out rows; computing the base's held-out errors again")
    scores = heldout_scores(backbone, backbone.denoiser, backbone.denoiser, heldout, resolution)
    scores.save(store)
    return scores


def run_quickstart(output_dir: Path, overrides: list[str] | None = None, cache_root: str | None = None, config_path: Path = DEFAULT_CONFIG) -> dict:
    """Build (or reuse) the toy world and base, train Diffusion-DPO, report before/after."""
    from diffalign.backbones import load_backbone
    from diffalign.data import SkipReport, open_preference_source
    from diffalign.toy.base import ToyBaseRecipe, ensure_toy_world_and_base
    from diffalign.toy.world import prompts as toy_prompts
    from diffalign.trainers.config import load_train_config
    from diffalign.trainers.evaluate import heldout_scores
    from diffalign.trainers.export import load_trained_denoiser
    from diffalign.trainers.loop import train

    started = time.perf_counter()
    root = Path(cache_root) if cache_root else default_cache_root()
    recipe = ToyBaseRecipe()
    print(f"[1/4] toy world and toy base under {root} (the base ships with diffalign: copied once, reused after)")
    world, base = ensure_toy_world_and_base(root, recipe)
    output_dir.mkdir(parents=True, exist_ok=True)
    run_dir = output_dir / "run"
    config = load_train_config(
        config_path,
        # A second quickstart moves the first one's run aside (run.moved-<time>) rather than refusing: it is a demo.
        [f"model.path={base}", f"data.path={world.train}", f"train.output_dir={run_dir}", "train.overwrite=true", *(overrides or [])],
    )
    heldout = open_preference_source(str(world.heldout), report=SkipReport())
    backbone = load_backbone(config.model)
    base_unet = backbone.denoiser

    print("[2/4] held-out implicit accuracy before training (policy = reference, so every pair ties)")
    before_scores = base_heldout_scores(backbone, heldout, config.data.resolution, base_heldout_store(root, config, world.heldout))
    before = accuracy_by_kind(before_scores, world.heldout)

    print(f"[3/4] Diffusion-DPO: {config.train.max_steps} steps, beta {config.method.beta}, {config.train.mode} fine-tune")  # type: ignore[attr-defined]
    result = train(config)

    print("[4/4] held-out implicit accuracy after training, plots and samples")
    fresh_base = load_backbone(config.model, load_encoders=False).denoiser  # the saved weights are evaluated, not the in-memory ones
    trained = load_trained_denoiser(result.final_dir, fresh_base)
    after = accuracy_by_kind(heldout_scores(backbone, trained, base_unet, heldout, config.data.resolution, reuse=before_scores), world.heldout)
    curves = plot_curves(result.metrics_file, output_dir / "curves.png")
    grid = sample_grid(base, trained, toy_prompts(recipe.world), output_dir / "samples.png")
    elapsed = time.perf_counter() - started
    report = {
        "heldout_pairs": len(heldout),
        "steps": result.steps,
        "seed": config.train.seed,
        "before": before,
        "after": after,
        "seconds": round(elapsed, 1),
        "toy_base": str(base),
        "final_weights": str(result.final_dir),
        "curves": str(curves),
        "samples": str(grid),
    }
    (output_dir / "report.json").write_text(json.dumps(report, indent=2))
    print("\nheld-out implicit accuracy (ties count half)")
    print(f"  {'loser kind':<10} {'before':>7} {'after':>7}")
    for kind in before:
        print(f"  {kind:<10} {before[kind]:>7.3f} {after[kind]:>7.3f}")
    print(f"\ndone in {elapsed:.0f} s")
    print(f"  final weights  {result.final_dir}")
    print(f"  curves         {curves}")
    print(f"  samples        {grid}")
    print(f"  TensorBoard    tensorboard --logdir {run_dir / 'logs'}")
    print(f"  report         {output_dir / 'report.json'}")
    return report
