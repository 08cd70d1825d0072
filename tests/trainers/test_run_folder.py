"""An output folder belongs to one run: a second run is refused or moves the first aside, a resume cannot
silently become another run, and an interrupted run's staging leftovers are cleaned up."""

from __future__ import annotations

import json
from pathlib import Path

from diffalign.apps.cli import main


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_new_run_refuses_a_finished_runs_folder_and_changes_nothing(tiny_models, toy_pairs, train_args, tmp_path, capsys):
    out = tmp_path / "run"
    args = train_args("sd15", tiny_models["sd15"], toy_pairs, out, "train.checkpointing_steps=2")
    assert main(args) == 0
    record = json.loads((out / "run.json").read_text())
    assert len(record["run_id"]) == 32 and len(record["config_fingerprint"]) == 16
    assert record["geometry"] == {"train.batch_size": 2, "train.gradient_accumulation_steps": 1, "processes": 1}
    before = snapshot(out)
    capsys.readouterr()
    assert main([*args, "train.learning_rate=3e-4"]) == 2
    message = capsys.readouterr().err
    assert str(out) in message and "train.resume_from=latest" in message and "train.overwrite=true" in message
    assert "another train.output_dir" in message and "final/" in message
    assert snapshot(out) == before  # config.yaml, metrics.jsonl, checkpoints, final/: untouched


def test_overwrite_moves_the_old_run_aside_and_never_deletes_it(tiny_models, toy_pairs, train_args, tmp_path):
    out = tmp_path / "run"
    args = train_args("sd15", tiny_models["sd15"], toy_pairs, out)
    assert main(args) == 0
    first = snapshot(out)
    assert main([*args, "train.overwrite=true", "train.max_steps=2"]) == 0
    moved = [p for p in tmp_path.iterdir() if p.name.startswith("run.moved-")]
    assert len(moved) == 1 and snapshot(moved[0]) == first
    assert len(json.loads((out / "metrics.jsonl").read_text().splitlines()[-1:][0])) and (out / "final").is_dir()
    assert json.loads((out / "run.json").read_text())["run_id"] != json.loads((moved[0] / "run.json").read_text())["run_id"]


def test_a_resume_that_changes_the_run_is_refused_with_what_changed(tiny_models, toy_pairs, train_args, tmp_path, capsys):
    out = tmp_path / "run"
    common = ["train.checkpointing_steps=1"]
    assert main(train_args("sd15", tiny_models["sd15"], toy_pairs, out, *common, "train.max_steps=2")) == 0
    capsys.readouterr()
    changed = ["train.max_steps=4", "train.resume_from=latest", "train.batch_size=4", "method.beta=100"]
    assert main(train_args("sd15", tiny_models["sd15"], toy_pairs, out, *common, *changed)) == 2
    message = capsys.readouterr().err
    assert "train.batch_size: 2 -> 4" in message and "method.beta: 5000.0 -> 100.0" in message
    assert "train.allow_resume_changes=true" in message
    assert main(train_args("sd15", tiny_models["sd15"], toy_pairs, out, *common, *changed, "train.allow_resume_changes=true")) == 0
    resumes = json.loads((out / "run.json").read_text())["resumes"]
    assert "train.batch_size: 2 -> 4" in resumes[-1]["changed"]
    # More steps (and logging, checkpointing) are not another run: resuming with them needs no flag.
    assert main(train_args("sd15", tiny_models["sd15"], toy_pairs, out, *common, *changed, "train.max_steps=5",
                           "train.log_every=2")) == 0


def test_staging_leftovers_of_a_killed_run_are_removed_and_swap_backups_kept(tiny_models, toy_pairs, train_args, tmp_path):
    out = tmp_path / "run"
    (out / ".checkpoint-3.tmp-abc123").mkdir(parents=True)
    (out / ".checkpoint-3.tmp-abc123" / "half.bin").write_bytes(b"x")
    (out / ".metrics.jsonl.tmp").write_text("{")
    (out / ".final.old-1234abcd").mkdir()
    assert main(train_args("sd15", tiny_models["sd15"], toy_pairs, out)) == 0
    assert not (out / ".checkpoint-3.tmp-abc123").exists() and not (out / ".metrics.jsonl.tmp").exists()
    assert (out / ".final.old-1234abcd").is_dir()


def test_a_full_disk_names_the_path_and_keeps_the_previous_checkpoint(tiny_models, toy_pairs, train_args, tmp_path):
    """A file-size limit (ulimit -f, in the child only) makes the next checkpoint's weights unwritable: the run
    exits 1 with a message naming the checkpoint and the full disk, and checkpoint-2 is unchanged."""
    import resource
    import signal
    import subprocess
    import sys

    out = tmp_path / "run"
    common = ["train.mode=full", "train.checkpointing_steps=2"]
    assert main(train_args("sd15", tiny_models["sd15"], toy_pairs, out, *common, "train.max_steps=2")) == 0
    good = snapshot(out / "checkpoint-2")

    def limit_file_size() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (256 * 1024, 256 * 1024))

    args = train_args("sd15", tiny_models["sd15"], toy_pairs, out, *common, "train.max_steps=4", "train.resume_from=latest")
    child = subprocess.run([sys.executable, "-m", "diffalign.apps.cli", *args], capture_output=True, text=True,
                           preexec_fn=limit_file_size, timeout=300)
    assert child.returncode == 1, child.stderr[-2000:]
    assert "disk is full" in child.stderr and str(out / "checkpoint-4") in child.stderr, child.stderr[-2000:]
    assert "Traceback" not in child.stderr
    assert snapshot(out / "checkpoint-2") == good
    assert not (out / "checkpoint-4").exists() and not list(out.glob(".checkpoint-4*"))
