"""Alignment methods, each a small Objective registered by name."""

from .base import OBJECTIVES, Objective, ObjectiveEntry, ObjectiveOutput, objective_entry, register_objective
from .dpo import DiffusionDPO, DPOConfig, implicit_accuracy

__all__ = [
    "OBJECTIVES",
    "Objective",
    "ObjectiveEntry",
    "ObjectiveOutput",
    "objective_entry",
    "register_objective",
    "DiffusionDPO",
    "DPOConfig",
    "implicit_accuracy",
]
