"""The GPU speed benchmark's building blocks, at toy scale on the CPU (same code path as the 7B run)."""

from __future__ import annotations

import importlib.util
import math
from types import SimpleNamespace

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from conftest import REPO

spec = importlib.util.spec_from_file_location("bench_llm_speed", REPO / "benchmarks" / "bench_llm_speed.py")
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)

TOY = LlamaConfig(hidden_size=64, intermediate_size=176, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=4, vocab_size=128, max_position_embeddings=128, tie_word_embeddings=False)


def test_benchmark_config_meets_budget_with_rank_multiples():
    config = bench.shared_basis_config(TOY, 0.5, multiple=16)
    dense = compressed = 0
    for name, groups in config.basis_groups.items():
        d_in, d_out = config.projection_shape(name)
        for group, rank in zip(groups, config.basis_ranks[name]):
            assert rank % 16 == 0
            dense += len(group) * d_in * d_out
            compressed += rank * (d_in + len(group) * d_out)
    assert compressed <= math.floor(0.5 * dense)
    assert 1 - compressed / dense < 0.5 + 0.1  # rank multiples of 16 on 64-wide matrices: coarse, but close


def test_conversion_timing_runs_the_converter_path():
    torch.manual_seed(0)
    dense = LlamaForCausalLM(TOY).eval()
    args = SimpleNamespace(calib_samples=4, calib_seq_len=32, rank_multiple=16, sequential=True, calib_dtype="float32")
    row = bench.time_conversion(dense, TOY, 0.3, args, torch.device("cpu"))
    assert row["conversion_s"] > 0 and row["sequential"] is True and row["calib_dtype"] == "float32"
    assert all(r % 16 == 0 for ranks in row["ranks"].values() for r in ranks)
    assert set(row["ranks"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
