"""Class-exclusion early exit on CIFAR-10, from a trained ResNet to a checkpoint any transformers install loads.

    python examples/early_exit_cifar.py SOURCE OUTPUT [--quick]

SOURCE is a ResNet trained on CIFAR-10: a transformers `ResNetForImageClassification`, or what
`hf-compress train resnet56 SOURCE` writes. Without SOURCE (`-`), a ResNet-20 is trained for a few minutes
first so the example runs anywhere; `--quick` shrinks everything to a CPU-sized smoke run.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from transformers import pipeline

from hf_compress.data.images import load_image_dataset
from hf_compress.early_exit import EarlyExitConfig, add_early_exits
from hf_compress.modeling.class_exit_resnet import ClassExitResNetConfig, ClassExitResNetForImageClassification
from hf_compress.vision.training import train_classifier


def quick_source(folder: Path, train_limit: int) -> Path:
    """A briefly trained ResNet-20 without exits (the stand-in for a real CIFAR-10 ResNet)."""
    train = load_image_dataset("cifar10", "train", limit=train_limit)
    config = ClassExitResNetConfig(depths=[3, 3, 3], shortcut_type="zero_pad", exit_positions=[], id2label=train.id2label())
    model = ClassExitResNetForImageClassification(config)
    train_classifier(model, train, epochs=2, lr=0.1)
    model.save_pretrained(folder)
    return folder


def main() -> None:
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    quick = "--quick" in sys.argv
    source, output = (args + ["-", "outputs/resnet-early-exit"])[:2]
    if source == "-":
        source = quick_source(Path(output).with_name(Path(output).name + "-source"), 2000 if quick else 20000)
    config = EarlyExitConfig(
        dataset="cifar10", tolerance=0.005, epochs=1 if quick else 10, train_limit=3000 if quick else None,
        n_val=1000 if quick else 5000, test_limit=1000 if quick else None,
    )
    result = add_early_exits(source, output, config, overwrite=True)
    print(f"thresholds {result.thresholds}")
    print(f"accuracy {result.accuracy_full:.4f} (full) -> {result.accuracy_early_exit:.4f} (early exit); "
          f"mean MACs {result.mean_macs / 1e6:.2f}M of {result.macs_full / 1e6:.2f}M")

    # The checkpoint is an ordinary transformers model: the stock pipeline and Auto classes load it.
    classifier = pipeline("image-classification", model=output)
    test = load_image_dataset("cifar10", "test", limit=4)
    from PIL import Image

    for image, label in zip(test.images, test.labels):
        top = classifier(Image.fromarray(image.permute(1, 2, 0).numpy()), top_k=1)[0]
        print(f"true {test.class_names[label]:>10}  predicted {top['label']:>10} ({top['score']:.2f})")
    # Per-sample exit and MACs spent come with every forward in eval mode.
    model = ClassExitResNetForImageClassification.from_pretrained(output).eval()
    with torch.no_grad():
        out = model(next(test.batches(4))[0])
    print("exit per image:", [model.config.exit_positions[i] if i < len(model.exit_heads) else "final" for i in out.exit_indices])
    print("MACs per image:", out.macs.tolist())


if __name__ == "__main__":
    main()
