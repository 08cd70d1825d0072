"""SD3's third text encoder at toy size: a T5 encoder and a T5 (Unigram) tokenizer, built locally.

Real SD3 encodes the prompt a third time with T5-XXL (4096 wide, twice the two
CLIP encoders' 768 + 1280 = 2048) and its SentencePiece Unigram tokenizer.
:func:`build_t5_tokenizer` builds a ``T5TokenizerFast`` (the class SD3's
pipeline takes as ``tokenizer_3``) over a vocabulary written here, so neither
the hub nor a sentencepiece model file is needed, and :func:`build_t5_encoder` a
``T5EncoderModel`` twice as wide as the tiny CLIP pair, so the pipeline's
zero-padding of the CLIP states up to the T5 width really happens.
"""

from __future__ import annotations

import string
from typing import TYPE_CHECKING

from diffalign.tiny.tokenizer import TOY_WORDS

if TYPE_CHECKING:  # heavy imports stay lazy: `import diffalign.tiny` must be cheap
    from transformers import T5EncoderModel, T5TokenizerFast

__all__ = ["T5_HIDDEN_SIZE", "T5_VOCAB_SIZE", "build_t5_encoder", "build_t5_tokenizer"]

T5_HIDDEN_SIZE = 128  # 2 x the two 32-wide tiny CLIP encoders, as T5-XXL's 4096 is 2 x 2048
_SPACE = "\u2581"  # SentencePiece's word-start marker "▁"
# T5's layout: pad 0, eos 1, unk 2; then word pieces, then single characters so any ASCII text tokenizes.
_SPECIALS = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
# Unigram scores are log-probabilities and the tokenizer picks the segmentation with the highest
# sum: a whole toy word (-1) beats spelling it ("▁" -2 plus -5 a character), so TOY_WORDS are one
# token each, and other words split into characters (or a toy word plus characters: "reds").
_VOCAB: list[tuple[str, float]] = [
    *_SPECIALS,
    (_SPACE, -2.0),
    *((_SPACE + word, -1.0) for word in TOY_WORDS),
    *((char, -5.0) for char in string.ascii_letters + string.digits + string.punctuation),
]
T5_VOCAB_SIZE = len(_VOCAB)


def build_t5_tokenizer(max_length: int = 512) -> T5TokenizerFast:
    """A T5 tokenizer over the local Unigram vocabulary, with the pipeline transformers builds for T5.

    As for T5's SentencePiece model: whitespace split, "▁" marking each word's start, ``</s>``
    appended to every sequence, ``<pad>`` (id 0) padding. Built on a ``tokenizers`` object rather
    than ``T5Tokenizer(vocab=...)``, which only transformers 5 has; it saves as ``tokenizer.json``.
    No sentinel ``<extra_id_*>`` tokens: prompt encoding never uses them. Non-ASCII characters
    map to ``<unk>``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    backend = Tokenizer(models.Unigram(list(_VOCAB), unk_id=2, byte_fallback=False))
    metaspace = dict(replacement=_SPACE, prepend_scheme="always", split=True)
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(**metaspace)]
    )
    backend.decoder = decoders.Metaspace(**metaspace)
    backend.post_processor = processors.TemplateProcessing(
        single=["$A", "</s>"], pair=["$A", "</s>", "$B", "</s>"], special_tokens=[("</s>", 1)]
    )
    return T5TokenizerFast(tokenizer_object=backend, extra_ids=0, model_max_length=max_length)


def build_t5_encoder(hidden_size: int = T5_HIDDEN_SIZE, seed: int = 0) -> T5EncoderModel:
    """Tiny ``T5EncoderModel`` (two layers, T5 v1.1's gated-GELU feed-forward as in SD3's T5-XXL).

    A pure function of ``seed``; the caller's RNG state is left untouched.
    """
    import torch
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=T5_VOCAB_SIZE,
        d_model=hidden_size,
        d_kv=hidden_size // 4,
        d_ff=2 * hidden_size,
        num_layers=2,
        num_heads=4,
        feed_forward_proj="gated-gelu",
        is_encoder_decoder=False,
        use_cache=False,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = T5EncoderModel(config)
    return model.eval()
