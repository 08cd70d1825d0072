"""Precomputed VAE latents and text embeddings, so training never runs the encoders.

Layout of a cache folder (written under a temporary name, renamed when complete)::

    manifest.json            format marker, key (model, resolution, crop, data fingerprint), sizes, skipped rows
    groups-00000.safetensors latents [n, K, C, h, w], prompt_index [n, K], geometry.* [n, K, ...], scores [n, K] (when the data has label scores)
    texts-00000.safetensors  text.* [m, ...] for each unique prompt/caption; entry 0 is ''

Text embeddings are stored once per unique text (Pick-a-Pic: ~59k prompts for
~850k pairs). Latents are the VAE posterior mean of the centre/fixed crop,
unflipped; a cache therefore refuses ``data.random_flip=true``. A cache whose
key differs from the training config's (another model, resolution, crop or
data) is refused with a message that says what changed.

A rebuild replaces the folder, so it replaces only a folder that is provably a
diffalign cache: its manifest carries the format marker (``"format":
"diffalign-cache"`` and an integer ``format_version``) and the folder holds
nothing the manifest does not list. Any other folder (a photo album with its
own ``manifest.json``, a cache someone added files to) is refused, untouched.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.data import DataLoader, Dataset

from diffalign.backbones import Backbone
from diffalign.config import ConfigError, DataConfig, ModelConfig
from diffalign.data import (
    EpochBatchSampler,
    GroupTransform,
    PreferenceDataset,
    SkipReport,
    collate_groups,
    open_source,
)
from diffalign.data.captioned import rows_with_captions
from diffalign.data.dataset import Key
from diffalign.fingerprint import fingerprint
from diffalign.atomic import staged_folder

CACHE_VERSION = 2  # 2: the manifest's "skipped" lists every skipped row id (SkipReport.to_dict()["rows"])
CACHE_FORMAT = "diffalign-cache"  # with format_version = CACHE_VERSION: the marker that makes a folder ours to replace
MANIFEST = "manifest.json"
ENCODER_FOLDERS = ("vae", "text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer", "tokenizer_2", "tokenizer_3")


class StaleCacheError(ConfigError):
    """The cache was built for another model, resolution, crop or data than the config names."""


class NotACacheError(ConfigError):
    """A folder that a cache build would replace is not (only) a diffalign cache: it is never touched."""


def require_replaceable_cache(cache_dir: str | Path) -> None:
    """Raise NotACacheError unless ``cache_dir`` is absent, an empty folder, or a diffalign cache and nothing else.

    Why so strict: replacing a folder deletes everything in it, and a ``manifest.json`` alone proves
    nothing (photo albums and datasets have them). Only our marker, and only files our manifest lists.
    """
    cache_dir = Path(cache_dir)
    if not cache_dir.exists() and not cache_dir.is_symlink():
        return
    refuse = f"data.cache_dir={cache_dir} exists and is not a diffalign cache"
    advice = "choose another (new or empty) folder; diffalign never replaces a folder it did not make"
    if cache_dir.is_symlink() or not cache_dir.is_dir():
        raise NotACacheError(f"{refuse} (it is not a plain folder); {advice}")
    entries = {entry.name for entry in cache_dir.iterdir()}
    if not entries:
        return
    try:
        manifest = json.loads((cache_dir / MANIFEST).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        raise NotACacheError(f"{refuse} (no readable {MANIFEST}); {advice}") from None
    if not (isinstance(manifest, dict) and manifest.get("format") == CACHE_FORMAT and type(manifest.get("format_version")) is int):
        raise NotACacheError(
            f"{refuse}: its {MANIFEST} lacks diffalign's marker (format={CACHE_FORMAT!r} and format_version; a cache "
            f"built before the marker existed must be deleted by hand to be rebuilt there); {advice}"
        )
    ours = {MANIFEST, *manifest.get("group_shards", []), *manifest.get("text_shards", [])}
    foreign = sorted(entries - ours)
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise NotACacheError(
            f"data.cache_dir={cache_dir} is a diffalign cache but also holds files it did not write ({shown}); {advice}"
        )


def model_fingerprint(model: ModelConfig) -> str:
    """Identity of the encoders: configs and weight files of a local folder, or hub id + revision."""
    root = Path(model.path)
    payload: dict[str, Any] = {"path": model.path, "revision": model.revision, "variant": model.variant}
    payload["t5"] = model.use_t5, model.max_sequence_length
    if root.is_dir():
        for folder in ENCODER_FOLDERS:
            for file in sorted((root / folder).glob("*")) if (root / folder).is_dir() else []:
                stat = file.stat()
                payload[f"{folder}/{file.name}"] = (
                    file.read_text() if file.suffix == ".json" else (stat.st_size, stat.st_mtime_ns)
                )
    return fingerprint(payload, 16)


def cache_key(model: ModelConfig, data: DataConfig, data_fingerprint: str, require_captions: bool = False) -> dict[str, Any]:
    """Everything a cached tensor depends on (``require_captions``: only rows with per-image captions, DCPO)."""
    key = {
        "version": CACHE_VERSION,
        "model": model.path,
        "model_fingerprint": model_fingerprint(model),
        "resolution": data.resolution,
        "center_crop": data.center_crop,
        "data_fingerprint": data_fingerprint,
        "max_rows": data.max_rows,
        "drop_ties": data.drop_ties,
    }
    if data.sdxl_size_conditioning != "per_image":  # caches built before this option recorded each image's own size
        key["sdxl_size_conditioning"] = data.sdxl_size_conditioning
    if data.jpeg_draft:  # absent when off, so caches built before this option (full decodes) stay valid for it
        key["jpeg_draft"] = True
    if require_captions:  # absent otherwise, so caches built before this option stay valid
        key["captioned_rows_only"] = True
    return key


def build_cache(
    backbone: Backbone,
    model: ModelConfig,
    data: DataConfig,
    cache_dir: str | Path,
    batch_size: int = 16,
    shard_size: int = 1024,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    require_captions: str | None = None,
) -> Path:
    """Encode every usable row once and write the cache atomically; returns the cache folder."""
    from tqdm.auto import tqdm

    cache_dir = Path(cache_dir)
    require_replaceable_cache(cache_dir)  # before hours of encoding, and again just before the swap
    report = SkipReport()
    source = open_source(data, report)
    if require_captions:  # the method's name: a dual-caption method caches only captioned rows
        source = rows_with_captions(source, report, require_captions)
    key = cache_key(model, data, source.fingerprint(), require_captions=bool(require_captions))
    dataset = PreferenceDataset(source, GroupTransform(data.resolution, data.center_crop, random_flip=False, size_conditioning=data.sdxl_size_conditioning), seed,
                                jpeg_draft=data.jpeg_draft)
    sampler = EpochBatchSampler(len(source), batch_size, seed, shuffle=False, drop_last=False, num_epochs=1)
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_groups, num_workers=data.loader_workers(reads_cache=False))
    with staged_folder(cache_dir, before_replace=require_replaceable_cache) as staging:
        texts: dict[str, int] = {"": 0}
        pending_texts: list[str] = [""]
        text_shards: list[str] = []
        group_shards: list[str] = []
        rows: list[str] = []
        buffer: dict[str, list[torch.Tensor]] = {}
        group_size = None

        def flush_groups() -> None:
            if buffer:
                name = f"groups-{len(group_shards):05d}.safetensors"
                save_file({k: torch.cat(v).contiguous() for k, v in buffer.items()}, str(staging / name))
                group_shards.append(name)
                buffer.clear()

        def flush_texts(force: bool = False) -> None:
            while pending_texts and (force or len(pending_texts) >= shard_size):
                chunk, pending_texts[:] = pending_texts[:shard_size], pending_texts[shard_size:]
                encoded = {}
                for start in range(0, len(chunk), batch_size):
                    part = backbone.encode_prompts(chunk[start : start + batch_size])
                    for name, value in part.items():
                        encoded.setdefault(f"text.{name}", []).append(value.to("cpu", dtype))
                name = f"texts-{len(text_shards):05d}.safetensors"
                save_file({k: torch.cat(v).contiguous() for k, v in encoded.items()}, str(staging / name))
                text_shards.append(name)

        for batch in tqdm(loader, desc="cache", total=len(sampler)):
            report.record_all(source.name, batch["skipped"])
            if not batch["row_ids"]:
                continue
            pixels = batch["pixel_values"]
            g, k = pixels.shape[:2]
            group_size = k
            latents = backbone.encode_images(pixels.flatten(0, 1)).to("cpu", dtype)
            per_image = batch["captions"] or [[prompt] * k for prompt in batch["prompts"]]
            index = []
            for group in per_image:
                for text in group:
                    if text not in texts:
                        texts[text] = len(texts)
                        pending_texts.append(text)
                    index.append(texts[text])
            geometry = backbone.geometry_conditioning(
                batch["original_sizes"].flatten(0, 1), batch["crop_top_lefts"].flatten(0, 1), data.resolution
            )
            buffer.setdefault("latents", []).append(latents.reshape(g, k, *latents.shape[1:]))
            buffer.setdefault("prompt_index", []).append(torch.tensor(index).reshape(g, k))
            if batch["scores"] is not None:  # label scores (ranked lists, Pick-a-Pic labels), best first
                buffer.setdefault("scores", []).append(batch["scores"].float())
            for name, value in geometry.items():
                buffer.setdefault(f"geometry.{name}", []).append(value.reshape(g, k, *value.shape[1:]))
            rows.extend(batch["row_ids"])
            if sum(len(v) for v in buffer["latents"]) >= shard_size:
                flush_groups()
            flush_texts()
        flush_groups()
        flush_texts(force=True)
        if not rows:
            raise ValueError(f"no usable rows in {data.path}: {report.summary()}")
        manifest = {
            "format": CACHE_FORMAT,
            "format_version": CACHE_VERSION,
            "key": key,
            "family": backbone.family,
            "num_groups": len(rows),
            "group_size": group_size,
            "dtype": str(dtype).removeprefix("torch."),
            "group_shards": group_shards,
            "text_shards": text_shards,
            "shard_size": shard_size,
            "num_texts": len(texts),
            "rows": rows,
            "skipped": report.to_dict(),
        }
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=1))
    print(report.summary())
    return cache_dir


def check_cache(cache_dir: str | Path, model: ModelConfig, data: DataConfig, require_captions: bool = False) -> dict[str, Any]:
    """The manifest of a cache that matches this config; StaleCacheError says what differs."""
    cache_dir = Path(cache_dir)
    manifest_file = cache_dir / MANIFEST
    if not manifest_file.is_file():
        raise FileNotFoundError(
            f"data.cache_dir={cache_dir} holds no cache ({MANIFEST} missing); build it with `diffalign cache CONFIG`"
        )
    if data.random_flip:
        raise StaleCacheError(
            f"data.cache_dir={cache_dir}: cached latents are unflipped; set data.random_flip=false to train from a cache"
        )
    manifest = json.loads(manifest_file.read_text())
    expected = cache_key(model, data, open_source(data, SkipReport()).fingerprint(), require_captions)
    cached = manifest.get("key", {})
    changed = [f"{name} (cache: {cached.get(name)!r}, config: {value!r})" for name, value in expected.items() if cached.get(name) != value]
    if changed:
        raise StaleCacheError(
            f"cache {cache_dir} is stale: " + "; ".join(changed) + ". Rebuild it with `diffalign cache CONFIG`."
        )
    return manifest


class CachedGroupsDataset(Dataset):
    """Encoded groups read lazily from the cache's shards, addressed by (epoch, index) like PreferenceDataset."""

    def __init__(self, cache_dir: str | Path, manifest: dict[str, Any]) -> None:
        self.cache_dir = Path(cache_dir)
        self.manifest = manifest
        self.shard_size = int(manifest["shard_size"])
        self._handles: dict[str, Any] = {}

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_handles": {}}  # file handles do not cross into worker processes

    def __len__(self) -> int:
        return int(self.manifest["num_groups"])

    def _handle(self, name: str):
        if name not in self._handles:
            self._handles[name] = safe_open(str(self.cache_dir / name), framework="pt")
        return self._handles[name]

    def _row(self, kind: str, index: int) -> dict[str, torch.Tensor]:
        shards = self.manifest["group_shards" if kind == "groups" else "text_shards"]
        handle = self._handle(shards[index // self.shard_size])
        offset = index % self.shard_size
        return {name: handle.get_slice(name)[offset : offset + 1][0] for name in handle.keys()}

    def text(self, text_index: int) -> dict[str, torch.Tensor]:
        return {name.removeprefix("text."): value for name, value in self._row("texts", text_index).items()}

    def __getitem__(self, key: Key) -> dict[str, Any]:
        _, index = key
        group = self._row("groups", index)
        texts = [self.text(int(i)) for i in group["prompt_index"].tolist()]
        return {
            "row_id": self.manifest["rows"][index],
            "latents": group["latents"],
            "text": {name: torch.stack([t[name] for t in texts]) for name in texts[0]},
            "geometry": {n.removeprefix("geometry."): v for n, v in group.items() if n.startswith("geometry.")},
            "scores": group.get("scores"),
        }


def collate_cached(items: list[dict[str, Any]], empty_text: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Stack cached items; ``text`` is per image [G, K, ...] and ``empty_text`` [...] serves prompt dropout."""
    return {
        "row_ids": [item["row_id"] for item in items],
        "skipped": [],
        "latents": torch.stack([item["latents"] for item in items]),
        "text": {name: torch.stack([item["text"][name] for item in items]) for name in items[0]["text"]},
        "geometry": {name: torch.stack([item["geometry"][name] for item in items]) for name in items[0]["geometry"]},
        "scores": torch.stack([item["scores"] for item in items]) if items[0].get("scores") is not None else None,
        "empty_text": empty_text,
    }
