"""Preference data: readers, image decoding, group transforms, dataset and sampler.

Typical use::

    report = SkipReport()
    source = open_preference_source("pickapic_v2/", split="train", report=report)
    dataset = PreferenceDataset(source, GroupTransform(512, random_flip=True), seed=0)
    loader = DataLoader(dataset, batch_sampler=EpochBatchSampler(len(dataset), 8, seed=0),
                        collate_fn=collate_groups, num_workers=4)
    for batch in loader:
        report.record_all(source.name, batch["skipped"])
        ...
    print(report.summary())
"""

from diffalign.data.check import SelectedRows, check_rows, require_rows
from diffalign.data.dataset import (
    EpochBatchSampler,
    PreferenceDataset,
    collate_groups,
    derive_seed,
    load_group,
)
from diffalign.data.images import decode_image, to_rgb
from diffalign.data.jsonl import JsonlSource
from diffalign.data.parquet import select_split_files
from diffalign.data.pickapic import PickapicSource
from diffalign.data.ranked import RankedSource
from diffalign.data.report import SkippedRow, SkipReport
from diffalign.data.sources import PreferenceSource, open_preference_source, open_source
from diffalign.data.transforms import GroupPixels, GroupTransform
from diffalign.data.types import BadRowError, NoUsableRowsError, PreferenceGroup

__all__ = [
    "BadRowError",
    "EpochBatchSampler",
    "GroupPixels",
    "GroupTransform",
    "JsonlSource",
    "NoUsableRowsError",
    "PickapicSource",
    "PreferenceDataset",
    "PreferenceGroup",
    "PreferenceSource",
    "RankedSource",
    "SelectedRows",
    "SkipReport",
    "SkippedRow",
    "check_rows",
    "collate_groups",
    "decode_image",
    "derive_seed",
    "load_group",
    "open_preference_source",
    "open_source",
    "require_rows",
    "select_split_files",
    "to_rgb",
]
