"""Alignment methods, each a small Objective registered by name."""

from .base import (
    OBJECTIVES,
    DataLayout,
    Objective,
    ObjectiveEntry,
    ObjectiveOutput,
    StepKind,
    objective_entry,
    register_objective,
)
from .dcpo import DCPO, DCPOConfig
from .dpo import DiffusionDPO, DPOConfig, implicit_accuracy
from .mapo import MaPO, MaPOConfig, error_to_odds
from .pso import PSO, PSOConfig, PSOHinge, PSOOnline, PSOOnlineConfig
from .rankdpo import RankDPO, RankDPOConfig, current_ranks, ndcg, pair_weights

__all__ = [
    "OBJECTIVES",
    "DataLayout",
    "StepKind",
    "Objective",
    "ObjectiveEntry",
    "ObjectiveOutput",
    "objective_entry",
    "register_objective",
    "DiffusionDPO",
    "DPOConfig",
    "implicit_accuracy",
    "MaPO",
    "MaPOConfig",
    "error_to_odds",
    "RankDPO",
    "RankDPOConfig",
    "current_ranks",
    "ndcg",
    "pair_weights",
    "DCPO",
    "DCPOConfig",
    "PSO",
    "PSOHinge",
    "PSOOnline",
    "PSOConfig",
    "PSOOnlineConfig",
]
