"""Every command and every argument of ``diffalign`` explains itself, and ``--version`` says which diffalign this is.

The walk covers whatever ``build_parser`` registers, so a command added later without help text fails here.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from importlib.metadata import version

import pytest

from diffalign.apps import cli


def _walk(parser: argparse.ArgumentParser, path: tuple[str, ...]) -> Iterator[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    yield path, parser
    for action in parser._actions:  # noqa: SLF001 -- argparse offers no public view of a parser's arguments
        if isinstance(action, argparse._SubParsersAction):  # noqa: SLF001
            for name, sub in action.choices.items():
                yield from _walk(sub, (*path, name))


def _commands() -> list[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    return list(_walk(cli.build_parser(), ("diffalign",)))


def test_the_walk_reaches_the_nested_commands() -> None:
    names = {" ".join(path) for path, _ in _commands()}
    assert {"diffalign train", "diffalign data check", "diffalign recipes show", "diffalign score-pairs"} <= names


def test_every_argument_has_help_text() -> None:
    missing = []
    for path, parser in _commands():
        for action in parser._actions:  # noqa: SLF001
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):  # noqa: SLF001
                continue
            if not (action.help or "").strip() or action.help == argparse.SUPPRESS:
                missing.append(f"{' '.join(path)} {'/'.join(action.option_strings) or action.dest}")
    assert not missing, "arguments without help text:\n  " + "\n  ".join(missing)


def test_every_command_has_help_text() -> None:
    missing = []
    for path, parser in _commands():
        for action in parser._actions:  # noqa: SLF001
            if isinstance(action, argparse._SubParsersAction):  # noqa: SLF001
                described = {choice.dest for choice in action._choices_actions if (choice.help or "").strip()}  # noqa: SLF001
                missing += [f"{' '.join(path)} {name}" for name in action.choices if name not in described]
    assert not missing, "commands without help text:\n  " + "\n  ".join(missing)


def test_every_help_page_renders(capsys: pytest.CaptureFixture[str]) -> None:
    for path, parser in _commands():
        text = parser.format_help()
        assert text.startswith("usage: " + " ".join(path)), path


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"diffalign {version('diffalign')}"
