"""`hf-compress convert` and `hf-compress ppl`.

The option defaults are read from `BasisSharingConfig` and `CalibrationConfig`; the converter itself is imported
inside the command, so that `--help` stays fast.
"""

from __future__ import annotations

from typing import Optional

import typer

from ..basis_sharing.config import (
    DEFAULT_SHARED,
    EVAL_SEQ_LEN,
    GPU_RANK_MULTIPLE,
    BasisSharingConfig,
    CalibrationConfig,
)
from ..device import MODEL_DTYPES
from ..errors import HFCompressError
from ..healing.config import HealConfig

_BS = BasisSharingConfig()
_CAL = CalibrationConfig()
_HEAL = HealConfig()


def _split_names(value: str) -> tuple[str, ...]:
    return tuple(name.strip() for name in value.split(",") if name.strip())


def convert_command(
    source: str = typer.Argument(..., help="Hub id, local folder, .gguf file, or 'smollm2' (the bundled SmolLM2-135M GGUF)."),
    output: str = typer.Argument(..., help="Output folder; it appears only once the checkpoint is complete."),
    gguf_file: Optional[str] = typer.Option(None, "--gguf-file", help="GGUF file inside SOURCE (loaded through transformers)."),
    revision: Optional[str] = typer.Option(None, "--source-revision", help="Revision of a Hub SOURCE."),
    ratio: float = typer.Option(_BS.ratio, "--ratio", help="Fraction of the compressed projections' parameters to remove."),
    group_size: int = typer.Option(_BS.group_size, "--group-size", help="Layers per shared basis for the --share types."),
    share: str = typer.Option(",".join(DEFAULT_SHARED), "--share",
                              help="Projection types whose basis is shared across --group-size layers (others: per layer)."),
    dense: str = typer.Option(",".join(_BS.dense), "--dense", help="Projection types left dense."),
    whiten: bool = typer.Option(_BS.whiten, "--whiten/--no-whiten", help="Whitened SVD (SVD-LLM); --no-whiten is plain SVD."),
    calib_dataset: str = typer.Option(_CAL.dataset, "--calib-dataset",
                                      help="Preset (c4-calibration, wikitext2, ptb, c4), local parquet/jsonl/txt file or Hub name."),
    calib_config: Optional[str] = typer.Option(_CAL.config, "--calib-config"),
    calib_split: Optional[str] = typer.Option(_CAL.split, "--calib-split"),
    calib_column: Optional[str] = typer.Option(_CAL.column, "--calib-column"),
    calib_samples: int = typer.Option(_CAL.samples, "--calib-samples"),
    calib_seq_len: int = typer.Option(_CAL.seq_len, "--calib-seq-len"),
    calib_chat_fraction: float = typer.Option(
        _CAL.chat_fraction, "--calib-chat-fraction",
        help="Share of the calibration samples that are chat text the source writes through its chat template "
             "(instruct sources); the rest come from --calib-dataset."),
    seed: int = typer.Option(_CAL.seed, "--seed"),
    rank_allocation: str = typer.Option(_BS.rank_allocation, "--rank-allocation", help="uniform (the paper) or global."),
    rank_multiple: Optional[int] = typer.Option(
        _BS.rank_multiple, "--rank-multiple",
        help=f"Every rank a multiple of this (default: {GPU_RANK_MULTIPLE} on a GPU, 1 on a CPU)."),
    rank_score: str = typer.Option(_BS.rank_score, "--rank-score",
                                   help="global allocation compares losses relative to each group's energy, or absolute."),
    refit: bool = typer.Option(_BS.refit, "--refit/--no-refit", help="Least-squares refit of the coefficients."),
    layer_fit: bool = typer.Option(
        _BS.layer_fit, "--layer-fit/--no-layer-fit",
        help="Fit each shared group member's coefficients on its own Gram (no extra pass); "
             "--no-layer-fit keeps the group SVD's coefficients (the paper)."),
    sequential: bool = typer.Option(
        _BS.sequential, "--sequential/--no-sequential",
        help="Grams from the outputs of the already-compressed layers; --no-sequential: all from the dense model."),
    device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda, cuda:1 ... (default: cuda if present)."),
    batch_size: int = typer.Option(_CAL.batch_size, "--batch-size", help="Calibration samples per forward."),
    calib_dtype: str = typer.Option(
        _CAL.dtype, "--calib-dtype",
        help="Matrix products of the calibration forwards: float32, bfloat16, or auto (bfloat16 where the device "
             "has native bfloat16, else float32). Grams and factorizations stay float32/float64."),
    save_dtype: str = typer.Option(
        _BS.save_dtype, "--save-dtype",
        help="dtype of the saved weights: auto (the source's own, e.g. bfloat16 for SmolLM2), float32, bfloat16 or "
             "float16. The factorizations run in float32/float64 either way."),
    overwrite: bool = typer.Option(False, "--overwrite",
                                   help="Replace OUTPUT if it holds an hf-compress output (other folders: refused)."),
    eval_dataset: Optional[str] = typer.Option(None, "--eval-dataset", help="Also report perplexity before/after on this text."),
    eval_seq_len: int = typer.Option(EVAL_SEQ_LEN, "--eval-seq-len", help="Tokens per window (at most the context)."),
    eval_max_windows: Optional[int] = typer.Option(None, "--eval-max-windows", help="At most this many windows."),
    push_to_hub: Optional[str] = typer.Option(None, "--push-to-hub", help="ORG/NAME to upload the checkpoint to."),
    private: bool = typer.Option(False, "--private"),
    hub_revision: Optional[str] = typer.Option(None, "--revision", help="Hub branch to push to."),
    heal_tokens: int = typer.Option(0, "--heal-tokens",
                                    help="Then heal by distillation from the source for this many tokens (0: no "
                                         "healing); `hf-compress heal` offers every healing option."),
    heal_dataset: str = typer.Option(_HEAL.dataset, "--heal-dataset", help="Text to heal on (as --calib-dataset)."),
) -> None:
    """Compress a Llama/Mistral/Qwen2 checkpoint with Basis Sharing and save a SharedBasisLlama checkpoint."""
    from ..basis_sharing.api import convert

    heal = _heal_config(heal_tokens, heal_dataset)
    result = convert(
        source,
        output,
        BasisSharingConfig(
            ratio=ratio, group_size=group_size, share=_split_names(share), dense=_split_names(dense), whiten=whiten,
            rank_allocation=rank_allocation, rank_multiple=rank_multiple, rank_score=rank_score, refit=refit,
            layer_fit=layer_fit, sequential=sequential, save_dtype=save_dtype,
        ),
        calibration=CalibrationConfig(
            dataset=calib_dataset, config=calib_config, split=calib_split, column=calib_column,
            samples=calib_samples, seq_len=calib_seq_len, seed=seed, batch_size=batch_size, dtype=calib_dtype,
            chat_fraction=calib_chat_fraction,
        ),
        gguf_file=gguf_file, revision=revision, device=device, overwrite=overwrite, eval_dataset=eval_dataset,
        eval_seq_len=eval_seq_len, eval_max_windows=eval_max_windows, push_to_hub=push_to_hub, private=private,
        hub_revision=hub_revision,
        heal=heal,
    )
    typer.echo(f"saved {output}")
    _echo_summary(result, eval_dataset)


def _heal_config(heal_tokens: int, heal_dataset: str) -> HealConfig | None:
    """The healing `convert` runs after compressing (`None`: `--heal-tokens 0`, no healing)."""
    if heal_tokens < 0:
        raise HFCompressError(f"--heal-tokens must be >= 0 (0: no healing); got {heal_tokens}.")
    return HealConfig(tokens=heal_tokens, dataset=heal_dataset) if heal_tokens else None


def _echo_summary(result, eval_dataset: str | None) -> None:
    """Prints what a conversion achieved and what it cost (a `ConversionResult`)."""
    from ..cards import format_bytes

    typer.echo(f"compressed projections: {result.params_before:,} -> {result.params_after:,} parameters; "
               f"target ratio {result.target_ratio:.2%}, achieved {result.achieved_ratio:.2%}")
    for name, shifts in result.whitening_shifts.items():
        typer.echo(f"note: {len([s for s in shifts if s])} {name} Gram(s) were not positive definite; "
                   f"largest diagonal shift added {max(shifts):.3g}")
    phases = ", ".join(f"{name.removesuffix('_s').replace('_', ' ')} {seconds:.1f} s"
                       for name, seconds in result.timings.items())
    typer.echo(f"conversion: {result.wall_time_s:.1f} s ({phases}), peak memory {result.peak_memory_mb:,.0f} MB")
    if result.memory_mb:
        typer.echo("peak memory by phase: " + ", ".join(f"{name.replace('_', ' ')} {mb:,.0f} MB"
                                                        for name, mb in result.memory_mb.items()))
    if result.output_file_bytes is not None:
        stored_as = result.source_format or result.source_dtype
        typer.echo(f"weights on disk: {format_bytes(result.source_file_bytes)} {stored_as} (source) -> "
                   f"{format_bytes(result.output_file_bytes)} {result.output_dtype} (output)")
    if result.healing is not None:
        healing = result.healing
        typer.echo(f"healing: {healing.tokens:,} tokens in {healing.steps} steps, loss {healing.initial_loss:.4g} -> "
                   f"{healing.final_loss:.4g}, {healing.wall_time_s:.1f} s ({healing.tokens_per_s:,.0f} tokens/s)")
    if result.perplexity_after is not None:
        unhealed = (f"{result.perplexity_unhealed:.3f} (compressed) -> "
                    if result.perplexity_unhealed is not None else "")
        typer.echo(f"perplexity on {eval_dataset}: {result.perplexity_before:.3f} (source) -> {unhealed}"
                   f"{result.perplexity_after:.3f} ({'healed' if unhealed else 'compressed'})")


def ppl_command(
    model: str = typer.Argument(..., help="Model folder, Hub id, .gguf file or 'smollm2'."),
    dataset: str = typer.Option("wikitext2", "--dataset", help="Preset (wikitext2, ptb, c4), local file or Hub name."),
    config: Optional[str] = typer.Option(None, "--config"),
    split: Optional[str] = typer.Option(None, "--split"),
    column: Optional[str] = typer.Option(None, "--column"),
    seq_len: int = typer.Option(EVAL_SEQ_LEN, "--seq-len", help="Tokens per window (at most the model's context)."),
    max_windows: Optional[int] = typer.Option(None, "--max-windows", help="At most this many windows (default: all)."),
    gguf_file: Optional[str] = typer.Option(None, "--gguf-file"),
    device: Optional[str] = typer.Option(None, "--device"),
    dtype: str = typer.Option("float32", "--dtype", help=f"{', '.join(MODEL_DTYPES)}."),
    trust_remote_code: bool = typer.Option(
        False, "--trust-remote-code", help="Run the code a model ships (its auto_map) when transformers does not "
        "know its model_type; read it first. hf-compress checkpoints never need it."),
) -> None:
    """Perplexity: rows joined with blank lines, tokenized once, windows of --seq-len, exp of the mean window loss."""
    from ..basis_sharing.evaluation import model_perplexity

    value = model_perplexity(model, dataset, config=config, split=split, column=column, seq_len=seq_len,
                             max_windows=max_windows, gguf_file=gguf_file, device=device, dtype=dtype,
                             trust_remote_code=trust_remote_code)
    typer.echo(f"perplexity {value:.4f} ({dataset}, seq_len {seq_len}, "
               f"{max_windows if max_windows else 'all'} windows)")


def register(app: typer.Typer) -> None:
    app.command("convert")(convert_command)
    app.command("ppl")(ppl_command)
