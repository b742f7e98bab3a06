"""Perplexity windows: the chunked head gives the loss of the whole logits."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_llama
from transformers import AutoModelForCausalLM

from hf_compress.evaluation.perplexity import window_loss, window_losses


def full_logits_loss(model, ids: torch.Tensor) -> float:
    with torch.no_grad():
        logits = model(ids, use_cache=False).logits.double()
    return F.cross_entropy(logits[0, :-1], ids[0, 1:]).item()


@pytest.mark.parametrize("chunk", [1, 7, 256])
def test_chunked_window_loss_equals_full_logits(chunk, tiny_shared_basis_checkpoint):
    torch.manual_seed(0)
    dense = tiny_llama().eval()
    compressed = AutoModelForCausalLM.from_pretrained(tiny_shared_basis_checkpoint, dtype=torch.float32).eval()
    for model in (dense, compressed):
        ids = torch.randint(0, model.config.vocab_size, (1, 40))
        with torch.no_grad():
            value = window_loss(model, ids, logit_chunk=chunk)
        assert value == pytest.approx(full_logits_loss(model, ids), rel=1e-5)


def test_window_losses_cover_full_windows_only():
    model = tiny_llama().eval()
    ids = torch.randint(0, model.config.vocab_size, (100,))
    losses = window_losses(model, ids, seq_len=32, progress=False)
    assert len(losses) == 3  # the last 4 tokens are a partial window
    assert losses[1] == pytest.approx(full_logits_loss(model, ids[32:64].unsqueeze(0)), rel=1e-5)


def test_nested_peak_memory_sees_the_inner_peaks():
    """An inner block resets the kernel's high-water mark; the outer block still reports the larger peak."""
    import numpy as np

    from hf_compress.device import MemoryPhases, PeakMemory

    phases = MemoryPhases()
    with PeakMemory() as outer:
        with phases("big"):
            block = np.ones(200 * 2**20 // 8)  # 200 MiB, touched
            block.sum()
            del block
        with phases("small"):
            pass
    assert phases.peaks_mb["big"] >= phases.peaks_mb["small"] + 150
    assert outer.peak_mb >= phases.peaks_mb["big"] - 1
    assert phases.peak_mb == phases.peaks_mb["big"]
