"""PrunedCNN: CNNs with explicit per-layer widths, the output of class-aware pruning (DATE 2024)."""

from .configuration_pruned_cnn import VGG16_LAYERS, PrunedCNNConfig, resnet_cifar_config, vgg_cifar_config
from .modeling_pruned_cnn import (
    PrunedCNNBlock,
    PrunedCNNConvLayer,
    PrunedCNNForImageClassification,
    PrunedCNNModel,
    PrunedCNNPreTrainedModel,
    PrunedCNNZeroPadShortcut,
)

__all__ = [
    "VGG16_LAYERS",
    "PrunedCNNBlock",
    "PrunedCNNConfig",
    "PrunedCNNConvLayer",
    "PrunedCNNForImageClassification",
    "PrunedCNNModel",
    "PrunedCNNPreTrainedModel",
    "PrunedCNNZeroPadShortcut",
    "resnet_cifar_config",
    "vgg_cifar_config",
]
