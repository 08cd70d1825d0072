"""The Objective seam: a method is a pure function of per-sample errors.

An Objective never sees a model, a batch or the config namespace: it gets the
policy's and (if it needs one) the reference's per-sample denoising errors,
arranged ``[G, K]`` (G groups, K images per group, best first), and returns a
scalar loss plus metrics. That makes every method testable with hand-computed
numbers, with no model in the test.
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
    """What the training loop needs from a method.

    ``needs_reference``: whether the loop must build a reference (MaPO does not).
    ``requires``: data the method cannot work without: ``"captions"`` (a caption per
    image, DCPO: rows lacking them are reported and skipped when the data is opened) or
    ``"reference_images"`` (offline PSO: each training image is paired with a sample of
    the initial model, drawn once and cached).
    ``likelihood``: ``"denoising"`` (errors [G, K] of the ELBO proxy on data
    images) or ``"sampler"`` (negative log-probabilities [G, K, S] of the S
    stochastic transitions of the policy's own few-step samples: online PSO).
    """

    needs_reference: bool
    requires: tuple[str, ...]
    likelihood: str

    def __call__(
        self, policy_errors: Tensor, reference_errors: Tensor | None, scores: Tensor | None = None
    ) -> ObjectiveOutput:
        """policy_errors, reference_errors: [G, K] (or [G, K, S]) best image first; scores [G, K] label scores."""
        ...


def check_errors(method: str, policy_errors: Tensor, reference_errors: Tensor | None, group_size: int | None) -> None:
    """Shape checks every objective shares: [G, K] policy errors (K fixed when given), a matching reference."""
    if policy_errors.ndim != 2 or (group_size is not None and policy_errors.shape[1] != group_size):
        expected = f"[G, {group_size}]" if group_size is not None else "[G, K]"
        raise ValueError(f"{method} expects {expected} errors (best first), got {tuple(policy_errors.shape)}")
    if reference_errors is not None and reference_errors.shape != policy_errors.shape:
        raise ValueError(
            f"reference errors {tuple(reference_errors.shape)} do not match policy errors {tuple(policy_errors.shape)}"
        )


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
