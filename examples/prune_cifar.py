"""Class-aware pruning from Python, at toy scale (a few minutes on a laptop CPU; the accuracy is that of a toy run).

Trains a CIFAR ResNet-20 briefly on 1,000 CIFAR-10 images, prunes it for two iterations and reloads the
result with the stock `AutoModelForImageClassification`. Scale the limits and epochs up for real use
(see benchmarks/bench_pruning.py for the full protocol).
"""

from __future__ import annotations

import sys

import transformers

from hf_compress.class_aware import ClassAwareConfig, ImageDataConfig, TrainConfig, prune, train
from hf_compress.class_aware.record import summary_table


def main(output: str = "outputs/resnet20-class-aware") -> None:
    # ../shared/data/cifar10 or uoft-cs/cifar10; the same 200 held-out images in both runs (same limit and seed).
    data = ImageDataConfig(dataset="cifar10", limit=1200, eval_limit=300)
    base = f"{output}-base"
    train("resnet20", base, TrainConfig(epochs=2, batch_size=64, regularizer="l1", val_size=200), data=data, overwrite=True)

    config = ClassAwareConfig(accuracy_floor=0.0, max_classes=1, max_fraction=0.2, max_iterations=2,
                              retrain_epochs=1, batch_size=64, images_per_class=8, val_size=200)
    result = prune(base, output, config, data=data)
    print(summary_table(result.rows))

    reloaded = transformers.AutoModelForImageClassification.from_pretrained(output)
    print(type(reloaded).__name__, reloaded.config.compression["macs_before"], "->", reloaded.config.compression["macs_after"], "MACs")


if __name__ == "__main__":
    main(*sys.argv[1:])
