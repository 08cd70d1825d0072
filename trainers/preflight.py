"""Checks a run can pass before any model loads: the output folder, the data, a hub-id model.

Why: the training loop opens the data after loading the model (tens of seconds at full scale,
a minute of hub retries when the model is a hub id and the network is down), so a typo in
``data.path``, an empty file, a missing caption column or an output path that is a file used to
surface late, some as tracebacks. These checks open only the data's cheap columns and stat
paths; every failure is a ConfigError or FileNotFoundError whose message names the key.
"""

from __future__ import annotations

from pathlib import Path

from diffalign.config import ConfigError
from diffalign.data import SkipReport, open_source, require_rows
from diffalign.data.captioned import rows_with_captions
from diffalign.data.prompts import PromptSource

from .config import TrainConfig
from .objectives import objective_entry
from .run_folder import check_output_dir

__all__ = ["check_data", "check_model_path", "check_run_inputs"]


def check_run_inputs(config: TrainConfig, output: bool = True) -> None:
    """Everything :func:`train` would find wrong before its first step that needs no model (``output``: train.output_dir too)."""
    if output:
        check_output_dir(Path(config.train.output_dir))
    check_data(config)
    check_model_path(config.model.path, config.model.revision)


def check_data(config: TrainConfig, from_cache: bool = True) -> None:
    """Open the data as the method will (cheap columns only) and require at least one row.

    A run that reads an existing ``data.cache_dir`` (``from_cache``) is checked against its cache by the
    loop instead; ``diffalign cache`` (which reads the raw data to build it) passes ``from_cache=False``.
    """
    data = config.data
    if from_cache and data.cache_dir is not None and Path(data.cache_dir).exists():
        return
    layout = objective_entry(config.method.name).data
    quiet = SkipReport(log_first=0, log_every=10**9)  # the run reports the skipped rows itself
    try:
        if layout == "prompts":
            prompts = PromptSource(data.path, quiet, data.max_rows)
            require_rows(len(prompts), quiet, prompts.name)
            return
        if layout == "sampled_reference_pairs":
            return  # data.path is replaced by pairs sampled from the model; the loop checks them
        source = open_source(data, quiet)
        if layout == "captioned_pairs":
            source = rows_with_captions(source, quiet, config.method.name)
        require_rows(len(source), quiet, source.name)
    except ConfigError:
        raise
    except (FileNotFoundError, ValueError) as error:  # a missing or bad data set: name the key and the way out
        raise ConfigError(f"data.path={data.path}: {_without_path(str(error), data.path).rstrip('.')}. {_DATA_HINT}") from None


_DATA_HINT = ("Point data.path at preference data (Pick-a-Pic-style parquet with jpg_0, jpg_1, label_0, caption; a JSONL "
              "manifest; ranked lists); `diffalign data check PATH` reports what is wrong with a data set, row by row.")


def _without_path(message: str, path: str) -> str:
    """The reader's message without its leading ``PATH: `` (the error already starts with ``data.path=PATH``)."""
    for prefix in (f"{path}: ", f"{Path(path).expanduser()}: ", f"{path!r}: "):
        if message.startswith(prefix):
            return message[len(prefix):]
    return message


def check_model_path(path: str, revision: str | None = None) -> None:
    """A model.path that is neither a local folder nor in the hub cache needs the hub: fail now when it cannot be reached."""
    from diffalign.hub_access import hub_unavailable_reason, looks_like_hub_id

    if Path(path).expanduser().exists():
        return
    if not looks_like_hub_id(path):
        raise FileNotFoundError(f"model.path={path}: no such local folder (and it is not a hub id owner/name); "
                                "pass a diffusers pipeline folder (`diffalign tiny sd15 PATH` makes a tiny one)")
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(path, "model_index.json", revision=revision)
    reason = None if isinstance(cached, str) else hub_unavailable_reason()
    if reason is not None:
        raise FileNotFoundError(
            f"model.path={path}: not a local folder and not in the local hub cache, and {reason}. "
            "Pass a local diffusers pipeline folder as model.path (downloaded on a machine with hub access)."
        )
