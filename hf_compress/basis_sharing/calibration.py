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

from ..errors import HFCompressError
from .config import CalibrationConfig
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
# Gram keys in the order a decoder layer's forward reaches them.
FORWARD_ORDER = ("attn_in", "o_in", "mlp_in", "down_in")
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
    """Runs single decoder layers of a Llama-family model on stored calibration hidden states.

    With `dtype=torch.bfloat16` the matrix products of the forwards run under autocast (the residual stream, the
    norms and every Gram stay in float32); the weights themselves are not touched.
    """

    def __init__(self, model: PreTrainedModel, seq_len: int, device: torch.device, batch_size: int,
                 dtype: torch.dtype = torch.float32):
        self.model = model
        self.device = device
        self.batch_size = batch_size
        self.dtype = dtype
        base = model.model
        self.rotary = base.rotary_emb.to(device)
        self.position_ids = torch.arange(seq_len, device=device).unsqueeze(0)
        self._masks: dict[int, torch.Tensor | None] = {}
        self._position_embeddings: dict[torch.dtype, tuple[torch.Tensor, torch.Tensor]] = {}

    def layer_kwargs(self, hidden: torch.Tensor) -> dict:
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

    def forward(self, layer: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
        """One decoder layer on one batch of hidden states (already on the device)."""
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
            output = layer(inputs, **self.layer_kwargs(inputs))
        return output[0] if isinstance(output, tuple) else output

    def batches(self, num_samples: int) -> Iterator[slice]:
        for start in range(0, num_samples, self.batch_size):
            yield slice(start, min(start + self.batch_size, num_samples))

    @torch.no_grad()
    def run(self, layer: nn.Module, hidden: torch.Tensor, layer_idx: int,
            stop_at: str | None = None) -> Iterator[tuple[slice, torch.Tensor | None]]:
        """Yields `(batch slice, layer output)` over the stored hidden states; checks outputs are finite.

        With `stop_at` (a Gram key) each forward ends on entering the projection behind that key, so the rest of the
        layer is not computed, and `None` stands for the output. Hooks registered before the call still see that
        projection's input.
        """
        stop = None
        if stop_at is not None:
            def raise_stop(module, args):
                raise _StopForward
            stop = projection(layer, KEY_PROJECTION[stop_at]).register_forward_pre_hook(raise_stop)
        try:
            for rows in self.batches(hidden.shape[0]):
                inputs = hidden[rows].to(self.device)
                if stop is None:
                    output = self.forward(layer, inputs)
                    # A NaN or inf anywhere makes the sum non-finite: one reduction instead of a mask over the batch.
                    if not torch.isfinite(output.sum(dtype=torch.float32)):
                        raise HFCompressError(f"calibration activations became NaN or inf in decoder layer {layer_idx}.")
                    yield rows, output
                    continue
                try:
                    self.forward(layer, inputs)
                except _StopForward:
                    yield rows, None
                else:
                    raise HFCompressError(f"{KEY_PROJECTION[stop_at]} of decoder layer {layer_idx} was not reached.")
        finally:
            if stop is not None:
                stop.remove()


class _StopForward(Exception):
    """Raised by a pre-hook to end a forward once the input it needs has been seen."""


# Column block of the Gram products; blocks below the diagonal are skipped (a Gram is symmetric).
GRAM_BLOCK = 256


def accumulate_gram(gram: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    """Adds `x^T x` to the upper block triangle of `gram` (allocated on first use); `symmetrize` completes it.

    With n column blocks only n(n+1)/2 of the n^2 block products are computed (21 of 36 for a 1536-wide input).
    """
    d = x.shape[1]
    if gram is None:
        gram = x.new_zeros(d, d)
    for start in range(0, d, GRAM_BLOCK):
        stop = start + GRAM_BLOCK
        gram[start:stop, start:].addmm_(x[:, start:stop].T, x[:, start:])
    return gram


def symmetrize(upper: torch.Tensor) -> torch.Tensor:
    """The full Gram from the upper triangle that `accumulate_gram` filled."""
    return upper.triu() + upper.triu(1).T


def symmetrize_(upper: torch.Tensor) -> torch.Tensor:
    """`symmetrize` in place (returns `upper`, completed), with one temporary (the strict upper triangle) instead of
    three: the same values."""
    strict = upper.triu(1)
    return upper.triu_().add_(strict.T)


def gram_keys(names) -> tuple[str, ...]:
    return tuple(sorted({GRAM_KEY[name] for name in names}))


@torch.no_grad()
def layer_grams(
    runner: LayerRunner, layer: nn.Module, hidden: torch.Tensor, layer_idx: int, keys: tuple[str, ...],
    outputs: bool = True,
) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
    """Grams `X^T X` (float32, summed over tokens) of the inputs behind `keys`, and the layer's outputs.

    With `outputs=False` the forwards end at the last projection behind `keys` (the down projection's matrix product
    is a fifth of a layer's) and `None` is returned for the outputs.
    """
    grams: dict[str, torch.Tensor] = {}
    result = torch.empty_like(hidden) if outputs else None
    stop_at = None if outputs else max(keys, key=FORWARD_ORDER.index)
    with capture_inputs(layer, keys) as captured:
        for rows, output in runner.run(layer, hidden, layer_idx, stop_at=stop_at):
            if result is not None:
                result[rows] = output.to(result.device, result.dtype)
            for key, x in captured.items():
                grams[key] = accumulate_gram(grams.get(key), x.float())
    for key, gram in grams.items():
        # A NaN or inf anywhere in the inputs reaches the diagonal (sums of squares): one check per Gram, not per batch.
        if not torch.isfinite(gram.diagonal()).all():
            raise HFCompressError(f"the input of {KEY_PROJECTION[key]} in decoder layer {layer_idx} has NaN or inf.")
    for key in grams:
        grams[key] = symmetrize_(grams[key])
    return grams, result


@torch.no_grad()
def record_inputs(
    runner: LayerRunner, layer: nn.Module, hidden: torch.Tensor, layer_idx: int, keys: tuple[str, ...]
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """One forward of `layer`: the inputs behind `keys` for every calibration token (2-D, on the hidden states'
    device and dtype), and the layer's outputs."""
    tokens = hidden.shape[0] * hidden.shape[1]
    inputs: dict[str, torch.Tensor] = {}
    outputs = torch.empty_like(hidden)
    with capture_inputs(layer, keys) as captured:
        for rows, output in runner.run(layer, hidden, layer_idx):
            outputs[rows] = output.to(outputs.device, outputs.dtype)
            token_rows = slice(rows.start * hidden.shape[1], rows.stop * hidden.shape[1])
            for key, x in captured.items():
                if key not in inputs:
                    inputs[key] = torch.empty(tokens, x.shape[-1], dtype=hidden.dtype, device=hidden.device)
                inputs[key][token_rows] = x.to(hidden.device, hidden.dtype)
    return inputs, outputs


@torch.no_grad()
def stage_inputs(
    runner: LayerRunner, layer: nn.Module, hidden: torch.Tensor, layer_idx: int, key: str
) -> Iterator[tuple[slice, torch.Tensor]]:
    """Yields `(token rows, input behind key)` per batch, ending each forward at that projection, so that reaching
    an early projection (q/k/v) costs almost nothing and a late one (down) less than a full forward."""
    seq_len = hidden.shape[1]
    with capture_inputs(layer, (key,)) as captured:
        for rows, _ in runner.run(layer, hidden, layer_idx, stop_at=key):
            x = captured.pop(key)
            if not torch.isfinite(x).all():
                raise HFCompressError(f"the input of {KEY_PROJECTION[key]} in decoder layer {layer_idx} has NaN or inf.")
            yield slice(rows.start * seq_len, rows.stop * seq_len), x


def with_chat_samples(ids: torch.Tensor, model: PreTrainedModel, tokenizer, calibration: CalibrationConfig,
                      device: torch.device,
                      *, progress: bool = True) -> torch.Tensor:
    """`ids` with its last `calibration.chat_samples` rows replaced by chat text the source writes through its own
    chat template: the Grams then see the activations of the conversations an instruct model is used for, which
    plain text never shows it. The text is healing's free chat samples (`healing.chat_data.chat_chunks`, seeded by
    `calibration.seed`), written by a bfloat16 copy of the source where the calibration runs in bfloat16."""
    from ..healing.chat_data import chat_chunks
    from ..healing.config import HealConfig
    from ..healing.data import chat_writer

    count = calibration.chat_samples
    if count == 0:
        return ids
    # The chat options are healing's defaults; only the chunk length and the seed come from the calibration.
    options = HealConfig(seq_len=calibration.seq_len, seed=calibration.seed)
    with chat_writer(model, device, bfloat16=calibration.dtype == "bfloat16") as writer:
        chat = chat_chunks(writer, tokenizer, options, count, progress=progress)
    return torch.cat([ids[: ids.shape[0] - count], chat])
