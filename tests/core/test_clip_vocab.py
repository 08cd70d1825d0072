"""The full-scale pipelines' CLIP tokenizer is CLIP's: its BPE file, 49,408 tokens, CLIP's ids, 77-token truncation.

The BPE file comes from open_clip, the cache, or one ``pip download`` of the open_clip_torch wheel
(1.5 MB); when none of these can work here the vocabulary tests are skipped with the reason.
"""

from __future__ import annotations

import importlib.util

import pytest

from diffalign.tiny.clip_vocab import (
    CLIP_BPE_FILENAME,
    CLIP_VOCAB_SIZE,
    ClipVocabularyError,
    build_clip_tokenizer,
    clip_bpe_path,
    clip_vocab_and_merges,
)

# Ids from OpenAI CLIP's tokenizer (clip.tokenize / open_clip.tokenize): BOS 49406, EOS 49407.
KNOWN_IDS = {
    "a photo of a cat": [49406, 320, 1125, 539, 320, 2368, 49407],
    "A photo of a DOG": [49406, 320, 1125, 539, 320, 1929, 49407],  # lower-cased, as CLIP does
    "12": [49406, 272, 273, 49407],  # CLIP splits numbers into single digits
}


@pytest.fixture(scope="module")
def bpe():
    try:
        return clip_bpe_path()
    except ClipVocabularyError as error:
        pytest.skip(f"CLIP's BPE file is not available here: {error}")


def test_vocabulary_has_clip_layout(bpe):
    vocab, merges = clip_vocab_and_merges(bpe)
    assert len(vocab) == CLIP_VOCAB_SIZE and len(merges) == 48_894
    assert vocab["<|startoftext|>"] == 49406 and vocab["<|endoftext|>"] == 49407
    assert vocab["a</w>"] == 320 and vocab["cat</w>"] == 2368 and vocab["!"] == 0


@pytest.mark.parametrize("prompt", sorted(KNOWN_IDS))
def test_prompts_tokenize_to_clip_ids(bpe, prompt):
    assert build_clip_tokenizer(bpe)(prompt).input_ids == KNOWN_IDS[prompt]


def test_long_prompts_truncate_to_77_with_eos_and_pad_as_published(bpe):
    tokenizer = build_clip_tokenizer(bpe)
    ids = tokenizer("cat " * 200, truncation=True, padding="max_length", max_length=tokenizer.model_max_length).input_ids
    assert len(ids) == 77 and ids[0] == 49406 and ids[-1] == 49407 and ids[1:-1] == [2368] * 75
    padded = tokenizer("cat", padding="max_length", max_length=77).input_ids
    assert padded[:3] == [49406, 2368, 49407] and set(padded[3:]) == {49407}
    open_clip_style = build_clip_tokenizer(bpe, pad_token="!")("cat", padding="max_length", max_length=77).input_ids
    assert open_clip_style[:3] == [49406, 2368, 49407] and set(open_clip_style[3:]) == {0}


@pytest.mark.skipif(importlib.util.find_spec("open_clip") is None, reason="open_clip is not installed")
def test_matches_open_clip_simple_tokenizer(bpe):
    from open_clip.tokenizer import SimpleTokenizer

    reference = SimpleTokenizer()
    tokenizer = build_clip_tokenizer(bpe)
    for prompt in ["a photo of a cat", "An astronaut riding a horse on Mars, 4k, trending!", "naïve café—über"]:
        expected = [49406, *reference.encode(prompt), 49407]
        assert tokenizer(prompt).input_ids == expected, prompt


def test_a_missing_or_wrong_file_fails_with_how_to_get_it(tmp_path, monkeypatch):
    with pytest.raises(ClipVocabularyError, match="pip download open_clip_torch --no-deps"):
        clip_bpe_path(tmp_path / CLIP_BPE_FILENAME)
    wrong = tmp_path / "wrong.txt.gz"
    wrong.write_bytes(b"not the vocabulary")
    monkeypatch.setenv("DIFFALIGN_CLIP_BPE", str(wrong))
    with pytest.raises(ClipVocabularyError, match="SHA-256 differs"):
        clip_bpe_path()
