"""The toy world: a synthetic preference task small enough to learn on 2 CPU cores.

Why it exists: the quickstart and the learning tests need preference data
whose "right answer" is known, that a ~1 M parameter UNet learns in minutes,
and that travels through exactly the same reader as real data. So pairs are
written in Pick-a-Pic v2's on-disk schema (parquet, JPEG bytes in ``jpg_0`` /
``jpg_1``, ``label_0`` = 1.0 when ``jpg_0`` wins) and the Pick-a-Pic reader
reads them unchanged.

Each pair has the caption "a {colour} {shape}"; the winner follows it, the
loser breaks it in one of three ways (``loser_kind``):

* ``"colour"``   -- same shape, another colour;
* ``"shape"``    -- same colour, another shape;
* ``"degraded"`` -- the winner itself, blurred and noised.

With ``dual_captions=True`` pairs also carry DCPO's per-image captions
(``caption_0`` / ``caption_1``): the winner's is the prompt, the loser's
describes the loser ("a blue circle", "a blurry red circle").

Ranked lists (RankDPO) are generated in :mod:`diffalign.toy.ranked`
(:func:`~diffalign.toy.ranked.make_ranked` /
:func:`~diffalign.toy.ranked.write_ranked`), which draws with this module's
public helpers (:func:`degrade`, :func:`draw_other`, :func:`jpeg_bytes`,
:func:`ranking_ids`); this module never imports it.

Geometry (measured in the prototype, see docs/toy-world.md): shape was only
learnable once shapes were big on the model's grid -- radius 6.5-7.5 px on a
16x16 latent, i.e. 0.40-0.47 of the image side -- on a plain white
background. Shapes are drawn on a large canvas and downsampled with an
antialiasing filter so edges are smooth, not stair-stepped.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import PIL.Image
import PIL.ImageColor
import PIL.ImageDraw
import PIL.ImageFilter
import pyarrow as pa
import pyarrow.parquet as pq

from diffalign.atomic import staged_file
from diffalign.data.pickapic import pickapic_core_fields
from diffalign.fingerprint import fingerprint

__all__ = [
    "DUAL_CAPTION_PAIR_SCHEMA",
    "GENERATOR_VERSION",
    "LOSER_KINDS",
    "PAIR_SCHEMA",
    "WINNER_MODEL",
    "ToyWorldPaths",
    "ToyWorldSpec",
    "caption",
    "degrade",
    "draw_other",
    "jpeg_bytes",
    "make_pairs",
    "prompts",
    "ranking_ids",
    "render",
    "write_pairs",
    "write_toy_world",
]

# Bump when the drawing or pairing code changes what a given spec + seed
# produces, so caches keyed by the recipe are invalidated.
GENERATOR_VERSION = 1

LOSER_KINDS: tuple[str, ...] = ("colour", "shape", "degraded")
WINNER_MODEL = "toy-truth"

# Pick-a-Pic v2's core columns (same names and types) plus ``loser_kind``.
PAIR_SCHEMA = pa.schema([*pickapic_core_fields(), ("ranking_id", pa.int64()), ("loser_kind", pa.string())])

# PAIR_SCHEMA plus DCPO's per-image captions (Pick-a-Pic's caption_0 / caption_1 names).
DUAL_CAPTION_PAIR_SCHEMA = PAIR_SCHEMA.append(pa.field("caption_0", pa.string())).append(
    pa.field("caption_1", pa.string())
)

_SHAPES = ("circle", "square", "triangle")


@dataclass(frozen=True)
class ToyWorldSpec:
    """Everything that determines the pixels of the toy world (hashable, cacheable).

    Fractions are of the image side, so the same spec means the same picture
    at any ``image_size``.
    """

    image_size: int = 32  # final RGB side; a factor-2 VAE gives the 16x16 latent of docs/toy-world.md
    canvas_size: int = 128  # PIL draws here, then downsamples (smooth edges)
    colours: tuple[tuple[str, tuple[int, int, int]], ...] = (
        ("red", (220, 30, 30)),
        ("green", (30, 160, 50)),
        ("blue", (30, 70, 220)),
        ("yellow", (235, 200, 20)),
    )
    shapes: tuple[str, ...] = _SHAPES
    # 6.5-7.5 px radius on a 16 px latent grid (docs/toy-world.md: big shapes made shape learnable).
    radius_range: tuple[float, float] = (0.40, 0.47)
    centre_jitter: float = 0.03  # max offset of the centre from the middle, per axis
    square_half_side: float = 0.85  # x radius; keeps square and circle areas comparable
    background: str = "white"
    jpeg_quality: int = 95
    degrade_blur_px: float = 1.5  # Gaussian blur radius at the final size
    degrade_noise_std: float = 0.15  # pixel noise std as a fraction of [0, 255]

    def __post_init__(self) -> None:
        if self.image_size < 8:
            raise ValueError(f"image_size must be >= 8, got {self.image_size}")
        if self.canvas_size < self.image_size:
            raise ValueError(
                f"canvas_size ({self.canvas_size}) must be >= image_size ({self.image_size})"
            )
        names = [name for name, _ in self.colours]
        if len(names) < 2 or len(set(names)) != len(names):
            raise ValueError(f"need >= 2 distinct colour names, got {names}")
        for name, rgb in self.colours:
            if len(rgb) != 3 or not all(0 <= int(c) <= 255 for c in rgb):
                raise ValueError(f"colour {name!r}: expected an RGB triple in 0..255, got {rgb}")
        unknown = [s for s in self.shapes if s not in _SHAPES]
        if unknown or len(self.shapes) < 2 or len(set(self.shapes)) != len(self.shapes):
            raise ValueError(f"shapes must be >= 2 distinct of {_SHAPES}, got {self.shapes}")
        lo, hi = self.radius_range
        if not 0.0 < lo <= hi <= 0.5:
            raise ValueError(
                f"radius_range must satisfy 0 < lo <= hi <= 0.5, got {self.radius_range}"
            )
        if not 0.0 <= self.centre_jitter < 0.5:
            raise ValueError(f"centre_jitter must be in [0, 0.5), got {self.centre_jitter}")
        if not 0.0 < self.square_half_side <= 1.0:
            raise ValueError(f"square_half_side must be in (0, 1], got {self.square_half_side}")
        PIL.ImageColor.getrgb(self.background)  # raises ValueError on an unknown colour name
        if self.background.lower() in {n.lower() for n in names}:
            raise ValueError(f"background {self.background!r} must not be one of the shape colours")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"jpeg_quality must be in 1..100, got {self.jpeg_quality}")
        if self.degrade_blur_px < 0 or self.degrade_noise_std < 0:
            raise ValueError("degrade_blur_px and degrade_noise_std must be >= 0")

    @property
    def palette(self) -> dict[str, tuple[int, int, int]]:
        """Colour name -> RGB."""
        return {name: (int(r), int(g), int(b)) for name, (r, g, b) in self.colours}

    @property
    def colour_names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.colours)

    def recipe(self) -> dict:
        """JSON-ready description of the world: equal recipes give equal data."""
        out = dataclasses.asdict(self)
        out = json.loads(json.dumps(out))  # tuples -> lists, so it round-trips through JSON
        out["generator_version"] = GENERATOR_VERSION
        return out

    def fingerprint(self) -> str:
        """Short sha256 of the sorted recipe, to key caches (toy base, encoded data)."""
        return fingerprint(self.recipe(), 16, compact=True)


@dataclass(frozen=True)
class ToyWorldPaths:
    """Where :func:`write_toy_world` put its files."""

    folder: Path
    train: Path
    heldout: Path
    recipe: Path


def caption(colour: str, shape: str) -> str:
    """The prompt for one (colour, shape) cell."""
    return f"a {colour} {shape}"


def prompts(spec: ToyWorldSpec = ToyWorldSpec()) -> list[str]:
    """All captions of the world (colour-major), e.g. for sample grids."""
    return [caption(c, s) for c in spec.colour_names for s in spec.shapes]


def render(
    colour: str, shape: str, rng: np.random.Generator, spec: ToyWorldSpec = ToyWorldSpec()
) -> PIL.Image.Image:
    """Draw one ``shape`` in ``colour`` on the background, with random size and position.

    Draws 3 numbers from ``rng`` (radius, centre x, centre y). Returns an RGB
    image of ``spec.image_size`` squared.
    """
    if colour not in spec.palette:
        raise ValueError(f"unknown colour {colour!r}; valid: {list(spec.palette)}")
    if shape not in spec.shapes:
        raise ValueError(f"unknown shape {shape!r}; valid: {list(spec.shapes)}")
    size = spec.canvas_size
    radius = float(rng.uniform(*spec.radius_range)) * size
    cx, cy = (0.5 + rng.uniform(-spec.centre_jitter, spec.centre_jitter, size=2)) * size
    img = PIL.Image.new("RGB", (size, size), spec.background)
    draw = PIL.ImageDraw.Draw(img)
    fill = spec.palette[colour]
    if shape == "circle":
        draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=fill)
    elif shape == "square":
        h = spec.square_half_side * radius
        draw.rectangle((cx - h, cy - h, cx + h, cy + h), fill=fill)
    else:  # triangle: upright equilateral inscribed in the circle (apex up; y grows downwards)
        angles = (-90.0, 30.0, 150.0)
        pts = [
            (cx + radius * math.cos(math.radians(a)), cy + radius * math.sin(math.radians(a)))
            for a in angles
        ]
        draw.polygon(pts, fill=fill)
    if size != spec.image_size:
        # Pillow's bilinear resize widens its kernel when shrinking, i.e. it antialiases.
        img = img.resize((spec.image_size, spec.image_size), PIL.Image.Resampling.BILINEAR)
    return img


def degrade(
    img: PIL.Image.Image, rng: np.random.Generator, spec: ToyWorldSpec, strength: float = 1.0
) -> PIL.Image.Image:
    """Blur + Gaussian pixel noise: a loser that is 'right' but low quality (``strength`` scales both)."""
    blurred = img.filter(PIL.ImageFilter.GaussianBlur(radius=spec.degrade_blur_px * strength))
    arr = np.asarray(blurred, dtype=np.float32)
    noise = rng.normal(0.0, spec.degrade_noise_std * strength * 255.0, size=arr.shape).astype(np.float32)
    return PIL.Image.fromarray(np.clip(np.rint(arr + noise), 0, 255).astype(np.uint8), mode="RGB")


def jpeg_bytes(img: PIL.Image.Image, spec: ToyWorldSpec) -> bytes:
    """The JPEG file the datasets store for ``img``, at the spec's quality."""
    buf = io.BytesIO()
    # 4:4:4 chroma: at 32 px, 4:2:0 subsampling would smear colour across shape edges.
    img.save(buf, format="JPEG", quality=spec.jpeg_quality, subsampling=0, optimize=False)
    return buf.getvalue()


def ranking_ids(n: int, seed: int) -> np.ndarray:
    """Ids unique across splits drawn with different seeds: (seed << 32) | index."""
    if not 0 <= seed < 2**31:
        raise ValueError(f"seed must be in [0, 2**31), got {seed}")
    if n >= 2**32:
        raise ValueError(f"n must be < 2**32, got {n}")
    return (np.int64(seed) << np.int64(32)) + np.arange(n, dtype=np.int64)


def make_pairs(
    n: int, seed: int, spec: ToyWorldSpec = ToyWorldSpec(), dual_captions: bool = False
) -> list[dict]:
    """Generate ``n`` preference pairs, deterministically from ``seed``.

    Loser kinds and winner positions are exact balanced splits in random
    order (a third of each kind, half the winners at position 0), so even a
    small held-out set has no position bias and equal counts per kind.
    Each row carries the columns of :data:`PAIR_SCHEMA`; with
    ``dual_captions`` also ``caption_0`` / ``caption_1`` (the winner's is the
    prompt, the loser's describes the loser). The pixels do not depend on it.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng = np.random.default_rng(seed)
    ids = ranking_ids(n, seed)
    colours, shapes = spec.colour_names, spec.shapes
    kinds = rng.permutation(np.arange(n) % len(LOSER_KINDS))
    winner_at = rng.permutation(np.arange(n) % 2)
    rows: list[dict] = []
    for i in range(n):
        colour = colours[rng.integers(len(colours))]
        shape = shapes[rng.integers(len(shapes))]
        kind = LOSER_KINDS[int(kinds[i])]
        winner = render(colour, shape, rng, spec)
        if kind == "colour":
            loser_colour = draw_other(colours, colour, rng)
            loser = render(loser_colour, shape, rng, spec)
            loser_caption = caption(loser_colour, shape)
        elif kind == "shape":
            loser_shape = draw_other(shapes, shape, rng)
            loser = render(colour, loser_shape, rng, spec)
            loser_caption = caption(colour, loser_shape)
        else:
            loser = degrade(winner, rng, spec)
            loser_caption = f"a blurry {colour} {shape}"
        images = [jpeg_bytes(winner, spec), jpeg_bytes(loser, spec)]
        models = [WINNER_MODEL, f"toy-{kind}"]
        captions = [caption(colour, shape), loser_caption]
        if winner_at[i] == 1:
            images.reverse()
            models.reverse()
            captions.reverse()
        label_0 = 1.0 if winner_at[i] == 0 else 0.0
        rows.append(
            {
                "jpg_0": images[0],
                "jpg_1": images[1],
                "label_0": label_0,
                "label_1": 1.0 - label_0,
                "caption": caption(colour, shape),
                "model_0": models[0],
                "model_1": models[1],
                "ranking_id": int(ids[i]),
                "loser_kind": kind,
                **({"caption_0": captions[0], "caption_1": captions[1]} if dual_captions else {}),
            }
        )
    return rows


def draw_other(names: tuple[str, ...], name: str, rng: np.random.Generator) -> str:
    """A uniformly drawn name other than ``name`` (one draw from ``rng``)."""
    others = [x for x in names if x != name]
    return others[rng.integers(len(others))]


def write_pairs(
    path: str | Path, n: int, seed: int, spec: ToyWorldSpec = ToyWorldSpec(), dual_captions: bool = False
) -> Path:
    """Generate ``n`` pairs and write them as a Pick-a-Pic-style parquet file (atomically).

    ``dual_captions`` adds ``caption_0`` / ``caption_1`` (:data:`DUAL_CAPTION_PAIR_SCHEMA`).
    """
    path = Path(path)
    schema = DUAL_CAPTION_PAIR_SCHEMA if dual_captions else PAIR_SCHEMA
    table = pa.Table.from_pylist(make_pairs(n, seed, spec, dual_captions=dual_captions), schema=schema)
    # JPEG bytes do not compress; skipping it keeps writing fast and the bytes stable.
    with staged_file(path) as temporary:  # readers never see half a file
        pq.write_table(table, temporary, compression="none")
    return path


def write_toy_world(
    folder: str | Path,
    spec: ToyWorldSpec = ToyWorldSpec(),
    n_train: int = 3000,
    n_heldout: int = 300,
    train_seed: int = 0,
    heldout_seed: int = 1,
) -> ToyWorldPaths:
    """Write ``train.parquet`` and ``heldout.parquet`` once; reuse them while the recipe matches.

    The held-out split uses its own seed, so no pair is shared with training.
    ``recipe.json`` is written last: its presence means both parquet files
    are complete and were made from that recipe.
    """
    if train_seed == heldout_seed:
        raise ValueError("train_seed and heldout_seed must differ (held-out pairs must be unseen)")
    folder = Path(folder)
    paths = ToyWorldPaths(
        folder=folder,
        train=folder / "train.parquet",
        heldout=folder / "heldout.parquet",
        recipe=folder / "recipe.json",
    )
    recipe = {
        "spec": spec.recipe(),
        "fingerprint": spec.fingerprint(),
        "n_train": n_train,
        "n_heldout": n_heldout,
        "train_seed": train_seed,
        "heldout_seed": heldout_seed,
    }
    if paths.train.exists() and paths.heldout.exists() and paths.recipe.exists():
        try:
            if json.loads(paths.recipe.read_text()) == recipe:
                return paths
        except (OSError, ValueError):
            pass  # unreadable or corrupt recipe: regenerate
    paths.recipe.unlink(missing_ok=True)  # invalidate first: a crash below leaves no stale match
    write_pairs(paths.train, n_train, train_seed, spec)
    write_pairs(paths.heldout, n_heldout, heldout_seed, spec)
    text = json.dumps(recipe, indent=2, sort_keys=True) + "\n"
    with staged_file(paths.recipe) as temporary:
        temporary.write_text(text)
    return paths
