"""final/README.md: the model card's metadata, its figures, and loading code that loads what the run wrote."""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from diffalign.apps.cli import main
from diffalign.trainers.config import load_train_config
from diffalign.trainers.metrics import read_metrics
from diffalign.trainers.model_card import render_model_card

REPO = Path(__file__).resolve().parents[2]


def split_card(text: str) -> tuple[dict, str]:
    """(front matter, body) of a card that starts with a YAML block between --- lines."""
    match = re.match(r"^---\n(.*?)\n---\n(.*)$", text, flags=re.DOTALL)
    assert match, "the card starts with YAML front matter"
    return yaml.safe_load(match.group(1)), match.group(2)


def python_block(body: str) -> str:
    blocks = re.findall(r"```python\n(.*?)```", body, flags=re.DOTALL)
    assert len(blocks) == 1
    return blocks[0]


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_card_of_a_run_describes_it_and_its_code_loads_the_weights(mode, tiny_models, toy_pairs, train_args, tmp_path):
    out = tmp_path / "run"
    assert main(train_args("sd15", tiny_models["sd15"], toy_pairs, out, f"train.mode={mode}", "train.max_steps=2",
                           "train.learning_rate=5e-2", "train.scale_lr=false", "method.beta=2500", "train.report_to=none")) == 0
    meta, body = split_card((out / "final" / "README.md").read_text())
    assert meta["library_name"] == "diffusers"
    assert meta["tags"][:3] == ["diffalign", "dpo", "text-to-image"] and mode in meta["tags"]
    assert "base_model" not in meta and "datasets" not in meta, "local folders are no hub ids: named in the body only"
    assert str(tiny_models["sd15"]) in body and str(toy_pairs) in body
    assert "| method.beta | 2500.0 |" in body and "| learning rate | 0.05 |" in body and "| steps | 2 |" in body
    last = read_metrics(out / "metrics.jsonl")[-1]
    assert f"## Final metrics (step {last['step']})" in body and f"| loss | {last['loss']:.6g} |" in body

    # The snippet, as a user on a CPU runs it (fp32, cpu), minus the generation itself.
    code = python_block(body).replace("torch.float16", "torch.float32").replace('"cuda"', '"cpu"')
    assert code.rstrip().splitlines()[-1].startswith("image = pipe(")
    namespace: dict = {}
    exec("\n".join(code.rstrip().splitlines()[:-1]), namespace)  # noqa: S102 (our own card's code)
    loaded = namespace["pipe"].unet
    from diffusers import UNet2DConditionModel

    base = UNet2DConditionModel.from_pretrained(tiny_models["sd15"], subfolder="unet")
    if mode == "lora":
        assert re.search(rf'load_lora_weights\("{re.escape(str((out / "final").resolve()))}", weight_name="pytorch_lora_weights.safetensors"\)', code)
        from safetensors.torch import load_file

        saved = load_file(out / "final" / "pytorch_lora_weights.safetensors")
        adapters = {n.replace(".default_0.", "."): p for n, p in loaded.named_parameters() if ".lora_" in n}
        assert saved and all(torch.equal(adapters[k.removeprefix("unet.")], v) for k, v in saved.items())
    else:
        assert f'from_pretrained("{(out / "final").resolve()}", subfolder="unet"' in code
        trained = UNet2DConditionModel.from_pretrained(out / "final" / "unet")
        assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), trained.state_dict().values()))
        assert any(not torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), base.state_dict().values()))


def test_front_matter_names_hub_base_model_data_set_and_known_license():
    config = load_train_config(str(REPO / "configs/sdxl/dpo.yaml"), ["train.mode=lora"])
    backbone = SimpleNamespace(family="sdxl", pipeline_class_name="StableDiffusionXLPipeline", denoiser_subfolder="unet")
    card = render_model_card(config, backbone, "UNet2DConditionModel", 2000, {"step": 2000, "loss": 0.5}, "me/sdxl-dpo")
    meta, body = split_card(card)
    assert meta["base_model"] == "stabilityai/stable-diffusion-xl-base-1.0"
    assert meta["datasets"] == ["yuvalkirstain/pickapic_v2"] and meta["license"] == "openrail++"
    assert 'pipe.load_lora_weights("me/sdxl-dpo", weight_name="pytorch_lora_weights.safetensors")' in body
    assert 'StableDiffusionXLPipeline.from_pretrained("stabilityai/stable-diffusion-xl-base-1.0", torch_dtype=torch.bfloat16)' in body
    unknown = load_train_config(str(REPO / "configs/sdxl/dpo.yaml"), ["model.path=someone/their-model"])
    assert "license" not in split_card(render_model_card(unknown, backbone, "UNet2DConditionModel", 1, {}, "x"))[0]
