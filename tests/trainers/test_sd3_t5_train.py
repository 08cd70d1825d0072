"""SD3's DPO recipe with T5 on: training runs on the tiny SD3 with T5, T5 reaches the loss, and the cache holds it."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from safetensors.torch import load_file

from diffalign import tiny
from diffalign.apps.cli import main
from diffalign.trainers.metrics import read_metrics


@pytest.fixture(scope="module")
def sd3_t5(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny.save_pipeline("sd3", tmp_path_factory.mktemp("sd3_t5") / "sd3", t5=True)


def errors(output_dir: Path) -> list[float]:
    """Per step: the loss and the policy's denoising errors on winners and losers (these see the prompt:
    at step 1 the DPO loss is log 2 whatever the conditioning, as the LoRA starts at zero)."""
    keys = ("loss", "policy_err_winner", "policy_err_loser")
    return [row[key] for row in read_metrics(output_dir / "metrics.jsonl") for key in keys]


def test_sd3_recipe_trains_with_t5_and_from_a_t5_cache(sd3_t5, toy_pairs, train_args, tmp_path, monkeypatch):
    """configs/sd3/dpo.yaml (use_t5: true, max_sequence_length: 256) for 3 steps: finite losses, denoising
    errors that differ from a use_t5=false run's (T5's tokens reach the transformer), and the same figures
    from a `diffalign cache` built with T5, where training never loads T5."""
    import transformers

    common = ["data.random_flip=false", "train.learning_rate=1e-3", "train.scale_lr=false", "method.beta=10"]
    with_t5 = train_args("sd3", sd3_t5, toy_pairs, tmp_path / "t5", *common)
    assert main(with_t5) == 0
    rows = read_metrics(tmp_path / "t5" / "metrics.jsonl")
    assert [row["step"] for row in rows] == [1, 2, 3]
    assert all(math.isfinite(row["loss"]) for row in rows)

    assert main(train_args("sd3", sd3_t5, toy_pairs, tmp_path / "no_t5", *common, "model.use_t5=false")) == 0
    assert errors(tmp_path / "no_t5") != pytest.approx(errors(tmp_path / "t5"), rel=1e-4)

    cache = tmp_path / "cache"
    assert main(["cache", *with_t5[1:], f"data.cache_dir={cache}", "--batch-size", "8"]) == 0
    manifest = json.loads((cache / "manifest.json").read_text())
    texts = load_file(cache / manifest["text_shards"][0])
    embeds = texts["text.prompt_embeds"]
    assert embeds.shape[1:] == (77 + 256, tiny.T5_HIDDEN_SIZE)  # CLIP tokens, then the recipe's 256 T5 tokens
    assert all(row[77:].abs().sum() > 0 for row in embeds)  # T5's, not the T5-less zeros

    def refuse(*_, **__):
        raise AssertionError("training from a cache must not load T5")

    monkeypatch.setattr(transformers.T5EncoderModel, "from_pretrained", refuse)
    cached = [a.replace(str(tmp_path / "t5"), str(tmp_path / "cached")) for a in with_t5]
    assert main([*cached, f"data.cache_dir={cache}"]) == 0
    assert errors(tmp_path / "cached") == pytest.approx(errors(tmp_path / "t5"), rel=1e-5)
