"""Held-out evaluation: computing the reference's errors once gives the same figures as computing them twice."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch


def test_reused_reference_errors_give_the_recomputed_scores(tiny_models: dict[str, Path], toy_pairs: Path) -> None:
    """The learning tests and the quickstart score "before" (policy is reference) and "after" (reuse=before);
    both must equal a full recomputation bit for bit, or their figures would drift."""
    from diffalign.backbones import load_backbone
    from diffalign.config import ModelConfig
    from diffalign.data import SkipReport, open_preference_source
    from diffalign.trainers.evaluate import heldout_scores

    model = ModelConfig(path=str(tiny_models["sd15"]))
    backbone = load_backbone(model)
    other = load_backbone(model, load_encoders=False).denoiser
    # Seeded: with the global RNG the perturbation depended on which tests ran before in the worker, and
    # one draw in a clean-clone run scored exactly 0.5 on the 64 pairs.
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in other.parameters():
            parameter.add_(0.01 * torch.randn(parameter.shape, generator=generator))
    source = open_preference_source(str(toy_pairs), report=SkipReport())
    base = backbone.denoiser
    before = heldout_scores(backbone, base, base, source, 32, draws=2, batch_size=16)
    after = heldout_scores(backbone, other, base, source, 32, draws=2, batch_size=16, reuse=before)

    same_twice = heldout_scores(backbone, base, _Copy(base), source, 32, draws=2, batch_size=16)
    recomputed = heldout_scores(backbone, other, base, source, 32, draws=2, batch_size=16)
    assert torch.equal(before.implicit, same_twice.implicit) and torch.equal(before.policy, same_twice.policy)
    assert torch.equal(after.implicit, recomputed.implicit) and torch.equal(after.policy, recomputed.policy)
    assert before.accuracy() == 0.5 and after.accuracy() != 0.5
    with pytest.raises(ValueError, match="draws, seed"):
        heldout_scores(backbone, other, base, source, 32, draws=3, batch_size=16, reuse=before)


class _Copy(torch.nn.Module):
    """The same network behind another object, so ``policy is reference`` is false and both are run."""

    def __init__(self, network: torch.nn.Module) -> None:
        super().__init__()
        self.network = network

    def forward(self, *args, **kwargs):
        return self.network(*args, **kwargs)


def test_stored_base_scores_are_reused_and_a_torn_or_foreign_store_is_recomputed(tiny_models, toy_pairs, tmp_path, capsys):
    """The quickstart and the learning tests keep the base's held-out scores (base_heldout_scores): a reuse
    must give the very figures a recomputation gives, and a damaged store must be said and replaced."""
    from diffalign.apps.quickstart import base_heldout_scores, base_heldout_store
    from diffalign.backbones import load_backbone
    from diffalign.config import ModelConfig
    from diffalign.data import SkipReport, open_preference_source
    from diffalign.trainers.config import train_config_from_dict
    from diffalign.trainers.evaluate import HeldoutScores

    config = train_config_from_dict({"model": {"path": str(tiny_models["sd15"])}, "data": {"path": str(toy_pairs), "resolution": 32},
                                     "method": {"name": "dpo"}}, "test")
    store = base_heldout_store(tmp_path, config, toy_pairs)
    other = base_heldout_store(tmp_path, config.model_copy(update={"model": ModelConfig(path=str(tiny_models["sd2"]))}), toy_pairs)
    assert store != other, "another model must not reuse this model's errors"
    backbone = load_backbone(config.model)
    source = open_preference_source(str(toy_pairs), report=SkipReport())
    first = base_heldout_scores(backbone, source, 32, store)
    assert store.is_file() and not list(tmp_path.glob(".*.tmp*")), "written by rename, no temporary left"
    reused = base_heldout_scores(backbone, source, 32, store)
    loaded = HeldoutScores.load(store)
    for scores in (reused, loaded):
        assert scores.row_ids == first.row_ids and scores.draws_seed == first.draws_seed == (8, 1234)
        assert torch.equal(scores.reference_errors, first.reference_errors) and torch.equal(scores.implicit, first.implicit)
    assert first.accuracy() == 0.5
    assert capsys.readouterr().out == "", "a good store is reused silently"

    store.write_bytes(store.read_bytes()[:100])  # torn
    again = base_heldout_scores(backbone, source, 32, store)
    assert "is unreadable" in capsys.readouterr().out and torch.equal(again.reference_errors, first.reference_errors)
    assert torch.equal(HeldoutScores.load(store).reference_errors, first.reference_errors), "the torn store was replaced"

    HeldoutScores(["someone-else:0"], torch.zeros(1, 2), torch.zeros(1, 2), None, torch.zeros(1, 8, 2), (8, 1234)).save(store)
    assert torch.equal(base_heldout_scores(backbone, source, 32, store).reference_errors, first.reference_errors)
    assert "scored other held-out rows" in capsys.readouterr().out
