"""Turning a ResNet classifier into a `ClassExitResNetForImageClassification` with fresh exit heads.

Sources: transformers' `ResNetForImageClassification` (same module names, so the state dict maps one to one
and the final logits stay identical), an unpruned ResNet-layout PrunedCNN (what `hf-compress train resnet56`
writes; weights renamed) and an existing ClassExitResNet (its backbone and final classifier kept, exits
re-attached at new positions or for the other exit rule).
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import HFCompressError
from ..modeling.class_exit_resnet import (
    ClassExitResNetConfig,
    ClassExitResNetForImageClassification,
)
from .config import DEFAULT_EXIT_POOL_SIZE

BACKBONE_FIELDS = (
    "num_channels", "stem_type", "embedding_size", "hidden_sizes", "depths", "layer_type", "shortcut_type",
    "downsample_in_first_stage", "downsample_in_bottleneck", "hidden_act",
)


def default_exit_positions(depths: list[int]) -> list[str]:
    """An exit after the middle block and after the last block of every stage, the network's end excepted."""
    positions: list[str] = []
    for stage, depth in enumerate(depths, start=1):
        middle = (depth + 1) // 2
        if middle < depth:
            positions.append(f"stage{stage}.{middle}")
        if stage < len(depths):
            positions.append(f"stage{stage}")
    return positions


def _labels(config) -> dict:
    id2label = {int(k): v for k, v in (config.id2label or {i: f"LABEL_{i}" for i in range(config.num_labels)}).items()}
    return {"id2label": id2label, "label2id": {v: k for k, v in id2label.items()}}


def _exit_config(backbone: dict, labels: dict, exit_positions, exit_pool_size: int, exit_rule: str) -> ClassExitResNetConfig:
    positions = list(exit_positions) if exit_positions is not None else default_exit_positions(list(backbone["depths"]))
    try:
        return ClassExitResNetConfig(
            **backbone, **labels, exit_positions=positions, exit_pool_size=exit_pool_size, exit_rule=exit_rule,
        )
    except ValueError as err:  # bad positions, pool size or rule: the user's input
        raise HFCompressError(str(err)) from None


def from_hf_resnet(model, *, exit_positions: list[str] | None = None, exit_pool_size: int = DEFAULT_EXIT_POOL_SIZE,
                   exit_rule: str = "class_exclusion") -> ClassExitResNetForImageClassification:
    """Builds a ClassExitResNet from a transformers `ResNetForImageClassification`, weights copied.

    The stem is transformers' (7x7 stride 2 then max pool) whatever the input size; exit heads are new, so
    with every exit disabled the final logits equal the source's exactly.
    """
    source = model.config
    if getattr(source, "model_type", None) != "resnet":
        raise HFCompressError(f"expected a transformers ResNet (model_type 'resnet'), got {source.model_type!r}")
    backbone = {
        "num_channels": source.num_channels, "stem_type": "imagenet", "embedding_size": source.embedding_size,
        "hidden_sizes": list(source.hidden_sizes), "depths": list(source.depths), "layer_type": source.layer_type,
        "shortcut_type": "projection", "downsample_in_first_stage": source.downsample_in_first_stage,
        "downsample_in_bottleneck": source.downsample_in_bottleneck, "hidden_act": source.hidden_act,
    }
    labels = _labels(source)
    target = ClassExitResNetForImageClassification(_exit_config(backbone, labels, exit_positions, exit_pool_size, exit_rule))
    _load_backbone(target, model.state_dict(), what="transformers ResNet")
    return target


def from_pruned_cnn(model, *, exit_positions: list[str] | None = None, exit_pool_size: int = DEFAULT_EXIT_POOL_SIZE,
                    exit_rule: str = "class_exclusion") -> ClassExitResNetForImageClassification:
    """Builds a ClassExitResNet from an unpruned ResNet-layout `PrunedCNNForImageClassification`."""
    source = model.config
    labels = {**_labels(source), "image_size": source.image_size}
    target = ClassExitResNetForImageClassification(
        _exit_config(_pruned_cnn_backbone(source), labels, exit_positions, exit_pool_size, exit_rule)
    )
    _load_backbone(target, _renamed_pruned_cnn_state(model.state_dict()), what="PrunedCNN")
    return target


def _pruned_cnn_backbone(source) -> dict:
    """The ClassExitResNet backbone fields of a PrunedCNN config; refuses layouts ClassExitResNet cannot express."""
    if source.architecture != "resnet":
        raise HFCompressError(f"early exit needs a ResNet; this PrunedCNN has architecture {source.architecture!r}")
    stems = {(3, 1, False): "cifar", (7, 2, True): "imagenet"}
    stem = stems.get((source.stem_kernel_size, source.stem_stride, bool(source.stem_pool)))
    strides_ok = all(stride == 2 for stride in source.stage_strides[1:]) and source.stage_strides[0] in (1, 2)
    full_width = [[[size] if source.layer_type == "basic" else [size // 4, size // 4] for _ in stage]
                  for size, stage in zip(source.hidden_sizes, source.block_widths)]
    if stem is None or not strides_ok or source.classifier_hidden:
        raise HFCompressError(
            "this PrunedCNN layout (stem, stage strides or hidden classifier layers) has no ClassExitResNet equivalent"
        )
    if source.block_widths != full_width:
        raise HFCompressError("the PrunedCNN is pruned (inner widths below the stage widths); early exit needs the full network")
    return {
        "num_channels": source.num_channels, "stem_type": stem, "embedding_size": source.stem_width,
        "hidden_sizes": list(source.hidden_sizes), "depths": [len(stage) for stage in source.block_widths],
        "layer_type": source.layer_type, "shortcut_type": source.shortcut_type,
        "downsample_in_first_stage": source.stage_strides[0] == 2, "downsample_in_bottleneck": source.downsample_in_bottleneck,
        "hidden_act": source.hidden_act,
    }


def _renamed_pruned_cnn_state(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A PrunedCNN state dict under the ClassExitResNet (transformers ResNet) module names."""
    renames = [("cnn.stem.", "resnet.embedder.embedder."), ("cnn.stages.", "resnet.encoder.stages."), (".convs.", ".layer."),
               ("classifier.output.", "classifier.1.")]
    state = {}
    for key, value in state_dict.items():
        for old, new in renames:
            key = key.replace(old, new)
        parts = key.split(".")
        if key.startswith("resnet.encoder.stages."):
            parts.insert(4, "layers")  # stages.S.B -> stages.S.layers.B
        parts = [{"conv": "convolution", "bn": "normalization"}.get(part, part) for part in parts]
        state[".".join(parts)] = value
    return state


def reattach_exits(
    model: ClassExitResNetForImageClassification,
    *,
    exit_positions: list[str] | None = None,
    exit_pool_size: int | None = None,
    exit_rule: str | None = None,
) -> ClassExitResNetForImageClassification:
    """A copy of `model` with exits at `exit_positions` (default: the model's, or `default_exit_positions` for a
    model without exits); heads kept where they fit.

    Heads are kept only when their position, pool size and rule are unchanged (a class-exclusion head is not
    a confidence head); the others start fresh and every threshold starts disabled.
    """
    config = model.config
    backbone = {name: getattr(config, name) for name in BACKBONE_FIELDS}
    labels = _labels(config)
    positions = list(config.exit_positions) if exit_positions is None else list(exit_positions)
    if exit_positions is None and not positions:  # a plain network (no exit yet): the default positions
        positions = default_exit_positions(list(config.depths))
    pool = config.exit_pool_size if exit_pool_size is None else exit_pool_size
    rule = config.exit_rule if exit_rule is None else exit_rule
    target = ClassExitResNetForImageClassification(_exit_config(backbone, labels, positions, pool, rule))
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("exit_heads.")}
    if pool == config.exit_pool_size and rule == config.exit_rule:
        old = {position: index for index, position in enumerate(config.exit_positions)}
        for index, position in enumerate(positions):
            if position in old:
                for key, value in model.exit_heads[old[position]].state_dict().items():
                    state[f"exit_heads.{index}.{key}"] = value
    _load_backbone(target, state, what="ClassExitResNet")
    return target.to(next(model.parameters()).device)


def _load_backbone(target: ClassExitResNetForImageClassification, state: dict[str, torch.Tensor], what: str) -> None:
    try:
        missing, unexpected = target.load_state_dict(state, strict=False)
    except RuntimeError as err:  # shape mismatch
        raise HFCompressError(f"the {what} weights do not fit the ClassExitResNet layout: {err}") from None
    missing = [k for k in missing if not k.startswith("exit_heads.")]
    if missing or unexpected:
        raise HFCompressError(
            f"the {what} weights do not fit the ClassExitResNet layout (missing {missing[:5]}, unexpected {unexpected[:5]})"
        )


def load_exit_model(
    path: str | Path,
    *,
    exit_positions: list[str] | None = None,
    exit_pool_size: int | None = None,
    exit_rule: str | None = None,
) -> ClassExitResNetForImageClassification:
    """Loads a checkpoint (ClassExitResNet or transformers ResNet) as a ClassExitResNet with the wanted exits.

    The checkpoint is checked first (`check_exit_source`), so a bad one is refused in one line before any weights load.
    """
    from transformers import ResNetForImageClassification

    from ..sources import load_pretrained

    model_type = check_exit_source(path)
    # A network without exits gets the default pool size and rule; a ClassExitResNet keeps its own.
    fresh = {"exit_positions": exit_positions, "exit_pool_size": exit_pool_size or DEFAULT_EXIT_POOL_SIZE,
             "exit_rule": exit_rule or "class_exclusion"}
    if model_type == "resnet":
        return from_hf_resnet(load_pretrained(ResNetForImageClassification, path), **fresh)
    if model_type == "pruned_cnn":
        from ..modeling.pruned_cnn import PrunedCNNForImageClassification

        return from_pruned_cnn(load_pretrained(PrunedCNNForImageClassification, path), **fresh)
    model = load_pretrained(ClassExitResNetForImageClassification, path)
    return reattach_exits(model, exit_positions=exit_positions, exit_pool_size=exit_pool_size, exit_rule=exit_rule)


def check_exit_source(path: str | Path) -> str:
    """The `model_type` of checkpoint `path` (folder or Hub id), once it is known to take exits: config.json present
    and valid, weights in readable safetensors, no code shipped with it needed, a family early exit supports."""
    from ..sources import check_checkpoint

    # Early exit never runs code shipped with a model (trust_flag None): a type transformers does not know is refused.
    model_type = check_checkpoint(path, trust_flag=None).get("model_type")
    if model_type not in ("resnet", "pruned_cnn", ClassExitResNetConfig.model_type):
        raise HFCompressError(
            f"{path} holds a {model_type!r} model; early exit needs a transformers ResNet ('resnet'), an unpruned "
            f"ResNet PrunedCNN ('pruned_cnn') or a ClassExitResNet ('class_exit_resnet') checkpoint"
        )
    return model_type
