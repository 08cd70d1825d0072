"""How chatty the command line is: quiet by default, ``--verbose`` brings the libraries' output back.

Why: a one-step run used to print transformers' "Loading weights" bars, datasets' "Generating
train split" bars, diffusers' "modules kept in float32: []" warning and torchvision's
UserWarnings around the few lines that matter (diffalign's own summaries and training's
progress bar, which stay). ``--quiet`` also turns off diffalign's own progress bars.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import logging
import os
import sys
import types
import warnings
from typing import Any

__all__ = ["QUIET_ENVIRONMENT", "configure_output", "show_progress"]

_LIBRARY_LOGGERS = ("httpx", "urllib3", "huggingface_hub", "diffusers", "transformers", "accelerate", "datasets", "torchvision")
QUIET_ENVIRONMENT = {  # read by the libraries when they are imported (the CLI imports them lazily, after this)
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
    "TRANSFORMERS_VERBOSITY": "error",
    "DIFFUSERS_VERBOSITY": "error",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
}

_NOISY_WARNING_MODULES = r"(torchvision|huggingface_hub|diffusers|transformers|accelerate|datasets)(\.|$)"

_quiet_progress = False
_verbose = False


def configure_output(verbose: bool = False, quiet: bool = False) -> None:
    """Library logging and progress bars: shown with ``verbose``, else errors only; ``quiet``: no diffalign bars either."""
    global _quiet_progress, _verbose
    _quiet_progress, _verbose = quiet, verbose
    if not any(isinstance(finder, _QuietDiffusersOnImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _QuietDiffusersOnImport())
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    level = logging.WARNING if verbose else logging.ERROR
    for name in _LIBRARY_LOGGERS:
        logging.getLogger(name).setLevel(level)
    if verbose:
        for key, value in QUIET_ENVIRONMENT.items():
            if os.environ.get(key) == value:
                os.environ.pop(key)
    else:
        for key, value in QUIET_ENVIRONMENT.items():
            os.environ.setdefault(key, value)
        for category in (UserWarning, FutureWarning):  # deprecation notes meant for the libraries' callers, not users
            warnings.filterwarnings("ignore", category=category, module=_NOISY_WARNING_MODULES)
    _apply_to_loaded_libraries(verbose)


class _QuietDiffusersOnImport(importlib.abc.MetaPathFinder):
    """diffusers ignores HF_HUB_DISABLE_PROGRESS_BARS, and importing it eagerly costs seconds: when the CLI's
    lazy imports first load ``diffusers.utils.logging``, turn its bars ("Loading pipeline components") off."""

    target = "diffusers.utils.logging"

    def find_spec(self, name: str, path: Any, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if name != self.target:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return spec
        execute = spec.loader.exec_module

        def exec_module(module: types.ModuleType) -> None:
            execute(module)
            if not _verbose:
                module.disable_progress_bar()

        spec.loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


def _apply_to_loaded_libraries(verbose: bool) -> None:
    """Libraries imported before ``main`` ran (tests, notebooks) read no environment again: tell them directly."""
    if "transformers" in sys.modules:
        from transformers.utils import logging as transformers_logging

        transformers_logging.set_verbosity_warning() if verbose else transformers_logging.set_verbosity_error()
        transformers_logging.enable_progress_bar() if verbose else transformers_logging.disable_progress_bar()
    if "diffusers" in sys.modules:
        from diffusers.utils import logging as diffusers_logging

        diffusers_logging.set_verbosity_warning() if verbose else diffusers_logging.set_verbosity_error()
        diffusers_logging.enable_progress_bar() if verbose else diffusers_logging.disable_progress_bar()
    if "datasets" in sys.modules:
        import datasets

        datasets.enable_progress_bars() if verbose else datasets.disable_progress_bars()
    if "huggingface_hub" in sys.modules:
        from huggingface_hub.utils import disable_progress_bars, enable_progress_bars

        enable_progress_bars() if verbose else disable_progress_bars()


def show_progress(requested: bool = True) -> bool:
    """Whether a diffalign progress bar is drawn: asked for, not ``--quiet``, and stderr is a terminal."""
    return requested and not _quiet_progress and sys.stderr.isatty()
