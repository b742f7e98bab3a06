"""ClassExitResNet: ResNet with class-exclusion early exits (AICAS 2024)."""

from .configuration_class_exit_resnet import ClassExitResNetConfig
from .modeling_class_exit_resnet import (
    ClassExitHead,
    ClassExitImageClassifierOutput,
    ClassExitResNetForImageClassification,
    ClassExitResNetModel,
    ClassExitResNetPreTrainedModel,
    confidence_stops,
    exclude_classes,
    exit_loss,
    joint_exit_loss,
)

__all__ = [
    "ClassExitHead",
    "ClassExitImageClassifierOutput",
    "ClassExitResNetConfig",
    "ClassExitResNetForImageClassification",
    "ClassExitResNetModel",
    "ClassExitResNetPreTrainedModel",
    "confidence_stops",
    "exclude_classes",
    "exit_loss",
    "joint_exit_loss",
]
