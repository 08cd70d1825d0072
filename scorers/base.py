"""The scorer interface and the registry every reward model is loaded through.

A scorer maps (images, prompts) to one float per image. Scorers are built by a
*loader* registered under a name; ``load_scorer`` looks the name up and raises
``KeyError`` listing the valid names on a typo (nothing falls back silently).

Loaders receive ``weights`` (a hub id or a local folder, or None for the
reference default), ``device``, ``dtype`` and loader-specific options.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch

from diffalign.dtypes import parse_dtype

if TYPE_CHECKING:
    from PIL import Image

__all__ = [
    "Scorer",
    "ScorerLoader",
    "available_scorers",
    "batch_slices",
    "check_inputs",
    "load_checkpoint",
    "resolve_file",
    "load_scorer",
    "register_scorer",
    "score_in_batches",
]


@runtime_checkable
class Scorer(Protocol):
    """A reward model: ``score(images, prompts) -> [N]`` float32 tensor on CPU.

    Implementations batch internally (``batch_size`` images per forward; None
    means the batch size chosen at load), run under ``torch.no_grad`` on the
    device and in the dtype chosen at load.
    """

    name: str

    def score(
        self,
        images: list[Image.Image],
        prompts: list[str],
        batch_size: int | None = None,
    ) -> torch.Tensor: ...


ScorerLoader = Callable[..., Scorer]
"""``loader(weights: str | None, device, dtype: torch.dtype, **options) -> Scorer``."""

_REGISTRY: dict[str, ScorerLoader] = {}


def register_scorer(
    name: str, loader: ScorerLoader, *, overwrite: bool = False
) -> None:
    """Register ``loader`` under ``name``; re-registering a taken name needs ``overwrite=True``."""
    if name in _REGISTRY and not overwrite:
        raise ValueError(
            f"scorer {name!r} is already registered (pass overwrite=True to replace it)"
        )
    _REGISTRY[name] = loader


def available_scorers() -> list[str]:
    """Registered scorer names, sorted."""
    return sorted(_REGISTRY)


def load_scorer(
    name: str,
    weights: str | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str = torch.float32,
    **options: object,
) -> Scorer:
    """Build the scorer registered as ``name``.

    ``weights``: hub id or local folder (None: the reference default for that
    scorer). Unknown names raise ``KeyError`` listing the registered ones.
    """
    # "base:variant" (openclip:ViT-H-14) is the scorer "base" with option variant="variant".
    base, colon, variant = name.partition(":")
    if colon and base in _REGISTRY and variant:
        name, options = base, {**options, "variant": variant}
    try:
        loader = _REGISTRY[name]
    except KeyError:
        raise KeyError(
            f"unknown scorer {name!r}; available scorers: {', '.join(available_scorers())}"
        ) from None
    from diffalign.hub_access import hub_errors_as, looks_like_hub_id

    # A family:variant scorer names its own weights too (openclip:ViT-B-32=laion2b_s34b_b79k, an open_clip tag).
    if weights is not None and not variant and not Path(weights).expanduser().exists() and not looks_like_hub_id(str(weights)):
        raise FileNotFoundError(f"scorer {name!r}: weights {weights}: no such local file or folder (nor a hub id owner/name)")
    which = f"weights {weights}" if weights is not None else "its default weights"
    fix = (
        f"Pass local weights: `--scorer {name}=PATH` on the command line, or load_scorer({name!r}, weights=PATH) "
        "(a folder or file copied from a machine with hub access)."
    )
    local = weights is not None and Path(weights).expanduser().exists()
    with _local_errors_as(name, weights) if local else hub_errors_as(f"scorer {name!r} ({which})", fix):
        return loader(
            weights=weights,
            device=torch.device(device),
            dtype=parse_dtype(dtype),
            **options,
        )


@contextlib.contextmanager
def _local_errors_as(name: str, weights: str | Path) -> Iterator[None]:
    """A local weights folder the loader cannot read (a file missing, a wrong folder): one line, not a traceback."""
    try:
        yield
    except OSError as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise FileNotFoundError(
            f"scorer {name!r}: cannot load the local weights {weights}: {first} "
            f"(pass the folder or file of {name}'s weights, as saved by its reference code or save_pretrained)"
        ) from None


def check_inputs(images: Sequence[object], prompts: Sequence[str]) -> None:
    """One prompt per image."""
    if len(images) != len(prompts):
        raise ValueError(
            f"got {len(images)} images but {len(prompts)} prompts; pass one prompt per image"
        )


def batch_slices(n: int, batch_size: int) -> Iterator[slice]:
    """Consecutive slices of ``range(n)`` of at most ``batch_size`` items."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    for start in range(0, n, batch_size):
        yield slice(start, min(start + batch_size, n))


def score_in_batches(n: int, batch_size: int, score_chunk: Callable[[slice], torch.Tensor]) -> torch.Tensor:
    """Run ``score_chunk`` on consecutive slices and concatenate: ``[n]`` float32 on CPU."""
    scores = [score_chunk(chunk).float().cpu() for chunk in batch_slices(n, batch_size)]
    return torch.cat(scores) if scores else torch.zeros(0)


def load_checkpoint(path: str | Path, scorer: str, allow_pickle: bool = False) -> Any:
    """``torch.load(path, weights_only=True)``; a file that needs full unpickling is named and refused
    unless ``allow_pickle=True`` (unpickling can run arbitrary code, so it must be an explicit, per-load choice)."""
    import pickle

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if not allow_pickle:
            raise ValueError(
                f"{path} cannot be loaded with torch.load(weights_only=True): it pickles objects other than "
                f"tensors ({str(error).splitlines()[-1][:200]}). If you trust this file, pass allow_pickle=True "
                f"to the {scorer} loader to load it with weights_only=False."
            ) from error
        return torch.load(path, map_location="cpu", weights_only=False)


def resolve_file(weights: str | Path, filename: str) -> Path:
    """A reference weight file from a local file, a local folder holding ``filename``, or a hub id (downloaded)."""

    path = Path(weights).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        if not (path / filename).is_file():
            raise FileNotFoundError(f"{path / filename} not found: the folder must contain {filename}")
        return path / filename
    from diffalign.hub_access import looks_like_hub_id

    if not looks_like_hub_id(str(weights)):
        raise FileNotFoundError(f"{weights}: no such local file or folder (and it is not a hub id owner/name)")
    from huggingface_hub import hf_hub_download

    return Path(hf_hub_download(repo_id=str(weights), filename=filename))
