"""The objective registry: every method registered with its own schema, data layout and step; unknown names and bad registrations refused."""

from __future__ import annotations

from typing import get_args

import pytest

from diffalign.trainers.objectives import OBJECTIVES, DataLayout, DiffusionDPO, DPOConfig, StepKind, objective_entry


def test_unknown_objective_lists_valid_names() -> None:
    with pytest.raises(KeyError) as info:
        objective_entry("dpoo")
    message = info.value.args[0]
    assert "'dpoo'" in message
    for name in OBJECTIVES:
        assert name in message
    assert "dpo" in message


def test_a_registration_with_an_unknown_layout_or_step_is_refused() -> None:
    from diffalign.trainers.objectives import register_objective

    with pytest.raises(ValueError, match="data must be one of"):
        register_objective("dpo-typo", DPOConfig, lambda c: DiffusionDPO(beta=1.0), data="pair")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="step one of"):
        register_objective("dpo-typo", DPOConfig, lambda c: DiffusionDPO(beta=1.0), step="sampler")  # type: ignore[arg-type]
    with pytest.raises(KeyError):
        objective_entry("dpo-typo")  # nothing half-registered


def test_every_method_is_registered_with_its_own_schema() -> None:
    for name in ("dpo", "mapo", "rankdpo", "dcpo", "pso", "pso-online"):
        entry = objective_entry(name)
        config = entry.config_class()
        assert config.name == name
        objective = entry.build(config)
        assert entry.data in get_args(DataLayout) and entry.step in get_args(StepKind)
        assert (entry.step == "sampled") == (entry.data == "prompts"), "only a sampling method reads prompts alone"
        assert callable(objective)
