"""Parameter and MAC counts of image classifiers, in the convention of the pruning literature.

MACs are the multiply-adds of convolution and linear layers for one image (batch size 1), one
multiply-add counted once, biases, BN, activations and pooling not counted: the convention of the
HRank / CHIP tables ("FLOPs" there). Parameters are all parameters of the model. Counting runs a dummy
forward with hooks, so it follows whatever the network actually executes (skipped layers cost nothing).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn

from .training import logits_of


@dataclass
class ModelCounts:
    """`params`: all parameters; `macs`: conv + linear multiply-adds at batch 1; `layers`: MACs per module name."""

    params: int
    macs: int
    layers: dict[str, int] = field(default_factory=dict)

    def reduction(self, reference: "ModelCounts") -> tuple[float, float]:
        """Fractions `(params removed, MACs removed)` relative to `reference`."""
        return 1.0 - self.params / reference.params, 1.0 - self.macs / reference.macs


def conv_macs(module: nn.Conv2d, output: torch.Tensor) -> int:
    """Multiply-adds of one conv for one image: output elements x (input channels per group) x kernel area."""
    kh, kw = module.kernel_size
    per_output = (module.in_channels // module.groups) * kh * kw
    return int(output[0].numel()) * per_output


def linear_macs(module: nn.Linear, output: torch.Tensor) -> int:
    """Multiply-adds of one linear layer for one input row (tokens beyond the batch dimension count)."""
    return int(output[0].numel()) * module.in_features


@torch.no_grad()
def count_params_and_macs(
    model: nn.Module, input_size: tuple[int, int, int] = (3, 32, 32), forward_kwargs: dict | None = None
) -> ModelCounts:
    """Counts the parameters and the conv/linear MACs of `model` on one dummy image of `input_size`.

    Args:
        model: called as `model(pixel_values=x)`; put in eval mode for the count and restored after.
        input_size: `(channels, height, width)` of the dummy input.
        forward_kwargs: extra keyword arguments for the forward (e.g. to evaluate every exit head).
    """
    layers: dict[str, int] = {}
    handles = []

    def hook(name: str):
        def record(module: nn.Module, inputs, output) -> None:
            output = logits_of(output) if not isinstance(output, torch.Tensor) else output
            if isinstance(module, nn.Conv2d):
                macs = conv_macs(module, output)
            else:
                macs = linear_macs(module, output)
            layers[name] = layers.get(name, 0) + macs

        return record

    for name, module in model.named_modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            handles.append(module.register_forward_hook(hook(name)))
    parameter = next(model.parameters())
    was_training = model.training
    model.eval()
    try:
        model(pixel_values=torch.zeros(1, *input_size, dtype=parameter.dtype, device=parameter.device), **(forward_kwargs or {}))
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    params = sum(p.numel() for p in model.parameters())
    return ModelCounts(params=int(params), macs=int(sum(layers.values())), layers=layers)
