"""Assembling a `SharedBasisLlamaForCausalLM` from a stock Llama-family model and Basis Sharing factors.

`LayerwiseAssembly` builds the compressed model block by block while the compressor finishes blocks of layers
(`BasisSharingCompressor(..., sink=assembly)`): the model's skeleton is created on the meta device (no memory, no
random initialisation), each block's tensors are filled in as soon as its factors are final, and with
`release_source=True` the source's layers are moved to the meta device right after (their memory freed, their shapes
kept), so the two models never both sit in memory whole. `build_shared_basis_llama` is the same assembly in one call.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import PreTrainedModel

from ..errors import HFCompressError
from ..modeling.shared_basis_llama import (
    PROJECTIONS,
    SharedBasisLlamaConfig,
    SharedBasisLlamaForCausalLM,
)
from ..sources import llama_config_kwargs
from .decomposition import GroupFactors
from .layout import projection

META = torch.device("meta")


def shared_basis_config(
    source_config,
    factors: dict[str, list[GroupFactors]] | None = None,
    *,
    compression: dict | None = None,
    groups: dict[str, list[list[int]]] | None = None,
    ranks: dict[str, list[int]] | None = None,
) -> SharedBasisLlamaConfig:
    """A `SharedBasisLlamaConfig` with the source's Llama fields and the groups and ranks of `factors` (or given as
    `groups` and `ranks`, before any factor exists)."""
    if factors is not None:
        groups = {name: [g.layers for g in type_groups] for name, type_groups in factors.items()}
        ranks = {name: [g.rank for g in type_groups] for name, type_groups in factors.items()}
    if groups is None or ranks is None:
        raise HFCompressError("shared_basis_config needs the factors, or the groups and ranks.")
    kwargs = llama_config_kwargs(source_config)
    return SharedBasisLlamaConfig(
        basis_groups={name: [list(g) for g in type_groups] for name, type_groups in groups.items()},
        basis_ranks={name: list(r) for name, r in ranks.items()},
        dense_projections=[name for name in PROJECTIONS if name not in groups],
        compression=compression,
        **kwargs,
    )


def _put(module: nn.Module, name: str, value: torch.Tensor) -> None:
    """Sets parameter `name` of `module` (a meta placeholder until now) to `value`."""
    setattr(module, name, nn.Parameter(value, requires_grad=getattr(module, name).requires_grad))


class LayerwiseAssembly:
    """Builds a `SharedBasisLlamaForCausalLM` from a stock Llama/Mistral/Qwen2 causal LM block by block.

    The compressor calls `start(groups, ranks)` once the ranks are known and `add_block(span, factors)` each time the
    groups of a block of layers are final (it is the compressor's `sink`); `finish()` adds the embeddings, the final
    norm and the head, and returns the model.

    Args:
        source: the dense model; its embeddings, norms, head, biases and the weights of projection types that are not
            factorised are taken over.
        release_source: free each source layer once its block is assembled (the layer is moved to the meta device:
            shapes and parameter counts stay readable, values are gone) and hand the source's embeddings, final
            norm and head over to the new model without a copy. The source cannot run afterwards. Without it every
            tensor is copied and the source is left as it was.

    The values are those a plain copy gives (factors cast to the source's dtype); the new model has the source's
    dtype and is in eval mode.
    """

    def __init__(self, source: PreTrainedModel, *, release_source: bool = False):
        self.source = source
        self.release_source = release_source
        self.dtype = source.dtype
        self.model: SharedBasisLlamaForCausalLM | None = None
        self.done: set[int] = set()

    # -- the compressor's sink ------------------------------------------------------------------------------------
    def start(self, groups: dict[str, list[list[int]]], ranks: dict[str, list[int]], *,
              compression: dict | None = None) -> None:
        """Creates the model's skeleton on the meta device (nothing allocated, nothing initialised)."""
        config = shared_basis_config(self.source.config, groups=groups, ranks=ranks, compression=compression)
        with META:
            model = SharedBasisLlamaForCausalLM(config)
        self.model = model.to(self.dtype)
        self.done = set()

    @torch.no_grad()
    def add_block(self, span: list[int], factors: dict[str, list[GroupFactors]]) -> None:
        """Fills in decoder layers `span` and the groups of `factors` (those starting in `span`; every layer of
        `span` must be covered by them or be dense), then releases the source's layers if asked."""
        if self.model is None:
            raise HFCompressError("LayerwiseAssembly.add_block before start.")
        src, dst = self.source.model, self.model.model
        config = self.model.config
        take = self._take
        for name, type_groups in factors.items():
            for group in type_groups:
                group_idx = config.basis_groups[name].index(list(group.layers))
                _put(dst.shared_bases[name][group_idx], "weight", group.basis.T.to("cpu", self.dtype).contiguous())
                for layer_idx, coefficients in zip(group.layers, group.coefficients):
                    _put(projection(dst.layers[layer_idx], name), "coefficients",
                         coefficients.T.to("cpu", self.dtype).contiguous())
        for layer_idx in span:
            src_layer, dst_layer = src.layers[layer_idx], dst.layers[layer_idx]
            for norm in ("input_layernorm", "post_attention_layernorm"):
                _put(getattr(dst_layer, norm), "weight", take(getattr(src_layer, norm).weight))
            for name in PROJECTIONS:
                src_proj, dst_proj = projection(src_layer, name), projection(dst_layer, name)
                if name not in config.basis_groups:
                    _put(dst_proj, "weight", take(src_proj.weight))
                if dst_proj.bias is not None:
                    if src_proj.bias is None:
                        raise HFCompressError(f"layer {layer_idx} {name} has no bias but the config asks for one.")
                    _put(dst_proj, "bias", take(src_proj.bias))
            _check_materialised(dst_layer, f"decoder layer {layer_idx}")
            if self.release_source:
                release(src_layer)
            self.done.add(layer_idx)

    @torch.no_grad()
    def finish(self) -> SharedBasisLlamaForCausalLM:
        """Adds the embeddings, the final norm, the head and the rotary embedding; returns the finished model."""
        model = self.model
        if model is None or len(self.done) != model.config.num_hidden_layers:
            missing = sorted(set(range(self.source.config.num_hidden_layers)) - self.done)
            raise HFCompressError(f"the compressed model lacks decoder layers {missing}.")
        src, dst = self.source.model, model.model
        _put(dst.embed_tokens, "weight", self._take(src.embed_tokens.weight))
        _put(dst.norm, "weight", self._take(src.norm.weight))
        if model.config.tie_word_embeddings:
            model.lm_head.weight = dst.embed_tokens.weight
        else:
            _put(model.lm_head, "weight", self._take(self.source.lm_head.weight))
        # Buffers are computed, not copied: a rotary embedding made on the CPU, as the model's own constructor does.
        dst.rotary_emb = type(dst.rotary_emb)(config=model.config).to(self.dtype)
        if self.release_source:
            release(self.source)
        _check_materialised(model, "the compressed model")
        model.eval()
        self.model = None
        return model

    def _take(self, tensor: torch.Tensor) -> torch.Tensor:
        """The source's `tensor` for the new model: the same memory when the source is released, else a copy."""
        tensor = tensor.detach()
        return tensor if self.release_source else tensor.clone()


def release(module: nn.Module) -> None:
    """Moves `module` to the meta device, freeing its memory; shapes, parameter counts and tied parameters (one
    Parameter in two places, e.g. a tied head) stay as they were."""
    places = [(owner, name, id(param)) for owner in module.modules()
              for name, param in owner._parameters.items() if param is not None]
    module.to(META)
    first: dict[int, nn.Parameter] = {}
    for owner, name, key in places:
        if key in first:
            setattr(owner, name, first[key])
        else:
            first[key] = owner._parameters[name]


def _check_materialised(module: nn.Module, what: str) -> None:
    left = [name for name, t in [*module.named_parameters(), *module.named_buffers()] if t.device == META]
    if left:
        raise HFCompressError(f"{what} was assembled without {', '.join(left[:8])}.")


@torch.no_grad()
def build_shared_basis_llama(
    source: PreTrainedModel,
    factors: dict[str, list[GroupFactors]],
    *,
    compression: dict | None = None,
    release_source: bool = False,
) -> SharedBasisLlamaForCausalLM:
    """Builds a `SharedBasisLlamaForCausalLM` from a stock Llama/Mistral/Qwen2 causal LM and given factors.

    Args:
        source: the dense model; its embeddings, norms, head, biases and the weights of projection types absent
            from `factors` are copied.
        factors: per factorised projection type, the groups with basis `B` (`d_in x k`) and coefficients `C_i`
            (`k x d_out`), e.g. from `hf_compress.basis_sharing.decomposition.factors_at_rank`.
        compression: provenance stored in `config.compression`.
        release_source: take the source's tensors over instead of copying them, leaving the source on the meta
            device (see `LayerwiseAssembly`).

    The new model has the source's dtype.
    """
    assembly = LayerwiseAssembly(source, release_source=release_source)
    assembly.start({name: [g.layers for g in groups] for name, groups in factors.items()},
                   {name: [g.rank for g in groups] for name, groups in factors.items()}, compression=compression)
    assembly.add_block(list(range(source.config.num_hidden_layers)), factors)
    return assembly.finish()
