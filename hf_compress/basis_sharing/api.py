"""The converter: stock Llama-family checkpoint -> calibration -> Basis Sharing -> SharedBasisLlama checkpoint."""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .. import __version__
from ..data.text import PRESETS, calibration_batch, load_texts, resolve_text_source
from ..checkpoint import save_pretrained_checkpoint
from ..device import PeakMemory, calibration_dtype, dtype_name, pick_device
from ..errors import HFCompressError
from ..sources import load_source
from .assembly import build_shared_basis_llama
from .compressor import (
    BasisSharingCompressor,
    count_compressed_params,
    dense_projection_params,
)
from .config import BasisSharingConfig, CalibrationConfig

logger = logging.getLogger(__name__)

@dataclass
class ConversionResult:
    """What `convert` produced and measured."""

    output_dir: Path | None
    target_ratio: float
    achieved_ratio: float
    params_before: int
    params_after: int
    ranks: dict[str, list[int]]
    wall_time_s: float
    peak_memory_mb: float
    whitening_shifts: dict[str, list[float]] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    perplexity_before: float | None = None
    perplexity_after: float | None = None


def convert(
    source: str,
    output_dir: str | Path | None,
    *,
    options: BasisSharingConfig | None = None,
    calibration: CalibrationConfig | None = None,
    gguf_file: str | None = None,
    revision: str | None = None,
    device: str | None = None,
    overwrite: bool = False,
    eval_dataset: str | None = None,
    eval_seq_len: int = 2048,
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
        options: what to compress (`BasisSharingConfig`).
        calibration: calibration text and sampling (`CalibrationConfig`).
        eval_dataset: if given, perplexity before and after on this text (preset, file or Hub name).
        push_to_hub: `ORG/NAME` to upload the finished checkpoint to.
    """
    options = options or BasisSharingConfig()
    calibration = calibration or CalibrationConfig()
    output = Path(output_dir) if output_dir is not None else None
    if output is not None and output.exists() and not overwrite:
        raise HFCompressError(f"output directory {output} exists; pass --overwrite to replace it.")
    compute_device = pick_device(device)
    # Provenance records the dtype actually used, not "auto".
    calibration = dataclasses.replace(calibration, dtype=dtype_name(calibration_dtype(calibration.dtype, compute_device)))
    start = time.perf_counter()
    with PeakMemory() as peak:
        model, tokenizer, info = load_source(source, gguf_file=gguf_file, revision=revision)
        load_time = time.perf_counter() - start
        options.validate(model.config.num_hidden_layers)
        text_source = resolve_text_source(calibration.dataset, calibration.config, calibration.split, calibration.column)
        ids = calibration_batch(tokenizer, load_texts(text_source), samples=calibration.samples,
                                seq_len=calibration.seq_len, seed=calibration.seed)
        compressor = BasisSharingCompressor(model, options, ids, compute_device, calibration.batch_size, progress,
                                            dtype=getattr(torch, calibration.dtype))
        factors = compressor.run()
        params_before = dense_projection_params(model, compressor.groups)
        params_after = count_compressed_params(factors)
        achieved = 1.0 - params_after / params_before
        compression = {
            "method": "basis_sharing",
            "target_ratio": options.ratio,
            "achieved_ratio": round(achieved, 6),
            "params_before": params_before,
            "params_after": params_after,
            "calibration": {**asdict(calibration), "dataset": text_source.describe()},
            "source": info.to_dict(),
            "options": {**asdict(compressor.options), "share": list(options.share), "dense": list(options.dense)},
            "hf_compress_version": __version__,
        }
        compressed = build_shared_basis_llama(model, factors, compression=compression)
        compression["total_params_before"] = sum(p.numel() for p in model.parameters())
        compression["total_params_after"] = sum(p.numel() for p in compressed.parameters())
        compressed.config.compression = compression
        result = ConversionResult(
            output_dir=output,
            target_ratio=options.ratio,
            achieved_ratio=achieved,
            params_before=params_before,
            params_after=params_after,
            ranks={name: [f.rank for f in groups] for name, groups in factors.items()},
            wall_time_s=0.0,
            peak_memory_mb=0.0,
            whitening_shifts={k: v for k, v in compressor.whitening_shifts.items() if any(v)},
            timings={"load_s": load_time, **compressor.timings},
        )
        conversion_time = time.perf_counter() - start
        if eval_dataset:
            from ..evaluation.perplexity import perplexity

            eval_source = resolve_text_source(eval_dataset)
            texts = load_texts(eval_source)
            result.perplexity_before = perplexity(model, tokenizer, texts, seq_len=eval_seq_len,
                                                  max_windows=eval_max_windows, progress=progress)
            result.perplexity_after = perplexity(compressed, tokenizer, texts, seq_len=eval_seq_len,
                                                 max_windows=eval_max_windows, progress=progress)
        if output is not None:
            save_checkpoint(compressed, tokenizer, output, overwrite=overwrite, eval_source=eval_dataset,
                            result=result, eval_seq_len=eval_seq_len, eval_max_windows=eval_max_windows)
    result.wall_time_s = conversion_time
    result.peak_memory_mb = peak.peak_mb
    if push_to_hub and output is not None:
        from ..hub import push_to_hub as push

        push(output, push_to_hub, private=private, revision=hub_revision)
    return result


def save_checkpoint(model, tokenizer, output: Path, *, overwrite: bool, eval_source: str | None = None,
                    result: ConversionResult | None = None, eval_seq_len: int = 2048,
                    eval_max_windows: int | None = None) -> None:
    """Writes the checkpoint (weights, remote code, tokenizer, perplexity, card) atomically (`hf_compress.checkpoint`)."""
    extra = {}
    if result is not None and result.perplexity_after is not None:
        extra["perplexity.json"] = {
            "dataset": eval_source, "seq_len": eval_seq_len, "max_windows": eval_max_windows,
            "perplexity_source": result.perplexity_before, "perplexity": result.perplexity_after,
        }
    save_pretrained_checkpoint(
        model, output, processor=tokenizer, extra_files=extra, overwrite=overwrite,
        card=lambda folder: _write_card(folder, result, eval_source, eval_seq_len, eval_max_windows),
    )


def _write_card(folder: Path, result: ConversionResult | None, eval_source: str | None, eval_seq_len: int,
                eval_max_windows: int | None) -> None:
    """Writes the model card; a perplexity measured during the conversion goes in as an evaluation result."""
    from .. import cards

    if result is None or result.perplexity_after is None:
        cards.write_model_card(folder)
        return
    dataset = resolve_text_source(eval_source)
    hub = PRESETS[eval_source][0] if eval_source in PRESETS else dataset
    cards.record_eval_results(folder, [{
        "task_type": "text-generation",
        "dataset_type": hub.dataset,
        "dataset_name": (f"{hub.dataset} {hub.config or ''} ({hub.split})".replace("  ", " ") if eval_source in PRESETS
                         else Path(dataset.dataset).name),
        "dataset_config": hub.config,
        "dataset_split": hub.split,
        "metric_type": "perplexity",
        "metric_name": f"perplexity ({eval_seq_len}-token windows, {eval_max_windows or 'all'} windows)",
        "metric_value": round(result.perplexity_after, 4),
        "source": "hf-compress ppl",
        "details": {"perplexity_of_source": round(result.perplexity_before, 4)},
    }])
