"""Check the paper formula of full fine-tuning memory (benchmarks/README.md) against a measured run.

The formula counts bytes per parameter: the trained denoiser's weights, gradients and optimizer
state (AdamW in fp32: 4 + 4 + 8 = 16 B), a frozen reference copy of the denoiser and the frozen VAE
and text encoders (2 B in bf16 on a GPU; 4 B here, as this CPU run keeps them in fp32). This script
measures each term on CPU in one process, by resident memory (RSS) after each stage:

* ``load``: RSS after loading the backbone and building policy + reference (weights of all models);
* ``step``: peak RSS after the first optimizer step (gradients and AdamW's two moments appear,
  plus the step's activations, which the formula leaves out).

and prints measured growth against the formula's prediction for the same parameter counts.

    python benchmarks/memory_formula.py MODEL_DIR PAIRS [--resolution 32] [--batch 1]
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def rss_mb() -> float:
    """Current resident size (Linux /proc), MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status (Linux only)")


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(model: str, pairs: str, resolution: int, batch: int) -> dict[str, float]:
    import torch
    from accelerate import Accelerator

    from diffalign.trainers.config import load_train_config
    from diffalign.trainers.loop import setup_training

    torch.set_num_threads(2)
    overrides = [f"model.path={model}", f"data.path={pairs}", f"data.resolution={resolution}", "train.mode=full",
                 "train.optimizer=adamw", "train.mixed_precision=no", f"train.batch_size={batch}",
                 "train.gradient_accumulation_steps=1", "data.random_flip=false", "train.gradient_checkpointing=false"]
    config = load_train_config(str(REPO / "configs" / "sdxl" / "dpo.yaml"), overrides)
    before = rss_mb()
    accelerator = Accelerator(mixed_precision="no")
    setup = setup_training(config, accelerator)
    loaded = rss_mb()
    trained = sum(p.numel() for p in setup.trainable)
    loader = iter(torch.utils.data.DataLoader(setup.data.dataset, batch_sampler=setup.data.batch_sampler(batch, 0, start_batch=0),
                                              collate_fn=setup.data.collate))
    output = setup.step(setup.policy, setup.reference, next(loader))
    accelerator.backward(output.loss)
    setup.optimizer.step()
    stepped = peak_mb()
    state = sum(t.numel() * t.element_size() for s in setup.optimizer.state.values() for t in s.values() if torch.is_tensor(t))
    grads = sum(p.grad.numel() * p.grad.element_size() for p in setup.trainable if p.grad is not None)
    return {
        "trained_params_M": trained / 1e6,
        "load_growth_MB": loaded - before,
        "formula_load_MB (policy + reference, 4 B each)": 2 * trained * 4 / 2**20,
        "step_growth_MB": stepped - loaded,
        "formula_step_MB (grads 4 + AdamW moments 8)": trained * 12 / 2**20,
        "counted_grads_plus_state_MB": (grads + state) / 2**20,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("pairs")
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--batch", type=int, default=1)
    args = parser.parse_args()
    json.dump(measure(args.model, args.pairs, args.resolution, args.batch), sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
