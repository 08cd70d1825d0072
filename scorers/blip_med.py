"""ImageReward's network on transformers' BLIP classes, and the converter from the reference checkpoint.

ImageReward (Xu et al. 2023; THUDM/ImageReward, ``ImageReward/ImageReward.py``) is

    image_embeds = ViT(pixels)                               # BLIP ViT-L/16, [N, 1 + (224/16)^2, 1024]
    h = BERT(input_ids, attention_mask, cross-attending to image_embeds)   # BLIP "med" BERT
    raw = MLP(h[:, 0])                                       # [CLS] -> 768 -> 1024 -> 128 -> 64 -> 16 -> 1

transformers' ``BlipVisionModel`` and ``BlipTextModel`` are ports of BLIP's ``vit.py`` and
``med.py`` (same layer order, LayerNorm placement, exact-erf GELU, qkv layout, additive
padding mask), so the reference state dict maps onto them by renaming alone; no tensor is
reshaped. The MLP is the improved-aesthetic-predictor head ImageReward copies
(:class:`~diffalign.scorers.clip_scorers.AestheticHead`, linear layers, no activations).

The converter is strict: every reference key is either renamed onto a parameter, or is one
of the few known unused ones (:data:`UNUSED_REFERENCE_KEYS`); anything else, and any
parameter left without a value, raises naming the keys in the reference's spelling.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .base import load_checkpoint
from .clip_scorers import AestheticHead

__all__ = [
    "UNUSED_REFERENCE_KEYS",
    "ImageRewardNetwork",
    "build_imagereward_network",
    "load_reference_state_dict",
    "ours_to_reference",
    "read_med_config",
    "reference_to_ours",
]

UNUSED_REFERENCE_KEYS = frozenset(
    {
        # BLIP_Pretrain's contrastive projections: saved in ImageReward.pt, unused by the score.
        "blip.vision_proj.weight",
        "blip.vision_proj.bias",
        "blip.text_proj.weight",
        "blip.text_proj.bias",
        # med.py's persistent arange buffer; transformers rebuilds it (non-persistent).
        "blip.text_encoder.embeddings.position_ids",
    }
)

# (reference prefix, our prefix). med.py's BERT and transformers' BlipTextModel share names.
_PREFIXES: tuple[tuple[str, str], ...] = (
    ("blip.visual_encoder.cls_token", "vision.embeddings.class_embedding"),
    ("blip.visual_encoder.pos_embed", "vision.embeddings.position_embedding"),
    ("blip.visual_encoder.patch_embed.proj.", "vision.embeddings.patch_embedding."),
    ("blip.visual_encoder.norm.", "vision.post_layernorm."),
    ("blip.text_encoder.", "text."),
    ("mlp.layers.", "mlp.layers."),
)
_VIT_BLOCK = (r"blip\.visual_encoder\.blocks\.(\d+)\.", "vision.encoder.layers.{}.")
_VIT_BLOCK_OURS = (
    r"vision\.encoder\.layers\.(\d+)\.",
    "blip.visual_encoder.blocks.{}.",
)
# Inside a ViT block: (BLIP vit.py Block, transformers BlipEncoderLayer).
_VIT_PARTS: tuple[tuple[str, str], ...] = (
    ("norm1.", "layer_norm1."),
    ("attn.qkv.", "self_attn.qkv."),
    ("attn.proj.", "self_attn.projection."),
    ("norm2.", "layer_norm2."),
    ("mlp.fc1.", "mlp.fc1."),
    ("mlp.fc2.", "mlp.fc2."),
)


def _rename(key: str, to_ours: bool) -> str | None:
    src_i, dst_i = (0, 1) if to_ours else (1, 0)
    block_pattern, block_format = _VIT_BLOCK if to_ours else _VIT_BLOCK_OURS
    match = re.match(block_pattern, key)
    if match:
        rest = key[match.end() :]
        for part in _VIT_PARTS:
            if rest.startswith(part[src_i]):
                return (
                    block_format.format(match.group(1))
                    + part[dst_i]
                    + rest[len(part[src_i]) :]
                )
        return None
    for pair in _PREFIXES:
        if key.startswith(pair[src_i]):
            return pair[dst_i] + key[len(pair[src_i]) :]
    return None


def reference_to_ours(key: str) -> str | None:
    """``blip.visual_encoder.blocks.3.attn.proj.weight`` -> ``vision.encoder.layers.3.self_attn.projection.weight``; None if unknown."""
    return _rename(key, to_ours=True)


def ours_to_reference(key: str) -> str | None:
    """The inverse of :func:`reference_to_ours`."""
    return _rename(key, to_ours=False)


class ImageRewardNetwork(nn.Module):
    """BLIP ViT + med BERT with cross-attention + MLP; ``forward`` returns the *un-normalised* reward."""

    def __init__(self, vision: nn.Module, text: nn.Module, mlp: AestheticHead):
        super().__init__()
        self.vision, self.text, self.mlp = vision, text, mlp

    def forward(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
    ) -> torch.Tensor:
        """``[N, 3, S, S]`` pixels, ``[N, L]`` tokens and mask -> ``[N]`` float32 MLP output."""
        dtype = self.vision.embeddings.patch_embedding.weight.dtype
        image_embeds = self.vision(
            pixel_values=pixel_values.to(dtype)
        ).last_hidden_state
        image_mask = torch.ones(
            image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device
        )
        hidden = self.text(
            input_ids=input_ids,
            attention_mask=attention_mask,
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=image_mask,
            is_decoder=False,  # bidirectional self-attention, as med.py's default mode='multimodal'
        ).last_hidden_state
        # The reference casts the [CLS] feature to float32; the MLP stays float32.
        return self.mlp(hidden[:, 0, :].float()).squeeze(-1)


# BLIP's create_vit: 'base' is 768 wide with 12 heads, 'large' (ImageReward) 1024 wide with 16.
_BLIP_VIT_HEADS = {768: 12, 1024: 16}


def _vision_config(state: Mapping[str, torch.Tensor], heads: int | None) -> Any:
    """The ViT's shape, read off the reference tensors (heads are not visible in shapes)."""
    from transformers import BlipVisionConfig

    patch = state["blip.visual_encoder.patch_embed.proj.weight"]  # [D, 3, p, p]
    width, patch_size = int(patch.shape[0]), int(patch.shape[-1])
    # pos_embed: [1, 1 + (S / p)^2, D], the [CLS] position first.
    grid = int(state["blip.visual_encoder.pos_embed"].shape[1]) - 1
    side = round(grid**0.5)
    if side * side != grid:
        raise ValueError(f"pos_embed has {grid} patch positions, not a square grid")
    blocks = {int(m.group(1)) for k in state if (m := re.match(_VIT_BLOCK[0], k))}
    if heads is None:
        if width not in _BLIP_VIT_HEADS:
            raise ValueError(
                f"cannot tell the ViT's head count for width {width} (BLIP: 768 -> 12, 1024 -> 16); "
                "pass vision_heads=<int>"
            )
        heads = _BLIP_VIT_HEADS[width]
    return BlipVisionConfig(
        hidden_size=width,
        intermediate_size=int(
            state["blip.visual_encoder.blocks.0.mlp.fc1.weight"].shape[0]
        ),
        num_hidden_layers=max(blocks) + 1 if blocks else 0,
        num_attention_heads=heads,
        image_size=side * patch_size,
        patch_size=patch_size,
        layer_norm_eps=1e-6,  # vit.py: partial(nn.LayerNorm, eps=1e-6)
        hidden_act="gelu",  # vit.py: nn.GELU (exact erf)
    )


def _text_config(med_config: Mapping[str, Any], vision_width: int) -> Any:
    """BlipTextConfig from a med ``BertConfig`` json; the cross-attention width is the ViT's (blip_pretrain.py)."""
    from transformers import BlipTextConfig

    if not med_config.get("add_cross_attention", False):
        raise ValueError(
            "med_config.json must set add_cross_attention: true (ImageReward cross-attends to the image)"
        )
    if med_config.get("position_embedding_type", "absolute") != "absolute":
        raise ValueError(
            f"unsupported position_embedding_type {med_config['position_embedding_type']!r}"
        )
    return BlipTextConfig(
        vocab_size=int(med_config["vocab_size"]),
        hidden_size=int(med_config["hidden_size"]),
        encoder_hidden_size=vision_width,
        intermediate_size=int(med_config["intermediate_size"]),
        num_hidden_layers=int(med_config["num_hidden_layers"]),
        num_attention_heads=int(med_config["num_attention_heads"]),
        max_position_embeddings=int(med_config["max_position_embeddings"]),
        hidden_act=str(med_config.get("hidden_act", "gelu")),
        layer_norm_eps=float(med_config.get("layer_norm_eps", 1e-12)),
        pad_token_id=int(med_config.get("pad_token_id", 0)),
        bos_token_id=None,
        eos_token_id=None,
        sep_token_id=None,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        is_decoder=True,  # transformers builds the cross-attention blocks only for decoders
    )


def build_imagereward_network(
    state: Mapping[str, torch.Tensor],
    med_config: Mapping[str, Any],
    vision_heads: int | None = None,
) -> ImageRewardNetwork:
    """Build the network and load a reference-named state dict into it, strictly.

    Raises ``ValueError`` naming (in reference spelling) every key that is neither mapped
    nor known-unused, and every parameter the checkpoint does not provide.
    """
    from accelerate import init_empty_weights
    from transformers import BlipTextModel, BlipVisionModel

    for required in ("blip.visual_encoder.patch_embed.proj.weight", "blip.visual_encoder.pos_embed",
                     "blip.visual_encoder.blocks.0.mlp.fc1.weight", "mlp.layers.0.weight"):  # fmt: skip
        if required not in state:
            raise ValueError(
                f"ImageReward checkpoint is missing {required!r}; is this an ImageReward.pt state dict?"
            )
    vision_config = _vision_config(state, vision_heads)
    text_config = _text_config(med_config, vision_config.hidden_size)
    with (
        init_empty_weights()
    ):  # parameters on 'meta': no random init; the checkpoint is assigned below
        network = ImageRewardNetwork(
            BlipVisionModel(vision_config),
            BlipTextModel(text_config, add_pooling_layer=False),
            AestheticHead(text_config.hidden_size),
        )
    expected = network.state_dict()
    renamed, unexpected = {}, []
    for key, value in state.items():
        if key in UNUSED_REFERENCE_KEYS:
            continue
        ours = reference_to_ours(key)
        if ours in expected:
            renamed[ours] = value
        else:
            unexpected.append(key)
    missing = [
        ours_to_reference(key) or key for key in sorted(set(expected) - set(renamed))
    ]
    if unexpected or missing:
        raise ValueError(
            "ImageReward checkpoint does not match the architecture; "
            f"missing keys: {missing}; unexpected keys: {sorted(unexpected)}"
        )
    for key, value in renamed.items():
        target = expected[key]
        if tuple(value.shape) != tuple(target.shape):
            raise ValueError(
                f"shape mismatch for {ours_to_reference(key)}: checkpoint {tuple(value.shape)}, "
                f"architecture {tuple(target.shape)}"
            )
    network.load_state_dict(renamed, strict=True, assign=True)
    return network.float().eval().requires_grad_(False)


def load_reference_state_dict(
    path: str | Path, allow_pickle: bool = False
) -> dict[str, torch.Tensor]:
    """``torch.load(path, weights_only=True)``; a file that needs full unpickling needs ``allow_pickle=True``.

    Unpickling can run arbitrary code, so it is an explicit, per-call choice.
    """
    state = load_checkpoint(path, "imagereward", allow_pickle)
    if not isinstance(state, Mapping) or not all(
        isinstance(v, torch.Tensor) for v in state.values()
    ):
        raise ValueError(f"{path} is not a state dict of tensors")
    return dict(state)


def read_med_config(path: str | Path) -> dict[str, Any]:
    """The med ``BertConfig`` json as a dict."""
    return json.loads(Path(path).read_text())
