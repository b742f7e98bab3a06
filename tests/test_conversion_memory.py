"""The conversion's memory fixes keep its results: block-by-block assembly with the source released, the stream
advanced in place, Grams symmetrised and whitened with fewer temporaries, compact factors."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from transformers import Qwen2Config, Qwen2ForCausalLM

from conftest import tiny_llama
from hf_compress.basis_sharing.assembly import LayerwiseAssembly, build_shared_basis_llama, shared_basis_config
from hf_compress.basis_sharing.calibration import (
    GRAM_KEY,
    LayerRunner,
    accumulate_gram,
    layer_grams,
    symmetrize,
    symmetrize_,
)
from hf_compress.basis_sharing.compressor import BasisSharingCompressor, _advance, _Whitenings, block_spans
from hf_compress.basis_sharing.config import BasisSharingConfig, CalibrationConfig
from hf_compress.basis_sharing.decomposition import whiten
from hf_compress.basis_sharing.layout import PROJECTIONS, projection
from hf_compress.data.text import calibration_batch, load_texts, resolve_text_source
from hf_compress.modeling.shared_basis_llama import SharedBasisLlamaForCausalLM

pytestmark = pytest.mark.usefixtures("one_thread")
META = torch.device("meta")


def calibration_ids(tokenizer, calib_file, samples=8, seq_len=32):
    return calibration_batch(tokenizer, load_texts(resolve_text_source(str(calib_file))), samples=samples,
                             seq_len=seq_len, seed=2023)


def tiny_qwen2(vocab_size: int, seed: int = 0) -> Qwen2ForCausalLM:
    """A tiny Qwen2 (q/k/v biases, tied embeddings), the layout of the 0.5B model of the memory benchmark."""
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=vocab_size, hidden_size=32, intermediate_size=48,
                                         num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=256, tie_word_embeddings=True)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(torch.logspace(0, -1.5, p.shape[1])[None, :] * 8)
            else:
                p.add_(torch.randn_like(p) * 0.1)  # non-zero biases
    return model


SOURCES = {"llama": lambda vocab: tiny_llama(vocab_size=vocab), "qwen2": tiny_qwen2}


@torch.no_grad()
def reference_build(source, factors):
    """The assembly as it was written before it went block by block: a randomly initialised model, every tensor
    copied in."""
    model = SharedBasisLlamaForCausalLM(shared_basis_config(source.config, factors)).to(source.dtype)
    src, dst = source.model, model.model
    dst.embed_tokens.weight.copy_(src.embed_tokens.weight)
    dst.norm.weight.copy_(src.norm.weight)
    if not model.config.tie_word_embeddings:
        model.lm_head.weight.copy_(source.lm_head.weight)
    for src_layer, dst_layer in zip(src.layers, dst.layers):
        dst_layer.input_layernorm.weight.copy_(src_layer.input_layernorm.weight)
        dst_layer.post_attention_layernorm.weight.copy_(src_layer.post_attention_layernorm.weight)
        for name in PROJECTIONS:
            src_proj, dst_proj = projection(src_layer, name), projection(dst_layer, name)
            if name not in factors:
                dst_proj.weight.copy_(src_proj.weight)
            if dst_proj.bias is not None:
                dst_proj.bias.copy_(src_proj.bias)
    for name, groups in factors.items():
        for group_idx, group in enumerate(groups):
            dst.shared_bases[name][group_idx].weight.copy_(group.basis.T)
            for layer_idx, coefficients in zip(group.layers, group.coefficients):
                projection(dst.layers[layer_idx], name).coefficients.copy_(coefficients.T)
    return model.eval()


def assert_same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert sa[key].dtype == sb[key].dtype and torch.equal(sa[key], sb[key]), key


class RecordingAssembly(LayerwiseAssembly):
    """Notes which source layers still hold memory each time a block arrives."""

    def __init__(self, source, **kwargs):
        super().__init__(source, **kwargs)
        self.blocks, self.alive = [], []

    def add_block(self, span, factors):
        super().add_block(span, factors)
        self.blocks.append(list(span))
        self.alive.append([i for i, layer in enumerate(self.source.model.layers)
                           if all(p.device != META for p in layer.parameters())])


@pytest.mark.parametrize("family,options", [
    ("llama", dict()), ("qwen2", dict()), ("llama", dict(group_size=1, share=("q_proj",))),
    ("qwen2", dict(dense=("o_proj", "k_proj"), share=("q_proj", "v_proj"))), ("llama", dict(sequential=False, layer_fit=False)),
    ("llama", dict(refit=True)), ("llama", dict(group_size=3)),
])
def test_blockwise_assembly_equals_assembling_at_the_end(tokenizer, calib_file, family, options):
    """The default path (factors go into the model block by block, each source layer freed right after) gives the
    same model, tensor for tensor, as compressing first and then copying everything into a fresh model; and each
    source layer is freed exactly when its block is done."""
    config = BasisSharingConfig(ratio=0.4, **options)
    ids = calibration_ids(tokenizer, calib_file)
    source = SOURCES[family](len(tokenizer))
    factors = BasisSharingCompressor(source, config, ids, torch.device("cpu"), progress=False).run()
    expected = reference_build(source, factors)

    released = SOURCES[family](len(tokenizer))
    embedding = released.model.embed_tokens.weight.data_ptr()
    total = sum(p.numel() for p in released.parameters())
    assembly = RecordingAssembly(released, release_source=True)
    compressor = BasisSharingCompressor(released, config, ids, torch.device("cpu"), progress=False, sink=assembly)
    shapes = compressor.run()
    model = assembly.finish()
    assert_same_state(model, expected)
    # Blocks arrive in order; after each, its layers are freed and the later ones are still whole.
    spans = block_spans(compressor.groups, 4)
    assert assembly.blocks == spans
    assert assembly.alive == [list(range(span[-1] + 1, 4)) for span in spans]
    # The whole source is on the meta device afterwards; the embedding was handed over, not copied.
    assert all(t.device == META for t in [*released.parameters(), *released.buffers()])
    assert sum(p.numel() for p in released.parameters()) == total  # shapes and the tied head stay countable
    assert released.lm_head.weight is released.model.embed_tokens.weight
    assert model.model.embed_tokens.weight.data_ptr() == embedding
    assert model.lm_head.weight is model.model.embed_tokens.weight
    # run() returned shapes and ranks only, the same as the factors of the plain run.
    for name, groups in factors.items():
        for full, shape in zip(groups, shapes[name]):
            assert shape.basis.device == META and shape.basis.shape == full.basis.shape and shape.rank == full.rank
            assert [c.shape for c in shape.coefficients] == [c.shape for c in full.coefficients]


def test_assembly_without_release_copies_and_leaves_the_source(tokenizer, calib_file):
    source = tiny_llama(vocab_size=len(tokenizer), tie_word_embeddings=False)
    factors = BasisSharingCompressor(source, BasisSharingConfig(ratio=0.3), calibration_ids(tokenizer, calib_file),
                                     torch.device("cpu"), progress=False).run()
    before = {k: v.clone() for k, v in source.state_dict().items()}
    model = build_shared_basis_llama(source, factors)
    assert_same_state(model, reference_build(source, factors))
    assert all(torch.equal(before[k], v) for k, v in source.state_dict().items())
    assert model.model.embed_tokens.weight.data_ptr() != source.model.embed_tokens.weight.data_ptr()
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    with torch.no_grad():  # both still run
        source(torch.tensor([[1, 2, 3]]))
        model(torch.tensor([[1, 2, 3]]))


def test_factors_returned_without_a_sink_own_their_memory(tokenizer, calib_file):
    """A slice of the full-rank `V^T` would keep all of it alive: every returned tensor is its own storage."""
    source = tiny_llama(vocab_size=len(tokenizer))
    factors = BasisSharingCompressor(source, BasisSharingConfig(ratio=0.3, layer_fit=False),
                                     calibration_ids(tokenizer, calib_file), torch.device("cpu"), progress=False).run()
    tensors = [t for groups in factors.values() for g in groups for t in (g.basis, *g.coefficients)]
    assert all(t.untyped_storage().nbytes() == t.numel() * t.element_size() for t in tensors)


def test_calibration_stream_is_float32_and_advanced_in_place(tokenizer, calib_file):
    model = tiny_llama(vocab_size=len(tokenizer))
    ids = calibration_ids(tokenizer, calib_file, samples=5)
    compressor = BasisSharingCompressor(model, BasisSharingConfig(), ids, torch.device("cpu"), batch_size=2,
                                        progress=False)
    stream = compressor._embeddings()
    assert stream.dtype == torch.float32 and stream.shape == (5, 32, model.config.hidden_size)
    with torch.no_grad():
        torch.testing.assert_close(stream, model.model.embed_tokens(ids), rtol=0, atol=0)
        expected = model(ids, output_hidden_states=True).hidden_states[1]
    # The old way: the outputs written into a second stream.
    second = torch.empty_like(stream)
    for rows, output in compressor.runner.run(model.model.layers[0], stream, 0):
        second[rows] = output
    pointer = stream.data_ptr()
    out = _advance(compressor.runner, model.model.layers[0], stream, 0)
    assert out.data_ptr() == pointer  # no second stream
    assert torch.equal(out, second)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_in_place_symmetrize_and_whiten_give_the_same_values():
    x = torch.randn(900, 600, dtype=torch.float64)
    upper = None
    for rows in (slice(0, 300), slice(300, 900)):
        upper = accumulate_gram(upper, x[rows])
    expected = symmetrize(upper)
    assert torch.equal(symmetrize_(upper.clone()), expected)
    gram = expected.float()
    before = gram.clone()
    whitening = whiten(gram)
    assert torch.equal(gram, before)  # the caller's Gram is not modified
    g64 = gram.double()
    reference = torch.linalg.cholesky(0.5 * (g64 + g64.T)).T
    assert torch.equal(whitening.factor, reference) and whitening.shift == 0.0
    # A rank-deficient Gram still gets its shift.
    low = x[:100].T @ x[:100]
    shifted = whiten(low)
    assert shifted.shift > 0
    torch.testing.assert_close(shifted.factor.T @ shifted.factor, low + shifted.shift * torch.eye(600, dtype=low.dtype))


def test_group_gram_is_the_sum_of_the_members(tokenizer, calib_file):
    model = tiny_llama(vocab_size=len(tokenizer))
    ids = calibration_ids(tokenizer, calib_file, samples=4)
    compressor = BasisSharingCompressor(model, BasisSharingConfig(), ids, torch.device("cpu"), progress=False)
    grams = {l: {"mlp_in": torch.randn(48, 48)} for l in range(3)}
    expected = sum(grams[l]["mlp_in"].double() for l in range(3))
    total = compressor._group_gram("gate_proj", [0, 1, 2], grams)
    assert torch.equal(total, expected) and total.dtype == torch.float64
    assert all(g["mlp_in"].dtype == torch.float32 for g in grams.values())  # members untouched


def test_whitening_factors_are_dropped_after_their_last_user():
    groups = {"q_proj": [[0, 1]], "k_proj": [[0, 1]], "o_proj": [[0], [1]], "down_proj": [[0], [1]]}
    cache = _Whitenings(groups, [0, 1])
    cache[("attn_in", (0, 1))] = "S"
    cache.used("q_proj", [0, 1])
    assert ("attn_in", (0, 1)) in cache  # k_proj still reads it
    cache.used("k_proj", [0, 1])
    assert ("attn_in", (0, 1)) not in cache
    cache[("down_in", (0,))] = "S"
    cache.used("down_proj", [0])
    assert not cache


def test_layer_grams_are_symmetric_and_match_the_inputs(tokenizer, calib_file):
    model = tiny_llama(vocab_size=len(tokenizer))
    ids = calibration_ids(tokenizer, calib_file, samples=4)
    runner = LayerRunner(model, ids.shape[1], torch.device("cpu"), batch_size=3)
    with torch.no_grad():
        hidden = model.model.embed_tokens(ids)
    grams, _ = layer_grams(runner, model.model.layers[0], hidden, 0, ("attn_in", "mlp_in"))
    normed = model.model.layers[0].input_layernorm(hidden).reshape(-1, hidden.shape[-1]).detach()
    assert torch.equal(grams["attn_in"], grams["attn_in"].T)
    torch.testing.assert_close(grams["attn_in"], normed.T @ normed, atol=1e-3, rtol=1e-4)
    assert set(GRAM_KEY[n] for n in ("q_proj", "gate_proj")) == set(grams)


def test_convert_matches_the_compress_then_assemble_pipeline(tiny_source_dir, calib_file, tmp_path, tokenizer):
    """`convert` (source perplexity first, blockwise assembly releasing the source) saves the same weights and reports
    the same perplexities as compressing, assembling a copy at the end and measuring both models."""
    from hf_compress.basis_sharing.api import convert
    from hf_compress.evaluation.perplexity import perplexity
    from hf_compress.sources import load_source

    calibration = CalibrationConfig(dataset=str(calib_file), samples=8, seq_len=32)
    out = tmp_path / "out"
    result = convert(str(tiny_source_dir), out, BasisSharingConfig(ratio=0.3), calibration=calibration,
                     eval_dataset=str(calib_file), eval_seq_len=64, eval_max_windows=3, progress=False, device="cpu")
    assert {"load", "evaluation", "calibration_and_decomposition", "assembly", "save"} <= set(result.memory_mb)

    source, tok, _ = load_source(str(tiny_source_dir))
    texts = load_texts(resolve_text_source(str(calib_file)))
    ids = calibration_batch(tok, texts, samples=8, seq_len=32, seed=2023)
    calib_dtype = getattr(torch, calibration.resolve("cpu").dtype)
    factors = BasisSharingCompressor(source, BasisSharingConfig(ratio=0.3), ids, torch.device("cpu"), progress=False,
                                     dtype=calib_dtype).run()
    expected = reference_build(source, factors)
    saved = load_file(out / "model.safetensors")
    state = expected.state_dict()
    assert saved.keys() <= state.keys()
    for key, tensor in saved.items():
        assert torch.equal(tensor, state[key].to(tensor.dtype)), key
    assert result.ranks == {name: [g.rank for g in groups] for name, groups in factors.items()}
    before = perplexity(source, tok, texts, seq_len=64, max_windows=3, progress=False)
    after = perplexity(expected, tok, texts, seq_len=64, max_windows=3, progress=False)
    assert result.perplexity_before == before and result.perplexity_after == pytest.approx(after, rel=1e-6)
