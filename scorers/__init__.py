"""Reward models diffalign scores images with, behind one ``Scorer`` interface and a registry.

``load_scorer("pickscore", weights=<hub id or local folder>)`` builds a scorer;
``available_scorers()`` lists the names. Heavy imports (transformers) happen
inside the loaders, so importing this package is cheap.
"""

from .base import Scorer, available_scorers, load_scorer, register_scorer
from .clip_scorers import register_clip_scorers

register_clip_scorers()

__all__ = ["Scorer", "available_scorers", "load_scorer", "register_scorer"]
