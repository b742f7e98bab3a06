"""ClassExitResNet configuration: a ResNet backbone with intermediate exits that exclude classes.

Standalone remote code: imports only the standard library and transformers.
"""

from __future__ import annotations

import re
from typing import Any

from transformers import PreTrainedConfig

EXIT_RULES = ("class_exclusion", "confidence")
_POSITION = re.compile(r"^stage(\d+)(?:\.(\d+))?$")


class ClassExitResNetConfig(PreTrainedConfig):
    r"""
    Configuration of [`ClassExitResNetForImageClassification`].

    The backbone fields follow transformers' `ResNetConfig` (same names and meaning, so a stock
    `ResNetForImageClassification` converts weight for weight), plus `stem_type` and `shortcut_type` for the
    CIFAR ResNets of He et al. (3x3 stem without max pool, parameter-free zero-padding shortcuts).

    Args:
        num_channels (`int`, defaults to 3): input image channels.
        image_size (`int`, defaults to 32): input side the checkpoint was trained at (its image processor resizes
            to it); the network itself accepts any size.
        stem_type (`str`, defaults to `"cifar"`): `"cifar"` (3x3 conv, stride 1, no pooling) or `"imagenet"`
            (7x7 conv stride 2 then 3x3 max pool stride 2, as transformers' ResNet).
        embedding_size (`int`, defaults to 16): stem width.
        hidden_sizes (`list[int]`, defaults to `[16, 32, 64]`): output width of each stage.
        depths (`list[int]`, defaults to `[9, 9, 9]`): residual blocks per stage (ResNet-56 by default).
        layer_type (`str`, defaults to `"basic"`): `"basic"` (two 3x3 convs) or `"bottleneck"` (1x1-3x3-1x1).
        shortcut_type (`str`, defaults to `"projection"`): `"projection"` (1x1 conv + BN where the shape changes,
            as transformers) or `"zero_pad"` (subsample and pad channels with zeros, He et al. option A).
        downsample_in_first_stage (`bool`, defaults to `False`): stride 2 in the first block of stage 1.
        downsample_in_bottleneck (`bool`, defaults to `False`): stride on the first 1x1 conv of a bottleneck.
        hidden_act (`str`, defaults to `"relu"`): activation after each residual addition.
        exit_positions (`list[str]`, defaults to `["stage1", "stage2"]`): where exits attach, in network order:
            `"stem"`, `"stageI"` (after the last block of stage I) or `"stageI.J"` (after block J of stage I,
            both 1-based). The end of the last stage is the final classifier, not an exit.
        exit_pool_size (`int`, defaults to 2): output side of the adaptive average pooling of each exit head.
        exit_rule (`str`, defaults to `"class_exclusion"`): `"class_exclusion"` (sigmoid scores, keep class k
            while s_k > beta * max s, stop when one class is left) or `"confidence"` (baseline: stop when the
            max softmax probability exceeds the threshold).
        exit_thresholds (`list[float]`, *optional*): one per exit. Class exclusion: beta in [0, 1), where 0
            disables the exit (its head is not even evaluated). Confidence: threshold in (0, 1], where 1
            disables the exit. Defaults to every exit disabled.
        compression (`dict`, *optional*): provenance written by hf-compress (method, source, search results).
    """

    model_type = "class_exit_resnet"

    num_channels: int = 3
    image_size: int = 32
    stem_type: str = "cifar"
    embedding_size: int = 16
    hidden_sizes: list[int] | tuple[int, ...] = (16, 32, 64)
    depths: list[int] | tuple[int, ...] = (9, 9, 9)
    layer_type: str = "basic"
    shortcut_type: str = "projection"
    downsample_in_first_stage: bool = False
    downsample_in_bottleneck: bool = False
    hidden_act: str = "relu"
    exit_positions: list[str] | tuple[str, ...] = ("stage1", "stage2")
    exit_pool_size: int = 2
    exit_rule: str = "class_exclusion"
    exit_thresholds: list[float] | tuple[float, ...] | None = None
    compression: dict[str, Any] | None = None

    def __post_init__(self, **kwargs):
        self.hidden_sizes = [int(size) for size in self.hidden_sizes]
        self.depths = [int(depth) for depth in self.depths]
        self.exit_positions = [str(position) for position in self.exit_positions]
        if self.exit_thresholds is None:
            self.exit_thresholds = [self.disabled_threshold] * len(self.exit_positions)
        self.exit_thresholds = [float(value) for value in self.exit_thresholds]
        super().__post_init__(**kwargs)
        self.validate_backbone()
        self.validate_exits()

    @property
    def disabled_threshold(self) -> float:
        """The threshold value that turns an exit off for this config's rule."""
        return 1.0 if self.exit_rule == "confidence" else 0.0

    @property
    def num_exits(self) -> int:
        return len(self.exit_positions)

    @property
    def num_blocks(self) -> int:
        return sum(self.depths)

    def validate_backbone(self) -> None:
        if self.stem_type not in ("cifar", "imagenet"):
            raise ValueError(f"stem_type must be 'cifar' or 'imagenet', got {self.stem_type!r}")
        if self.layer_type not in ("basic", "bottleneck"):
            raise ValueError(f"layer_type must be 'basic' or 'bottleneck', got {self.layer_type!r}")
        if self.shortcut_type not in ("projection", "zero_pad"):
            raise ValueError(f"shortcut_type must be 'projection' or 'zero_pad', got {self.shortcut_type!r}")
        if not self.depths or len(self.depths) != len(self.hidden_sizes):
            raise ValueError(
                f"depths ({self.depths}) and hidden_sizes ({self.hidden_sizes}) must be non-empty and of equal length"
            )
        if any(depth < 1 for depth in self.depths) or any(size < 1 for size in self.hidden_sizes):
            raise ValueError(f"depths and hidden_sizes must be positive, got {self.depths} and {self.hidden_sizes}")
        if self.shortcut_type == "zero_pad":
            widths = [self.embedding_size, *self.hidden_sizes]
            if self.layer_type != "basic" or any(b < a for a, b in zip(widths, widths[1:])):
                raise ValueError("shortcut_type='zero_pad' needs basic blocks and non-decreasing widths")

    def validate_exits(self) -> None:
        if self.exit_rule not in EXIT_RULES:
            raise ValueError(f"exit_rule must be one of {EXIT_RULES}, got {self.exit_rule!r}")
        if self.exit_pool_size < 1:
            raise ValueError(f"exit_pool_size must be >= 1, got {self.exit_pool_size}")
        units = [self.exit_unit(position) for position in self.exit_positions]
        if any(b <= a for a, b in zip(units, units[1:])):
            raise ValueError(f"exit_positions must be distinct and in network order, got {self.exit_positions}")
        if len(self.exit_thresholds) != len(self.exit_positions):
            raise ValueError(
                f"exit_thresholds has {len(self.exit_thresholds)} values but there are "
                f"{len(self.exit_positions)} exits ({self.exit_positions})"
            )
        for position, value in zip(self.exit_positions, self.exit_thresholds):
            if self.exit_rule == "class_exclusion" and not 0.0 <= value < 1.0:
                raise ValueError(
                    f"class-exclusion threshold (beta) of exit {position!r} must be in (0, 1), or 0 to disable "
                    f"the exit; got {value}"
                )
            if self.exit_rule == "confidence" and not 0.0 < value <= 1.0:
                raise ValueError(
                    f"confidence threshold of exit {position!r} must be in (0, 1), or 1 to disable the exit; "
                    f"got {value}"
                )

    def exit_unit(self, position: str) -> int:
        """Index of the backbone unit (0 = stem, then blocks in order) after which `position` sits."""
        if position == "stem":
            return 0
        match = _POSITION.match(position)
        if match is None:
            raise ValueError(f"exit position {position!r} is not 'stem', 'stageI' or 'stageI.J'")
        stage = int(match.group(1))
        if not 1 <= stage <= len(self.depths):
            raise ValueError(
                f"exit position {position!r}: the backbone has stages stage1..stage{len(self.depths)}"
            )
        block = int(match.group(2)) if match.group(2) is not None else self.depths[stage - 1]
        if not 1 <= block <= self.depths[stage - 1]:
            raise ValueError(
                f"exit position {position!r}: stage{stage} has blocks 1..{self.depths[stage - 1]}"
            )
        unit = 1 + sum(self.depths[: stage - 1]) + block - 1
        if unit == self.num_blocks:
            raise ValueError(
                f"exit position {position!r} is the end of the network, where the final classifier already sits"
            )
        return unit


__all__ = ["ClassExitResNetConfig"]
