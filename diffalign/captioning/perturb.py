"""Perturb a caption so it no longer matches its image: the loser's caption in DCPO.

DCPO (Saeidi et al., 2025) conditions the loser on a caption of its own; one way to
get it is to perturb the prompt (or the loser's generated caption) weakly,
moderately or strongly. Two perturbers share one interface:

* :class:`RulePerturber` -- offline and deterministic: swaps attribute words
  (colours, counts, sizes, shapes and common nouns) from a small built-in
  lexicon for others of the same kind. weak = 1 swap, medium = 2, strong =
  every known attribute word plus dropping one modifier. The choice is a pure
  function of ``(seed, row id)``, so a row gets the same caption whatever
  batch it falls in.
* :class:`Seq2SeqPerturber` -- a text2text paraphraser (e.g. a T5) loaded
  with ``AutoModelForSeq2SeqLM``; the level picks the decoding settings
  (:data:`PARAPHRASE_LEVELS`). Sampling is seeded from ``(seed, row ids of
  the batch)``, so a run is reproducible for the same seed and batch size.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Protocol, runtime_checkable

from diffalign.dtypes import parse_dtype

if TYPE_CHECKING:
    import torch

__all__ = [
    "ATTRIBUTE_LEXICON",
    "LEVELS",
    "PARAPHRASE_LEVELS",
    "Level",
    "Perturber",
    "RulePerturbation",
    "RulePerturber",
    "Seq2SeqPerturber",
    "check_level",
    "clean_text",
    "load_perturber",
    "perturb_with_rules",
    "row_rng",
    "seeded_generation",
]

Level = Literal["weak", "medium", "strong"]
LEVELS: tuple[Level, ...] = ("weak", "medium", "strong")

_NOUNS: dict[str, tuple[str, ...]] = {
    "shape": ("circle", "square", "triangle", "star", "heart", "hexagon"),
    "animal": ("cat", "dog", "horse", "bird", "cow", "rabbit"),
    "object": ("car", "boat", "house", "tree", "chair", "cup"),
}
# Word kinds; a word is only ever swapped for another word of its own kind, so
# "two cats" may become "three dogs" but never "blue cats" or "two dog".
ATTRIBUTE_LEXICON: dict[str, tuple[str, ...]] = {
    "colour": ("red", "green", "blue", "yellow", "orange", "purple", "black", "white", "pink", "brown", "gray"),
    "count": ("two", "three", "four", "five", "six"),
    "size": ("small", "big", "large", "tiny", "huge"),
    **_NOUNS,
    **{f"{kind} plural": tuple(f"{noun}s" for noun in nouns) for kind, nouns in _NOUNS.items()},
}
_MODIFIER_KINDS = frozenset({"colour", "size"})  # what "strong" may drop without losing the subject
_KIND_OF: dict[str, str] = {word: kind for kind, words in ATTRIBUTE_LEXICON.items() for word in words}
_WORD = re.compile(r"[A-Za-z]+")
_RULE_CHANGES: dict[str, int | None] = {"weak": 1, "medium": 2, "strong": None}  # None: every attribute word

# Decoding settings per level for a text2text paraphraser: weak stays close to
# the input (beam search picks the likeliest rewrite), medium samples at a
# moderate temperature, strong samples hot from almost the whole distribution.
PARAPHRASE_LEVELS: dict[str, dict[str, Any]] = {
    "weak": {"do_sample": False, "num_beams": 4},
    "medium": {"do_sample": True, "temperature": 0.7, "top_p": 0.9, "top_k": 0},
    "strong": {"do_sample": True, "temperature": 1.5, "top_p": 0.98, "top_k": 0},
}

def check_level(level: str) -> Level:
    """Return ``level`` if it is one of :data:`LEVELS`; a typo raises rather than picking a default."""
    if level not in LEVELS:
        raise ValueError(f"unknown perturbation level {level!r}; valid levels: {', '.join(LEVELS)}")
    return level  # type: ignore[return-value]


def row_rng(seed: int, *keys: str) -> random.Random:
    """A generator that depends only on ``seed`` and ``keys`` (sha256, stable across processes, unlike ``hash``)."""
    digest = hashlib.sha256("\0".join([str(seed), *keys]).encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "little"))


# --------------------------------------------------------------------------- rules


@dataclass(frozen=True)
class RulePerturbation:
    """The perturbed text and how many edits were made (0: no lexicon word, text unchanged)."""

    text: str
    edits: int


def _match_case(template: str, word: str) -> str:
    if template.isupper() and len(template) > 1:
        return word.upper()
    return word.capitalize() if template[:1].isupper() else word


def perturb_with_rules(text: str, level: str, rng: random.Random) -> RulePerturbation:
    """Swap attribute words of ``text`` for others of the same kind; strong also drops one modifier.

    The result differs from ``text`` whenever ``text`` holds a lexicon word:
    every swap picks a *different* word. Articles before a changed word are
    re-agreed ("a red" -> "an orange"); spacing and punctuation are kept.
    """
    n_changes = _RULE_CHANGES[check_level(level)]
    words = [(m.start(), m.end(), m.group()) for m in _WORD.finditer(text)]
    slots = [i for i, (_, _, w) in enumerate(words) if w.lower() in _KIND_OF]
    if not slots:
        return RulePerturbation(text, 0)
    chosen = slots if n_changes is None else sorted(rng.sample(slots, min(n_changes, len(slots))))
    replaced: dict[int, str] = {}
    for i in chosen:
        word = words[i][2]
        others = [w for w in ATTRIBUTE_LEXICON[_KIND_OF[word.lower()]] if w != word.lower()]
        replaced[i] = _match_case(word, rng.choice(others))
    edits = len(chosen)
    if n_changes is None and len(slots) > 1:  # strong: drop a modifier, keep at least one swapped word
        modifiers = [i for i in slots if _KIND_OF[words[i][2].lower()] in _MODIFIER_KINDS]
        if modifiers:
            replaced[rng.choice(modifiers)] = ""
            edits += 1
    return RulePerturbation(_rebuild(text, words, replaced), edits)


def _rebuild(text: str, words: list[tuple[int, int, str]], replaced: dict[int, str]) -> str:
    """Apply word replacements (``""`` drops the word and the space after it) and fix a/an before changed words."""
    for i in range(len(words) - 1):
        article = words[i][2]
        if article.lower() not in ("a", "an") or i in replaced:
            continue
        nxt = next((j for j in range(i + 1, len(words)) if replaced.get(j, None) != ""), None)
        if nxt is None or not any(j in replaced for j in range(i + 1, nxt + 1)):
            continue
        following = replaced.get(nxt, words[nxt][2])
        wanted = "an" if following[:1].lower() in "aeiou" else "a"
        if wanted != article.lower():
            replaced[i] = _match_case(article, wanted)
    out: list[str] = []
    cursor = 0
    for i, (start, end, _) in enumerate(words):
        if i not in replaced:
            continue
        out.append(text[cursor:start])
        cursor = end
        if replaced[i]:
            out.append(replaced[i])
        else:  # dropped: swallow the whitespace after it
            while cursor < len(text) and text[cursor] == " ":
                cursor += 1
    out.append(text[cursor:])
    return "".join(out)


@runtime_checkable
class Perturber(Protocol):
    """Rewrites texts so they drift from what they described: ``texts[i]`` -> perturbed ``texts[i]``."""

    def perturb(self, texts: Sequence[str], row_ids: Sequence[str], seed: int) -> list[str]: ...


class RulePerturber:
    """Lexicon swaps (:func:`perturb_with_rules`); row ``r`` under seed ``s`` always gets the same edits."""

    def __init__(self, level: str = "medium") -> None:
        self.level = check_level(level)

    def perturb(self, texts: Sequence[str], row_ids: Sequence[str], seed: int) -> list[str]:
        if len(texts) != len(row_ids):
            raise ValueError(f"perturb: {len(texts)} texts but {len(row_ids)} row ids")
        return [perturb_with_rules(t, self.level, row_rng(seed, r)).text for t, r in zip(texts, row_ids)]

    def __repr__(self) -> str:
        return f"RulePerturber(level={self.level!r})"


# --------------------------------------------------------------------------- text2text models


@contextmanager
def seeded_generation(seed: int, keys: Sequence[str], device: torch.device) -> Iterator[None]:
    """Seed torch's RNG (CPU and the device) from ``seed`` and ``keys`` without disturbing the caller's state."""
    import torch

    derived = row_rng(seed, *keys).getrandbits(63)
    cuda = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(derived)
        yield


def clean_text(text: str) -> str:
    """Collapse whitespace: decoders leave double spaces where special tokens were removed."""
    return " ".join(text.split())


class Seq2SeqPerturber:
    """A text2text paraphraser (hub id or local folder) decoding at the strength of ``level``.

    ``prefix`` is prepended to every input (T5 paraphrasers are trained with
    an instruction such as ``"paraphrase: "``; pass ``""`` for none).
    """

    def __init__(
        self,
        model: str,
        level: str = "medium",
        *,
        prefix: str = "paraphrase: ",
        max_new_tokens: int = 40,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype = "float32",
    ) -> None:
        import torch
        from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

        self.level = check_level(level)
        self.prefix = prefix
        self.max_new_tokens = max_new_tokens
        self.device = torch.device(device)
        self.tokenizer = AutoTokenizer.from_pretrained(model)
        net = AutoModelForSeq2SeqLM.from_pretrained(model)
        self.model = net.to(device=self.device, dtype=parse_dtype(dtype)).eval().requires_grad_(False)
        self.name = model

    def perturb(self, texts: Sequence[str], row_ids: Sequence[str], seed: int) -> list[str]:
        import torch

        if not texts:
            return []
        max_length = min(int(self.tokenizer.model_max_length), 512)
        inputs = self.tokenizer(
            [self.prefix + t for t in texts], return_tensors="pt", padding=True, truncation=True, max_length=max_length
        ).to(self.device)
        with torch.no_grad(), seeded_generation(seed, row_ids, self.device):
            out = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, **PARAPHRASE_LEVELS[self.level])
        return [clean_text(t) for t in self.tokenizer.batch_decode(out, skip_special_tokens=True)]

    def __repr__(self) -> str:
        return f"Seq2SeqPerturber(model={self.name!r}, level={self.level!r})"


def load_perturber(
    model: str,
    level: str,
    *,
    prefix: str = "paraphrase: ",
    max_new_tokens: int = 40,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype = "float32",
) -> Perturber:
    """``model="rules"``: the offline :class:`RulePerturber`; anything else is a text2text model to load."""
    if model == "rules":
        return RulePerturber(level)
    return Seq2SeqPerturber(model, level, prefix=prefix, max_new_tokens=max_new_tokens, device=device, dtype=dtype)
