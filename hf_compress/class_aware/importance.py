"""Per-class filter importance for class-aware pruning (Jiang et al., DATE 2024).

For every prunable conv and every image x of class k, the first-order Taylor estimate of the loss change
when the filter's output map a is removed (Molchanov et al. 2017):

    t(x, f) = | mean over positions of a * dL/da |,   a = conv output before BN, L = cross-entropy of x.

A filter is *used* by an image when t(x, f) >= `used_threshold` x the mean of t(x, .) over the filters of
its layer (scores are compared inside a layer and image, because their scale varies a lot between layers
and images). Its score for class k is the fraction of class-k images that use it; it is *important* for k
when that fraction reaches `class_threshold`. Filters important for at most `max_classes` classes serve
too few classes to be worth their cost and are removed.

`taylor_importance` is the plain Taylor criterion of Molchanov et al. on the same images and the same t(x, f):
the mean over all images, with no per-class counting. It is the baseline that isolates what the per-class
counting adds (`shrink.taylor_prune_to_macs` prunes by it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn.functional as F

from ..data.images import ImageClassificationData
from ..errors import HFCompressError
from ..vision.training import logits_of
from .shrink import PrunableLayer, prunable_layers


@torch.enable_grad()
def taylor_scores(model, images: torch.Tensor, labels: torch.Tensor, layers: list[PrunableLayer]) -> dict[str, torch.Tensor]:
    """`t(x, f)` of every image and filter: `{layer name: [N, width]}` (model in eval mode, so images are independent)."""
    outputs: dict[str, torch.Tensor] = {}
    handles = [
        layer.layer.conv.register_forward_hook(lambda module, inputs, output, name=layer.name: outputs.__setitem__(name, output))
        for layer in layers
    ]
    try:
        logits = logits_of(model(pixel_values=images))
    finally:
        for handle in handles:
            handle.remove()
    # A summed loss gives each image the gradient of its own loss (BN uses running statistics in eval).
    loss = F.cross_entropy(logits.float(), labels, reduction="sum")
    names = [layer.name for layer in layers]
    grads = torch.autograd.grad(loss, [outputs[name] for name in names])
    return {name: (outputs[name] * grad).mean(dim=(2, 3)).abs().detach() for name, grad in zip(names, grads)}


@dataclass
class ClassImportance:
    """Result of `class_importance`.

    Attributes:
        usage: `{layer: [num_classes, width]}` fraction of each class's images that use each filter.
        important: `{layer: bool [num_classes, width]}` usage >= class_threshold.
        class_counts: `{layer: [width]}` number of classes each filter is important for.
    """

    usage: dict[str, torch.Tensor]
    important: dict[str, torch.Tensor]
    class_counts: dict[str, torch.Tensor]


@torch.no_grad()
def class_importance(
    model,
    data: ImageClassificationData,
    *,
    images_per_class: int = 32,
    used_threshold: float = 1.0,
    class_threshold: float = 0.5,
    batch_size: int = 256,
) -> ClassImportance:
    """Scores every prunable filter of `model` against every class of `data` (the first `images_per_class` images of each)."""
    if used_threshold < 0 or not 0 < class_threshold <= 1:
        raise HFCompressError(f"used_threshold must be >= 0 and class_threshold in (0, 1], got {used_threshold}, {class_threshold}")
    layers = _prunable_layers(model)
    device = next(model.parameters()).device
    usage = {layer.name: torch.zeros(data.num_classes, layer.width, device=device) for layer in layers}
    sizes = [0] * data.num_classes
    for k, scores in _class_scores(model, data, layers, images_per_class, batch_size):
        sizes[k] += len(next(iter(scores.values())))
        for name, t in scores.items():
            used = t >= used_threshold * t.mean(dim=1, keepdim=True)
            usage[name][k] += used.float().sum(0)
    for name in usage:
        usage[name] /= torch.tensor(sizes, dtype=usage[name].dtype, device=device)[:, None]
    important = {name: u >= class_threshold for name, u in usage.items()}
    counts = {name: imp.sum(0) for name, imp in important.items()}
    return ClassImportance(usage=usage, important=important, class_counts=counts)


def _prunable_layers(model) -> list[PrunableLayer]:
    layers = prunable_layers(model)
    if not layers:
        raise HFCompressError("the model has no prunable layer")
    return layers


def _class_scores(model, data: ImageClassificationData, layers: list[PrunableLayer], images_per_class: int,
                  batch_size: int) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
    """`(class k, taylor_scores of a batch of class-k images)` over the first `images_per_class` images of every
    class, the model in eval mode (restored after). Both criteria score exactly these images."""
    was_training = model.training
    model.eval()
    parameter = next(model.parameters())
    try:
        for k in range(data.num_classes):
            subset = data.of_class(k, images_per_class)
            if len(subset) == 0:
                raise HFCompressError(f"class {k} ({data.class_names[k]}) has no image in the data used for importance")
            for images, labels in subset.to(parameter.device).batches(batch_size):
                yield k, taylor_scores(model, images.to(parameter.dtype), labels, layers)
    finally:
        model.train(was_training)


@torch.no_grad()
def taylor_importance(
    model,
    data: ImageClassificationData,
    *,
    images_per_class: int = 32,
    batch_size: int = 256,
) -> dict[str, torch.Tensor]:
    """Plain Taylor importance of every prunable filter (Molchanov et al. 2017): t(x, f) averaged over the images.

    The images (the first `images_per_class` of each class) and the per-image score t(x, f) are those of
    `class_importance`; only the per-class counting is left out.

    Returns:
        `{layer name: [width]}` mean of t(x, f) over all scored images.
    """
    layers = _prunable_layers(model)
    device = next(model.parameters()).device
    totals = {layer.name: torch.zeros(layer.width, dtype=torch.float64, device=device) for layer in layers}
    count = 0
    for _, scores in _class_scores(model, data, layers, images_per_class, batch_size):
        count += len(next(iter(scores.values())))
        for name, t in scores.items():
            totals[name] += t.double().sum(0)
    return {name: (total / count).float() for name, total in totals.items()}


def select_filters(
    model,
    importance: ClassImportance,
    *,
    max_classes: int = 1,
    max_fraction: float = 1.0,
) -> tuple[dict[str, torch.Tensor], int]:
    """Chooses the filters to keep: those important for more than `max_classes` classes.

    At most `max_fraction` of all prunable filters go in one call (those important for the fewest classes,
    then the least used), so one iteration cannot wipe out the network before retraining. Each layer keeps
    its `min_width` filters (the most used ones).

    Returns:
        `({layer: kept channel indices}, number of filters removed)`.
    """
    layers = prunable_layers(model)
    candidates = []  # (classes, total usage, layer, channel)
    for layer in layers:
        counts, total = importance.class_counts[layer.name], importance.usage[layer.name].sum(0)
        for c in torch.nonzero(counts <= max_classes).flatten().tolist():
            candidates.append((int(counts[c]), float(total[c]), layer.name, c))
    candidates.sort()
    budget = int(max_fraction * sum(layer.width for layer in layers))
    removed: dict[str, set[int]] = {layer.name: set() for layer in layers}
    by_name = {layer.name: layer for layer in layers}
    count = 0
    for _, _, name, c in candidates:
        if count >= budget:
            break
        if by_name[name].width - len(removed[name]) - 1 < by_name[name].min_width:
            continue
        removed[name].add(c)
        count += 1
    keep = {
        name: torch.tensor([c for c in range(by_name[name].width) if c not in gone], dtype=torch.long)
        for name, gone in removed.items()
        if gone
    }
    return keep, count
