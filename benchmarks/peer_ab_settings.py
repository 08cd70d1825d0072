"""Matched settings of the peer A/B: one spec, two command lines, and a check that they agree.

`benchmarks/peer_ab.py` runs a reference training script from the user's own checkout (diffusers'
DPO SDXL example, or the official MaPO LoRA script) against `diffalign train` on the same work.
A ratio of their step times only means something if both runs do the same work, so the two
command lines are built from one `ABSpec` here, and `settings_rows` reads the values back *from
the command lines themselves* (not from the spec): a user's extra `--diffalign-override` that
changes, say, the batch size shows up as a mismatch and the harness refuses to run.

Pure functions, no torch: the tests check the mapping without any model.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

# Where each peer's training script lives inside the user's checkout of its repository.
PEER_SCRIPTS: dict[str, str] = {
    # huggingface/diffusers, unmodified
    "dpo": "examples/research_projects/diffusion_dpo/train_diffusion_dpo_sdxl.py",
    # mapo-t2i/mapo (the official MaPO code; diffusers only has its ORPO precursor, a different loss)
    "mapo": "train_with_lora.py",
}
PEER_REPOS: dict[str, str] = {"dpo": "huggingface/diffusers", "mapo": "mapo-t2i/mapo"}
RECIPES: dict[str, str] = {"dpo": "sdxl/dpo", "mapo": "sdxl/mapo"}
PRECISIONS: dict[str, str] = {"fp32": "no", "bf16": "bf16"}  # our name -> accelerate's mixed_precision


@dataclass(frozen=True)
class ABSpec:
    """The work both sides do: same model, data, batch, resolution, LoRA, optimizer, precision."""

    method: str  # dpo | mapo
    model: str  # a diffusers SDXL folder
    data: str  # a Pick-a-Pic-schema parquet file (diffalign reads it; the peer reads its folder)
    steps: int
    rows: int  # rows of the data both sides may draw from (one epoch of the longest run)
    precision: str = "fp32"  # fp32 | bf16
    batch_pairs: int = 4
    resolution: int = 64
    rank: int = 4
    learning_rate: float = 1e-5
    seed: int = 0
    beta: float | None = None  # None: each method's usual value (DPO 5000, MaPO 0.1)
    extra_overrides: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if self.method not in PEER_SCRIPTS:
            raise ValueError(f"method {self.method!r}: choose one of {sorted(PEER_SCRIPTS)}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision {self.precision!r}: choose one of {sorted(PRECISIONS)}")
        for name in ("steps", "rows", "batch_pairs", "resolution", "rank"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        for override in self.extra_overrides:
            if "=" not in override:
                raise ValueError(f"--diffalign-override {override!r}: expected key.path=value")

    @property
    def method_beta(self) -> float:
        """The loss weight both sides get: DPO's KL strength or MaPO's margin weight."""
        if self.beta is not None:
            return self.beta
        return 5000.0 if self.method == "dpo" else 0.1


def peer_script(method: str, checkout: Path) -> Path:
    """The peer's training script inside the user's checkout; a clear error when it is not there."""
    script = Path(checkout) / PEER_SCRIPTS[method]
    if not script.is_file():
        raise FileNotFoundError(
            f"{script} not found: --peer-repo must be a checkout of {PEER_REPOS[method]} "
            f"(the {method} peer is its {PEER_SCRIPTS[method]}); "
            f"e.g. git clone https://github.com/{PEER_REPOS[method]} and pass its folder"
        )
    return script


def peer_argv(spec: ABSpec, dataset_dir: Path, output_dir: Path) -> list[str]:
    """The peer script's arguments for `spec` (everything that matters for the work passed explicitly)."""
    rank_flag = "--rank" if spec.method == "dpo" else "--lora_rank"
    beta_flag = "--beta_dpo" if spec.method == "dpo" else "--beta_mapo"
    return [
        "--pretrained_model_name_or_path", spec.model,
        "--dataset_name", str(dataset_dir),
        "--dataset_split_name", "train",
        "--max_train_samples", str(spec.rows),
        "--resolution", str(spec.resolution),
        "--train_batch_size", str(spec.batch_pairs),
        "--gradient_accumulation_steps", "1",
        "--max_train_steps", str(spec.steps),
        rank_flag, str(spec.rank),
        beta_flag, f"{spec.method_beta:g}",  # diffusers parses --beta_dpo as int
        "--learning_rate", repr(spec.learning_rate),
        "--lr_scheduler", "constant",
        "--lr_warmup_steps", "0",
        "--adam_beta1", "0.9",
        "--adam_beta2", "0.999",
        "--adam_weight_decay", "0.01",
        "--adam_epsilon", "1e-08",
        "--max_grad_norm", "1.0",
        "--mixed_precision", PRECISIONS[spec.precision],
        "--checkpointing_steps", str(10 * spec.steps + 1000),  # no checkpoint inside the run
        "--dataloader_num_workers", "0",
        "--no_hflip",  # diffalign's latent cache holds unflipped latents, so no arm flips
        "--report_to", "tensorboard",
        "--seed", str(spec.seed),
        "--output_dir", str(output_dir),
    ]


def diffalign_overrides(spec: ABSpec, output_dir: Path) -> list[str]:
    """`diffalign train RECIPE` overrides for `spec`, then the user's extra overrides (last wins)."""
    beta_key = "method.beta" if spec.method == "dpo" else "method.beta_mapo"
    return [
        f"model.path={spec.model}",
        f"data.path={spec.data}",
        f"data.max_rows={spec.rows}",
        f"data.resolution={spec.resolution}",
        "data.center_crop=true",
        "data.random_flip=false",
        "data.num_workers=0",
        "data.empty_prompt_prob=0",  # the peers never drop prompts
        "data.sdxl_size_conditioning=first_image",  # as the peers' time ids
        f"train.batch_size={spec.batch_pairs}",
        "train.gradient_accumulation_steps=1",
        f"train.max_steps={spec.steps}",
        "train.mode=lora",
        f"lora.rank={spec.rank}",
        f"{beta_key}={spec.method_beta:g}",
        "train.optimizer=adamw",
        f"train.learning_rate={spec.learning_rate!r}",
        "train.scale_lr=false",
        "train.lr_scheduler=constant",
        "train.lr_warmup_steps=0",
        "train.adam_beta1=0.9",
        "train.adam_beta2=0.999",
        "train.weight_decay=0.01",
        "train.adam_epsilon=1e-08",
        "train.max_grad_norm=1.0",
        f"train.mixed_precision={PRECISIONS[spec.precision]}",
        "train.gradient_checkpointing=false",
        f"train.checkpointing_steps={10 * spec.steps + 1000}",
        "train.report_to=tensorboard",
        f"train.seed={spec.seed}",
        f"train.output_dir={output_dir}",
        "train.overwrite=true",
        *spec.extra_overrides,
    ]


def parse_peer_argv(argv: list[str]) -> dict[str, str]:
    """`--key value` / `--flag` pairs as a dict (a bare flag reads "true"); the last occurrence wins."""
    values: dict[str, str] = {}
    index = 0
    while index < len(argv):
        token = argv[index]
        if not token.startswith("--"):
            raise ValueError(f"peer argument {token!r} does not follow a --flag")
        if index + 1 < len(argv) and not argv[index + 1].startswith("--"):
            values[token[2:]] = argv[index + 1]
            index += 2
        else:
            values[token[2:]] = "true"
            index += 1
    return values


def parse_overrides(overrides: list[str]) -> dict[str, str]:
    """`key.path=value` overrides as a dict; the last occurrence wins, as in `diffalign train`."""
    values: dict[str, str] = {}
    for override in overrides:
        key, sep, value = override.partition("=")
        if not sep:
            raise ValueError(f"override {override!r}: expected key.path=value")
        values[key] = value
    return values


def _number(value: str) -> str:
    return repr(float(value))


def _boolean(value: str) -> str:
    lowered = value.strip().lower()
    if lowered in ("true", "1", "yes"):
        return "true"
    if lowered in ("false", "0", "no"):
        return "false"
    raise ValueError(f"{value!r} is not a boolean")


def _text(value: str) -> str:
    return value.strip().lower()


@dataclass(frozen=True)
class Row:
    """One setting of the side-by-side table: how each side spells it, and the values read back."""

    setting: str
    peer: str
    diffalign: str
    same: bool


@dataclass(frozen=True)
class _Setting:
    label: str
    read_peer: Callable[[dict[str, str]], str]
    read_diffalign: Callable[[dict[str, str]], str]
    normalise: Callable[[str], str]


def _flag(name: str, absent: str = "false") -> Callable[[dict[str, str]], str]:
    return lambda values: values.get(name, absent)


def _not_flag(name: str) -> Callable[[dict[str, str]], str]:
    return lambda values: "false" if name in values else "true"


def _key(name: str, absent: str = "(recipe default)") -> Callable[[dict[str, str]], str]:
    return lambda values: values.get(name, absent)


def _settings(method: str) -> list[_Setting]:
    rank_flag = "rank" if method == "dpo" else "lora_rank"
    beta = ("beta_dpo", "method.beta") if method == "dpo" else ("beta_mapo", "method.beta_mapo")
    return [
        _Setting("pairs per step", _flag("train_batch_size"), _key("train.batch_size"), _number),
        _Setting("gradient accumulation", _flag("gradient_accumulation_steps", "1"),
                 _key("train.gradient_accumulation_steps"), _number),
        _Setting("resolution (px)", _flag("resolution"), _key("data.resolution"), _number),
        _Setting("optimizer steps", _flag("max_train_steps"), _key("train.max_steps"), _number),
        _Setting("rows drawn from", _flag("max_train_samples"), _key("data.max_rows"), _number),
        _Setting("LoRA rank", _flag(rank_flag), _key("lora.rank"), _number),
        _Setting("training mode", lambda values: "lora", _key("train.mode"), _text),
        _Setting("optimizer", lambda values: "adamw8bit" if "use_8bit_adam" in values else "adamw",
                 _key("train.optimizer"), _text),
        _Setting("learning rate", _flag("learning_rate"), _key("train.learning_rate"), _number),
        _Setting("scale lr", _flag("scale_lr"), _key("train.scale_lr"), _boolean),
        _Setting("lr scheduler", _flag("lr_scheduler"), _key("train.lr_scheduler"), _text),
        _Setting("lr warm-up steps", _flag("lr_warmup_steps"), _key("train.lr_warmup_steps"), _number),
        _Setting("adam beta1", _flag("adam_beta1"), _key("train.adam_beta1"), _number),
        _Setting("adam beta2", _flag("adam_beta2"), _key("train.adam_beta2"), _number),
        _Setting("weight decay", _flag("adam_weight_decay"), _key("train.weight_decay"), _number),
        _Setting("adam epsilon", _flag("adam_epsilon"), _key("train.adam_epsilon"), _number),
        _Setting("max grad norm", _flag("max_grad_norm"), _key("train.max_grad_norm"), _number),
        _Setting("mixed precision", _flag("mixed_precision"), _key("train.mixed_precision"), _text),
        _Setting("gradient checkpointing", _flag("gradient_checkpointing"),
                 _key("train.gradient_checkpointing"), _boolean),
        _Setting("random flip", _not_flag("no_hflip"), _key("data.random_flip"), _boolean),
        _Setting("centre crop", _not_flag("random_crop"), _key("data.center_crop"), _boolean),
        _Setting("dataloader workers", _flag("dataloader_num_workers", "0"), _key("data.num_workers"), _number),
        _Setting("loss weight (beta)", _flag(beta[0]), _key(beta[1]), _number),
        _Setting("trackers", _flag("report_to"), _key("train.report_to"), _text),
        _Setting("checkpoint every", _flag("checkpointing_steps"), _key("train.checkpointing_steps"), _number),
        _Setting("seed", _flag("seed"), _key("train.seed"), _number),
        _Setting("model", _flag("pretrained_model_name_or_path"), _key("model.path"), _text),
    ]


def settings_rows(method: str, peer: list[str], overrides: list[str]) -> list[Row]:
    """The side-by-side table, read back from both command lines; `same` compares normalised values."""
    peer_values = parse_peer_argv(peer)
    ours = parse_overrides(overrides)
    rows = []
    for setting in _settings(method):
        left, right = setting.read_peer(peer_values), setting.read_diffalign(ours)
        try:
            same = setting.normalise(left) == setting.normalise(right)
        except ValueError:
            same = False
        rows.append(Row(setting.label, left, right, same))
    return rows


def mismatches(rows: list[Row]) -> list[Row]:
    """Rows where the two sides would not do the same work."""
    return [row for row in rows if not row.same]


def format_table(rows: list[Row], peer_name: str) -> str:
    """A Markdown table of the settings, with a marker on every mismatch."""
    lines = [f"| setting | {peer_name} | diffalign | |", "|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row.setting} | {row.peer} | {row.diffalign} | {'' if row.same else 'MISMATCH'} |")
    return "\n".join(lines)


def shell_line(argv: list[str]) -> str:
    """A command line as a user would paste it."""
    return " ".join(shlex.quote(part) for part in argv)
