"""Chat quality of an instruct model: its greedy answers through its own chat template, and how they compare with
the answers of the model it was compressed from.

A compressed instruct model can stop chatting (it ends its turn at once and answers nothing) while its perplexity on
plain text barely moves; these metrics see it: the share of non-empty answers, the first sentence matched against the
dense model's answer, and the dense (teacher) model's NLL of the student's answers.
"""

from __future__ import annotations

import hashlib
import inspect
import math
import re
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

from ..errors import HFCompressError

# A message content no template changes (no surrounding whitespace to trim, no markup), to find where a template
# puts the content of a turn.
SENTINEL = "HFCOMPRESSSENTINEL"
# A list marker at the start of an answer ("1.", "-", "*") is not a sentence of its own.
_LIST_MARKER = re.compile(r"^(?:[-*\u2022]|\d+[.)])\s+")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s")


def _check_template(tokenizer: PreTrainedTokenizerBase) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise HFCompressError(f"the tokenizer ({type(tokenizer).__name__}, {tokenizer.name_or_path!r}) has no chat "
                              "template: chat generation needs an instruct model's tokenizer.")


def user_turn(content: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": content}]


def chat_prompt_text(tokenizer: PreTrainedTokenizerBase, prompt: str) -> str:
    """`prompt` as a user turn through the chat template, followed by the opening of the assistant's turn."""
    _check_template(tokenizer)
    return tokenizer.apply_chat_template(user_turn(prompt), tokenize=False, add_generation_prompt=True)


def chat_opening(tokenizer: PreTrainedTokenizerBase) -> str:
    """What the chat template writes before the content of the first user turn (its default system turn included):
    where a conversation the model writes itself starts."""
    _check_template(tokenizer)
    rendered = tokenizer.apply_chat_template(user_turn(SENTINEL), tokenize=False)
    if SENTINEL not in rendered:
        raise HFCompressError("the tokenizer's chat template does not write the user's message verbatim; cannot "
                              "find where a user turn starts.")
    return rendered.split(SENTINEL, 1)[0]


def end_of_turn_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The token that closes an assistant turn in the chat template (`<|im_end|>`, `<|eot_id|>`, ...), then the EOS
    token: generation stops at either."""
    _check_template(tokenizer)
    rendered = tokenizer.apply_chat_template(user_turn("Hi") + [{"role": "assistant", "content": SENTINEL}],
                                             tokenize=False)
    after = rendered.split(SENTINEL, 1)[1] if SENTINEL in rendered else ""
    special = set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}) or {})
    ids = tokenizer(after, add_special_tokens=False).input_ids
    stops = [next(i for i in ids if i in special)] if any(i in special for i in ids) else []
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in stops:
        stops.append(tokenizer.eos_token_id)
    if not stops:
        raise HFCompressError("cannot tell which token ends a turn: the chat template closes the assistant's turn "
                              "with no special token and the tokenizer has no EOS token.")
    return stops


def derived_seed(*parts: object) -> int:
    """A seed for one batch of sampling, from the run's seed and where the batch sits (no two batches share one)."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:7], "big")


def _device_of(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _next_tokens(logits: torch.Tensor, temperature: float, generators: Sequence[torch.Generator]) -> torch.Tensor:
    """The argmax of each row (temperature 0), or a sample of its softmax(logits / temperature) drawn as the argmax
    of the softened logits plus Gumbel noise from the row's own generator: what a row samples does not depend on
    the other rows of its batch."""
    if temperature <= 0:
        return logits.argmax(-1)
    scores = logits.float() / temperature
    uniform = torch.stack([torch.rand(scores.shape[-1], generator=g) for g in generators]).to(scores.device)
    return (scores - torch.log(-torch.log(uniform))).argmax(-1)


def _decode(model: PreTrainedModel, prompts: list[list[int]], *, pad_id: int, stops: set[int], max_new_tokens: int,
            temperature: float, generators: Sequence[torch.Generator]) -> list[tuple[list[int], bool]]:
    """Continues the token lists `prompts` as one left-padded batch with a KV cache. A row that writes a stop token
    leaves the batch (its cache rows are dropped): the rest decode without it, instead of carrying finished rows to
    the longest answer's end."""
    device = _device_of(model)
    width = max(len(ids) for ids in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
        mask[row, width - len(prompt):] = 1
    ids, mask = ids.to(device), mask.to(device)
    cache = DynamicCache(config=model.config)
    # transformers renamed `past_key_values` to `cache` within 5.x
    cache_kwarg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    live = list(range(len(prompts)))  # the prompt each row of the batch continues
    new: list[list[int]] = [[] for _ in prompts]
    finished = [False] * len(prompts)
    for step in range(max_new_tokens):
        positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, -ids.shape[1]:]
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1,
                       **{cache_kwarg: cache}).logits[:, -1]
        tokens = _next_tokens(logits, temperature, [generators[i] for i in live] if temperature > 0 else [])
        keep = []
        for row, (i, token) in enumerate(zip(live, tokens.tolist())):
            if token in stops:
                finished[i] = True
            else:
                new[i].append(token)
                keep.append(row)
        if not keep or step == max_new_tokens - 1:
            break
        if len(keep) < len(live):
            index = torch.tensor(keep, device=device)
            cache.batch_select_indices(index)
            mask, tokens, live = mask[index], tokens[index], [live[row] for row in keep]
        mask = torch.cat([mask, mask.new_ones((len(live), 1))], dim=1)
        ids = tokens[:, None]
    return list(zip(new, finished))


@torch.no_grad()
def generate_ids(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str] | Sequence[list[int]],
    *,
    max_new_tokens: int,
    batch_size: int = 8,
    temperature: float = 0.0,
    seed: int = 0,
    stop_ids: Sequence[int] | None = None,
) -> list[tuple[list[int], bool]]:
    """Continues every text (tokenized without special tokens: templates write their own; or given as token ids) in
    batches with left padding; returns, for each, the new tokens before the first stop token and whether a stop
    token came.

    `temperature` 0 decodes greedily; above 0 it samples from the plain softened distribution (no top-k, no top-p),
    each text under its own seed derived from `seed` and the text's position in `texts`, without touching the
    global random state. A text's result does not depend on `batch_size` or on the other texts (up to the rounding
    of batched arithmetic). Texts are batched longest first (less padding), and a text that ends its turn leaves its
    batch at once.
    """
    stops = list(stop_ids) if stop_ids is not None else end_of_turn_ids(tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    encoded = [list(text) if not isinstance(text, str) else tokenizer(text, add_special_tokens=False).input_ids
               for text in texts]
    by_length = sorted(range(len(texts)), key=lambda i: -len(encoded[i]))
    generators = ([torch.Generator().manual_seed(derived_seed(seed, i)) for i in range(len(texts))]
                  if temperature > 0 else [])
    results: list[tuple[list[int], bool]] = [([], False)] * len(texts)
    for start in range(0, len(texts), batch_size):
        rows = by_length[start:start + batch_size]
        outputs = _decode(model, [encoded[i] for i in rows], pad_id=pad_id, stops=set(stops),
                          max_new_tokens=max_new_tokens, temperature=temperature,
                          generators=[generators[i] for i in rows] if generators else [])
        for i, output in zip(rows, outputs):
            results[i] = output
    return results


def generate_chat_outputs(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str],
                          max_new_tokens: int = 64, batch_size: int = 8) -> list[dict]:
    """`generate_chat_answers` with what each answer cost: for every prompt, `{"answer": text, "tokens": the new
    tokens before the end of the turn, "finished": whether the model ended its turn (False: cut at
    `max_new_tokens`)}`."""
    texts = [chat_prompt_text(tokenizer, prompt) for prompt in prompts]
    outputs = generate_ids(model, tokenizer, texts, max_new_tokens=max_new_tokens, batch_size=batch_size)
    return [{"answer": tokenizer.decode(tokens, skip_special_tokens=True).strip(), "tokens": len(tokens),
             "finished": finished} for tokens, finished in outputs]


def generate_chat_answers(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str],
                          max_new_tokens: int = 64, batch_size: int = 8) -> list[str]:
    """Greedy answers of `model` to `prompts`, each asked as one user turn through the tokenizer's chat template.

    Decoding stops at the token that ends the assistant's turn (or at `max_new_tokens`); the answers are decoded
    without special tokens and stripped of surrounding whitespace ("" when the model ends its turn at once).
    """
    return [out["answer"] for out in generate_chat_outputs(model, tokenizer, prompts, max_new_tokens, batch_size)]


def first_sentence(text: str) -> str:
    """The first sentence of the first non-empty line (a leading list marker dropped), whitespace collapsed."""
    line = next((line.strip() for line in text.splitlines() if line.strip()), "")
    line = _LIST_MARKER.sub("", line)
    return " ".join(_SENTENCE_END.split(line, maxsplit=1)[0].split())


@torch.no_grad()
def answer_nll(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str],
               answers: Sequence[str], *, batch_size: int = 8) -> tuple[float, int]:
    """The mean NLL per token of `answers` under `model`, each answer after its prompt's chat-template text (the
    prompt tokens followed by the answer's tokens, one forward per batch, right-padded, the loss on the answer
    tokens only); returns `(nll, answer_tokens)`. Empty answers have no tokens and add nothing (nan if all are)."""
    rows = []
    for prompt, answer in zip(prompts, answers, strict=True):
        answer_ids = tokenizer(answer, add_special_tokens=False).input_ids if answer else []
        if answer_ids:
            rows.append((tokenizer(chat_prompt_text(tokenizer, prompt), add_special_tokens=False).input_ids,
                         answer_ids))
    device = _device_of(model)
    total, count = 0.0, 0
    for start in range(0, len(rows), batch_size):
        batch = rows[start:start + batch_size]
        width = max(len(p) + len(a) for p, a in batch)
        ids = torch.zeros((len(batch), width), dtype=torch.long)
        mask = torch.zeros_like(ids)
        labels = torch.full_like(ids, -100)
        for row, (prompt_ids, answer_ids) in enumerate(batch):
            length = len(prompt_ids) + len(answer_ids)
            ids[row, :length] = torch.tensor(prompt_ids + answer_ids)
            mask[row, :length] = 1
            labels[row, len(prompt_ids):length] = torch.tensor(answer_ids)
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).logits
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # bfloat16 logits: NLL in float32
        targets = labels[:, 1:].to(device)
        total += F.cross_entropy(logits[:, :-1].transpose(1, 2), targets, ignore_index=-100, reduction="sum").item()
        count += int((targets != -100).sum())
    return (total / count if count else math.nan), count


def chat_metrics(answers: Sequence[str], reference_answers: Sequence[str], teacher: PreTrainedModel,
                 tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], *, batch_size: int = 8
                 ) -> dict[str, float]:
    """How a (compressed) model's chat answers compare with the reference (dense) model's to the same prompts.

    Returns:
        prompts: how many answers were scored.
        non_empty: share of answers with any non-whitespace text.
        first_sentence_match: share of answers whose first sentence (`first_sentence`) equals the reference's.
        teacher_nll: the teacher's mean NLL per token of the answers given their prompts (`answer_nll`).
        answer_tokens: the answer tokens that NLL is over.
    """
    if not len(answers) == len(reference_answers) == len(prompts):
        raise HFCompressError(f"chat_metrics needs one answer and one reference per prompt; got {len(answers)} "
                              f"answers, {len(reference_answers)} references and {len(prompts)} prompts.")
    if not prompts:
        raise HFCompressError("chat_metrics needs at least one prompt.")
    n = len(prompts)
    nll, tokens = answer_nll(teacher, tokenizer, prompts, answers, batch_size=batch_size)
    return {
        "prompts": n,
        "non_empty": sum(bool(answer.strip()) for answer in answers) / n,
        "first_sentence_match": sum(first_sentence(a) == first_sentence(r)
                                    for a, r in zip(answers, reference_answers)) / n,
        "teacher_nll": nll,
        "answer_tokens": tokens,
    }
