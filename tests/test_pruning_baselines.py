"""The baselines of the class-aware pruning benchmark: plain Taylor importance and global-ranking pruning to a MAC
target (`importance.taylor_importance`, `shrink.removal_order`, `shrink.prune_to_macs`, `shrink.taylor_prune_to_macs`)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import randomize_bn

from hf_compress.class_aware.importance import class_importance, taylor_importance
from hf_compress.class_aware.shrink import (
    layer_normalized,
    prunable_layers,
    prune_to_macs,
    removal_order,
    shrink,
    taylor_prune_to_macs,
)
from hf_compress.data.images import ImageClassificationData
from hf_compress.errors import HFCompressError
from hf_compress.modeling.pruned_cnn import PrunedCNNForImageClassification, resnet_cifar_config, vgg_cifar_config
from hf_compress.vision.counting import count_params_and_macs

torch.set_num_threads(2)




def _images(n_per_class: int, classes: int, side: int, seed: int) -> ImageClassificationData:
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(classes).repeat_interleave(n_per_class)
    images = torch.randint(0, 256, (len(labels), 3, side, side), generator=g, dtype=torch.uint8)
    return ImageClassificationData(images, labels, [f"c{i}" for i in range(classes)])


def _finite_difference_scores(model, x: torch.Tensor, label: int, conv: torch.nn.Conv2d, eps: float = 1e-6) -> list[float]:
    """|mean over positions of a * dL/da| of each filter of `conv`, from the derivative of the loss when the filter's
    output map is scaled by (1 + eps): no autograd, an independent route to the Taylor score."""
    scores = []
    for f in range(conv.out_channels):
        losses, positions = [], 0
        for sign in (1, -1):
            def hook(module, inputs, output, f=f, sign=sign):
                nonlocal positions
                positions = output.shape[2] * output.shape[3]
                output = output.clone()
                output[:, f] *= 1 + sign * eps
                return output

            handle = conv.register_forward_hook(hook)
            with torch.no_grad():
                logits = model(pixel_values=x).logits
            handle.remove()
            losses.append(torch.nn.functional.cross_entropy(logits, torch.tensor([label])))
        scores.append(abs(float((losses[0] - losses[1]) / (2 * eps))) / positions)
    return scores


@pytest.mark.parametrize("config", [
    resnet_cifar_config(8, (3, 4, 5), num_labels=3, image_size=8),
    vgg_cifar_config([4, "M", 3], (), num_labels=3, image_size=8),
], ids=["resnet", "plain"])
def test_taylor_importance_is_the_mean_finite_difference_score_over_the_class_aware_images(config):
    torch.manual_seed(0)
    model = PrunedCNNForImageClassification(config).double().eval()
    randomize_bn(model)
    data = _images(4, 3, 8, seed=1)
    images_per_class = 3  # the 4th image of each class is not scored, as in class_importance
    scored = [i for i in range(len(data)) if i % 4 < images_per_class]
    layers = prunable_layers(model)
    expected = {layer.name: np.zeros(layer.width) for layer in layers}
    for i in scored:
        x = data.normalize(data.images[i : i + 1]).double()
        for layer in layers:
            expected[layer.name] += np.array(_finite_difference_scores(model, x, int(data.labels[i]), layer.layer.conv))
    model.train()  # scored in eval mode (BN running statistics: images independent), then restored
    result = taylor_importance(model, data, images_per_class=images_per_class, batch_size=2)
    assert model.training
    assert set(result) == {layer.name for layer in layers}
    for layer in layers:
        np.testing.assert_allclose(result[layer.name].double().numpy(), expected[layer.name] / len(scored), rtol=1e-5,
                                   atol=1e-9)


def test_class_importance_is_unchanged_by_the_shared_scoring_loop():
    """`class_importance` now shares its image loop with `taylor_importance`: usage still equals a direct count."""
    torch.manual_seed(2)
    model = PrunedCNNForImageClassification(resnet_cifar_config(8, (4, 4, 6), num_labels=2, image_size=8)).eval()
    randomize_bn(model, seed=2)
    data = _images(5, 2, 8, seed=3)
    from hf_compress.class_aware.importance import taylor_scores

    layers = prunable_layers(model)
    result = class_importance(model, data, images_per_class=4, used_threshold=1.0, class_threshold=0.5, batch_size=3)
    for k in range(2):
        subset = data.of_class(k, 4)
        t = taylor_scores(model, subset.normalize(subset.images), subset.labels, layers)
        for layer in layers:
            scores = t[layer.name]
            used = (scores >= scores.mean(dim=1, keepdim=True)).float().mean(0)
            assert torch.allclose(result.usage[layer.name][k], used, atol=1e-6)
    assert model.training is False


def _plain_macs(layout: list, in_channels: int, side: int, hidden: list[int], labels: int) -> int:
    """MACs of a plain CIFAR net (3x3 convs, padding 1, 2x2 max pooling, then linear layers) from its layout."""
    total, c = 0, in_channels
    for item in layout:
        if item == "M":
            side //= 2
            continue
        total += c * item * 9 * side * side
        c = item
    for width in [*hidden, labels]:
        total += c * width
        c = width
    return total


def _kept_channels(new, old) -> list[int]:
    """Which of `old`'s filters a shrunk layer kept, found by their (random, distinct) BN scale and shift."""
    pairs = [(float(w), float(b)) for w, b in zip(old.bn.weight.detach(), old.bn.bias.detach())]
    return [pairs.index((float(w), float(b))) for w, b in zip(new.bn.weight.detach(), new.bn.bias.detach())]


def test_global_ranking_prunes_the_lowest_normalised_scores_down_to_the_closest_mac_count_above_the_target():
    torch.manual_seed(0)
    layout, hidden = [6, "M", 5, 7], [9]
    model = PrunedCNNForImageClassification(vgg_cifar_config(layout, tuple(hidden), num_labels=3, image_size=8)).eval()
    randomize_bn(model)
    assert count_params_and_macs(model, (3, 8, 8)).macs == _plain_macs(layout, 3, 8, hidden, 3)  # the formula holds
    g = torch.Generator().manual_seed(5)
    scores = {layer.name: torch.rand(layer.width, generator=g) * (10 ** i) for i, layer in enumerate(prunable_layers(model))}

    # Independent ranking: L2-normalise each layer, sort all filters, each layer keeps its best one (min width 1).
    entries = []
    for i, layer in enumerate(prunable_layers(model)):
        s = scores[layer.name].double().numpy()
        normalised = s / np.sqrt((s ** 2).sum())
        best = int(np.argmax(s))
        entries += [(normalised[c], i, c) for c in range(layer.width) if c != best]
    entries.sort()
    assert removal_order(model, layer_normalized(scores)) == [(f"plain.{i}", c) for _, i, c in entries]

    widths0 = [w for w in layout if w != "M"]
    full = _plain_macs(layout, 3, 8, hidden, 3)
    for target in (full, int(full * 0.7), int(full * 0.45), 1):
        # Largest k whose first k removals keep the formula's MACs at or above the target.
        best_k = 0
        for k in range(len(entries) + 1):
            widths = list(widths0)
            for _, i, _ in entries[:k]:
                widths[i] -= 1
            it = iter(widths)
            if _plain_macs([x if x == "M" else next(it) for x in layout], 3, 8, hidden, 3) >= target:
                best_k = k
        small = taylor_prune_to_macs(model, scores, target)
        macs = count_params_and_macs(small, (3, 8, 8)).macs
        assert macs >= target
        removed = {(i, c) for _, i, c in entries[:best_k]}
        for i, (new, old) in enumerate(zip(small.cnn.layers, model.cnn.layers)):
            assert _kept_channels(new, old) == [c for c in range(old.conv.out_channels) if (i, c) not in removed]
        assert small is not model and all(p.data_ptr() != q.data_ptr() for p, q in zip(small.parameters(), model.parameters()))


def test_taylor_pruning_of_a_resnet_removes_silent_filters_first_and_keeps_the_logits():
    """Filters whose BN scale and shift are zero contribute nothing and get a zero Taylor score (dL/da = 0 through a
    zero BN scale): pruning to the MACs of the network without them removes exactly them, and the logits stay."""
    torch.manual_seed(1)
    model = PrunedCNNForImageClassification(resnet_cifar_config(14, (4, 6, 8), num_labels=3, image_size=8)).eval()
    randomize_bn(model, seed=4)
    silent = {"stage0.block0.conv0": [1, 3], "stage1.block1.conv0": [0, 2, 5], "stage2.block0.conv0": [7]}
    layers = {layer.name: layer for layer in prunable_layers(model)}
    for name, channels in silent.items():
        layers[name].layer.bn.weight.data[channels] = 0
        layers[name].layer.bn.bias.data[channels] = 0
    data = _images(3, 3, 8, seed=0)
    importance = taylor_importance(model, data, images_per_class=3)
    for name, scores in importance.items():
        zero = set(torch.nonzero(scores == 0).flatten().tolist())
        assert zero == set(silent.get(name, [])), name
    keep = {name: torch.tensor([c for c in range(layers[name].width) if c not in channels])
            for name, channels in silent.items()}
    target = count_params_and_macs(shrink(model, keep), (3, 8, 8)).macs
    small = taylor_prune_to_macs(model, importance, target).eval()
    assert count_params_and_macs(small, (3, 8, 8)).macs == target == small.config.num_macs
    x = data.normalize(data.images)
    with torch.no_grad():
        assert torch.allclose(small(pixel_values=x).logits, model(pixel_values=x).logits, atol=1e-5)


def test_a_residual_branch_with_the_lowest_scores_leaves_the_network():
    torch.manual_seed(0)
    model = PrunedCNNForImageClassification(resnet_cifar_config(14, (4, 6, 8), num_labels=3, image_size=8)).eval()
    scores = {layer.name: torch.full((layer.width,), 1.0) for layer in prunable_layers(model)}
    scores["stage0.block1.conv0"] = torch.zeros(4)  # an identity-shortcut block: it leaves the network entirely
    full = count_params_and_macs(model, (3, 8, 8))
    # Its branch costs two 4x4 3x3 convs at 8x8: the target is the network without it.
    target = full.macs - 2 * 4 * 4 * 9 * 64
    small = prune_to_macs(model, scores, target)
    assert small.config.block_widths[0] == [[4]] and count_params_and_macs(small, (3, 8, 8)).macs == target
    with pytest.raises(HFCompressError, match="no importance scores"):
        prune_to_macs(model, {"stage0.block0.conv0": torch.ones(4)}, target)
