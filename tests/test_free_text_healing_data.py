"""Plain text the teacher writes freely, mixed into the healing data (`chat_data.free_text_chunks`,
`HealConfig.free_text_fraction`)."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import make_tokenizer
from test_chat import chat_model, chat_tokenizer
from test_chat_healing_data import mixed_config, token_rows

from hf_compress.data.text import tokenize_joined
from hf_compress.errors import HFCompressError
from hf_compress.healing import HealConfig
from hf_compress.healing.chat_data import chat_chunks, document_start_id, free_text_chunks, free_texts
from hf_compress.healing.data import free_text_sequences, load_healing_data, recorded_options
from hf_compress.provenance import DataRef

pytestmark = pytest.mark.usefixtures("one_thread")


def greedy_document(model, start: int, stop: int, max_new_tokens: int) -> list[int]:
    """`start`, then greedy tokens one at a time over the whole sequence (no cache, no batch) until `stop`."""
    ids = [start]
    for _ in range(max_new_tokens):
        with torch.no_grad():
            token = int(model(torch.tensor([ids])).logits[0, -1].argmax())
        if token == stop:
            break
        ids.append(token)
    return ids


def test_document_start_is_bos_else_eos():
    tokenizer = chat_tokenizer()
    assert document_start_id(tokenizer) == tokenizer.bos_token_id == 0
    no_bos = make_tokenizer()
    no_bos.bos_token = None
    no_bos.eos_token = "<|endoftext|>"
    assert document_start_id(no_bos) == no_bos.eos_token_id == 0
    no_bos.eos_token = None
    with pytest.raises(HFCompressError, match="neither a BOS nor an EOS") as info:
        document_start_id(no_bos)
    assert "\n" not in str(info.value)


def test_free_texts_are_the_teachers_continuations_of_the_document_start():
    """Near temperature 0 sampling is greedy decoding: each document is the start token and the teacher's greedy
    continuation of it, ended by the next document start (the tokenizer's EOS is its BOS) or the token limit."""
    tokenizer = chat_tokenizer()
    teacher = chat_model(tokenizer, ends_after=None)
    documents = free_texts(teacher, tokenizer, 3, max_new_tokens=12, temperature=1e-6, batch_size=2)
    assert documents == [greedy_document(teacher, 0, 0, 12)] * 3
    assert len(documents[0]) > 1  # the teacher wrote something


def test_free_texts_are_seeded_and_leave_the_global_random_state_alone():
    tokenizer = chat_tokenizer()
    teacher = chat_model(tokenizer, ends_after=None)
    state = torch.get_rng_state()
    sample = lambda seed: free_texts(teacher, tokenizer, 5, max_new_tokens=10, temperature=1.0, seed=seed,
                                     batch_size=2)
    documents = sample(3)
    assert torch.equal(torch.get_rng_state(), state)
    assert documents == sample(3) and documents != sample(4)
    assert len({tuple(d) for d in documents}) == len(documents) and all(d[0] == 0 for d in documents)
    assert all(0 not in d[1:] for d in documents)  # a document ends where the next one would start
    with pytest.raises(HFCompressError, match="temperature > 0"):
        free_texts(teacher, tokenizer, 2, max_new_tokens=4, temperature=0.0)


def test_free_text_chunks_pack_the_documents_back_to_back_and_repeat_them(calib_file):
    tokenizer = chat_tokenizer()
    teacher = chat_model(tokenizer, ends_after=None)
    config = mixed_config(calib_file, chat_temperature=1e-6, seq_len=16)
    chunks = free_text_chunks(teacher, tokenizer, config, 5, progress=False)
    document = greedy_document(teacher, 0, 0, 16)
    assert len(document) < 16 * 5  # several documents to a chunk
    stream = (document * math.ceil(80 / len(document)))[:80]
    assert torch.equal(chunks, torch.tensor(stream).view(5, 16))


def test_mixed_data_has_the_requested_shares_of_chat_free_text_and_dataset_text(calib_file):
    tokenizer = chat_tokenizer()
    teacher = chat_model(tokenizer, ends_after=None)
    config = mixed_config(calib_file, chat_fraction=0.3, free_text_fraction=0.2)
    config.validate()
    assert free_text_sequences(config) == round(0.2 * 40) == 8
    data, _ = load_healing_data(tokenizer, config, teacher, progress=False)
    assert data.written_chunks == 12 + 8

    rows = token_rows(torch.cat([data.batch(step) for step in range(data.steps)]))
    text_ids = tokenize_joined(tokenizer, calib_file.read_text().split("\n"))
    text_rows = set(token_rows(text_ids[: text_ids.numel() // 16 * 16].view(-1, 16)))
    chat_rows = set(token_rows(chat_chunks(teacher, tokenizer, config, 12, progress=False)))
    free_rows = token_rows(free_text_chunks(teacher, tokenizer, config, 8, progress=False))
    assert len(rows) == 40 and not (set(free_rows) & (chat_rows | text_rows))
    assert sorted(row for row in rows if row in set(free_rows)) == sorted(free_rows)  # each free chunk once
    assert sum(row in chat_rows for row in rows) == 12
    assert sum(row in text_rows for row in rows) == 40 - 12 - 8
    assert recorded_options(config.resolve("cpu"), DataRef.of("healing", str(calib_file)))["free_text_fraction"] == 0.2

    # Free text alone, for a teacher without a chat template.
    plain = mixed_config(calib_file, chat_fraction=0.0, free_text_fraction=0.25)
    data, _ = load_healing_data(tokenizer, plain, teacher, progress=False)
    assert data.written_chunks == 10 and data.chunks.shape[0] - 10 == text_ids.numel() // 16
    with pytest.raises(HFCompressError, match="--free-text-fraction > 0 needs the teacher"):
        load_healing_data(tokenizer, plain, None, progress=False)


@pytest.mark.parametrize("options, match", [
    ({"free_text_fraction": 1.0}, "--free-text-fraction must be a number in \\[0, 1\\)"),
    ({"free_text_fraction": -0.1}, "--free-text-fraction must be a number in \\[0, 1\\)"),
    ({"free_text_fraction": 0.5, "chat_fraction": 0.5}, "their sum must be < 1"),
    ({"free_text_fraction": 0.2, "chat_fraction": 0.0, "chat_temperature": 0.0}, "--chat-temperature must be > 0"),
])
def test_bad_free_text_options_are_refused_in_one_line(options, match):
    with pytest.raises(HFCompressError, match=match) as info:
        HealConfig(**options).validate()
    assert "\n" not in str(info.value)


def test_auto_chat_share_and_free_text_are_checked_together_when_resolved():
    config = HealConfig(free_text_fraction=0.8)
    config.validate()  # "auto" may be 0 (no chat template): nothing to refuse yet
    assert config.resolve("cpu", chat_template=False).free_text_fraction == 0.8
    with pytest.raises(HFCompressError, match="--chat-fraction 0.25 and --free-text-fraction 0.8"):
        config.resolve("cpu", chat_template=True)
