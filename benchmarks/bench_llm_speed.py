"""Speed and memory of SharedBasisLlama against the dense model ("LLM speed" protocol of ../shared/BENCHMARKS.md).

LLaMA-7B shape (32 layers, hidden 4096, intermediate 11008, 32 heads, vocab 32000), bf16, random weights, on a GPU:
prefill (batch 512 x 32 tokens, no cache, median of 10 timed forwards after 3 warm-ups), decode (batch 1 and 64,
prompt 128, 128 new greedy tokens with the KV cache), weight memory, and the conversion of the 7B shape with 256
random calibration samples of 2048 tokens (wall time, peak GPU memory). Dense and compressed run in the same process.

The same script runs at toy scale on a CPU (`--shape tiny --device cpu`) to check it end to end.

    python benchmarks/bench_llm_speed.py --shape llama7b --device cuda --ratios 0.2 0.3 0.4 0.5 --convert
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from hf_compress.modeling.shared_basis_llama import (
    SharedBasisLlamaConfig,
    SharedBasisLlamaForCausalLM,
)
from transformers import LlamaConfig, LlamaForCausalLM

from hf_compress.basis_sharing.compressor import BasisSharingCompressor
from hf_compress.basis_sharing.config import BasisSharingConfig
from hf_compress.basis_sharing.decomposition import allocate_ranks, shape_spectrum
from hf_compress.device import CALIBRATION_DTYPES, calibration_dtype, dtype_name

RESULTS = Path(__file__).resolve().parent / "results"
SHAPES = {
    "llama7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                    num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096),
    "tiny": dict(hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=4, vocab_size=1000, max_position_embeddings=512),
}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def shared_basis_config(base: LlamaConfig, ratio: float, multiple: int) -> SharedBasisLlamaConfig:
    """Uniform ranks (groups of 2 for q/k/v/gate/up, per layer for o/down), rounded to `multiple` within budget."""
    options = BasisSharingConfig(ratio=ratio)
    groups = options.groups(base.num_hidden_layers)
    spectra, owners = [], []
    for name, type_groups in groups.items():
        d_in, d_out = SharedBasisLlamaConfig(**base.to_dict()).projection_shape(name)
        for idx, group in enumerate(type_groups):
            spec = shape_spectrum(name, group, d_in, d_out)
            spectra.append(spec)
            owners.append((name, idx))
    # Shape-only spectra: uniform ranks, then chunks of `multiple` spread evenly to meet the budget.
    ranks = allocate_ranks(spectra, ratio, multiple=multiple)
    basis_ranks = {name: [0] * len(g) for name, g in groups.items()}
    for (name, idx), rank in zip(owners, ranks):
        basis_ranks[name][idx] = rank
    return SharedBasisLlamaConfig(basis_groups=groups, basis_ranks=basis_ranks, **base.to_dict())


@torch.no_grad()
def time_prefill(model, batch: int, length: int, vocab: int, device, warmup: int = 3, repeats: int = 10) -> float:
    ids = torch.randint(0, vocab, (batch, length), device=device)
    for _ in range(warmup):
        model(ids, use_cache=False, logits_to_keep=1)
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        model(ids, use_cache=False, logits_to_keep=1)
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@torch.no_grad()
def time_decode(model, batch: int, prompt: int, new_tokens: int, vocab: int, device) -> float:
    ids = torch.randint(0, vocab, (batch, prompt), device=device)
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    model.generate(ids, **{**kwargs, "max_new_tokens": 4, "min_new_tokens": 4})  # warm-up
    sync(device)
    start = time.perf_counter()
    model.generate(ids, **kwargs)
    sync(device)
    return batch * new_tokens / (time.perf_counter() - start)


def weight_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def measure(model, args, device, vocab) -> dict:
    row = {"weight_gb": weight_bytes(model) / 2**30}
    row["prefill_s"] = time_prefill(model, args.prefill_batch, args.prefill_len, vocab, device)
    for batch in args.decode_batches:
        row[f"decode_tok_s_b{batch}"] = time_decode(model, batch, args.prompt, args.new_tokens, vocab, device)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=list(SHAPES), default="llama7b")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.2, 0.3, 0.4, 0.5])
    parser.add_argument("--rank-multiple", type=int, default=128)
    parser.add_argument("--prefill-batch", type=int, default=512)
    parser.add_argument("--prefill-len", type=int, default=32)
    parser.add_argument("--decode-batches", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--convert", action="store_true", help="also time the conversion of the dense model")
    parser.add_argument("--calib-samples", type=int, default=256)
    parser.add_argument("--calib-seq-len", type=int, default=2048)
    parser.add_argument("--no-sequential", dest="sequential", action="store_false",
                        help="time the one-pass calibration on the dense model instead of the default sequential one")
    parser.add_argument("--calib-dtype", default="auto", choices=CALIBRATION_DTYPES,
                        help="dtype of the calibration forwards (auto: bfloat16 where the device has it natively)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    base = LlamaConfig(**SHAPES[args.shape], tie_word_embeddings=False)
    out = Path(args.out) if args.out else RESULTS / f"llm_speed_{args.shape}_{device.type}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    results = {"shape": args.shape, "device": str(device), "dtype": args.dtype, "args": vars(args), "rows": []}

    torch.manual_seed(0)
    with torch.device(device):
        dense = LlamaForCausalLM(base).to(dtype).eval()
    dense_row = {"model": "dense", **measure(dense, args, device, base.vocab_size)}
    results["rows"].append(dense_row)
    print(json.dumps(dense_row), flush=True)

    if args.convert:
        for ratio in args.ratios:
            results.setdefault("conversion", []).append(time_conversion(dense, base, ratio, args, device))
            print(json.dumps(results["conversion"][-1]), flush=True)
    dense.cpu()
    del dense
    if device.type == "cuda":
        torch.cuda.empty_cache()

    for ratio in args.ratios:
        config = shared_basis_config(base, ratio, args.rank_multiple)
        with torch.device(device):
            model = SharedBasisLlamaForCausalLM(config).to(dtype).eval()
        for variant in ("plain", "fused", "fused+break-even"):
            if variant == "fused":
                model.fuse_bases()
            report = model.densify_above_break_even() if variant == "fused+break-even" else None
            row = {"model": f"shared-basis {ratio:.0%} {variant}", "ratio": ratio, **measure(model, args, device, base.vocab_size)}
            if report is not None:
                row["densified"] = len(report["densified"])
                row["break_even_added_gb"] = report["added_bytes"] / 2**30
            for key in ("prefill_s",):
                row["prefill_speedup"] = dense_row[key] / row[key]
            for batch in args.decode_batches:
                row[f"decode_speedup_b{batch}"] = row[f"decode_tok_s_b{batch}"] / dense_row[f"decode_tok_s_b{batch}"]
            results["rows"].append(row)
            print(json.dumps(row), flush=True)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    out.write_text(json.dumps(results, indent=2))


def time_conversion(dense, base, ratio, args, device) -> dict:
    """Layer-by-layer conversion of the dense model with random calibration tokens: wall time and peak memory."""
    ids = torch.randint(0, base.vocab_size, (args.calib_samples, args.calib_seq_len))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    options = BasisSharingConfig(ratio=ratio, rank_multiple=args.rank_multiple, sequential=args.sequential)
    dtype = calibration_dtype(args.calib_dtype, device)
    compressor = BasisSharingCompressor(dense, options, ids, device, batch_size=8, progress=True, dtype=dtype)
    factors = compressor.run()
    sync(device)
    row = {"ratio": ratio, "sequential": args.sequential, "calib_dtype": dtype_name(dtype),
           "conversion_s": time.perf_counter() - start,
           "ranks": {name: sorted(set(f.rank for f in groups)) for name, groups in factors.items()}}
    if device.type == "cuda":
        row["peak_gpu_gb"] = torch.cuda.max_memory_allocated() / 2**30
    return row


if __name__ == "__main__":
    main()
