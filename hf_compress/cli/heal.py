"""`hf-compress heal`: distillation of a converted checkpoint from its source model.

The option defaults are read from `HealConfig`; the trainer is imported inside the command, so that `--help` stays
fast.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import typer

from ..basis_sharing.config import EVAL_SEQ_LEN
from ..healing.config import (
    AUTO_CHAT_FRACTION,
    DTYPES,
    LOSSES,
    SCHEDULES,
    TRAINABLE,
    HealConfig,
    parse_chat_fraction,
)

_H = HealConfig()


def heal_command(
    checkpoint: str = typer.Argument(..., help="A SharedBasisLlama checkpoint (the output of `hf-compress convert`); never modified."),
    output: str = typer.Argument(..., help="Output folder; it appears only once the checkpoint is complete."),
    teacher: str = typer.Option(..., "--teacher",
                                help="The model CHECKPOINT was compressed from: Hub id, local folder, .gguf file or 'smollm2'."),
    gguf_file: str | None = typer.Option(None, "--gguf-file", help="GGUF file inside --teacher."),
    revision: str | None = typer.Option(None, "--teacher-revision", help="Revision of a Hub --teacher."),
    dataset: str = typer.Option(_H.dataset, "--dataset", help="Preset (c4-calibration, wikitext2, ptb, c4), local parquet/jsonl/txt file or Hub name."),
    dataset_column: str | None = typer.Option(_H.dataset_column, "--dataset-column", help="Text column of --dataset."),
    tokens: int = typer.Option(_H.tokens, "--tokens", help="Training tokens in all (the text is cycled if shorter)."),
    seq_len: int = typer.Option(_H.seq_len, "--seq-len", help="Tokens per training sequence."),
    batch_size: int = typer.Option(_H.batch_size, "--batch-size", help="Sequences per optimizer step."),
    lr: float = typer.Option(_H.lr, "--lr", help="Peak learning rate (AdamW)."),
    weight_decay: float = typer.Option(_H.weight_decay, "--weight-decay"),
    warmup_ratio: float = typer.Option(_H.warmup_ratio, "--warmup-ratio", help="Fraction of the steps of linear warmup."),
    schedule: str = typer.Option(_H.schedule, "--schedule", help=f"Learning-rate schedule after the warmup: {', '.join(SCHEDULES)}."),
    loss: str = typer.Option(_H.loss, "--loss", help=f"{', '.join(LOSSES)}: KL from the teacher, cross-entropy on the text, or both."),
    temperature: float = typer.Option(_H.temperature, "--temperature", help="Softening of the distributions in the KL."),
    lm_weight: float = typer.Option(_H.lm_weight, "--lm-weight", help="Weight of the cross-entropy term of --loss kl+lm."),
    hidden_weight: float = typer.Option(_H.hidden_weight, "--hidden-weight",
                                        help="Weight of a term matching each decoder layer's output to the "
                                             "teacher's (0: off)."),
    balance_factors: bool = typer.Option(_H.balance_factors, "--balance-factors/--no-balance-factors",
                                         help="Before training the factors, give each rank component's basis row "
                                              "and coefficients the same norm (the model is unchanged)."),
    trainable: str = typer.Option(_H.trainable, "--trainable",
                                  help=f"{', '.join(TRAINABLE)}: the bases, coefficients and norms; every weight "
                                       "(embeddings and head too); or LoRA adapters on them (merged before saving)."),
    lora_rank: int = typer.Option(_H.lora_rank, "--lora-rank"),
    lora_alpha: float = typer.Option(_H.lora_alpha, "--lora-alpha"),
    block_tokens: int = typer.Option(_H.block_tokens, "--block-tokens",
                                     help="Tokens of block-wise distillation before the end-to-end training: each "
                                          "block of layers trained to the teacher's hidden states (0: off)."),
    block_epochs: int = typer.Option(_H.block_epochs, "--block-epochs", help="Passes of each block over its tokens."),
    block_lr: float = typer.Option(_H.block_lr, "--block-lr", help="Peak learning rate of the block-wise stage."),
    block_batch_size: int = typer.Option(_H.block_batch_size, "--block-batch-size",
                                         help="Sequences per step of the block-wise stage."),
    kl_chunk: int = typer.Option(_H.kl_chunk, "--kl-chunk", help="Positions whose vocabulary-wide logits are computed at a time."),
    seed: int = typer.Option(_H.seed, "--seed"),
    dtype: str = typer.Option(_H.dtype, "--dtype",
                              help=f"{', '.join(DTYPES)}: auto is bfloat16 autocast where the device has native "
                                   "bfloat16, else float32."),
    gradient_checkpointing: bool = typer.Option(_H.gradient_checkpointing, "--gradient-checkpointing/--no-gradient-checkpointing",
                                                help="Recompute the decoder layers in the backward pass (less memory)."),
    save_steps: int = typer.Option(_H.save_steps, "--save-steps", help="Save the resumable training state every this many steps."),
    eval_dataset: str | None = typer.Option(None, "--eval-dataset",
                                            help="Also report the perplexity before and after healing on this text."),
    eval_seq_len: int = typer.Option(EVAL_SEQ_LEN, "--eval-seq-len", help="Tokens per window (at most the context)."),
    eval_max_windows: int | None = typer.Option(None, "--eval-max-windows", help="At most this many windows."),
    chat_fraction: str = typer.Option(str(_H.chat_fraction), "--chat-fraction",
                                      help="Share of the training sequences that are chat text the teacher writes "
                                           "through its chat template: a number in [0, 1), or auto "
                                           f"({AUTO_CHAT_FRACTION} for a teacher whose tokenizer has a chat "
                                           "template, else 0)."),
    chat_source: str = typer.Option(_H.chat_source, "--chat-source",
                                    help="'free' (the teacher writes the user's message and the answer) or a JSON "
                                         "file of prompts the teacher answers."),
    chat_max_new_tokens: int = typer.Option(_H.chat_max_new_tokens, "--chat-max-new-tokens",
                                            help="Most tokens the teacher writes per chat turn."),
    chat_temperature: float = typer.Option(_H.chat_temperature, "--chat-temperature",
                                           help="Sampling temperature of the chat text (0: greedy answers)."),
    chat_batch_size: int = typer.Option(_H.chat_batch_size, "--chat-batch-size",
                                        help="Conversations the teacher writes at a time."),
    free_text_fraction: float = typer.Option(_H.free_text_fraction, "--free-text-fraction",
                                             help="Share of the training sequences that are plain text the teacher "
                                                  "writes freely from a document start, in [0, 1)."),
    device: str | None = typer.Option(None, "--device", help="cpu, cuda, cuda:1 ... (default: cuda if present)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace OUTPUT if it exists."),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
) -> None:
    """Heal a compressed checkpoint by distillation from its source model; an interrupted run resumes when rerun."""
    config = _config(locals())  # first: locals() holds the options alone
    from ..healing import heal

    result = heal(checkpoint, output, teacher=teacher, config=config, device=device, overwrite=overwrite,
                  progress=progress, gguf_file=gguf_file, revision=revision, eval_dataset=eval_dataset,
                  eval_seq_len=eval_seq_len, eval_max_windows=eval_max_windows)
    _report(result, loss, eval_dataset)


def _config(options: dict[str, Any]) -> HealConfig:
    """The `HealConfig` of the command's options: every field has an option of its own name (`--chat-fraction`
    read as "auto" or a number)."""
    values = {field.name: options[field.name] for field in dataclasses.fields(HealConfig)}
    values["chat_fraction"] = parse_chat_fraction(values["chat_fraction"])
    return HealConfig(**values)


def _report(result, loss: str, eval_dataset: str | None) -> None:
    """What the run did, in a few lines."""
    if result.resumed_from:
        typer.echo(f"resumed from step {result.resumed_from}")
    typer.echo(f"{loss} loss: {result.initial_loss:.4g} (first steps) -> {result.final_loss:.4g} (last steps) over "
               f"{result.steps} steps, {result.tokens:,} tokens, {result.trainable_params:,} trainable parameters")
    typer.echo(f"training: {result.wall_time_s:.1f} s, {result.tokens_per_s:,.0f} tokens/s, "
               f"peak memory {result.peak_memory_mb:,.0f} MB")
    perplexity = result.provenance.get("healing", {}).get("perplexity")
    if perplexity:
        typer.echo(f"perplexity on {eval_dataset}: {perplexity['before']:.3f} (before healing) -> "
                   f"{perplexity['after']:.3f} (healed)")
    typer.echo(f"saved {result.output_dir}")


def register(app: typer.Typer) -> None:
    app.command("heal")(heal_command)
