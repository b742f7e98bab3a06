"""Where the projections sit in a Llama-family decoder layer (Llama, Mistral, Qwen2 share this layout)."""

from __future__ import annotations

import torch
from torch import nn

ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
PROJECTIONS = ATTENTION_PROJECTIONS + MLP_PROJECTIONS


def projection(layer: nn.Module, name: str) -> nn.Module:
    """The `name` projection module of a decoder layer."""
    return getattr(layer.self_attn if name in ATTENTION_PROJECTIONS else layer.mlp, name)


def set_projection(layer: nn.Module, name: str, module: nn.Module) -> None:
    """Replaces the `name` projection module of a decoder layer."""
    setattr(layer.self_attn if name in ATTENTION_PROJECTIONS else layer.mlp, name, module)


def dense_weight(layer: nn.Module, name: str) -> torch.Tensor:
    """`W` of a dense projection in the paper's orientation (`d_in x d_out`, so `y = x W`)."""
    return projection(layer, name).weight.detach().T
