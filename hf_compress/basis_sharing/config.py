"""The configs of Basis Sharing: what to compress (`BasisSharingConfig`) and on what text (`CalibrationConfig`).

The CLI reads its defaults from these dataclasses, so a default lives here and nowhere else.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from ..config import MethodConfig
from ..device import MODEL_DTYPES, calibration_dtype, dtype_name, named_dtype, pick_device
from ..errors import HFCompressError
from .decomposition import make_groups
from .layout import PROJECTIONS

DEFAULT_SHARED = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
GPU_RANK_MULTIPLE = 128
# Window length of the perplexity measured by `convert --eval-dataset` and `ppl`.
EVAL_SEQ_LEN = 2048
RANK_ALLOCATIONS = ("uniform", "global")
RANK_SCORES = ("relative", "absolute")
# "auto": the dtype the source's weights are stored in.
SAVE_DTYPES = ("auto", *MODEL_DTYPES)


def _device(device: str | torch.device | None) -> torch.device:
    return device if isinstance(device, torch.device) else pick_device(device)


def default_rank_multiple(device: torch.device) -> int:
    """128 on a GPU, where ranks off that grid defeat the tensor-core kernels; 1 on a CPU."""
    return GPU_RANK_MULTIPLE if device.type == "cuda" else 1


def _check_at_least_one(values: dict[str, int]) -> None:
    """Raises for the first option (by flag) whose value is below 1."""
    for flag, value in values.items():
        if value < 1:
            raise HFCompressError(f"{flag} must be >= 1; got {value}.")


@dataclass
class BasisSharingConfig(MethodConfig):
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
        rank_multiple: every rank a multiple of this; `None` (resolved by `resolve`) picks 128 on a GPU
            (tensor-core kernels run far slower on other ranks) and 1 on a CPU.
        rank_score: how global allocation compares groups: `"relative"` (discarded energy as a fraction of the
            group's total, since types differ in scale) or `"absolute"` (the raw squared singular values).
        refit: re-solve each layer's coefficients by least squares on the inputs of the compressed model.
        layer_fit: re-solve the coefficients of each member of a shared group by least squares on its own Gram (the
            group's SVD fits them on the summed Gram, as if every member saw the same inputs). No extra pass;
            `refit` does its own fit instead (see the README for measurements).
        sequential: take the Grams of each block of layers from the outputs of the already-compressed layers before
            it (see the README for measurements); `False` takes every Gram from the dense model, as the paper does.
        save_dtype: dtype of the saved weights: `"auto"` (the source's own, e.g. bfloat16 for SmolLM2), `"float32"`,
            `"bfloat16"` or `"float16"`. Only the saved tensors are cast: the factorizations run in float32/float64.
            "auto" stays "auto" in the record (it names the source's dtype, recorded as `source_dtype`).
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
    save_dtype: str = "auto"

    def validate(self) -> None:
        """Raises `HFCompressError` naming the first bad option; `check_layers` adds the model-dependent check."""
        if not 0.0 < self.ratio < 1.0:
            raise HFCompressError(f"--ratio must be in (0, 1); got {self.ratio}.")
        _check_at_least_one({"--group-size": self.group_size})
        for flag, names in (("--share", self.share), ("--dense", self.dense)):
            unknown = sorted(set(names) - set(PROJECTIONS))
            if unknown:
                raise HFCompressError(f"{flag} names unknown projection(s) {unknown}; known: {', '.join(PROJECTIONS)}.")
        if set(self.share) & set(self.dense):
            raise HFCompressError(f"projection(s) {sorted(set(self.share) & set(self.dense))} are both shared and dense.")
        if len(set(self.dense)) == len(PROJECTIONS):
            raise HFCompressError("--dense names every projection: nothing to compress.")
        if self.rank_allocation not in RANK_ALLOCATIONS:
            raise HFCompressError(f"--rank-allocation must be 'uniform' or 'global'; got {self.rank_allocation!r}.")
        if self.rank_score not in RANK_SCORES:
            raise HFCompressError(f"--rank-score must be 'relative' or 'absolute'; got {self.rank_score!r}.")
        if self.rank_multiple is not None:
            _check_at_least_one({"--rank-multiple": self.rank_multiple})
        named_dtype(self.save_dtype, "--save-dtype", SAVE_DTYPES)

    def output_dtype(self, source_dtype: str) -> torch.dtype:
        """The dtype the checkpoint is saved in, for a source stored in `source_dtype`."""
        return getattr(torch, source_dtype if self.save_dtype == "auto" else self.save_dtype)

    def check_layers(self, num_layers: int) -> None:
        """The check that needs the model: `group_size` at most its number of decoder layers."""
        if not 1 <= self.group_size <= num_layers:
            raise HFCompressError(
                f"--group-size must be between 1 and the number of layers ({num_layers}); got {self.group_size}.")

    def resolve(self, device: str | torch.device | None = None) -> "BasisSharingConfig":
        """A copy with `rank_multiple` set for `device` (and `share`/`dense` as tuples, as the CLI and JSON give lists)."""
        multiple = self.rank_multiple if self.rank_multiple is not None else default_rank_multiple(_device(device))
        return dataclasses.replace(self, share=tuple(self.share), dense=tuple(self.dense), rank_multiple=multiple)

    def groups(self, num_layers: int) -> dict[str, list[list[int]]]:
        """Groups of every compressed projection type."""
        return {
            name: make_groups(num_layers, self.group_size if name in self.share else 1)
            for name in PROJECTIONS
            if name not in self.dense
        }


@dataclass
class CalibrationConfig(MethodConfig):
    """Calibration text: a preset, a local file or a Hub dataset; `samples` chunks of `seq_len` tokens.

    `dtype` is that of the calibration forwards' matrix products: `"auto"` (resolved by `resolve`) takes bfloat16
    where the device multiplies it natively and float32 elsewhere. Grams, whitening and factorizations are
    float32/float64 either way.

    `chat_fraction`: share of the `samples` that are chat text written by the source through its own chat template
    (free samples, as healing's `chat_source="free"` writes them) instead of chunks of `dataset`; 0 (the default)
    calibrates on `dataset` alone. A source without a chat template is refused.
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
    chat_fraction: float = 0.0

    def validate(self) -> None:
        """Raises `HFCompressError` naming the first bad option."""
        _check_at_least_one({"--calib-samples": self.samples, "--calib-seq-len": self.seq_len,
                             "--batch-size": self.batch_size})
        if isinstance(self.chat_fraction, bool) or not isinstance(self.chat_fraction, (int, float)) \
                or not 0.0 <= self.chat_fraction <= 1.0:
            raise HFCompressError(f"--calib-chat-fraction must be a number in [0, 1]; got {self.chat_fraction!r}.")
        # `calibration_dtype` owns the list of names and its message; the device does not matter for the check.
        calibration_dtype(self.dtype, torch.device("cpu"))

    def resolve(self, device: str | torch.device | None = None) -> "CalibrationConfig":
        """A copy with `dtype` "auto" replaced by the dtype it means on `device` (the provenance records that one)."""
        return dataclasses.replace(self, dtype=dtype_name(calibration_dtype(self.dtype, _device(device))))

    @property
    def chat_samples(self) -> int:
        """How many of the `samples` are the source's chat text (at least one for any fraction above 0)."""
        return 0 if self.chat_fraction == 0 else max(1, round(self.samples * self.chat_fraction))

