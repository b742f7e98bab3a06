"""Bringing CNNs into the PrunedCNN family: transformers ResNet checkpoints and the paper's CIFAR models.

`resnet_to_pruned_cnn` converts a `ResNetForImageClassification` of any depth (basic or bottleneck blocks)
into a full-width `PrunedCNNForImageClassification` with identical logits, by renaming weights only.
`load_cnn` is the single entry point of the CLI: a PrunedCNN checkpoint, a transformers ResNet checkpoint
(Hub id or folder), or an architecture name (`resnet56`, `vgg16`, ...) for a freshly initialised network.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from ..errors import HFCompressError
from ..modeling.pruned_cnn import (
    PrunedCNNConfig,
    PrunedCNNForImageClassification,
    resnet_cifar_config,
    vgg_cifar_config,
)
from ..provenance import SourceRef
from ..sources import check_checkpoint, load_pretrained

# transformers ResNet parameter names -> PrunedCNN names (stage, block, conv index are kept).
_RENAMES = [
    (r"^resnet\.embedder\.embedder\.convolution\.", "cnn.stem.conv."),
    (r"^resnet\.embedder\.embedder\.normalization\.", "cnn.stem.bn."),
    (r"^resnet\.encoder\.stages\.(\d+)\.layers\.(\d+)\.shortcut\.convolution\.", r"cnn.stages.\1.\2.shortcut.conv."),
    (r"^resnet\.encoder\.stages\.(\d+)\.layers\.(\d+)\.shortcut\.normalization\.", r"cnn.stages.\1.\2.shortcut.bn."),
    (r"^resnet\.encoder\.stages\.(\d+)\.layers\.(\d+)\.layer\.(\d+)\.convolution\.", r"cnn.stages.\1.\2.convs.\3.conv."),
    (r"^resnet\.encoder\.stages\.(\d+)\.layers\.(\d+)\.layer\.(\d+)\.normalization\.", r"cnn.stages.\1.\2.convs.\3.bn."),
    (r"^classifier\.1\.", "classifier.output."),
]

ARCHITECTURES = {
    **{f"resnet{d}": (lambda d=d, **kw: resnet_cifar_config(d, **kw)) for d in (20, 32, 44, 56, 110)},
    "vgg16": vgg_cifar_config,
}


def resnet_config_to_pruned_cnn(resnet_config) -> PrunedCNNConfig:
    """The full-width PrunedCNN layout of a transformers `ResNetConfig`."""
    if resnet_config.layer_type not in ("basic", "bottleneck"):
        raise HFCompressError(f"unsupported ResNet layer_type {resnet_config.layer_type!r}")
    basic = resnet_config.layer_type == "basic"
    return PrunedCNNConfig(
        architecture="resnet",
        num_channels=resnet_config.num_channels,
        image_size=224,
        stem_width=resnet_config.embedding_size,
        stem_kernel_size=7,
        stem_stride=2,
        stem_pool=True,
        layer_type=resnet_config.layer_type,
        hidden_sizes=list(resnet_config.hidden_sizes),
        stage_strides=[2 if resnet_config.downsample_in_first_stage else 1] + [2] * (len(resnet_config.hidden_sizes) - 1),
        block_widths=[
            [[size] if basic else [size // 4, size // 4] for _ in range(depth)]
            for size, depth in zip(resnet_config.hidden_sizes, resnet_config.depths)
        ],
        shortcut_type="projection",
        downsample_in_bottleneck=resnet_config.downsample_in_bottleneck,
        hidden_act=resnet_config.hidden_act,
        id2label=dict(resnet_config.id2label),
        label2id=dict(resnet_config.label2id),
    )


def resnet_to_pruned_cnn(model) -> PrunedCNNForImageClassification:
    """Converts a transformers `ResNetForImageClassification` into a PrunedCNN with the same weights and logits."""
    config = resnet_config_to_pruned_cnn(model.config)
    converted = PrunedCNNForImageClassification(config)
    state = {}
    for name, tensor in model.state_dict().items():
        new = name
        for pattern, replacement in _RENAMES:
            new = re.sub(pattern, replacement, new)
        if new == name:
            raise HFCompressError(f"unexpected parameter {name!r} in the ResNet checkpoint")
        state[new] = tensor
    missing, unexpected = converted.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise HFCompressError(f"ResNet conversion mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return converted.eval()


def load_cnn(
    model: str,
    *,
    num_labels: int | None = None,
    id2label: dict[int, str] | None = None,
    revision: str | None = None,
) -> tuple[PrunedCNNForImageClassification, SourceRef]:
    """Loads `model` as a PrunedCNN.

    Args:
        model: an architecture name (`resnet20/32/44/56/110`, `vgg16`: the CIFAR networks, randomly
            initialised), a PrunedCNN checkpoint, or a transformers ResNet checkpoint (Hub id or folder).
        num_labels, id2label: label set of a freshly initialised architecture.

    Returns:
        The model and its `SourceRef` for provenance (a local folder by its name only).
    """
    key = model.lower().replace("-", "")
    if key in ARCHITECTURES:
        labels = id2label or {i: str(i) for i in range(num_labels or 10)}
        config = ARCHITECTURES[key](id2label=labels, label2id={v: k for k, v in labels.items()})
        torch.manual_seed(0)
        return PrunedCNNForImageClassification(config), SourceRef(key)
    model_type = check_cnn_source(model, revision=revision)
    source = SourceRef.of(model, revision or _commit_of(model))
    if model_type == "pruned_cnn":
        return load_pretrained(PrunedCNNForImageClassification, model, revision=revision).eval(), source
    from transformers import ResNetForImageClassification

    return resnet_to_pruned_cnn(load_pretrained(ResNetForImageClassification, model, revision=revision)), source


def check_cnn_source(model: str, *, revision: str | None = None) -> str | None:
    """The `model_type` of the checkpoint `model` (folder or Hub id), once it is known to load as a PrunedCNN; None
    for an architecture name.

    Reads only its config.json (and, for a folder, the headers of its weight files): a missing folder or config,
    pickled or unreadable weights, shipped code and a family pruning does not take are each refused in one line.
    """
    if model.lower().replace("-", "") in ARCHITECTURES:
        return None
    # Pruning never runs code shipped with a model (trust_flag None): a type transformers does not know is refused.
    config = check_checkpoint(model, revision=revision, trust_flag=None,
                              hint=f"{model!r} is neither an architecture name ({', '.join(ARCHITECTURES)}) nor a "
                                   "local folder")
    model_type = config.get("model_type")
    if model_type not in ("pruned_cnn", "resnet"):
        raise HFCompressError(
            f"{model!r} is a {model_type!r} model; class-aware pruning supports PrunedCNN checkpoints, "
            f"transformers ResNet checkpoints and the architectures {', '.join(ARCHITECTURES)}"
        )
    return model_type


def _commit_of(model: str) -> str | None:
    """The Hub commit of `model` when it is a cached Hub checkpoint (None for local folders)."""
    if Path(model).exists():
        return None
    try:
        from huggingface_hub import model_info

        return model_info(model).sha
    except Exception:  # offline or private: provenance then records no revision
        return None
