"""Class-aware pruning from Python, at toy scale (a few minutes on a laptop CPU; the accuracy is that of a toy run).

Trains a CIFAR ResNet-20 briefly on 1,000 CIFAR-10 images, prunes it for two iterations and reloads the
result with the stock `AutoModelForImageClassification`. Scale the limits and epochs up for real use
(see benchmarks/bench_pruning.py for the full protocol).
"""

from __future__ import annotations

import sys

import torch
import transformers

from hf_compress.class_aware.api import ClassAwareSettings, class_aware_prune, summary_table
from hf_compress.data.images import load_image_dataset, train_val_split
from hf_compress.class_aware.regularizers import regularized_loss
from hf_compress.vision.resnet_import import load_cnn
from hf_compress.vision.training import train_classifier


def main(output: str = "outputs/resnet20-class-aware") -> None:
    torch.manual_seed(0)
    train = load_image_dataset("cifar10", "train", limit=1200)  # ../shared/data/cifar10 or uoft-cs/cifar10
    train, val = train_val_split(train, n_val=200)
    test = load_image_dataset("cifar10", "test", limit=300)

    model, source = load_cnn("resnet20", id2label=train.id2label())
    train_classifier(model, train, epochs=2, lr=0.1, batch_size=64, loss_fn=regularized_loss("l1"))

    settings = ClassAwareSettings(accuracy_floor=0.0, max_classes=1, max_fraction=0.2, max_iterations=2,
                                  retrain_epochs=1, batch_size=64, images_per_class=8)
    result = class_aware_prune(model, train, val, output, settings, test_data=test, source=source, dataset="cifar10")
    print(summary_table(result.rows))

    reloaded = transformers.AutoModelForImageClassification.from_pretrained(output)
    print(type(reloaded).__name__, reloaded.config.compression["macs_before"], "->", reloaded.config.compression["macs_after"], "MACs")


if __name__ == "__main__":
    main(*sys.argv[1:])
