"""SD3 with its T5 encoder: the tiny T5 and tokenizer, and prompt encoding exactly as StableDiffusion3Pipeline's.

``tiny.save_pipeline("sd3", ..., t5=True)`` saves text_encoder_3/tokenizer_3, so the stock
pipeline loads the folder with no arguments, as it loads a real SD3. Parity is checked for two
``max_sequence_length`` values, with prompts that T5 truncates at each, and for ``use_t5=false``
(the pipeline's T5-less path: zeros in the T5 slot).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from diffalign import tiny
from diffalign.backbones import load_backbone
from diffalign.config import ModelConfig

diffusers = pytest.importorskip("diffusers")
from diffusers import StableDiffusion3Pipeline  # noqa: E402

# T5 tokens with </s>: 1 (""), 11, 18 (truncated at N=16), 301 (truncated at N=256; CLIP truncates it at 77).
PROMPTS = [
    "",
    "a photo of a red circle on a blue square",
    "a big red circle next to a small blue square on a white background with a cat",
    " ".join(["a red circle"] * 100),
]
CLIP_TOKENS, CLIP_WIDTH = 77, 2 * tiny.TEXT_HIDDEN_SIZE


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny.save_pipeline("sd3", tmp_path_factory.mktemp("sd3_t5") / "sd3", t5=True)


@pytest.fixture(scope="module")
def pipe(folder: Path) -> StableDiffusion3Pipeline:
    return StableDiffusion3Pipeline.from_pretrained(folder)


def pipeline_encode(pipe: StableDiffusion3Pipeline, max_sequence_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    # Under no_grad, as the pipeline's __call__ runs it: with autograd on, CPU SDPA picks another kernel
    # for T5's biased attention and the result moves by ~1e-6 (measured 3e-6 at |x| <= 3.3).
    with torch.no_grad():
        prompt_embeds, _, pooled, _ = pipe.encode_prompt(
            prompt=PROMPTS,
            prompt_2=None,
            prompt_3=None,
            device="cpu",
            num_images_per_prompt=1,
            do_classifier_free_guidance=False,
            max_sequence_length=max_sequence_length,
        )
    return prompt_embeds, pooled


# --------------------------------------------------------------------------- the tiny T5


def test_t5_tokenizer_is_t5_shaped_and_round_trips(tmp_path: Path) -> None:
    from transformers import T5TokenizerFast

    tokenizer = tiny.build_t5_tokenizer()
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2)
    assert len(tokenizer) == tiny.T5_VOCAB_SIZE
    ids = tokenizer("a photo of a red circle").input_ids
    assert len(ids) == 7 and ids[-1] == 1  # one token per toy word, then </s>
    assert tokenizer.convert_ids_to_tokens(ids[:2]) == ["\u2581a", "\u2581photo"]
    assert tokenizer("zebra").input_ids[-2] != tokenizer.unk_token_id  # other words are spelt, not lost
    assert tokenizer.decode(tokenizer("a Zebra, 2 cats!").input_ids, skip_special_tokens=True) == "a Zebra, 2 cats!"
    padded = tokenizer(["a red circle"], padding="max_length", max_length=3, truncation=True).input_ids
    assert padded == [[ids[0], tokenizer.convert_tokens_to_ids("\u2581red"), 1]]  # truncation keeps </s>
    tokenizer.save_pretrained(tmp_path)
    again = T5TokenizerFast.from_pretrained(tmp_path)
    assert [again(p).input_ids for p in PROMPTS] == [tokenizer(p).input_ids for p in PROMPTS]


def test_t5_pipeline_loads_with_no_arguments_and_generates(folder: Path, pipe: StableDiffusion3Pipeline) -> None:
    index = json.loads((folder / "model_index.json").read_text())
    assert index["text_encoder_3"] == ["transformers", "T5EncoderModel"]
    assert index["tokenizer_3"][1] in ("T5TokenizerFast", "T5Tokenizer")  # one class in transformers 5
    assert type(pipe.text_encoder_3).__name__ == "T5EncoderModel"
    # T5 is wider than the CLIP pair, as in SD3 (4096 vs 2048), so the CLIP states are zero-padded.
    assert pipe.transformer.config.joint_attention_dim == pipe.text_encoder_3.config.d_model == tiny.T5_HIDDEN_SIZE
    assert tiny.T5_HIDDEN_SIZE > CLIP_WIDTH
    images = [
        pipe(prompt, num_inference_steps=2, height=32, width=32, output_type="np",
             generator=torch.Generator().manual_seed(0)).images
        for prompt in ("a red circle", "a red circle", "a green triangle")
    ]  # fmt: skip
    assert images[0].shape == (1, 32, 32, 3) and torch.isfinite(torch.from_numpy(images[0])).all()
    assert (images[0] == images[1]).all() and not (images[0] == images[2]).all()


def test_t5_pipeline_is_deterministic_in_seed() -> None:
    def t5_state(seed: int) -> dict[str, torch.Tensor]:
        return tiny.build_pipeline("sd3", seed=seed, t5=True).text_encoder_3.state_dict()

    a, b, c = t5_state(0), t5_state(0), t5_state(1)
    assert all(torch.equal(a[k], b[k]) for k in a) and not all(torch.equal(a[k], c[k]) for k in a)
    with pytest.raises(ValueError, match="for the sd3 and sd35 families only"):
        tiny.build_pipeline("sdxl", t5=True)


# --------------------------------------------------------------------------- prompt encoding parity


@pytest.mark.parametrize("max_sequence_length", [16, 256])
def test_sd3_t5_prompt_parity(folder: Path, pipe: StableDiffusion3Pipeline, max_sequence_length: int) -> None:
    n = max_sequence_length
    untruncated = pipe.tokenizer_3(PROMPTS).input_ids
    assert max(len(ids) for ids in untruncated) > n  # T5 really truncates at this length ...
    assert min(len(ids) for ids in untruncated) < n  # ... and really pads
    backbone = load_backbone(ModelConfig(path=str(folder), max_sequence_length=n))
    assert backbone.t5_encoder is not None and backbone.max_sequence_length == n

    expected, expected_pooled = pipeline_encode(pipe, n)
    conditioning = backbone.encode_prompts(PROMPTS)
    embeds = conditioning["prompt_embeds"]
    assert embeds.shape == (len(PROMPTS), CLIP_TOKENS + n, tiny.T5_HIDDEN_SIZE)
    assert conditioning["pooled_prompt_embeds"].shape == (len(PROMPTS), CLIP_WIDTH)
    torch.testing.assert_close(embeds, expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(conditioning["pooled_prompt_embeds"], expected_pooled, atol=1e-6, rtol=0)
    # The layout: CLIP states zero-padded to T5's width, then T5's tokens, which differ per prompt.
    assert torch.count_nonzero(embeds[:, :CLIP_TOKENS, CLIP_WIDTH:]) == 0
    t5 = embeds[:, CLIP_TOKENS:]
    assert all(torch.count_nonzero(row) > 0 for row in t5)
    assert not torch.allclose(t5[1], t5[2]) and not torch.allclose(t5[2], t5[3])


@pytest.mark.parametrize("max_sequence_length", [16, 256])
def test_sd3_without_t5_puts_zeros_where_the_pipeline_does(folder: Path, max_sequence_length: int) -> None:
    """use_t5=false on a model that has T5 equals the stock pipeline loaded with text_encoder_3=None."""
    n = max_sequence_length
    backbone = load_backbone(ModelConfig(path=str(folder), use_t5=False, max_sequence_length=n))
    assert backbone.t5_encoder is None
    without_t5 = StableDiffusion3Pipeline.from_pretrained(folder, text_encoder_3=None, tokenizer_3=None)
    expected, expected_pooled = pipeline_encode(without_t5, n)
    conditioning = backbone.encode_prompts(PROMPTS)
    assert conditioning["prompt_embeds"].shape == (len(PROMPTS), CLIP_TOKENS + n, tiny.T5_HIDDEN_SIZE)
    assert torch.count_nonzero(conditioning["prompt_embeds"][:, CLIP_TOKENS:]) == 0
    torch.testing.assert_close(conditioning["prompt_embeds"], expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(conditioning["pooled_prompt_embeds"], expected_pooled, atol=1e-6, rtol=0)


def test_t5_encoding_is_per_prompt(folder: Path) -> None:
    """A prompt's T5 embedding does not depend on its batch neighbours (the cache stores rows one by one)."""
    backbone = load_backbone(ModelConfig(path=str(folder), max_sequence_length=16))
    batch = backbone.encode_prompts(PROMPTS)
    for index, prompt in enumerate(PROMPTS):
        alone = backbone.encode_prompts([prompt])
        for key in batch:
            torch.testing.assert_close(batch[key][index : index + 1], alone[key], atol=1e-6, rtol=0)
