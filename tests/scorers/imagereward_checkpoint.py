"""A tiny random ImageReward checkpoint in the reference's own format, for the scorer tests.

``ImageReward.pt`` carries THUDM/ImageReward's key names (``blip.visual_encoder.*``,
``blip.text_encoder.*``, ``mlp.layers.*``, plus the unused projections) beside a
``med_config.json``, written straight from tensors: the scorer's converter and transformers'
BLIP classes are not used to make it.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import torch

SIZE, PATCH = 32, 8  # tiny ViT: 32 px input, 8 px patches -> 16 patches + [CLS]
VIT = {"width": 48, "depth": 2, "heads": 4, "mlp": 192}
MED = {
    "architectures": ["BertModel"], "attention_probs_dropout_prob": 0.1, "hidden_act": "gelu",
    "hidden_dropout_prob": 0.1, "hidden_size": 32, "initializer_range": 0.02, "intermediate_size": 64,
    "layer_norm_eps": 1e-12, "max_position_embeddings": 40, "model_type": "bert", "num_attention_heads": 4,
    "num_hidden_layers": 2, "pad_token_id": 0, "type_vocab_size": 2, "vocab_size": 40,
    "encoder_width": 768, "add_cross_attention": True,
}  # fmt: skip
WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "an", "the", "of", "on", "in", "with", "photo",
         "red", "green", "blue", "cat", "dog", "circle", "square", "small", "big", "two", "##s"]  # fmt: skip


def reference_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors under the reference names, shaped as BLIP_Pretrain + MLP would save them."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) * scale

    def linear(prefix: str, d_in: int, d_out: int) -> None:
        state[prefix + "weight"] = randn(d_out, d_in, scale=d_in**-0.5)
        state[prefix + "bias"] = randn(d_out, scale=0.1)

    def norm(prefix: str, dim: int) -> None:
        state[prefix + "weight"] = 1 + randn(dim, scale=0.1)
        state[prefix + "bias"] = randn(dim, scale=0.1)

    state: dict[str, torch.Tensor] = {}
    v, dv, dt = "blip.visual_encoder.", VIT["width"], MED["hidden_size"]
    # A small input stream (std ~1e-3) makes the first LayerNorm's eps (1e-6 in vit.py) matter.
    state[v + "cls_token"] = randn(1, 1, dv, scale=1e-3)
    state[v + "pos_embed"] = randn(1, (SIZE // PATCH) ** 2 + 1, dv, scale=1e-3)
    state[v + "patch_embed.proj.weight"] = randn(
        dv, 3, PATCH, PATCH, scale=1e-3 * (3 * PATCH * PATCH) ** -0.5
    )
    state[v + "patch_embed.proj.bias"] = randn(dv, scale=1e-3)
    for i in range(VIT["depth"]):
        b = f"{v}blocks.{i}."
        norm(b + "norm1.", dv)
        linear(b + "attn.qkv.", dv, 3 * dv)
        linear(b + "attn.proj.", dv, dv)
        norm(b + "norm2.", dv)
        linear(b + "mlp.fc1.", dv, VIT["mlp"])
        linear(b + "mlp.fc2.", VIT["mlp"], dv)
    norm(v + "norm.", dv)
    t = "blip.text_encoder."
    state[t + "embeddings.word_embeddings.weight"] = randn(MED["vocab_size"], dt)
    state[t + "embeddings.position_embeddings.weight"] = randn(
        MED["max_position_embeddings"], dt, scale=0.5
    )
    state[t + "embeddings.position_ids"] = torch.arange(
        MED["max_position_embeddings"]
    ).expand(1, -1)
    norm(t + "embeddings.LayerNorm.", dt)
    for i in range(MED["num_hidden_layers"]):
        layer = f"{t}encoder.layer.{i}."
        for block, d_kv in (("attention.", dt), ("crossattention.", dv)):
            linear(layer + block + "self.query.", dt, dt)
            linear(layer + block + "self.key.", d_kv, dt)
            linear(layer + block + "self.value.", d_kv, dt)
            linear(layer + block + "output.dense.", dt, dt)
            norm(layer + block + "output.LayerNorm.", dt)
        linear(layer + "intermediate.dense.", dt, MED["intermediate_size"])
        linear(layer + "output.dense.", MED["intermediate_size"], dt)
        norm(layer + "output.LayerNorm.", dt)
    linear("blip.vision_proj.", dv, 16)
    linear("blip.text_proj.", dt, 16)
    for index, (d_in, d_out) in zip(
        (0, 2, 4, 6, 7), itertools.pairwise([dt, 1024, 128, 64, 16, 1]), strict=True
    ):
        linear(f"mlp.layers.{index}.", d_in, d_out)
    return state


def save_imagereward(root: Path) -> dict[str, Path]:
    """``weights/`` (ImageReward.pt + med_config.json) and ``tokenizer/`` (a tiny WordPiece BERT tokenizer)."""
    from transformers import BertTokenizerFast

    (root / "vocab").mkdir()
    (root / "vocab" / "vocab.txt").write_text("\n".join(WORDS) + "\n")
    BertTokenizerFast.from_pretrained(root / "vocab").save_pretrained(root / "tokenizer")
    (root / "weights").mkdir()
    torch.save(reference_state(), root / "weights" / "ImageReward.pt")
    (root / "weights" / "med_config.json").write_text(json.dumps(MED))
    return {"weights": root / "weights", "tokenizer": root / "tokenizer", "root": root}


def imagereward_options(paths: dict[str, Path]) -> dict[str, object]:
    """``load_scorer`` options that point the scorer at the tiny checkpoint's tokenizer and ViT heads."""
    return {"tokenizer": str(paths["tokenizer"]), "vision_heads": VIT["heads"]}
