"""Tiny, randomly initialised text models for the caption strategies, saved in Hugging Face format.

Tests of ``diffalign captions`` must load a paraphraser and an image captioner
through the same ``from_pretrained`` paths a user's T5 or BLIP takes, with no
hub. So this module builds them at toy size in code -- a T5 paraphraser and a
BLIP captioner, each with a word-level tokenizer over a small vocabulary --
and saves them with ``save_pretrained``. Their text is gibberish, but made of
real words (the toy world's and the perturbation lexicon's), so the
rule-based perturbation has attribute words to swap in a hybrid run.

Everything is a pure function of the seed; construction runs inside
``torch.random.fork_rng`` so the caller's RNG state is untouched. Both models
are kept from emitting special tokens (the captioner through its output
bias, the paraphraser through its saved generation config), so their
captions are never empty.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from diffalign.atomic import staged_folder
from diffalign.captioning.perturb import ATTRIBUTE_LEXICON
from diffalign.tiny.tokenizer import TOY_WORDS

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = [
    "TINY_TEXT_WORDS",
    "build_word_tokenizer",
    "save_tiny_captioner",
    "save_tiny_paraphraser",
]

# Vocabulary of both tiny models: the toy world's words, every lexicon word, some punctuation.
_LEXICON_WORDS = [word for words in ATTRIBUTE_LEXICON.values() for word in words]
TINY_TEXT_WORDS: tuple[str, ...] = tuple(dict.fromkeys([*TOY_WORDS, *_LEXICON_WORDS, "paraphrase", ":", ",", "."]))
_T5_SPECIALS = ("<pad>", "</s>", "<unk>")  # T5's ids: pad 0 (also the decoder start), eos 1, unk 2
_BLIP_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[DEC]")  # BERT-style; BLIP's decoder starts at [DEC]


def build_word_tokenizer(specials: tuple[str, ...], template: str, **special_tokens: str) -> PreTrainedTokenizerBase:
    """A lower-casing word-level tokenizer over ``specials + TINY_TEXT_WORDS``; unknown words map to the unk token.

    ``template`` is the single-sequence post-processing template, e.g.
    ``"$A </s>"`` (T5) or ``"[CLS] $A [SEP]"`` (BERT/BLIP).
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate([*specials, *TINY_TEXT_WORDS])}
    unk = special_tokens["unk_token"]
    backend = Tokenizer(models.WordLevel(vocab, unk_token=unk))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    in_template = [(token, vocab[token]) for token in template.split() if token in vocab]
    backend.post_processor = processors.TemplateProcessing(single=template, special_tokens=in_template)
    return PreTrainedTokenizerFast(tokenizer_object=backend, model_max_length=64, **special_tokens)


def save_tiny_paraphraser(folder: str | Path, seed: int = 0) -> Path:
    """Save a tiny T5 (d_model 16, one layer each side) and its tokenizer to ``folder``; return the folder.

    Loads back with ``AutoModelForSeq2SeqLM`` / ``AutoTokenizer``. Its
    generation config suppresses pad/unk and asks for at least two new
    tokens, so beam search and sampling both return non-empty text.
    """
    import torch
    from transformers import GenerationConfig, T5Config, T5ForConditionalGeneration

    tokenizer = build_word_tokenizer(_T5_SPECIALS, "$A </s>", pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    config = T5Config(
        vocab_size=len(_T5_SPECIALS) + len(TINY_TEXT_WORDS),
        d_model=16,
        d_kv=8,
        d_ff=32,
        num_layers=1,
        num_decoder_layers=1,
        num_heads=2,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = T5ForConditionalGeneration(config).eval()
    model.generation_config = GenerationConfig(
        decoder_start_token_id=0, pad_token_id=0, eos_token_id=1, suppress_tokens=[0, 2], min_new_tokens=2
    )
    with staged_folder(folder) as stage:
        model.save_pretrained(stage)
        tokenizer.save_pretrained(stage)
    return Path(folder)


def save_tiny_captioner(folder: str | Path, seed: int = 0, image_size: int = 32) -> Path:
    """Save a tiny BLIP captioner (hidden 16, one layer per tower) and its processor to ``folder``; return it.

    Loads back with ``AutoModelForImageTextToText`` / ``AutoProcessor``.
    The decoder's output bias rules out every special token, so a caption
    always runs to ``max_new_tokens`` words.
    """
    import torch
    import transformers
    from transformers import (
        BlipConfig,
        BlipForConditionalGeneration,
        BlipImageProcessor,
        BlipProcessor,
    )

    tokenizer = build_word_tokenizer(
        _BLIP_SPECIALS,
        "[CLS] $A [SEP]",
        pad_token="[PAD]",
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        bos_token="[DEC]",
    )
    ids = {t: i for i, t in enumerate(_BLIP_SPECIALS)}
    vision = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
              "image_size": image_size, "patch_size": 8, "projection_dim": 16, "initializer_range": 1.0}  # fmt: skip
    text = {"vocab_size": len(_BLIP_SPECIALS) + len(TINY_TEXT_WORDS), "hidden_size": 16, "intermediate_size": 32,
            "num_hidden_layers": 1, "num_attention_heads": 2, "encoder_hidden_size": 16, "max_position_embeddings": 64,
            "pad_token_id": ids["[PAD]"], "bos_token_id": ids["[DEC]"], "sep_token_id": ids["[SEP]"],
            "eos_token_id": ids["[SEP]"], "projection_dim": 16, "initializer_range": 1.0}  # fmt: skip
    # Weights ~N(0, 1) rather than BLIP's 0.02: at 0.02 the image barely reaches the decoder and
    # every image gets the same caption, which would hide a winner/loser mix-up in tests.
    config = BlipConfig(
        vision_config=vision, text_config=text, projection_dim=16, image_text_hidden_size=16, initializer_range=1.0
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = BlipForConditionalGeneration(config).eval()
    with torch.no_grad():
        model.text_decoder.cls.predictions.bias[: len(_BLIP_SPECIALS)] = -1e4
    # transformers 5 without torchvision falls back to the PIL image processor with a warning; name it directly.
    image_processor_class = getattr(transformers, "BlipImageProcessorPil", BlipImageProcessor)
    processor = BlipProcessor(
        image_processor=image_processor_class(size={"height": image_size, "width": image_size}), tokenizer=tokenizer
    )
    with staged_folder(folder) as stage:
        model.save_pretrained(stage)
        processor.save_pretrained(stage)
    return Path(folder)
