"""Teacher-written chat text in the healing data (`hf_compress.healing.chat_data`, `HealConfig.chat_*`)."""

from __future__ import annotations

import copy
import json
import math
import random
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_tokenizer
from test_chat import PROMPTS, chat_model, chat_tokenizer, greedy_loop

from hf_compress.data.text import tokenize_joined
from hf_compress.errors import HFCompressError
from hf_compress.evaluation.chat import chat_prompt_text
from hf_compress.healing import HealConfig, heal
from hf_compress.healing import chat_data
from hf_compress.healing.chat_data import (
    EVAL_PROMPTS,
    chat_chunks,
    free_chat_texts,
    teacher_chat_texts,
)
from hf_compress.healing.config import AUTO_CHAT_FRACTION, parse_chat_fraction
from hf_compress.healing.data import chat_sequences, has_chat_template, load_healing_data, recorded_options
from hf_compress.provenance import DataRef

OPENING = "<|im_start|>system\nYou are a tiny fox.<|im_end|>\n<|im_start|>user\n"
ASSISTANT = "<|im_end|>\n<|im_start|>assistant\n"
# A template whose turns are closed by the tiny tokenizer's only special token (the vocabulary stays that of the
# tiny converted checkpoint).
EOS_TEMPLATE = ("{% for m in messages %}{% if loop.first and m['role'] != 'system' %}<|endoftext|>system: be brief"
                "<|endoftext|>\n{% endif %}<|endoftext|>{{ m['role'] }}: {{ m['content'] }}<|endoftext|>\n{% endfor %}"
                "{% if add_generation_prompt %}<|endoftext|>assistant: {% endif %}")


pytestmark = pytest.mark.usefixtures("one_thread")


def mixed_config(calib_file: Path, **overrides) -> HealConfig:
    """10 steps of 4 x 16 tokens (40 training sequences) of the tiny text, 30% chat."""
    kwargs = {"tokens": 10 * 4 * 16, "seq_len": 16, "batch_size": 4, "dataset": str(calib_file), "dtype": "float32",
              "chat_fraction": 0.3, "chat_max_new_tokens": 8, "chat_batch_size": 4, "chat_temperature": 1.0,
              "seed": 5}
    kwargs.update(overrides)
    return HealConfig(**kwargs)


def token_rows(chunks: torch.Tensor) -> list[tuple[int, ...]]:
    return [tuple(row.tolist()) for row in chunks]


def expected_greedy_text(model, tokenizer, prompt: str, max_new_tokens: int) -> str:
    """The conversation as the chat template writes it, with the answer of an independent greedy loop (left open
    when cut by the token limit)."""
    tokens, finished = greedy_loop(model, tokenizer, prompt, max_new_tokens)
    answer = tokenizer.decode(tokens, skip_special_tokens=True)
    if not finished:
        return chat_prompt_text(tokenizer, prompt) + answer
    conversation = [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
    return tokenizer.apply_chat_template(conversation, tokenize=False)


def _one_line_error(match: str, call) -> None:
    with pytest.raises(HFCompressError, match=match) as info:
        call()
    assert "\n" not in str(info.value)


# --- the teacher's chat text ----------------------------------------------------------------------------------------


def test_free_samples_are_seeded_and_start_with_the_template_opening():
    tokenizer = chat_tokenizer()
    teacher = chat_model(tokenizer, ends_after=None)
    state = torch.get_rng_state()
    sample = lambda seed: free_chat_texts(teacher, tokenizer, 6, max_new_tokens=10, temperature=1.0, seed=seed,
                                          batch_size=4)
    texts = sample(11)
    assert torch.equal(torch.get_rng_state(), state)  # the global random state is left alone
    assert texts == sample(11) and texts != sample(12)
    assert 4 <= len(texts) <= 6 and len(set(texts)) == len(texts)
    for text in texts:
        assert text.startswith(OPENING)
        user, answer = text[len(OPENING):].split(ASSISTANT)  # one user turn written by the teacher, then the answer
        assert user.strip() and "<|im_" not in user
        finished = answer.endswith("<|im_end|>\n")
        answer = answer.removesuffix("<|im_end|>\n")
        assert "<|im_" not in answer
        conversation = [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
        assert text == (tokenizer.apply_chat_template(conversation, tokenize=False) if finished
                        else chat_prompt_text(tokenizer, user) + answer)


def test_prompt_answers_are_the_teachers_greedy_answers():
    tokenizer = chat_tokenizer()
    teacher = chat_model(tokenizer)  # ends its turn at once after PROMPTS[0], later or never after others
    texts = teacher_chat_texts(teacher, tokenizer, PROMPTS, max_new_tokens=12, temperature=0.0, batch_size=3)
    assert texts == [expected_greedy_text(teacher, tokenizer, prompt, 12) for prompt in PROMPTS]
    assert texts[0] == OPENING + PROMPTS[0] + ASSISTANT + "<|im_end|>\n"


def test_prompts_file_answers_packed_and_repeated(calib_file, tmp_path):
    tokenizer = chat_tokenizer()
    teacher = chat_model(tokenizer)
    prompts = ["Tell the fox a story", "Why is the dog lazy?", "Name two layers."]
    path = tmp_path / "heal_prompts.json"
    path.write_text(json.dumps(prompts))
    config = mixed_config(calib_file, chat_source=str(path), chat_temperature=0.0, chat_max_new_tokens=12)
    config.validate()
    num_chunks = 24
    chunks = chat_chunks(teacher, tokenizer, config, num_chunks, progress=False)

    # Greedy answers: one pass over the prompts in the seed's order, repeated until the chunks are full.
    order = list(prompts)
    random.Random(config.seed).shuffle(order)
    stream = [token for prompt in order for token in
              tokenizer(expected_greedy_text(teacher, tokenizer, prompt, 12), add_special_tokens=False).input_ids]
    assert len(stream) < num_chunks * config.seq_len  # so the repetition is tested
    stream = (stream * math.ceil(num_chunks * config.seq_len / len(stream)))[: num_chunks * config.seq_len]
    assert torch.equal(chunks, torch.tensor(stream).view(num_chunks, config.seq_len))


# --- the mix --------------------------------------------------------------------------------------------------------


def test_mixed_data_has_the_requested_share_of_chat(calib_file):
    tokenizer = chat_tokenizer()
    teacher = chat_model(tokenizer, ends_after=None)
    config = mixed_config(calib_file)
    data, ref = load_healing_data(tokenizer, config, teacher, progress=False)
    assert ref.name == calib_file.name and data.steps == 10 and data.written_chunks == 12

    rows = token_rows(torch.cat([data.batch(step) for step in range(data.steps)]))
    text_ids = tokenize_joined(tokenizer, calib_file.read_text().split("\n"))
    text_rows = set(token_rows(text_ids[: text_ids.numel() // 16 * 16].view(-1, 16)))
    assert len(text_rows) > 40
    chat_rows = [row for row in rows if row not in text_rows]
    assert len(rows) == 40 and len(chat_rows) == round(0.3 * 40) == 12
    expected = chat_chunks(teacher, tokenizer, config, 12, progress=False)
    assert sorted(chat_rows) == sorted(token_rows(expected))  # each chat chunk once
    opening = tokenizer(OPENING, add_special_tokens=False).input_ids
    assert expected.view(-1)[: len(opening)].tolist() == opening  # the first conversation starts the chat stream

    # Deterministic from the seed: a rerun (a resumed run) gets the same batch at every step.
    again, _ = load_healing_data(tokenizer, config, teacher, progress=False)
    assert torch.equal(again.chunks, data.chunks) and torch.equal(again.order, data.order)
    other, _ = load_healing_data(tokenizer, mixed_config(calib_file, seed=6), teacher, progress=False)
    assert not torch.equal(other.order, data.order)
    assert not torch.equal(other.chunks[-12:], data.chunks[-12:])


def test_bfloat16_runs_write_the_chat_text_with_a_bfloat16_copy_of_the_teacher(calib_file, monkeypatch):
    """Under bfloat16 the chat text is that of the teacher cast to bfloat16 (an independent copy here), and the
    teacher itself keeps its float32 weights bit for bit (its logits are the training targets); a teacher already
    in bfloat16 writes it itself, with no copy."""
    tokenizer = chat_tokenizer()
    teacher = chat_model(tokenizer, ends_after=None).float()
    before = {name: tensor.clone() for name, tensor in teacher.state_dict().items()}
    config = mixed_config(calib_file, dtype="bfloat16")
    data, _ = load_healing_data(tokenizer, config, teacher, progress=False)
    cast = copy.deepcopy(teacher).to(torch.bfloat16)
    assert torch.equal(data.chunks[-12:], chat_chunks(cast, tokenizer, config, 12, progress=False))
    after = teacher.state_dict()
    assert all(after[name].dtype == torch.float32 and torch.equal(after[name], value)
               for name, value in before.items())

    writers = []

    def spy(writer, *args, **kwargs):
        writers.append(writer)
        return real(writer, *args, **kwargs)

    real = chat_data.chat_chunks
    monkeypatch.setattr(chat_data, "chat_chunks", spy)
    load_healing_data(tokenizer, config, cast, progress=False)
    load_healing_data(tokenizer, mixed_config(calib_file), teacher, progress=False)  # float32: the teacher itself
    assert writers[0] is cast and writers[1] is teacher


@pytest.mark.parametrize("fraction, tokens, expected", [(0.0, 4096, 0), (0.25, 4096, 64), (0.3, 640, 12),
                                                        (0.01, 640, 1), (0.999, 640, 40), (0.5, 639, 20)])
def test_chat_sequences(fraction, tokens, expected):
    assert chat_sequences(HealConfig(tokens=tokens, seq_len=16, batch_size=4, chat_fraction=fraction)) == expected


def test_plain_text_data_is_unchanged(calib_file):
    """Without chat, the data is what it was before chat existed: the text's chunks in `randperm(n)` order."""
    tokenizer = chat_tokenizer()
    config = mixed_config(calib_file, chat_fraction=0.0)
    data, _ = load_healing_data(tokenizer, config)
    ids = tokenize_joined(tokenizer, calib_file.read_text().split("\n"))
    n = ids.numel() // 16
    torch.manual_seed(config.seed)
    assert torch.equal(data.order, torch.randperm(n)) and data.written_chunks == 0
    assert torch.equal(data.chunks, ids[: n * 16].view(n, 16))


# --- options, provenance, command line --------------------------------------------------------------------------


def test_bad_chat_options_fail_with_one_line(calib_file, tmp_path):
    for overrides, match in (({"chat_fraction": -0.1}, r"--chat-fraction must be in \[0, 1\); got -0.1"),
                             ({"chat_fraction": 1.0}, r"--chat-fraction must be in \[0, 1\); got 1.0"),
                             ({"chat_fraction": float("nan")}, r"--chat-fraction"),
                             ({"chat_temperature": -1.0}, r"--chat-temperature must be >= 0"),
                             ({"chat_temperature": 0.0}, r"--chat-source free .*--chat-temperature must be > 0"),
                             ({"chat_batch_size": 0}, r"--chat-batch-size must be >= 1"),
                             ({"chat_max_new_tokens": 0}, r"--chat-max-new-tokens must be >= 1"),
                             ({"chat_source": str(tmp_path / "missing.json")},
                              r"--chat-source must be 'free' or a JSON file.*missing.json")):
        _one_line_error(match, mixed_config(calib_file, **overrides).validate)
    # Chat options are not checked while no chat is asked for.
    mixed_config(calib_file, chat_fraction=0.0, chat_source="missing.json", chat_temperature=0.0).validate()

    for name, content, match in (("dict.json", '{"a": 1}', "must hold a JSON list of non-empty prompt strings"),
                                 ("empty.json", "[]", "must hold a JSON list"),
                                 ("blank.json", '["ok", "  "]', "must hold a JSON list"),
                                 ("bad.json", "[1, 2", r"cannot read bad.json as JSON")):
        path = tmp_path / name
        path.write_text(content)
        _one_line_error(f"--chat-source: .*{match}", mixed_config(calib_file, chat_source=str(path)).validate)

    # The chat benchmark's prompts are never healing data.
    held_out = json.loads(EVAL_PROMPTS.read_text())
    assert len(held_out) >= 60 and len(set(held_out)) == len(held_out)
    path = tmp_path / "leaky.json"
    path.write_text(json.dumps(["Tell the fox a story", "  " + held_out[3].upper() + " "]))
    _one_line_error(r"--chat-source: leaky.json holds 1 of the chat benchmark's evaluation prompts \(chat_prompts",
                    mixed_config(calib_file, chat_source=str(path)).validate)

    tokenizer = chat_tokenizer()
    _one_line_error("needs the teacher", lambda: load_healing_data(tokenizer, mixed_config(calib_file)))
    _one_line_error("no chat template", lambda: load_healing_data(make_tokenizer(), mixed_config(calib_file),
                                                                  chat_model(tokenizer), progress=False))


def test_heal_with_chat_records_the_mix(tiny_shared_basis_checkpoint, tiny_source_dir, calib_file, tmp_path):
    tokenizer = make_tokenizer()  # the converted checkpoint's vocabulary, with a chat template
    tokenizer.chat_template = EOS_TEMPLATE
    prompts = tmp_path / "heal_prompts.json"
    prompts.write_text(json.dumps(["Tell the fox a story", "Why is the dog lazy?"]))
    config = HealConfig(tokens=4 * 4 * 32, seq_len=32, batch_size=4, warmup_ratio=0.0, dataset=str(calib_file),
                        dtype="float32", save_steps=1000, chat_fraction=0.5, chat_source=str(prompts),
                        chat_temperature=0.0, chat_max_new_tokens=8)
    out = tmp_path / "healed"
    result = heal(tiny_shared_basis_checkpoint, out, teacher=str(tiny_source_dir), tokenizer=tokenizer, config=config,
                  device="cpu", progress=False)
    assert result.steps == 4 and len(result.losses) == 4 and all(math.isfinite(v) for v in result.losses)
    text = (out / "config.json").read_text()
    assert str(tmp_path) not in text
    options = json.loads(text)["compression"]["healing"]["options"]
    assert options["chat_fraction"] == 0.5 and options["chat_source"] == "heal_prompts.json"
    assert options["chat_temperature"] == 0.0 and options["chat_max_new_tokens"] == 8
    assert HealConfig.from_dict(options) == HealConfig(**{**config.to_dict(), "dataset": calib_file.name,
                                                         "chat_source": "heal_prompts.json"})


def test_recorded_options_round_trip(tmp_path):
    config = HealConfig(chat_fraction=0.25, chat_source=str(tmp_path / "p.json"), chat_temperature=0.5,
                        chat_max_new_tokens=64, chat_batch_size=8)
    assert HealConfig.from_dict(config.to_dict()) == config
    ref = DataRef.of("healing", "c4-calibration")
    assert recorded_options(config, ref) == {**config.to_dict(), "dataset": "c4-calibration", "chat_source": "p.json"}
    assert recorded_options(HealConfig(chat_fraction=0.1), ref)["chat_source"] == "free"
    # A record written before the chat options existed still reads back, with chat off (not today's "auto").
    old = {k: v for k, v in HealConfig().to_dict().items() if not k.startswith("chat_")}
    assert HealConfig.from_dict(old) == HealConfig(chat_fraction=0.0)
    assert HealConfig.from_dict(old).chat_fraction == 0.0


def test_cli_chat_options(calib_file, tmp_path):
    import typer
    from typer.testing import CliRunner

    from hf_compress.cli.heal import register

    app = typer.Typer()
    register(app)
    app.command("noop")(lambda: None)
    runner = CliRunner()
    help_text = runner.invoke(app, ["heal", "--help"], env={"COLUMNS": "200"}).output  # rich cuts narrow tables
    for flag in ("--chat-fraction", "--chat-source", "--chat-max-new-tokens", "--chat-temperature",
                 "--chat-batch-size"):
        assert flag in help_text
    bad = runner.invoke(app, ["heal", "in", str(tmp_path / "out"), "--teacher", "t", "--chat-fraction", "1.5"])
    assert isinstance(bad.exception, HFCompressError) and "--chat-fraction must be in [0, 1)" in str(bad.exception)


# --- the "auto" chat fraction ---------------------------------------------------------------------------------------


def template_tokenizer(template: str | None):
    """The tiny tokenizer (the converted checkpoint's vocabulary) with `template` as its chat template."""
    tokenizer = make_tokenizer()
    tokenizer.chat_template = template
    return tokenizer


def resolved(config: HealConfig, tokenizer) -> HealConfig:
    return config.resolve("cpu", chat_template=has_chat_template(tokenizer))


def test_auto_chat_fraction_follows_the_chat_template(calib_file):
    with_template, without = template_tokenizer(EOS_TEMPLATE), template_tokenizer(None)
    assert HealConfig().chat_fraction == "auto"
    assert has_chat_template(with_template) and not has_chat_template(without)
    assert not has_chat_template(template_tokenizer("")) and not has_chat_template(template_tokenizer("  \n"))
    assert not has_chat_template(None)

    assert resolved(HealConfig(), with_template).chat_fraction == AUTO_CHAT_FRACTION == 0.25
    assert resolved(HealConfig(), without).chat_fraction == 0.0
    # An explicit fraction stays as given, 0 included.
    assert resolved(HealConfig(chat_fraction=0.0), with_template).chat_fraction == 0.0
    assert resolved(HealConfig(chat_fraction=0.1), without).chat_fraction == 0.1
    # Resolved once: a resolved config keeps its number whatever tokenizer it meets later.
    once = resolved(HealConfig(), with_template)
    assert resolved(once, without) == once

    # Without word of the tokenizer, "auto" stays unresolved, and what needs the number refuses it (no guess).
    unresolved = HealConfig(dataset=str(calib_file)).resolve("cpu")
    assert unresolved.chat_fraction == "auto" and unresolved.dtype in ("float32", "bfloat16")
    for call in (lambda: chat_sequences(unresolved), lambda: load_healing_data(without, unresolved),
                 lambda: recorded_options(unresolved, DataRef.of("healing", "c4-calibration"))):
        with pytest.raises(ValueError, match='"auto" is unresolved'):
            call()


def test_chat_fraction_round_trip_and_validation(tmp_path):
    for config in (HealConfig(), HealConfig(chat_fraction=0.25), HealConfig(chat_fraction=0.0)):
        data = json.loads(json.dumps(config.to_dict()))
        assert HealConfig.from_dict(data) == config and HealConfig.from_dict(data).to_dict() == data
    assert HealConfig().to_dict()["chat_fraction"] == "auto"
    HealConfig().validate()
    HealConfig(chat_fraction=0.25).validate()
    for value, match in (("sometimes", r"--chat-fraction must be 'auto' or a number in \[0, 1\); got 'sometimes'"),
                         (1.5, r"--chat-fraction must be in \[0, 1\); got 1.5"),
                         ("0.25", r"--chat-fraction must be 'auto' or a number"),
                         (True, r"--chat-fraction must be 'auto' or a number"),
                         (None, r"--chat-fraction must be 'auto' or a number")):
        _one_line_error(match, HealConfig(chat_fraction=value).validate)
    # "auto" may mean chat: the chat options are checked with it.
    _one_line_error("--chat-source must be 'free' or a JSON file",
                    HealConfig(chat_source=str(tmp_path / "missing.json")).validate)

    assert parse_chat_fraction(" auto ") == "auto" and parse_chat_fraction("AUTO") == "auto"
    assert parse_chat_fraction("0.25") == 0.25 and parse_chat_fraction("0") == 0.0
    _one_line_error(r"--chat-fraction must be 'auto' or a number in \[0, 1\); got 'nope'",
                    lambda: parse_chat_fraction("nope"))


@pytest.mark.parametrize("value, shown", [("nope", "got 'nope'"), ("1.5", "got 1.5")])
def test_cli_refuses_a_bad_chat_fraction_in_one_line(tmp_path, monkeypatch, capsys, value, shown):
    from hf_compress.cli import main

    missing = str(tmp_path / "missing")  # neither model exists: only the option's check can answer
    monkeypatch.setattr(sys, "argv", ["hf-compress", "heal", missing, str(tmp_path / "out"), "--teacher", missing,
                                      "--chat-fraction", value])
    with pytest.raises(SystemExit) as exit_:
        main()
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and len(err.strip().splitlines()) == 1, err
    assert err.startswith("hf-compress: error: --chat-fraction must be") and shown in err
    assert not (tmp_path / "out").exists()


def test_cli_chat_fraction_help_says_what_auto_means():
    import typer
    from typer.testing import CliRunner

    from hf_compress.cli.heal import register

    app = typer.Typer()
    register(app)
    app.command("noop")(lambda: None)
    output = CliRunner().invoke(app, ["heal", "--help"], env={"COLUMNS": "200"}).output
    help_text = " ".join(output.replace("\u2502", " ").split())  # the lines of the table's cells joined
    assert "or auto (0.25 for a teacher whose" in help_text and "%" not in help_text


def test_heal_records_the_resolved_chat_fraction(tiny_shared_basis_checkpoint, tiny_source_dir, calib_file,
                                                 tmp_path, monkeypatch):
    """The default "auto" with a tokenizer that has a chat template: a quarter of the sequences are chat, and the
    record (saved, or carried in memory as `convert` heals) holds 0.25, never "auto"."""
    from hf_compress.modeling.shared_basis_llama import SharedBasisLlamaForCausalLM
    from transformers import AutoModelForCausalLM

    asked = []

    def spy(teacher, tokenizer, config, num_chunks, **kwargs):
        asked.append((config.chat_fraction, num_chunks))
        return real(teacher, tokenizer, config, num_chunks, **kwargs)

    real = chat_data.chat_chunks
    monkeypatch.setattr(chat_data, "chat_chunks", spy)
    tokenizer = template_tokenizer(EOS_TEMPLATE)
    prompts = tmp_path / "heal_prompts.json"
    prompts.write_text(json.dumps(["Tell the fox a story", "Why is the dog lazy?"]))
    config = HealConfig(tokens=4 * 4 * 32, seq_len=32, batch_size=4, warmup_ratio=0.0, dataset=str(calib_file),
                        dtype="float32", save_steps=1000, chat_source=str(prompts), chat_temperature=0.0,
                        chat_max_new_tokens=8)
    assert config.chat_fraction == "auto"
    out = tmp_path / "healed"
    heal(tiny_shared_basis_checkpoint, out, teacher=str(tiny_source_dir), tokenizer=tokenizer, config=config,
         device="cpu", progress=False)
    options = json.loads((out / "config.json").read_text())["compression"]["healing"]["options"]
    assert options["chat_fraction"] == AUTO_CHAT_FRACTION and asked == [(0.25, 4)]  # 16 sequences, 4 of them chat
    assert config.chat_fraction == "auto"  # the caller's config is left as it was

    # Both models in memory and no output, as `convert --heal-tokens` heals: the same resolution.
    student = SharedBasisLlamaForCausalLM.from_pretrained(tiny_shared_basis_checkpoint, dtype=torch.float32)
    teacher = AutoModelForCausalLM.from_pretrained(tiny_source_dir)
    heal(student, None, teacher=teacher, tokenizer=tokenizer, device="cpu", progress=False,
         config=HealConfig(**{**config.to_dict(), "tokens": 4 * 32}))
    assert student.config.compression["healing"]["options"]["chat_fraction"] == AUTO_CHAT_FRACTION
    assert asked[1:] == [(0.25, 1)]
