"""Layer-by-layer calibration: running calibration activations through one decoder layer at a time and
accumulating the Gram matrices of the inputs of its projections.

Only the current decoder layer and the calibration hidden states sit on the compute device, so a model larger than
the device converts layer by layer.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.masking_utils import create_causal_mask

from .errors import HFCompressError
from .layout import projection

# Projections that read the same input share one Gram: q/k/v read the attention input, gate/up the MLP input.
GRAM_KEY = {
    "q_proj": "attn_in",
    "k_proj": "attn_in",
    "v_proj": "attn_in",
    "o_proj": "o_in",
    "gate_proj": "mlp_in",
    "up_proj": "mlp_in",
    "down_proj": "down_in",
}
# The projection whose input each Gram key observes.
KEY_PROJECTION = {"attn_in": "q_proj", "o_in": "o_proj", "mlp_in": "gate_proj", "down_in": "down_proj"}


@contextmanager
def capture_inputs(layer: nn.Module, keys: tuple[str, ...]) -> Iterator[dict[str, torch.Tensor]]:
    """Records, during a forward of `layer`, the input of the projection behind each Gram key (flattened to 2-D)."""
    captured: dict[str, torch.Tensor] = {}
    handles = []
    for key in keys:
        def hook(module, args, key=key):
            captured[key] = args[0].reshape(-1, args[0].shape[-1])
        handles.append(projection(layer, KEY_PROJECTION[key]).register_forward_pre_hook(hook))
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


class LayerRunner:
    """Runs single decoder layers of a Llama-family model on stored calibration hidden states."""

    def __init__(self, model: PreTrainedModel, seq_len: int, device: torch.device, batch_size: int):
        self.model = model
        self.device = device
        self.batch_size = batch_size
        base = model.model
        self.rotary = base.rotary_emb.to(device)
        self.position_ids = torch.arange(seq_len, device=device).unsqueeze(0)
        self._masks: dict[int, torch.Tensor | None] = {}
        self._position_embeddings: dict[torch.dtype, tuple[torch.Tensor, torch.Tensor]] = {}

    def _layer_kwargs(self, hidden: torch.Tensor) -> dict:
        batch = hidden.shape[0]
        if batch not in self._masks:
            self._masks[batch] = create_causal_mask(
                config=self.model.config,
                inputs_embeds=hidden,
                attention_mask=None,
                cache=None,
                position_ids=self.position_ids,
            )
        # cos/sin depend only on the positions (shared by every sample) and the dtype: computed once.
        if hidden.dtype not in self._position_embeddings:
            self._position_embeddings[hidden.dtype] = self.rotary(hidden, self.position_ids)
        return {
            "attention_mask": self._masks[batch],
            "position_ids": self.position_ids,
            "position_embeddings": self._position_embeddings[hidden.dtype],
            "use_cache": False,
        }

    def batches(self, num_samples: int) -> Iterator[slice]:
        for start in range(0, num_samples, self.batch_size):
            yield slice(start, min(start + self.batch_size, num_samples))

    @torch.no_grad()
    def run(self, layer: nn.Module, hidden: torch.Tensor, layer_idx: int) -> Iterator[tuple[slice, torch.Tensor]]:
        """Yields `(batch slice, layer output)` over the stored hidden states; checks outputs are finite."""
        for rows in self.batches(hidden.shape[0]):
            inputs = hidden[rows].to(self.device)
            output = layer(inputs, **self._layer_kwargs(inputs))
            output = output[0] if isinstance(output, tuple) else output
            if not torch.isfinite(output).all():
                raise HFCompressError(f"calibration activations became NaN or inf in decoder layer {layer_idx}.")
            yield rows, output


def gram_keys(names) -> tuple[str, ...]:
    return tuple(sorted({GRAM_KEY[name] for name in names}))


@torch.no_grad()
def layer_grams(
    runner: LayerRunner, layer: nn.Module, hidden: torch.Tensor, layer_idx: int, keys: tuple[str, ...]
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Grams `X^T X` (float32, summed over tokens) of the inputs behind `keys`, and the layer's outputs."""
    grams: dict[str, torch.Tensor] = {}
    outputs = torch.empty_like(hidden)
    with capture_inputs(layer, keys) as captured:
        for rows, output in runner.run(layer, hidden, layer_idx):
            outputs[rows] = output.to(outputs.device, outputs.dtype)
            for key, x in captured.items():
                x = x.float()
                if not torch.isfinite(x).all():
                    raise HFCompressError(f"the input of {KEY_PROJECTION[key]} in decoder layer {layer_idx} has NaN or inf.")
                if key in grams:
                    grams[key].addmm_(x.T, x)
                else:
                    grams[key] = x.T @ x
    return grams, outputs


@torch.no_grad()
def paired_grams(
    runner: LayerRunner,
    dense_layer: nn.Module,
    compressed_layer: nn.Module,
    dense_hidden: torch.Tensor,
    compressed_hidden: torch.Tensor,
    layer_idx: int,
    keys: tuple[str, ...],
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """For each key, `(X_hat^T X_hat, X_hat^T X)`: inputs of the compressed layer against the dense layer's."""
    result: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    with capture_inputs(dense_layer, keys) as dense_x, capture_inputs(compressed_layer, keys) as comp_x:
        for (rows, _), _ in zip(runner.run(dense_layer, dense_hidden, layer_idx),
                                runner.run(compressed_layer, compressed_hidden, layer_idx)):
            for key in keys:
                x, x_hat = dense_x[key].float(), comp_x[key].float()
                if key in result:
                    result[key][0].addmm_(x_hat.T, x_hat)
                    result[key][1].addmm_(x_hat.T, x)
                else:
                    result[key] = (x_hat.T @ x_hat, x_hat.T @ x)
    return result
