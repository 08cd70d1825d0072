"""Experiment trackers through accelerate: which names exist, that their packages are installed,
the run's hyperparameters, and images.

``train.report_to`` takes accelerate's names (its ``LoggerType``), checked when the config is read;
whether the tracker's package is installed is checked before the run starts, so a missing ``wandb``
is a one-line error and not a traceback after the model has loaded.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import PIL.Image
from accelerate.utils import LoggerType

from diffalign.config import ConfigError

# Every tracker accelerate can drive; its pip package has the same name.
TRACKER_NAMES: tuple[str, ...] = tuple(t.value for t in LoggerType if t is not LoggerType.ALL)
SPECIAL_NAMES = ("all", "none")


def check_tracker_names(value: str | list[str]) -> str | list[str]:
    """``value`` unchanged if every name is accelerate's (or 'all' / 'none' alone), else a ValueError listing them."""
    names = [value] if isinstance(value, str) else list(value)
    if not names:
        raise ValueError("give at least one tracker, or 'none'")
    unknown = [name for name in names if name not in TRACKER_NAMES + SPECIAL_NAMES]
    if unknown:
        raise ValueError(
            f"unknown tracker {', '.join(map(repr, unknown))}; choose from {', '.join(TRACKER_NAMES)}, "
            "'all' (every installed one) or 'none'"
        )
    if len(names) > 1 and any(name in SPECIAL_NAMES for name in names):
        raise ValueError("'all' and 'none' stand alone; list tracker names instead")
    return value


def accelerate_log_with(report_to: str | list[str]) -> list[str] | str | None:
    """What ``Accelerator(log_with=...)`` takes; raises ConfigError naming the pip package of a missing tracker."""
    import accelerate.utils

    names = [report_to] if isinstance(report_to, str) else list(report_to)
    if names == ["none"]:
        return None
    if names == ["all"]:
        return "all"
    missing = [name for name in names if not getattr(accelerate.utils, f"is_{name}_available")()]
    if missing:
        raise ConfigError(
            f"train.report_to={report_to!r}: {', '.join(missing)} is not installed; run `pip install "
            f"{' '.join(missing)}`, or drop it from train.report_to (train.report_to=none logs to metrics.jsonl only)"
        )
    return names


def flat_hyperparameters(values: dict[str, Any], prefix: str = "") -> dict[str, str | int | float | bool]:
    """A nested config as one level of dotted keys with scalar values (TensorBoard's hparams take nothing else).

    Lists become their JSON text, None the string "null" (so every key is still shown).
    """
    flat: dict[str, str | int | float | bool] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flat_hyperparameters(value, prefix=f"{name}."))
        elif value is None:
            flat[name] = "null"
        elif isinstance(value, (str, int, float, bool)):
            flat[name] = value
        else:
            flat[name] = json.dumps(value)
    return flat


def log_images(accelerator: Any, key: str, images: list[PIL.Image.Image], captions: list[str], step: int) -> None:
    """Log ``images`` under ``key`` to every tracker that takes images (mlflow and comet_ml through accelerate do not)."""
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.log_images({key: np.stack([np.asarray(image) for image in images])}, step, dataformats="NHWC")
        elif tracker.name == "wandb":
            import wandb

            tracker.log({key: [wandb.Image(image, caption=caption) for image, caption in zip(images, captions)]}, step=step)
        elif hasattr(tracker, "log_images"):
            tracker.log_images({key: images}, step=step)
