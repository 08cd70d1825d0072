"""Speed and memory settings change no result: the mmap threshold frees memory, channels_last trains the same."""

from __future__ import annotations

import platform
import subprocess
import sys
import textwrap

import pytest
import torch

from diffalign.apps.cli import main
from diffalign.trainers.metrics import read_metrics
from diffalign.trainers.performance import set_malloc_mmap_threshold

# 40 blocks of 1 MiB, touched, then freed while a block allocated after them pins the heap's top:
# on glibc's default (moving) threshold they came from the heap and stay resident; with a fixed 128 KiB
# threshold each was its own mapping and is returned. The first 16 MiB free raises the moving threshold (to 16 MiB; it moves only for blocks up to 32 MiB).
RETENTION = textwrap.dedent(
    """
    import ctypes, re, sys
    sys.path.insert(0, {repo!r})
    from diffalign.trainers.performance import set_malloc_mmap_threshold
    libc = ctypes.CDLL(None)
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    def rss_mib():
        return int(re.search(r"VmRSS:\\s+(\\d+)", open("/proc/self/status").read()).group(1)) / 1024
    if {fixed}:
        assert set_malloc_mmap_threshold(131072)
    big = libc.malloc(16 << 20); ctypes.memset(big, 1, 16 << 20); libc.free(big)
    blocks = [libc.malloc(1 << 20) for _ in range(40)]
    for block in blocks:
        ctypes.memset(block, 1, 1 << 20)
    pin = libc.malloc(1 << 20)  # after the 40 on the heap: freeing them leaves a hole, not a trimmable top
    before = rss_mib()
    for block in blocks:
        libc.free(block)
    print(before - rss_mib())
    """
)


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's mallopt")
def test_a_fixed_mmap_threshold_returns_freed_blocks_that_the_default_keeps_resident():
    from pathlib import Path

    repo = str(Path(__file__).resolve().parents[2])
    released = {}
    for fixed in (False, True):
        out = subprocess.run([sys.executable, "-c", RETENTION.format(repo=repo, fixed=fixed)], capture_output=True, text=True, check=True)
        released[fixed] = float(out.stdout.strip())
    assert released[False] < 8, released  # glibc's default: the 40 MiB stay in the process
    assert released[True] > 32, released  # fixed threshold: returned to the system when freed


def test_no_threshold_leaves_the_allocator_alone():
    assert set_malloc_mmap_threshold(None) is False


def test_channels_last_trains_as_the_default_layout(tiny_models, toy_pairs, train_args, tmp_path, monkeypatch):
    import diffalign.trainers.loop as loop

    laid_out = []
    real = loop.use_channels_last

    def record(network):
        real(network)
        laid_out.append([p for p in network.parameters() if p.dim() == 4])

    monkeypatch.setattr(loop, "use_channels_last", record)
    common = ("train.mode=lora", "method.beta=10", "train.learning_rate=1e-3", "train.scale_lr=false")
    assert main(train_args("sd15", tiny_models["sd15"], toy_pairs, tmp_path / "nchw", *common)) == 0
    assert not laid_out
    assert main(train_args("sd15", tiny_models["sd15"], toy_pairs, tmp_path / "nhwc", *common, "train.channels_last=true")) == 0
    assert laid_out and laid_out[0] and all(p.is_contiguous(memory_format=torch.channels_last) for p in laid_out[0])
    losses = {name: [row["loss"] for row in read_metrics(tmp_path / name / "metrics.jsonl")] for name in ("nchw", "nhwc")}
    assert losses["nhwc"] == pytest.approx(losses["nchw"], rel=1e-4)


def test_compile_blocks_compiles_each_repeated_block_in_place_and_names_a_model_without_them(tiny_models):
    from diffusers import UNet2DConditionModel

    from diffalign.config import ConfigError
    from diffalign.trainers.performance import compile_denoiser

    unet = UNet2DConditionModel.from_pretrained(tiny_models["sd15"], subfolder="unet")
    names = list(unet.state_dict())
    compile_denoiser(unet, "none")
    assert all(getattr(module, "_compiled_call_impl", None) is None for module in unet.modules())
    compile_denoiser(unet, "blocks")
    compiled = [type(module).__name__ for module in unet.modules() if getattr(module, "_compiled_call_impl", None) is not None]
    assert compiled and set(compiled) == set(unet._repeated_blocks)
    assert list(unet.state_dict()) == names  # in place: checkpoints keep their keys
    with pytest.raises(ConfigError, match="names no repeated blocks; use train.compile=full"):
        compile_denoiser(torch.nn.Sequential(torch.nn.Linear(2, 2)), "blocks")


@pytest.mark.parametrize("implementation", ["fused", "foreach", "for-loop"])
def test_every_adamw_implementation_takes_the_same_steps(implementation):
    from diffalign.trainers.config import TrainSection
    from diffalign.trainers.models import build_optimizer

    generator = torch.Generator().manual_seed(0)
    start = [torch.randn(64, 32, generator=generator), torch.randn(32, generator=generator)]
    gradients = [[torch.randn_like(value) for value in start] for _ in range(5)]

    def trained(name: str) -> list[torch.Tensor]:
        parameters = [torch.nn.Parameter(value.clone()) for value in start]
        optimizer = build_optimizer(parameters, TrainSection(adam_implementation=name), learning_rate=1e-2)
        for step in gradients:
            for parameter, gradient in zip(parameters, step):
                parameter.grad = gradient.clone()
            optimizer.step()
        return [parameter.detach() for parameter in parameters]

    optimizer = build_optimizer([torch.nn.Parameter(start[0].clone())], TrainSection(adam_implementation=implementation), 1e-2)
    flags = optimizer.defaults
    assert (flags["fused"] is True) == (implementation == "fused")
    assert (flags["foreach"] is True) == (implementation == "foreach")
    for ours, loop in zip(trained(implementation), trained("for-loop")):
        torch.testing.assert_close(ours, loop)  # float rounding only; the weights moved by ~5e-2
        assert not torch.equal(loop, start[0] if loop.dim() == 2 else start[1])
