"""The one training loop: setup -> train -> save, for every method and every backbone.

Reads straight through. Methods differ only by their Objective (and by how
their data is grouped); families only by their Backbone. Works unchanged under
``accelerate launch`` (DDP, FSDP, DeepSpeed).

Reproducibility: each group's noise, timestep and prompt dropout come from a
generator seeded by (seed, epoch, index) of its row, and the data order is a
pure function of (seed, epoch), so a resumed run replays exactly the batches
and noise the uninterrupted run would have seen, and how groups are split
into micro-batches and processes does not change what they are trained on.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch.utils.data import DataLoader

from diffalign.backbones import load_backbone
from diffalign.config import ConfigError
from diffalign.dtypes import parse_dtype

from .checkpoint import list_checkpoints, read_state, register_denoiser_hooks, resolve_resume, save_checkpoint
from .config import TrainConfig
from .data import TrainingData, build_training_data
from .export import save_final
from .finite import NonFiniteGuard, NonFiniteTrainingError, agree_across_processes, any_nonfinite, require_finite_weights
from .hub import hub_is_offline, push_folder
from .metrics import MetricsWriter, MetricWindow, read_metrics
from .model_card import render_model_card
from .run_folder import claim_output_dir
from .models import (
    build_lr_scheduler,
    build_optimizer,
    build_policy_and_reference,
    enable_memory_savers,
)
from .objectives import objective_entry
from .reference_errors import AUTO, AUTO_FOLDER, ReferenceErrors, store_reference_errors, stored_reference_covers
from .performance import compile_denoiser, set_malloc_mmap_threshold, use_channels_last
from .pso.online import Reward, SampledStep, resolve_reward
from .step import DenoisingStep
from .trackers import accelerate_log_with, flat_hyperparameters
from .validation import Scorer, Validator

logger = logging.getLogger("diffalign.train")

@dataclass
class TrainResult:
    """Where a finished run put its outputs."""

    output_dir: Path
    final_dir: Path
    metrics_file: Path
    steps: int
    skipped_rows: int
    nonfinite_steps: int = 0  # optimizer steps skipped for a NaN/inf loss or gradient norm


def train(config: TrainConfig, reward: Reward | None = None, validation_scorer: Scorer | None = None) -> TrainResult:
    """Run a training recipe to ``train.max_steps`` (resuming if asked) and save the final weights.

    ``reward(images, prompts) -> scores``: the reward of methods that sample their own images
    (online PSO). The toy reward is built in; a scorer is passed in by the caller (the CLI), as is
    ``validation_scorer`` (same signature), which scores the validation images (``validation.scorer``).
    """
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState
    from accelerate.utils import ProjectConfiguration

    output_dir = Path(config.train.output_dir)
    if config.train.push_to_hub and hub_is_offline():
        raise ConfigError("train.push_to_hub=true but HF_HUB_OFFLINE is set: unset it, or set train.push_to_hub=false "
                          "and push later with `diffalign push OUTPUT_DIR REPO_ID`")
    log_with = accelerate_log_with(config.train.report_to)  # a missing tracker package fails here, before any loading
    set_malloc_mmap_threshold(config.train.malloc_mmap_threshold)  # before the models' memory is allocated
    accelerator = Accelerator(
        gradient_accumulation_steps=config.train.gradient_accumulation_steps,
        mixed_precision=config.train.mixed_precision,
        log_with=log_with,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
    )
    try:
        if config.validation.scorer is not None and validation_scorer is None and config.validation.active(accelerator.device.type):
            raise ConfigError(
                f"validation.scorer={config.validation.scorer!r} is loaded by `diffalign train`; from Python pass "
                "validation_scorer=... to diffalign.trainers.loop.train"
            )
        if config.train.mixed_precision == "fp16" and accelerator.device.type == "cpu":
            raise ConfigError(
                "train.mixed_precision=fp16 needs a GPU: PyTorch's CPU kernels do not run fp16 training. "
                "On CPU use train.mixed_precision=bf16 (fast on CPUs with AMX / AVX512-BF16) or no."
            )
        return _run(config, accelerator, reward, validation_scorer)
    finally:
        # accelerate keeps process-wide singletons; release them (not the process group) so another
        # run in this process (quickstart, tests, notebooks) may use other precision/accumulation.
        AcceleratorState._reset_state(reset_partial_state=False)
        GradientState._reset_state()


@dataclass
class TrainingSetup:
    """Everything a run builds before its first step (shared with benchmarks/train_step.py)."""

    objective: Any
    backbone: Any
    data: TrainingData
    policy: Any
    reference: Any
    optimizer: Any
    lr_scheduler: Any
    trainable: list
    weight_dtype: torch.dtype
    learning_rate: float
    effective_batch: int
    step: Callable[..., Any]  # (policy, reference, batch) -> ObjectiveOutput


def setup_training(config: TrainConfig, accelerator, reward: Reward | None = None) -> TrainingSetup:
    """Method, model, data and optimisation, prepared by accelerate; the reference stays unwrapped."""
    run = config.train
    weight_dtype = torch.float32 if run.mixed_precision == "no" else parse_dtype(run.mixed_precision)
    entry = objective_entry(config.method.name)
    objective = entry.build(config.method)  # type: ignore[arg-type]
    _check_reference_errors_setting(config, objective.needs_reference, entry.step)
    precomputed = None if run.reference_errors in (None, AUTO) else ReferenceErrors(run.reference_errors, config)
    # Validation images need the text encoders and the VAE even when training reads a cache.
    validating = config.validation.active(accelerator.device.type)
    backbone = load_backbone(config.model, load_encoders=config.data.cache_dir is None or validating)
    data = build_training_data(config, backbone, entry.data, accelerator)
    backbone.to(accelerator.device, weight_dtype)
    if run.reference_errors == AUTO:  # before adapters or a frozen copy exist: the base is the reference
        precomputed = _reference_errors_in_process(config, accelerator, backbone, data)
    policy, reference = build_policy_and_reference(
        backbone, run.mode, config.lora, objective.needs_reference and precomputed is None, weight_dtype, accelerator.device
    )
    enable_memory_savers(policy, run.gradient_checkpointing, config.model.attention)
    if run.channels_last:
        use_channels_last(policy)
        if reference is not None and run.mode == "full":
            use_channels_last(reference.network)  # type: ignore[attr-defined]
    compile_denoiser(policy, run.compile)
    trainable = [p for p in policy.parameters() if p.requires_grad]
    effective_batch = run.batch_size * run.gradient_accumulation_steps * accelerator.num_processes
    learning_rate = run.learning_rate * effective_batch if run.scale_lr else run.learning_rate
    optimizer = build_optimizer(trainable, run, learning_rate)
    lr_scheduler = build_lr_scheduler(optimizer, run, accelerator.num_processes)
    register_denoiser_hooks(accelerator, lora=run.mode == "lora")
    policy, optimizer, lr_scheduler = accelerator.prepare(policy, optimizer, lr_scheduler)
    if run.mode == "lora" and reference is not None:
        reference.network = accelerator.unwrap_model(policy)  # type: ignore[attr-defined]
    if entry.step == "sampled":
        step = SampledStep(backbone, objective, config.method, config.data.resolution, resolve_reward(config.method, reward), weight_dtype)
    else:
        step = DenoisingStep(backbone, objective, config.data.resolution, config.data.empty_prompt_prob, weight_dtype, precomputed)
    return TrainingSetup(
        objective, backbone, data, policy, reference, optimizer, lr_scheduler, trainable, weight_dtype, learning_rate, effective_batch, step
    )


def _check_reference_errors_setting(config: TrainConfig, needs_reference: bool, step_kind: str) -> None:
    """Before any model loads: a method without a precomputable reference refuses the setting."""
    if config.train.reference_errors is not None and (not needs_reference or step_kind == "sampled"):
        raise ConfigError(
            f"train.reference_errors: method {config.method.name} "
            + ("uses no reference model" if not needs_reference else "samples its own images online")
            + "; unset train.reference_errors"
        )


def _reference_errors_in_process(config: TrainConfig, accelerator, backbone, data: TrainingData) -> ReferenceErrors:
    """train.reference_errors=auto: the main process computes the store with the base model already
    loaded (no second start-up), or reuses <output_dir>/reference_errors when it is current and covers
    this run (a resume); every process then reads it."""
    folder = Path(config.train.output_dir) / AUTO_FOLDER
    if accelerator.is_main_process:
        if stored_reference_covers(folder, config, accelerator.num_processes):
            print(f"diffalign: reusing the reference errors in {folder}")
        else:
            store_reference_errors(config, backbone, data, folder, accelerator.num_processes,
                                   config.train.reference_batch_size, accelerator.device)
    accelerator.wait_for_everyone()
    return ReferenceErrors(folder, config)


def _run(config: TrainConfig, accelerator, reward: Reward | None, validation_scorer: Scorer | None) -> TrainResult:
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm

    run = config.train
    output_dir = Path(run.output_dir)
    set_seed(run.seed)
    # The folder must be this run's before anything is written to it (run_folder.py).
    resuming = resolve_resume(run.resume_from, output_dir) is not None
    claim_output_dir(config, accelerator.num_processes, resuming, write=accelerator.is_main_process)
    if accelerator.is_main_process:
        (output_dir / "config.yaml").write_text(config.to_yaml())
    accelerator.wait_for_everyone()

    # --- setup: method, model, data, optimisation ---------------------------------------------
    setup = setup_training(config, accelerator, reward)
    backbone, data, reference = setup.backbone, setup.data, setup.reference
    policy, optimizer, lr_scheduler, trainable = setup.policy, setup.optimizer, setup.lr_scheduler, setup.trainable
    learning_rate, effective_batch = setup.learning_rate, setup.effective_batch
    processes = accelerator.num_processes

    step = micro_step = 0  # micro_step counts batches drawn by this process (empty ones included)
    guard = NonFiniteGuard(run.max_nonfinite_steps, scaler_handles_overflow=accelerator.scaler is not None)
    checkpoint = resolve_resume(run.resume_from, output_dir)
    if checkpoint is not None:
        accelerator.load_state(str(checkpoint))
        require_finite_weights(accelerator, policy, f"cannot resume from {checkpoint} (written before diffalign checked weights)")
        state = read_state(checkpoint)
        step, micro_step = int(state["step"]), int(state["micro_step"])
        guard.load_state(state)
        logger.info("resumed from %s at step %d", checkpoint, step)
    elif run.resume_from == "latest":
        logger.info("no checkpoint in %s yet: starting a new run", output_dir)

    loader = DataLoader(
        data.dataset,
        batch_sampler=data.batch_sampler(run.batch_size, run.seed, start_batch=micro_step * processes),
        collate_fn=data.collate,
        num_workers=config.data.loader_workers(reads_cache=config.data.cache_dir is not None),
    )
    loader = accelerator.prepare(loader)
    if accelerator.is_main_process:
        hyperparameters = {**flat_hyperparameters(config.model_dump(mode="json")), "effective_learning_rate": learning_rate,
                           "effective_batch": effective_batch}
        accelerator.init_trackers("diffalign", config=hyperparameters, init_kwargs=_tracker_options(output_dir))
        print(
            f"diffalign: {config.method.name} on {backbone.family} ({run.mode}), {len(data.dataset)} groups, "
            f"effective batch {effective_batch} = {run.batch_size} x {run.gradient_accumulation_steps} accumulation "
            f"x {processes} processes, {run.max_steps} steps" + (f", resuming at {step}" if step else "")
        )
    metrics_writer = MetricsWriter(output_dir / "metrics.jsonl", enabled=accelerator.is_main_process, truncate_after=step)
    window = MetricWindow()
    validator = Validator.for_run(config, accelerator, backbone, setup.weight_dtype, validation_scorer)
    if validator is not None and step == 0:  # the base model once, before any update (not again on resume)
        scores = validator.before_training(accelerator, accelerator.unwrap_model(policy), reference)
        if scores:
            accelerator.log(scores, step=0)
            metrics_writer.write(0, scores)
    progress = tqdm(
        total=run.max_steps, initial=step, desc="train", disable=not (run.progress_bar and accelerator.is_local_main_process)
    )

    # --- train ----------------------------------------------------------------------------------
    policy.train()
    loader_iter = iter(loader)
    loss_nonfinite = None  # on device, over the micro-batches of the current accumulation window (no host sync)
    while step < run.max_steps:
        batch = next(loader_iter)
        micro_step += 1
        if not data.usable(batch):  # every row of this batch failed to decode: reported, nothing to train on
            continue
        with accelerator.accumulate(policy):
            output = setup.step(policy, reference, batch)
            accelerator.backward(output.loss)
            bad_loss = any_nonfinite(output.loss)
            loss_nonfinite = bad_loss if loss_nonfinite is None else loss_nonfinite | bad_loss
            grad_norm = None
            update = True
            if accelerator.sync_gradients:
                grad_norm = accelerator.clip_grad_norm_(trainable, run.max_grad_norm or math.inf)
                grad_norm = None if grad_norm is None else float(grad_norm)
                # One NaN update makes every later weight NaN: every process skips the same steps (finite.py).
                loss_finite = not agree_across_processes(accelerator, loss_nonfinite)
                update = guard.should_update(step + 1, loss_finite, grad_norm)
                loss_nonfinite = None
            # fp16's loss scaler skips a step with non-finite gradients itself, and must see every step: its
            # unscale_() in clip_grad_norm_ is only reset by the update() inside optimizer.step().
            if update or guard.scaler_handles_overflow:
                optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        window.add({"loss": output.loss.detach(), **output.metrics})
        if not accelerator.sync_gradients:
            continue
        step += 1
        progress.update(1)
        if not update:
            logger.warning("step %d: non-finite loss or gradient norm (%s); update skipped (%d in a row, %d in all)",
                           step, grad_norm, guard.consecutive, guard.skipped)
        scores = {}
        if validator is not None and validator.due(step, run.max_steps):
            scores = validator.run(accelerator, accelerator.unwrap_model(policy), step)
        if step % run.log_every == 0 or step == run.max_steps:
            logs = window.reduce(accelerator) | scores
            logs["lr"] = lr_scheduler.get_last_lr()[0]
            if grad_norm is not None:
                logs["grad_norm"] = grad_norm
            if guard.skipped:  # absent from finite runs, whose metrics stay as they were
                logs["nonfinite_skipped"] = guard.skipped
            accelerator.log(logs, step=step)
            metrics_writer.write(step, logs)
            progress.set_postfix(loss=f"{logs['loss']:.4g}", acc=f"{logs.get('implicit_acc', float('nan')):.2f}")
        elif scores:
            accelerator.log(scores, step=step)
            metrics_writer.write(step, scores)
        window.clear()
        if guard.exhausted:
            progress.close()
            accelerator.end_training()
            raise NonFiniteTrainingError(f"{guard.stop_message(step)} Newest checkpoint: {_newest_checkpoint(output_dir)}.")
        if step % run.checkpointing_steps == 0 or step == run.max_steps:
            save_checkpoint(
                accelerator, output_dir, step, {"micro_step": micro_step, **guard.state()}, run.checkpoints_total_limit, model=policy
            )
    progress.close()

    # --- save -----------------------------------------------------------------------------------
    accelerator.wait_for_everyone()
    require_finite_weights(accelerator, policy, f"refusing to write {output_dir / 'final'}")
    final_dir = output_dir / "final"
    if accelerator.is_main_process:
        record = {"base_model": config.model.path, "method": config.method.name, "steps": step}
        if guard.skipped:
            record["nonfinite_skipped_steps"] = guard.skipped
        network = accelerator.unwrap_model(policy)
        last = [row for row in read_metrics(metrics_writer.path) if "loss" in row] if metrics_writer.path.exists() else []
        location = run.hub_model_id if run.push_to_hub and run.hub_model_id else str(final_dir.resolve())
        card = render_model_card(config, backbone, type(network).__name__, step, last[-1] if last else {}, location)
        final_dir = save_final(network, backbone, output_dir, run.mode, record, model_card=card)
        summary = data.report.summary()
        (output_dir / "skipped_rows.json").write_text(json.dumps(data.report.to_dict(), indent=2))  # ids per reason
        print(summary)
        if guard.skipped:
            print(f"diffalign: skipped the updates of {guard.skipped} optimizer step(s) whose loss or gradient norm was "
                  f"not finite (latest: {guard.skipped_steps}); see nonfinite_skipped in {metrics_writer.path}")
        print(f"diffalign: final weights in {final_dir}; metrics in {metrics_writer.path}")
    accelerator.end_training()
    if run.push_to_hub and accelerator.is_main_process:
        url = push_folder(final_dir, location, private=run.hub_private, commit_message=f"diffalign {config.method.name}, {step} steps")
        print(f"diffalign: pushed {final_dir} to {url}")
    return TrainResult(output_dir, final_dir, metrics_writer.path, step, data.report.total, guard.skipped)


def _tracker_options(output_dir: Path) -> dict[str, dict[str, Any]]:
    """wandb writes its run folder into the output folder unless $WANDB_DIR says otherwise."""
    import os

    return {} if os.environ.get("WANDB_DIR") else {"wandb": {"dir": str(output_dir)}}


def _newest_checkpoint(output_dir: Path) -> str:
    """For the stop message: the newest weights on disk (all finite: save_checkpoint checks)."""
    checkpoints = list_checkpoints(output_dir)
    return str(checkpoints[-1]) if checkpoints else "none yet"
