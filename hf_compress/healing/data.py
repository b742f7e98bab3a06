"""The healing tokens: a text dataset cut into training sequences, in a seeded order, cycled to fill the budget; for
an instruct teacher, mixed with chat text the teacher writes (`HealConfig.chat_fraction`), and on request with plain
text it writes freely (`HealConfig.free_text_fraction`)."""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

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
    With text the teacher wrote mixed in, the last `written_chunks` rows of `chunks` are the teacher's (its
    conversations, then its free text) and `order` lists every training sequence of the run (`steps * batch_size`),
    so that the shares are exact.
    """

    chunks: torch.Tensor
    order: torch.Tensor
    batch_size: int
    steps: int
    written_chunks: int = 0

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.chunks.shape[1]

    def batch(self, step: int, process_index: int = 0, num_processes: int = 1) -> torch.Tensor:
        """The sequences of `step` (`batch_size x seq_len`); under several processes, this process's share."""
        positions = (step * self.batch_size + torch.arange(self.batch_size)) % self.order.numel()
        return self.chunks[self.order[positions[process_index::num_processes]]]

    def first_sequences(self, count: int) -> torch.Tensor:
        """The run's first `count` sequences in training order (`count x seq_len`), cycling as the steps do."""
        return self.chunks[self.order[torch.arange(count) % self.order.numel()]]


def training_steps(config: HealConfig) -> int:
    return math.ceil(config.tokens / (config.batch_size * config.seq_len))


def has_chat_template(tokenizer: PreTrainedTokenizerBase | None) -> bool:
    """Whether `tokenizer` has a chat template (a non-empty string): what `chat_fraction` "auto" is resolved by."""
    template = getattr(tokenizer, "chat_template", None)
    return isinstance(template, str) and bool(template.strip())


def _sequences(share: float, config: HealConfig) -> int:
    return 0 if share <= 0 else max(1, round(share * training_steps(config) * config.batch_size))


def chat_sequences(config: HealConfig) -> int:
    """How many of the run's training sequences are chat: `chat_fraction` of them, rounded, at least one."""
    return _sequences(config.chat_share, config)


def free_text_sequences(config: HealConfig) -> int:
    """How many of the run's training sequences are the teacher's free text: `free_text_fraction` of them, rounded,
    at least one."""
    return _sequences(config.free_text_fraction, config)


def text_chunks(tokenizer: PreTrainedTokenizerBase, texts: list[str], config: HealConfig) -> torch.Tensor:
    """The rows joined with a blank line and tokenized once without special tokens, cut into non-overlapping
    chunks of `seq_len` (at least `batch_size` of them)."""
    ids = tokenize_joined(tokenizer, texts)
    num_chunks = ids.numel() // config.seq_len
    if num_chunks < config.batch_size:
        raise HFCompressError(
            f"the healing dataset {DataRef.of('healing', config.dataset).name!r} has {ids.numel():,} tokens, fewer "
            f"than one batch of {config.batch_size} x {config.seq_len}; give more text or lower --batch-size or --seq-len."
        )
    return ids[: num_chunks * config.seq_len].view(num_chunks, config.seq_len).clone()


def healing_ids(tokenizer: PreTrainedTokenizerBase, texts: list[str], config: HealConfig) -> HealingData:
    """The text's chunks (`text_chunks`) ordered by `torch.manual_seed(seed); torch.randperm(n)`."""
    chunks = text_chunks(tokenizer, texts, config)
    torch.manual_seed(config.seed)
    order = torch.randperm(chunks.shape[0])
    return HealingData(chunks, order, config.batch_size, training_steps(config))


def mixed_healing_data(text: torch.Tensor, written: torch.Tensor, config: HealConfig) -> HealingData:
    """The dataset's chunks and the teacher's (`written`: its chat text, then its free text) in one order of every
    training sequence of the run.

    A generator seeded with `seed` draws which positions take the teacher's (`written.shape[0]` of them, each of its
    chunks once) and the order of the text chunks, which fill the other positions (cycled if there are fewer).
    """
    total = training_steps(config) * config.batch_size
    num_text, num_written = text.shape[0], written.shape[0]
    if num_written > total:
        raise HFCompressError(f"{num_written} chunks of the teacher's text for a run of {total} training sequences.")
    generator = torch.Generator().manual_seed(config.seed)
    is_written = torch.zeros(total, dtype=torch.bool)
    is_written[torch.randperm(total, generator=generator)[:num_written]] = True
    text_order = torch.randperm(num_text, generator=generator)
    order = torch.empty(total, dtype=torch.long)
    order[~is_written] = text_order[torch.arange(total - num_written) % num_text]
    order[is_written] = num_text + torch.randperm(num_written, generator=generator)
    return HealingData(torch.cat([text, written]), order, config.batch_size, training_steps(config), num_written)


@contextmanager
def chat_writer(teacher: PreTrainedModel, device: torch.device | str | None,
                 bfloat16: bool) -> Iterator[PreTrainedModel]:
    """The teacher as it writes the chat text, on `device` (else where it is). With `bfloat16`, a bfloat16 copy of a
    float32 teacher: token-by-token decoding is bound by reading the weights, and half the bytes make it faster;
    the teacher itself keeps its weights, because its logits are the training targets. Without, the teacher itself,
    moved to `device` for the block and back after."""
    home = next(teacher.parameters()).device
    target = home if device is None else torch.device(device)
    if bfloat16 and next(teacher.parameters()).dtype == torch.float32:
        yield copy.deepcopy(teacher).to(device=target, dtype=torch.bfloat16).eval()  # freed when the block ends
        return
    teacher.to(target)
    try:
        yield teacher
    finally:
        teacher.to(home)


def load_healing_data(tokenizer: PreTrainedTokenizerBase, config: HealConfig, teacher: PreTrainedModel | None = None,
                      *, device: torch.device | str | None = None,
                      progress: bool = True) -> tuple[HealingData, DataRef]:
    """The healing tokens of `config.dataset` and how the provenance names that dataset (never by a local path).

    With `config.chat_fraction > 0`, the `teacher` (moved to `device` meanwhile; a bfloat16 copy of it where
    `config.dtype` is "bfloat16") first writes the chat text of `chat_sequences(config)` chunks
    (`chat_data.chat_chunks`), and with `config.free_text_fraction > 0` the free text of `free_text_sequences(config)`
    chunks (`chat_data.free_text_chunks`), mixed in by `mixed_healing_data`. A chat fraction still "auto" is refused
    (`HealConfig.chat_share`): `config` must be resolved with the tokenizer's chat template.
    """
    num_chat, num_free = chat_sequences(config), free_text_sequences(config)  # an unresolved "auto" is refused here
    source = resolve_text_source(config.dataset, column=config.dataset_column)
    texts = load_texts(source)
    if num_chat or num_free:
        if teacher is None:
            flag = "--chat-fraction" if num_chat else "--free-text-fraction"
            raise HFCompressError(f"{flag} > 0 needs the teacher, which writes that text.")
        from .chat_data import chat_chunks, free_text_chunks

        text = text_chunks(tokenizer, texts, config)  # a too-short dataset is refused before any generation
        written = []
        with chat_writer(teacher, device, bfloat16=config.dtype == "bfloat16") as writer:
            if num_chat:
                written.append(chat_chunks(writer, tokenizer, config, num_chat, progress=progress))
            if num_free:
                written.append(free_text_chunks(writer, tokenizer, config, num_free, progress=progress))
        data = mixed_healing_data(text, torch.cat(written), config)
    else:
        data = healing_ids(tokenizer, texts, config)
    preset = preset_hub_source(config.dataset)
    if preset is not None:
        split = preset.split
    else:
        split = None if Path(config.dataset).exists() else source.split
    return data, DataRef.of("healing", config.dataset, split)


def recorded_options(config: HealConfig, data_ref: DataRef) -> dict[str, Any]:
    """The options as the provenance keeps them: the dataset and a chat prompts file by name, never by a local
    path of the machine that healed (the record goes to the Hub with the model). The chat fraction is the number
    the run trained with, never "auto" (`chat_share` refuses an unresolved one)."""
    options = {**config.to_dict(), "chat_fraction": config.chat_share, "dataset": data_ref.name}
    if config.chat_source != "free":
        options["chat_source"] = Path(config.chat_source).resolve().name
    return options
