"""A CLIP-style byte-level BPE tokenizer generated locally, for the tiny pipelines.

:mod:`diffalign.tiny.pipelines` builds its pipelines with :func:`build_tokenizer`; the
vocabulary is small (256 byte characters, their ``</w>`` forms, one merged
token per word in TOY_WORDS, then BOS/EOS) and needs no hub download.
"""

from __future__ import annotations

from functools import lru_cache
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # heavy imports stay lazy: `import diffalign.tiny` must be cheap
    from transformers import CLIPTokenizer

__all__ = [
    "TOY_WORDS",
    "TOY_VOCAB_SIZE",
    "BOS_TOKEN",
    "EOS_TOKEN",
    "BOS_TOKEN_ID",
    "EOS_TOKEN_ID",
    "END_OF_WORD",
    "build_tokenizer",
    "bytes_to_unicode",
]

# Words the toy world and the tests write prompts with. Each becomes a single BPE
# token, so a prompt such as "a red circle on a blue square" is a handful of
# tokens, exactly like it would be for the real CLIP vocabulary.
TOY_WORDS: tuple[str, ...] = (
    # function words
    "a", "an", "the", "on", "of", "with", "and", "in", "at", "to", "is", "left", "right",
    "above", "below", "next", "small", "big", "large", "one", "two", "three",
    # picture words
    "photo", "picture", "image", "drawing", "painting", "background",
    # colours
    "red", "green", "blue", "yellow", "orange", "purple", "black", "white", "pink", "brown", "gray",
    # shapes and things
    "circle", "square", "triangle", "star", "cat", "dog", "shape", "shapes",
)  # fmt: skip

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
END_OF_WORD = "</w>"


# --------------------------------------------------------------------------- tokenizer


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable unicode map.

    Byte-level BPE needs every byte to be a visible character so that no text
    is ever out of vocabulary; transformers 5 no longer exports this helper.
    """
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars)))


def _apply_bpe(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Reference BPE: repeatedly merge the adjacent pair with the lowest rank."""
    symbols = list(symbols)
    while len(symbols) > 1:
        pairs = [(ranks.get((a, b)), i) for i, (a, b) in enumerate(zip(symbols, symbols[1:]))]
        known = [(rank, i) for rank, i in pairs if rank is not None]
        if not known:
            break
        best_rank = min(rank for rank, _ in known)
        first, second = next((symbols[i], symbols[i + 1]) for rank, i in known if rank == best_rank)
        merged: list[str] = []
        i = 0
        while i < len(symbols):
            if i < len(symbols) - 1 and symbols[i] == first and symbols[i + 1] == second:
                merged.append(first + second)
                i += 2
            else:
                merged.append(symbols[i])
                i += 1
        symbols = merged
    return symbols


@lru_cache(maxsize=1)
def _vocab_and_merges() -> tuple[dict[str, int], tuple[tuple[str, str], ...]]:
    """CLIP-layout vocabulary: 256 byte chars, their ``</w>`` forms, merged tokens, then BOS/EOS last.

    Merges are grown word by word against a reference BPE so that every word in
    TOY_WORDS ends as exactly one token whatever merges earlier words added
    (merges appended later always rank below earlier ones, so earlier words
    are never split again).
    """
    byte_chars = list(bytes_to_unicode().values())
    tokens: list[str] = byte_chars + [c + END_OF_WORD for c in byte_chars]
    known = set(tokens)
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    byte_encoder = bytes_to_unicode()
    for word in TOY_WORDS:
        chars = [byte_encoder[b] for b in word.encode("utf-8")]
        symbols = _apply_bpe(chars[:-1] + [chars[-1] + END_OF_WORD], ranks)
        while len(symbols) > 1:  # join what the current merges leave, left to right
            pair = (symbols[0], symbols[1])
            if pair not in ranks:
                ranks[pair] = len(merges)
                merges.append(pair)
            if pair[0] + pair[1] not in known:
                known.add(pair[0] + pair[1])
                tokens.append(pair[0] + pair[1])
            symbols = _apply_bpe(symbols, ranks)
    tokens += [BOS_TOKEN, EOS_TOKEN]
    return {token: i for i, token in enumerate(tokens)}, tuple(merges)


TOY_VOCAB_SIZE: int = len(_vocab_and_merges()[0])
BOS_TOKEN_ID: int = _vocab_and_merges()[0][BOS_TOKEN]
EOS_TOKEN_ID: int = _vocab_and_merges()[0][EOS_TOKEN]


def build_tokenizer(max_length: int = 77) -> CLIPTokenizer:
    """A CLIP-style byte-level BPE tokenizer generated locally (no hub download).

    Same pre-tokenizer, ``</w>`` suffix, BOS/EOS post-processing and padding
    token (EOS) as the real CLIP tokenizer, so pipelines' ``padding="max_length"``
    path and CLIP's pooling at the first EOS behave as they do at full size.
    TOY_WORDS are single tokens; any other text falls back to byte characters.
    """
    from transformers import CLIPTokenizer

    vocab, merges = _vocab_and_merges()
    return CLIPTokenizer(vocab=dict(vocab), merges=list(merges), model_max_length=max_length)
