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
        logits = model(chunk, use_cache=False).logits.float()
        losses.append(F.cross_entropy(logits[0, :-1], chunk[0, 1:]).item())
    return losses


def perplexity(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, texts: list[str] | str, *,
               seq_len: int = 2048, max_windows: int | None = None, progress: bool = True) -> float:
    """Perplexity of `model` on `texts` (rows joined with "\\n\\n"): exp of the mean of the window losses."""
    rows = [texts] if isinstance(texts, str) else texts
    losses = window_losses(model, tokenize_joined(tokenizer, rows), seq_len=seq_len, max_windows=max_windows,
                           progress=progress)
    return math.exp(sum(losses) / len(losses))
