"""One dtype parser: both spellings everywhere, a clear error for anything else."""

from __future__ import annotations

import argparse

import pytest
import torch

from diffalign.apps.cli import build_parser
from diffalign.dtypes import DTYPE_NAMES, parse_dtype


@pytest.mark.parametrize(("short", "long", "expected"), [
    ("fp32", "float32", torch.float32), ("bf16", "bfloat16", torch.bfloat16), ("fp16", "float16", torch.float16),
])
def test_both_spellings_and_the_torch_dtype_parse_to_the_same_dtype(short, long, expected):
    assert parse_dtype(short) is expected
    assert parse_dtype(long) is expected
    assert parse_dtype(expected) is expected


@pytest.mark.parametrize("bad", ["float64", "fp8", "BF16", "", None, torch.float64, torch.int8])
def test_anything_else_is_refused_naming_the_valid_spellings(bad):
    with pytest.raises(ValueError) as error:
        parse_dtype(bad)
    assert "float32" in str(error.value) and "bfloat16" in str(error.value)


def _dtype_options(parser: argparse.ArgumentParser, path: str = "diffalign") -> dict[str, argparse.Action]:
    found = {}
    for action in parser._actions:  # argparse keeps its parsed tree only here
        if "--dtype" in action.option_strings:
            found[path] = action
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found.update(_dtype_options(sub, f"{path} {name}"))
    return found


def test_every_command_with_a_dtype_option_accepts_every_spelling():
    options = _dtype_options(build_parser())
    assert {"diffalign cache", "diffalign score"} <= set(options), "the walk must reach the subcommands"
    for command, action in options.items():
        assert set(action.choices) == set(DTYPE_NAMES), f"{command} --dtype spells dtypes its own way"
