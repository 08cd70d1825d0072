"""DCPO: Diffusion-DPO on errors conditioned on each image's own caption, so it needs captioned pairs."""

from __future__ import annotations

import pytest
import torch

from diffalign.trainers.objectives import DCPO, DiffusionDPO, objective_entry


def t(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


def test_dcpo_loss_is_diffusion_dpo_on_its_errors_and_requires_captions() -> None:
    policy, reference = t([[0.5, 1.0], [0.9, 0.4]]), t([[0.6, 0.6], [0.3, 0.3]])
    assert DCPO(beta=4.0)(policy, reference).loss.item() == DiffusionDPO(beta=4.0)(policy, reference).loss.item()
    assert objective_entry("dcpo").data == "captioned_pairs"  # rows without per-image captions are skipped
    with pytest.raises(ValueError, match="DCPO"):
        DCPO(beta=4.0)(policy, None)
