"""Torch dataset, collate function and resumable batch sampler for preference groups.

Why ``(epoch, index)`` keys: augmentation randomness (crop, flip) is drawn from
a generator seeded by a hash of (seed, epoch, index), and the shuffle order of
epoch ``e`` by a hash of (seed, e). Both are pure functions, so a resumed run
-- with any number of DataLoader workers -- sees exactly the batches and the
pixels the uninterrupted run would have seen.

Why bad rows travel in the batch: images are decoded in worker processes,
whose SkipReport copies are never merged back. :func:`collate_groups`
therefore returns failed rows under ``batch["skipped"]`` and the training
loop records them in the main process (``report.record_all(name, batch["skipped"])``).
"""

from __future__ import annotations

import hashlib
import operator
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import Dataset

from diffalign.data.images import check_image_sizes
from diffalign.data.sources import PreferenceSource
from diffalign.data.transforms import GroupTransform
from diffalign.data.types import BadRowError, PreferenceGroup

__all__ = ["PreferenceDataset", "collate_groups", "EpochBatchSampler", "derive_seed", "load_group"]

Key = tuple[int, int]


def derive_seed(*parts: int | str) -> int:
    """A 63-bit seed that is a pure function of ``parts`` (stable across processes and runs)."""
    digest = hashlib.blake2b(":".join(str(p) for p in parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def load_group(source: PreferenceSource, index: int, min_side: int | None = None) -> PreferenceGroup:
    """Row ``index`` decoded and checked as training uses it; BadRowError for a bad row.

    The one place a row is judged after decoding, so ``data check``, a ``data.validate=full``
    run and the lazy path skip exactly the same rows for the same reasons.
    """
    group = source.load(index, min_side)
    check_image_sizes(group.images, row_id=group.row_id, source=source.name)
    return group


class PreferenceDataset(Dataset[dict[str, Any]]):
    """Map-style dataset of transformed preference groups, addressed by ``(epoch, index)``.

    ``__getitem__((epoch, index))`` returns::

        {"row_id": str, "prompt": str, "captions": list[str] | None,
         "pixel_values": [K, 3, R, R] float32, "original_sizes": [K, 2] int64,
         "crop_top_lefts": [K, 2] int64, "scores": [K] float32 | None}

    or ``{"row_id": str, "bad": reason}`` when the row's images fail to decode.
    Use with :class:`EpochBatchSampler` (``DataLoader(batch_sampler=...)``).

    ``jpeg_draft``: decode JPEGs at the smallest 1/2, 1/4 or 1/8 scale that still covers the transform's
    resolution (``data.jpeg_draft``); the pixels then come from libjpeg's DCT scaling instead of a full
    decode and a longer resize, while sizes and crops stay those of the full image.
    """

    def __init__(self, source: PreferenceSource, transform: GroupTransform, seed: int, jpeg_draft: bool = False) -> None:
        self.source = source
        self.transform = transform
        self.seed = seed
        self.decode_min_side = transform.resolution if jpeg_draft else None

    def __len__(self) -> int:
        return len(self.source)

    def generator_for(self, epoch: int, index: int) -> torch.Generator:
        """The augmentation generator of item ``(epoch, index)``."""
        return torch.Generator().manual_seed(derive_seed("augment", self.seed, epoch, index))

    def __getitem__(self, key: Key) -> dict[str, Any]:
        try:
            epoch, index = (operator.index(k) for k in key)
        except (TypeError, ValueError):
            raise TypeError(
                f"PreferenceDataset items are addressed by (epoch, index) tuples, got {key!r}; "
                "use EpochBatchSampler as the DataLoader's batch_sampler"
            ) from None
        try:
            group = load_group(self.source, index, self.decode_min_side)
        except BadRowError as err:
            return {"row_id": err.row_id, "bad": err.reason}
        px = self.transform(group.images, self.generator_for(epoch, index))
        return {
            "row_id": group.row_id,
            "prompt": group.prompt,
            "captions": group.captions,
            "pixel_values": px.pixel_values,
            "original_sizes": px.original_sizes,
            "crop_top_lefts": px.crop_top_lefts,
            "scores": torch.tensor(group.scores, dtype=torch.float32) if group.scores is not None else None,
        }


def collate_groups(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack good items into a batch; return bad ones under ``"skipped"``.

    Returns a dict with ``row_ids: list[str]``, ``prompts: list[str]``,
    ``captions: list[list[str]] | None``, ``skipped: list[(row_id, reason)]``
    and, when at least one item is good, ``pixel_values [B, K, 3, H, W]``,
    ``original_sizes [B, K, 2]``, ``crop_top_lefts [B, K, 2]`` and
    ``scores [B, K] | None``. If every item was bad the tensor keys are
    omitted and ``row_ids`` is empty: the loop records ``skipped`` and skips
    the step. (Never ``None``, so the skipped rows always reach the caller.)
    """
    skipped = [(str(it["row_id"]), str(it["bad"])) for it in items if "bad" in it]
    good = [it for it in items if "bad" not in it]
    batch: dict[str, Any] = {
        "row_ids": [it["row_id"] for it in good],
        "prompts": [it["prompt"] for it in good],
        "captions": None,
        "skipped": skipped,
    }
    if not good:
        return batch
    ks = {int(it["pixel_values"].shape[0]) for it in good}
    if len(ks) != 1:
        raise ValueError(f"collate_groups: groups of different sizes {sorted(ks)} in one batch ({batch['row_ids']})")
    with_captions = [it["captions"] is not None for it in good]
    if any(with_captions) != all(with_captions):
        raise ValueError("collate_groups: some items have per-image captions and some do not")
    if all(with_captions):
        batch["captions"] = [list(it["captions"]) for it in good]
    with_scores = [it["scores"] is not None for it in good]
    if any(with_scores) != all(with_scores):
        raise ValueError("collate_groups: some items have scores and some do not")
    batch["pixel_values"] = torch.stack([it["pixel_values"] for it in good])
    batch["original_sizes"] = torch.stack([it["original_sizes"] for it in good])
    batch["crop_top_lefts"] = torch.stack([it["crop_top_lefts"] for it in good])
    batch["scores"] = torch.stack([it["scores"] for it in good]) if all(with_scores) else None
    return batch


class EpochBatchSampler:
    """Batches of ``(epoch, index)`` keys; epoch ``e``'s order is a pure function of ``(seed, e)``.

    Iterates epochs ``0, 1, ...`` forever (``num_epochs=None``) or for
    ``num_epochs`` epochs; a trailing partial batch of an epoch is dropped
    (``drop_last``) or yielded short, never mixed with the next epoch.
    ``start_batch`` skips that many batches counted from the very beginning
    (across epochs) by arithmetic, so resuming at step ``s`` with
    ``start_batch=s`` continues the exact sequence. ``len()`` is batches per epoch.
    """

    def __init__(
        self,
        num_rows: int,
        batch_size: int,
        seed: int,
        shuffle: bool = True,
        drop_last: bool = True,
        start_batch: int = 0,
        num_epochs: int | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"EpochBatchSampler: batch_size must be >= 1, got {batch_size}")
        if start_batch < 0:
            raise ValueError(f"EpochBatchSampler: start_batch must be >= 0, got {start_batch}")
        if num_epochs is not None and num_epochs < 0:
            raise ValueError(f"EpochBatchSampler: num_epochs must be >= 0 or None, got {num_epochs}")
        self.num_rows = num_rows
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.start_batch = start_batch
        self.num_epochs = num_epochs
        if len(self) == 0:
            raise ValueError(
                f"EpochBatchSampler: {num_rows} rows with batch_size={batch_size} and "
                f"drop_last={drop_last} give no batches per epoch"
            )

    def __len__(self) -> int:
        if self.drop_last:
            return self.num_rows // self.batch_size
        return -(-self.num_rows // self.batch_size)

    def permutation(self, epoch: int) -> list[int]:
        """Row order of ``epoch``."""
        if not self.shuffle:
            return list(range(self.num_rows))
        g = torch.Generator().manual_seed(derive_seed("shuffle", self.seed, epoch))
        return torch.randperm(self.num_rows, generator=g).tolist()

    def __iter__(self) -> Iterator[list[Key]]:
        per_epoch = len(self)
        epoch, offset = divmod(self.start_batch, per_epoch)
        while self.num_epochs is None or epoch < self.num_epochs:
            order = self.permutation(epoch)
            for b in range(offset, per_epoch):
                chunk = order[b * self.batch_size : (b + 1) * self.batch_size]
                yield [(epoch, i) for i in chunk]
            epoch, offset = epoch + 1, 0
