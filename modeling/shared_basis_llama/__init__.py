"""SharedBasisLlama model family (Basis Sharing). Only the two sibling files travel with checkpoints."""

from .configuration_shared_basis_llama import PROJECTIONS, SharedBasisLlamaConfig
from .modeling_shared_basis_llama import (
    SharedBasisLinear,
    SharedBasisLlamaForCausalLM,
    SharedBasisLlamaModel,
    SharedBasisLlamaPreTrainedModel,
)

__all__ = [
    "PROJECTIONS",
    "SharedBasisLinear",
    "SharedBasisLlamaConfig",
    "SharedBasisLlamaForCausalLM",
    "SharedBasisLlamaModel",
    "SharedBasisLlamaPreTrainedModel",
]
