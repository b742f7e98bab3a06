"""The parts of a SharedBasisLlama that healing trains by default (`trainable="factors"`).

Both the end-to-end training (`trainer.mark_trainable`) and the block-wise stage (`blockwise.block_parameters`) take
their parameters from here, so that the two stages train the same kind of weights. Modules are recognised by class
name: a student loaded with `trust_remote_code` has the classes of the checkpoint's own copy of `modeling/`, not the
plugin's.
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn


def is_norm(module: nn.Module) -> bool:
    return type(module).__name__.endswith("RMSNorm")


def is_factorised(module: nn.Module) -> bool:
    return type(module).__name__ == "SharedBasisLinear"


def factor_parameters(modules: Iterable[nn.Module]) -> list[nn.Parameter]:
    """The parameters `"factors"` healing trains among `modules`: each factorised layer's coefficients and bias and
    the basis it uses (a shared basis once, however many of its members are among `modules`), and each RMSNorm's
    weight. Embeddings, the head and dense projections are not among them."""
    params: dict[int, nn.Parameter] = {}
    for module in modules:
        if is_factorised(module):
            # The basis is not a submodule of the layer (it is stored once, in `shared_bases`): take it explicitly.
            owned = [*module.basis.parameters(), *module.parameters(recurse=False)]
        elif is_norm(module):
            owned = list(module.parameters(recurse=False))
        else:
            continue
        for param in owned:
            params.setdefault(id(param), param)
    return list(params.values())
