"""The toy base model: a tiny SD1.5-shaped pipeline pretrained on the toy world.

Why: DPO needs a reference whose denoising errors already depend on the
caption; from a random UNet it learns only low-level noise statistics
(in the toy world's prototype, held-out accuracy stayed at 0.47-0.63 and LoRA
at chance; docs/toy-world.md). So the base is (1) a tiny VAE fitted to
reconstruct toy images (so samples can be decoded and looked at), then (2) the
UNet trained briefly with the ordinary denoising loss on winner images and their
captions (10% empty captions, so classifier-free guidance has an unconditional
model). This is pretraining of the toy world,
not an alignment method: alignment runs through ``diffalign.trainers``.

The result is a plain diffusers folder, cached under a key derived from the
whole recipe, so the quickstart and the tests build it once.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import PIL.Image
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from filelock import FileLock

from diffalign.backbones import Backbone, StableDiffusion3Backbone, StableDiffusionBackbone
from diffalign.atomic import staged_folder
from diffalign.fingerprint import fingerprint
from diffalign.noise import DDPMProcess, RectifiedFlowProcess
from diffalign.prediction import denoising_errors
from diffalign.tiny import build_pipeline
from diffalign.toy.world import ToyWorldSpec, write_toy_world

BASE_VERSION = 1
SHIPPED_TOY_BASE = Path(__file__).parent / "shipped_base"  # the default recipe's base; `python -m diffalign.toy.shipped` rebuilds it


@dataclass(frozen=True)
class ToyBaseRecipe:
    """Everything the toy base depends on; its fingerprint names the cache folder."""

    world: ToyWorldSpec = field(default_factory=ToyWorldSpec)
    n_train: int = 3000
    seed: int = 0
    vae_steps: int = 300
    vae_lr: float = 2e-3
    vae_kl_weight: float = 1e-6
    unet_steps: int = 800
    unet_lr: float = 2e-3
    batch_size: int = 32
    empty_prompt_prob: float = 0.1

    def fingerprint(self) -> str:
        payload = {"version": BASE_VERSION, **dataclasses.asdict(self), "world": self.world.fingerprint()}
        return fingerprint(payload, 12)


def _decode_column(table, column: str) -> torch.Tensor:
    """JPEG bytes -> [N, 3, H, W] in [-1, 1]."""
    arrays = [np.asarray(PIL.Image.open(io.BytesIO(data)).convert("RGB")) for data in table.column(column).to_pylist()]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def _winners_and_losers(train_parquet: Path) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    table = pq.read_table(train_parquet, columns=["jpg_0", "jpg_1", "label_0", "caption"])
    first, second = _decode_column(table, "jpg_0"), _decode_column(table, "jpg_1")
    zero_wins = torch.tensor(table.column("label_0").to_pylist()) == 1.0
    mask = zero_wins.reshape(-1, 1, 1, 1)
    winners = torch.where(mask, first, second)
    losers = torch.where(mask, second, first)
    return winners, losers, [str(c) for c in table.column("caption").to_pylist()]


def fit_vae(vae, images: torch.Tensor, recipe: ToyBaseRecipe, generator: torch.Generator, log=print) -> None:
    """Reconstruction + a tiny KL term; then set scaling_factor so latents have unit std (as SD's VAE does)."""
    vae.train().requires_grad_(True)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=recipe.vae_lr, weight_decay=0.0)
    for step in range(recipe.vae_steps):
        batch = images[torch.randint(0, len(images), (recipe.batch_size,), generator=generator)]
        posterior = vae.encode(batch).latent_dist
        reconstruction = vae.decode(posterior.sample(generator)).sample
        loss = F.mse_loss(reconstruction, batch) + recipe.vae_kl_weight * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if (step + 1) % 100 == 0:
            log(f"  vae step {step + 1}/{recipe.vae_steps}: reconstruction mse {F.mse_loss(reconstruction, batch):.4f}")
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        latents = torch.cat([vae.encode(images[i : i + 256]).latent_dist.mode() for i in range(0, len(images), 256)])
    vae.register_to_config(scaling_factor=float(1.0 / latents.std()))


def pretrain_unet(backbone: Backbone, winners: torch.Tensor, captions: list[str], recipe: ToyBaseRecipe, generator: torch.Generator, log=print) -> None:
    """The ordinary denoising loss on (winner, caption), through the core's one prediction path (diffalign.prediction)."""
    with torch.no_grad():
        latents = torch.cat([backbone.encode_images(winners[i : i + 256]) for i in range(0, len(winners), 256)])
        texts = sorted(set(captions)) + [""]
        encoded = backbone.encode_prompts(texts)  # SD: prompt_embeds; SD3 adds pooled_prompt_embeds
    text_index = torch.tensor([texts.index(c) for c in captions])
    empty = len(texts) - 1
    unet = backbone.denoiser.train().requires_grad_(True)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=recipe.unet_lr, weight_decay=0.0)
    running = []
    for step in range(recipe.unet_steps):
        rows = torch.randint(0, len(latents), (recipe.batch_size,), generator=generator)
        conditioning = text_index[rows].clone()
        conditioning[torch.rand(recipe.batch_size, generator=generator) < recipe.empty_prompt_prob] = empty
        x0 = latents[rows]
        eps = torch.randn(x0.shape, generator=generator)
        t = backbone.noise.sample_timesteps(recipe.batch_size, generator)
        text = {key: value[conditioning] for key, value in encoded.items()}
        loss = denoising_errors(backbone, unet, x0, eps, t, text).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        running.append(loss.item())
        if (step + 1) % 200 == 0:
            log(f"  unet step {step + 1}/{recipe.unet_steps}: denoising loss {np.mean(running[-200:]):.4f}")
    unet.eval().requires_grad_(False)


def build_toy_base(folder: str | Path, recipe: ToyBaseRecipe, train_parquet: str | Path, log=print) -> Path:
    """Fit the VAE, pretrain the UNet and save the pipeline to ``folder`` atomically."""

    def backbone(pipeline):
        noise = DDPMProcess.from_scheduler_config(dict(pipeline.scheduler.config))
        return StableDiffusionBackbone(pipeline.unet, noise, pipeline.tokenizer, pipeline.text_encoder, pipeline.vae)

    return _build_base(folder, recipe, train_parquet, "sd15", backbone, "toy base", "UNet", {}, log)


def _build_base(
    folder: str | Path, recipe: ToyBaseRecipe, train_parquet: str | Path, family: str, make_backbone,
    name: str, denoiser: str, record: dict, log,
) -> Path:
    """The one build of a toy base: tiny ``family`` pipeline, VAE fit, pretraining on winners, atomic save."""
    folder = Path(folder)
    torch.manual_seed(recipe.seed)
    generator = torch.Generator().manual_seed(recipe.seed)
    pipeline = build_pipeline(family, seed=recipe.seed, sample_size=recipe.world.image_size)
    winners, losers, captions = _winners_and_losers(Path(train_parquet))
    started = time.perf_counter()
    log(f"{name}: fitting the VAE ({recipe.vae_steps} steps)")
    fit_vae(pipeline.vae, torch.cat([winners, losers]), recipe, generator, log)
    backbone = make_backbone(pipeline)
    log(f"{name}: pretraining the {denoiser} on winners ({recipe.unet_steps} steps)")
    pretrain_unet(backbone, winners, captions, recipe, generator, log)
    with staged_folder(folder) as staging:
        pipeline.save_pretrained(staging)
        (staging / "toy_base.json").write_text(json.dumps({"fingerprint": recipe.fingerprint(), **record}))
    log(f"{name}: built in {time.perf_counter() - started:.0f} s -> {folder}")
    return folder


def ensure_toy_world_and_base(cache_root: str | Path, recipe: ToyBaseRecipe = ToyBaseRecipe(), n_heldout: int = 300, log=print):
    """Toy data and toy base under ``cache_root``, built on first use and reused after."""
    cache_root = Path(cache_root)
    cache_root.mkdir(parents=True, exist_ok=True)
    # Two processes sharing a cache (parallel test workers, two quickstarts) build it once: the second waits.
    with FileLock(cache_root / ".toy-base.lock"):
        return _ensure_toy_world_and_base(cache_root, recipe, n_heldout, log)


def ensure_toy_world(cache_root: Path, recipe: ToyBaseRecipe, n_heldout: int = 300):
    """The toy world of ``recipe`` (train and held-out pairs) under ``cache_root``, written on first use."""
    folder = cache_root / f"toy-world-{recipe.world.fingerprint()}"
    return write_toy_world(folder, recipe.world, n_train=recipe.n_train, n_heldout=n_heldout, train_seed=recipe.seed, heldout_seed=recipe.seed + 1)


def _ensure_toy_world_and_base(cache_root: Path, recipe: ToyBaseRecipe, n_heldout: int, log):
    world = ensure_toy_world(cache_root, recipe, n_heldout)
    base = cache_root / f"toy-base-{recipe.fingerprint()}"
    if not (base / "toy_base.json").is_file():
        shipped = shipped_toy_base(recipe)
        if shipped is None:
            build_toy_base(base, recipe, world.train, log)
        else:
            with staged_folder(base) as staging:
                shutil.copytree(shipped, staging, dirs_exist_ok=True)
            log(f"toy base: the copy shipped with diffalign, built from this recipe by `python -m diffalign.toy.shipped` -> {base}")
    return world, base


def shipped_toy_base(recipe: ToyBaseRecipe) -> Path | None:
    """The toy base shipped inside the package, if it was built from ``recipe``, else None.

    Why ship it: building takes ~3 minutes on 2 cores, most of the quickstart's first run. The shipped
    folder records the recipe's fingerprint, so a changed recipe is built, never served stale weights.
    """
    marker = SHIPPED_TOY_BASE / "toy_base.json"
    if not marker.is_file():
        return None
    return SHIPPED_TOY_BASE if json.loads(marker.read_text()).get("fingerprint") == recipe.fingerprint() else None


def ensure_toy_turbo(cache_root: str | Path, recipe: ToyBaseRecipe = ToyBaseRecipe(), steps: int = 300, log=print) -> Path:
    """PSO's few-step setting in the toy world: the toy base specialised to the distilled timesteps.

    A toy stand-in for SDXL-Turbo: the toy base's UNet trained ``steps`` more on the winners at
    t in {249, 499, 749, 999} only (``timestep_mode="distilled"``), so it samples in 4 steps
    and trains on those timesteps alone. Built once under ``cache_root`` and reused.
    """
    world, base = ensure_toy_world_and_base(cache_root, recipe, log=log)
    with FileLock(Path(cache_root) / ".toy-turbo.lock"):
        return _ensure_toy_turbo(Path(cache_root), recipe, steps, world, base, log)


def toy_turbo_folder_name(recipe: ToyBaseRecipe = ToyBaseRecipe(), steps: int = 300) -> str:
    """The cache folder of ``recipe``'s toy turbo: named by what it is built from, so a changed recipe builds anew."""
    return f"toy-turbo-{hashlib.sha256(f'{recipe.fingerprint()}:turbo:{steps}'.encode()).hexdigest()[:12]}"


def _ensure_toy_turbo(cache_root: Path, recipe: ToyBaseRecipe, steps: int, world, base: Path, log) -> Path:
    from diffusers import StableDiffusionPipeline

    folder = Path(cache_root) / toy_turbo_folder_name(recipe, steps)
    digest = folder.name.removeprefix("toy-turbo-")
    if (folder / "toy_base.json").is_file():
        return folder
    started = time.perf_counter()
    generator = torch.Generator().manual_seed(recipe.seed + 1)
    pipeline = StableDiffusionPipeline.from_pretrained(base, safety_checker=None, requires_safety_checker=False)
    noise = DDPMProcess.from_scheduler_config(dict(pipeline.scheduler.config), timestep_mode="distilled")
    backbone = StableDiffusionBackbone(pipeline.unet, noise, pipeline.tokenizer, pipeline.text_encoder, pipeline.vae)
    winners, _, captions = _winners_and_losers(world.train)
    log(f"toy turbo: training the toy base on the distilled timesteps ({steps} steps)")
    pretrain_unet(backbone, winners, captions, dataclasses.replace(recipe, unet_steps=steps), generator, log)
    with staged_folder(folder) as staging:
        pipeline.save_pretrained(staging)
        (staging / "toy_base.json").write_text(json.dumps({"fingerprint": digest, "timestep_mode": "distilled", "base": str(base)}))
    log(f"toy turbo: built in {time.perf_counter() - started:.0f} s -> {folder}")
    return folder


@dataclass(frozen=True)
class FlowToyBaseRecipe(ToyBaseRecipe):
    """The toy world on a tiny SD3-shaped (rectified-flow) pipeline: nothing else shows a method learning on flow.

    Same toy world, VAE fit and pretraining loop as the SD toy base, with the flow objective of the
    pipeline's FlowMatch scheduler (shift 3, logit-normal timesteps). Without T5, SD3's prompt is the
    77 CLIP tokens plus ``max_sequence_length`` zero tokens in T5's place; the toy keeps 8 of those
    (every recipe trained on this base sets ``model.max_sequence_length`` to the same value).
    """

    max_sequence_length: int = 8

    def fingerprint(self) -> str:
        payload = {"version": BASE_VERSION, "kind": "flow-sd3", **dataclasses.asdict(self), "world": self.world.fingerprint()}
        return fingerprint(payload, 12)


def build_flow_toy_base(folder: str | Path, recipe: FlowToyBaseRecipe, train_parquet: str | Path, log=print) -> Path:
    """Fit the tiny SD3 VAE, pretrain its transformer with the flow objective, save atomically."""

    def backbone(pipeline):
        noise = RectifiedFlowProcess.from_scheduler_config(dict(pipeline.scheduler.config))  # logit-normal t, as the SD3 recipes
        return StableDiffusion3Backbone(
            pipeline.transformer,
            noise,
            [pipeline.tokenizer, pipeline.tokenizer_2],
            [pipeline.text_encoder, pipeline.text_encoder_2],
            vae=pipeline.vae,
            max_sequence_length=recipe.max_sequence_length,
        )

    record = {"max_sequence_length": recipe.max_sequence_length}
    return _build_base(folder, recipe, train_parquet, "sd3", backbone, "flow toy base", "transformer", record, log)


def flow_toy_base_folder_name(recipe: "FlowToyBaseRecipe") -> str:
    """The cache folder of ``recipe``'s flow toy base (named by its fingerprint)."""
    return f"toy-flow-base-{recipe.fingerprint()}"


def ensure_flow_toy_base(cache_root: str | Path, recipe: FlowToyBaseRecipe = FlowToyBaseRecipe(), n_heldout: int = 300, log=print):
    """The toy world (shared with the SD toy base) and the flow toy base under ``cache_root``, built once."""
    cache_root = Path(cache_root)
    cache_root.mkdir(parents=True, exist_ok=True)
    with FileLock(cache_root / ".toy-base.lock"):  # the world's writer, as for the SD base
        world = ensure_toy_world(cache_root, recipe, n_heldout)
    with FileLock(cache_root / ".toy-flow-base.lock"):
        base = Path(cache_root) / flow_toy_base_folder_name(recipe)
        if not (base / "toy_base.json").is_file():
            build_flow_toy_base(base, recipe, world.train, log)
    return world, base
