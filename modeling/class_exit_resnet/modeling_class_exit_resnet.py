"""ClassExitResNet: a ResNet whose intermediate exits exclude classes (early exit with class exclusion).

Each exit head (adaptive average pooling, one linear layer, read through a sigmoid) gives an independent
"could it be class k" score per class. At inference, exit l keeps class k only while s_k > beta_l * max(s),
so later layers decide among fewer classes; a sample with one class left stops there and leaves the batch.

Standalone remote code: imports only the standard library, torch, transformers and its sibling config.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.utils import ModelOutput

from .configuration_class_exit_resnet import ClassExitResNetConfig


@dataclass
class ClassExitImageClassifierOutput(ModelOutput):
    r"""
    Output of [`ClassExitResNetForImageClassification`].

    Args:
        loss (`torch.FloatTensor`, *optional*): joint exit loss (full mode with `labels`).
        logits (`torch.FloatTensor` of shape `(batch_size, num_labels)`): in full mode, the final classifier's
            logits; in early-exit mode, the logits of the classifier that decided (the exit's head for samples
            that stopped early), with excluded classes set to the dtype's minimum, so argmax is the prediction.
        exit_logits (`tuple(torch.FloatTensor)`, *optional*): full mode: the logits of every exit head.
        exit_indices (`torch.LongTensor` of shape `(batch_size,)`, *optional*): early-exit mode: the exit that
            decided each sample; `num_exits` means the final classifier.
        macs (`torch.LongTensor` of shape `(batch_size,)`, *optional*): early-exit mode: multiply-adds of the
            convolutions and linear layers actually run for each sample, exit heads included.
        candidate_mask (`torch.BoolTensor` of shape `(batch_size, num_labels)`, *optional*): early-exit mode:
            the classes still in the running when the sample was decided.
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    exit_logits: tuple[torch.FloatTensor, ...] | None = None
    exit_indices: torch.LongTensor | None = None
    macs: torch.LongTensor | None = None
    candidate_mask: torch.BoolTensor | None = None


def exclude_classes(logits: torch.Tensor, candidates: torch.Tensor, beta: float) -> torch.Tensor:
    """One class-exclusion step: the candidate mask that survives an exit with threshold `beta`.

    s = sigmoid(logits); class k survives if it is still a candidate and s_k > beta * m, where m is the top
    score among the candidates. The top candidate always survives (so the set is never empty).
    """
    scores = torch.sigmoid(logits.float())
    # Scores lie in [0, 1]; -1 keeps excluded classes out of the max and the argmax.
    masked = scores.masked_fill(~candidates, -1.0)
    top_score, top_class = masked.max(dim=1)
    survivors = candidates & (scores > beta * top_score.unsqueeze(1))
    survivors[torch.arange(len(top_class), device=logits.device), top_class] = True
    return survivors


def confidence_stops(logits: torch.Tensor, threshold: float) -> torch.Tensor:
    """Confidence baseline: which samples stop, i.e. whose max softmax probability exceeds `threshold`."""
    return logits.float().softmax(dim=1).max(dim=1).values > threshold


def exit_loss(logits: torch.Tensor, labels: torch.Tensor, exit_rule: str = "class_exclusion") -> torch.Tensor:
    """The loss of one exit head, in float32 whatever the autocast dtype.

    Class exclusion: binary cross-entropy of each class's sigmoid score against the one-hot label, summed over the
    K classes and averaged over the batch, with no class or positive weighting, so that each score estimates the
    probability of its class and the exclusion rule's ratio s_k / max(s) compares class probabilities.
    Confidence baseline: cross-entropy, since its rule reads a softmax.
    """
    logits = logits.float()
    if exit_rule == "confidence":
        return F.cross_entropy(logits, labels)
    target = F.one_hot(labels, logits.shape[1]).to(logits.dtype)
    return F.binary_cross_entropy_with_logits(logits, target, reduction="sum") / logits.shape[0]


def joint_exit_loss(
    final_logits: torch.Tensor,
    exit_logits: tuple[torch.Tensor, ...] | list[torch.Tensor],
    labels: torch.Tensor,
    exit_rule: str = "class_exclusion",
) -> torch.Tensor:
    """CE on the final output plus sum_i w_i * L_i over the E exits, w_i = 1 / (E - i + 1) (i = 1..E), with L_i the
    exit's own loss (`exit_loss`)."""
    loss = F.cross_entropy(final_logits.float(), labels)
    num_exits = len(exit_logits)
    for i, logits in enumerate(exit_logits, start=1):
        loss = loss + (1.0 / (num_exits - i + 1)) * exit_loss(logits, labels, exit_rule)
    return loss


class ClassExitResNetConvLayer(nn.Module):
    """Conv, batch norm, activation (names as transformers' ResNetConvLayer, so weights map one to one)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1, activation: str | None = "relu"):
        super().__init__()
        self.convolution = nn.Conv2d(
            in_channels, out_channels, kernel_size=kernel_size, stride=stride, padding=kernel_size // 2, bias=False
        )
        self.normalization = nn.BatchNorm2d(out_channels)
        self.activation = ACT2FN[activation] if activation is not None else nn.Identity()

    def forward(self, hidden_state: torch.Tensor) -> torch.Tensor:
        return self.activation(self.normalization(self.convolution(hidden_state)))


class ClassExitResNetEmbeddings(nn.Module):
    """The stem: a 3x3 conv (CIFAR) or a 7x7 stride-2 conv and a max pool (ImageNet layout)."""

    def __init__(self, config: ClassExitResNetConfig):
        super().__init__()
        if config.stem_type == "imagenet":
            self.embedder = ClassExitResNetConvLayer(
                config.num_channels, config.embedding_size, kernel_size=7, stride=2, activation=config.hidden_act
            )
            self.pooler = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        else:
            self.embedder = ClassExitResNetConvLayer(
                config.num_channels, config.embedding_size, kernel_size=3, stride=1, activation=config.hidden_act
            )
            self.pooler = nn.Identity()

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.pooler(self.embedder(pixel_values))


class ClassExitResNetShortCut(nn.Module):
    """Projection shortcut: 1x1 conv (with the block's stride) and batch norm."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 2):
        super().__init__()
        self.convolution = nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False)
        self.normalization = nn.BatchNorm2d(out_channels)

    def forward(self, hidden_state: torch.Tensor) -> torch.Tensor:
        return self.normalization(self.convolution(hidden_state))


class ClassExitResNetZeroPadShortCut(nn.Module):
    """He et al. option A: subsample by the stride and pad the new channels with zeros (no parameters)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 2):
        super().__init__()
        self.stride = stride
        self.pad_before = (out_channels - in_channels) // 2
        self.pad_after = out_channels - in_channels - self.pad_before

    def forward(self, hidden_state: torch.Tensor) -> torch.Tensor:
        hidden_state = hidden_state[:, :, :: self.stride, :: self.stride]
        return F.pad(hidden_state, (0, 0, 0, 0, self.pad_before, self.pad_after))


def _shortcut(config: ClassExitResNetConfig, in_channels: int, out_channels: int, stride: int) -> nn.Module:
    if in_channels == out_channels and stride == 1:
        return nn.Identity()
    if config.shortcut_type == "zero_pad":
        return ClassExitResNetZeroPadShortCut(in_channels, out_channels, stride=stride)
    return ClassExitResNetShortCut(in_channels, out_channels, stride=stride)


class ClassExitResNetBasicLayer(nn.Module):
    """Two 3x3 convs and a residual connection."""

    def __init__(self, config: ClassExitResNetConfig, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        self.shortcut = _shortcut(config, in_channels, out_channels, stride)
        self.layer = nn.Sequential(
            ClassExitResNetConvLayer(in_channels, out_channels, stride=stride),
            ClassExitResNetConvLayer(out_channels, out_channels, activation=None),
        )
        self.activation = ACT2FN[config.hidden_act]

    def forward(self, hidden_state: torch.Tensor) -> torch.Tensor:
        return self.activation(self.layer(hidden_state) + self.shortcut(hidden_state))


class ClassExitResNetBottleNeckLayer(nn.Module):
    """1x1 reduce, 3x3, 1x1 expand (reduction 4) and a residual connection."""

    def __init__(self, config: ClassExitResNetConfig, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        reduced = out_channels // 4
        first_stride = stride if config.downsample_in_bottleneck else 1
        self.shortcut = _shortcut(config, in_channels, out_channels, stride)
        self.layer = nn.Sequential(
            ClassExitResNetConvLayer(in_channels, reduced, kernel_size=1, stride=first_stride),
            ClassExitResNetConvLayer(reduced, reduced, stride=stride // first_stride),
            ClassExitResNetConvLayer(reduced, out_channels, kernel_size=1, activation=None),
        )
        self.activation = ACT2FN[config.hidden_act]

    def forward(self, hidden_state: torch.Tensor) -> torch.Tensor:
        return self.activation(self.layer(hidden_state) + self.shortcut(hidden_state))


class ClassExitResNetStage(nn.Module):
    def __init__(self, config: ClassExitResNetConfig, in_channels: int, out_channels: int, stride: int, depth: int):
        super().__init__()
        block = ClassExitResNetBottleNeckLayer if config.layer_type == "bottleneck" else ClassExitResNetBasicLayer
        self.layers = nn.Sequential(
            block(config, in_channels, out_channels, stride=stride),
            *[block(config, out_channels, out_channels) for _ in range(depth - 1)],
        )


class ClassExitResNetEncoder(nn.Module):
    def __init__(self, config: ClassExitResNetConfig):
        super().__init__()
        widths = [config.embedding_size, *config.hidden_sizes]
        self.stages = nn.ModuleList(
            ClassExitResNetStage(
                config,
                widths[index],
                widths[index + 1],
                stride=(2 if config.downsample_in_first_stage else 1) if index == 0 else 2,
                depth=depth,
            )
            for index, depth in enumerate(config.depths)
        )


class ClassExitResNetModel(nn.Module):
    """The backbone, laid out as transformers' `ResNetModel` (`embedder`, `encoder.stages[i].layers[j]`)."""

    def __init__(self, config: ClassExitResNetConfig):
        super().__init__()
        self.embedder = ClassExitResNetEmbeddings(config)
        self.encoder = ClassExitResNetEncoder(config)
        self.pooler = nn.AdaptiveAvgPool2d((1, 1))

    def units(self) -> list[nn.Module]:
        """The stem, then every residual block in order: the places an exit can follow."""
        return [self.embedder, *[layer for stage in self.encoder.stages for layer in stage.layers]]


def _conv_macs(conv: nn.Conv2d, height: int, width: int) -> tuple[int, int, int]:
    """MACs of `conv` on a `height` x `width` input, and its output size."""
    sizes = []
    for size, k, s, p, d in zip((height, width), conv.kernel_size, conv.stride, conv.padding, conv.dilation):
        sizes.append((size + 2 * p - d * (k - 1) - 1) // s + 1)
    per_output = (conv.in_channels // conv.groups) * conv.kernel_size[0] * conv.kernel_size[1]
    return conv.out_channels * sizes[0] * sizes[1] * per_output, sizes[0], sizes[1]


def _linear_macs(module: nn.Module) -> int:
    return sum(m.in_features * m.out_features for m in module.modules() if isinstance(m, nn.Linear))


def _unit_macs(unit: nn.Module, height: int, width: int) -> tuple[int, int, int]:
    """MACs of one backbone unit (stem or residual block) and its output size."""
    if isinstance(unit, nn.Identity):
        return 0, height, width
    if isinstance(unit, ClassExitResNetEmbeddings):
        macs, height, width = _conv_macs(unit.embedder.convolution, height, width)
        if isinstance(unit.pooler, nn.MaxPool2d):
            height, width = ((size + 2 * 1 - 3) // 2 + 1 for size in (height, width))
        return macs, height, width
    if isinstance(unit, (ClassExitResNetBasicLayer, ClassExitResNetBottleNeckLayer)):
        macs, out_height, out_width = 0, height, width
        for layer in unit.layer:
            cost, out_height, out_width = _conv_macs(layer.convolution, out_height, out_width)
            macs += cost
        if isinstance(unit.shortcut, ClassExitResNetShortCut):
            macs += _conv_macs(unit.shortcut.convolution, height, width)[0]
        return macs, out_height, out_width
    raise TypeError(f"cannot count the MACs of a {type(unit).__name__} backbone unit")


class ClassExitHead(nn.Module):
    """Adaptive average pooling to `pool_size` x `pool_size`, then one linear layer with one output per class."""

    def __init__(self, in_channels: int, pool_size: int, num_labels: int):
        super().__init__()
        self.pooler = nn.AdaptiveAvgPool2d((pool_size, pool_size))
        self.classifier = nn.Linear(in_channels * pool_size * pool_size, num_labels)

    def forward(self, hidden_state: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pooler(hidden_state), 1))


class ClassExitResNetPreTrainedModel(PreTrainedModel):
    config_class = ClassExitResNetConfig
    config: ClassExitResNetConfig
    base_model_prefix = "resnet"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    _no_split_modules = ["ClassExitResNetConvLayer", "ClassExitResNetShortCut"]

    def _init_weights(self, module: nn.Module) -> None:
        # Same scheme as transformers' ResNet; `transformers.initialization` leaves loaded weights alone.
        super()._init_weights(module)
        if isinstance(module, nn.Conv2d):
            init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, nn.Linear):
            init.kaiming_uniform_(module.weight, a=math.sqrt(5))
            if module.bias is not None:
                bound = 1 / math.sqrt(module.weight.shape[1])
                init.uniform_(module.bias, -bound, bound)
        elif isinstance(module, nn.BatchNorm2d):
            init.ones_(module.weight)
            init.zeros_(module.bias)
            init.zeros_(module.running_mean)
            init.ones_(module.running_var)
            init.zeros_(module.num_batches_tracked)


class ClassExitResNetForImageClassification(ClassExitResNetPreTrainedModel):
    """ResNet with class-exclusion exits.

    Full mode (training by default): every exit head runs, the output has the final `logits` and every
    `exit_logits`, and `labels` give the joint exit loss. Early-exit mode (eval by default, or
    `early_exit=True`): exits run per sample with the exclusion rule; samples that are decided leave the
    batch, so later blocks really run on fewer images; the output adds `exit_indices` and `macs`.
    """

    def __init__(self, config: ClassExitResNetConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.resnet = ClassExitResNetModel(config)
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(config.hidden_sizes[-1], config.num_labels))
        widths = self._unit_widths()
        self.exit_units = [config.exit_unit(position) for position in config.exit_positions]
        self.exit_heads = nn.ModuleList(
            ClassExitHead(widths[unit], config.exit_pool_size, config.num_labels) for unit in self.exit_units
        )
        self._macs_cache: dict[tuple[int, int], tuple[list[int], list[int], int]] = {}
        self.post_init()

    def _unit_widths(self) -> list[int]:
        widths = [self.config.embedding_size]
        for size, depth in zip(self.config.hidden_sizes, self.config.depths):
            widths += [size] * depth
        return widths

    def exit_enabled(self, index: int) -> bool:
        return self.config.exit_thresholds[index] != self.config.disabled_threshold

    def unit_macs(self, height: int, width: int) -> tuple[list[int], list[int], int]:
        """Multiply-adds per image of each backbone unit, each exit head and the final classifier.

        Counts convolutions (C_out * H_out * W_out * C_in / groups * k_h * k_w) and linear layers
        (in * out) at batch size 1, the HRank convention; pooling, batch norm and additions are free.
        Computed from the layer shapes (no forward pass, so counting hooks on the model see nothing extra).
        """
        key = (int(height), int(width))
        if key not in self._macs_cache:
            units = []
            for unit in self.resnet.units():
                macs, height, width = _unit_macs(unit, height, width)
                units.append(macs)
            heads = [_linear_macs(head) for head in self.exit_heads]
            self._macs_cache[key] = (units, heads, _linear_macs(self.classifier))
        return self._macs_cache[key]

    def full_macs(self, height: int, width: int) -> int:
        """Multiply-adds per image of the backbone and final classifier, without any exit head."""
        units, _, classifier = self.unit_macs(height, width)
        return sum(units) + classifier

    def forward(
        self,
        pixel_values: torch.Tensor,
        labels: torch.LongTensor | None = None,
        early_exit: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> ClassExitImageClassifierOutput | tuple:
        r"""
        early_exit (`bool`, *optional*): run the per-sample exit rule (default: `not self.training`).
        labels (`torch.LongTensor` of shape `(batch_size,)`, *optional*): full mode only: gives the joint
            loss (cross-entropy on the final output plus the weighted exit losses).
        """
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        if pixel_values.shape[1] != self.config.num_channels:
            raise ValueError(
                f"pixel_values has {pixel_values.shape[1]} channels, the config expects {self.config.num_channels}"
            )
        early_exit = (not self.training) if early_exit is None else early_exit
        output = self._forward_early_exit(pixel_values) if early_exit else self._forward_full(pixel_values, labels)
        return output if return_dict else output.to_tuple()

    def _forward_full(self, pixel_values: torch.Tensor, labels: torch.LongTensor | None) -> ClassExitImageClassifierOutput:
        exit_of = {unit: index for index, unit in enumerate(self.exit_units)}
        exit_logits: list[torch.Tensor] = [None] * len(self.exit_units)  # type: ignore[list-item]
        hidden = pixel_values
        for index, unit in enumerate(self.resnet.units()):
            hidden = unit(hidden)
            if index in exit_of:
                exit_logits[exit_of[index]] = self.exit_heads[exit_of[index]](hidden)
        logits = self.classifier(self.resnet.pooler(hidden))
        loss = None
        if labels is not None:
            loss = joint_exit_loss(logits, exit_logits, labels.to(logits.device), self.config.exit_rule)
        return ClassExitImageClassifierOutput(loss=loss, logits=logits, exit_logits=tuple(exit_logits))

    def _forward_early_exit(self, pixel_values: torch.Tensor) -> ClassExitImageClassifierOutput:
        batch, device = pixel_values.shape[0], pixel_values.device
        num_labels, num_exits = self.config.num_labels, len(self.exit_units)
        unit_costs, head_costs, classifier_cost = self.unit_macs(*pixel_values.shape[-2:])
        exit_of = {unit: index for index, unit in enumerate(self.exit_units) if self.exit_enabled(index)}
        class_exclusion = self.config.exit_rule == "class_exclusion"

        logits_out: torch.Tensor | None = None
        exit_indices = torch.full((batch,), num_exits, dtype=torch.long, device=device)
        macs = torch.zeros(batch, dtype=torch.long, device=device)
        candidate_mask = torch.ones(batch, num_labels, dtype=torch.bool, device=device)
        # Everything below runs on the samples still undecided: `active` maps them back to the batch.
        active = torch.arange(batch, device=device)
        candidates = candidate_mask.clone()
        spent = 0
        hidden = pixel_values
        for index, unit in enumerate(self.resnet.units()):
            hidden = unit(hidden)
            spent += unit_costs[index]
            if index not in exit_of:
                continue
            exit_index = exit_of[index]
            threshold = self.config.exit_thresholds[exit_index]
            exit_logits = self.exit_heads[exit_index](hidden)
            spent += head_costs[exit_index]
            if logits_out is None:
                logits_out = exit_logits.new_empty(batch, num_labels)
            if class_exclusion:
                candidates = exclude_classes(exit_logits, candidates, threshold)
                stops = candidates.sum(dim=1) == 1
            else:
                stops = confidence_stops(exit_logits, threshold)
            if bool(stops.any()):
                decided = active[stops]
                logits_out[decided] = self._restrict(exit_logits[stops], candidates[stops])
                exit_indices[decided] = exit_index
                macs[decided] = spent
                candidate_mask[decided] = candidates[stops]
                keep = ~stops
                hidden, active, candidates = hidden[keep], active[keep], candidates[keep]
                if active.numel() == 0:
                    break
        if active.numel() > 0:
            final_logits = self.classifier(self.resnet.pooler(hidden))
            if logits_out is None:
                logits_out = final_logits.new_empty(batch, num_labels)
            logits_out[active] = self._restrict(final_logits, candidates)
            macs[active] = spent + classifier_cost
            candidate_mask[active] = candidates
        return ClassExitImageClassifierOutput(
            logits=logits_out, exit_indices=exit_indices, macs=macs, candidate_mask=candidate_mask
        )

    @staticmethod
    def _restrict(logits: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        """Sets excluded classes to the lowest finite value, so argmax and softmax see only the candidates."""
        return logits.masked_fill(~candidates, torch.finfo(logits.dtype).min)


ClassExitResNetConfig.register_for_auto_class()
ClassExitResNetForImageClassification.register_for_auto_class("AutoModelForImageClassification")

__all__ = [
    "ClassExitHead",
    "ClassExitImageClassifierOutput",
    "ClassExitResNetForImageClassification",
    "ClassExitResNetModel",
    "ClassExitResNetPreTrainedModel",
    "confidence_stops",
    "exclude_classes",
    "exit_loss",
    "joint_exit_loss",
]
