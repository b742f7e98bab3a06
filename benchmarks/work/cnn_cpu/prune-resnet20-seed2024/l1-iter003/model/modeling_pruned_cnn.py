"""PrunedCNN: plain (VGG-style) and residual CNNs whose every width comes from the config.

Standalone remote code: imports only the standard library, torch, transformers and its configuration.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.modeling_outputs import BaseModelOutputWithPoolingAndNoAttention, ImageClassifierOutputWithNoAttention

from .configuration_pruned_cnn import PrunedCNNConfig


class PrunedCNNConvLayer(nn.Module):
    """Conv (no bias, 'same' padding) -> BatchNorm -> optional activation."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1, activation: str | None = "relu"):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=kernel_size // 2, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)
        self.act = ACT2FN[activation] if activation is not None else nn.Identity()

    def forward(self, hidden_state: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(hidden_state)))


class PrunedCNNZeroPadShortcut(nn.Module):
    """He et al.'s option A: subsample spatially, pad the new channels with zeros (no parameters)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.stride = stride
        self.before = (out_channels - in_channels) // 2
        self.after = out_channels - in_channels - self.before

    def forward(self, hidden_state: torch.Tensor) -> torch.Tensor:
        if self.stride != 1:
            hidden_state = hidden_state[:, :, :: self.stride, :: self.stride]
        return F.pad(hidden_state, (0, 0, 0, 0, self.before, self.after))


class PrunedCNNBlock(nn.Module):
    """Residual block: inner convs (`convs`, absent when the branch was pruned away) plus the shortcut."""

    def __init__(self, config: PrunedCNNConfig, spec: dict):
        super().__init__()
        act = config.hidden_act
        in_ch, out_ch, stride, widths = spec["in"], spec["out"], spec["stride"], spec["widths"]
        if widths[0] == 0:
            self.convs = nn.ModuleList()
        elif config.layer_type == "basic":
            self.convs = nn.ModuleList(
                [PrunedCNNConvLayer(in_ch, widths[0], 3, stride, act), PrunedCNNConvLayer(widths[0], out_ch, 3, 1, None)]
            )
        else:
            first, second = (stride, 1) if config.downsample_in_bottleneck else (1, stride)
            self.convs = nn.ModuleList(
                [
                    PrunedCNNConvLayer(in_ch, widths[0], 1, first, act),
                    PrunedCNNConvLayer(widths[0], widths[1], 3, second, act),
                    PrunedCNNConvLayer(widths[1], out_ch, 1, 1, None),
                ]
            )
        if spec["shortcut"] == "projection":
            self.shortcut = PrunedCNNConvLayer(in_ch, out_ch, 1, stride, None)
        elif spec["shortcut"] == "zero_pad":
            self.shortcut = PrunedCNNZeroPadShortcut(in_ch, out_ch, stride)
        else:
            self.shortcut = nn.Identity()
        self.act = ACT2FN[act]

    def forward(self, hidden_state: torch.Tensor) -> torch.Tensor:
        residual = self.shortcut(hidden_state)
        for layer in self.convs:
            hidden_state = layer(hidden_state)
        if len(self.convs) == 0:
            return self.act(residual)
        return self.act(hidden_state + residual)


class PrunedCNNPreTrainedModel(PreTrainedModel):
    config_class = PrunedCNNConfig
    config: PrunedCNNConfig
    base_model_prefix = "cnn"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    _no_split_modules = ["PrunedCNNBlock", "PrunedCNNConvLayer"]

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Conv2d):
            init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, nn.Linear):
            init.kaiming_uniform_(module.weight, a=math.sqrt(5))
            if module.bias is not None:
                bound = 1 / math.sqrt(module.in_features) if module.in_features > 0 else 0
                init.uniform_(module.bias, -bound, bound)
        elif isinstance(module, (nn.BatchNorm2d, nn.BatchNorm1d)):
            init.ones_(module.weight)
            init.zeros_(module.bias)
            init.zeros_(module.running_mean)
            init.ones_(module.running_var)
            if getattr(module, "num_batches_tracked", None) is not None:
                init.zeros_(module.num_batches_tracked)


class PrunedCNNModel(PrunedCNNPreTrainedModel):
    """The feature extractor: plain conv stack or stem + residual stages, then global average pooling."""

    def __init__(self, config: PrunedCNNConfig):
        super().__init__(config)
        if config.architecture == "plain":
            layers, pools, c_in = [], [], config.num_channels
            for item in config.plain_layers:
                if item == "M":
                    pools.append(len(layers))
                else:
                    layers.append(PrunedCNNConvLayer(c_in, item, 3, 1, config.hidden_act))
                    c_in = item
            self.layers = nn.ModuleList(layers)
            # A pool listed before conv i runs just before it; len(layers) means after the last conv.
            self.pool_before = pools
        else:
            self.stem = PrunedCNNConvLayer(config.num_channels, config.stem_width, config.stem_kernel_size, config.stem_stride, config.hidden_act)
            self.stem_pool = nn.MaxPool2d(3, stride=2, padding=1) if config.stem_pool else nn.Identity()
            specs = config.blocks()
            self.stages = nn.ModuleList(
                nn.ModuleList(PrunedCNNBlock(config, spec) for spec in specs if spec["stage"] == s) for s in range(len(config.hidden_sizes))
            )
        self.pooler = nn.AdaptiveAvgPool2d((1, 1))
        self.post_init()

    def forward(self, pixel_values: torch.Tensor, output_hidden_states: bool | None = None, return_dict: bool | None = None, **kwargs):
        output_hidden_states = output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        if pixel_values.shape[1] != self.config.num_channels:
            raise ValueError(f"pixel_values has {pixel_values.shape[1]} channels, the model expects {self.config.num_channels}")
        hidden_states = ()
        hidden = pixel_values
        if self.config.architecture == "plain":
            for i, layer in enumerate(self.layers):
                for _ in range(self.pool_before.count(i)):
                    hidden = F.max_pool2d(hidden, 2)
                hidden = layer(hidden)
                hidden_states += (hidden,)
            for _ in range(self.pool_before.count(len(self.layers))):
                hidden = F.max_pool2d(hidden, 2)
        else:
            hidden = self.stem_pool(self.stem(hidden))
            hidden_states += (hidden,)
            for stage in self.stages:
                for block in stage:
                    hidden = block(hidden)
                hidden_states += (hidden,)
        pooled = self.pooler(hidden).flatten(1)
        if not return_dict:
            return (hidden, pooled) + ((hidden_states,) if output_hidden_states else ())
        return BaseModelOutputWithPoolingAndNoAttention(
            last_hidden_state=hidden, pooler_output=pooled, hidden_states=hidden_states if output_hidden_states else None
        )


class PrunedCNNClassifier(nn.Module):
    """Hidden linear layers (Linear, BN, activation) and the output layer."""

    def __init__(self, config: PrunedCNNConfig):
        super().__init__()
        layers, c_in = [], config.feature_width
        for width in config.classifier_hidden:
            layers += [nn.Linear(c_in, width), nn.BatchNorm1d(width), ACT2FN[config.hidden_act]]
            c_in = width
        self.hidden = nn.Sequential(*layers)
        self.output = nn.Linear(c_in, config.num_labels)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.output(self.hidden(features))


class PrunedCNNForImageClassification(PrunedCNNPreTrainedModel):
    """PrunedCNN with its classifier; returns `ImageClassifierOutputWithNoAttention` (loss when labels are given)."""

    def __init__(self, config: PrunedCNNConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.cnn = PrunedCNNModel(config)
        self.classifier = PrunedCNNClassifier(config)
        # save_pretrained only records the saved class; the headless model loads from the same files.
        config.auto_map = {**(getattr(config, "auto_map", None) or {}), "AutoModel": "modeling_pruned_cnn.PrunedCNNModel"}
        self.post_init()

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ):
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        outputs = self.cnn(pixel_values, output_hidden_states=output_hidden_states, return_dict=True)
        logits = self.classifier(outputs.pooler_output)
        loss = self.loss_function(labels, logits, self.config) if labels is not None else None
        if not return_dict:
            output = (logits,) + ((outputs.hidden_states,) if outputs.hidden_states is not None else ())
            return ((loss,) + output) if loss is not None else output
        return ImageClassifierOutputWithNoAttention(loss=loss, logits=logits, hidden_states=outputs.hidden_states)


PrunedCNNConfig.register_for_auto_class()
PrunedCNNModel.register_for_auto_class("AutoModel")
PrunedCNNForImageClassification.register_for_auto_class("AutoModelForImageClassification")

__all__ = ["PrunedCNNPreTrainedModel", "PrunedCNNModel", "PrunedCNNForImageClassification"]
