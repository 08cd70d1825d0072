"""The Objective seam: a method is a pure function of per-sample errors.

An Objective never sees a model, a batch or the config namespace: it gets the
policy's and (if it needs one) the reference's per-sample denoising errors,
arranged ``[G, K]`` (G groups, K images per group, best first), and returns a
scalar loss plus metrics. That makes every method testable with hand-computed
numbers (STYLE.md, principle 1).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol

from pydantic import BaseModel
from torch import Tensor


@dataclass
class ObjectiveOutput:
    """A scalar loss to minimise and detached per-batch metrics (means over groups)."""

    loss: Tensor
    metrics: dict[str, Tensor] = field(default_factory=dict)


class Objective(Protocol):
    """What the training loop needs from a method."""

    needs_reference: bool

    def __call__(self, policy_errors: Tensor, reference_errors: Tensor | None) -> ObjectiveOutput:
        """policy_errors, reference_errors: [G, K] per-sample denoising errors, best image first."""
        ...


@dataclass(frozen=True)
class ObjectiveEntry:
    """A registered method: its config schema and how to build it from that config."""

    config_class: type[BaseModel]
    build: Callable[[BaseModel], Objective]


OBJECTIVES: dict[str, ObjectiveEntry] = {}


def register_objective(name: str, config_class: type[BaseModel], build: Callable[[BaseModel], Objective]) -> None:
    """Add a method under ``name``; a second registration of a name is a bug."""
    if name in OBJECTIVES:
        raise ValueError(f"objective {name!r} is already registered")
    OBJECTIVES[name] = ObjectiveEntry(config_class, build)


def objective_entry(name: str) -> ObjectiveEntry:
    """Look a method up; an unknown name lists the valid ones (nothing falls back silently)."""
    try:
        return OBJECTIVES[name]
    except KeyError:
        raise KeyError(f"unknown method {name!r}; valid methods: {', '.join(sorted(OBJECTIVES))}") from None
