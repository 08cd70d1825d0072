"""The peer A/B harness's own logic: matched settings, step-time arithmetic, refusals.

No peer run here: the peer's checkout is not part of this repository and nothing downloads.
The process measurement is checked on a tiny Python child whose memory use is known.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _load(name: str):
    """Load a benchmarks/ script as a module under its own name (benchmarks/ is not a package).

    Registered in sys.modules because dataclasses look their module up there, and under its own
    name so that peer_ab's `from peer_ab_settings import ...` finds this same module.
    """
    if name in sys.modules:
        return sys.modules[name]
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    return module


settings = _load("peer_ab_settings")
process = _load("process_measure")
peer_ab = _load("peer_ab")


def _spec(method: str = "dpo", **changes) -> object:
    fields = dict(method=method, model="/m", data="/d/pairs.parquet", steps=20, rows=80)
    fields.update(changes)
    return settings.ABSpec(**fields)


@pytest.mark.parametrize("method", ["dpo", "mapo"])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_both_command_lines_read_back_the_same_settings(method, precision):
    spec = _spec(method, precision=precision, batch_pairs=3, resolution=96, rank=8, learning_rate=2e-4)
    rows = settings.settings_rows(
        method,
        settings.peer_argv(spec, Path("/d"), Path("/o")),
        settings.diffalign_overrides(spec, Path("/o")),
    )
    assert settings.mismatches(rows) == []
    by_name = {row.setting: row for row in rows}
    # the values in the table are the spec's, read back from each side's own spelling
    assert (by_name["pairs per step"].peer, by_name["pairs per step"].diffalign) == ("3", "3")
    assert (by_name["resolution (px)"].peer, by_name["resolution (px)"].diffalign) == ("96", "96")
    assert (by_name["LoRA rank"].peer, by_name["LoRA rank"].diffalign) == ("8", "8")
    expected = {"fp32": "no", "bf16": "bf16"}[precision]
    assert by_name["mixed precision"].peer == by_name["mixed precision"].diffalign == expected
    assert by_name["gradient checkpointing"].diffalign == "false"
    assert by_name["gradient checkpointing"].peer == "false"  # the flag is absent from the peer's argv


def test_peer_spells_rank_and_beta_its_own_way():
    dpo = settings.parse_peer_argv(settings.peer_argv(_spec("dpo"), Path("/d"), Path("/o")))
    mapo = settings.parse_peer_argv(settings.peer_argv(_spec("mapo"), Path("/d"), Path("/o")))
    assert (dpo["rank"], dpo["beta_dpo"]) == ("4", "5000")  # diffusers parses --beta_dpo as an int
    assert (mapo["lora_rank"], mapo["beta_mapo"]) == ("4", "0.1")
    assert "rank" not in mapo and "beta_dpo" not in mapo


@pytest.mark.parametrize(
    ("override", "setting"),
    [
        ("train.batch_size=8", "pairs per step"),
        ("train.gradient_checkpointing=true", "gradient checkpointing"),
        ("train.mixed_precision=bf16", "mixed precision"),
        ("train.optimizer=adafactor", "optimizer"),
        ("lora.rank=16", "LoRA rank"),
    ],
)
def test_an_extra_override_that_changes_the_work_is_a_mismatch(override, setting):
    spec = _spec(extra_overrides=(override,))
    rows = settings.settings_rows(
        "dpo", settings.peer_argv(spec, Path("/d"), Path("/o")), settings.diffalign_overrides(spec, Path("/o"))
    )
    assert [row.setting for row in settings.mismatches(rows)] == [setting]
    assert "MISMATCH" in settings.format_table(rows, "peer")


def test_a_peer_flag_changes_the_table_too():
    spec = _spec()
    peer = settings.peer_argv(spec, Path("/d"), Path("/o")) + ["--gradient_checkpointing", "--use_8bit_adam"]
    rows = settings.settings_rows("dpo", peer, settings.diffalign_overrides(spec, Path("/o")))
    assert sorted(row.setting for row in settings.mismatches(rows)) == ["gradient checkpointing", "optimizer"]


def test_table_lists_every_setting_side_by_side():
    spec = _spec()
    rows = settings.settings_rows(
        "dpo", settings.peer_argv(spec, Path("/d"), Path("/o")), settings.diffalign_overrides(spec, Path("/o"))
    )
    table = settings.format_table(rows, "peer (train_diffusion_dpo_sdxl.py)").splitlines()
    assert table[0] == "| setting | peer (train_diffusion_dpo_sdxl.py) | diffalign | |"
    assert len(table) == 2 + len(rows)
    assert "| pairs per step | 4 | 4 |  |" in table


def test_spec_refuses_bad_values():
    with pytest.raises(ValueError, match="method 'ppo'"):
        _spec("ppo")
    with pytest.raises(ValueError, match="precision 'fp16'"):
        _spec(precision="fp16")
    with pytest.raises(ValueError, match="steps must be at least 1"):
        _spec(steps=0)
    with pytest.raises(ValueError, match="expected key.path=value"):
        _spec(extra_overrides=("train.batch_size",))


def test_peer_path_without_the_script_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="huggingface/diffusers") as error:
        settings.peer_script("dpo", tmp_path)
    assert "train_diffusion_dpo_sdxl.py" in str(error.value)
    script = tmp_path / settings.PEER_SCRIPTS["dpo"]
    script.parent.mkdir(parents=True)
    script.write_text("")
    assert settings.peer_script("dpo", tmp_path) == script


def test_cli_refuses_a_checkout_without_the_script_before_running_anything(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "model_index.json").write_text("{}")
    data = tmp_path / "pairs.parquet"
    data.write_bytes(b"")
    argv = ["--peer-repo", str(tmp_path), "--model", str(model), "--data", str(data), "--work", str(tmp_path / "w")]
    with pytest.raises(SystemExit, match="not found: --peer-repo must be a checkout of huggingface/diffusers"):
        peer_ab.main(argv)
    with pytest.raises(SystemExit, match="mapo-t2i/mapo"):
        peer_ab.main([*argv, "--method", "mapo"])
    assert not (tmp_path / "w").exists()


def test_cli_refuses_lengths_that_do_not_grow(tmp_path):
    common = ["--peer-repo", str(tmp_path), "--model", "m", "--data", "d"]
    with pytest.raises(ValueError, match="--steps 20 10"):
        peer_ab.main([*common, "--steps", "10", "--short", "20"])
    with pytest.raises(SystemExit, match="--warmup 9 must leave at least 2 timed steps"):
        peer_ab.main([*common, "--steps", "10", "--warmup", "9"])


def test_step_time_cancels_the_fixed_cost():
    # T(N) = 30 s of start-up + N x 1.5 s: T(10) = 45, T(30) = 75  ->  (75 - 45) / 20 = 1.5
    assert peer_ab.step_time(45.0, 75.0, (10, 30)) == pytest.approx(1.5)


def test_steady_step_time_leaves_out_the_warm_up_steps():
    # counts 1..3 slow (loading, first steps), then 0.5 s per step; count 6 was never printed
    marks = [(20.0, 1), (24.0, 2), (26.0, 3), (26.5, 4), (27.0, 5), (28.0, 7), (28.5, 8)]
    assert peer_ab.steady_step_time(marks, warmup=3) == pytest.approx((28.5 - 26.0) / (8 - 3))
    assert peer_ab.steady_step_time(marks, warmup=1) == pytest.approx((28.5 - 20.0) / (8 - 1))
    assert peer_ab.steady_step_time(marks[:3], warmup=3) is None  # one count after the warm-up: no interval


def test_rounds_alternate_the_order_of_the_arms():
    arms = ["peer", "raw", "cached"]
    assert peer_ab.arm_order(arms, 0) == ["peer", "raw", "cached"]
    assert peer_ab.arm_order(arms, 1) == ["cached", "raw", "peer"]
    assert peer_ab.arm_order(arms, 2) == arms


def _run(arm, round_index, step_s, long_s, rss, pre_s=(), short_s=None):
    """An ArmRound whose progress bar shows steps 0..20 at `step_s` apart after a 10 s start."""
    measured = peer_ab.Measured
    marks = [(10.0 + step_s * count, count) for count in range(1, 21)]
    short = None if short_s is None else measured(short_s, rss / 2, 0, "")
    return peer_ab.ArmRound(
        arm, round_index, measured(long_s, rss, 0, "", marks), steps=20, warmup=3, short=short, short_steps=10,
        pre=[measured(seconds, 1.0, 0, "") for seconds in pre_s],
    )


def test_summary_takes_medians_and_counts_pre_commands_in_end_to_end():
    results = [
        # peer: 1.0, 1.2, 3.0 s/step (median 1.2); T(20) 30, 32, 60 (median 32); RSS 1000, 1100, 1200
        _run("peer", 0, 1.0, 30.0, 1000.0), _run("peer", 1, 1.2, 32.0, 1100.0), _run("peer", 2, 3.0, 60.0, 1200.0),
        # cached: 0.5, 0.6, 0.4 s/step (median 0.5); T(20) 20, 22, 18 + cache 4, 6, 5 s -> e2e 24, 28, 23 (median 24)
        _run("cached", 0, 0.5, 20.0, 700.0, (4.0,)), _run("cached", 1, 0.6, 22.0, 800.0, (6.0,)),
        _run("cached", 2, 0.4, 18.0, 900.0, (5.0,)),
    ]
    summary = peer_ab.summarise(results)
    assert summary["peer"]["step_s"] == pytest.approx(1.2)
    assert summary["cached"]["step_s"] == pytest.approx(0.5)
    assert summary["cached"]["end_to_end_s"] == pytest.approx(24.0)
    assert summary["cached"]["pre_s"] == pytest.approx(5.0)
    assert summary["cached"]["step_ratio"] == pytest.approx(0.5 / 1.2)
    assert summary["cached"]["end_to_end_ratio"] == pytest.approx(24.0 / 32.0)
    assert summary["cached"]["peak_rss_ratio"] == pytest.approx(800.0 / 1100.0)
    assert "step_s_from_lengths" not in summary["cached"]  # no --short run
    table = peer_ab.format_summary(summary, "t")
    assert "| cached | 0.500 | 24.0 | 5.0 | 800 | 0.42 | 0.75 | 0.73 |" in table
    assert "CPU s/step" not in table  # no CPU marks in these runs
    slow = peer_ab.summarise([results[0], _run("raw", 0, 2.0, 40.0, 1500.0)])
    assert "2.00 (goal <= 0.5)" in peer_ab.format_summary(slow, "t")


def test_cpu_step_time_and_ratios_come_from_the_cpu_marks():
    measured = peer_ab.Measured
    peer = peer_ab.ArmRound("peer", 0, measured(30.0, 1.0, 0, "", marks=[(5.0, 1), (8.0, 2), (11.0, 3)],
                                                     cpu_marks=[(5.0, 1), (7.0, 2), (9.0, 3)], cpu_s=12.0),
                            steps=3, warmup=1)
    ours = peer_ab.ArmRound("raw", 0, measured(20.0, 1.0, 0, "", marks=[(4.0, 1), (6.0, 2), (8.0, 3)],
                                                    cpu_marks=[(4.0, 1), (5.0, 2), (6.0, 3)], cpu_s=7.0),
                            steps=3, warmup=1, pre=[measured(2.0, 1.0, 0, "", cpu_s=1.0)])
    # peer: (9 - 5) / 2 = 2.0 CPU s/step; ours (6 - 4) / 2 = 1.0; end to end 12 vs 7 + 1 = 8
    summary = peer_ab.summarise([peer, ours])
    assert summary["raw"]["cpu_step_s"] == pytest.approx(1.0)
    assert summary["raw"]["cpu_step_ratio"] == pytest.approx(0.5)
    assert summary["raw"]["end_to_end_cpu_ratio"] == pytest.approx(8.0 / 12.0)
    assert "| raw | 1.000 | 8.0 | 0.50 | 0.67 |" in peer_ab.format_summary(summary, "t")


def test_a_short_run_gives_the_step_time_from_lengths_too():
    # T(20) = 40, T(10) = 25  ->  1.5 s/step from the lengths; the bar says 1.0 and stays the primary figure
    result = _run("raw", 0, 1.0, 40.0, 100.0, short_s=25.0)
    assert result.step_s() == pytest.approx(1.0)
    assert result.step_s_from_lengths() == pytest.approx(1.5)
    no_bar = peer_ab.ArmRound("raw", 0, peer_ab.Measured(40.0, 1.0, 0, "log"), 20, 3,
                              peer_ab.Measured(25.0, 1.0, 0, "log"), 10)
    assert no_bar.step_s() == pytest.approx(1.5)
    with pytest.raises(ValueError, match="no progress bar in log and no --short run"):
        peer_ab.ArmRound("raw", 0, peer_ab.Measured(40.0, 1.0, 0, "log"), 20, 3).step_s()


def test_measure_reports_the_childs_peak_rss_and_exit_status(tmp_path):
    # the child holds 200 MiB of touched memory; the parent's own memory must not count
    code = (
        "import sys, time; block = bytearray(200 * 1024 * 1024); block[::4096] = b'x' * len(block[::4096]); "
        "time.sleep(1.0); sys.exit(3)"
    )
    measured = process.measure([sys.executable, "-c", code], {}, tmp_path / "log.txt", tmp_path)
    assert measured.returncode == 3
    assert 200 <= measured.peak_rss_mib < 400
    assert 200 <= max(rss for _, rss in measured.rss_trace) < 400  # sampled while it slept
    small = process.measure([sys.executable, "-c", "print('hi')"], {}, tmp_path / "small.txt", tmp_path)
    assert small.returncode == 0 and small.peak_rss_mib < 100
    assert (tmp_path / "small.txt").read_text() == "hi\n"


def test_measure_leaves_out_a_large_launchers_memory(tmp_path):
    # Linux folds the launcher's high-water mark into the child's ru_maxrss at exec: a 200 MiB run
    # started from a 700 MiB process (a pytest worker that loaded a big model) must still read 200 MiB
    launcher_block = bytearray(700 * 1024 * 1024)
    launcher_block[::4096] = b"x" * len(launcher_block[::4096])
    code = (
        "import time; block = bytearray(200 * 1024 * 1024); block[::4096] = b'x' * len(block[::4096]); "
        "time.sleep(1.0)"
    )
    measured = process.measure([sys.executable, "-c", code], {}, tmp_path / "log.txt", tmp_path)
    del launcher_block
    assert measured.returncode == 0
    assert 200 <= measured.peak_rss_mib < 400


def test_peak_rss_trusts_ru_maxrss_only_above_the_launchers_high_water():
    assert process.peak_rss(ru_maxrss_mib=900.0, launcher_high_water_mib=500.0, sampled_high_water_mib=880.0) == 900.0
    assert process.peak_rss(ru_maxrss_mib=500.0, launcher_high_water_mib=500.0, sampled_high_water_mib=210.0) == 210.0


def test_measure_notes_when_each_step_count_of_the_bar_appears(tmp_path):
    # a tqdm-like bar on stderr ("\r", no newline until the end), 0.3 s per step; another bar is ignored
    code = (
        "import sys, time\n"
        "sys.stderr.write('cache: 1/1 [00:00]\\n'); sys.stderr.flush()\n"
        "for n in range(1, 5):\n"
        "    time.sleep(0.3); sys.stderr.write(f'\\rtrain:  {n * 25}%|##| {n}/4 [00:0{n}<00:00, 3.3it/s]'); sys.stderr.flush()\n"
        "sys.stderr.write('\\n')\n"
    )
    measured = process.measure([sys.executable, "-c", code], {}, tmp_path / "bar.txt", tmp_path, progress="train")
    assert [count for _, count in measured.marks] == [1, 2, 3, 4]
    assert [count for _, count in measured.cpu_marks] == [1, 2, 3, 4]  # the child sleeps: little CPU
    assert all(0 <= cpu < 5 for cpu, _ in measured.cpu_marks) and measured.cpu_s >= measured.cpu_marks[-1][0]
    gaps = [later[0] - earlier[0] for earlier, later in zip(measured.marks, measured.marks[1:])]
    # 0.9 s of sleeps between count 1 and count 4; a busy machine may delay when the reader sees a count
    assert 0.6 <= sum(gaps) < 6.0, gaps
    assert peer_ab.steady_step_time(measured.marks, warmup=1) == pytest.approx(sum(gaps) / 3)
    assert "3/4 [" in (tmp_path / "bar.txt").read_text()


def test_pre_commands_get_the_run_settings_filled_in(tmp_path):
    line = peer_ab.fill_pre(
        "{diffalign} reference precompute {config} {overrides} --out {work}/ref",
        "/venv/bin/diffalign", "sdxl/dpo", ["model.path=/a b", "train.batch_size=4"], tmp_path,
    )
    assert line == f"/venv/bin/diffalign reference precompute sdxl/dpo 'model.path=/a b' train.batch_size=4 --out {tmp_path}/ref"


def test_rss_phases_split_the_trace_at_the_first_and_last_step():
    measured = peer_ab.Measured(
        10.0, 900.0, 0, "", marks=[(4.0, 1), (6.0, 2), (8.0, 3)],
        rss_trace=[(1.0, 300.0), (3.9, 900.0), (5.0, 700.0), (8.0, 750.0), (9.0, 400.0)],
    )
    assert measured.rss_phases() == {"start-up": 900.0, "steps": 750.0, "after": 400.0}
    assert peer_ab.Measured(1.0, 1.0, 0, "").rss_phases() == {}


buckets = _load("pyspy_buckets")

PEER_SCRIPT = """\
def main(args):
    setup = 1
    for epoch in range(first_epoch, args.num_train_epochs):
        for step, batch in enumerate(train_dataloader):
            model_pred = unet(
                noisy,
            ).sample
            with torch.no_grad():
                ref_preds = unet(
                    noisy,
                ).sample
            accelerator.backward(loss)
    # Save the lora layers
    save()
"""


def test_pyspy_buckets_tell_the_two_forwards_apart_on_both_sides(tmp_path):
    script = tmp_path / "train_peer.py"
    script.write_text(PEER_SCRIPT)
    assert buckets.unet_call_lines(script) == {"policy forward": range(5, 8), "reference forward": range(9, 12)}
    unet = "forward (diffusers/models/unets/unet_2d_condition.py:1100);conv (torch/nn/conv.py:5)"
    peer_raw = "\n".join([
        f"<module> (train_peer.py:20);main (train_peer.py:6);{unet} 30",  # inside the policy call
        f"<module> (train_peer.py:20);main (train_peer.py:10);{unet} 20",  # inside the reference call
        "<module> (train_peer.py:20);main (train_peer.py:12);backward (torch/_tensor.py:600) 50",
        "<module> (train_peer.py:20);main (train_peer.py:2);from_pretrained (diffusers/x.py:1) 40",
        " 4",  # no Python frame
    ])
    ours_raw = "\n".join([
        f"_run (trainers/loop.py:244);objective_step (trainers/step.py:162);group_errors (trainers/step.py:114);{unet} 10",
        f"_run (trainers/loop.py:244);objective_step (trainers/step.py:168);predict (trainers/models.py:40);{unet} 6",
        "_run (trainers/loop.py:246);backward (accelerate/accelerator.py:2000) 12",
        "_run (trainers/loop.py:187);setup_training (trainers/loop.py:134) 8",
        "_bootstrap_inner (threading.py:1045);_AsyncWriterThread._run (tensorboard/event_file_writer.py:269) 5",
    ])
    peer = buckets.buckets(buckets.parse_raw(peer_raw), buckets.classifier(script), rate=10.0)
    ours = buckets.buckets(buckets.parse_raw(ours_raw), buckets.classifier(None), rate=10.0)
    assert peer == {"policy forward": 3.0, "reference forward": 2.0, "backward": 5.0, buckets.STARTUP: 4.0,
                    buckets.NO_FRAME: 0.4}
    assert ours == {"policy forward": 1.0, "reference forward": 0.6, "backward": 1.2, buckets.STARTUP: 0.8,
                    buckets.BACKGROUND: 0.5}
    table = buckets.table({"diffalign": ours, "peer": peer}, steps=2)
    # per step: policy 1.0 / 2 = 0.5 s, 1.0 of a 2.8 s loop = 36 %; peer 3.0 / 2 = 1.5 s of 10 s = 30 %
    assert "| policy forward | 0.500 | 36 | 1.500 | 30 |" in table


def test_pyspy_buckets_refuse_a_line_without_a_count():
    with pytest.raises(ValueError, match="line 2: expected 'frame;frame;... COUNT'"):
        buckets.parse_raw("a (f.py:1) 3\na (f.py:1) many\n")


def test_overrides_may_name_the_rounds_folder(tmp_path):
    overrides = ["train.reference_errors={work}/ref", "train.batch_size=4"]
    assert peer_ab.in_folder(overrides, tmp_path) == [f"train.reference_errors={tmp_path}/ref", "train.batch_size=4"]


def test_variants_are_extra_arms_with_their_overrides_and_bad_ones_are_refused():
    assert peer_ab.parse_variants(["ref=train.reference_errors=auto", "all=train.reference_errors=auto,train.channels_last=true"]) == {
        "ref": ["train.reference_errors=auto"],
        "all": ["train.reference_errors=auto", "train.channels_last=true"],
    }
    for bad in (["raw=train.seed=1"], ["peer=train.seed=1"], ["x="], ["x=novalue"], ["x=a=1", "x=b=2"]):
        with pytest.raises(ValueError, match="NAME=KEY=VALUE"):
            peer_ab.parse_variants(bad)
