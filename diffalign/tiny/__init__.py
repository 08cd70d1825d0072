"""Tiny random-weight models shaped like the real ones, built in code so tests and the quickstart need no hub.

* :mod:`~diffalign.tiny.pipelines` -- SD 1.5 / SD 2.1 / SDXL / SD3 pipelines and a CLIP scorer backbone;
* :mod:`~diffalign.tiny.tokenizer` -- the local CLIP-style BPE tokenizer they share;
* :mod:`~diffalign.tiny.full_scale` -- SD 1.5 / SDXL / SD3-medium at their published sizes, random weights;
* :mod:`~diffalign.tiny.clip_vocab` -- the real CLIP BPE vocabulary and tokenizer the full-scale pipelines use;
* :mod:`~diffalign.tiny.t5` -- SD3's T5 encoder and its Unigram tokenizer (``save_pipeline("sd3", ..., t5=True)``);
* :mod:`~diffalign.tiny.text_models` -- a T5 paraphraser and a BLIP captioner for the caption strategies;
* :mod:`~diffalign.tiny.clip_scorer` -- a tiny CLIP reward model for the CLIP scorers (clipscore, pickscore).

Callers import from here; the modules are split only by what they build.
"""

from diffalign.tiny.clip_scorer import TINY_CLIP_IMAGE_SIZE, TINY_CLIP_TOWER, save_tiny_clip
from diffalign.tiny.clip_vocab import CLIP_VOCAB_SIZE, ClipVocabularyError, build_clip_tokenizer, clip_bpe_path
from diffalign.tiny.full_scale import (
    FULL_SCALE_FAMILIES,
    build_full_scale_pipeline,
    full_scale_parameter_counts,
    save_full_scale_pipeline,
)
from diffalign.tiny.pipelines import (
    FAMILIES,
    SD3_FAMILIES,
    SDXL_TIME_EMBED_DIM,
    TEXT_HIDDEN_SIZE,
    Family,
    build_pipeline,
    build_text_encoder,
    build_transformer_sd3,
    build_unet,
    build_vae,
    save_clip,
    save_pipeline,
)
from diffalign.tiny.t5 import T5_HIDDEN_SIZE, T5_VOCAB_SIZE, build_t5_encoder, build_t5_tokenizer
from diffalign.tiny.text_models import (
    TINY_TEXT_WORDS,
    build_word_tokenizer,
    save_tiny_captioner,
    save_tiny_paraphraser,
)
from diffalign.tiny.tokenizer import (
    BOS_TOKEN,
    BOS_TOKEN_ID,
    END_OF_WORD,
    EOS_TOKEN,
    EOS_TOKEN_ID,
    TOY_VOCAB_SIZE,
    TOY_WORDS,
    build_tokenizer,
)

__all__ = [
    "BOS_TOKEN",
    "BOS_TOKEN_ID",
    "CLIP_VOCAB_SIZE",
    "ClipVocabularyError",
    "END_OF_WORD",
    "EOS_TOKEN",
    "EOS_TOKEN_ID",
    "FAMILIES",
    "SD3_FAMILIES",
    "FULL_SCALE_FAMILIES",
    "Family",
    "SDXL_TIME_EMBED_DIM",
    "T5_HIDDEN_SIZE",
    "T5_VOCAB_SIZE",
    "TEXT_HIDDEN_SIZE",
    "TINY_CLIP_IMAGE_SIZE",
    "TINY_CLIP_TOWER",
    "TINY_TEXT_WORDS",
    "TOY_VOCAB_SIZE",
    "TOY_WORDS",
    "build_clip_tokenizer",
    "build_full_scale_pipeline",
    "build_pipeline",
    "build_t5_encoder",
    "build_t5_tokenizer",
    "build_text_encoder",
    "build_tokenizer",
    "build_transformer_sd3",
    "build_unet",
    "build_vae",
    "build_word_tokenizer",
    "clip_bpe_path",
    "full_scale_parameter_counts",
    "save_clip",
    "save_full_scale_pipeline",
    "save_pipeline",
    "save_tiny_captioner",
    "save_tiny_clip",
    "save_tiny_paraphraser",
]
