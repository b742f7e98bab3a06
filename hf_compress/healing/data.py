"""The healing tokens: a text dataset cut into training sequences, in a seeded order, cycled to fill the budget."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from ..data.text import (
    load_texts,
    preset_hub_source,
    resolve_text_source,
    tokenize_joined,
)
from ..errors import HFCompressError
from ..provenance import DataRef
from .config import HealConfig


@dataclass
class HealingData:
    """`chunks` (`n x seq_len` token ids) visited in `order`, `batch_size` per step, for `steps` steps.

    Step `s` takes the positions `s * batch_size ... (s + 1) * batch_size - 1` of `order`, modulo `n`: one pass over
    the text after another, in the same order, so that a batch depends on its step alone (what a resumed run needs).
    """

    chunks: torch.Tensor
    order: torch.Tensor
    batch_size: int
    steps: int

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.chunks.shape[1]

    def batch(self, step: int, process_index: int = 0, num_processes: int = 1) -> torch.Tensor:
        """The sequences of `step` (`batch_size x seq_len`); under several processes, this process's share."""
        positions = (step * self.batch_size + torch.arange(self.batch_size)) % self.order.numel()
        return self.chunks[self.order[positions[process_index::num_processes]]]


def healing_ids(tokenizer: PreTrainedTokenizerBase, texts: list[str], config: HealConfig) -> HealingData:
    """The rows joined with a blank line and tokenized once without special tokens, cut into non-overlapping
    chunks of `seq_len`, ordered by `torch.manual_seed(seed); torch.randperm(n)`."""
    ids = tokenize_joined(tokenizer, texts)
    num_chunks = ids.numel() // config.seq_len
    if num_chunks < config.batch_size:
        raise HFCompressError(
            f"the healing dataset {DataRef.of('healing', config.dataset).name!r} has {ids.numel():,} tokens, fewer "
            f"than one batch of {config.batch_size} x {config.seq_len}; give more text or lower --batch-size or --seq-len."
        )
    chunks = ids[: num_chunks * config.seq_len].view(num_chunks, config.seq_len).clone()
    torch.manual_seed(config.seed)
    order = torch.randperm(num_chunks)
    steps = math.ceil(config.tokens / (config.batch_size * config.seq_len))
    return HealingData(chunks, order, config.batch_size, steps)


def load_healing_data(tokenizer: PreTrainedTokenizerBase, config: HealConfig) -> tuple[HealingData, DataRef]:
    """The healing tokens of `config.dataset` and how the provenance names that dataset (never by a local path)."""
    source = resolve_text_source(config.dataset, column=config.dataset_column)
    data = healing_ids(tokenizer, load_texts(source), config)
    preset = preset_hub_source(config.dataset)
    if preset is not None:
        split = preset.split
    else:
        split = None if Path(config.dataset).exists() else source.split
    return data, DataRef.of("healing", config.dataset, split)
