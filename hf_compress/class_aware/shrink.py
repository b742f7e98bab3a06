"""Structured (filter) pruning of PrunedCNNs: which layers can shrink, and how the network is rebuilt smaller.

Dependencies are explicit, in the Torch-Pruning manner. A prunable layer is a conv whose output channels
may be removed; removing channel c also removes row c of its BN and input channel c of every consumer:

- plain stack: conv i -> BN i, conv i+1 (input), and after the last conv the first classifier linear layer
  (global average pooling keeps one feature per channel);
- residual net: only the inner convs of a block are pruned: basic block conv0 -> BN0, conv1 (input);
  bottleneck conv0 -> conv1, conv1 -> conv2. The block outputs are tied together by the residual additions
  (and option-A shortcuts pad by position), so stage widths, the stem and shortcuts stay whole.

A plain layer keeps at least one filter (taking it out would leave the next layer with no input weights
trained for what it would receive). A residual block can lose its whole branch: it then computes its
shortcut only, and a block whose shortcut is the identity is dropped from the network (ReLU of a
post-ReLU input is the identity), so the pruned network has fewer layers.

`shrink` builds a new, physically smaller `PrunedCNNForImageClassification` (new config widths, new
tensors) whose kept channels carry the old weights.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn as nn

from ..errors import HFCompressError
from ..modeling.pruned_cnn import (
    PrunedCNNConfig,
    PrunedCNNConvLayer,
    PrunedCNNForImageClassification,
)


@dataclass
class PrunableLayer:
    """A conv whose filters may be removed.

    Attributes:
        name: stable name (`plain.I` or `stageS.blockB.convJ`, 0-based).
        layer: the `PrunedCNNConvLayer` (conv + BN) that produces the channels.
        min_width: fewest filters it may keep (1 for plain layers, 0 for residual inner convs).
        location: `("plain", i)` or `("resnet", s, b, j)`.
    """

    name: str
    layer: PrunedCNNConvLayer
    min_width: int
    location: tuple

    @property
    def width(self) -> int:
        return self.layer.conv.out_channels


def prunable_layers(model: PrunedCNNForImageClassification) -> list[PrunableLayer]:
    """Every prunable conv of `model`, in network order."""
    config = model.config
    result = []
    if config.architecture == "plain":
        for i, layer in enumerate(model.cnn.layers):
            result.append(PrunableLayer(f"plain.{i}", layer, 1, ("plain", i)))
        return result
    for s, stage in enumerate(model.cnn.stages):
        for b, block in enumerate(stage):
            # The last conv of a block writes the block output: tied by the residual addition.
            for j, layer in enumerate(list(block.convs)[:-1]):
                result.append(PrunableLayer(f"stage{s}.block{b}.conv{j}", layer, 0, ("resnet", s, b, j)))
    return result


def _copy_conv_layer(new: PrunedCNNConvLayer, old: PrunedCNNConvLayer, out_index: torch.Tensor | None, in_index: torch.Tensor | None) -> None:
    weight = old.conv.weight
    if out_index is not None:
        weight = weight[out_index]
    if in_index is not None:
        weight = weight[:, in_index]
    new.conv.weight.copy_(weight)
    for name in ("weight", "bias", "running_mean", "running_var"):
        value = getattr(old.bn, name)
        getattr(new.bn, name).copy_(value[out_index] if out_index is not None else value)
    new.bn.num_batches_tracked.copy_(old.bn.num_batches_tracked)


def _copy_module(new: nn.Module, old: nn.Module) -> None:
    new.load_state_dict(old.state_dict())


def _check_keep(layers: list[PrunableLayer], keep: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    by_name = {layer.name: layer for layer in layers}
    checked = {}
    for name, index in keep.items():
        if name not in by_name:
            raise HFCompressError(f"{name!r} is not a prunable layer of this model (layers: {', '.join(by_name)})")
        layer = by_name[name]
        index = torch.as_tensor(index, dtype=torch.long).flatten().sort().values.cpu()
        if len(index) < layer.min_width:
            raise HFCompressError(
                f"pruning would leave layer {name} with {len(index)} channels; it must keep at least {layer.min_width} "
                "(a plain layer cannot be removed without retraining its successor from scratch)"
            )
        if len(index) and (index[0] < 0 or index[-1] >= layer.width or len(index.unique()) != len(index)):
            raise HFCompressError(f"kept channels of {name} must be distinct indices in [0, {layer.width - 1}]")
        checked[name] = index
    return checked


def _conv_chain(new_layers, old_layers, names: list[str], keep: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """Copies a chain of conv layers, each reading the kept channels of the one before; returns the last kept index."""
    previous = None
    for new, old, name in zip(new_layers, old_layers, names):
        out_index = keep.get(name)
        _copy_conv_layer(new, old, out_index, previous)
        previous = out_index
    return previous


def _plain_layout(model: PrunedCNNForImageClassification, keep: dict[str, torch.Tensor]) -> list:
    """`plain_layers` of the shrunk plain net ("M" pooling entries stay)."""
    widths = iter(len(keep.get(f"plain.{i}", range(layer.conv.out_channels))) for i, layer in enumerate(model.cnn.layers))
    return [item if item == "M" else next(widths) for item in model.config.plain_layers]


def _resnet_layout(config: PrunedCNNConfig, keep: dict[str, torch.Tensor]) -> tuple[list, list[list[int]]]:
    """`block_widths` of the shrunk residual net, and the old index of each block kept, per stage."""
    relu = config.hidden_act == "relu"
    specs = config.blocks()
    block_widths, old_blocks = [], []
    for s, stage in enumerate(config.block_widths):
        kept_stage = []
        for b, widths in enumerate(stage):
            new_widths = [len(keep.get(f"stage{s}.block{b}.conv{j}", range(w))) for j, w in enumerate(widths)]
            if 0 in new_widths:
                new_widths = [0] * len(widths)
            spec = next(x for x in specs if x["stage"] == s and x["index"] == b)
            if new_widths[0] == 0 and spec["shortcut"] == "identity" and relu:
                continue  # the block computes the identity: it leaves the network
            kept_stage.append((b, new_widths))
        if not kept_stage:
            # Every block of the stage became the identity: keep one empty block (no MACs) so the stage exists.
            kept_stage.append((0, [0] * len(stage[0])))
        block_widths.append([w for _, w in kept_stage])
        old_blocks.append([b for b, _ in kept_stage])
    return block_widths, old_blocks


def _copy_plain(new_model, model, keep: dict[str, torch.Tensor]) -> None:
    names = [f"plain.{i}" for i in range(len(model.cnn.layers))]
    last = _conv_chain(new_model.cnn.layers, model.cnn.layers, names, keep)
    # The first classifier linear layer reads one pooled feature per channel of the last conv.
    state = dict(model.classifier.state_dict())
    first_key = "hidden.0.weight" if model.config.classifier_hidden else "output.weight"
    if last is not None:
        state[first_key] = state[first_key][:, last]
    new_model.classifier.load_state_dict(state)


def _copy_resnet(new_model, model, keep: dict[str, torch.Tensor], old_blocks: list[list[int]]) -> None:
    _copy_module(new_model.cnn.stem, model.cnn.stem)
    for s, (new_stage, kept) in enumerate(zip(new_model.cnn.stages, old_blocks)):
        for new_block, b in zip(new_stage, kept):
            old_block = model.cnn.stages[s][b]
            _copy_module(new_block.shortcut, old_block.shortcut)
            names = [f"stage{s}.block{b}.conv{j}" for j in range(len(old_block.convs))]
            _conv_chain(new_block.convs, old_block.convs, names, keep)  # nothing to copy into an emptied branch
    _copy_module(new_model.classifier, model.classifier)


@torch.no_grad()
def shrink(model: PrunedCNNForImageClassification, keep: dict[str, torch.Tensor]) -> PrunedCNNForImageClassification:
    """A new, smaller model that keeps, for each prunable layer named in `keep`, only those output channels.

    Layers not named keep all their channels. The result has its own config (new widths; a residual block
    whose branch is emptied keeps only its shortcut, and disappears when that is the identity) and fresh
    tensors holding the kept weights, on the same device and dtype as `model`.
    """
    keep = _check_keep(prunable_layers(model), keep)
    config: PrunedCNNConfig = model.config
    new_dict = copy.deepcopy(config.to_dict())
    for key in ("num_parameters", "num_macs", "auto_map", "architectures", "transformers_version"):
        new_dict.pop(key, None)  # recomputed or rewritten for the new model
    if config.architecture == "plain":
        new_dict["plain_layers"] = _plain_layout(model, keep)
    else:
        new_dict["block_widths"], old_blocks = _resnet_layout(config, keep)
    parameter = next(model.parameters())
    new_model = PrunedCNNForImageClassification(PrunedCNNConfig.from_dict(new_dict))
    new_model.to(device=parameter.device, dtype=parameter.dtype).train(model.training)
    if config.architecture == "plain":
        _copy_plain(new_model, model, keep)
    else:
        _copy_resnet(new_model, model, keep, old_blocks)
    new_model.config.compression = copy.deepcopy(config.compression)
    return new_model


def l1_norm_keep(model: PrunedCNNForImageClassification, ratio: float) -> dict[str, torch.Tensor]:
    """L1-norm filter pruning (Li et al. 2017): each prunable layer keeps its `1 - ratio` filters of largest L1 norm.

    Every layer keeps at least one filter, so uniform pruning never removes a block outright.
    """
    if not 0.0 <= ratio < 1.0:
        raise HFCompressError(f"the L1 pruning ratio must be in [0, 1), got {ratio}")
    keep = {}
    for layer in prunable_layers(model):
        norms = layer.layer.conv.weight.detach().abs().sum(dim=(1, 2, 3))
        count = max(1, int(round(layer.width * (1.0 - ratio))))
        keep[layer.name] = norms.topk(count).indices.sort().values
    return keep


def l1_prune_to_macs(model: PrunedCNNForImageClassification, target_macs: int, steps: int = 30) -> PrunedCNNForImageClassification:
    """The uniform L1-norm pruning whose MACs come closest to `target_macs` from above (bisection on the ratio)."""
    low, high = 0.0, 0.999
    best = model
    for _ in range(steps):
        ratio = (low + high) / 2
        candidate = shrink(model, l1_norm_keep(model, ratio))
        if candidate.config.num_macs >= target_macs:
            low, best = ratio, candidate
        else:
            high = ratio
    return best


def removal_order(model: PrunedCNNForImageClassification, scores: dict[str, torch.Tensor]) -> list[tuple[str, int]]:
    """Every removable filter `(layer name, channel)`, least important first, by `scores` (`{layer: [width]}`).

    A layer's filters stop being removable at its `min_width` (its most important filters stay). Ties are broken
    by network order, then channel, so the order is deterministic.
    """
    layers = prunable_layers(model)
    missing = [layer.name for layer in layers if layer.name not in scores]
    if missing:
        raise HFCompressError(f"no importance scores for layers {', '.join(missing)}")
    ranked = []
    for index, layer in enumerate(layers):
        values = torch.as_tensor(scores[layer.name]).detach().double().cpu().flatten()
        if len(values) != layer.width:
            raise HFCompressError(f"layer {layer.name} has {layer.width} filters but {len(values)} scores")
        # A layer's own most important filters are the last it gives up, so at min_width the least are gone.
        by_score = sorted(range(layer.width), key=lambda c: (float(values[c]), c))
        ranked += [(float(values[c]), index, c, layer.name) for c in by_score[: layer.width - layer.min_width]]
    ranked.sort()
    return [(name, channel) for _, _, channel, name in ranked]


def _keep_without(model: PrunedCNNForImageClassification, removed: list[tuple[str, int]]) -> dict[str, torch.Tensor]:
    gone: dict[str, set[int]] = {}
    for name, channel in removed:
        gone.setdefault(name, set()).add(channel)
    widths = {layer.name: layer.width for layer in prunable_layers(model)}
    return {name: torch.tensor([c for c in range(widths[name]) if c not in channels], dtype=torch.long)
            for name, channels in gone.items()}


def prune_to_macs(model: PrunedCNNForImageClassification, scores: dict[str, torch.Tensor],
                  target_macs: int) -> PrunedCNNForImageClassification:
    """Global-ranking filter pruning: removes the filters of lowest `scores`, in `removal_order`, as many as keep
    the MACs at or above `target_macs` (closest from above, as `l1_prune_to_macs`; an unpruned copy when even the
    first removal goes below). The result never shares tensors with `model`.

    The dependencies are `shrink`'s: a residual branch may empty (its block then leaves the network), a plain
    layer keeps one filter. MACs only fall as filters go, so the count is found by bisection.
    """
    order = removal_order(model, scores)
    low, high = 0, len(order)  # the first `low` removals stay at or above the target; `high` is the last candidate
    best = None
    while low < high:
        middle = (low + high + 1) // 2
        candidate = shrink(model, _keep_without(model, order[:middle]))
        if candidate.config.num_macs >= target_macs:
            low, best = middle, candidate
        else:
            high = middle - 1
    return best if best is not None else shrink(model, {})


def layer_normalized(scores: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each layer's scores divided by their L2 norm (Molchanov et al. 2017), so layers compare in one ranking."""
    return {name: s / s.double().norm().clamp_min(1e-30).to(s.dtype) for name, s in scores.items()}


def taylor_prune_to_macs(model: PrunedCNNForImageClassification, importance: dict[str, torch.Tensor],
                         target_macs: int) -> PrunedCNNForImageClassification:
    """Plain Taylor filter pruning to `target_macs`: `importance` (`importance.taylor_importance`), L2-normalised
    per layer, ranked across layers, pruned by `prune_to_macs`."""
    return prune_to_macs(model, layer_normalized(importance), target_macs)
