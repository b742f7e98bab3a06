"""The configs of Basis Sharing: what to compress (`BasisSharingConfig`) and on what text (`CalibrationConfig`)."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import HFCompressError
from .decomposition import make_groups
from .layout import PROJECTIONS

DEFAULT_SHARED = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
GPU_RANK_MULTIPLE = 128


@dataclass
class BasisSharingConfig:
    """What to compress and how (the paper's defaults: groups of 2 for q/k/v/gate/up, o/down per layer, uniform ranks).

    Args:
        ratio: fraction of the parameters of the compressed projections to remove, in (0, 1).
        group_size: layers per group for the shared types.
        share: projection types whose bases are shared across `group_size` layers; the other compressed types get
            groups of one layer (SVD-LLM).
        dense: projection types left dense.
        whiten: whiten with the calibration Gram (SVD-LLM); `False` is plain SVD of the weights.
        rank_allocation: `"uniform"` (the paper's formula per group) or `"global"` (budget spent where the
            whitened truncation loss drops most per parameter).
        rank_multiple: every rank a multiple of this; `None` picks 128 when converting on a GPU (tensor-core kernels
            run far slower on other ranks) and 1 on a CPU.
        rank_score: how global allocation compares groups: `"relative"` (discarded energy as a fraction of the
            group's total, since types differ in scale) or `"absolute"` (the raw squared singular values).
        refit: re-solve each layer's coefficients by least squares on the inputs of the compressed model.
        layer_fit: re-solve the coefficients of each member of a shared group by least squares on its own Gram (the
            group's SVD fits them on the summed Gram, as if every member saw the same inputs). The default: no extra
            pass, and on SmolLM2 with sequential calibration it lowered perplexity by 3-21% at ratios of 20-50% (0.4%
            higher at 10%; see the README); `refit` does its own fit instead.
        sequential: take the Grams of each block of layers from the outputs of the already-compressed layers before
            it (the default: on SmolLM2 it roughly halved the perplexity at 40% for 1.4x the time); `False` takes
            every Gram from the dense model, as the paper does.
    """

    ratio: float = 0.2
    group_size: int = 2
    share: tuple[str, ...] = DEFAULT_SHARED
    dense: tuple[str, ...] = ()
    whiten: bool = True
    rank_allocation: str = "uniform"
    rank_multiple: int | None = None
    rank_score: str = "relative"
    refit: bool = False
    layer_fit: bool = True
    sequential: bool = True

    def validate(self, num_layers: int) -> None:
        if not 0.0 < self.ratio < 1.0:
            raise HFCompressError(f"--ratio must be in (0, 1); got {self.ratio}.")
        if not 1 <= self.group_size <= num_layers:
            raise HFCompressError(f"--group-size must be between 1 and the number of layers ({num_layers}); got {self.group_size}.")
        for flag, names in (("--share", self.share), ("--dense", self.dense)):
            unknown = sorted(set(names) - set(PROJECTIONS))
            if unknown:
                raise HFCompressError(f"{flag} names unknown projection(s) {unknown}; known: {', '.join(PROJECTIONS)}.")
        if set(self.share) & set(self.dense):
            raise HFCompressError(f"projection(s) {sorted(set(self.share) & set(self.dense))} are both shared and dense.")
        if self.rank_allocation not in ("uniform", "global"):
            raise HFCompressError(f"--rank-allocation must be 'uniform' or 'global'; got {self.rank_allocation!r}.")
        if self.rank_score not in ("relative", "absolute"):
            raise HFCompressError(f"--rank-score must be 'relative' or 'absolute'; got {self.rank_score!r}.")
        if self.rank_multiple is not None and self.rank_multiple < 1:
            raise HFCompressError(f"--rank-multiple must be >= 1; got {self.rank_multiple}.")
        if len(self.dense) == len(PROJECTIONS):
            raise HFCompressError("every projection is dense: nothing to compress.")

    def groups(self, num_layers: int) -> dict[str, list[list[int]]]:
        """Groups of every compressed projection type."""
        return {
            name: make_groups(num_layers, self.group_size if name in self.share else 1)
            for name in PROJECTIONS
            if name not in self.dense
        }


@dataclass
class CalibrationConfig:
    """Calibration text: a preset, a local file or a Hub dataset; `samples` chunks of `seq_len` tokens.

    `dtype` is that of the calibration forwards' matrix products: `"auto"` takes bfloat16 where the device multiplies
    it natively and float32 elsewhere. Grams, whitening and factorizations are float32/float64 either way.
    """

    dataset: str = "c4-calibration"
    config: str | None = None
    split: str | None = None
    column: str | None = None
    samples: int = 128
    seq_len: int = 512
    seed: int = 2023
    batch_size: int = 8
    dtype: str = "auto"


