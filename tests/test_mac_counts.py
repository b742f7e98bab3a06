"""Every MAC count of the vision families, checked against torch's own FLOP counter on the same forward.

`torch.utils.flop_counter.FlopCounterMode` counts 2 FLOPs per multiply-add of the convolutions and matrix products
that actually run (bias additions, batch norm, pooling and activations are not counted), which is the HRank
convention of the pruning literature: MACs = FLOPs / 2. The counters checked here are the configs' shape-based
counts (`PrunedCNNConfig.num_macs`, `ClassExitResNet.unit_macs`), the hook-based `count_params_and_macs`, and the
per-sample MACs that early-exit inference reports.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from hf_compress.modeling.class_exit_resnet import ClassExitResNetConfig, ClassExitResNetForImageClassification
from hf_compress.modeling.pruned_cnn import PrunedCNNConfig, PrunedCNNForImageClassification, resnet_cifar_config
from hf_compress.vision.counting import count_params_and_macs

torch.set_num_threads(1)


def measured_macs(model: torch.nn.Module, pixel_values: torch.Tensor, **kwargs) -> int:
    """Multiply-adds of one forward, from torch's FLOP counter."""
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(pixel_values=pixel_values, **kwargs)
    flops = counter.get_total_flops()
    assert flops % 2 == 0
    return flops // 2


def _labels(n: int) -> dict:
    return {"id2label": {i: str(i) for i in range(n)}, "label2id": {str(i): i for i in range(n)}}


def _pruned_resnet_config() -> PrunedCNNConfig:
    """A CIFAR ResNet-14 at 8/16/32 whose inner widths were cut, one block's branch removed entirely."""
    config = resnet_cifar_config(14, (8, 16, 32), **_labels(10))
    widths = config.block_widths
    widths[0][0] = [3]
    widths[1][1] = [0]  # the block computes its shortcut only
    widths[2][0] = [17]
    return PrunedCNNConfig(**{**config.to_dict(), "block_widths": widths, "num_macs": None, "num_parameters": None})


@pytest.mark.parametrize("name", ["resnet14", "pruned-resnet14", "vgg"])
def test_pruned_cnn_counts_match_torch_flop_counter(name):
    if name == "resnet14":
        config = resnet_cifar_config(14, (8, 16, 32), **_labels(10))
    elif name == "pruned-resnet14":
        config = _pruned_resnet_config()
    else:
        config = PrunedCNNConfig(architecture="plain", plain_layers=[8, "M", 12, 16, "M", 20], classifier_hidden=[24],
                                 **_labels(10))
    model = PrunedCNNForImageClassification(config).eval()
    measured = measured_macs(model, torch.randn(1, 3, 32, 32))
    assert config.num_macs == measured
    counts = count_params_and_macs(model)
    assert counts.macs == measured
    assert counts.params == config.num_parameters == sum(p.numel() for p in model.parameters())


def test_pruning_removes_exactly_the_measured_macs():
    full = PrunedCNNForImageClassification(resnet_cifar_config(14, (8, 16, 32), **_labels(10))).eval()
    pruned = PrunedCNNForImageClassification(_pruned_resnet_config()).eval()
    x = torch.randn(1, 3, 32, 32)
    assert pruned.config.num_macs < full.config.num_macs
    assert full.config.num_macs - pruned.config.num_macs == measured_macs(full, x) - measured_macs(pruned, x)


def _exit_model(thresholds: list[float], rule: str = "class_exclusion") -> ClassExitResNetForImageClassification:
    config = ClassExitResNetConfig(
        num_labels=4, embedding_size=4, hidden_sizes=[4, 8], depths=[2, 2], exit_rule=rule,
        exit_positions=["stem", "stage1.1", "stage1", "stage2.1"], exit_pool_size=2, exit_thresholds=thresholds,
    )
    torch.manual_seed(0)
    return ClassExitResNetForImageClassification(config).eval()


def test_class_exit_full_forward_counts_match_torch_flop_counter():
    model = _exit_model([0.0, 0.0, 0.0, 0.0])
    x = torch.randn(1, 3, 16, 16)
    units, heads, classifier = model.unit_macs(16, 16)
    # Full mode runs every head: backbone, the four heads and the final classifier.
    assert sum(units) + sum(heads) + classifier == measured_macs(model, x, early_exit=False)
    assert count_params_and_macs(model, (3, 16, 16), {"early_exit": False}).macs == measured_macs(model, x, early_exit=False)
    # Without heads, what `full_macs` reports.
    plain = _exit_model([0.0, 0.0, 0.0, 0.0])
    plain.exit_heads = torch.nn.ModuleList()
    plain.exit_units = []
    assert model.full_macs(16, 16) == measured_macs(plain, x, early_exit=False)


@pytest.mark.parametrize("rule, thresholds", [
    ("class_exclusion", [0.0, 0.0, 0.0, 0.0]),  # every exit disabled: the full network
    ("class_exclusion", [0.0, 0.9, 0.0, 0.0]),  # one head evaluated, the sample may or may not leave
    ("class_exclusion", [0.99, 0.99, 0.99, 0.99]),  # aggressive: leaves early
    ("confidence", [0.26, 1.0, 1.0, 1.0]),  # a confidence above 1/4 always holds: stops at the stem
    ("confidence", [1.0, 1.0, 0.9999, 1.0]),  # evaluated, rarely stops
])
def test_early_exit_reported_macs_are_what_ran(rule, thresholds):
    """For one image, the MACs early-exit inference reports equal what torch counted for that forward."""
    model = _exit_model(thresholds, rule)
    generator = torch.Generator().manual_seed(1)
    for _ in range(3):
        x = torch.randn(1, 3, 16, 16, generator=generator)
        with torch.no_grad():
            out = model(pixel_values=x)
        assert int(out.macs[0]) == measured_macs(model, x)
