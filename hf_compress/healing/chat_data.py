"""Text written by the teacher, for healing: chat text for an instruct model, and free plain text.

Plain text alone does not show the student the contexts an instruct model works in (its chat template, the end of
its turn), and a healed student can still stop chatting. The teacher writes chat text itself:

- answers to given prompts, asked through its chat template (`teacher_chat_texts`);
- free samples (data-free distillation): from the template's opening of a user turn the teacher writes the user's
  message, then answers it (`free_chat_texts`).

Either way a sample is a whole chat-template text (system turn, user turn, assistant turn). `chat_chunks` packs as
many as a run needs back to back into `seq_len` chunks.

One dataset also shows the student only its own kind of text. `free_text_chunks` packs plain text the teacher writes
from a document start (`document_start_id`), as data-free distillation does: text of the teacher's own distribution.
"""

from __future__ import annotations

import itertools
import json
import math
import random
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..errors import HFCompressError
from ..evaluation.chat import (
    chat_opening,
    chat_prompt_text,
    derived_seed,
    end_of_turn_ids,
    generate_ids,
    user_turn,
)
from .config import HealConfig

# The prompts the chat benchmark evaluates on: never healing data (a healed model would be graded on its training).
EVAL_PROMPTS = Path(__file__).resolve().parents[2] / "benchmarks" / "chat_prompts.json"
# Free sampling gives up when this many rounds in a row give no conversation (every user turn empty).
MAX_EMPTY_ROUNDS = 4


def _conversation(tokenizer: PreTrainedTokenizerBase, user: str, prompt_text: str, answer_ids: list[int],
                  finished: bool) -> str:
    """The chat-template text of `user` and the answer; an answer cut by the token limit is left open (no
    end-of-turn the teacher did not write)."""
    answer = tokenizer.decode(answer_ids, skip_special_tokens=True)
    if not finished:
        return prompt_text + answer
    return tokenizer.apply_chat_template(user_turn(user) + [{"role": "assistant", "content": answer}],
                                         tokenize=False)


def teacher_chat_texts(teacher: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], *,
                       max_new_tokens: int = 128, temperature: float = 0.7, seed: int = 0,
                       batch_size: int = 16) -> list[str]:
    """The teacher's answers to `prompts` (asked through its chat template; sampled at `temperature`, greedy at 0),
    each as the whole chat-template text of the conversation."""
    prompt_texts = [chat_prompt_text(tokenizer, prompt) for prompt in prompts]
    outputs = generate_ids(teacher, tokenizer, prompt_texts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                           temperature=temperature, seed=derived_seed(seed, "answers"),
                           stop_ids=end_of_turn_ids(tokenizer))
    return [_conversation(tokenizer, prompt, text, ids, finished)
            for prompt, text, (ids, finished) in zip(prompts, prompt_texts, outputs)]


def free_chat_texts(teacher: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, count: int, *,
                    max_new_tokens: int = 128, temperature: float = 0.7, seed: int = 0,
                    batch_size: int = 16) -> list[str]:
    """Up to `count` conversations the teacher writes alone: from the template's opening (`chat_opening`) it
    samples a user message, which its template then closes and it answers. A user turn left empty is dropped, so
    fewer than `count` may come back. Deterministic given `seed` and `count`."""
    if temperature <= 0:
        raise HFCompressError("free chat samples need a temperature > 0 (greedy decoding writes one conversation).")
    opening, stops = chat_opening(tokenizer), end_of_turn_ids(tokenizer)
    users = generate_ids(teacher, tokenizer, [opening] * count, max_new_tokens=max_new_tokens, batch_size=batch_size,
                         temperature=temperature, seed=derived_seed(seed, "users"), stop_ids=stops)
    messages = [tokenizer.decode(ids, skip_special_tokens=True).strip() for ids, _ in users]
    messages = [message for message in messages if message]
    return teacher_chat_texts(teacher, tokenizer, messages, max_new_tokens=max_new_tokens, temperature=temperature,
                              seed=seed, batch_size=batch_size) if messages else []


def _normalized(prompt: str) -> str:
    return " ".join(prompt.split()).casefold()


def load_chat_prompts(path: str | Path, eval_prompts: Path | None = EVAL_PROMPTS) -> list[str]:
    """The prompts of a JSON file holding a list of strings; refused in one line if it holds anything else, or
    any of the chat benchmark's evaluation prompts (`eval_prompts`)."""
    path = Path(path)
    try:
        prompts = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        reason = " ".join(str(err).split())
        raise HFCompressError(f"--chat-source: cannot read {path.name} as JSON ({reason}).") from None
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
        raise HFCompressError(f"--chat-source: {path.name} must hold a JSON list of non-empty prompt strings.")
    if eval_prompts is not None and eval_prompts.is_file():
        held_out = {_normalized(p) for p in json.loads(eval_prompts.read_text())}
        shared = [p for p in prompts if _normalized(p) in held_out]
        if shared:
            raise HFCompressError(f"--chat-source: {path.name} holds {len(shared)} of the chat benchmark's evaluation "
                                  f"prompts ({eval_prompts.name}), e.g. {shared[0]!r}; heal on other prompts.")
    return prompts


def document_start_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The token a document starts after in pretraining: BOS where the tokenizer has one, else EOS (which then
    separates the documents of the pretraining stream)."""
    for token_id in (tokenizer.bos_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return int(token_id)
    raise HFCompressError("--free-text-fraction: the tokenizer has neither a BOS nor an EOS token to start a "
                          "document from.")


def free_texts(teacher: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, count: int, *, max_new_tokens: int,
               temperature: float, seed: int = 0, batch_size: int = 16) -> list[list[int]]:
    """Up to `count` documents the teacher writes from `document_start_id` at `temperature`, as token ids that begin
    with the start token (as the documents of a pretraining stream do); an empty one is dropped. A document ends at
    EOS or after `max_new_tokens`. Deterministic given `seed` and `count`."""
    if temperature <= 0:
        raise HFCompressError("free text needs a temperature > 0 (greedy decoding writes one document).")
    start = document_start_id(tokenizer)
    eos = tokenizer.eos_token_id
    stops = [eos] if eos is not None and eos != start else [start]  # a start token that is EOS also ends documents
    outputs = generate_ids(teacher, tokenizer, [[start]] * count,
                           max_new_tokens=max_new_tokens, batch_size=batch_size, temperature=temperature,
                           seed=derived_seed(seed, "free text"), stop_ids=stops)
    return [[start, *ids] for ids, _ in outputs if ids]


class _Packer:
    """Token ids added back to back up to `num_chunks x seq_len`, with a progress bar."""

    def __init__(self, num_chunks: int, seq_len: int, desc: str, progress: bool):
        from tqdm.auto import tqdm

        self.shape = (num_chunks, seq_len)
        self.target = num_chunks * seq_len
        self.stream: list[int] = []
        self.bar = tqdm(total=self.target, desc=desc, unit="tok", disable=not progress)

    @property
    def full(self) -> bool:
        return len(self.stream) >= self.target

    def add(self, ids: list[int]) -> None:
        before = len(self.stream)
        self.stream.extend(ids)
        self.bar.update(min(len(self.stream), self.target) - min(before, self.target))

    def fill_in_rounds(self, write: Callable[[int], list[list[int]]], nothing_written: str) -> None:
        """Adds what `write(round)` returns (samples as token ids) for rounds 0, 1, ... until full; after
        `MAX_EMPTY_ROUNDS` rounds in a row that gave nothing, raises `nothing_written`."""
        empty_rounds = 0
        for round_idx in itertools.count():
            if self.full:
                return
            samples = write(round_idx)
            empty_rounds = 0 if samples else empty_rounds + 1
            if empty_rounds == MAX_EMPTY_ROUNDS:
                raise HFCompressError(nothing_written)
            for ids in samples:
                self.add(ids)

    def chunks(self, what: str) -> torch.Tensor:
        """The chunks; what was written is repeated if it is shorter."""
        self.bar.close()
        if not self.stream:
            raise HFCompressError(f"the teacher wrote no {what}.")
        repeated = self.stream * math.ceil(self.target / len(self.stream))
        return torch.tensor(repeated[:self.target], dtype=torch.long).view(*self.shape)


def free_text_chunks(teacher: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, config: HealConfig,
                     num_chunks: int, *, progress: bool = True) -> torch.Tensor:
    """`num_chunks x seq_len` token ids of documents the teacher writes freely (`free_texts`: `chat_batch_size` a
    round, up to `seq_len` tokens each, at `chat_temperature`, seeded by `config.seed` and the round) packed back to
    back."""
    packer = _Packer(num_chunks, config.seq_len, "free text", progress)
    packer.fill_in_rounds(
        lambda round_idx: free_texts(teacher, tokenizer, config.chat_batch_size, max_new_tokens=config.seq_len,
                                     temperature=config.chat_temperature, batch_size=config.chat_batch_size,
                                     seed=derived_seed(config.seed, "free text", round_idx)),
        f"the teacher ended {MAX_EMPTY_ROUNDS * config.chat_batch_size} documents in a row at once; it writes no "
        "free text.")
    return packer.chunks("free text")


def chat_chunks(teacher: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, config: HealConfig, num_chunks: int,
                *, progress: bool = True) -> torch.Tensor:
    """`num_chunks x seq_len` token ids of teacher-written conversations packed back to back.

    `config.chat_source` "free": free samples, `chat_batch_size` per round, until the chunks are full. A prompts
    file: its prompts in an order shuffled by the seed, answered `chat_batch_size` at a time; when they run out they
    are answered again (new samples; greedy answers would repeat, so at temperature 0 one pass is all). If what the
    source gave is shorter than the chunks, it is repeated. Every batch samples under a seed derived from
    `config.seed`: the chunks are a function of the config, the teacher and the device.
    """
    options = {"max_new_tokens": config.chat_max_new_tokens, "temperature": config.chat_temperature,
               "batch_size": config.chat_batch_size}
    packer = _Packer(num_chunks, config.seq_len, "chat data", progress)

    def ids(texts: list[str]) -> list[list[int]]:
        return [tokenizer(text, add_special_tokens=False).input_ids for text in texts]

    if config.chat_source == "free":
        packer.fill_in_rounds(
            lambda round_idx: ids(free_chat_texts(teacher, tokenizer, config.chat_batch_size,
                                                  seed=derived_seed(config.seed, round_idx), **options)),
            f"the teacher wrote {MAX_EMPTY_ROUNDS * config.chat_batch_size} empty user turns in a row; free chat "
            "samples need a chat model (or give --chat-source PROMPTS.json).")
    else:
        prompts = load_chat_prompts(config.chat_source)
        random.Random(config.seed).shuffle(prompts)
        passes = 1 if config.chat_temperature == 0 else math.inf
        done = 0
        while not packer.full and done < passes:
            for start in range(0, len(prompts), config.chat_batch_size):
                if packer.full:
                    break
                for sample in ids(teacher_chat_texts(teacher, tokenizer, prompts[start:start + config.chat_batch_size],
                                                     seed=derived_seed(config.seed, done, start), **options)):
                    packer.add(sample)
            done += 1
    return packer.chunks("chat text")
