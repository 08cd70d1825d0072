"""Training data for the loop: raw preference rows, or a matching cache of encoded groups.

Bad rows are counted once per run, by id (:class:`~diffalign.data.SkipReport`). ``data.validate``
says when images are judged: ``full`` decodes every row before the first step (exactly the rows
``diffalign data check`` reports are skipped, all of them); ``lazy`` (default) starts at once and
finds a bad image when a batch first draws it, so a short run reports only the rows it drew --
the summary says how many rows were decoded. Under DDP, ``full`` decodes every row in every process
(each then knows every bad row; the main process writes them all), while ``lazy`` records in each
process the rows that process drew, and only the main process's rows reach ``skipped_rows.json``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from diffalign.backbones import Backbone
from diffalign.cache import CachedGroupsDataset, check_cache, collate_cached
from diffalign.config import ConfigError
from diffalign.data import (
    EpochBatchSampler,
    GroupTransform,
    PreferenceDataset,
    SelectedRows,
    SkipReport,
    check_rows,
    collate_groups,
    derive_seed,
    open_source,
    require_rows,
)
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
        item["index"] = key[1]
        return item


def with_noise_seeds(collate: Callable[[list[dict]], dict]) -> Callable[[list[dict]], dict]:
    """Wrap a collate function so the batch carries the usable items' noise seeds, in batch order."""

    def collate_with_seeds(items: list[dict]) -> dict:
        batch = collate(items)
        batch["noise_seeds"] = [item["noise_seed"] for item in items if "bad" not in item]
        batch["drawn"] = [item["index"] for item in items]  # good and bad: which rows this batch decoded
        return batch

    return collate_with_seeds


@dataclass
class TrainingData:
    """A dataset addressed by (epoch, index), its collate function and the report of skipped rows."""

    dataset: Any
    collate: Callable[[list[dict]], dict]
    report: SkipReport
    source_name: str
    lazy: bool = False  # images judged as batches draw them (data.validate=lazy): track which rows were decoded
    _drawn: np.ndarray = field(init=False, repr=False)
    _bad: int = field(default=0, init=False, repr=False)

    def __post_init__(self) -> None:
        self._drawn = np.zeros(len(self.dataset) if self.lazy else 0, dtype=bool)

    def batch_sampler(self, batch_size: int, seed: int, start_batch: int) -> EpochBatchSampler:
        return EpochBatchSampler(len(self.dataset), batch_size, seed, shuffle=True, drop_last=True, start_batch=start_batch)

    def usable(self, batch: dict) -> bool:
        """Record rows that failed to decode (each once per run); False when none of the batch is left.

        Raises NoUsableRowsError once every row of the data has failed: the loop would draw empty batches forever.
        """
        for row_id, reason in batch.get("skipped", []):
            self._bad += self.report.record(self.source_name, row_id, reason)
        if self.lazy:
            self._drawn[batch["drawn"]] = True
            self.report.images_checked = (
                f"lazy (data.validate=lazy): {int(self._drawn.sum())} of {self._drawn.size} rows decoded, "
                f"{self._bad} of them bad; rows never drawn were not checked (`diffalign data check` or data.validate=full counts them all)"
            )
        if self._bad >= len(self.dataset):
            require_rows(0, self.report, self.source_name)
        return bool(batch["row_ids"])


def build_training_data(config: TrainConfig, backbone: Backbone, layout: DataLayout = "pairs", accelerator: Any = None) -> TrainingData:
    """Open the configured data grouped as the method declared at registration (``layout``).

    Prompts only for online methods; offline PSO's pairs of each training image with a sample of
    the initial model; pairs or ranked lists otherwise, with a caption per image when the method
    needs them. With ``data.cache_dir`` the cache must match the model and the data.
    """
    report = SkipReport()
    main_process = accelerator is None or accelerator.is_main_process
    if layout == "prompts":
        if config.data.cache_dir is not None:
            raise ConfigError("data.cache_dir: online methods sample their own images; there is nothing to cache")
        prompts = PromptSource(config.data.path, report, config.data.max_rows)
        require_rows(len(prompts), report, prompts.name)
        _say(main_process, f"data.validate={config.data.validation} does not apply: an online method reads prompts only")
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
        report.images_checked = "from the cache: its builder decoded every row once (the rows it skipped are listed)"
        require_rows(len(dataset), report, config.data.cache_dir)
        _say(main_process, f"data.validate={config.data.validation}: nothing to decode, {report.images_checked}")
        collate = functools.partial(collate_cached, empty_text=dataset.text(0))
        return TrainingData(KeyedDataset(dataset, config.train.seed), with_noise_seeds(collate), report, config.data.cache_dir)
    source = open_source(config.data, report)
    if captioned:
        source = rows_with_captions(source, report, config.method.name)  # type: ignore[attr-defined]
    transform = GroupTransform(
        config.data.resolution, config.data.center_crop, config.data.random_flip, config.data.sdxl_size_conditioning
    )
    lazy = config.data.validation == "lazy"
    if lazy:
        require_rows(len(source), report, source.name)
        _say(main_process, "data.validate=lazy: images are decoded as batches draw them and a bad one is reported when first "
             "drawn; `diffalign data check PATH` or data.validate=full finds every bad row before training")
    else:
        _say(main_process, f"data.validate=full: decoding all {len(source)} rows of {source.name} before training")
        good = check_rows(source, report, workers=config.data.loader_workers(reads_cache=False), progress=main_process)
        require_rows(len(good), report, source.name)
        _say(main_process, f"data.validate=full: {len(good)} of {len(source)} rows are usable; training on those only")
        source = source if len(good) == len(source) else SelectedRows(source, good)
    dataset = PreferenceDataset(source, transform, config.train.seed, jpeg_draft=config.data.jpeg_draft)
    return TrainingData(KeyedDataset(dataset, config.train.seed), with_noise_seeds(collate_groups), report, source.name, lazy=lazy)


def _say(main_process: bool, message: str) -> None:
    if main_process:
        print(f"diffalign: {message}")
