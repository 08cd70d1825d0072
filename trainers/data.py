"""Training data for the loop: raw preference rows, or a matching cache of encoded groups."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Callable

from diffalign.backbones import Backbone
from diffalign.cache import CachedGroupsDataset, check_cache, collate_cached
from diffalign.config import ConfigError
from diffalign.data import EpochBatchSampler, GroupTransform, PreferenceDataset, SkipReport, collate_groups, derive_seed, open_source
from diffalign.data.captioned import rows_with_captions
from diffalign.data.prompts import PromptDataset, PromptSource, collate_prompts

from .config import TrainConfig
from .objectives import DataLayout


class KeyedDataset:
    """Adds each item's noise seed, a pure function of (seed, epoch, index).

    Drawing a group's noise, timestep and prompt dropout from its own seed makes
    a step independent of how groups are split into micro-batches and processes:
    1 x 8 accumulation equals 8 x 1, and N processes equal one.
    """

    def __init__(self, dataset: Any, seed: int) -> None:
        self.dataset = dataset
        self.seed = seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> dict:
        item = self.dataset[key]
        item["noise_seed"] = derive_seed("noise", self.seed, *key)
        return item


def with_noise_seeds(collate: Callable[[list[dict]], dict]) -> Callable[[list[dict]], dict]:
    """Wrap a collate function so the batch carries the usable items' noise seeds, in batch order."""

    def collate_with_seeds(items: list[dict]) -> dict:
        batch = collate(items)
        batch["noise_seeds"] = [item["noise_seed"] for item in items if "bad" not in item]
        return batch

    return collate_with_seeds


@dataclass
class TrainingData:
    """A dataset addressed by (epoch, index), its collate function and the report of skipped rows."""

    dataset: Any
    collate: Callable[[list[dict]], dict]
    report: SkipReport
    source_name: str

    def batch_sampler(self, batch_size: int, seed: int, start_batch: int) -> EpochBatchSampler:
        return EpochBatchSampler(len(self.dataset), batch_size, seed, shuffle=True, drop_last=True, start_batch=start_batch)

    def usable(self, batch: dict) -> bool:
        """Record rows that failed to decode; False when none of the batch is left."""
        self.report.record_all(self.source_name, batch.get("skipped", []))
        return bool(batch["row_ids"])


def build_training_data(config: TrainConfig, backbone: Backbone, layout: DataLayout = "pairs", accelerator: Any = None) -> TrainingData:
    """Open the configured data grouped as the method declared at registration (``layout``).

    Prompts only for online methods; offline PSO's pairs of each training image with a sample of
    the initial model; pairs or ranked lists otherwise, with a caption per image when the method
    needs them. With ``data.cache_dir`` the cache must match the model and the data.
    """
    report = SkipReport()
    if layout == "prompts":
        if config.data.cache_dir is not None:
            raise ConfigError("data.cache_dir: online methods sample their own images; there is nothing to cache")
        prompts = PromptSource(config.data.path, report, config.data.max_rows)
        return TrainingData(KeyedDataset(PromptDataset(prompts), config.train.seed), with_noise_seeds(collate_prompts), report, prompts.name)
    if layout == "sampled_reference_pairs":
        from .pso.references import ensure_reference_pairs

        pairs = ensure_reference_pairs(config, backbone, accelerator)
        config = config.model_copy(update={"data": config.data.model_copy(update={"path": str(pairs), "format": "jsonl"})})
    captioned = layout == "captioned_pairs"
    if config.data.cache_dir is not None:
        manifest = check_cache(config.data.cache_dir, config.model, config.data, require_captions=captioned)
        dataset = CachedGroupsDataset(config.data.cache_dir, manifest)
        report.merge(manifest["skipped"])  # rows the cache builder skipped stay in this run's summary
        collate = functools.partial(collate_cached, empty_text=dataset.text(0))
        return TrainingData(KeyedDataset(dataset, config.train.seed), with_noise_seeds(collate), report, config.data.cache_dir)
    source = open_source(config.data, report)
    if captioned:
        source = rows_with_captions(source, report, config.method.name)  # type: ignore[attr-defined]
    transform = GroupTransform(
        config.data.resolution, config.data.center_crop, config.data.random_flip, config.data.sdxl_size_conditioning
    )
    dataset = PreferenceDataset(source, transform, config.train.seed)
    return TrainingData(KeyedDataset(dataset, config.train.seed), with_noise_seeds(collate_groups), report, source.name)
