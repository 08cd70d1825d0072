"""The toy reward ranks held-out toy pairs correctly and refuses prompts outside the toy world."""

from __future__ import annotations

import io
from collections import defaultdict
from pathlib import Path

import numpy as np
import PIL.Image
import pyarrow.parquet as pq
import pytest
import torch

from diffalign.toy.reward import parse_prompt, toy_reward
from diffalign.toy.world import LOSER_KINDS, ToyWorldSpec, render, write_pairs

# Measured before setting the bar: 100% of pairs of every loser kind ranked right on 600 held-out pairs
# (seed 1) and 900 (seed 7); smallest winner-minus-loser margins 0.064 (degraded), 0.067 (shape),
# 0.12 (colour). 0.95 leaves room for a changed world without hiding a broken reward.
MIN_ACCURACY = 0.95


def _images(column: list[bytes]) -> list[PIL.Image.Image]:
    return [PIL.Image.open(io.BytesIO(data)) for data in column]


def test_reward_ranks_heldout_winners_above_losers(tmp_path: Path) -> None:
    table = pq.read_table(write_pairs(tmp_path / "heldout.parquet", n=150, seed=1)).to_pydict()
    captions = table["caption"]
    first, second = toy_reward(_images(table["jpg_0"]), captions), toy_reward(_images(table["jpg_1"]), captions)
    correct: dict[str, list[bool]] = defaultdict(list)
    for label_0, kind, r0, r1 in zip(table["label_0"], table["loser_kind"], first, second):
        winner, loser = (r0, r1) if label_0 == 1.0 else (r1, r0)
        correct[kind].append(bool(winner > loser))
    assert set(correct) == set(LOSER_KINDS)
    accuracy = {kind: float(np.mean(values)) for kind, values in correct.items()}
    assert all(value >= MIN_ACCURACY for value in accuracy.values()), accuracy


def test_tensor_and_pil_inputs_agree_and_other_sizes_are_resized() -> None:
    rng = np.random.default_rng(0)
    pictures = [render("red", "circle", rng), render("blue", "triangle", rng)]
    prompts = ["a red circle", "a blue triangle"]
    tensor = torch.from_numpy(np.stack([np.asarray(p) for p in pictures])).permute(0, 3, 1, 2).float() / 127.5 - 1
    from_pil, from_tensor = toy_reward(pictures, prompts), toy_reward(tensor, prompts)
    torch.testing.assert_close(from_pil, from_tensor)
    assert from_pil.shape == (2,) and (from_pil <= 0).all() and (from_pil > -0.05).all()  # clean renders: near 0
    big = render("red", "circle", np.random.default_rng(0), ToyWorldSpec(image_size=64))
    assert toy_reward([big], ["a red circle"]) > toy_reward([big], ["a green circle"])
    assert toy_reward([big], ["a red circle"]) > toy_reward([big], ["a red square"])


def test_unknown_prompts_and_bad_inputs_are_errors() -> None:
    image = render("red", "circle", np.random.default_rng(0))
    with pytest.raises(ValueError, match="purple circle.*not a toy-world prompt"):
        toy_reward([image], ["a purple circle"])
    with pytest.raises(ValueError, match="red"):
        parse_prompt("a red hexagon")
    with pytest.raises(ValueError, match="2 prompts"):
        toy_reward([image], ["a red circle", "a red square"])
    with pytest.raises(ValueError, match=r"\[N, 3, H, W\]"):
        toy_reward(torch.zeros(1, 32, 32), ["a red circle"])
    assert parse_prompt("a yellow square") == ("yellow", "square")
