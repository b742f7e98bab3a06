"""GGUF sources: a tiny Llama written with the `gguf` package loads back exactly, and the converter accepts it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import TINY_TEXT, make_tokenizer, tiny_llama
from hf_compress.basis_sharing.assembly import build_shared_basis_llama
from hf_compress.basis_sharing.config import BasisSharingConfig, CalibrationConfig
from hf_compress.basis_sharing.api import convert
from hf_compress.sources import load_source
from test_shared_basis_llama import full_rank_factors

gguf = pytest.importorskip("gguf")

GGUF_NAME = "tiny-llama-f32.gguf"
TOKEN_NORMAL, TOKEN_CONTROL = 1, 3  # llama.cpp's token types
SENTENCE = "The quick brown fox keeps the most useful directions; a shared basis serves two layers."


def llama_cpp_permute(weight: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k row order (rotary pairs interleaved per head); transformers' GGUF loader undoes exactly this."""
    rows = weight.shape[0]
    return weight.reshape(n_head, 2, rows // n_head // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def write_llama_gguf(model, tokenizer, path: Path) -> None:
    """Writes `model` (a LlamaForCausalLM) and its byte-level BPE `tokenizer` as a float32 GGUF, as llama.cpp would."""
    config = model.config
    head_dim = config.hidden_size // config.num_attention_heads
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-llama")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(config.rope_parameters["rope_theta"]))
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)

    vocab = tokenizer.get_vocab()
    tokens = sorted(vocab, key=vocab.get)
    assert [vocab[t] for t in tokens] == list(range(len(tokens))), "token ids must be contiguous"
    special = set(tokenizer.all_special_tokens)
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    assert merges, "transformers rebuilds a gpt2-type GGUF vocabulary only from its merges"
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([TOKEN_CONTROL if t in special else TOKEN_NORMAL for t in tokens])
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_add_bos_token(False)

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight" and config.tie_word_embeddings:
            continue  # llama.cpp writes no `output.weight` for tied embeddings; loaders read that as tied
        stem, suffix = hf_name.rsplit(".", 1)
        gguf_name = names.get_name(stem)
        assert gguf_name is not None, f"no GGUF name for {hf_name}"
        array = tensor.detach().to(torch.float32).numpy().copy()
        if stem.endswith("self_attn.q_proj"):
            array = llama_cpp_permute(array, config.num_attention_heads)
        elif stem.endswith("self_attn.k_proj"):
            array = llama_cpp_permute(array, config.num_key_value_heads)
        writer.add_tensor(f"{gguf_name}.{suffix}", array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    """`(original model, original tokenizer, path of the GGUF written from them)`."""
    tokenizer = make_tokenizer(vocab_size=300)  # beyond the 257 byte-level symbols, so the file carries merges
    model = tiny_llama(vocab_size=len(tokenizer), num_hidden_layers=2)
    path = tmp_path_factory.mktemp("gguf") / GGUF_NAME
    write_llama_gguf(model, tokenizer, path)
    return model, tokenizer, path


@pytest.fixture(scope="module")
def ids(tiny_gguf) -> torch.Tensor:
    _, tokenizer, _ = tiny_gguf
    return torch.tensor([tokenizer(TINY_TEXT[0] + " " + TINY_TEXT[1])["input_ids"][:24]])


def test_permutation_is_the_inverse_of_the_loaders():
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    weight = np.arange(16 * 3, dtype=np.float32).reshape(16, 3)
    processor = LlamaTensorProcessor({"num_attention_heads": 4, "num_key_value_heads": 2})
    for name, n_head in (("blk.0.attn_q.weight", 4), ("blk.0.attn_k.weight", 2)):
        permuted = llama_cpp_permute(weight, n_head)
        assert not np.array_equal(permuted, weight)
        np.testing.assert_array_equal(processor.process(permuted, name).weights, weight)


def test_gguf_round_trip_reproduces_the_model_and_tokenizer(tiny_gguf, ids):
    model, tokenizer, path = tiny_gguf
    loaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    config = loaded.config
    shape = (config.model_type, config.num_hidden_layers, config.hidden_size, config.intermediate_size)
    assert shape == ("llama", 2, 32, 48)
    assert (config.num_attention_heads, config.num_key_value_heads, config.vocab_size) == (4, 2, len(tokenizer))
    assert config.tie_word_embeddings
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], tensor, atol=0, rtol=0, msg=f"{name} differs")
    torch.testing.assert_close(logits(loaded, ids), logits(model, ids), atol=1e-5, rtol=1e-5)

    gguf_tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    expected = tokenizer(SENTENCE)["input_ids"]
    assert len(expected) < len(SENTENCE)  # merges are used, not just bytes
    assert gguf_tokenizer(SENTENCE)["input_ids"] == expected
    assert gguf_tokenizer.decode(expected) == SENTENCE
    assert gguf_tokenizer.eos_token == tokenizer.eos_token == "<|endoftext|>"
    assert gguf_tokenizer("<|endoftext|>")["input_ids"] == [tokenizer.eos_token_id]


def test_full_rank_shared_basis_from_gguf_source_is_exact(tiny_gguf, ids):
    import gguf

    model, _, path = tiny_gguf
    name_map = gguf.get_tensor_name_map
    source, _, info = load_source(str(path))
    assert gguf.get_tensor_name_map is name_map  # the name maps are memoised only while the model loads
    assert info.gguf_file == GGUF_NAME and info.model_id == str(path)
    compressed = build_shared_basis_llama(source, full_rank_factors(source))
    torch.testing.assert_close(logits(compressed, ids), logits(source, ids), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits(compressed, ids), logits(model, ids), atol=1e-5, rtol=1e-5)


def test_convert_from_gguf_matches_convert_from_safetensors(tiny_gguf, ids, tmp_path, calib_file):
    model, tokenizer, path = tiny_gguf
    hf_source = tmp_path / "hf-source"
    model.save_pretrained(hf_source)
    tokenizer.save_pretrained(hf_source)
    config = BasisSharingConfig(ratio=0.3)
    calibration = CalibrationConfig(dataset=str(calib_file), samples=4, seq_len=32)

    from_gguf = convert(str(path), tmp_path / "from-gguf", config, calibration=calibration, progress=False)
    from_hf = convert(str(hf_source), tmp_path / "from-hf", config, calibration=calibration, progress=False)
    assert from_gguf.ranks == from_hf.ranks
    assert from_gguf.params_after == from_hf.params_after < from_gguf.params_before

    compressed = AutoModelForCausalLM.from_pretrained(tmp_path / "from-gguf").eval()
    reference = AutoModelForCausalLM.from_pretrained(tmp_path / "from-hf").eval()
    assert type(compressed).__name__ == "SharedBasisLlamaForCausalLM"
    source = compressed.config.compression["source"]
    assert source["gguf_file"] == GGUF_NAME and source["model_id"] == path.name  # a file name, never a local path
    assert reference.config.compression["source"]["gguf_file"] is None
    out = logits(compressed, ids)
    assert torch.isfinite(out).all()
    # Same weights, same tokenizer, same calibration text: the GGUF path must give the same compressed model.
    torch.testing.assert_close(out, logits(reference, ids), atol=1e-5, rtol=1e-5)
    # ...and a compressed one: 30% of the projections removed changes the logits.
    assert (out - logits(model, ids)).abs().max() > 1e-3
    saved_tokenizer = AutoTokenizer.from_pretrained(tmp_path / "from-gguf")
    assert saved_tokenizer(SENTENCE)["input_ids"] == tokenizer(SENTENCE)["input_ids"]
