"""Chat evaluation (`hf_compress.evaluation.chat`): greedy answers through the chat template, and their metrics."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import make_tokenizer, tiny_llama_config
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from hf_compress.errors import HFCompressError
from hf_compress.evaluation.chat import (
    answer_nll,
    chat_metrics,
    chat_opening,
    chat_prompt_text,
    end_of_turn_ids,
    first_sentence,
    generate_chat_answers,
    generate_chat_outputs,
    _next_tokens,
    generate_ids,
)

# ChatML, as SmolLM2's template, with a default system turn.
CHATML = ("{% for m in messages %}{% if loop.first and m['role'] != 'system' %}<|im_start|>system\nYou are a tiny "
          "fox.<|im_end|>\n{% endif %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
PROMPTS = ["The quick brown fox?", "Compression keeps the most useful directions of every weight matrix.", "A",
           "Every layer keeps its own coefficients", "lazy dog", "Shared basis serves two layers. Why?", "Hi"]


pytestmark = pytest.mark.usefixtures("one_thread")


def chat_tokenizer() -> PreTrainedTokenizerFast:
    """The tiny test tokenizer with ChatML's two special tokens and template."""
    tokenizer = make_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.chat_template = CHATML
    return tokenizer


def chat_model(tokenizer: PreTrainedTokenizerFast, seed: int = 0, ends_after: str | None = PROMPTS[0]
               ) -> LlamaForCausalLM:
    """A random float64 Llama with spread logits (varied greedy tokens, no ties). With `ends_after`, `<|im_end|>`'s
    output row is a scaled copy of the row of the first token the model would answer that prompt with, so that the
    model ends its turn at once there and wherever else that token would win."""
    torch.manual_seed(seed)
    config = tiny_llama_config(vocab_size=len(tokenizer), tie_word_embeddings=False, initializer_range=0.5)
    model = LlamaForCausalLM(config).double().eval()
    if ends_after is not None:
        first = greedy_loop(model, tokenizer, ends_after, 1)[0][0]
        with torch.no_grad():
            model.lm_head.weight[tokenizer.convert_tokens_to_ids("<|im_end|>")] = model.lm_head.weight[first] * 1.05
    return model


def prompt_ids(tokenizer, prompt: str) -> list[int]:
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False).input_ids


def greedy_loop(model, tokenizer, prompt: str, max_new_tokens: int) -> tuple[list[int], bool]:
    """Greedy decoding one token at a time over the whole sequence (no cache, no batch, no padding)."""
    ids, new = prompt_ids(tokenizer, prompt), []
    stops = {tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.eos_token_id}
    for _ in range(max_new_tokens):
        with torch.no_grad():
            token = int(model(torch.tensor([ids + new])).logits[0, -1].argmax())
        if token in stops:
            return new, True
        new.append(token)
    return new, False


def test_template_parts():
    tokenizer = chat_tokenizer()
    assert chat_opening(tokenizer) == "<|im_start|>system\nYou are a tiny fox.<|im_end|>\n<|im_start|>user\n"
    assert chat_prompt_text(tokenizer, "Hi?") == ("<|im_start|>system\nYou are a tiny fox.<|im_end|>\n"
                                                  "<|im_start|>user\nHi?<|im_end|>\n<|im_start|>assistant\n")
    assert end_of_turn_ids(tokenizer) == [tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.eos_token_id]
    # A template that closes a turn with the EOS token alone.
    plain = make_tokenizer()
    plain.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}<|endoftext|>{% endfor %}"
    assert end_of_turn_ids(plain) == [plain.eos_token_id] == [0]
    with pytest.raises(HFCompressError, match="no chat template") as info:
        chat_opening(make_tokenizer())
    assert "\n" not in str(info.value)


def test_answers_equal_a_token_by_token_greedy_loop():
    tokenizer = chat_tokenizer()
    model = chat_model(tokenizer)
    expected = [greedy_loop(model, tokenizer, prompt, 12) for prompt in PROMPTS]
    # What the test needs the model to do: end its turn at once, end it later, and run out of tokens.
    assert expected[0] == ([], True)
    assert any(finished and tokens for tokens, finished in expected)
    assert any(not finished for _, finished in expected)

    texts = [chat_prompt_text(tokenizer, prompt) for prompt in PROMPTS]
    for batch_size in (1, 3, 8):  # batches of prompts of different lengths: left padding
        assert generate_ids(model, tokenizer, texts, max_new_tokens=12, batch_size=batch_size) == expected
    answers = generate_chat_answers(model, tokenizer, PROMPTS, max_new_tokens=12, batch_size=3)
    assert answers == [tokenizer.decode(tokens, skip_special_tokens=True).strip() for tokens, _ in expected]
    assert answers[0] == "" and all(answers[1:])
    outputs = generate_chat_outputs(model, tokenizer, PROMPTS, max_new_tokens=12, batch_size=3)
    assert outputs == [{"answer": answer, "tokens": len(tokens), "finished": finished}
                       for answer, (tokens, finished) in zip(answers, expected)]


def test_sampling_is_seeded_and_leaves_the_global_rng_alone():
    tokenizer = chat_tokenizer()
    model = chat_model(tokenizer, ends_after=None)
    texts = [chat_prompt_text(tokenizer, prompt) for prompt in PROMPTS]
    state = torch.get_rng_state()
    run = lambda seed, batch_size=4: generate_ids(model, tokenizer, texts, max_new_tokens=10, batch_size=batch_size,
                                                  temperature=1.0, seed=seed)
    first = run(7)
    assert torch.equal(torch.get_rng_state(), state)
    assert run(7) == first
    assert run(8) != first
    # each text samples under its own seed: batching them otherwise changes nothing
    assert run(7, batch_size=1) == run(7, batch_size=len(texts)) == first
    assert first != generate_ids(model, tokenizer, texts, max_new_tokens=10, batch_size=4)  # not greedy


def test_finished_rows_leave_the_batch():
    tokenizer = chat_tokenizer()
    model = chat_model(tokenizer)
    texts = [chat_prompt_text(tokenizer, prompt) for prompt in PROMPTS]
    expected = [greedy_loop(model, tokenizer, prompt, 12) for prompt in PROMPTS]
    widths = []
    model.model.register_forward_hook(lambda module, args, kwargs, out: widths.append(kwargs["input_ids"].shape[0]),
                                      with_kwargs=True)
    assert generate_ids(model, tokenizer, texts, max_new_tokens=12, batch_size=len(texts)) == expected
    # step k runs the texts that wrote k tokens without a stop token (the rest left the batch)
    alive = [sum(len(tokens) >= k for tokens, _ in expected) for k in range(12)]
    assert alive[0] == len(texts) and min(alive) < len(texts)
    assert widths == [n for n in alive if n]


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_gumbel_sampling_follows_the_softened_distribution(temperature):
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05], dtype=torch.float64)
    draws = 8000
    generators = [torch.Generator().manual_seed(i) for i in range(draws)]
    tokens = _next_tokens(probs.log().expand(draws, -1), temperature, generators)
    softened = probs ** (1 / temperature) / (probs ** (1 / temperature)).sum()
    frequencies = torch.bincount(tokens, minlength=4).double() / draws
    # 4 standard errors of a frequency from 8,000 draws
    assert torch.all((frequencies - softened).abs() <= 4 * (softened * (1 - softened) / draws).sqrt())
    assert torch.equal(_next_tokens(probs.log().expand(3, -1), 0.0, []), torch.zeros(3, dtype=torch.long))


def independent_nll(model, tokenizer, prompts, answers) -> tuple[float, int]:
    """Sum of -log p(answer token | everything before it), each conversation on its own, from full log-softmaxes."""
    total, count = 0.0, 0
    for prompt, answer in zip(prompts, answers):
        answer_ids = tokenizer(answer, add_special_tokens=False).input_ids if answer else []
        ids = prompt_ids(tokenizer, prompt) + answer_ids
        with torch.no_grad():
            log_probs = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)
        start = len(ids) - len(answer_ids)
        for position in range(start, len(ids)):
            total -= float(log_probs[position - 1, ids[position]])
            count += 1
    return total / count, count


def test_teacher_nll_equals_an_independent_computation():
    tokenizer = chat_tokenizer()
    teacher = chat_model(tokenizer, seed=3, ends_after=None)
    prompts = PROMPTS[:5]
    answers = ["The quick brown fox jumps over the lazy dog.", "", "Compression keeps directions.",
               "A shared basis serves two consecutive layers; each keeps its own coefficients.", "dog"]
    expected, tokens = independent_nll(teacher, tokenizer, prompts, answers)
    assert tokens == sum(len(tokenizer(a, add_special_tokens=False).input_ids) for a in answers) > 10
    for batch_size in (1, 2, 8):  # right padding of different lengths
        nll, count = answer_nll(teacher, tokenizer, prompts, answers, batch_size=batch_size)
        assert count == tokens
        assert nll == pytest.approx(expected, rel=1e-9)
    metrics = chat_metrics(answers, answers, teacher, tokenizer, prompts, batch_size=2)
    assert metrics["teacher_nll"] == pytest.approx(expected, rel=1e-9) and metrics["answer_tokens"] == tokens
    assert math.isnan(answer_nll(teacher, tokenizer, prompts[:2], ["", ""])[0])


@pytest.mark.parametrize("text, first", [
    ("Paris is the capital of France. It is large.", "Paris is the capital of France."),
    ("\n\n  First line has no end\nsecond line.", "First line has no end"),
    ("- item one. More", "item one."),
    ("2. Add tea.  Wait.", "Add tea."),
    ("Pi is about 3.14 here. Yes", "Pi is about 3.14 here."),
    ("Wait...   what?", "Wait..."),
    ("Really?! Yes.", "Really?!"),
    ("   ", ""),
    ("one   two\tthree", "one two three"),
])
def test_first_sentence(text, first):
    assert first_sentence(text) == first


def test_counts_on_hand_made_answers():
    tokenizer = chat_tokenizer()
    teacher = chat_model(tokenizer, ends_after=None)
    answers = ["Paris is the capital of France. It is large.", "", "  \n ", "1. Boil water.\n2. Add tea.",
               "Paris is the capital of France! Yes.", "Blue."]
    references = ["Paris is the capital of France.  It has many museums.", "Hello.", "", "1. Boil  water. Then wait.",
                  "Paris is the capital of France. Yes.", "Green."]
    metrics = chat_metrics(answers, references, teacher, tokenizer, PROMPTS[:6])
    assert metrics["prompts"] == 6
    assert metrics["non_empty"] == pytest.approx(4 / 6)
    # Matches: the first (second sentences differ), the blank one against an empty reference, the list.
    assert metrics["first_sentence_match"] == pytest.approx(3 / 6)
    with pytest.raises(HFCompressError, match="one answer and one reference per prompt") as info:
        chat_metrics(answers, references[:5], teacher, tokenizer, PROMPTS[:6])
    assert "\n" not in str(info.value)
