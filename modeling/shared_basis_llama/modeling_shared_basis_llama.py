"""SharedBasisLlama: a Llama-family decoder whose projections share low-rank bases across layers (Basis Sharing).

Standalone remote code: imports only torch, transformers and the sibling configuration file. The attention, MLP,
norm and rotary code are the stock Llama modules; only their linear projections are swapped for factorised ones,
so the KV cache, SDPA and `generate()` behave exactly as in `LlamaForCausalLM`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.models.llama.modeling_llama import (
    LlamaAttention,
    LlamaDecoderLayer,
    LlamaForCausalLM,
    LlamaModel,
    LlamaPreTrainedModel,
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
)

from .configuration_shared_basis_llama import ATTENTION_PROJECTIONS, PROJECTIONS, SharedBasisLlamaConfig


class SharedBasisLinear(nn.Module):
    r"""
    One layer's factorised projection `y = (x B) C_i + b`.

    The basis `B` is an `nn.Linear(d_in, k)` owned by the model's `SharedBasisLlamaBases` (so the checkpoint stores
    it once for the whole group); this module keeps only a plain reference to it and owns its coefficients
    `C_i^T` (`d_out x k`) and bias.
    """

    def __init__(self, basis: nn.Linear, out_features: int, bias: bool):
        super().__init__()
        self.in_features = basis.in_features
        self.rank = basis.out_features
        self.out_features = out_features
        self.coefficients = nn.Parameter(torch.empty(out_features, self.rank))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        # Not a submodule: registering it would store the shared basis once per layer in the state dict.
        object.__setattr__(self, "basis", basis)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        projected = self.basis(hidden_states)
        if projected.device != self.coefficients.device:  # the basis may sit on another GPU under device_map
            projected = projected.to(self.coefficients.device)
        return F.linear(projected, self.coefficients, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, rank={self.rank}, out_features={self.out_features}, bias={self.bias is not None}"


class SharedBasisLlamaBases(nn.ModuleDict):
    """Holds every shared basis once: `self[proj][group]` is an `nn.Linear(d_in, rank)` whose weight is `B^T`."""

    def __init__(self, config: SharedBasisLlamaConfig):
        super().__init__()
        for name in config.basis_groups:
            d_in, _ = config.projection_shape(name)
            self[name] = nn.ModuleList(nn.Linear(d_in, rank, bias=False) for rank in config.basis_ranks[name])

    def basis_for(self, config: SharedBasisLlamaConfig, name: str, layer_idx: int) -> nn.Linear:
        return self[name][config.group_of(name, layer_idx)]


class SharedBasisLlamaDecoderLayer(LlamaDecoderLayer):
    """A stock `LlamaDecoderLayer` whose factorised projection types use `SharedBasisLinear`."""

    def __init__(self, config: SharedBasisLlamaConfig, layer_idx: int, shared_bases: SharedBasisLlamaBases):
        super().__init__(config, layer_idx)
        for name in PROJECTIONS:
            parent = self.self_attn if name in ATTENTION_PROJECTIONS else self.mlp
            d_in, d_out = config.projection_shape(name)
            bias = config.projection_has_bias(name)
            if name in config.basis_groups:
                module = SharedBasisLinear(shared_bases.basis_for(config, name, layer_idx), d_out, bias)
            else:
                module = nn.Linear(d_in, d_out, bias=bias)
            setattr(parent, name, module)


class SharedBasisLlamaPreTrainedModel(LlamaPreTrainedModel):
    config_class = SharedBasisLlamaConfig
    config: SharedBasisLlamaConfig
    _no_split_modules = ["SharedBasisLlamaDecoderLayer"]
    _can_record_outputs = {"hidden_states": LlamaDecoderLayer, "attentions": LlamaAttention}

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, SharedBasisLinear):
            std = self.config.initializer_range
            init.normal_(module.coefficients, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        r"""
        As `PreTrainedModel.from_pretrained`, but a checkpoint that lacks any weight of the model is an error: a
        missing basis or coefficient matrix must never be silently replaced by random values.
        """
        output_loading_info = kwargs.pop("output_loading_info", False)
        # Mismatches are collected (not raised by transformers) so that the error can name the tensors.
        kwargs["ignore_mismatched_sizes"] = True
        model, loading_info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        missing = sorted(loading_info.get("missing_keys", []))
        if missing:
            shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
            raise ValueError(f"The checkpoint is missing weights of {cls.__name__}: {shown}.")
        mismatched = loading_info.get("mismatched_keys", [])
        if mismatched:
            shown = "; ".join(
                f"{key}: checkpoint {tuple(ckpt)} vs model {tuple(expected)}" for key, ckpt, expected in mismatched
            )
            raise ValueError(f"The checkpoint has weights of the wrong shape: {shown}.")
        return (model, loading_info) if output_loading_info else model


class SharedBasisLlamaModel(SharedBasisLlamaPreTrainedModel, LlamaModel):
    """The bare SharedBasisLlama decoder; `forward` is `LlamaModel.forward`."""

    def __init__(self, config: SharedBasisLlamaConfig):
        LlamaPreTrainedModel.__init__(self, config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.shared_bases = SharedBasisLlamaBases(config)
        self.layers = nn.ModuleList(
            SharedBasisLlamaDecoderLayer(config, layer_idx, self.shared_bases)
            for layer_idx in range(config.num_hidden_layers)
        )
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(config=config)
        self.gradient_checkpointing = False
        self.post_init()


class SharedBasisLlamaForCausalLM(SharedBasisLlamaPreTrainedModel, LlamaForCausalLM):
    """SharedBasisLlama with a language-modelling head; `forward` and `generate` are those of `LlamaForCausalLM`."""

    def __init__(self, config: SharedBasisLlamaConfig):
        LlamaPreTrainedModel.__init__(self, config)
        self.model = SharedBasisLlamaModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()


SharedBasisLlamaConfig.register_for_auto_class()
SharedBasisLlamaModel.register_for_auto_class("AutoModel")
SharedBasisLlamaForCausalLM.register_for_auto_class("AutoModelForCausalLM")

__all__ = [
    "SharedBasisLinear",
    "SharedBasisLlamaBases",
    "SharedBasisLlamaDecoderLayer",
    "SharedBasisLlamaForCausalLM",
    "SharedBasisLlamaModel",
    "SharedBasisLlamaPreTrainedModel",
]
