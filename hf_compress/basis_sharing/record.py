"""The provenance record (`config.compression`) of a Basis Sharing conversion."""

from __future__ import annotations

from typing import Any

from torch import nn

from ..provenance import DataRef, SourceRef, provenance
from .compressor import count_compressed_params, dense_projection_params
from .config import BasisSharingConfig, CalibrationConfig
from .decomposition import GroupFactors

METHOD = "basis_sharing"


def calibration_record(calibration: CalibrationConfig, data: DataRef) -> dict[str, Any]:
    """The resolved calibration config as a dict, a local dataset named by `data` (its file name), never by path."""
    return {**calibration.to_dict(), "dataset": data.name}


def conversion_figures(config: BasisSharingConfig, source: nn.Module, compressed: nn.Module,
                       factors: dict[str, list[GroupFactors]]) -> dict[str, Any]:
    """Target and achieved ratio over the compressed projections, and their and the whole models' parameter counts."""
    params_before = dense_projection_params(source, factors)
    params_after = count_compressed_params(factors)
    return {
        "target_ratio": config.ratio,
        "achieved_ratio": round(1.0 - params_after / params_before, 6),
        "params_before": params_before,
        "params_after": params_after,
        "total_params_before": sum(p.numel() for p in source.parameters()),
        "total_params_after": sum(p.numel() for p in compressed.parameters()),
    }


def compression_record(config: BasisSharingConfig, calibration: CalibrationConfig, source: SourceRef,
                       figures: dict[str, Any]) -> dict[str, Any]:
    """The record of a conversion run with the resolved `config` and `calibration`."""
    data = DataRef.of("calibration", calibration.dataset, calibration.split)
    return provenance(METHOD, config, source, [data], figures, calibration=calibration_record(calibration, data))
