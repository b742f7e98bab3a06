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


class FusedBasisInput:
    r"""
    `x -> x [B_1 | ... | B_m]` computed once for the `m` projections of one layer that read the same input (q/k/v, or
    gate/up), each of which then takes its slice. Fewer, larger matrix products launch fewer kernels.

    The stock attention calls `q_proj(x)`, `k_proj(x)`, `v_proj(x)` one after the other; the product is computed on
    the first call for a given input tensor and handed out to the others (keyed by tensor identity, and released
    once every consumer has read it).
    """

    def __init__(self, owner: nn.Module, buffer_name: str, splits: list[int]):
        self.owner = owner
        self.buffer_name = buffer_name
        self.splits = splits
        self._input: torch.Tensor | None = None
        self._outputs: tuple[torch.Tensor, ...] = ()
        self._pending = 0

    def slice_for(self, hidden_states: torch.Tensor, index: int) -> torch.Tensor:
        if self._input is not hidden_states:
            weight = getattr(self.owner, self.buffer_name)
            self._outputs = F.linear(hidden_states.to(weight.device), weight).split(self.splits, dim=-1)
            self._input, self._pending = hidden_states, len(self.splits)
        output = self._outputs[index]
        self._pending -= 1
        if self._pending == 0:
            self._input, self._outputs = None, ()
        return output


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
        # Not submodules: registering them would store the shared basis once per layer in the state dict.
        object.__setattr__(self, "basis", basis)
        object.__setattr__(self, "fused_input", None)
        self.fused_index = 0

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.fused_input is not None:
            projected = self.fused_input.slice_for(hidden_states, self.fused_index)
        else:
            projected = self.basis(hidden_states)
        if projected.device != self.coefficients.device:  # the basis may sit on another GPU under device_map
            projected = projected.to(self.coefficients.device)
        return F.linear(projected, self.coefficients, self.bias)

    def dense_weight(self) -> torch.Tensor:
        """The equivalent dense weight `(B C_i)^T`, `d_out x d_in`."""
        return self.coefficients @ self.basis.weight.to(self.coefficients.device)

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


def _projection(layer: nn.Module, name: str) -> nn.Module:
    return getattr(layer.self_attn if name in ATTENTION_PROJECTIONS else layer.mlp, name)


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
        if model.config.fuse_bases:
            model.fuse_bases()
        if model.config.densify_above_break_even:
            model.densify_above_break_even()
        return (model, loading_info) if output_loading_info else model

    @property
    def _decoder(self) -> "SharedBasisLlamaModel":
        return self if isinstance(self, SharedBasisLlamaModel) else self.model

    def fuse_bases(self) -> list[str]:
        r"""
        Runs the bases of projections that read the same input (q/k/v; gate/up) as one matrix product per layer.

        The checkpoint format is unchanged; call this after placing the model on its device. Returns the fused sets.
        The fused bases are one tensor per group; the individual basis weights become views into it, so memory does
        not grow.
        """
        decoder, config = self._decoder, self.config
        fused_sets = []
        for names in (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj")):
            names = [n for n in names if n in config.basis_groups]
            if len(names) < 2 or any(config.basis_groups[n] != config.basis_groups[names[0]] for n in names):
                continue
            for group_idx, group in enumerate(config.basis_groups[names[0]]):
                bases = [decoder.shared_bases[n][group_idx] for n in names]
                buffer_name = f"fused_{'_'.join(n.split('_')[0] for n in names)}_{group_idx}"
                fused = torch.cat([b.weight.data for b in bases])
                decoder.shared_bases.register_buffer(buffer_name, fused, persistent=False)
                start = 0
                for basis in bases:
                    basis.weight.data = fused[start : start + basis.out_features]
                    start += basis.out_features
                splits = [b.out_features for b in bases]
                for layer_idx in group:
                    shared = FusedBasisInput(decoder.shared_bases, buffer_name, splits)
                    for index, name in enumerate(names):
                        module = _projection(decoder.layers[layer_idx], name)
                        object.__setattr__(module, "fused_input", shared)
                        module.fused_index = index
            fused_sets.append("+".join(names))
        self._load_time_changes = getattr(self, "_load_time_changes", []) + [f"fused {s}" for s in fused_sets]
        return fused_sets

    def densify_above_break_even(self) -> dict:
        r"""
        Multiplies back into dense weights every factor pair whose rank is past the break-even point
        `k > d_in d_out / (d_in + d_out)`, where the two products cost more than the dense one.

        Returns a report: the projections made dense and the bytes of memory this adds.
        """
        decoder = self._decoder
        densified, added = [], 0
        for layer_idx, layer in enumerate(decoder.layers):
            for name in self.config.basis_groups:
                module = _projection(layer, name)
                if not isinstance(module, SharedBasisLinear):
                    continue
                if module.rank * (module.in_features + module.out_features) <= module.in_features * module.out_features:
                    continue
                weight = module.dense_weight()
                dense = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
                dense.to(device=weight.device, dtype=weight.dtype)
                dense.weight.data = weight
                if module.bias is not None:
                    dense.bias.data = module.bias.data
                added += (weight.numel() - module.coefficients.numel()) * weight.element_size()
                setattr(layer.self_attn if name in ATTENTION_PROJECTIONS else layer.mlp, name, dense)
                densified.append(f"layers.{layer_idx}.{name}")
        if densified:
            self._load_time_changes = getattr(self, "_load_time_changes", []) + ["densified above break-even"]
        return {"densified": densified, "added_bytes": added}

    def save_pretrained(self, *args, **kwargs):
        changes = getattr(self, "_load_time_changes", [])
        if changes:
            raise ValueError(
                f"This model was changed for inference at load time ({', '.join(changes)}); reload it without "
                "fuse_bases/densify_above_break_even to save it."
            )
        return super().save_pretrained(*args, **kwargs)


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
