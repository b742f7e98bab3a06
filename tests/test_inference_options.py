"""Load-time inference options of SharedBasisLlama: fused bases and densifying past break-even."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import tiny_llama
from hf_compress.basis_sharing.assembly import build_shared_basis_llama
from hf_compress.basis_sharing.decomposition import factors_at_rank, spectrum
from hf_compress.modeling.shared_basis_llama import SharedBasisLinear
from test_shared_basis_llama import IDS, full_rank_factors, logits


def truncated(source, rank_of):
    factors = full_rank_factors(source)
    return {name: [factors_at_rank(spectrum(name, g.layers, [g.basis @ c for c in g.coefficients], None),
                                   min(rank_of(name), g.basis.shape[0], len(g.layers) * g.coefficients[0].shape[1]))
                   for g in groups] for name, groups in factors.items()}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    source = tiny_llama()
    # q/k/v ranks above break-even (d_in d_out / (d_in + d_out) = 32*32/64 = 16 for q); the others below it.
    model = build_shared_basis_llama(source, truncated(source, lambda name: 20 if name in ("q_proj", "k_proj", "v_proj") else 6))
    path = tmp_path_factory.mktemp("opts")
    model.save_pretrained(path)
    return model, path


def test_fused_bases_match_unfused_logits(checkpoint):
    model, path = checkpoint
    fused = AutoModelForCausalLM.from_pretrained(path, fuse_bases=True)
    q = fused.model.layers[0].self_attn.q_proj
    assert isinstance(q, SharedBasisLinear) and q.fused_input is not None
    # One fused tensor per group, and the individual bases are views into it (no extra memory).
    buffer = fused.model.shared_bases.fused_q_k_v_0
    assert buffer.shape[0] == sum(fused.model.shared_bases[n][0].out_features for n in ("q_proj", "k_proj", "v_proj"))
    assert fused.model.shared_bases["k_proj"][0].weight.data_ptr() > buffer.data_ptr()
    assert fused.model.layers[3].mlp.up_proj.fused_input is not None
    torch.testing.assert_close(logits(fused, IDS), logits(model, IDS), atol=1e-5, rtol=1e-5)
    generated = fused.generate(IDS[:1, :4], max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(generated, model.generate(IDS[:1, :4], max_new_tokens=6, do_sample=False, pad_token_id=0))
    with pytest.raises(ValueError, match="changed for inference at load time"):
        fused.save_pretrained(path / "nope")


def test_densify_above_break_even_same_logits_and_reports_memory(checkpoint):
    model, path = checkpoint
    dense = AutoModelForCausalLM.from_pretrained(path)
    report = dense.densify_above_break_even()
    # q (32->32, k=20 > 16) and k/v (32->16, k=20 > 10.7) are past break-even in every layer; nothing else is.
    assert sorted(report["densified"]) == sorted(f"layers.{i}.{n}" for i in range(4) for n in ("q_proj", "k_proj", "v_proj"))
    assert isinstance(dense.model.layers[2].self_attn.k_proj, torch.nn.Linear)
    assert isinstance(dense.model.layers[2].mlp.gate_proj, SharedBasisLinear)
    # Per layer: the dense weight minus the coefficients it replaces, float32, 4 layers.
    expected = 4 * 4 * ((32 * 32 - 32 * 20) + 2 * (16 * 32 - 16 * 20))
    assert report["added_bytes"] == expected
    torch.testing.assert_close(logits(dense, IDS), logits(model, IDS), atol=1e-5, rtol=1e-5)
    # The load-time flag does the same.
    flagged = AutoModelForCausalLM.from_pretrained(path, densify_above_break_even=True, fuse_bases=True)
    assert isinstance(flagged.model.layers[0].self_attn.q_proj, torch.nn.Linear)
    torch.testing.assert_close(logits(flagged, IDS), logits(model, IDS), atol=1e-5, rtol=1e-5)
