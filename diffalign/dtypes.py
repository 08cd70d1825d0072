"""One spelling of weight dtypes for every command and API.

Users write dtypes the short way (``bf16``, as accelerate's ``mixed_precision``) or the torch way
(``bfloat16``); every ``--dtype`` option and ``dtype=`` argument accepts both, through this parser.
torch is imported only when a dtype is parsed, so command-line parsers can list the spellings
without paying for it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

_TORCH_NAME: dict[str, str] = {
    "fp32": "float32",
    "float32": "float32",
    "bf16": "bfloat16",
    "bfloat16": "bfloat16",
    "fp16": "float16",
    "float16": "float16",
}

DTYPE_NAMES: tuple[str, ...] = tuple(_TORCH_NAME)
"""The accepted spellings, for argparse ``choices``: ``fp32|bf16|fp16`` and ``float32|bfloat16|float16``."""


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """``"bf16"``/``"bfloat16"``/``torch.bfloat16`` (and the fp32, fp16 equivalents) -> the torch dtype.

    Raises ValueError naming the accepted spellings for anything else: models here run in one of
    these three, and a typo must not fall back to a default silently.
    """
    import torch

    if isinstance(dtype, torch.dtype):
        if str(dtype).removeprefix("torch.") not in _TORCH_NAME.values():
            raise ValueError(f"unsupported dtype {dtype}; use float32, bfloat16 or float16")
        return dtype
    if not isinstance(dtype, str) or dtype not in _TORCH_NAME:
        raise ValueError(f"unknown dtype {dtype!r}; valid: {', '.join(DTYPE_NAMES)}")
    return getattr(torch, _TORCH_NAME[dtype])
