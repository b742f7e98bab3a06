"""The config of healing: what trains, on which text, for how many tokens, with which loss.

The CLI (`hf-compress heal`) reads its defaults from `HealConfig`, so a default lives here and nowhere else.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..config import MethodConfig
from ..device import calibration_dtype, dtype_name, pick_device
from ..errors import HFCompressError

LOSSES = ("kl", "lm", "kl+lm")
TRAINABLE = ("factors", "all", "lora")
SCHEDULES = ("cosine", "constant")
DTYPES = ("auto", "float32", "bfloat16")
# What `chat_fraction` "auto" means for a teacher whose tokenizer has a chat template (0.0 for one without).
AUTO_CHAT_FRACTION = 0.25


def _choice(flag: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise HFCompressError(f"{flag} must be one of {', '.join(choices)}; got {value!r}.")


@dataclass
class HealConfig(MethodConfig):
    """How to heal a compressed model by distillation from its source (the teacher).

    Args:
        tokens: training tokens in all; the run takes `ceil(tokens / (batch_size * seq_len))` optimizer steps.
        seq_len: tokens per training sequence (non-overlapping chunks of the joined text).
        batch_size: sequences per optimizer step.
        lr: peak learning rate of AdamW.
        weight_decay: AdamW weight decay.
        warmup_ratio: fraction of the steps of linear warmup.
        schedule: `"cosine"` (decay to 0 after the warmup) or `"constant"` (after the warmup).
        loss: `"kl"` (KL divergence from the teacher's next-token distribution), `"lm"` (cross-entropy on the text)
            or `"kl+lm"` (the KL plus `lm_weight` times the cross-entropy).
        temperature: softening of both distributions in the KL (the KL is scaled by `temperature**2`).
        lm_weight: weight of the cross-entropy term of `"kl+lm"`.
        hidden_weight: weight of a term added to `loss`: the student's decoder-layer outputs against the teacher's,
            layer by layer (`losses.hidden_state_loss`: squared distance relative to the teacher's, per position).
            0 (the default) leaves it out; the teacher must have the student's depth and width.
        balance_factors: before training `"factors"`, rescale each rank component of every factorised projection so
            that its row of the basis and its columns of the coefficients (over the group's members) have the same
            norm; the model computes the same function. The conversion leaves the singular values on the basis side
            (the basis entries typically several times the coefficients'), and AdamW, which moves every entry by
            about the learning rate, then changes the coefficients far faster than the bases. Off: on
            SmolLM2 it healed no better at lr 1e-4, 1.2% better at 2e-4, worse at 3e-4 (docs/healing.md). LoRA
            leaves the factors as they are.
        trainable: `"factors"` (the shared bases, coefficients, factorised biases and RMSNorm weights), `"all"`
            (every weight: the factors and norms, and the embeddings, the head and any dense projection; full
            fine-tuning, as in the Basis Sharing paper's Table 7) or `"lora"` (LoRA adapters on the bases and dense
            projections, plus the RMSNorm weights, merged at the end). A trainable head costs time: each chunk's
            logits are computed again in the backward pass. On SmolLM2 at 20% `"all"` healed no better than
            `"factors"` and 22% slower, LoRA far worse (docs/healing.md).
        lora_rank, lora_alpha: rank and scaling of the LoRA adapters.
        block_tokens: tokens of block-wise distillation before the end-to-end training (`blockwise.py`): the
            student's blocks of layers (the shortest runs of layers that share no basis with others), one after the
            other, trained so that each turns the student's hidden states at its input into the teacher's at its
            output, on the first `ceil(block_tokens / seq_len)` sequences of the run's data. It trains the factors
            and norms whatever `trainable` is, and needs a teacher of the student's depth and width. 0 leaves it
            out.
        block_epochs: passes of each block over those sequences.
        block_lr: peak learning rate of each block's AdamW (decayed to 0 on a cosine, no warmup).
        block_batch_size: sequences per step of the block-wise stage.
        kl_chunk: sequence positions whose vocabulary-wide logits are computed at a time.
        dataset: preset (`c4-calibration`, `wikitext2`, ...), local parquet/jsonl/txt file or Hub dataset name.
        dataset_column: its text column (default: the preset's, else "text").
        seed: order of the training sequences and LoRA initialization.
        dtype: `"auto"` (bfloat16 autocast where the device has native bfloat16, else float32), `"bfloat16"` or
            `"float32"`; the trained weights stay float32 either way. Under bfloat16 the chat text is written by a
            bfloat16 copy of a float32 teacher (faster decoding); the targets still come from the teacher as given.
        gradient_checkpointing: recompute each decoder layer in the backward pass (less memory, more time).
        save_steps: the resumable training state is saved every this many steps.
        chat_fraction: share of the training sequences that are chat text written by the teacher (its chat
            template's conversations packed into `seq_len` chunks), the rest plain text of `dataset`: a number in
            [0, 1), or `"auto"`: `AUTO_CHAT_FRACTION` (0.25) where the tokenizer of the run has a chat template (an
            instruct teacher), else 0 (`resolve(..., chat_template=...)`). Plain text alone does not show the student
            its chat format, and a student healed on it can still end its turn at once.
        chat_source: `"free"` (the teacher writes the user's message from its template's opening, then the answer)
            or a JSON file holding a list of prompts the teacher answers (never the chat benchmark's prompts).
        chat_max_new_tokens: the most tokens the teacher writes per turn (the user message, the answer).
        chat_temperature: sampling temperature of the teacher's chat text (0: greedy; free samples need > 0).
        chat_batch_size: conversations the teacher writes at a time (the chat text depends on it and on `seed`); a
            conversation that ends leaves its batch, so a large batch wastes no work on finished ones.
        free_text_fraction: share of the training sequences that are plain text the teacher writes freely from a
            document start (as data-free distillation does): text of the teacher's own distribution, which reaches
            past what `dataset` holds. Written `chat_batch_size` samples at a time at `chat_temperature`, each up to
            `seq_len` tokens. 0 (the default) leaves it out; with the chat text it must leave some of `dataset`. Off
            by default: a quarter of it healed SmolLM2 at 20% 20.8% worse on WikiText-2 (docs/healing.md).
    """

    tokens: int = 262144
    seq_len: int = 512
    # Two sequences a step and the KL plus the cross-entropy: measured best of the settings tried on SmolLM2 at 20%
    # (docs/healing.md, "What the training defaults rest on"), at no cost in time.
    batch_size: int = 2
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup_ratio: float = 0.05
    schedule: str = "cosine"
    loss: str = "kl+lm"
    temperature: float = 1.0
    lm_weight: float = 1.0
    # Off: at 5 it healed SmolLM2 at 20% worse than the output alone (docs/healing.md).
    hidden_weight: float = 0.0
    # Off: balanced, SmolLM2 at 20% healed no better at lr 1e-4, 1.2% better at 2e-4 and 4.3% worse at 3e-4, one
    # run each (docs/healing.md).
    balance_factors: bool = False
    trainable: str = "factors"
    lora_rank: int = 8
    lora_alpha: float = 16.0
    block_tokens: int = 0
    block_epochs: int = 1
    block_lr: float = 1e-4
    block_batch_size: int = 4
    kl_chunk: int = 128
    dataset: str = "c4-calibration"
    dataset_column: str | None = None
    seed: int = 2023
    dtype: str = "auto"
    gradient_checkpointing: bool = False
    save_steps: int = 25
    chat_fraction: float | str = "auto"
    chat_source: str = "free"
    chat_max_new_tokens: int = 128
    chat_temperature: float = 0.7
    chat_batch_size: int = 64
    # Off: what SmolLM2-135M writes alone is poor text, and healing on it did worse (docs/healing.md, "Free text").
    free_text_fraction: float = 0.0

    def validate(self) -> None:
        """Raises `HFCompressError` naming the first bad option."""
        for flag, value, minimum in (("--tokens", self.tokens, 1), ("--seq-len", self.seq_len, 2),
                                     ("--batch-size", self.batch_size, 1), ("--lora-rank", self.lora_rank, 1),
                                     ("--kl-chunk", self.kl_chunk, 1), ("--save-steps", self.save_steps, 1),
                                     ("--chat-max-new-tokens", self.chat_max_new_tokens, 1),
                                     ("--chat-batch-size", self.chat_batch_size, 1),
                                     ("--block-tokens", self.block_tokens, 0), ("--block-epochs", self.block_epochs, 1),
                                     ("--block-batch-size", self.block_batch_size, 1)):
            if value < minimum:
                raise HFCompressError(f"{flag} must be >= {minimum}; got {value}.")
        for flag, value in (("--lr", self.lr), ("--temperature", self.temperature), ("--lora-alpha", self.lora_alpha),
                            ("--block-lr", self.block_lr)):
            if not value > 0:
                raise HFCompressError(f"{flag} must be > 0; got {value}.")
        for flag, value in (("--weight-decay", self.weight_decay), ("--lm-weight", self.lm_weight),
                            ("--hidden-weight", self.hidden_weight), ("--chat-temperature", self.chat_temperature)):
            if not value >= 0:
                raise HFCompressError(f"{flag} must be >= 0; got {value}.")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise HFCompressError(f"--warmup-ratio must be in [0, 1); got {self.warmup_ratio}.")
        self._validate_chat_fraction()
        if self.chat_fraction == "auto" or self.chat_fraction > 0:  # "auto" may mean chat: its options are checked
            self._validate_chat_source()
        self._validate_free_text(self.chat_fraction)
        _choice("--loss", self.loss, LOSSES)
        _choice("--trainable", self.trainable, TRAINABLE)
        _choice("--schedule", self.schedule, SCHEDULES)
        _choice("--dtype", self.dtype, DTYPES)

    def _validate_chat_fraction(self) -> None:
        value = self.chat_fraction
        if value == "auto":
            return
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise HFCompressError(f"--chat-fraction must be 'auto' or a number in [0, 1); got {value!r}.")
        if not 0.0 <= value < 1.0:
            raise HFCompressError(f"--chat-fraction must be in [0, 1); got {value}.")

    def _validate_free_text(self, chat_fraction: float | str) -> None:
        """The free text's share, alone and beside a known chat share (the rest must be `dataset`'s text)."""
        value = self.free_text_fraction
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
            raise HFCompressError(f"--free-text-fraction must be a number in [0, 1); got {value!r}.")
        if value > 0 and not self.chat_temperature > 0:
            raise HFCompressError("--free-text-fraction samples the teacher: --chat-temperature must be > 0; "
                                  f"got {self.chat_temperature}.")
        if chat_fraction != "auto" and value > 0 and not chat_fraction + value < 1.0:
            raise HFCompressError(f"--chat-fraction {chat_fraction:g} and --free-text-fraction {value:g} leave none "
                                  "of the dataset's text; their sum must be < 1.")

    def _validate_chat_source(self) -> None:
        if self.chat_source == "free":
            if not self.chat_temperature > 0:
                raise HFCompressError("--chat-source free samples the teacher: --chat-temperature must be > 0; "
                                      f"got {self.chat_temperature}.")
        elif not Path(self.chat_source).is_file():
            raise HFCompressError(f"--chat-source must be 'free' or a JSON file of prompts; {self.chat_source!r} "
                                  "is no file.")
        else:
            from .chat_data import load_chat_prompts

            load_chat_prompts(self.chat_source)  # a bad file is refused before any model loads

    def resolve(self, device: str | torch.device | None = None, *, chat_template: bool | None = None) -> HealConfig:
        """A copy with `dtype` "auto" replaced by "bfloat16" or "float32" for `device`, and `chat_fraction` "auto"
        by `AUTO_CHAT_FRACTION` where `chat_template` is true (the tokenizer the chat text would be written with
        has a chat template: `data.has_chat_template`), else by 0.0. An explicit fraction stays as given.

        With `chat_template` None (no tokenizer known: a config checked or read back before any model loads),
        `chat_fraction` "auto" stays "auto" rather than being guessed, and whatever needs the number
        (`chat_share`: the healing data) refuses it; `heal` resolves once, with the tokenizer of the run.
        """
        device = device if isinstance(device, torch.device) else pick_device(device)
        chat_fraction = self.chat_fraction
        if chat_fraction == "auto" and chat_template is not None:
            chat_fraction = AUTO_CHAT_FRACTION if chat_template else 0.0
        self._validate_free_text(chat_fraction)  # "auto" now a number: their sum is checked
        return dataclasses.replace(self, dtype=dtype_name(calibration_dtype(self.dtype, device)),
                                   chat_fraction=chat_fraction)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> HealConfig:
        """`MethodConfig.from_dict`; a record written before the chat options existed (no `chat_fraction`) was
        healed on plain text alone, and reads back with 0.0 rather than today's "auto"."""
        if "chat_fraction" not in data:
            data = {**data, "chat_fraction": 0.0}
        return super().from_dict(data)

    @property
    def chat_share(self) -> float:
        """`chat_fraction` as a number; a ValueError while it is still "auto" (`resolve` was not given
        `chat_template`): what the run trains on is never left to a guess."""
        if self.chat_fraction == "auto":
            raise ValueError('HealConfig.chat_fraction "auto" is unresolved: call resolve(device, '
                             'chat_template=...) with whether the tokenizer has a chat template first.')
        return float(self.chat_fraction)

    @property
    def uses_kl(self) -> bool:
        return self.loss in ("kl", "kl+lm")

    @property
    def uses_lm(self) -> bool:
        return self.loss in ("lm", "kl+lm")

    @property
    def uses_hidden(self) -> bool:
        return self.hidden_weight > 0

    @property
    def uses_blocks(self) -> bool:
        return self.block_tokens > 0

    @property
    def block_sequences(self) -> int:
        """How many of the run's first sequences the block-wise stage trains on."""
        return math.ceil(self.block_tokens / self.seq_len)

    @property
    def needs_teacher(self) -> bool:
        """Whether each step runs the teacher (for its next-token distribution or its layers' outputs)."""
        return self.uses_kl or self.uses_hidden


def parse_chat_fraction(text: str) -> float | str:
    """`--chat-fraction` as typed: "auto" or a number (its range is `HealConfig.validate`'s to check)."""
    value = text.strip().lower()
    if value == "auto":
        return "auto"
    try:
        return float(value)
    except ValueError:
        raise HFCompressError(f"--chat-fraction must be 'auto' or a number in [0, 1); got {text!r}.") from None
