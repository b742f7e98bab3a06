"""Training regularisers that make filters more class-specific before class-aware pruning.

The authors' code offers two terms added to the cross-entropy:
- kernel orthogonality (weight 0.01): sum over prunable convs of ||W_n W_n^T - I||_F^2, W_n the filters
  flattened to rows of unit norm; filters that overlap less tend to respond to different classes.
- L1 (weight 1e-4): sum of |w| over the prunable convs' weights, which drives unneeded filters to zero.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import HFCompressError
from ..vision.training import logits_of
from .config import REGULARIZER_WEIGHTS as DEFAULT_WEIGHTS
from .config import REGULARIZERS



def _prunable_convs(model: nn.Module) -> list[nn.Conv2d]:
    from .shrink import prunable_layers

    core = model.module if hasattr(model, "module") else model  # DDP wrapper
    return [layer.layer.conv for layer in prunable_layers(core)]


def orthogonality_penalty(convs: list[nn.Conv2d]) -> torch.Tensor:
    """sum ||W_n W_n^T - I||_F^2 over the given convs (rows normalised to unit length)."""
    total = torch.zeros((), device=convs[0].weight.device) if convs else torch.zeros(())
    for conv in convs:
        rows = F.normalize(conv.weight.flatten(1).float(), dim=1)
        gram = rows @ rows.t()
        total = total + (gram - torch.eye(gram.shape[0], device=gram.device)).pow(2).sum()
    return total


def l1_penalty(convs: list[nn.Conv2d]) -> torch.Tensor:
    """sum |w| over the given convs' weights."""
    total = torch.zeros((), device=convs[0].weight.device) if convs else torch.zeros(())
    for conv in convs:
        total = total + conv.weight.float().abs().sum()
    return total


def regularized_loss(kind: str = "orthogonal", weight: float | None = None) -> Callable:
    """A `loss_fn(model, images, labels)` for `train_classifier`: cross-entropy + weight x the regulariser."""
    if kind not in REGULARIZERS:
        raise HFCompressError(f"regularizer must be one of {REGULARIZERS}, got {kind!r}")
    weight = DEFAULT_WEIGHTS[kind] if weight is None else weight
    penalty = {"orthogonal": orthogonality_penalty, "l1": l1_penalty}.get(kind)

    def loss_fn(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        loss = F.cross_entropy(logits_of(model(pixel_values=images)).float(), labels)
        if penalty is not None and weight > 0:
            loss = loss + weight * penalty(_prunable_convs(model))
        return loss

    return loss_fn
