"""The real model: SmolLM2-135M-Instruct from its GGUF file, compressed by 20% on a little real C4 text."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import DATA
from hf_compress.basis_sharing.assembly import build_shared_basis_llama
from hf_compress.basis_sharing.compressor import BasisSharingCompressor
from hf_compress.basis_sharing.config import BasisSharingConfig
from hf_compress.evaluation.perplexity import window_losses
from hf_compress.sources import load_source
from hf_compress.data.text import calibration_batch, load_texts, resolve_text_source, tokenize_joined

pytestmark = pytest.mark.slow

C4 = DATA / "c4" / "calibration-00000-of-00001.parquet"
WIKITEXT = DATA / "wikitext-2-raw-v1" / "test-00000-of-00001.parquet"


@pytest.fixture(scope="module")
def smollm2():
    pytest.importorskip("gguf")
    return load_source("smollm2")


def test_smollm2_loads_with_the_expected_layout(smollm2):
    model, tokenizer, info = smollm2
    config = model.config
    assert (config.model_type, config.num_hidden_layers, config.num_key_value_heads) == ("llama", 30, 3)
    assert config.tie_word_embeddings and info.gguf_file == "SmolLM2-135M-Instruct.Q4_1.gguf"


def test_twenty_percent_keeps_perplexity_sane(smollm2):
    model, tokenizer, _ = smollm2
    assert C4.is_file() and WIKITEXT.is_file(), f"benchmark data missing under {DATA}"
    calib = calibration_batch(tokenizer, load_texts(resolve_text_source(str(C4))), samples=8, seq_len=256, seed=2023)
    eval_ids = tokenize_joined(tokenizer, load_texts(resolve_text_source(str(WIKITEXT))))
    compressor = BasisSharingCompressor(model, BasisSharingConfig(ratio=0.2), calib, torch.device("cpu"), progress=False)
    compressed = build_shared_basis_llama(model, compressor.run())
    dense_ppl = math.exp(sum(window_losses(model, eval_ids, seq_len=512, max_windows=2, progress=False)) / 2)
    comp_ppl = math.exp(sum(window_losses(compressed, eval_ids, seq_len=512, max_windows=2, progress=False)) / 2)
    assert 5 < dense_ppl < 60  # a 135M instruct model on WikiText-2
    # Compression costs something but stays within a sane factor (whitened SVD at 20% is about 6x on this model).
    assert dense_ppl < comp_ppl < 20 * dense_ppl
    params = sum(p.numel() for n, p in compressed.named_parameters() if "shared_bases" in n or "coefficients" in n)
    dense_params = sum(p.numel() for layer in model.model.layers for n, p in layer.named_parameters() if "proj" in n)
    assert abs((1 - params / dense_params) - 0.2) < 0.005
