"""Measuring one child process to its end: wall and CPU time, peak RSS of its process tree, the
moment each count of a tqdm bar first appears. The peer A/B (peer_ab.py) runs every arm through it.
"""

from __future__ import annotations

import os
import re
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Measured:
    """One process (a training run or a pre-command): wall time, peak RSS, exit status, its log."""

    wall_s: float
    peak_rss_mib: float
    returncode: int
    log: str
    marks: list[tuple[float, int]] = field(default_factory=list)  # (seconds since start, step count shown)
    rss_trace: list[tuple[float, float]] = field(default_factory=list)  # (seconds since start, RSS MiB), sampled
    cpu_marks: list[tuple[float, int]] = field(default_factory=list)  # (CPU seconds used so far, step count shown)
    cpu_s: float = 0.0  # user + system CPU seconds of the whole run (wait4)

    def rss_phases(self) -> dict[str, float]:
        """Highest sampled RSS before the first step, during the steps and after the last step shown."""
        if not self.marks or not self.rss_trace:
            return {}
        first, last = self.marks[0][0], self.marks[-1][0]
        phases = {"start-up": [r for t, r in self.rss_trace if t < first],
                  "steps": [r for t, r in self.rss_trace if first <= t <= last],
                  "after": [r for t, r in self.rss_trace if t > last]}
        return {name: max(values) for name, values in phases.items() if values}


PROGRESS = re.compile(rb"(\d+)/(\d+) \[")  # a tqdm bar: "Steps:  45%|####5     | 9/20 [00:04<..."


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of a live process so far (/proc/PID/stat), None once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime (fields 14, 15)


def _drain(stream: Any, log: Any, label: bytes | None, marks: list[tuple[float, int]], pid: int = 0,
           cpu_marks: list[tuple[float, int]] | None = None) -> None:
    """Copy the child's output to its log; note when each new count of the `label` progress bar appears,
    and the child's CPU seconds at that moment (`cpu_marks`)."""
    pending = b""
    for chunk in iter(lambda: stream.read1(1 << 16), b""):
        now = time.perf_counter()
        log.write(chunk)
        pending += chunk
        *lines, pending = re.split(rb"[\r\n]", pending)
        for line in [*lines, pending]:  # tqdm ends a bar with the next "\r": read the unfinished line too
            if label is not None and line.lstrip().startswith(label):
                found = PROGRESS.search(line)
                if found and (not marks or int(found.group(1)) > marks[-1][1]):
                    marks.append((now, int(found.group(1))))
                    cpu = cpu_seconds(pid) if cpu_marks is not None else None
                    if cpu is not None:
                        cpu_marks.append((cpu, int(found.group(1))))


def _status_kib(pid: int | str, field_name: str) -> int | None:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    found = re.search(rf"^{field_name}:\s+(\d+) kB", text, re.MULTILINE)
    return int(found.group(1)) if found else None


def _process_tree(pid: int) -> list[int]:
    """`pid` and its descendants, read from /proc/*/task/*/children."""
    tree, queue = [], [pid]
    while queue:
        current = queue.pop()
        tree.append(current)
        for children in Path(f"/proc/{current}/task").glob("*/children"):
            try:
                queue += [int(child) for child in children.read_text().split()]
            except OSError:
                continue
    return tree


def _sample_rss(pid: int, started: float, trace: list[tuple[float, float]], high_water: list[float],
                done: threading.Event) -> None:
    """Every 0.2 s: VmRSS of the child into `trace` (the process itself; its children are not
    summed), and the largest VmHWM of any process of its tree into `high_water[0]`.

    VmHWM is a process's peak since its exec, kept by the kernel between samples, so only a peak
    in the last 0.2 s of a process's life can be missed.
    """
    while not done.wait(0.2):
        rss = _status_kib(pid, "VmRSS")
        if rss is None:
            return
        trace.append((round(time.perf_counter() - started, 3), rss / 1024.0))
        peaks = [_status_kib(member, "VmHWM") for member in _process_tree(pid)]
        high_water[0] = max([high_water[0], *(peak / 1024.0 for peak in peaks if peak is not None)])


def peak_rss(ru_maxrss_mib: float, launcher_high_water_mib: float, sampled_high_water_mib: float) -> float:
    """The run's own peak RSS in MiB.

    At exec, Linux records the launching process's high-water mark into the child's `ru_maxrss`
    (fs/exec.c, exec_mmap), so `ru_maxrss` is the run's peak only when it exceeds the launcher's;
    otherwise the run stayed below the launcher and its peak is what the VmHWM samples saw.
    """
    if ru_maxrss_mib > launcher_high_water_mib:
        return ru_maxrss_mib
    return sampled_high_water_mib


def measure(argv: list[str], env: dict[str, str], log: Path, cwd: Path, shell: bool = False,
            progress: str | None = None, profile: list[str] | None = None) -> Measured:
    """Run one process to its end: wall time, peak RSS of its process tree (`peak_rss`), and, when
    `progress` names its tqdm bar ("Steps", "train"), the time each step count first appeared.

    `profile`: a sampler's command line ending in its "attach to this pid" flag (py-spy's
    `record ... --pid`); it is attached from outside, so the run's own wait4 figures stay its own.
    """
    log.parent.mkdir(parents=True, exist_ok=True)
    marks: list[tuple[float, int]] = []
    with log.open("wb") as out:
        launcher_high_water = (_status_kib("self", "VmHWM") or 0) / 1024.0
        started = time.perf_counter()
        process = subprocess.Popen(
            argv if not shell else argv[0], shell=shell, env=env, cwd=cwd, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, executable="/bin/bash" if shell else None,
        )
        cpu_marks: list[tuple[float, int]] = []
        reader = threading.Thread(
            target=_drain,
            args=(process.stdout, out, None if progress is None else progress.encode(), marks, process.pid, cpu_marks),
        )
        reader.start()
        trace: list[tuple[float, float]] = []
        high_water = [0.0]
        sampled = threading.Event()
        sampler = threading.Thread(target=_sample_rss, args=(process.pid, started, trace, high_water, sampled))
        sampler.start()
        profiler = None
        if profile is not None:
            profiler = subprocess.Popen([*profile, str(process.pid)], stdout=subprocess.DEVNULL,
                                        stderr=log.with_suffix(".profiler.log").open("wb"))
        _, status, usage = os.wait4(process.pid, 0)
        wall = time.perf_counter() - started
        sampled.set()
        sampler.join()
        reader.join()
        if profiler is not None:
            profiler.wait(timeout=120)  # py-spy writes its file when the process it samples is gone
        process.stdout.close()
    process.returncode = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait again
    peak = peak_rss(usage.ru_maxrss / 1024.0, launcher_high_water, high_water[0])
    return Measured(wall, peak, process.returncode, str(log),
                    [(round(at - started, 4), count) for at, count in marks], trace,
                    [(round(cpu, 3), count) for cpu, count in cpu_marks], usage.ru_utime + usage.ru_stime)


def steady_step_time(marks: list[tuple[float, int]], warmup: int) -> float | None:
    """Seconds per step between the first count >= `warmup` and the last count the bar showed.

    tqdm prints a count when at least 0.1 s passed since its last print, so with steps of that
    length or more every count is seen; a skipped count only moves the interval's ends.
    """
    after = [(at, count) for at, count in marks if count >= warmup]
    if len(after) < 2 or after[-1][1] == after[0][1]:
        return None
    return (after[-1][0] - after[0][0]) / (after[-1][1] - after[0][1])


def load_average() -> float:
    return os.getloadavg()[0]
