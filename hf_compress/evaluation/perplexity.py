"""Perplexity the standard way: rows joined, tokenized once, non-overlapping windows, exp of the mean window loss."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..data.text import tokenize_joined
from ..errors import HFCompressError


@torch.no_grad()
def window_losses(model: PreTrainedModel, ids: torch.Tensor, *, seq_len: int = 2048, max_windows: int | None = None,
                  progress: bool = True) -> list[float]:
    """Mean next-token NLL of each full window of `seq_len` tokens of `ids` (the last partial window is dropped)."""
    num_windows = ids.numel() // seq_len
    if max_windows is not None:
        num_windows = min(num_windows, max_windows)
    if num_windows == 0:
        raise HFCompressError(f"the evaluation text has {ids.numel()} tokens, less than one window of {seq_len}.")
    device = next(model.parameters()).device
    losses = []
    for window in tqdm(range(num_windows), desc="perplexity", unit="window", disable=not progress):
        chunk = ids[window * seq_len : (window + 1) * seq_len].unsqueeze(0).to(device)
        losses.append(window_loss(model, chunk))
    return losses


# Families whose logits are exactly `lm_head(last hidden state)` (no scaling or soft-capping after the head).
_PLAIN_HEAD_TYPES = ("llama", "mistral", "qwen2", "shared_basis_llama")


def window_loss(model: PreTrainedModel, ids: torch.Tensor, logit_chunk: int = 256) -> float:
    """Mean next-token NLL of the window `ids` (`1 x seq_len`).

    For the families whose head is a plain projection, the vocabulary-wide logits are computed `logit_chunk`
    positions at a time from the final hidden states: a 2048-token window over Qwen2's 152k vocabulary would
    otherwise hold 1.2 GB of float32 logits (and as much again for their softmax) at once.
    """
    head = model.get_output_embeddings() if callable(getattr(model, "get_output_embeddings", None)) else None
    base = getattr(model, "base_model", model)
    if getattr(model.config, "model_type", None) not in _PLAIN_HEAD_TYPES or head is None or base is model:
        logits = model(ids, use_cache=False).logits.float()
        return F.cross_entropy(logits[0, :-1], ids[0, 1:]).item()
    hidden = base(input_ids=ids, use_cache=False).last_hidden_state[0, :-1]
    targets = ids[0, 1:]
    total = 0.0
    for start in range(0, hidden.shape[0], logit_chunk):
        logits = head(hidden[start : start + logit_chunk]).float()
        total += F.cross_entropy(logits, targets[start : start + logit_chunk], reduction="sum").item()
    return total / targets.numel()


def perplexity(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, texts: list[str] | str, *,
               seq_len: int = 2048, max_windows: int | None = None, progress: bool = True) -> float:
    """Perplexity of `model` on `texts` (rows joined with "\\n\\n"): exp of the mean of the window losses."""
    rows = [texts] if isinstance(texts, str) else texts
    losses = window_losses(model, tokenize_joined(tokenizer, rows), seq_len=seq_len, max_windows=max_windows,
                           progress=progress)
    return math.exp(sum(losses) / len(losses))
