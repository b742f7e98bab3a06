"""Class-aware pruning vs L1-norm pruning on CIFAR-10 (protocol "CNN" of BENCHMARKS.md).

For each network: train a baseline, prune it with class-aware pruning (accuracy floor = baseline validation
accuracy minus --floor-drop), then prune the same baseline with uniform L1-norm filter pruning to the MACs
class-aware pruning reached, and retrain it with the same total number of epochs. Report params, MACs and
test accuracy of all three, and their reductions.

Full protocol on a GPU (data kept on the GPU, augmented there, bf16 autocast and channels_last are the
training loop's defaults on CUDA):

    python benchmarks/bench_pruning.py --arch resnet56 --arch vgg16 --epochs 160 --retrain-epochs 30 \
        --iterations 6 --tag full

Reduced scale on CPU (same code path, narrower nets, fewer images and epochs):

    python benchmarks/bench_pruning.py --arch resnet20 --arch vgg16 --width-divisor 4 --train-limit 6000 \
        --val-size 1000 --test-limit 2000 --epochs 6 --retrain-epochs 2 --iterations 2 --tag cpu_reduced
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch
from bench_common import add_data_arguments, device_note, load_data, write_results
from hf_compress.modeling.pruned_cnn import (
    PrunedCNNForImageClassification,
    resnet_cifar_config,
    vgg_cifar_config,
)
from hf_compress.modeling.pruned_cnn.configuration_pruned_cnn import VGG16_LAYERS

from hf_compress import __version__
from hf_compress.class_aware.config import ClassAwareConfig, ImageDataConfig
from hf_compress.class_aware.data import data_refs
from hf_compress.class_aware.loop import class_aware_prune
from hf_compress.class_aware.regularizers import regularized_loss
from hf_compress.class_aware.shrink import l1_prune_to_macs
from hf_compress.provenance import SourceRef
from hf_compress.vision.counting import count_params_and_macs
from hf_compress.vision.training import evaluate_accuracy, train_classifier


def build(arch: str, divisor: int, id2label: dict[int, str]) -> PrunedCNNForImageClassification:
    labels = {"id2label": id2label, "label2id": {v: k for k, v in id2label.items()}}
    if arch.startswith("resnet"):
        widths = tuple(max(1, w // divisor) for w in (16, 32, 64))
        config = resnet_cifar_config(int(arch[len("resnet"):]), widths, **labels)
    elif arch == "vgg16":
        layers = [item if item == "M" else max(1, item // divisor) for item in VGG16_LAYERS]
        config = vgg_cifar_config(layers, (max(1, 512 // divisor),), **labels)
    else:
        raise SystemExit(f"unknown --arch {arch}")
    return PrunedCNNForImageClassification(config)


def row(name: str, model, accuracy: float, base: dict | None) -> dict:
    counts = count_params_and_macs(model)
    assert (counts.params, counts.macs) == (model.config.num_parameters, model.config.num_macs)
    result = {"model": name, "params": counts.params, "macs": counts.macs, "test_accuracy": accuracy}
    if base is not None:
        result["params_reduction"] = 1 - counts.params / base["params"]
        result["macs_reduction"] = 1 - counts.macs / base["macs"]
        result["accuracy_change"] = accuracy - base["test_accuracy"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", action="append", help="resnet20/32/44/56/110 or vgg16 (repeatable)")
    parser.add_argument("--width-divisor", type=int, default=1, help="divide every width (reduced-scale runs)")
    add_data_arguments(parser)
    parser.add_argument("--epochs", type=int, default=160)
    parser.add_argument("--retrain-epochs", type=int, default=30)
    parser.add_argument("--retrain-lr", type=float, default=0.01)
    parser.add_argument("--iterations", type=int, default=6)
    parser.add_argument("--floor-drop", type=float, default=0.003, help="floor = baseline val accuracy - this")
    parser.add_argument("--max-classes", type=int, default=1)
    parser.add_argument("--max-fraction", type=float, default=0.2)
    parser.add_argument("--images-per-class", type=int, default=32)
    parser.add_argument("--used-threshold", type=float, default=1.0)
    parser.add_argument("--class-threshold", type=float, default=0.5)
    parser.add_argument("--regularizer", default="l1", help="none, orthogonal or l1")
    parser.add_argument("--work-dir", default="/tmp/hf_compress_bench_pruning")
    parser.add_argument("--tag", default="run")
    parser.add_argument("--compare-regularizers", action="store_true",
                        help="instead: train the first --arch with each regulariser and count class-specific filters")
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    if torch.get_num_threads() > 2 and not torch.cuda.is_available():
        torch.set_num_threads(2)  # shared CPU machines

    started = time.time()
    train, val, test = load_data(args)
    report = {
        "protocol": "BENCHMARKS.md CNN", "args": vars(args), "hf_compress_version": __version__,
        "device": device_note(),
        "train_images": len(train), "val_images": len(val), "test_images": len(test), "networks": [],
    }
    if args.compare_regularizers:
        return compare_regularizers(args, train, val, test, report, started)
    for arch in args.arch or ["resnet56", "vgg16"]:
        t0 = time.time()
        model = build(arch, args.width_divisor, train.id2label())
        loss_fn = regularized_loss(args.regularizer)
        train_classifier(model, train, epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, loss_fn=loss_fn,
                         seed=args.seed, desc=f"{arch} baseline")
        base = row(f"{arch} baseline", model, evaluate_accuracy(model, test), None)
        base_val = evaluate_accuracy(model, val)
        train_time = time.time() - t0

        t0 = time.time()
        work = Path(args.work_dir) / f"{args.tag}_{arch}"
        shutil.rmtree(work, ignore_errors=True)
        settings = ClassAwareConfig(
            accuracy_floor=max(0.0, base_val - args.floor_drop), max_classes=args.max_classes,
            images_per_class=args.images_per_class, used_threshold=args.used_threshold,
            class_threshold=args.class_threshold, max_fraction=args.max_fraction, max_iterations=args.iterations,
            retrain_epochs=args.retrain_epochs, lr=args.retrain_lr, batch_size=args.batch_size,
            regularizer=args.regularizer, val_size=args.val_size, seed=args.seed,
        )
        result = class_aware_prune(model, train, val, work, settings, test_data=test,
                                   data=data_refs(ImageDataConfig(dataset=args.dataset), with_eval=True),
                                   source=SourceRef(f"{arch} baseline (this run)"))
        pruned = result.model.to(next(model.parameters()).device)
        class_aware = row(f"{arch} class-aware", pruned, evaluate_accuracy(pruned, test), base)
        class_aware["iterations"] = result.rows
        class_aware["stop_reason"] = result.stop_reason
        prune_time = time.time() - t0

        # L1-norm baseline: same MACs, and as many retraining epochs as the chosen class-aware model received.
        t0 = time.time()
        l1 = l1_prune_to_macs(model, class_aware["macs"])
        l1_epochs = max(1, result.best_iteration * args.retrain_epochs)
        train_classifier(l1, train, epochs=l1_epochs, lr=args.retrain_lr, batch_size=args.batch_size, seed=args.seed,
                         desc=f"{arch} L1 retrain")
        l1_row = row(f"{arch} L1-norm", l1, evaluate_accuracy(l1, test), base)
        l1_row["retrain_epochs"] = l1_epochs
        report["networks"].append({
            "arch": arch, "width_divisor": args.width_divisor, "baseline_val_accuracy": base_val,
            "accuracy_floor": settings.accuracy_floor, "rows": [base, class_aware, l1_row],
            "seconds": {"baseline": train_time, "class_aware": prune_time, "l1": time.time() - t0},
        })
        print(json.dumps(report["networks"][-1]["rows"], indent=1), flush=True)
    report["wall_seconds"] = time.time() - started

    lines = [
        f"# Class-aware vs L1-norm pruning, CIFAR-10 ({args.tag})", "",
        f"Device: {report['device']}. Train {len(train)} / val {len(val)} / test {len(test)} images; baseline "
        f"{args.epochs} epochs; class-aware up to {args.iterations} iterations x {args.retrain_epochs} retraining "
        f"epochs; L1-norm pruned to the same MACs (closest at or above) and retrained for as many epochs as the chosen class-aware model. Width divisor "
        f"{args.width_divisor}. Wall time {report['wall_seconds'] / 60:.1f} min.", "",
        "| model | params | MACs | test acc | params removed | MACs removed | acc change |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for network in report["networks"]:
        for r in network["rows"]:
            extra = (f"{100 * r['params_reduction']:.1f}% | {100 * r['macs_reduction']:.1f}% | {100 * r['accuracy_change']:+.2f}"
                     if "macs_reduction" in r else "- | - | -")
            lines.append(f"| {r['model']} | {r['params'] / 1e6:.3f}M | {r['macs'] / 1e6:.2f}M | {100 * r['test_accuracy']:.2f}% | {extra} |")
    lines.append("")
    for network in report["networks"]:
        ca = network["rows"][1]
        lines.append(f"{network['arch']}: floor {100 * network['accuracy_floor']:.2f}% (val), stop: {ca['stop_reason']}; iterations "
                     + ", ".join(f"#{r['iteration']} {r['macs'] / 1e6:.2f}M MACs val {100 * r['val_accuracy']:.1f}%" for r in ca["iterations"]))
    write_results(f"pruning_{args.tag}", report, "\n".join(lines))
    print("\n".join(lines))


def compare_regularizers(args, train, val, test, report, started) -> None:
    """Trains the same network with each regulariser; counts the filters class-aware pruning could remove."""
    from hf_compress.class_aware.importance import class_importance

    arch = (args.arch or ["resnet56"])[0]
    rows = []
    for kind in ("none", "orthogonal", "l1"):
        torch.manual_seed(args.seed)
        model = build(arch, args.width_divisor, train.id2label())
        train_classifier(model, train, epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
                         loss_fn=regularized_loss(kind), seed=args.seed, desc=f"{arch} {kind}")
        importance = class_importance(model, train, images_per_class=args.images_per_class,
                                      used_threshold=args.used_threshold, class_threshold=args.class_threshold)
        counts = torch.cat([c.cpu() for c in importance.class_counts.values()])
        rows.append({
            "regularizer": kind, "test_accuracy": evaluate_accuracy(model, test), "val_accuracy": evaluate_accuracy(model, val),
            "prunable_filters": int(counts.numel()),
            "important_for_at_most_1_class": int((counts <= 1).sum()),
            "important_for_at_most_2_classes": int((counts <= 2).sum()),
            "mean_classes_per_filter": float(counts.float().mean()),
        })
        print(rows[-1], flush=True)
    report["regularizers"] = rows
    report["arch"] = arch
    report["wall_seconds"] = time.time() - started
    lines = [
        f"# Regulariser comparison for class-aware pruning ({arch}, width divisor {args.width_divisor}, {args.tag})", "",
        f"Device: {report['device']}. {len(train)} train images, {args.epochs} epochs, importance from "
        f"{args.images_per_class} images per class (used threshold {args.used_threshold}, class threshold {args.class_threshold}).", "",
        "| regulariser | test acc | val acc | filters | important for <= 1 class | <= 2 classes | mean classes / filter |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['regularizer']} | {100 * r['test_accuracy']:.2f}% | {100 * r['val_accuracy']:.2f}% | {r['prunable_filters']} "
                     f"| {r['important_for_at_most_1_class']} | {r['important_for_at_most_2_classes']} | {r['mean_classes_per_filter']:.2f} |")
    write_results(f"pruning_regularizers_{args.tag}", report, "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
