"""Benchmark: class-exclusion early exit vs the confidence baseline on CIFAR-10 (issue 6).

For each architecture: train the plain network (cross-entropy), then for each exit rule attach heads at the
same positions, train jointly, search thresholds on the held-out validation split at each tolerance, and
measure on the test split: accuracy, mean MACs per image (exit heads included), the exit histogram, and
wall-clock throughput of batched inference (batch 256) against the same network with every exit off.

Full protocol (GPU):
    python benchmarks/bench_early_exit.py --archs resnet56 hf-resnet18 --pretrain-epochs 160 --joint-epochs 40
Reduced scale (CPU):
    python benchmarks/bench_early_exit.py --archs resnet20 hf-resnet18 --train-limit 8000 --n-val 2000 \
        --test-limit 2000 --pretrain-epochs 4 --joint-epochs 2 --tag cpu-reduced
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from bench_common import add_data_arguments, device_note, load_data, write_results
from hf_compress.modeling.class_exit_resnet import (
    ClassExitResNetConfig,
    ClassExitResNetForImageClassification,
)

from hf_compress.early_exit.heads import (
    default_exit_positions,
    from_hf_resnet,
    reattach_exits,
)
from hf_compress.early_exit.report import exit_report, measure_throughput
from hf_compress.early_exit.search import collect_exit_scores, search_thresholds
from hf_compress.early_exit.training import joint_loss_fn
from hf_compress.errors import HFCompressError
from hf_compress.vision.counting import count_params_and_macs
from hf_compress.vision.training import evaluate_accuracy, train_classifier

CIFAR_DEPTHS = {"resnet20": 3, "resnet32": 5, "resnet56": 9, "resnet110": 18}


def build_base(arch: str, class_names: list[str]) -> ClassExitResNetForImageClassification:
    """The plain network (no exit) of `arch`, as a ClassExitResNet; transformers layouts go through conversion."""
    labels = {"id2label": dict(enumerate(class_names)), "label2id": {n: i for i, n in enumerate(class_names)}}
    if arch in CIFAR_DEPTHS:
        depth = CIFAR_DEPTHS[arch]
        config = ClassExitResNetConfig(
            depths=[depth] * 3, hidden_sizes=[16, 32, 64], embedding_size=16, shortcut_type="zero_pad",
            exit_positions=[], **labels,
        )
        return ClassExitResNetForImageClassification(config)
    if arch in ("hf-resnet18", "hf-resnet50"):
        from transformers import ResNetConfig, ResNetForImageClassification

        if arch == "hf-resnet18":
            source = ResNetConfig(embedding_size=64, hidden_sizes=[64, 128, 256, 512], depths=[2, 2, 2, 2], layer_type="basic", **labels)
        else:
            source = ResNetConfig(**labels)
        # The stock transformers model, converted: the same path as `hf-compress early-exit` on a Hub ResNet.
        return from_hf_resnet(ResNetForImageClassification(source), exit_positions=[])
    raise HFCompressError(f"unknown arch {arch!r}")


def run_arch(arch: str, args, train, val, test, device: torch.device) -> dict:
    result: dict = {"arch": arch}
    base = build_base(arch, train.class_names)
    counts = count_params_and_macs(base, (3, *train.image_size))
    work = Path(args.work_dir) / args.tag_resolved / arch
    start = time.perf_counter()
    # Trained models are kept in --work-dir (outside the repo's results) so a rerun can re-analyse them.
    base = _trained(work / "base", base, lambda model: train_classifier(
        model, train, epochs=args.pretrain_epochs, lr=args.lr, batch_size=args.batch_size, seed=args.seed,
        progress=args.progress, desc=f"{arch} pretrain"), args.reuse).to(device)
    result["base"] = {
        "params": counts.params, "macs": counts.macs, "train_seconds": time.perf_counter() - start,
        "test_accuracy": evaluate_accuracy(base, test),
    }
    print(f"[{arch}] base: acc {result['base']['test_accuracy']:.4f}, MACs {counts.macs / 1e6:.2f}M", flush=True)
    result["rules"] = {}
    for rule in args.rules:
        positions = args.exits or default_exit_positions(base.config.depths)
        model = reattach_exits(base, exit_positions=positions, exit_rule=rule).to(device)
        start = time.perf_counter()
        model = _trained(work / rule, model, lambda model: train_classifier(
            model, train, epochs=args.joint_epochs, lr=args.joint_lr, batch_size=args.batch_size, loss_fn=joint_loss_fn,
            seed=args.seed, progress=args.progress, desc=f"{arch} {rule} joint"), args.reuse).to(device)
        joint_seconds = time.perf_counter() - start
        scores = collect_exit_scores(model, val)
        # The same network with every exit off: the full-network reference, in accuracy and speed.
        model.config.exit_thresholds = [model.config.disabled_threshold] * model.config.num_exits
        full_report = exit_report(model, test)
        rows = []
        for tolerance in args.tolerances:
            search = search_thresholds(scores, rule, tolerance, args.step)
            model.config.exit_thresholds = list(search.thresholds)
            report = exit_report(model, test)
            speed, full_again = _speeds(model, search.thresholds, test, args)
            rows.append({
                "tolerance": tolerance, "thresholds": search.thresholds,
                "val_accuracy_full": search.accuracy_full, "val_accuracy": search.accuracy, "val_mean_macs": search.mean_macs,
                "test_accuracy": report["accuracy"], "test_accuracy_full": report["accuracy_full"],
                "mean_macs": report["mean_macs"], "macs_full": report["macs_full"], "macs_reduction": report["macs_reduction"],
                "exit_histogram": report["exit_histogram"],
                "per_class": {name: {"accuracy": row["accuracy"], "mean_macs": row["mean_macs"]}
                              for name, row in report["per_class"].items()},
                "throughput": speed, "throughput_full": full_again, "speedup": speed / full_again,
            })
            print(f"[{arch}] {rule} tol {tolerance}: acc {report['accuracy']:.4f} (full {report['accuracy_full']:.4f}), "
                  f"MACs -{report['macs_reduction']:.1%}, {speed:.0f} vs {full_again:.0f} img/s", flush=True)
        result["rules"][rule] = {
            "exit_positions": list(model.config.exit_positions), "joint_train_seconds": joint_seconds,
            "full": {"test_accuracy": full_report["accuracy"], "macs": full_report["macs_full"]},
            "tolerances": rows,
        }
    return result


def _trained(folder: Path, model: ClassExitResNetForImageClassification, train, reuse: bool) -> ClassExitResNetForImageClassification:
    if reuse and (folder / "config.json").exists():
        return ClassExitResNetForImageClassification.from_pretrained(folder)
    train(model)
    model.save_pretrained(folder)
    return model


def _speeds(model: ClassExitResNetForImageClassification, thresholds: list[float], test, args) -> tuple[float, float]:
    """Best-of-`rounds` images/s with the searched thresholds and with every exit off, measured alternately
    so that load from other processes hits both alike."""
    early, full = [], []
    off = [model.config.disabled_threshold] * model.config.num_exits
    for _ in range(args.speed_rounds):
        model.config.exit_thresholds = off
        full.append(measure_throughput(model, test, args.throughput_batch, max_batches=args.throughput_batches))
        model.config.exit_thresholds = list(thresholds)
        early.append(measure_throughput(model, test, args.throughput_batch, max_batches=args.throughput_batches))
    return max(early), max(full)


def markdown(results: dict) -> str:
    lines = [
        f"# Early exit on CIFAR-10 ({results['scale']})",
        "",
        f"Device: {results['device']}; train {results['train_samples']} / validation {results['val_samples']} / "
        f"test {results['test_samples']} images; pretrain {results['args']['pretrain_epochs']} epochs, joint "
        f"{results['args']['joint_epochs']} epochs; throughput at batch {results['args']['throughput_batch']}.",
        "",
        "| arch | rule | tolerance | test acc full | test acc early exit | Δ acc (points) | MACs full | mean MACs | MACs saved | "
        "img/s full | img/s early exit | speedup | exit histogram |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for arch in results["archs"]:
        lines.append(
            f"| {arch['arch']} | plain network (before heads) | - | {100 * arch['base']['test_accuracy']:.2f}% | - | - | "
            f"{arch['base']['macs'] / 1e6:.2f}M | - | - | - | - | - | - |"
        )
        for rule, data in arch["rules"].items():
            for row in data["tolerances"]:
                histogram = ", ".join(f"{k} {100 * v:.0f}%" for k, v in row["exit_histogram"].items())
                lines.append(
                    f"| {arch['arch']} | {rule} | {row['tolerance']} | {100 * row['test_accuracy_full']:.2f}% | "
                    f"{100 * row['test_accuracy']:.2f}% | {100 * (row['test_accuracy'] - row['test_accuracy_full']):+.2f} | "
                    f"{row['macs_full'] / 1e6:.2f}M | {row['mean_macs'] / 1e6:.2f}M | {100 * row['macs_reduction']:.1f}% | "
                    f"{row['throughput_full']:.0f} | {row['throughput']:.0f} | {row['speedup']:.2f}x | {histogram} |"
                )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archs", nargs="+", default=["resnet56", "hf-resnet18"])
    parser.add_argument("--rules", nargs="+", default=["class_exclusion", "confidence"])
    parser.add_argument("--exits", nargs="+", default=None, help="exit positions (default: middle and end of each stage)")
    parser.add_argument("--tolerances", nargs="+", type=float, default=[0.002, 0.005])
    add_data_arguments(parser, val_flag="--n-val")
    parser.add_argument("--pretrain-epochs", type=int, default=160)
    parser.add_argument("--joint-epochs", type=int, default=40)
    parser.add_argument("--joint-lr", type=float, default=0.02)
    parser.add_argument("--throughput-batch", type=int, default=256)
    parser.add_argument("--speed-rounds", type=int, default=3)
    parser.add_argument("--throughput-batches", type=int, default=None, help="time at most this many test batches")
    parser.add_argument("--step", type=float, default=0.01)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tag", default=None, help="suffix of the result files (default: gpu-full or cpu-reduced)")
    parser.add_argument("--progress", action="store_true")
    parser.add_argument("--work-dir", default="outputs/bench_early_exit", help="where trained models are kept")
    parser.add_argument("--reuse", action="store_true", help="load trained models from --work-dir instead of training")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    full_scale = args.train_limit is None and args.test_limit is None
    tag = args.tag or ("gpu-full" if device.type == "cuda" and full_scale else "cpu-reduced")
    args.tag_resolved = tag
    train, val, test = load_data(args)
    results = {
        "scale": "full protocol" if full_scale else "REDUCED SCALE",
        "device": device_note(args.threads),
        "train_samples": len(train), "val_samples": len(val), "test_samples": len(test), "args": vars(args), "archs": [],
    }
    for arch in args.archs:
        results["archs"].append(run_arch(arch, args, train, val, test, device))
        # Written after every architecture so a long run keeps what it measured.
        write_results(f"early_exit_{tag}", results, markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
