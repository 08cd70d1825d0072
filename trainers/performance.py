"""Speed and memory settings of a training process that change no result: allocator, layout, compilation.

Each is a ``train.*`` setting; its default and trade-off come from the peer A/B (benchmarks/README.md).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

import torch
from torch import nn

logger = logging.getLogger("diffalign.train")

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number (malloc.h)


def set_malloc_mmap_threshold(threshold_bytes: int | None) -> bool:
    """Fix glibc's mmap threshold at ``threshold_bytes``; True when it was set.

    Why: by default glibc raises the threshold after the first large free (up to 32 MiB), so later
    activation-sized blocks come from the heap and stay resident after they are freed: the peak RSS
    of a training step grows by ~20 % (benchmarks/README.md, "The bf16 memory gap"). A fixed
    threshold serves every block of that size with its own mapping, returned when freed. Not glibc
    (musl, macOS): nothing to set, False.
    """
    if threshold_bytes is None:
        return False
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        logger.info("train.malloc_mmap_threshold: no glibc mallopt here; the allocator keeps its defaults")
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, int(threshold_bytes)))


def use_channels_last(network: nn.Module) -> None:
    """Store the network's 4-D weights NHWC, so oneDNN (CPU) and cuDNN convolutions skip their layout
    reorders; inputs follow the weights' format through the first convolution. Results are unchanged
    up to float rounding."""
    network.to(memory_format=torch.channels_last)


def compile_denoiser(network: nn.Module, how: str) -> None:
    """``train.compile``: 'blocks' compiles each repeated block (diffusers' regional compilation: one
    compile serves every copy of a block, so it costs seconds to minutes instead of a whole-graph
    compile); 'full' the whole network; 'none' leaves it eager. In place: parameter names and
    checkpoints are unchanged."""
    if how == "none":
        return
    if how == "blocks":
        try:
            network.compile_repeated_blocks()  # type: ignore[operator]
        except (AttributeError, ValueError):  # not a diffusers model, or one that names no repeated blocks
            from diffalign.config import ConfigError

            raise ConfigError(f"train.compile=blocks: {type(network).__name__} names no repeated blocks; use train.compile=full") from None
        return
    network.compile()
