"""Peer A/B: a reference training script against `diffalign train`, same work, alternating rounds.

    python benchmarks/peer_ab.py --peer-repo PATH/TO/diffusers --model SDXL_DIR --data pairs.parquet
        [--method dpo|mapo] [--precision fp32 bf16] [--steps N] [--warmup W] [--short N1] [--rounds R]
        [--threads T] [--arms raw,cached] [--batch 4] [--resolution 64] [--rank 4] [--lr 1e-5]
        [--diffalign-override key=value ...] [--diffalign-pre 'CMD' ...] [--json OUT] [--work DIR]

The peer is run from the user's own checkout, unmodified (`--peer-repo`; nothing of it is in this
repository): diffusers' `examples/research_projects/diffusion_dpo/train_diffusion_dpo_sdxl.py` for
DPO, the official MaPO repository's `train_with_lora.py` for MaPO. Both sides get the settings of
`peer_ab_settings.py`, printed side by side first; a mismatch stops the run.

**Step time**: both training loops draw a tqdm bar ("Steps", "train"). The harness reads each
run's output as it comes and notes when every step count first appears; the steady step time is
(time of count N - time of count W) / (N - W), which leaves out start-up, loading, the first W
steps and whatever a run does after its last step. `--short N1` also runs N1 steps, for the
bar-free check (T(N) - T(N1)) / (N - N1) on whole-run wall times (noisier: start-up varies).
**End to end** is T(N), the whole run's wall time, plus every pre-command diffalign needs first
(the latent cache of the `cached` arm, any `--diffalign-pre`). **Peak RSS** is `ru_maxrss` from
`os.wait4` of the run (the largest resident set of the process or any child it waited for), one
fresh process per run. Linux folds the launcher's own high-water mark into a child's `ru_maxrss`
at exec, so when the launcher is bigger than the run (a test inside a large pytest worker), the
figure is the largest VmHWM sampled from the run's process tree instead (`process_measure.py`).
Rounds alternate the order of the arms (peer, raw, cached, then cached, raw, peer, ...) so a drift of other load on the machine hits every arm alike; medians over rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))

from process_measure import Measured, load_average, measure, steady_step_time  # noqa: E402  (sibling modules of this script)
from peer_ab_settings import (  # noqa: E402
    RECIPES,
    ABSpec,
    diffalign_overrides,
    format_table,
    mismatches,
    peer_argv,
    peer_script,
    settings_rows,
    shell_line,
)

ARMS = ("raw", "cached")  # diffalign's arms; the peer is always the third
PEER_BAR, OUR_BAR = "Steps", "train"  # the tqdm bars of the training loops (the peers' and `diffalign train`'s)
GOALS = {"step": 0.5, "peak_rss": 0.8, "end_to_end": 1.0}  # issue 15: diffalign / peer must stay below


@dataclass
class ArmRound:
    """One arm in one round: its training run of N steps, an optional shorter run, its pre-commands."""

    arm: str
    round: int
    long: Measured
    steps: int
    warmup: int
    short: Measured | None = None
    short_steps: int = 0
    pre: list[Measured] = field(default_factory=list)

    def step_s(self) -> float:
        """Steady seconds per step from the run's own progress bar; else from the two run lengths."""
        timed = steady_step_time(self.long.marks, self.warmup)
        if timed is not None:
            return timed
        if self.short is None:
            raise ValueError(f"{self.arm} round {self.round}: no progress bar in {self.long.log} and no --short run")
        return step_time(self.short.wall_s, self.long.wall_s, (self.short_steps, self.steps))

    def cpu_step_s(self) -> float | None:
        """Steady CPU seconds per step (same interval as `step_s`): on a machine shared with other
        work a process's CPU time is far steadier than its wall time, and with one thread per
        process it is the wall time a quiet machine would show."""
        return steady_step_time(self.long.cpu_marks, self.warmup)

    def end_to_end_cpu_s(self) -> float:
        return self.long.cpu_s + sum(item.cpu_s for item in self.pre)

    def step_s_from_lengths(self) -> float | None:
        if self.short is None:
            return None
        return step_time(self.short.wall_s, self.long.wall_s, (self.short_steps, self.steps))

    def end_to_end_s(self) -> float:
        return self.long.wall_s + sum(item.wall_s for item in self.pre)

    def peak_rss_mib(self) -> float:
        """The training run's peak (the longer run): what the issue's memory ratio compares."""
        return self.long.peak_rss_mib


def step_time(short_s: float, long_s: float, steps: tuple[int, int]) -> float:
    """Steady-state seconds per step from two whole runs of N1 < N2 steps.

    Start-up, loading and warm-up cost the same in both runs and cancel:
    T(N) = setup + N * step  =>  step = (T(N2) - T(N1)) / (N2 - N1).
    """
    short_steps, long_steps = steps
    if long_steps <= short_steps:
        raise ValueError(f"--steps {short_steps} {long_steps}: the second length must be larger")
    return (long_s - short_s) / (long_steps - short_steps)


def arm_order(arms: list[str], round_index: int) -> list[str]:
    """Alternate the order each round (A B C, C B A, ...) so slow drifts of load hit all arms alike."""
    return list(arms) if round_index % 2 == 0 else list(reversed(arms))


def summarise(results: list[ArmRound]) -> dict[str, dict[str, float]]:
    """Median step time, end to end and peak RSS per arm, and every arm's ratios to the peer."""
    by_arm: dict[str, list[ArmRound]] = {}
    for result in results:
        by_arm.setdefault(result.arm, []).append(result)
    summary: dict[str, dict[str, float]] = {}
    for arm, rounds in by_arm.items():
        summary[arm] = {
            "rounds": len(rounds),
            "step_s": statistics.median(item.step_s() for item in rounds),
            "end_to_end_s": statistics.median(item.end_to_end_s() for item in rounds),
            "peak_rss_mib": statistics.median(item.peak_rss_mib() for item in rounds),
            "pre_s": statistics.median(sum(pre.wall_s for pre in item.pre) for item in rounds),
        }
        cpu_steps = [item.cpu_step_s() for item in rounds]
        if all(value is not None for value in cpu_steps):
            summary[arm]["cpu_step_s"] = statistics.median(cpu_steps)
            summary[arm]["end_to_end_cpu_s"] = statistics.median(item.end_to_end_cpu_s() for item in rounds)
        from_lengths = [item.step_s_from_lengths() for item in rounds]
        if all(value is not None for value in from_lengths):
            summary[arm]["step_s_from_lengths"] = statistics.median(from_lengths)
    peer = summary.get("peer")
    if peer:
        for arm, figures in summary.items():
            figures["step_ratio"] = figures["step_s"] / peer["step_s"]
            figures["end_to_end_ratio"] = figures["end_to_end_s"] / peer["end_to_end_s"]
            figures["peak_rss_ratio"] = figures["peak_rss_mib"] / peer["peak_rss_mib"]
            if "cpu_step_s" in figures and "cpu_step_s" in peer:
                figures["cpu_step_ratio"] = figures["cpu_step_s"] / peer["cpu_step_s"]
                figures["end_to_end_cpu_ratio"] = figures["end_to_end_cpu_s"] / peer["end_to_end_cpu_s"]
            if "step_s_from_lengths" in figures and "step_s_from_lengths" in peer:
                figures["step_ratio_from_lengths"] = figures["step_s_from_lengths"] / peer["step_s_from_lengths"]
    return summary


def format_summary(summary: dict[str, dict[str, float]], title: str) -> str:
    """A Markdown table: one row per arm, the ratios against the goals of issue 15."""
    lines = [
        f"**{title}**",
        "",
        "| arm | s/step | end to end (s) | of which pre (s) | peak RSS (MiB) | step ratio | e2e ratio | RSS ratio |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for arm, figures in summary.items():
        ratios = ""
        if "step_ratio" in figures and arm != "peer":
            marks = [
                f"{figures['step_ratio']:.2f}" + ("" if figures["step_ratio"] <= GOALS["step"] else " (goal <= 0.5)"),
                f"{figures['end_to_end_ratio']:.2f}"
                + ("" if figures["end_to_end_ratio"] < GOALS["end_to_end"] else " (goal < 1)"),
                f"{figures['peak_rss_ratio']:.2f}"
                + ("" if figures["peak_rss_ratio"] <= GOALS["peak_rss"] else " (goal <= 0.8)"),
            ]
            ratios = " | ".join(marks)
        else:
            ratios = "1 | 1 | 1" if arm == "peer" else " | | "
        lines.append(
            f"| {arm} | {figures['step_s']:.3f} | {figures['end_to_end_s']:.1f} | {figures['pre_s']:.1f} | "
            f"{figures['peak_rss_mib']:.0f} | {ratios} |"
        )
    if all("cpu_step_s" in figures for figures in summary.values()):
        lines += ["", "CPU time (user + system) of the same runs, steadier than wall time on a shared machine:", "",
                  "| arm | CPU s/step | CPU s end to end | CPU step ratio | CPU e2e ratio |", "|---|---|---|---|---|"]
        for arm, figures in summary.items():
            lines.append(f"| {arm} | {figures['cpu_step_s']:.3f} | {figures['end_to_end_cpu_s']:.1f} | "
                         f"{figures.get('cpu_step_ratio', float('nan')):.2f} | "
                         f"{figures.get('end_to_end_cpu_ratio', float('nan')):.2f} |")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--peer-repo", required=True, type=Path,
                        help="your checkout of huggingface/diffusers (dpo) or mapo-t2i/mapo (mapo)")
    parser.add_argument("--model", required=True, help="an SDXL diffusers folder both sides load")
    parser.add_argument("--data", required=True, type=Path, help="a Pick-a-Pic-schema .parquet file")
    parser.add_argument("--method", choices=sorted(RECIPES), default="dpo")
    parser.add_argument("--precision", nargs="+", choices=("fp32", "bf16"), default=["fp32"])
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps of every training run (N)")
    parser.add_argument("--warmup", type=int, default=3, help="steps left out of the steady step time (W)")
    parser.add_argument("--short", type=int, default=0, metavar="N1",
                        help="also run N1 < N steps per arm and round: step time from (T(N)-T(N1))/(N-N1) as a check")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="OMP/MKL threads of both sides")
    parser.add_argument("--arms", default="raw,cached", help="diffalign arms: raw (as is), cached (diffalign cache first)")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=KEY=VALUE[,KEY=VALUE...]",
                        help="one more diffalign arm: the raw arm with these overrides on top (a lever on), "
                        "e.g. --variant ref=train.reference_errors=auto; alternates with the others")
    parser.add_argument("--batch", type=int, default=4, help="pairs per optimizer step")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--beta", type=float, default=None, help="DPO beta / MaPO beta_mapo (default 5000 / 0.1)")
    parser.add_argument("--diffalign-override", action="append", default=[], metavar="KEY=VALUE",
                        help="extra diffalign override for every diffalign arm (repeatable); {work} is this arm's "
                             "folder of the round, e.g. train.reference_errors={work}/ref")
    parser.add_argument("--diffalign-pre", action="append", default=[], metavar="CMD",
                        help="a shell command run before every diffalign training run, its time counted in end to "
                             "end; {diffalign} {config} {overrides} {work} are filled in (repeatable)")
    parser.add_argument("--pyspy", default=None, metavar="PATH",
                        help="attach this py-spy to every training run (raw stacks, 20 Hz, profile-N.txt beside its "
                             "log) for benchmarks/pyspy_buckets.py; both sides alike")
    parser.add_argument("--python", default=sys.executable, help="the Python both sides run with")
    parser.add_argument("--diffalign", default=str(Path(sys.executable).with_name("diffalign")))
    parser.add_argument("--work", type=Path, default=Path("/tmp/peer_ab"), help="scratch folder (logs kept)")
    parser.add_argument("--json", type=Path, default=None)
    return parser


def child_env(threads: int, work: Path) -> dict[str, str]:
    """Same environment for both sides: thread counts, offline hubs, no W&B, one datasets cache."""
    env = dict(os.environ)
    env.update(
        OMP_NUM_THREADS=str(threads),
        MKL_NUM_THREADS=str(threads),
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        WANDB_MODE="disabled",
        TOKENIZERS_PARALLELISM="false",
        HF_DATASETS_CACHE=str(work / "hf-datasets"),
    )
    return env


def prepare_peer_dataset(data: Path, work: Path, python: str, env: dict[str, str]) -> Path:
    """The peer reads a datasets folder: link the parquet into one and convert it once (untimed).

    `load_dataset` turns a parquet folder into Arrow files in its cache on first use; doing it here
    keeps that one-off out of every timed peer run (which favours the peer in end to end).
    """
    folder = work / "peer-dataset"
    folder.mkdir(parents=True, exist_ok=True)
    link = folder / "train.parquet"
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(data.resolve())
    code = f"from datasets import load_dataset; print(load_dataset({str(folder)!r}, split='train'))"
    done = subprocess.run([python, "-c", code], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"peer_ab: datasets could not read {data} as a parquet dataset:\n{done.stderr[-2000:]}")
    return folder


def warm_files(*roots: Path) -> None:
    """Read the model and data once so no arm pays the cold page cache alone."""
    for root in roots:
        paths = [root] if root.is_file() else [path for path in root.rglob("*") if path.is_file()]
        for path in paths:
            with path.open("rb") as handle:
                while handle.read(1 << 24):
                    pass


def fill_pre(command: str, diffalign: str, config: str, overrides: list[str], work: Path) -> str:
    return command.format(
        diffalign=shlex.quote(diffalign), config=shlex.quote(config),
        overrides=" ".join(shlex.quote(item) for item in overrides), work=shlex.quote(str(work)),
    )


def in_folder(overrides: list[str], folder: Path) -> list[str]:
    """Fill `{work}` in overrides with this arm's and round's folder (a store a pre-command writes there)."""
    return [item.replace("{work}", str(folder)) for item in overrides]


def parse_variants(items: list[str]) -> dict[str, list[str]]:
    """`--variant NAME=KEY=VALUE[,KEY=VALUE...]` -> {NAME: [KEY=VALUE, ...]} (extra raw arms, a lever each)."""
    variants: dict[str, list[str]] = {}
    for item in items:
        name, _, overrides = item.partition("=")
        pairs = [pair.strip() for pair in overrides.split(",") if pair.strip()]
        if not name or name in (*ARMS, "peer") or name in variants or not pairs or not all("=" in pair for pair in pairs):
            raise ValueError(f"--variant {item!r}: want NAME=KEY=VALUE[,KEY=VALUE...] with a new NAME "
                             f"(not {', '.join((*ARMS, 'peer'))})")
        variants[name] = pairs
    return variants


def run_round_arm(arm: str, round_index: int, spec_for: Callable[[int], ABSpec], args: argparse.Namespace,
                  env: dict[str, str], peer: Path, dataset_dir: Path, scratch: Path) -> ArmRound:
    """One arm in one round: its pre-commands (diffalign), then its run of N steps (and of N1 if asked)."""
    folder = scratch / f"round{round_index}-{arm}"
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    pre: list[Measured] = []
    cache_override: list[str] = []
    recipe = RECIPES[args.method]
    variant = parse_variants(args.variant).get(arm, [])
    if arm == "cached":
        cache_override = [f"data.cache_dir={folder / 'cache'}"]
        overrides = in_folder(diffalign_overrides(spec_for(args.steps), folder / "out") + cache_override, folder)
        pre.append(measure([args.diffalign, "cache", recipe, *overrides], env, folder / "cache.log", folder))
    for index, command in enumerate(args.diffalign_pre if arm != "peer" else []):
        overrides = in_folder(diffalign_overrides(spec_for(args.steps), folder / "out") + cache_override, folder)
        line = fill_pre(command, args.diffalign, recipe, overrides, folder)
        pre.append(measure([line], env, folder / f"pre{index}.log", folder, shell=True))
    for item in pre:
        if item.returncode != 0:
            raise SystemExit(f"peer_ab: a pre-command of arm {arm} failed (exit {item.returncode}); see {item.log}")
    lengths = [args.steps] if not args.short else [args.short, args.steps]
    runs: dict[int, Measured] = {}
    for steps_now in lengths if round_index % 2 == 0 else reversed(lengths):  # alternate which length runs first
        out = folder / f"out-{steps_now}"
        if arm == "peer":
            argv = [args.python, str(peer), *peer_argv(spec_for(steps_now), dataset_dir, out)]
        else:
            argv = [args.diffalign, "train", recipe,
                    *in_folder(diffalign_overrides(spec_for(steps_now), out) + cache_override + variant, folder)]
        profile = None if not args.pyspy else [args.pyspy, "record", "--format", "raw", "--rate", "20",
                                                "-o", str(folder / f"profile-{steps_now}.txt"), "--pid"]
        # the official MaPO script reads validation_prompts.json from the working directory: run peers in their checkout
        cwd = args.peer_repo if arm == "peer" else folder
        result = measure(argv, env, folder / f"train-{steps_now}.log", cwd, progress=PEER_BAR if arm == "peer" else OUR_BAR,
                         profile=profile)
        if result.returncode != 0:
            raise SystemExit(f"peer_ab: {arm} run of {steps_now} steps failed (exit {result.returncode}); "
                             f"see {result.log}\n$ {shell_line(argv)}")
        shutil.rmtree(out, ignore_errors=True)
        runs[steps_now] = result
    shutil.rmtree(folder / "cache", ignore_errors=True)
    return ArmRound(arm, round_index, runs[args.steps], args.steps, args.warmup,
                    runs.get(args.short), args.short, pre)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    if args.short:
        step_time(0.0, 1.0, (args.short, args.steps))  # refuses N1 >= N before anything runs
    if not 0 <= args.warmup < args.steps - 1:
        raise SystemExit(f"peer_ab: --warmup {args.warmup} must leave at least 2 timed steps of --steps {args.steps}")
    arms = [arm.strip() for arm in args.arms.split(",") if arm.strip()]
    try:
        variants = parse_variants(args.variant)
    except ValueError as error:
        raise SystemExit(f"peer_ab: {error}") from None
    unknown = [arm for arm in arms if arm not in ARMS]
    arms += [name for name in variants if name not in arms]
    if unknown:
        raise SystemExit(f"peer_ab: --arms {args.arms}: unknown arm(s) {unknown}; choose from {list(ARMS)}")
    if not args.data.is_file():
        raise SystemExit(f"peer_ab: --data {args.data} is not a file: pass a Pick-a-Pic-schema .parquet "
                         "(e.g. `diffalign toy pairs OUT.parquet`)")
    if not Path(args.model, "model_index.json").is_file():
        raise SystemExit(f"peer_ab: --model {args.model} has no model_index.json: pass a diffusers SDXL folder")
    try:
        peer = peer_script(args.method, args.peer_repo)
    except FileNotFoundError as error:
        raise SystemExit(f"peer_ab: {error}") from None
    args.peer_repo = args.peer_repo.resolve()
    args.work = args.work.resolve()
    args.work.mkdir(parents=True, exist_ok=True)
    env = child_env(args.threads, args.work)
    rows_used = args.steps * args.batch
    report: dict[str, Any] = {"method": args.method, "steps": args.steps, "warmup": args.warmup, "short": args.short,
                              "rounds": args.rounds, "threads": args.threads, "peer_script": str(peer), "arms": arms,
                              "model": str(args.model), "data": str(args.data), "runs": {}}

    def spec(precision: str) -> Callable[[int], ABSpec]:
        def spec_for(steps_now: int) -> ABSpec:
            return ABSpec(method=args.method, model=str(Path(args.model).resolve()), data=str(args.data.resolve()),
                          steps=steps_now, rows=rows_used, precision=precision, batch_pairs=args.batch,
                          resolution=args.resolution, rank=args.rank, learning_rate=args.lr, beta=args.beta,
                          extra_overrides=tuple(args.diffalign_override))
        return spec_for

    dataset_dir = prepare_peer_dataset(args.data, args.work, args.python, env)
    for precision in args.precision:
        sample = spec(precision)(args.steps)
        rows = settings_rows(args.method, peer_argv(sample, dataset_dir, Path("OUT")),
                             diffalign_overrides(sample, Path("OUT")))
        print(f"\n## {args.method} {precision}: settings read back from both command lines\n")
        print(format_table(rows, f"peer ({peer.name})"))
        bad = mismatches(rows)
        if bad:
            raise SystemExit("peer_ab: the two sides would not do the same work: "
                             + "; ".join(f"{row.setting}: {row.peer} vs {row.diffalign}" for row in bad))
        print(f"\nthreads {args.threads} each; rows {rows_used}; {args.steps} steps (first {args.warmup} untimed)"
              + (f" and {args.short}" if args.short else "") + f"; rounds {args.rounds}", flush=True)
        warm_files(Path(args.model), args.data)
        results: list[ArmRound] = []
        loads: list[float] = []
        for round_index in range(args.rounds):
            for arm in arm_order(["peer", *arms], round_index):
                loads.append(load_average())
                result = run_round_arm(arm, round_index, spec(precision), args, env, peer, dataset_dir,
                                       args.work / precision)
                results.append(result)
                lengths = "" if result.short is None else f" T({args.short})={result.short.wall_s:.1f}s" \
                    f" step(lengths)={result.step_s_from_lengths():.3f}s"
                phases = " ".join(f"{name}={value:.0f}" for name, value in result.long.rss_phases().items())
                cpu_step = result.cpu_step_s()
                lengths += "" if cpu_step is None else f" cpu-step={cpu_step:.3f}s cpu-e2e={result.end_to_end_cpu_s():.1f}s"
                print(f"round {round_index} {arm:6s}: step={result.step_s():.3f}s T({args.steps})={result.long.wall_s:.1f}s"
                      f"{lengths} e2e={result.end_to_end_s():.1f}s peak={result.peak_rss_mib():.0f}MiB "
                      f"(sampled RSS MiB: {phases}) load={loads[-1]:.1f}", flush=True)
        loads.append(load_average())
        summary = summarise(results)
        print()
        print(format_summary(summary, f"{args.method} {precision}, {args.model}: medians of {args.rounds} rounds, "
                                      f"1-min load {min(loads):.1f}-{max(loads):.1f}"))
        report["runs"][precision] = {
            "settings": [asdict(row) for row in rows],
            "rounds": [asdict(item) | {"step_s": item.step_s(), "step_s_from_lengths": item.step_s_from_lengths(),
                                       "end_to_end_s": item.end_to_end_s()} for item in results],
            "summary": summary,
            "load_average_1min": loads,
        }
    if args.json:
        from diffalign.atomic import staged_file

        with staged_file(args.json) as temporary:
            temporary.write_text(json.dumps(report, indent=2))
        print(f"\nwrote {args.json}")
    return report


if __name__ == "__main__":
    main()
