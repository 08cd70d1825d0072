"""diffalign: align text-to-image diffusion models with human preferences.

The core library (this package) knows backbones, noise processes, preference
data, caching, tiny models and the toy world. It imports nothing from
``diffalign.trainers``, ``diffalign.scorers`` or ``diffalign.apps``.
"""

__version__ = "0.1.0"
