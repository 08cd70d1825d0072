"""The Objective seam: a method is a pure function of per-sample errors.

An Objective never sees a model, a batch or the config namespace: it gets the
policy's and (if it needs one) the reference's per-sample denoising errors,
arranged ``[G, K]`` (G groups, K images per group, best first), and returns a
scalar loss plus metrics. That makes every method testable with hand-computed
numbers, with no model in the test.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Literal, Protocol, get_args

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
    What data a method reads and which step computes its errors are declared where it is
    registered (:class:`ObjectiveEntry`), not asked of the objective by the loop.
    """

    needs_reference: bool

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


DataLayout = Literal["pairs", "ranked", "captioned_pairs", "sampled_reference_pairs", "prompts"]
"""How a method's training data is grouped:

- ``pairs``: preference pairs, winner first (K = 2);
- ``ranked``: ranked lists of K images with scores, best first (pairs are lists of 2);
- ``captioned_pairs``: pairs with a caption per image (DCPO); rows lacking them are reported and skipped;
- ``sampled_reference_pairs``: each training image against a sample of the initial model, drawn once
  and cached (offline PSO);
- ``prompts``: prompts only; the policy samples its own images (online PSO).
"""

StepKind = Literal["denoising", "sampled"]
"""Which step computes the objective's inputs: ``denoising`` gives per-sample errors [G, K] of the
ELBO proxy on data images; ``sampled`` gives negative log-probabilities [G, K, S] of the S stochastic
transitions of the policy's own few-step samples, with their rewards."""


@dataclass(frozen=True)
class ObjectiveEntry:
    """A registered method: its config schema, how to build it, what data it reads and which step runs it."""

    config_class: type[BaseModel]
    build: Callable[[BaseModel], Objective]
    data: DataLayout
    step: StepKind


OBJECTIVES: dict[str, ObjectiveEntry] = {}


def register_objective(
    name: str,
    config_class: type[BaseModel],
    build: Callable[[BaseModel], Objective],
    *,
    data: DataLayout = "pairs",
    step: StepKind = "denoising",
) -> None:
    """Add a method under ``name``; a second registration of a name, or an unknown layout or step, is a bug."""
    if name in OBJECTIVES:
        raise ValueError(f"objective {name!r} is already registered")
    if data not in get_args(DataLayout) or step not in get_args(StepKind):
        raise ValueError(
            f"objective {name!r}: data must be one of {get_args(DataLayout)} and step one of {get_args(StepKind)}, "
            f"got {data!r} and {step!r}"
        )
    OBJECTIVES[name] = ObjectiveEntry(config_class, build, data, step)


def objective_entry(name: str) -> ObjectiveEntry:
    """Look a method up; an unknown name lists the valid ones (nothing falls back silently)."""
    try:
        return OBJECTIVES[name]
    except KeyError:
        raise KeyError(f"unknown method {name!r}; valid methods: {', '.join(sorted(OBJECTIVES))}") from None
