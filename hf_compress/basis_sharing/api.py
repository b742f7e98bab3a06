"""The converter: stock Llama-family checkpoint -> calibration -> Basis Sharing -> SharedBasisLlama checkpoint.

`convert` runs the steps in order; each step is a function of its own module (`hf_compress.sources`,
`hf_compress.data.text`, `compressor`, `assembly` + `record`, `evaluation`, `save`, `hf_compress.hub`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..data.text import calibration_batch, load_texts, resolve_text_source
from ..device import PeakMemory, pick_device
from ..errors import HFCompressError
from ..sources import load_source, source_config
from .assembly import build_shared_basis_llama
from .compressor import BasisSharingCompressor
from .config import EVAL_SEQ_LEN, BasisSharingConfig, CalibrationConfig
from .evaluation import PerplexityResult, measure_perplexity
from .record import compression_record, conversion_figures
from .save import save_checkpoint


def _recorded(key: str, doc: str) -> property:
    """A read-only attribute of `ConversionResult` read from its provenance record (kept in one place)."""
    return property(lambda self: self.provenance[key], doc=doc)


@dataclass
class ConversionResult:
    """What `convert` produced and measured; the ratios and parameter counts are read from `provenance`.

    Args:
        output_dir: where the checkpoint was saved (`None`: not saved).
        provenance: the record saved as the checkpoint's `config.compression`.
        ranks: the rank of every group, per projection type.
        wall_time_s: seconds from loading the source to the assembled model (evaluation and saving excluded).
        peak_memory_mb: peak resident memory of the conversion, evaluation and saving included.
        whitening_shifts: per projection type, the diagonal shifts added to Grams that were not positive definite.
        timings: seconds of each phase (`load_s`, `calibration_s`, `decomposition_s`, ...).
        perplexity_before, perplexity_after: on `eval_dataset`, when given.
    """

    output_dir: Path | None
    provenance: dict[str, Any]
    ranks: dict[str, list[int]]
    wall_time_s: float = 0.0
    peak_memory_mb: float = 0.0
    whitening_shifts: dict[str, list[float]] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    perplexity_before: float | None = None
    perplexity_after: float | None = None

    target_ratio = _recorded("target_ratio", "The ratio asked for.")
    achieved_ratio = _recorded("achieved_ratio", "The ratio the ranks reach, over the compressed projections.")
    params_before = _recorded("params_before", "Parameters of the compressed projections, dense.")
    params_after = _recorded("params_after", "Parameters of the compressed projections' bases and coefficients.")


def convert(
    source: str,
    output_dir: str | Path | None,
    config: BasisSharingConfig | None = None,
    *,
    calibration: CalibrationConfig | None = None,
    gguf_file: str | None = None,
    revision: str | None = None,
    device: str | None = None,
    overwrite: bool = False,
    eval_dataset: str | None = None,
    eval_seq_len: int = EVAL_SEQ_LEN,
    eval_max_windows: int | None = None,
    push_to_hub: str | None = None,
    private: bool = False,
    hub_revision: str | None = None,
    progress: bool = True,
) -> ConversionResult:
    """Converts a Llama-family checkpoint into a SharedBasisLlama checkpoint with Basis Sharing.

    Args:
        source: Hub id, local folder, `.gguf` file, or `"smollm2"` for the bundled SmolLM2-135M-Instruct GGUF.
        output_dir: where the checkpoint goes; it appears only once complete. `None` skips saving.
        config: what to compress (`BasisSharingConfig`).
        calibration: calibration text and sampling (`CalibrationConfig`).
        device: where the calibration and the factorizations run (default: cuda if present).
        eval_dataset: if given, perplexity before and after on this text (preset, file or Hub name).
        push_to_hub: `ORG/NAME` to upload the finished checkpoint to.
    """
    output = _output_path(output_dir, overwrite)
    compute_device = pick_device(device)
    start = time.perf_counter()
    with PeakMemory() as peak:
        architecture = source_config(source, gguf_file=gguf_file, revision=revision)
        config, calibration = resolve_configs(config, calibration, architecture.num_hidden_layers, compute_device)
        model, tokenizer, info = load_source(source, gguf_file=gguf_file, revision=revision, config=architecture)
        load_time = time.perf_counter() - start
        compressor = BasisSharingCompressor(model, config, calibration_ids(tokenizer, calibration), compute_device,
                                            calibration.batch_size, progress, dtype=getattr(torch, calibration.dtype))
        factors = compressor.run()
        compressed = build_shared_basis_llama(model, factors)
        figures = conversion_figures(config, model, compressed, factors)
        compressed.config.compression = compression_record(config, calibration, info.to_ref(), figures)
        result = ConversionResult(
            output_dir=output,
            provenance=compressed.config.compression,
            ranks={name: [f.rank for f in groups] for name, groups in factors.items()},
            wall_time_s=time.perf_counter() - start,
            whitening_shifts={k: v for k, v in compressor.whitening_shifts.items() if any(v)},
            timings={"load_s": load_time, **compressor.timings},
        )
        perplexity = _evaluate(model, compressed, tokenizer, eval_dataset, eval_seq_len, eval_max_windows, progress)
        if perplexity is not None:
            result.perplexity_before, result.perplexity_after = perplexity.before, perplexity.after
        if output is not None:
            save_checkpoint(compressed, tokenizer, output, overwrite=overwrite, perplexity=perplexity)
    result.peak_memory_mb = peak.peak_mb
    if push_to_hub and output is not None:
        from ..hub import push_to_hub as push

        push(output, push_to_hub, private=private, revision=hub_revision)
    return result


def _output_path(output_dir: str | Path | None, overwrite: bool) -> Path | None:
    """The output folder; an existing one is refused before any work unless `overwrite`."""
    output = Path(output_dir) if output_dir is not None else None
    if output is not None and output.exists() and not overwrite:
        raise HFCompressError(f"output directory {output} exists; pass --overwrite to replace it.")
    return output


def resolve_configs(config: BasisSharingConfig | None, calibration: CalibrationConfig | None, num_layers: int,
                    device: torch.device) -> tuple[BasisSharingConfig, CalibrationConfig]:
    """Both configs checked and resolved for `device` (their defaults when `None`), before the model loads.

    The group size is checked against `num_layers` (read from the source's config) first, so that a group size of
    0 gets the message that names the valid range.
    """
    config = config if config is not None else BasisSharingConfig()
    calibration = calibration if calibration is not None else CalibrationConfig()
    config.check_layers(num_layers)
    config.validate()
    calibration.validate()
    return config.resolve(device), calibration.resolve(device)


def calibration_ids(tokenizer: PreTrainedTokenizerBase, calibration: CalibrationConfig) -> torch.Tensor:
    """The calibration token batch (`samples x seq_len`) that `calibration` describes."""
    text = resolve_text_source(calibration.dataset, calibration.config, calibration.split, calibration.column)
    return calibration_batch(tokenizer, load_texts(text), samples=calibration.samples, seq_len=calibration.seq_len,
                             seed=calibration.seed)


def _evaluate(source: PreTrainedModel, compressed: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
              dataset: str | None, seq_len: int, max_windows: int | None, progress: bool) -> PerplexityResult | None:
    if not dataset:
        return None
    return measure_perplexity(source, compressed, tokenizer, dataset, seq_len=seq_len, max_windows=max_windows,
                              progress=progress)
