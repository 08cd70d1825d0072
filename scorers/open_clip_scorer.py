"""Any open_clip model as a CLIP-score scorer, on the open_clip plumbing HPSv2 shares.

``load_scorer("openclip:ViT-H-14", weights="open_clip_pytorch_model.bin")`` (CLI:
``--scorer openclip:ViT-bigG-14=/path/open_clip_pytorch_model.bin``) builds the architecture
open_clip registers under that name (``open_clip.list_models()``), loads the file with open_clip's
own loader (it unwraps ``state_dict`` / ``module.`` and loads strictly), and scores every
(image, prompt) pair as ``100 * cos(image, prompt)``: the convention of ``clipscore-100``
(torchmetrics' CLIPScore per sample, the "CLIP score" column of text-to-image papers), not
clipped, no prompt prefix. Images go through open_clip's own eval transform for that model,
prompts through open_clip's own tokenizer for it; both run batched.

``weights`` may instead be one of open_clip's pretrained tags for the architecture
(``openclip:ViT-B-32=laion2b_s34b_b79k``): a cached copy is used, otherwise it is downloaded
once. Offline that is one message saying to pass the file, not huggingface_hub's five retries.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

import torch
import torch.nn.functional as F

from .base import check_inputs, register_scorer, score_in_batches

if TYPE_CHECKING:
    from PIL import Image

__all__ = [
    "CLIP_SCORE_SCALE",
    "OpenClipScorer",
    "create_open_clip",
    "open_clip_tokenizer",
    "register_open_clip_scorer",
]

DEFAULT_BATCH_SIZE = 16
CLIP_SCORE_SCALE = 100.0  # clipscore-100's convention: 100 * cos, per sample
HUB_TIMEOUT_S = 5.0
OPEN_CLIP_WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")  # a hub repo's, preferred first


def _import_open_clip() -> Any:
    try:
        import open_clip
    except ImportError as error:
        raise ImportError(
            f"open_clip scorers need open_clip_torch and a matching torchvision ({error}); "
            "install the scorers extra: pip install 'diffalign[scorers]'"
        ) from None
    return open_clip


class _DropRandomInitWarning(logging.Filter):
    """open_clip warns "Model initialized randomly" when built without weights; ours are loaded next."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "initialized randomly" not in record.getMessage()


@contextmanager
def _quiet_random_init() -> Iterator[None]:
    root = logging.getLogger()
    quiet = _DropRandomInitWarning()
    root.addFilter(quiet)
    try:
        yield
    finally:
        root.removeFilter(quiet)


def create_open_clip(arch: str, checkpoint: str | os.PathLike | None = None, **factory_options: Any) -> torch.nn.Module:
    """``open_clip.create_model(arch)`` in eval mode, loading ``checkpoint`` (a local file) when given.

    An unknown architecture raises ``ValueError`` with the closest registered names; a file open_clip
    cannot load raises ``ValueError`` naming it.
    """
    open_clip = _import_open_clip()
    known = open_clip.list_models()
    if arch not in known:
        import difflib

        close = difflib.get_close_matches(arch, known, n=5, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"{arch!r} is not an open_clip architecture (open_clip.list_models() has {len(known)}){hint}")
    try:
        with _quiet_random_init():
            model = open_clip.create_model(
                arch, pretrained=None if checkpoint is None else str(checkpoint), pretrained_text=False, **factory_options
            )
    except (RuntimeError, OSError, KeyError, ValueError) as error:  # a state dict of another shape, a broken file
        where = f"{checkpoint}: " if checkpoint is not None else ""
        detail = " ".join(str(error).split())[:600]  # load_state_dict lists the missing/unexpected keys
        raise ValueError(f"{where}cannot build open_clip {arch!r} from it ({detail})") from error
    return model.eval().requires_grad_(False)


def open_clip_tokenizer(arch: str) -> Callable[[Sequence[str]], torch.Tensor]:
    """open_clip's own tokenizer for ``arch``: ``[N]`` prompts -> ``[N, context]`` token ids.

    For OpenAI-BPE models (every ViT-*-* CLIP, HPSv2's ViT-H-14) this is ``SimpleTokenizer`` on the
    BPE vocabulary shipped inside open_clip: nothing is downloaded. Models with a Hugging Face text
    tower (SigLIP, xlm-roberta) need their tokenizer from the hub; offline that is a ``ValueError``.
    """
    open_clip = _import_open_clip()
    try:
        return open_clip.get_tokenizer(arch)
    except (OSError, RuntimeError, ValueError) as error:
        raise ValueError(
            f"open_clip {arch!r} needs its tokenizer from the Hugging Face hub, which failed ({_first_line(error)}); "
            "run once online so it is cached, or choose an architecture with the built-in CLIP tokenizer"
        ) from error


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0][:300] if text else type(error).__name__


class OpenClipScorer:
    """``scale * cos(normalise(encode_image), normalise(encode_text))`` per (image, prompt) pair, batched.

    ``preprocess``: PIL image -> ``[3, H, W]`` float32 (open_clip's eval transform, or HPSv2's).
    """

    def __init__(
        self,
        name: str,
        model: torch.nn.Module,
        tokenizer: Callable[[Sequence[str]], torch.Tensor],
        preprocess: Callable[[Image.Image], torch.Tensor],
        scale: float,
        device: torch.device,
        dtype: torch.dtype,
        batch_size: int = DEFAULT_BATCH_SIZE,
    ):
        self.name, self.model, self.tokenizer, self.preprocess, self.scale = name, model, tokenizer, preprocess, scale
        self.device, self.dtype, self.batch_size = device, dtype, batch_size

    def image_embeddings(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """``[N]`` PIL images -> ``[N, embed_dim]`` float32, L2-normalised."""
        pixels = torch.stack([self.preprocess(image) for image in images]).to(self.device, self.dtype)
        return F.normalize(self.model.encode_image(pixels).float(), dim=-1)

    def text_embeddings(self, prompts: Sequence[str]) -> torch.Tensor:
        """``[N]`` prompts -> ``[N, embed_dim]`` float32, L2-normalised (the tokenizer cleans and truncates)."""
        tokens = self.tokenizer(list(prompts)).to(self.device)
        return F.normalize(self.model.encode_text(tokens).float(), dim=-1)

    @torch.no_grad()
    def score(self, images: list[Image.Image], prompts: list[str], batch_size: int | None = None) -> torch.Tensor:
        """``[N]`` float32 on CPU."""
        check_inputs(images, prompts)

        def score_chunk(chunk: slice) -> torch.Tensor:
            cos = (self.image_embeddings(images[chunk]) * self.text_embeddings(prompts[chunk])).sum(-1)
            return self.scale * cos

        return score_in_batches(len(images), batch_size or self.batch_size, score_chunk)


def _hub_reachable(url: str) -> bool:
    """One TCP connection, no retries: huggingface_hub would retry five times (about 45 s) before failing."""
    host = urlparse(url).hostname
    if not host:
        return False
    try:
        socket.create_connection((host, 443), timeout=HUB_TIMEOUT_S).close()
    except OSError:
        return False
    return True


def _pretrained_file(arch: str, tag: str, pretrained: dict[str, Any]) -> str:
    """The local file of open_clip's pretrained ``tag``: cached, else downloaded when the host answers."""
    open_clip = _import_open_clip()
    from huggingface_hub import constants, try_to_load_from_cache

    if pretrained.get("hf_hub"):
        # open_clip's form: "org/name/" (its default file name) or "org/name/file.bin".
        repo, filename = os.path.split(pretrained["hf_hub"])
        filename = filename or "open_clip_pytorch_model.bin"
        cached = try_to_load_from_cache(repo, filename)
        if isinstance(cached, str):
            return cached
        source = constants.ENDPOINT
    else:
        source = pretrained.get("url", "")
    how = (
        f"download the weights where the hub is reachable and pass the file: "
        f"--scorer openclip:{arch}=/path/to/open_clip_pytorch_model.bin"
    )
    if constants.HF_HUB_OFFLINE or not _hub_reachable(source):
        raise ValueError(f"openclip:{arch}: pretrained tag {tag!r} is not cached and {source or 'its host'} cannot be reached; {how}")  # fmt: skip
    try:
        return open_clip.download_pretrained(pretrained)
    except Exception as error:  # noqa: BLE001  (any download failure ends in the same advice)
        raise ValueError(f"openclip:{arch}: downloading pretrained tag {tag!r} failed ({_first_line(error)}); {how}") from error  # fmt: skip


def _image_transform(model: torch.nn.Module) -> Callable[[Image.Image], torch.Tensor]:
    """open_clip's eval transform from the preprocess settings ``create_model`` stored on the model."""
    open_clip = _import_open_clip()
    cfg = open_clip.get_model_preprocess_cfg(model)
    return open_clip.image_transform(
        cfg["size"], is_train=False, mean=cfg.get("mean"), std=cfg.get("std"),
        resize_mode=cfg.get("resize_mode"), interpolation=cfg.get("interpolation"), fill_color=cfg.get("fill_color", 0),
    )  # fmt: skip


def load_open_clip_scorer(
    weights: str | None,
    device: torch.device,
    dtype: torch.dtype,
    variant: str | None = None,
    allow_pickle: bool = False,
    batch_size: int = DEFAULT_BATCH_SIZE,
    **options: Any,
) -> OpenClipScorer:
    """``variant``: the open_clip architecture (``openclip:ARCH``); ``weights``: a local checkpoint file
    (``open_clip_pytorch_model.bin`` / ``.safetensors``, or a ``{"state_dict": ...}`` training checkpoint),
    a folder holding one under open_clip's hub file names, or a pretrained tag of that architecture. ``allow_pickle``: load a file that needs full unpickling."""
    open_clip = _import_open_clip()
    if options:
        raise TypeError(f"unknown options for scorer 'openclip': {sorted(options)}")
    if not variant:
        raise ValueError("name the architecture: openclip:ARCH, e.g. --scorer openclip:ViT-H-14=/path/open_clip_pytorch_model.bin")  # fmt: skip
    name = f"openclip:{variant}"
    if not weights:
        tags = open_clip.list_pretrained_tags_by_model(variant)
        raise ValueError(f"{name} needs weights: a local checkpoint file, or a pretrained tag ({', '.join(tags) or 'none known'})")  # fmt: skip
    path = Path(weights).expanduser()
    if path.is_dir():  # a downloaded hub repo of an open_clip model: its weights file by open_clip's names
        found = [path / f for f in OPEN_CLIP_WEIGHT_FILES if (path / f).is_file()]
        if not found:
            raise FileNotFoundError(f"{name}: the folder {path} holds none of {', '.join(OPEN_CLIP_WEIGHT_FILES)}")
        path = found[0]
    force_preprocess: dict[str, Any] = {}
    if not path.is_file():
        pretrained = open_clip.get_pretrained_cfg(variant, weights)
        if not pretrained:
            tags = ", ".join(open_clip.list_pretrained_tags_by_model(variant)) or "none"
            raise FileNotFoundError(f"{name}: {weights} is neither a file nor a pretrained tag of {variant} (tags: {tags})")  # fmt: skip
        path = Path(_pretrained_file(variant, weights, pretrained))
        # The tag's own normalisation (SigLIP, DFN, ... differ from OpenAI's), as open_clip applies it.
        force_preprocess = {k: pretrained[k] for k in ("mean", "std", "interpolation", "resize_mode") if k in pretrained}
    model = create_open_clip(
        variant, path, weights_only=not allow_pickle, require_pretrained=True, force_preprocess_cfg=force_preprocess or None
    )  # fmt: skip
    model = model.to(device=device, dtype=dtype)
    return OpenClipScorer(
        name, model, open_clip_tokenizer(variant), _image_transform(model), CLIP_SCORE_SCALE, device, dtype, batch_size
    )  # fmt: skip


def register_open_clip_scorer() -> None:
    """Register ``openclip`` (used as ``openclip:ARCH``; idempotent)."""
    register_scorer("openclip", load_open_clip_scorer, overwrite=True)
