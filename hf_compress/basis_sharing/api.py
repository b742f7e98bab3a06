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
from transformers import PretrainedConfig

from ..checkpoint import prepare_output
from ..data.text import calibration_batch, load_text_option
from ..device import MemoryPhases, dtype_name, pick_device
from ..errors import HFCompressError
from ..sources import load_source, source_config, source_tokenizer
from .assembly import LayerwiseAssembly
from .calibration import with_chat_samples
from .compressor import BasisSharingCompressor
from .config import EVAL_SEQ_LEN, BasisSharingConfig, CalibrationConfig
from .evaluation import check_context, check_window_options, measure_perplexity
from ..healing.config import HealConfig
from ..healing.data import has_chat_template
from .footprint import source_footprint
from .record import compression_record, conversion_figures
from .save import round_weights, save_checkpoint


def _recorded(key: str, doc: str) -> property:
    """A read-only attribute of `ConversionResult` read from its provenance record (kept in one place)."""
    return property(lambda self: self.provenance.get(key), doc=doc)


@dataclass
class ConversionResult:
    """What `convert` produced and measured; the ratios and parameter counts are read from `provenance`.

    Args:
        output_dir: where the checkpoint was saved (`None`: not saved).
        provenance: the record saved as the checkpoint's `config.compression`.
        ranks: the rank of every group, per projection type.
        wall_time_s: seconds from loading the source to the assembled model (evaluation and saving excluded).
        peak_memory_mb: peak resident memory of the conversion, evaluation and saving included.
        memory_mb: the peak resident memory of each phase (`load`, `calibration`, `decomposition` or
            `calibration_and_decomposition`, `assembly`, `healing`, `evaluation`, `save`), in MiB.
        whitening_shifts: per projection type, the diagonal shifts added to Grams that were not positive definite.
        timings: seconds of each phase (`load_s`, `calibration_s`, `decomposition_s`, ...).
        perplexity_before, perplexity_after: on `eval_dataset`, when given (after: of the checkpoint as saved).
        perplexity_unhealed: with `heal`, the compressed model's perplexity before healing.
        healing: with `heal`, the `HealResult` of the healing.
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
    perplexity_unhealed: float | None = None
    healing: Any = None
    memory_mb: dict[str, float] = field(default_factory=dict)

    target_ratio = _recorded("target_ratio", "The ratio asked for.")
    achieved_ratio = _recorded("achieved_ratio", "The ratio the ranks reach, over the compressed projections.")
    params_before = _recorded("params_before", "Parameters of the compressed projections, dense.")
    params_after = _recorded("params_after", "Parameters of the compressed projections' bases and coefficients.")
    source_file_bytes = _recorded("source_file_bytes", "Bytes of the source's weight files (None: not found).")
    output_file_bytes = _recorded("output_file_bytes", "Bytes of the saved model*.safetensors (None: not saved).")
    source_dtype = _recorded("source_dtype", "The dtype the source's weights are stored in (dequantized to, for a "
                                             "quantized GGUF file).")
    source_format = _recorded("source_format", "How a quantized GGUF source is stored (`GGUF Q4_1`), else None.")
    output_dtype = _recorded("output_dtype", "The dtype the checkpoint's weights are saved in.")


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
    heal: HealConfig | None = None,
) -> ConversionResult:
    """Converts a Llama-family checkpoint into a SharedBasisLlama checkpoint with Basis Sharing.

    Everything that can be checked without the weights is checked first, in this order: the output folder, the
    device, the options, the source's config (layers, context), the calibration and evaluation text.

    Args:
        source: Hub id, local folder, `.gguf` file, or `"smollm2"` for the bundled SmolLM2-135M-Instruct GGUF.
        output_dir: where the checkpoint goes; it appears only once complete. `None` skips saving.
        config: what to compress (`BasisSharingConfig`), and the dtype the checkpoint is saved in.
        calibration: calibration text and sampling (`CalibrationConfig`).
        device: where the calibration and the factorizations run (default: cuda if present).
        overwrite: replace an existing hf-compress output at `output_dir` (a folder of anything else is refused).
        eval_dataset: if given, perplexity before and after on this text (preset, file or Hub name).
        push_to_hub: `ORG/NAME` to upload the finished checkpoint to.
        heal: if given, the compressed model is healed by distillation from the source already in memory
            (`hf_compress.healing.heal`) before it is evaluated and saved.
    """
    output, compute_device = _check_options(source, output_dir, gguf_file, overwrite, device, eval_seq_len,
                                            eval_max_windows, heal)
    start = time.perf_counter()
    phases = MemoryPhases()
    inputs = _load_inputs(source, gguf_file, revision, config, calibration, compute_device, eval_dataset,
                          eval_seq_len, heal, phases, start, progress)
    evaluation = None
    if inputs.eval_texts is not None:
        evaluation = _Evaluation(eval_dataset, inputs.eval_texts, eval_seq_len, eval_max_windows, progress)
    # Without healing the source is needed for nothing but its own perplexity, measured first: its layers are then
    # freed as soon as their compressed versions exist, so the two models never sit in memory side by side. Healing
    # distils from the source, which is then kept whole.
    release_source = heal is None
    before, before_s = None, 0.0
    if evaluation is not None and release_source:
        before, before_s = _source_perplexity(inputs, evaluation, phases)
    compressed, compressor, factors, save_dtype = _compress(inputs, compute_device, progress, phases, release_source,
                                                            source, gguf_file, revision)
    result = _result(output, compressed, compressor, factors, time.perf_counter() - start - before_s,
                     inputs.load_s, phases)
    healing_eval = None
    if heal is not None:
        healing_eval = _heal_in_convert(result, inputs, compressed, heal, compute_device, progress, evaluation, phases)
    # The perplexity is that of the weights as saved (rounded to the save dtype), run in float32 as `ppl` does.
    round_weights(compressed, save_dtype)
    perplexity = None
    if evaluation is not None:
        perplexity = _evaluate(result, None if release_source else inputs.model, compressed, inputs.tokenizer,
                               evaluation, before, healing_eval, phases)
    _save_and_push(result, compressed, inputs.tokenizer, output, save_dtype, perplexity, phases, overwrite=overwrite,
                   push_to_hub=push_to_hub, private=private, hub_revision=hub_revision)
    return result


@dataclass
class _Inputs:
    """What `convert` reads before compressing: the resolved configs, the source, the texts and the calibration
    batch (`load_s`: seconds from the start to the loaded source)."""

    architecture: PretrainedConfig
    config: BasisSharingConfig
    calibration: CalibrationConfig
    texts: list[str]
    eval_texts: list[str] | None
    model: torch.nn.Module
    tokenizer: Any
    info: Any
    ids: torch.Tensor | None = None
    load_s: float = 0.0


@dataclass
class _Evaluation:
    """The evaluation text and its windows (`convert`'s `eval_*` options)."""

    dataset: str
    texts: list[str]
    seq_len: int
    max_windows: int | None
    progress: bool


def _check_options(source: str, output_dir: str | Path | None, gguf_file: str | None, overwrite: bool,
                   device: str | None, eval_seq_len: int, eval_max_windows: int | None,
                   heal: HealConfig | None) -> tuple[Path | None, torch.device]:
    """Checks the output folder, the device and the options, in this order; returns the output folder and device."""
    output = None
    if output_dir is not None:
        output = prepare_output(output_dir, overwrite=overwrite, sources=[source, *([gguf_file] if gguf_file else [])])
    compute_device = pick_device(device)
    check_window_options(eval_seq_len, eval_max_windows, seq_flag="--eval-seq-len", windows_flag="--eval-max-windows")
    if heal is not None:
        heal.validate()
    return output, compute_device


def _load_inputs(source: str, gguf_file: str | None, revision: str | None, config: BasisSharingConfig | None,
                 calibration: CalibrationConfig | None, device: torch.device, eval_dataset: str | None,
                 eval_seq_len: int, heal: HealConfig | None, phases: MemoryPhases, start: float,
                 progress: bool = True) -> _Inputs:
    """The `load` phase: checks the source's config and reads the texts, then loads the source (the weights last,
    so that all that can fail without them fails first) and draws the calibration batch (with the source's chat
    text where `calibration.chat_fraction` asks for it)."""
    with phases("load"):
        inputs = _read_inputs(source, gguf_file, revision, config, calibration, device, eval_dataset, eval_seq_len,
                              heal)
        inputs.load_s = time.perf_counter() - start
        calib = inputs.calibration
        inputs.ids = calibration_batch(inputs.tokenizer, inputs.texts, samples=calib.samples, seq_len=calib.seq_len,
                                       seed=calib.seed)
        inputs.ids = with_chat_samples(inputs.ids, inputs.model, inputs.tokenizer, calib, device, progress=progress)
    return inputs


def _read_inputs(source: str, gguf_file: str | None, revision: str | None, config: BasisSharingConfig | None,
                 calibration: CalibrationConfig | None, device: torch.device, eval_dataset: str | None,
                 eval_seq_len: int, heal: HealConfig | None) -> _Inputs:
    """Checks the source's config, reads the texts and loads the source, in this order."""
    architecture = source_config(source, gguf_file=gguf_file, revision=revision)
    config, calibration = resolve_configs(config, calibration, architecture, device, source)
    texts = load_text_option("--calib-dataset", calibration.dataset, calibration.config, calibration.split,
                             calibration.column)
    eval_texts = None
    if eval_dataset:
        check_context("--eval-seq-len", eval_seq_len, _context(architecture), source)
        eval_texts = load_text_option("--eval-dataset", eval_dataset)
    heal_texts = None
    if heal is not None:  # the healing text is read before the weights load, so that a bad one fails first
        heal_texts = load_text_option("--heal-dataset", heal.dataset, column=heal.dataset_column)
    if calibration.chat_fraction > 0 and not has_chat_template(source_tokenizer(source, gguf_file=gguf_file,
                                                                                revision=revision)):
        raise HFCompressError(f"--calib-chat-fraction {calibration.chat_fraction:g}: the source's tokenizer has no "
                              "chat template to write chat text with; calibrate on text alone (0).")
    model, tokenizer, info = load_source(source, gguf_file=gguf_file, revision=revision, config=architecture)
    if heal_texts is not None:  # and it must hold one batch, checked before the calibration starts
        from ..healing.data import healing_ids

        healing_ids(tokenizer, heal_texts, heal)
    return _Inputs(architecture, config, calibration, texts, eval_texts, model, tokenizer, info)


def _source_perplexity(inputs: _Inputs, evaluation: _Evaluation, phases: MemoryPhases) -> tuple[float, float]:
    """The source's perplexity, measured before it is compressed, and the seconds it took."""
    started = time.perf_counter()
    with phases("evaluation"):
        before = _perplexity(inputs.model, inputs.tokenizer, evaluation.texts, evaluation.seq_len,
                             evaluation.max_windows, evaluation.progress)
    return before, time.perf_counter() - started


def _compress(inputs: _Inputs, device: torch.device, progress: bool, phases: MemoryPhases, release_source: bool,
              source: str, gguf_file: str | None,
              revision: str | None) -> tuple[Any, BasisSharingCompressor, dict[str, list[Any]], torch.dtype]:
    """Calibrates, decomposes and assembles the compressed model, with its provenance record.

    Returns the compressed model, the compressor (timings, whitening shifts), the factors (shapes and ranks only)
    and the dtype the checkpoint is saved in.
    """
    config, model = inputs.config, inputs.model
    assembly = LayerwiseAssembly(model, release_source=release_source)
    compressor = BasisSharingCompressor(model, config, inputs.ids, device, inputs.calibration.batch_size, progress,
                                        dtype=getattr(torch, inputs.calibration.dtype), phases=phases, sink=assembly)
    factors = compressor.run()  # their tensors went into `assembly`: shapes and ranks only
    with phases("assembly"):
        compressed = assembly.finish()
        figures = {**conversion_figures(config, model, compressed, factors),
                   **source_footprint(source, gguf_file, revision, inputs.architecture)}
        save_dtype = config.output_dtype(figures["source_dtype"])
        figures["output_dtype"] = dtype_name(save_dtype)
        compressed.config.compression = compression_record(config, inputs.calibration, inputs.info.to_ref(), figures)
    return compressed, compressor, factors, save_dtype


def _result(output: Path | None, compressed: torch.nn.Module, compressor: BasisSharingCompressor,
            factors: dict[str, list[Any]], wall_time_s: float, load_s: float, phases: MemoryPhases) -> ConversionResult:
    """The `ConversionResult` of the assembled model (perplexities, healing and peak memory are filled in later)."""
    return ConversionResult(
        output_dir=output,
        provenance=compressed.config.compression,
        ranks={name: [f.rank for f in groups] for name, groups in factors.items()},
        wall_time_s=wall_time_s,
        whitening_shifts={k: v for k, v in compressor.whitening_shifts.items() if any(v)},
        timings={"load_s": load_s, **compressor.timings},
        memory_mb=phases.peaks_mb,
    )


def _heal_in_convert(result: ConversionResult, inputs: _Inputs, compressed: torch.nn.Module, heal: HealConfig,
                     device: torch.device, progress: bool, evaluation: _Evaluation | None, phases: MemoryPhases):
    """Heals `compressed` from the source in memory (`_heal`); returns the `HealingEvaluation`, if any."""
    from ..healing.trainer import HealingEvaluation

    healing_eval = None
    if evaluation is not None:
        healing_eval = HealingEvaluation(evaluation.dataset, evaluation.texts, evaluation.seq_len,
                                         evaluation.max_windows, evaluation.progress)
    with phases("healing"):
        _heal(result, inputs.model, compressed, inputs.tokenizer, inputs.info.to_ref(), heal, device, progress,
              healing_eval)
    return healing_eval


def _evaluate(result: ConversionResult, source: torch.nn.Module | None, compressed: torch.nn.Module, tokenizer,
              evaluation: _Evaluation, before: float | None, healing_eval, phases: MemoryPhases):
    """The perplexities before and after (`measure_perplexity`), recorded in `result` and, with healing, in the
    provenance."""
    with phases("evaluation"):
        perplexity = measure_perplexity(source, compressed, tokenizer, evaluation.dataset, evaluation.texts,
                                        seq_len=evaluation.seq_len, max_windows=evaluation.max_windows,
                                        progress=evaluation.progress, before=before)
    result.perplexity_before, result.perplexity_after = perplexity.before, perplexity.after
    if healing_eval is not None:
        healing_eval.after = perplexity.after
        perplexity.unhealed = healing_eval.before
        compressed.config.compression["healing"]["perplexity"] = healing_eval.record()
    return perplexity


def _save_and_push(result: ConversionResult, compressed: torch.nn.Module, tokenizer, output: Path | None,
                   save_dtype: torch.dtype, perplexity, phases: MemoryPhases, *, overwrite: bool,
                   push_to_hub: str | None, private: bool, hub_revision: str | None) -> None:
    """Saves the checkpoint (when there is an output folder), records the peak memory, then pushes it if asked."""
    if output is not None:
        with phases("save"):
            save_checkpoint(compressed, tokenizer, output, dtype=save_dtype, overwrite=overwrite, perplexity=perplexity)
    result.peak_memory_mb = phases.peak_mb
    if push_to_hub and output is not None:
        from ..hub import push_to_hub as push

        push(output, push_to_hub, private=private, revision=hub_revision)


def _perplexity(model, tokenizer, texts: list[str], seq_len: int, max_windows: int | None, progress: bool) -> float:
    from ..evaluation.perplexity import perplexity

    return perplexity(model, tokenizer, texts, seq_len=seq_len, max_windows=max_windows, progress=progress)


def _heal(result: ConversionResult, source: torch.nn.Module, compressed: torch.nn.Module, tokenizer, source_ref,
          config: HealConfig, device: torch.device, progress: bool, evaluation) -> None:
    """Heals `compressed` in place by distillation from `source` (the model already in memory: no second load).

    With an evaluation (`HealingEvaluation`), the perplexity before healing is measured here; the one after healing
    is `convert`'s own evaluation of the weights as saved.
    """
    from ..healing import heal

    if evaluation is not None:
        evaluation.before = result.perplexity_unhealed = evaluation.measure(compressed, tokenizer, device)
    started = time.perf_counter()
    result.healing = heal(compressed, None, teacher=source, config=config, tokenizer=tokenizer, device=device,
                          progress=progress, teacher_ref=source_ref)
    result.timings["healing_s"] = time.perf_counter() - started
    compressed.to("cpu")
    source.to("cpu")
    result.provenance = compressed.config.compression


def _context(architecture: PretrainedConfig) -> int | None:
    """The longest sequence the source was trained for (`max_position_embeddings`), if its config says."""
    return getattr(architecture, "max_position_embeddings", None)


def resolve_configs(config: BasisSharingConfig | None, calibration: CalibrationConfig | None,
                    architecture: PretrainedConfig, device: torch.device,
                    source: str = "the source") -> tuple[BasisSharingConfig, CalibrationConfig]:
    """Both configs checked against the source's config and resolved for `device` (their defaults when `None`),
    before the model loads.

    The group size is checked against the source's number of layers first, so that a group size of 0 gets the
    message that names the valid range; the calibration length against the source's context last.
    """
    config = config if config is not None else BasisSharingConfig()
    calibration = calibration if calibration is not None else CalibrationConfig()
    config.check_layers(architecture.num_hidden_layers)
    config.validate()
    calibration.validate()
    check_context("--calib-seq-len", calibration.seq_len, _context(architecture), source)
    return config.resolve(device), calibration.resolve(device)
