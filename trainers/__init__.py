"""Training: one loop (accelerate) that runs every registered method on every Backbone.

``train(load_train_config("configs/sdxl/dpo.yaml", ["train.max_steps=10"]))`` is what
``diffalign train`` does; methods live in :mod:`diffalign.trainers.objectives`.
"""

from .config import TrainConfig, load_train_config
from .loop import TrainResult, train

__all__ = ["TrainConfig", "TrainResult", "load_train_config", "train"]
