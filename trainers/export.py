"""The run's final weights, in the formats stock diffusers loads.

LoRA: ``final/pytorch_lora_weights.safetensors`` written by the family's
pipeline ``save_lora_weights`` (so ``pipe.load_lora_weights(final)`` takes it).
Full fine-tune: ``final/unet`` or ``final/transformer`` via ``save_pretrained``.
``final/diffalign.json`` records the base model, so the result can be
reloaded without remembering it; ``final/README.md`` is the model card (:mod:`.model_card`).
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any

from torch import nn

from diffalign.backbones import Backbone, denoiser_subfolder

from diffalign.atomic import full_disk_is_reported, staged_folder

RECORD_FILE = "diffalign.json"
MODEL_CARD_FILE = "README.md"


def save_final(
    network: nn.Module, backbone: Backbone, output_dir: str | Path, mode: str, record: dict[str, Any], model_card: str | None = None
) -> Path:
    """Write ``output_dir/final`` atomically (staging folder, then rename), with ``model_card`` as its README.md."""
    final = Path(output_dir) / "final"
    intact = "the checkpoints are complete" + ("; the previous final/ is unchanged" if final.exists() else "")
    with full_disk_is_reported(final, intact), staged_folder(final) as staging:  # staging is removed on error
        _write_final(staging, network, backbone, mode, record)
        if model_card is not None:
            (staging / MODEL_CARD_FILE).write_text(model_card, encoding="utf-8")
    return final


def _write_final(staging: Path, network: nn.Module, backbone: Backbone, mode: str, record: dict[str, Any]) -> None:
    import diffusers

    if mode == "lora":
        from peft.utils import get_peft_model_state_dict

        pipeline_class = getattr(diffusers, backbone.pipeline_class_name)
        # PEFT key names as they are: every family's loader reads them. (diffusers' old-style
        # renaming turns to_q/k/v into `lora.down/up`, which the SD3 loader then silently skips.)
        layers = get_peft_model_state_dict(network)
        kwargs: dict[str, Any] = {backbone.lora_layers_argument: layers, "safe_serialization": True}
        metadata_argument = backbone.lora_layers_argument.replace("_layers", "_adapter_metadata")
        if metadata_argument in inspect.signature(pipeline_class.save_lora_weights).parameters:
            kwargs[metadata_argument] = network.peft_config["default"].to_dict()  # keeps alpha != rank exact
        pipeline_class.save_lora_weights(str(staging), **kwargs)
    else:
        network.save_pretrained(str(staging / backbone.denoiser_subfolder))
    (staging / RECORD_FILE).write_text(json.dumps({"mode": mode, "family": backbone.family, **record}, indent=2))


def load_trained_denoiser(final: str | Path, base_denoiser: nn.Module) -> nn.Module:
    """The trained network from ``final``: LoRA merged onto ``base_denoiser``, or the saved full network."""
    final = Path(final)
    record = json.loads((final / RECORD_FILE).read_text())
    if record["mode"] == "full":
        return type(base_denoiser).from_pretrained(str(final / denoiser_subfolder(record["family"])))
    base_denoiser.load_lora_adapter(
        str(final),
        prefix=denoiser_subfolder(record["family"]),
        weight_name="pytorch_lora_weights.safetensors",
    )
    return base_denoiser
