"""Every mistake a user can make at the command line ends in one message that names the thing and says what to do.

Each case runs ``diffalign.apps.cli.main`` in this process (a subprocess where the exit path itself is
the subject) and checks the exit status, the words of the message and that no traceback was printed.
The training cases also check that the mistake is found before any model loads: ``train`` itself is
replaced by a function that fails the test.
"""

from __future__ import annotations

import socket
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from diffalign.apps import cli

REPO = Path(__file__).resolve().parents[2]


def _train_args(model: Path, data: str | Path, output_dir: str | Path, *extra: str) -> list[str]:
    return [
        "train", str(REPO / "configs/sd15/dpo.yaml"), f"model.path={model}", f"data.path={data}",
        f"train.output_dir={output_dir}", "data.resolution=32", "train.max_steps=1", "train.batch_size=2",
        "train.mixed_precision=no", "train.progress_bar=false", *extra,
    ]  # fmt: skip


@pytest.fixture
def no_training(monkeypatch: pytest.MonkeyPatch) -> None:
    """The error must be found before training (and its model loading) starts."""
    import diffalign.trainers.loop as loop

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("train() was reached: the mistake was not caught before the models load")

    monkeypatch.setattr(loop, "train", refuse)


def _error(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    """Run ``main(argv)``, require exit status 2 and no traceback; return stderr."""
    status = cli.main(argv)
    captured = capsys.readouterr()
    assert status == 2, captured
    assert "Traceback" not in captured.err + captured.out
    return captured.err


def test_fp16_on_cpu_says_use_bf16_or_no(tiny_models, toy_pairs, tmp_path, capsys) -> None:
    if torch.cuda.is_available():
        pytest.skip("fp16 runs on a GPU")
    argv = _train_args(tiny_models["sd15"], toy_pairs, tmp_path / "run")
    err = _error(capsys, [*argv, "train.mixed_precision=fp16"])
    assert "train.mixed_precision=fp16 needs a GPU" in err and "train.mixed_precision=bf16" in err


def test_empty_data_set_is_named_before_models_load(tiny_models, toy_pairs, tmp_path, capsys, no_training) -> None:
    empty = tmp_path / "empty.parquet"
    pq.write_table(pq.read_table(toy_pairs).slice(0, 0), empty)
    err = _error(capsys, _train_args(tiny_models["sd15"], empty, tmp_path / "run"))
    assert f"data.path={empty}" in err and "empty" in err and "Point data.path at" in err


def test_missing_caption_column_is_one_line_naming_it(tiny_models, toy_pairs, tmp_path, capsys, no_training) -> None:
    no_caption = tmp_path / "nocap.parquet"
    pq.write_table(pq.read_table(toy_pairs).drop(["caption"]), no_caption)
    err = _error(capsys, _train_args(tiny_models["sd15"], no_caption, tmp_path / "run"))
    assert "missing required column 'caption'" in err and f"data.path={no_caption}" in err
    assert "diffalign data check" in err
    assert len(err.strip().splitlines()) == 1


def test_dcpo_on_pairs_without_per_image_captions(tiny_models, toy_pairs, tmp_path, capsys, no_training) -> None:
    argv = _train_args(tiny_models["sd15"], toy_pairs, tmp_path / "run")
    argv[1] = str(REPO / "configs/sd15/dcpo.yaml")
    err = _error(capsys, argv)
    assert "pairs.parquet: no row has per-image captions" in err and "which dcpo needs" in err
    assert "`diffalign captions`" in err  # what to do


def test_relative_missing_data_path_is_a_local_path_not_a_hub_id(
    tiny_models, tmp_path, capsys, monkeypatch, no_training
) -> None:
    monkeypatch.chdir(tmp_path)
    err = _error(capsys, _train_args(tiny_models["sd15"], "missing/pairs.parquet", tmp_path / "run"))
    assert "data.path=missing/pairs.parquet: no such file or directory (a local path, not a hub id: looked for" in err
    assert str(tmp_path / "missing/pairs.parquet") in err  # where it looked
    assert "Hub dataset" not in err  # it was never tried on the hub


def test_output_dir_that_is_a_file(tiny_models, toy_pairs, tmp_path, capsys, no_training) -> None:
    a_file = tmp_path / "taken"
    a_file.write_text("not a folder")
    err = _error(capsys, _train_args(tiny_models["sd15"], toy_pairs, a_file))
    assert f"train.output_dir={a_file} is a file" in err and "choose a folder" in err
    err = _error(capsys, _train_args(tiny_models["sd15"], toy_pairs, a_file / "run"))
    assert f"{a_file} is a file, so nothing can be made under it" in err


@pytest.mark.skipif(not Path("/sys").is_dir(), reason="no /sys on this system")
def test_output_dir_under_sys(tiny_models, toy_pairs, tmp_path, capsys, no_training) -> None:
    err = _error(capsys, _train_args(tiny_models["sd15"], toy_pairs, "/sys/diffalign-run"))
    assert "train.output_dir=/sys/diffalign-run" in err and "cannot be written" in err


@pytest.mark.parametrize("where", ["file", "sys"])
@pytest.mark.parametrize(
    "command, output",
    [
        ("generate", "--out"), ("captions", "output"), ("quickstart", "--output-dir"), ("rank", "--out"),
        ("score", "--out"), ("recipes cp", "destination"), ("data check", "--json"), ("compare", "--out"),
        ("cache", "data.cache_dir"),
    ],
)  # fmt: skip
def test_every_output_path_is_checked_before_the_work(
    command, output, where, tiny_models, toy_pairs, tmp_path, capsys, monkeypatch
) -> None:
    """Each command's output under a file, or under /sys: one line naming the option, nothing run first."""
    if where == "sys" and not Path("/sys").is_dir():
        pytest.skip("no /sys on this system")
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    suffix = {"--json": ".json", "destination": ".yaml", "captions": ".parquet"}.get(output, "")
    suffix = suffix or {"rank": ".parquet", "score": ".csv", "compare": ".png", "captions": ".parquet"}.get(command, "")
    target = (Path("/sys") if where == "sys" else blocker) / f"diffalign-out{suffix}"
    monkeypatch.setattr("diffalign.apps.quickstart.run_quickstart", lambda *a, **k: pytest.fail("quickstart ran"))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\n")
    argv = {
        "generate": ["generate", "--model", str(tiny_models["sd15"]), "--prompts", str(prompts), "--out", str(target)],
        "captions": ["captions", str(toy_pairs), str(target)],
        "quickstart": ["quickstart", "--output-dir", str(target)],
        "rank": ["rank", "--source", str(tmp_path), "--source", str(tmp_path), "--scorer", "x", "--out", str(target)],
        "score": ["score", str(tmp_path), "--scorer", "x", "--out", str(target)],
        "recipes cp": ["recipes", "cp", "sd15/dpo", str(target)],
        "data check": ["data", "check", str(toy_pairs), "--json", str(target)],
        "compare": ["compare", str(toy_pairs), str(toy_pairs), "--out", str(target)],
        "cache": ["cache", "sd15/dpo", f"model.path={tiny_models['sd15']}", f"data.path={toy_pairs}",
                  f"data.cache_dir={target}"],
    }[command]  # fmt: skip
    err = _error(capsys, argv)
    assert f"diffalign {command}: error: {output}" in err and str(target) in err
    assert ("is a file, so nothing can be made under it" if where == "file" else "cannot be written") in err
    assert "choose" in err


@pytest.fixture
def hub_unreachable(monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> None:
    """No hub: HF_HUB_OFFLINE set, or (param "unreachable") an endpoint that refuses connections.

    Either way nothing is downloaded; huggingface_hub's offline flag is restored after the test.
    """
    from huggingface_hub import constants

    if request.param == "offline":
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    else:  # online as far as the settings go (conftest sets HF_HUB_OFFLINE=1 for every test); the probe must catch it
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
        for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
            monkeypatch.delenv(name, raising=False)
        with socket.socket() as closed:  # a port nothing listens on: the probe is refused at once
            closed.bind(("127.0.0.1", 0))
            port = closed.getsockname()[1]
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    return request.param


@pytest.mark.parametrize("hub_unreachable", ["offline", "unreachable"], indirect=True)
def test_hub_model_path_without_hub_fails_before_loading(
    toy_pairs, tmp_path, capsys, hub_unreachable, no_training
) -> None:
    err = _error(capsys, _train_args("nobody-xyz/no-such-model", toy_pairs, tmp_path / "run"))  # type: ignore[arg-type]
    assert "model.path=nobody-xyz/no-such-model: not a local folder and not in the local hub cache" in err
    assert ("HF_HUB_OFFLINE" in err) if hub_unreachable == "offline" else ("cannot be reached" in err), err
    assert "Pass a local diffusers pipeline folder" in err


@pytest.mark.parametrize("hub_unreachable", ["offline", "unreachable"], indirect=True)
def test_hub_data_id_without_hub_fails_before_loading(
    tiny_models, tmp_path, capsys, monkeypatch, hub_unreachable, no_training
) -> None:
    monkeypatch.chdir(tmp_path)  # no local folder of that name
    err = _error(capsys, _train_args(tiny_models["sd15"], "nobody-xyz/no-such-data", tmp_path / "run"))
    assert "data.path=nobody-xyz/no-such-data" in err and "loading it as a Hub dataset (split 'train') failed" in err
    assert "not in the local cache and " + ("HF_HUB_OFFLINE is set" if hub_unreachable == "offline" else "the hub") in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("hub_unreachable", ["offline", "unreachable"], indirect=True)
def test_scorer_without_local_weights_fails_at_once(tmp_path, capsys, hub_unreachable) -> None:
    import time

    from PIL import Image

    Image.new("RGB", (16, 16)).save(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("a cat")
    start = time.monotonic()
    err = _error(capsys, ["score", str(tmp_path), "--scorer", "pickscore=nobody-xyz/no-such-weights", "--no-progress"])
    assert time.monotonic() - start < 60  # no retries with backoff (five of them took about a minute)
    assert "scorer 'pickscore' (weights nobody-xyz/no-such-weights): not a local path" in err
    assert "`--scorer pickscore=PATH`" in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("hub_unreachable", ["offline", "unreachable"], indirect=True)
@pytest.mark.parametrize("command", ["generate", "captions caption_model", "captions perturb_model"])
def test_model_hub_ids_of_generate_and_captions_fail_at_once(command, toy_pairs, tmp_path, capsys, hub_unreachable) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\n")
    argv = {
        "generate": ["generate", "--model", "nobody-xyz/model", "--prompts", str(prompts), "--out", str(tmp_path / "o")],
        "captions caption_model": ["captions", str(toy_pairs), str(tmp_path / "o.parquet"), "--strategy", "caption",
                                   "--caption-model", "nobody-xyz/model"],
        "captions perturb_model": ["captions", str(toy_pairs), str(tmp_path / "o.parquet"), "--perturb-model",
                                   "nobody-xyz/model"],
    }[command]  # fmt: skip
    err = _error(capsys, argv)
    setting = {"generate": "--model", "captions caption_model": "caption_model", "captions perturb_model": "perturb_model"}
    assert f"{setting[command]} nobody-xyz/model: not a local path and not in the local hub cache" in err
    assert "Pass a local" in err and len(err.strip().splitlines()) == 1


def test_scorer_weights_that_are_a_missing_local_path(tmp_path, capsys) -> None:
    from PIL import Image

    Image.new("RGB", (16, 16)).save(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("a cat")
    err = _error(capsys, ["score", str(tmp_path), "--scorer", "clipscore=./no/such/weights", "--no-progress"])
    assert "weights ./no/such/weights: no such local file or folder" in err


def test_scorer_weights_folder_without_the_files(tmp_path, capsys) -> None:
    from PIL import Image

    Image.new("RGB", (16, 16)).save(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("a cat")
    empty = tmp_path / "weights"
    empty.mkdir()
    err = _error(capsys, ["score", str(tmp_path), "--scorer", f"pickscore={empty}", "--no-progress"])
    assert f"scorer 'pickscore': cannot load the local weights {empty}" in err and "hub" not in err
    assert len(err.strip().splitlines()) == 1


def test_arena_port_in_use(toy_arena_sources, tmp_path, capsys) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        sources = [str(path) for path in toy_arena_sources.values()][:2]
        argv = ["arena", *(f"--source={s}" for s in sources), "--db", str(tmp_path / "votes.db"), "--port", str(port)]
        err = _error(capsys, argv)
    assert f"port {port} on 127.0.0.1 is already in use" in err and "pass another --port" in err


@pytest.mark.parametrize(
    "argv, command",
    [
        (["train", "sd15/dpo", "train.max_steps=2", "--device", "cpu"], "train"),
        (["cache", "sd15/dpo", "data.cache_dir=/tmp/x", "--bogus"], "cache"),
        (["quickstart", "train.max_steps=2", "--no-such-option"], "quickstart"),
        (["recipes", "show", "sd15/dpo", "train.max_steps=2", "--bogus"], "recipes show"),
    ],
)
def test_unknown_option_after_overrides_names_it(argv, command, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert f"diffalign {command}: error: unrecognized arguments: {argv[-1] if argv[-1] != 'cpu' else '--device cpu'}" in err
    assert f"`diffalign {command} -h` lists them" in err


@pytest.mark.parametrize(
    "argv, overrides",
    [
        (["train", "sd15/dpo", "a.b=1", "--verbose", "c.d=2"], ["a.b=1", "c.d=2"]),
        (["cache", "sd15/dpo", "a.b=1", "--batch-size", "3", "c.d=2"], ["a.b=1", "c.d=2"]),
        (["quickstart", "a.b=1", "--output-dir", "o", "c.d=2"], ["a.b=1", "c.d=2"]),
        (["recipes", "show", "sd15/dpo", "a.b=1", "-q", "c.d=2"], ["a.b=1", "c.d=2"]),
    ],
)
def test_overrides_and_options_in_any_order(argv, overrides) -> None:
    args = cli.parse_arguments(cli.build_parser(), argv)
    assert args.overrides == overrides
    assert args.verbose or args.quiet or getattr(args, "batch_size", None) == 3 or getattr(args, "output_dir", None) == "o"


def test_recipes_show_applies_an_override_given_after_an_option(capsys) -> None:
    assert cli.main(["recipes", "show", "sd15/dpo", "--quiet", "train.max_steps=7"]) == 0
    assert "  max_steps: 7  #" in capsys.readouterr().out


def test_ctrl_c_is_one_line(monkeypatch, capsys) -> None:
    from diffalign import recipes

    def interrupted() -> dict:
        raise KeyboardInterrupt

    monkeypatch.setattr(recipes, "available", interrupted)  # what `diffalign recipes` calls first
    assert cli.main(["recipes"]) == 130
    assert capsys.readouterr().err == "diffalign recipes: interrupted\n"


def test_unknown_recipe_is_one_line(capsys) -> None:
    err = _error(capsys, ["train", "no/such-recipe"])
    assert "no/such-recipe" in err and "`diffalign recipes` lists them" in err


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
