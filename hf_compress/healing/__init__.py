"""Healing: distillation of a Basis Sharing compression from its source model (`hf-compress heal`)."""

from .config import HealConfig
from .trainer import HealResult, heal

__all__ = ["HealConfig", "HealResult", "heal"]
