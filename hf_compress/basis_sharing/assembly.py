"""Assembling a `SharedBasisLlamaForCausalLM` from a stock Llama-family model and Basis Sharing factors."""

from __future__ import annotations

import torch
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


def shared_basis_config(
    source_config,
    factors: dict[str, list[GroupFactors]],
    *,
    compression: dict | None = None,
) -> SharedBasisLlamaConfig:
    """A `SharedBasisLlamaConfig` with the source's Llama fields and the groups and ranks of `factors`."""
    kwargs = llama_config_kwargs(source_config)
    return SharedBasisLlamaConfig(
        basis_groups={name: [g.layers for g in groups] for name, groups in factors.items()},
        basis_ranks={name: [g.rank for g in groups] for name, groups in factors.items()},
        dense_projections=[name for name in PROJECTIONS if name not in factors],
        compression=compression,
        **kwargs,
    )


@torch.no_grad()
def build_shared_basis_llama(
    source: PreTrainedModel,
    factors: dict[str, list[GroupFactors]],
    *,
    compression: dict | None = None,
) -> SharedBasisLlamaForCausalLM:
    """Builds a `SharedBasisLlamaForCausalLM` from a stock Llama/Mistral/Qwen2 causal LM and given factors.

    Args:
        source: the dense model; its embeddings, norms, head, biases and the weights of projection types absent
            from `factors` are copied.
        factors: per factorised projection type, the groups with basis `B` (`d_in x k`) and coefficients `C_i`
            (`k x d_out`), e.g. from `hf_compress.basis_sharing.decomposition.factors_at_rank`.
        compression: provenance stored in `config.compression`.

    The new model has the source's dtype.
    """
    config = shared_basis_config(source.config, factors, compression=compression)
    model = SharedBasisLlamaForCausalLM(config).to(source.dtype)
    src, dst = source.model, model.model
    dst.embed_tokens.weight.copy_(src.embed_tokens.weight)
    dst.norm.weight.copy_(src.norm.weight)
    if not config.tie_word_embeddings:
        model.lm_head.weight.copy_(source.lm_head.weight)
    for layer_idx, (src_layer, dst_layer) in enumerate(zip(src.layers, dst.layers)):
        dst_layer.input_layernorm.weight.copy_(src_layer.input_layernorm.weight)
        dst_layer.post_attention_layernorm.weight.copy_(src_layer.post_attention_layernorm.weight)
        for name in PROJECTIONS:
            src_proj, dst_proj = projection(src_layer, name), projection(dst_layer, name)
            if name not in factors:
                dst_proj.weight.copy_(src_proj.weight)
            if dst_proj.bias is not None:
                if src_proj.bias is None:
                    raise HFCompressError(f"layer {layer_idx} {name} has no bias but the config asks for one.")
                dst_proj.bias.copy_(src_proj.bias)
    for name, groups in factors.items():
        for group_idx, group in enumerate(groups):
            dst.shared_bases[name][group_idx].weight.copy_(group.basis.T)
            for layer_idx, coefficients in zip(group.layers, group.coefficients):
                projection(dst.layers[layer_idx], name).coefficients.copy_(coefficients.T)
    model.eval()
    return model
