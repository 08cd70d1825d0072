"""A tiny random open_clip ViT in HPSv2's reference checkpoint format, for the scorer tests.

Built by hand with open_clip's key names and shapes (the ViT-H-14 form with tiny widths), saved
as ``{"state_dict": ...}`` under the reference file names: the scorer's own code is not used to make it.
The architecture is registered with open_clip under :data:`TINY_ARCH` (``open_clip.add_model_config``
on a JSON file, open_clip's own form), so the scorers build it exactly as they build ``ViT-H-14``.
The text tower keeps CLIP's full 49,408-token vocabulary: HPS tokenizes with open_clip's bundled BPE.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from diffalign.tiny.clip_vocab import CLIP_VOCAB_SIZE

SIZE, PATCH, WIDTH, LAYERS, EMBED, CONTEXT = 32, 8, 32, 2, 16, 77
VISION_HEADS, TEXT_HEADS = 4, 4
# open_clip's JSON model-config form, as model_configs/ViT-H-14.json, with tiny numbers.
TINY_CONFIG = {
    "embed_dim": EMBED,
    "vision_cfg": {"image_size": SIZE, "layers": LAYERS, "width": WIDTH, "head_width": WIDTH // VISION_HEADS, "patch_size": PATCH},
    "text_cfg": {"context_length": CONTEXT, "vocab_size": CLIP_VOCAB_SIZE, "width": WIDTH, "heads": TEXT_HEADS, "layers": LAYERS},
}  # fmt: skip
OPEN_CLIP_WEIGHTS = "open_clip_pytorch_model.bin"
TINY_ARCH = "diffalign-tiny-vit"  # the name open_clip knows TINY_CONFIG by, once registered


def register_tiny_arch(folder: Path) -> str:
    """Write TINY_CONFIG as ``TINY_ARCH.json`` and register it with open_clip (idempotent)."""
    import open_clip

    path = folder / f"{TINY_ARCH}.json"
    path.write_text(json.dumps(TINY_CONFIG))
    if TINY_ARCH not in open_clip.list_models():
        open_clip.add_model_config(path)
    return TINY_ARCH


def open_clip_state_dict(seed: int) -> dict[str, torch.Tensor]:
    """Random weights under open_clip ``CLIP``'s keys and shapes (``x @ proj`` projections, stacked q/k/v)."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape: int, scale: float | None = None) -> torch.Tensor:
        scale = shape[-1] ** -0.5 if scale is None else scale
        return torch.randn(*shape, generator=gen) * scale

    def norm(name: str) -> dict[str, torch.Tensor]:
        return {f"{name}.weight": 1 + rand(WIDTH, scale=0.1), f"{name}.bias": rand(WIDTH, scale=0.1)}  # fmt: skip

    def linear(name: str, d_out: int, d_in: int) -> dict[str, torch.Tensor]:
        return {f"{name}.weight": rand(d_out, d_in), f"{name}.bias": rand(d_out, scale=0.1)}  # fmt: skip

    def blocks(prefix: str) -> dict[str, torch.Tensor]:
        sd: dict[str, torch.Tensor] = {}
        for i in range(LAYERS):
            p = f"{prefix}transformer.resblocks.{i}."
            sd |= norm(p + "ln_1") | norm(p + "ln_2")
            sd[p + "attn.in_proj_weight"] = rand(3 * WIDTH, WIDTH)  # q, k, v stacked
            sd[p + "attn.in_proj_bias"] = rand(3 * WIDTH, scale=0.1)
            sd |= linear(p + "attn.out_proj", WIDTH, WIDTH)
            sd |= linear(p + "mlp.c_fc", 4 * WIDTH, WIDTH)
            sd |= linear(p + "mlp.c_proj", WIDTH, 4 * WIDTH)
        return sd

    grid = (SIZE // PATCH) ** 2
    return {
        "positional_embedding": rand(CONTEXT, WIDTH, scale=0.1),
        "text_projection": rand(WIDTH, EMBED),
        "logit_scale": torch.tensor(4.6),
        "visual.class_embedding": rand(WIDTH, scale=0.5),
        "visual.positional_embedding": rand(grid + 1, WIDTH, scale=0.1),
        "visual.proj": rand(WIDTH, EMBED),
        "visual.conv1.weight": rand(WIDTH, 3, PATCH, PATCH, scale=(3 * PATCH * PATCH) ** -0.5),
        **norm("visual.ln_pre"), **blocks("visual."), **norm("visual.ln_post"),
        "token_embedding.weight": rand(CLIP_VOCAB_SIZE, WIDTH, scale=0.5),
        **blocks(""), **norm("ln_final"),
    }  # fmt: skip


def save_hps_folder(folder: Path) -> Path:
    """Both reference checkpoints (different weights), a bare open_clip state dict, the tiny architecture registered."""
    torch.save({"state_dict": open_clip_state_dict(seed=0)}, folder / "HPS_v2.1_compressed.pt")
    torch.save({"state_dict": open_clip_state_dict(seed=1)}, folder / "HPS_v2_compressed.pt")
    torch.save(open_clip_state_dict(seed=2), folder / OPEN_CLIP_WEIGHTS)  # open_clip's release form: a bare state dict
    register_tiny_arch(folder)
    return folder


def hps_options(folder: Path) -> dict[str, object]:
    """``load_scorer`` options that point an HPS scorer at the tiny architecture (registered by save_hps_folder)."""
    return {"arch": TINY_ARCH}


def open_clip_options(folder: Path) -> tuple[Path, dict[str, object]]:
    """Weights and options of ``openclip:TINY_ARCH`` on the folder's bare state dict (seed 2)."""
    return folder / OPEN_CLIP_WEIGHTS, {"variant": TINY_ARCH}
