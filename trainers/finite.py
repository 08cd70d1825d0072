"""Non-finite training: detect a NaN/inf loss or gradient norm every step, skip it, stop when it persists.

One NaN gradient turns every weight it touches into NaN, and from then on every
checkpoint and the final weights are NaN while the run reports success. So each
optimizer step is checked before its update: a step whose loss (any micro-batch
of its accumulation window, on any process) or gradient norm is not finite is
skipped (no update, no optimizer-moment change, gradients dropped) and counted;
``train.max_nonfinite_steps`` consecutive skipped steps stop the run with
:class:`NonFiniteTrainingError`. A skipped step still consumes its data and
advances the step counter and LR schedule, so which batches and noise every
later step sees is unchanged: exact resume holds, and a finite run is untouched.

Two cases where the update is not the guard's to skip: under fp16 the loss scaler
skips every step whose gradients hold NaN or inf and lowers its scale, and must see
every step (the loop always calls ``optimizer.step()`` there); a finite loss with an
infinite gradient norm is its expected warm-up and is not counted, a non-finite loss
is. Under DeepSpeed the engine updates inside ``backward``, so a bad step is detected
(and stops the run) but cannot be undone. Either way the weights are checked before
every checkpoint and before ``final/`` (:func:`require_finite_weights`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

LIKELY_CAUSES = (
    "Likely causes: a learning rate too high (train.learning_rate, and train.scale_lr, which multiplies it by the "
    "effective batch), a β too large for the method (method.beta: the sigmoid's argument overflows), or reduced "
    "precision overflowing (train.mixed_precision=fp16: try bf16 or no). Lower the suspect and train again; "
    "train.max_nonfinite_steps sets how many consecutive bad steps are skipped before a run stops."
)


class NonFiniteTrainingError(RuntimeError):
    """A run stopped because its loss, gradients or weights stopped being finite numbers."""


@dataclass
class NonFiniteGuard:
    """Counts skipped steps and decides when to stop; its counts travel in checkpoints (exact resume)."""

    max_consecutive: int  # stop when this many optimizer steps in a row were not finite (1: at the first)
    scaler_handles_overflow: bool = False  # fp16 loss scaling: infinite gradients with a finite loss are its business
    skipped: int = 0  # steps skipped over the whole run
    consecutive: int = 0
    skipped_steps: list[int] = field(default_factory=list)  # the most recent ones, for messages
    last_cause: str = ""
    last_grad_norm: float | None = None

    def state(self) -> dict[str, int]:
        return {"nonfinite_skipped": self.skipped, "nonfinite_consecutive": self.consecutive}

    def load_state(self, state: dict[str, Any]) -> None:
        self.skipped = int(state.get("nonfinite_skipped", 0))
        self.consecutive = int(state.get("nonfinite_consecutive", 0))

    def should_update(self, step: int, loss_finite: bool, grad_norm: float | None) -> bool:
        """Whether optimizer step ``step`` may apply its update (a skipped one is counted).

        ``loss_finite`` already covers every micro-batch and process; ``grad_norm`` is the global norm
        (None where the backend does not report one).
        """
        grad_finite = grad_norm is None or math.isfinite(grad_norm)
        if loss_finite and (grad_finite or self.scaler_handles_overflow):
            self.consecutive = 0
            return True
        self.skipped += 1
        self.consecutive += 1
        self.skipped_steps = [*self.skipped_steps[-9:], step]
        self.last_cause = {
            (False, True): "the loss was", (True, False): "the gradient norm was", (False, False): "the loss and the gradient norm were"
        }[(loss_finite, grad_finite)]
        self.last_grad_norm = grad_norm
        return False

    @property
    def exhausted(self) -> bool:
        """Non-finite steps have persisted for ``max_consecutive`` steps: the run must stop."""
        return self.consecutive >= self.max_consecutive

    def stop_message(self, step: int) -> str:
        """What stopped the run, where, what was (not) written, and what to try."""
        first = step - self.consecutive + 1
        streak = f"step {step}" if first == step else f"steps {first}-{step}"
        return (
            f"training stopped at step {step}: {self.last_cause} not finite (gradient norm {self.last_grad_norm}) "
            f"in {self.consecutive} consecutive optimizer step(s), {streak} (train.max_nonfinite_steps="
            f"{self.max_consecutive}). Their updates were skipped, so the weights are those after step {first - 1}; "
            f"no checkpoint or final weights are ever written with non-finite values, and final/ was not written. "
            f"{LIKELY_CAUSES}"
        )


def any_nonfinite(values: Tensor) -> Tensor:
    """A 0-d bool tensor: does ``values`` hold a NaN or an infinity (no host sync)."""
    return ~torch.isfinite(values.detach()).all()


def agree_across_processes(accelerator: Any, flag: Tensor) -> bool:
    """True on every process when ``flag`` is true on any: all ranks must skip the same steps."""
    total = accelerator.reduce(flag.float().reshape(1), reduction="sum")
    return bool(total.item() > 0)


def nonfinite_parameters(model: nn.Module) -> list[str]:
    """Names of this process's trainable parameters holding a NaN or an infinity."""
    return [name for name, p in model.named_parameters() if p.requires_grad and not torch.isfinite(p.detach()).all()]


def require_finite_weights(accelerator: Any, model: nn.Module, refusal: str) -> None:
    """Raise on every process if any process's trainable weights are not finite; ``refusal`` starts the message.

    Only trainable weights change during a run, so only they are checked (one pass, cheap next to a save).
    """
    bad = nonfinite_parameters(model)
    flag = torch.tensor(float(len(bad)), device=accelerator.device)
    if agree_across_processes(accelerator, flag):
        names = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "") if bad else "on another process"
        raise NonFiniteTrainingError(f"{refusal}: trainable weights hold NaN or infinity ({names}). {LIKELY_CAUSES}")
