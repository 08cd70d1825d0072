"""Reward models diffalign scores images with, behind one ``Scorer`` interface and a registry.

``load_scorer("pickscore", weights=<hub id or local folder>)`` builds a scorer
(``"hpsv2"`` / ``"hpsv2.1"``: ``weights=<checkpoint file, its folder or hub id>``);
``"openclip:ARCH"``: any open_clip architecture as a CLIP-score scorer, ``weights=<checkpoint file or
pretrained tag>``; ``available_scorers()`` lists the names. Heavy imports (transformers) happen
inside the loaders, so importing this package is cheap.
"""

from .base import Scorer, available_scorers, load_scorer, register_scorer
from .clip_scorers import register_clip_scorers
from .hps import register_hps_scorers
from .imagereward import register_imagereward
from .open_clip_scorer import register_open_clip_scorer

register_clip_scorers()
register_hps_scorers()
register_imagereward()
register_open_clip_scorer()

__all__ = ["Scorer", "available_scorers", "load_scorer", "register_scorer"]
