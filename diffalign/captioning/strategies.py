"""Caption strategies for DCPO: give the winner and the loser of each pair a caption of its own.

DCPO (Saeidi et al., 2025) conditions the winner on ``z_w`` and the loser on ``z_l``.
A :class:`CaptionStrategy` makes both captions for a batch of pairs:

* ``perturb`` -- the winner keeps the prompt, the loser gets the prompt
  perturbed (:mod:`diffalign.captioning.perturb`: offline rules or a text2text model);
* ``caption`` -- an image-to-text model captions each image (optionally
  continuing the prompt as a text prefix);
* ``hybrid``  -- caption both images, then perturb the loser's caption
  (the best variant in the paper).

Strategies are built by name through a registry (:func:`build_strategy`);
an unknown name raises, listing the valid ones.
:func:`diffalign.captioning.dataset.add_dual_captions` runs one over a
Pick-a-Pic parquet file (or folder of shards) or a JSONL manifest.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from diffalign.captioning.perturb import (
    Perturber,
    check_level,
    clean_text,
    load_perturber,
    seeded_generation,
)
from diffalign.dtypes import parse_dtype
from diffalign.hub_access import load_errors_as

if TYPE_CHECKING:
    import PIL.Image
    import torch

__all__ = [
    "CaptionSettings",
    "CaptionStrategy",
    "DualCaption",
    "HybridStrategy",
    "ImageCaptioner",
    "ModelCaptionStrategy",
    "PairToCaption",
    "PerturbStrategy",
    "StrategyBuilder",
    "available_strategies",
    "build_strategy",
    "register_strategy",
]


@dataclass(frozen=True)
class PairToCaption:
    """One pair to caption. Images are decoded only for strategies that look at them (else None)."""

    row_id: str
    prompt: str
    winner: PIL.Image.Image | None = None
    loser: PIL.Image.Image | None = None


@dataclass(frozen=True)
class DualCaption:
    """The winner's and the loser's captions.

    ``loser_perturbed`` is False when a perturber returned its input unchanged
    (e.g. the rules found no attribute word), None when nothing was perturbed.
    """

    winner: str
    loser: str
    loser_perturbed: bool | None = None


@runtime_checkable
class CaptionStrategy(Protocol):
    """Makes ``(winner caption, loser caption)`` for each pair, in order.

    ``needs_images``: whether ``pairs[i].winner``/``.loser`` must be decoded.
    ``seed`` makes any randomness reproducible.
    """

    name: str
    needs_images: bool

    def caption_pairs(self, pairs: Sequence[PairToCaption], seed: int) -> list[DualCaption]: ...


@dataclass(frozen=True)
class CaptionSettings:
    """What the built-in strategies are built from; validated so a typo fails before any model loads.

    Attributes:
        perturb_model: ``"rules"`` (offline lexicon swaps) or a text2text model (hub id or folder).
        level: perturbation strength, ``"weak"``, ``"medium"`` or ``"strong"``.
        caption_model: an image-to-text model (hub id or folder); needed by ``caption`` and ``hybrid``.
        perturb_prefix: instruction prepended to a text2text perturber's input.
        condition_on_prompt: captioners continue the prompt (a text prefix) instead of starting blank.
        max_new_tokens: generation length for both model kinds.
        device: where the models run, e.g. ``"cpu"``, ``"cuda"``.
        dtype: ``"float32"``, ``"float16"`` or ``"bfloat16"``.
    """

    perturb_model: str = "rules"
    level: str = "medium"
    caption_model: str | None = None
    perturb_prefix: str = "paraphrase: "
    condition_on_prompt: bool = False
    max_new_tokens: int = 40
    device: str = "cpu"
    dtype: str = "float32"

    def __post_init__(self) -> None:
        check_level(self.level)
        parse_dtype(self.dtype)
        if not self.perturb_model:
            raise ValueError("perturb_model must be 'rules' or a text2text model id/folder, got an empty string")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")


# --------------------------------------------------------------------------- image captioner


class ImageCaptioner:
    """An image-to-text model (hub id or folder) that writes one caption per image, batched.

    Loaded with ``AutoProcessor`` and ``AutoModelForImageTextToText`` (BLIP,
    GIT, VisionEncoderDecoder...; ``AutoModelForVision2Seq`` on older
    transformers). With ``condition_on_prompt`` the prompt is the text
    prefix the caption continues (BLIP-style conditional captioning); prompts
    are batched only with prompts of the same token length, so no padding
    ever sits between a prefix and its continuation.
    """

    def __init__(
        self,
        model: str,
        *,
        max_new_tokens: int = 40,
        condition_on_prompt: bool = False,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype = "float32",
    ) -> None:
        import torch
        from transformers import AutoProcessor

        self.name = model
        self.max_new_tokens = max_new_tokens
        self.condition_on_prompt = condition_on_prompt
        self.device = torch.device(device)
        self.dtype = parse_dtype(dtype)
        self.processor = AutoProcessor.from_pretrained(model)
        net = _load_image_to_text(model)
        self.model = net.to(device=self.device, dtype=self.dtype).eval().requires_grad_(False)

    def caption(
        self, images: Sequence[PIL.Image.Image], prompts: Sequence[str], row_ids: Sequence[str], seed: int
    ) -> list[str]:
        """``images[i]`` (with ``prompts[i]`` as prefix when conditioning) -> caption ``i``."""
        if not (len(images) == len(prompts) == len(row_ids)):
            raise ValueError(f"caption: {len(images)} images, {len(prompts)} prompts, {len(row_ids)} row ids")
        if not self.condition_on_prompt:
            return self._generate(list(images), None, row_ids, seed)
        by_length: dict[int, list[int]] = {}
        for i, prompt in enumerate(prompts):
            by_length.setdefault(len(self.processor.tokenizer(prompt)["input_ids"]), []).append(i)
        captions: list[str] = [""] * len(images)
        for indices in by_length.values():
            texts = [prompts[i] for i in indices]
            out = self._generate([images[i] for i in indices], texts, [row_ids[i] for i in indices], seed)
            for i, text in zip(indices, out):
                captions[i] = text
        return captions

    def _generate(
        self, images: list[PIL.Image.Image], texts: list[str] | None, row_ids: Sequence[str], seed: int
    ) -> list[str]:
        import torch

        kwargs = {"text": texts, "padding": True} if texts is not None else {}
        inputs = self.processor(images=images, return_tensors="pt", **kwargs).to(self.device)
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        with torch.no_grad(), seeded_generation(seed, row_ids, self.device):
            out = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens)
        return [clean_text(t) for t in self.processor.batch_decode(out, skip_special_tokens=True)]

    def __repr__(self) -> str:
        return f"ImageCaptioner(model={self.name!r}, condition_on_prompt={self.condition_on_prompt})"


def _load_image_to_text(model: str) -> torch.nn.Module:
    """The image-to-text auto class this transformers has; a model none of them knows raises naming both tries."""
    import transformers

    errors: list[str] = []
    for auto_name in ("AutoModelForImageTextToText", "AutoModelForVision2Seq"):
        auto = getattr(transformers, auto_name, None)
        if auto is None:
            continue
        try:
            return auto.from_pretrained(model)
        except ValueError as exc:  # "Unrecognized configuration class ... for this kind of AutoModel"
            errors.append(f"{auto_name}: {exc}")
    raise ValueError(f"{model}: not an image-to-text model this transformers can load ({'; '.join(errors)})")


# --------------------------------------------------------------------------- strategies


class PerturbStrategy:
    """Winner: the prompt. Loser: the prompt perturbed."""

    name = "perturb"
    needs_images = False

    def __init__(self, perturber: Perturber) -> None:
        self.perturber = perturber

    def caption_pairs(self, pairs: Sequence[PairToCaption], seed: int) -> list[DualCaption]:
        prompts = [p.prompt for p in pairs]
        perturbed = self.perturber.perturb(prompts, [p.row_id for p in pairs], seed)
        return [DualCaption(prompt, loser, _changed(prompt, loser)) for prompt, loser in zip(prompts, perturbed)]


class ModelCaptionStrategy:
    """Each image gets the caption an image-to-text model writes for it."""

    name = "caption"
    needs_images = True

    def __init__(self, captioner: ImageCaptioner) -> None:
        self.captioner = captioner

    def caption_pairs(self, pairs: Sequence[PairToCaption], seed: int) -> list[DualCaption]:
        winners, losers = _caption_both(self.captioner, pairs, seed)
        return [DualCaption(winner, loser) for winner, loser in zip(winners, losers)]


class HybridStrategy:
    """Caption both images, then perturb the loser's caption (DCPO-h, the paper's best)."""

    name = "hybrid"
    needs_images = True

    def __init__(self, captioner: ImageCaptioner, perturber: Perturber) -> None:
        self.captioner = captioner
        self.perturber = perturber

    def caption_pairs(self, pairs: Sequence[PairToCaption], seed: int) -> list[DualCaption]:
        winners, losers = _caption_both(self.captioner, pairs, seed)
        perturbed = self.perturber.perturb(losers, [p.row_id for p in pairs], seed)
        return [DualCaption(w, new, _changed(old, new)) for w, old, new in zip(winners, losers, perturbed)]


def _changed(before: str, after: str) -> bool:
    return clean_text(before) != clean_text(after)


def _caption_both(
    captioner: ImageCaptioner, pairs: Sequence[PairToCaption], seed: int
) -> tuple[list[str], list[str]]:
    """One generate pass over winners and losers together: ``[winner_0, loser_0, winner_1, ...]``."""
    images: list[PIL.Image.Image] = []
    for p in pairs:
        if p.winner is None or p.loser is None:
            raise ValueError(f"row {p.row_id}: the {captioner.name} captioner needs both images decoded")
        images += [p.winner, p.loser]
    prompts = [p.prompt for p in pairs for _ in range(2)]
    row_ids = [f"{p.row_id}#{side}" for p in pairs for side in ("winner", "loser")]
    captions = captioner.caption(images, prompts, row_ids, seed)
    return captions[0::2], captions[1::2]


# --------------------------------------------------------------------------- registry

StrategyBuilder = Callable[[CaptionSettings], CaptionStrategy]
"""``builder(settings) -> CaptionStrategy``; loads whatever models the strategy needs."""

_REGISTRY: dict[str, StrategyBuilder] = {}


def register_strategy(name: str, builder: StrategyBuilder, *, overwrite: bool = False) -> None:
    """Register ``builder`` under ``name``; replacing a registered name needs ``overwrite=True``."""
    if name in _REGISTRY and not overwrite:
        raise ValueError(f"caption strategy {name!r} is already registered (pass overwrite=True to replace it)")
    _REGISTRY[name] = builder


def available_strategies() -> list[str]:
    """Registered strategy names, sorted."""
    return sorted(_REGISTRY)


def build_strategy(name: str, settings: CaptionSettings | None = None) -> CaptionStrategy:
    """Build the strategy registered as ``name``; an unknown name raises ``KeyError`` listing the valid ones."""
    try:
        builder = _REGISTRY[name]
    except KeyError:
        valid = ", ".join(available_strategies())
        raise KeyError(f"unknown caption strategy {name!r}; valid strategies: {valid}") from None
    return builder(settings if settings is not None else CaptionSettings())


def _perturber(s: CaptionSettings) -> Perturber:
    model = None if s.perturb_model == "rules" else s.perturb_model
    with contextlib.nullcontext() if model is None else load_errors_as(
        f"perturb_model {model}", model, "Pass a local text2text model folder, or perturb_model='rules' (offline)."
    ):
        return load_perturber(
            s.perturb_model,
            s.level,
            prefix=s.perturb_prefix,
            max_new_tokens=s.max_new_tokens,
            device=s.device,
            dtype=s.dtype,
        )


def _captioner(s: CaptionSettings, strategy: str) -> ImageCaptioner:
    if not s.caption_model:
        raise ValueError(f"caption strategy {strategy!r} needs caption_model (an image-to-text model id or folder)")
    with load_errors_as(f"caption_model {s.caption_model}", s.caption_model, "Pass a local image-to-text model folder."):
        return ImageCaptioner(
            s.caption_model,
            max_new_tokens=s.max_new_tokens,
            condition_on_prompt=s.condition_on_prompt,
            device=s.device,
            dtype=s.dtype,
        )


register_strategy("perturb", lambda s: PerturbStrategy(_perturber(s)))
register_strategy("caption", lambda s: ModelCaptionStrategy(_captioner(s, "caption")))
register_strategy("hybrid", lambda s: HybridStrategy(_captioner(s, "hybrid"), _perturber(s)))
