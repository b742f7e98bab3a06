"""Protocol "cifar-cpu" of BENCHMARKS.md: trained full-width CIFAR ResNet-20 baselines on the CPU.

45,000 train / 5,000 validation (held out with seed 2023) / 10,000 test images, decoded once into memory and
augmented batched (random crop 32 with padding 4, horizontal flip); bfloat16 autocast where the CPU multiplies
bfloat16 natively (AVX512-BF16 or AMX; elsewhere it is emulated and about 10x slower than float32, so float32 is
used and recorded), channels_last; SGD with
Nesterov momentum 0.9, weight decay 5e-4, one epoch of linear warm-up then cosine to zero; 40 epochs; seeds 2023
and 2024. Every run resumes per epoch from its state under --work-dir, so the script may be stopped and started
again; finished baselines are saved as PrunedCNN checkpoints under `benchmarks/results/cnn_cpu/`, where the
pruning and early-exit stages start from them.

    python benchmarks/bench_cnn_cpu.py baseline --seed 2023 --seed 2024

Writes `benchmarks/results/cnn_cpu_baseline.json` (one row per seed) and updates the `baseline_test_acc` entries of
`benchmarks/results/cnn_cpu_summary.json`.

The later stages start from these baselines; each is a module of its own, dispatched from here with its options:

    python benchmarks/bench_cnn_cpu.py prune --seed 2023 --seed 2024   # cnn_cpu_prune.py: class-aware pruning
    python benchmarks/bench_cnn_cpu.py exits --seed 2023 --seed 2024   # cnn_cpu_exits.py: early exit
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import cnn_cpu_exits
import cnn_cpu_prune
import torch
from bench_common import RESULTS, add_cifar_cpu_arguments, device_note
from hf_compress.modeling.pruned_cnn import (
    PrunedCNNForImageClassification,
    resnet_cifar_config,
)

from hf_compress import __version__
from hf_compress.checkpoint import atomic_write_json
from hf_compress.data.images import load_image_dataset, train_val_split
from hf_compress.device import native_bfloat16
from hf_compress.vision.checkpoint import save_checkpoint
from hf_compress.vision.counting import count_params_and_macs
from hf_compress.vision.training import evaluate_accuracy, train_classifier

CHECKPOINTS = RESULTS / "cnn_cpu"
PROTOCOL = {
    "name": "cifar-cpu", "arch": "resnet20", "widths": [16, 32, 64], "val_images": 5000, "split_seed": 2023,
    "epochs": 40, "lr": 0.1, "batch_size": 128, "momentum": 0.9, "nesterov": True, "weight_decay": 5e-4,
    "schedule": "cosine", "warmup_epochs": 1, "channels_last": True,
}


def update_summary(network: str, entries: dict) -> None:
    """Merges `entries` into `cnn_cpu_summary.json[network]` (fractions in [0, 1])."""
    path = RESULTS / "cnn_cpu_summary.json"
    summary = json.loads(path.read_text()) if path.exists() else {"protocol": "cifar-cpu", "networks": {}}
    summary["networks"].setdefault(network, {}).update(entries)
    atomic_write_json(path, summary)


def baseline(args) -> None:
    p = PROTOCOL
    bf16 = native_bfloat16(torch.device("cpu"))
    train_all = load_image_dataset("cifar10", "train")
    train, val = train_val_split(train_all, n_val=p["val_images"], seed=p["split_seed"])
    test = load_image_dataset("cifar10", "test")
    labels = train.id2label()
    path = RESULTS / "cnn_cpu_baseline.json"
    report = json.loads(path.read_text()) if path.exists() else {"protocol": p, "rows": []}
    for seed in args.seed:
        if any(row["seed"] == seed for row in report["rows"]):
            print(f"seed {seed}: already measured", flush=True)
            continue
        torch.manual_seed(seed)
        model = PrunedCNNForImageClassification(resnet_cifar_config(
            20, tuple(p["widths"]), id2label=labels, label2id={v: k for k, v in labels.items()}))
        start = time.time()
        history = train_classifier(
            model, train, epochs=p["epochs"], lr=p["lr"], batch_size=p["batch_size"], momentum=p["momentum"],
            nesterov=p["nesterov"], weight_decay=p["weight_decay"], schedule=p["schedule"],
            warmup_epochs=p["warmup_epochs"], bf16=bf16, channels_last=p["channels_last"], seed=seed,
            resume_dir=Path(args.work_dir) / f"baseline-resnet20-seed{seed}", desc=f"resnet20 seed {seed}",
        )
        # Wall time of this invocation only: a resumed run reports the epochs it trained here.
        seconds = time.time() - start
        counts = count_params_and_macs(model)
        row = {
            "seed": seed, "test_acc": evaluate_accuracy(model, test, bf16=bf16),
            "val_acc": evaluate_accuracy(model, val, bf16=bf16), "precision": "bfloat16" if bf16 else "float32", "params": counts.params, "macs": counts.macs,
            "train_loss": history.train_loss, "seconds_this_invocation": seconds, "device": device_note(),
            "hf_compress_version": __version__, "note": args.note,
        }
        save_checkpoint(model, CHECKPOINTS / f"resnet20-seed{seed}", mean=train.mean, std=train.std)
        report["rows"].append(row)
        atomic_write_json(path, report)
        print(f"seed {seed}: test {100 * row['test_acc']:.2f}%, val {100 * row['val_acc']:.2f}%", flush=True)
    rows = report["rows"]
    if rows:
        accs = [row["test_acc"] for row in rows]
        update_summary("resnet20", {"baseline_test_acc": sum(accs) / len(accs),
                                    "baseline_test_acc_per_seed": {str(r["seed"]): r["test_acc"] for r in rows}})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", choices=["baseline", "prune", "exits"])
    # First, so that the options every stage has are listed once, here.
    add_cifar_cpu_arguments(parser, "every stage",
                            "per-epoch training states (and each stage's finished work), for resuming")
    cnn_cpu_prune.add_arguments(parser)
    cnn_cpu_exits.add_arguments(parser)
    args = parser.parse_args()
    args.seed = args.seed or [2023, 2024]
    torch.set_num_threads(min(2, torch.get_num_threads()))
    {"baseline": baseline, "prune": cnn_cpu_prune.run, "exits": cnn_cpu_exits.run}[args.stage](args)


if __name__ == "__main__":
    main()
