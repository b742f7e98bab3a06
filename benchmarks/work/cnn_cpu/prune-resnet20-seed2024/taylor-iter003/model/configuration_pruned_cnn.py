"""PrunedCNN configuration: a CNN described layer by layer, so that any pruned shape can be expressed.

Standalone remote code: imports only the standard library and transformers.
"""

from __future__ import annotations

import copy
from typing import Any

from transformers import PreTrainedConfig

ARCHITECTURES = ("plain", "resnet")


def _conv_out(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


class PrunedCNNConfig(PreTrainedConfig):
    r"""
    Configuration of [`PrunedCNNForImageClassification`]: every width of the network is explicit.

    Two layouts:
    - `"plain"` (VGG-style): `plain_layers` lists conv widths (3x3, padding 1, BN, activation) and `"M"` for a
      2x2 max pool; a pruned layer simply has a smaller width, a removed one is absent from the list. Then
      global average pooling, `classifier_hidden` linear layers (Linear, BN, activation) and the output layer.
    - `"resnet"`: a stem (conv `stem_kernel_size` / `stem_stride`, BN, activation, optionally a 3x3 max pool
      with stride 2), then stages. `hidden_sizes[s]` is the output width of stage `s` (fixed by the residual
      additions), `stage_strides[s]` the stride of its first block, and `block_widths[s][b]` the inner widths
      of block `b`: `[w]` for a basic block (3x3 conv to w, 3x3 conv back to the stage width), `[w1, w2]` for a
      bottleneck (1x1 to w1, 3x3 to w2, 1x1 back). A width of 0 removes the block's residual branch, leaving
      its shortcut only. Shortcuts where the shape changes are `"projection"` (1x1 conv + BN, as transformers'
      ResNet) or `"zero_pad"` (subsample and pad channels with zeros, He et al.'s CIFAR option A).

    Args:
        architecture (`str`, defaults to `"resnet"`): `"plain"` or `"resnet"`.
        num_channels (`int`, defaults to 3): input image channels.
        image_size (`int`, defaults to 32): input side used for the stored MAC count.
        plain_layers (`list`, *optional*): plain layout, conv widths and `"M"` markers.
        classifier_hidden (`list[int]`, defaults to `[]`): hidden linear widths before the output layer.
        stem_width (`int`, defaults to 16), stem_kernel_size (`int`, defaults to 3), stem_stride (`int`, defaults to 1),
        stem_pool (`bool`, defaults to `False`): the ResNet stem.
        layer_type (`str`, defaults to `"basic"`): `"basic"` or `"bottleneck"`.
        hidden_sizes (`list[int]`), stage_strides (`list[int]`), block_widths (`list[list[list[int]]]`): stages.
        shortcut_type (`str`, defaults to `"zero_pad"`): `"zero_pad"` or `"projection"`.
        downsample_in_bottleneck (`bool`, defaults to `False`): stride on the first 1x1 conv of a bottleneck.
        hidden_act (`str`, defaults to `"relu"`): activation (a transformers `ACT2FN` name).
        num_parameters, num_macs (`int`, *optional*): parameters and conv+linear multiply-adds at batch 1,
            filled in from the widths (`count()`); any given value is replaced.
        compression (`dict`, *optional*): provenance written by hf-compress (method, source, results per iteration).

    The default is ResNet-56 for CIFAR (16/32/64 channels, 9 basic blocks per stage, option-A shortcuts).
    """

    model_type = "pruned_cnn"

    architecture: str = "resnet"
    num_channels: int = 3
    image_size: int = 32
    plain_layers: list[Any] | None = None
    classifier_hidden: list[int] | tuple[int, ...] = ()
    stem_width: int = 16
    stem_kernel_size: int = 3
    stem_stride: int = 1
    stem_pool: bool = False
    layer_type: str = "basic"
    hidden_sizes: list[int] | tuple[int, ...] = (16, 32, 64)
    stage_strides: list[int] | tuple[int, ...] = (1, 2, 2)
    block_widths: list[Any] | None = None
    shortcut_type: str = "zero_pad"
    downsample_in_bottleneck: bool = False
    hidden_act: str = "relu"
    num_parameters: int | None = None
    num_macs: int | None = None
    compression: dict[str, Any] | None = None

    def __post_init__(self, **kwargs):
        self.classifier_hidden = [int(w) for w in self.classifier_hidden]
        self.hidden_sizes = [int(w) for w in self.hidden_sizes]
        self.stage_strides = [int(s) for s in self.stage_strides]
        if self.plain_layers is not None:
            self.plain_layers = [item if item == "M" else int(item) for item in self.plain_layers]
        if self.block_widths is None:
            inner = 1 if self.layer_type == "basic" else 2
            # Bottleneck inner width defaults to a quarter of the output, as in transformers' ResNet.
            self.block_widths = [
                [[size if self.layer_type == "basic" else size // 4] * inner for _ in range(9)] for size in self.hidden_sizes
            ]
        self.block_widths = [[[int(w) for w in block] for block in stage] for stage in self.block_widths]
        super().__post_init__(**kwargs)
        self.validate_layout()
        self.num_parameters, self.num_macs = self.count()

    # -- validation -------------------------------------------------------------------------------------

    def validate_layout(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"architecture must be one of {ARCHITECTURES}, got {self.architecture!r}")
        if any(w < 1 for w in self.classifier_hidden):
            raise ValueError(f"classifier_hidden widths must be positive, got {self.classifier_hidden}")
        if self.architecture == "plain":
            if not self.plain_layers or not any(item != "M" for item in self.plain_layers):
                raise ValueError("a plain network needs plain_layers with at least one conv width")
            if any(item != "M" and item < 1 for item in self.plain_layers):
                raise ValueError(
                    f"plain_layers widths must be positive (remove the entry to remove a layer), got {self.plain_layers}"
                )
            return
        if self.layer_type not in ("basic", "bottleneck"):
            raise ValueError(f"layer_type must be 'basic' or 'bottleneck', got {self.layer_type!r}")
        if self.shortcut_type not in ("projection", "zero_pad"):
            raise ValueError(f"shortcut_type must be 'projection' or 'zero_pad', got {self.shortcut_type!r}")
        if self.stem_width < 1 or any(w < 1 for w in self.hidden_sizes):
            raise ValueError(f"stem_width and hidden_sizes must be positive, got {self.stem_width}, {self.hidden_sizes}")
        if not (len(self.hidden_sizes) == len(self.stage_strides) == len(self.block_widths) > 0):
            raise ValueError(
                f"hidden_sizes ({len(self.hidden_sizes)}), stage_strides ({len(self.stage_strides)}) and block_widths "
                f"({len(self.block_widths)}) must describe the same non-zero number of stages"
            )
        inner = 1 if self.layer_type == "basic" else 2
        for s, stage in enumerate(self.block_widths):
            if not stage:
                raise ValueError(f"stage {s} has no block")
            for b, block in enumerate(stage):
                if len(block) != inner or any(w < 0 for w in block):
                    raise ValueError(
                        f"block_widths[{s}][{b}] = {block}: a {self.layer_type} block needs {inner} non-negative width(s)"
                    )
                if 0 in block and any(block):
                    raise ValueError(
                        f"block_widths[{s}][{b}] = {block}: a zero width removes the residual branch, so every "
                        "inner width of that block must be 0"
                    )
        if self.shortcut_type == "zero_pad":
            widths = [self.stem_width, *self.hidden_sizes]
            if any(b < a for a, b in zip(widths, widths[1:])):
                raise ValueError(f"zero_pad shortcuts need non-decreasing widths, got {widths}")

    # -- derived layout -----------------------------------------------------------------------------------

    def blocks(self) -> list[dict[str, Any]]:
        """Each ResNet block in order: stage, index, in/out width, stride, inner widths, shortcut kind."""
        result = []
        in_width = self.stem_width
        for s, (out_width, stride, stage) in enumerate(zip(self.hidden_sizes, self.stage_strides, self.block_widths)):
            for b, widths in enumerate(stage):
                block_stride = stride if b == 0 else 1
                reshapes = block_stride != 1 or in_width != out_width
                shortcut = ("projection" if self.shortcut_type == "projection" else "zero_pad") if reshapes else "identity"
                result.append(
                    {"stage": s, "index": b, "in": in_width, "out": out_width, "stride": block_stride, "widths": list(widths), "shortcut": shortcut}
                )
                in_width = out_width
        return result

    @property
    def feature_width(self) -> int:
        """Channels entering the classifier."""
        if self.architecture == "plain":
            return [item for item in self.plain_layers if item != "M"][-1]
        return self.hidden_sizes[-1]

    def count(self) -> tuple[int, int]:
        """Parameters (all) and conv+linear multiply-adds for one `image_size` input, from the widths alone."""
        params = macs = 0
        size = self.image_size

        def conv(c_in: int, c_out: int, k: int, stride: int, side: int) -> int:
            nonlocal params, macs
            out = _conv_out(side, k, stride, k // 2)
            params += c_out * c_in * k * k + 2 * c_out  # weight, BN scale and shift
            macs += c_out * out * out * c_in * k * k
            return out

        if self.architecture == "plain":
            c_in = self.num_channels
            for item in self.plain_layers:
                if item == "M":
                    size //= 2
                else:
                    size = conv(c_in, item, 3, 1, size)
                    c_in = item
        else:
            size = conv(self.num_channels, self.stem_width, self.stem_kernel_size, self.stem_stride, size)
            if self.stem_pool:
                size = _conv_out(size, 3, 2, 1)
            bottleneck = self.layer_type == "bottleneck"
            for block in self.blocks():
                if block["shortcut"] == "projection":
                    conv(block["in"], block["out"], 1, block["stride"], size)
                if block["widths"][0] > 0:
                    if bottleneck:
                        w1, w2 = block["widths"]
                        first, second = (block["stride"], 1) if self.downsample_in_bottleneck else (1, block["stride"])
                        side = conv(block["in"], w1, 1, first, size)
                        side = conv(w1, w2, 3, second, side)
                        conv(w2, block["out"], 1, 1, side)
                    else:
                        side = conv(block["in"], block["widths"][0], 3, block["stride"], size)
                        conv(block["widths"][0], block["out"], 3, 1, side)
                size = _conv_out(size, 1, block["stride"], 0)
        c_in = self.feature_width
        for width in self.classifier_hidden:
            params += c_in * width + 3 * width  # weight, bias, BN scale and shift
            macs += c_in * width
            c_in = width
        params += c_in * self.num_labels + self.num_labels
        macs += c_in * self.num_labels
        return params, macs

    def to_diff_dict(self) -> dict[str, Any]:
        # The layout fields are always written: a reader should see the shape without knowing the defaults.
        output = super().to_diff_dict()
        for key in ("architecture", "plain_layers", "classifier_hidden", "hidden_sizes", "stage_strides", "block_widths", "layer_type", "shortcut_type", "num_parameters", "num_macs"):
            output[key] = copy.deepcopy(getattr(self, key))
        return output


def resnet_cifar_config(depth: int = 56, widths: tuple[int, int, int] = (16, 32, 64), **kwargs) -> PrunedCNNConfig:
    """He et al.'s CIFAR ResNet-`depth` (depth = 6n + 2): n basic blocks per stage, option-A shortcuts."""
    if (depth - 2) % 6 != 0 or depth < 8:
        raise ValueError(f"a CIFAR ResNet has depth 6n + 2 (20, 32, 44, 56, 110, ...), got {depth}")
    n = (depth - 2) // 6
    return PrunedCNNConfig(
        architecture="resnet",
        stem_width=widths[0],
        hidden_sizes=list(widths),
        stage_strides=[1, 2, 2],
        block_widths=[[[w] for _ in range(n)] for w in widths],
        shortcut_type="zero_pad",
        **kwargs,
    )


VGG16_LAYERS = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512]


def vgg_cifar_config(layers: list[Any] | None = None, classifier_hidden: tuple[int, ...] = (512,), **kwargs) -> PrunedCNNConfig:
    """The CIFAR VGG-16 of the pruning literature (13 convs with BN, 512-512-classes head)."""
    return PrunedCNNConfig(
        architecture="plain", plain_layers=list(layers or VGG16_LAYERS), classifier_hidden=list(classifier_hidden), **kwargs
    )


__all__ = ["PrunedCNNConfig", "resnet_cifar_config", "vgg_cifar_config", "VGG16_LAYERS"]
