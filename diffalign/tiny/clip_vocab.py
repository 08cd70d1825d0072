"""The real CLIP BPE vocabulary, for the full-scale pipelines' tokenizers.

OpenAI's CLIP and OpenCLIP tokenize with one BPE file, ``bpe_simple_vocab_16e6.txt.gz``
(1.36 MB), shipped inside the ``open_clip_torch`` wheel. The vocabulary is derived
from it as ``clip/simple_tokenizer.py`` does: the 256 byte characters, the same with
``</w>``, one token per merge for the first 48,894 merges, then ``<|startoftext|>``
(49406) and ``<|endoftext|>`` (49407): 49,408 tokens, the ``vocab_size`` of every
SD text encoder.

The file is looked for, in order: the ``bpe_path`` argument, ``$DIFFALIGN_CLIP_BPE``,
an installed ``open_clip`` (found without importing it: it needs torchvision), the
cache ``~/.cache/diffalign/clip/``; failing those it is extracted from a wheel fetched
with ``pip download open_clip_torch --no-deps`` into that cache. Every copy is checked
against the file's SHA-256.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import logging
import os
import subprocess
import sys
import tempfile
import zipfile
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

from diffalign.atomic import staged_file
from diffalign.tiny.tokenizer import BOS_TOKEN, END_OF_WORD, EOS_TOKEN, bytes_to_unicode

if TYPE_CHECKING:
    from transformers import CLIPTokenizer

__all__ = ["CLIP_BPE_FILENAME", "CLIP_BPE_SHA256", "CLIP_VOCAB_SIZE", "ClipVocabularyError", "build_clip_tokenizer",
           "clip_bpe_path", "clip_vocab_and_merges"]  # fmt: skip

log = logging.getLogger(__name__)

CLIP_BPE_FILENAME = "bpe_simple_vocab_16e6.txt.gz"
CLIP_BPE_SHA256 = "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"  # open_clip_torch 3.3.0's copy
CLIP_VOCAB_SIZE = 49408
_NUM_MERGES = CLIP_VOCAB_SIZE - 2 * 256 - 2  # clip/simple_tokenizer.py: merges[1 : 49152 - 256 - 2 + 1]
ENV_VARIABLE = "DIFFALIGN_CLIP_BPE"

_HOW_TO_GET_IT = (
    f"get it with `pip download open_clip_torch --no-deps -d DIR` and "
    f"`unzip -j DIR/open_clip_torch-*.whl open_clip/{CLIP_BPE_FILENAME} -d DIR`, then pass --clip-bpe DIR/{CLIP_BPE_FILENAME} "
    f"or set {ENV_VARIABLE}=DIR/{CLIP_BPE_FILENAME} (installing open_clip_torch also works)"
)


class ClipVocabularyError(FileNotFoundError):
    """The CLIP BPE file cannot be found or fetched, or is not the expected file."""


def _cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "diffalign" / "clip"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _checked(path: Path, where: str) -> Path:
    if not path.is_file():
        raise ClipVocabularyError(f"{where}: {path} does not exist; {_HOW_TO_GET_IT}")
    if _sha256(path) != CLIP_BPE_SHA256:
        raise ClipVocabularyError(f"{where}: {path} is not CLIP's {CLIP_BPE_FILENAME} (SHA-256 differs); {_HOW_TO_GET_IT}")
    return path


def _open_clip_copy() -> Path | None:
    """open_clip's own file, located without importing open_clip (its import needs torchvision)."""
    try:
        spec = importlib.util.find_spec("open_clip")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        candidate = Path(folder) / CLIP_BPE_FILENAME
        if candidate.is_file():
            return candidate
    return None


def _fetch_into(cached: Path) -> Path:
    """``pip download`` the open_clip_torch wheel (no dependencies) and keep only the BPE file from it."""
    log.info("fetching %s from the open_clip_torch wheel (pip download, ~1.5 MB) into %s", CLIP_BPE_FILENAME, cached.parent)
    with tempfile.TemporaryDirectory() as folder:
        command = [sys.executable, "-m", "pip", "download", "open_clip_torch", "--no-deps", "--quiet", "-d", folder]
        try:
            result = subprocess.run(command, capture_output=True, text=True, timeout=300)
        except (OSError, subprocess.TimeoutExpired) as error:
            raise ClipVocabularyError(f"could not run pip to fetch {CLIP_BPE_FILENAME} ({error}); {_HOW_TO_GET_IT}") from None
        wheels = sorted(Path(folder).glob("open_clip_torch-*.whl"))
        if result.returncode != 0 or not wheels:
            reason = (result.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
            raise ClipVocabularyError(f"`pip download open_clip_torch --no-deps` failed ({reason}); {_HOW_TO_GET_IT}")
        with zipfile.ZipFile(wheels[-1]) as wheel:
            try:
                data = wheel.read(f"open_clip/{CLIP_BPE_FILENAME}")
            except KeyError:
                raise ClipVocabularyError(f"{wheels[-1].name} holds no open_clip/{CLIP_BPE_FILENAME}; {_HOW_TO_GET_IT}") from None
    if hashlib.sha256(data).hexdigest() != CLIP_BPE_SHA256:
        raise ClipVocabularyError(f"the {CLIP_BPE_FILENAME} in {wheels[-1].name} is not the expected file; {_HOW_TO_GET_IT}")
    cached.parent.mkdir(parents=True, exist_ok=True)
    with staged_file(cached) as temporary:
        Path(temporary).write_bytes(data)
    return cached


def clip_bpe_path(bpe_path: str | os.PathLike | None = None, fetch: bool = True) -> Path:
    """Where CLIP's BPE file is (see the module docstring for the search order); ``fetch=False`` never runs pip."""
    if bpe_path is not None:
        return _checked(Path(bpe_path), "clip_bpe")
    if os.environ.get(ENV_VARIABLE):
        return _checked(Path(os.environ[ENV_VARIABLE]), f"${ENV_VARIABLE}")
    installed = _open_clip_copy()
    if installed is not None:
        return _checked(installed, "open_clip")
    cached = _cache_dir() / CLIP_BPE_FILENAME
    if cached.is_file():
        return _checked(cached, "cache")
    if not fetch:
        raise ClipVocabularyError(f"CLIP's {CLIP_BPE_FILENAME} was not found; {_HOW_TO_GET_IT}")
    return _fetch_into(cached)


@lru_cache(maxsize=2)
def _vocab_and_merges_from(path: Path) -> tuple[dict[str, int], tuple[tuple[str, str], ...]]:
    lines = gzip.decompress(path.read_bytes()).decode("utf-8").split("\n")
    merges = tuple(tuple(line.split()) for line in lines[1 : _NUM_MERGES + 1])  # line 0 is the "#version" header
    byte_chars = list(bytes_to_unicode().values())
    tokens = byte_chars + [c + END_OF_WORD for c in byte_chars] + ["".join(m) for m in merges] + [BOS_TOKEN, EOS_TOKEN]
    vocab = {token: i for i, token in enumerate(tokens)}
    if len(vocab) != CLIP_VOCAB_SIZE:
        raise ClipVocabularyError(f"{path} gives {len(vocab)} tokens, not CLIP's {CLIP_VOCAB_SIZE}; {_HOW_TO_GET_IT}")
    return vocab, merges  # type: ignore[return-value]


def clip_vocab_and_merges(bpe_path: str | os.PathLike | None = None) -> tuple[dict[str, int], tuple[tuple[str, str], ...]]:
    """CLIP's 49,408-token vocabulary and its 48,894 merges, in rank order."""
    return _vocab_and_merges_from(clip_bpe_path(bpe_path))


def build_clip_tokenizer(
    bpe_path: str | os.PathLike | None = None, pad_token: str = EOS_TOKEN, max_length: int = 77
) -> CLIPTokenizer:
    """transformers' CLIPTokenizer on the real CLIP vocabulary: lower-cased, ``</w>`` BPE, BOS/EOS, 77 tokens.

    ``pad_token``: ``<|endoftext|>`` for OpenAI CLIP's tokenizer (SD 1.5, SDXL's first), ``"!"`` (id 0) for
    OpenCLIP's (SDXL's and SD3's ``tokenizer_2``), as the published tokenizer configs set it.
    """
    from transformers import CLIPTokenizer

    vocab, merges = clip_vocab_and_merges(bpe_path)
    return CLIPTokenizer(vocab=dict(vocab), merges=list(merges), pad_token=pad_token, model_max_length=max_length)
