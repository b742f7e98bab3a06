"""Block-wise distillation: the first stage of healing, before the end-to-end distillation.

The student's decoder is cut into blocks, the shortest runs of consecutive layers that share no basis with a layer
outside the run (with the default group size of 2: layers 0-1, 2-3, ...). Block by block, from the first, the
block's factors and norms are trained to turn the student's own hidden states at the block's input into the
teacher's hidden states at its output, on the first sequences of the healing data; the trained block's outputs are
then the next block's inputs. Each step runs one block alone, so the stage costs about a pass of the whole model per
epoch, and each block learns to correct the error that the blocks before it leave (the inputs are the student's,
the targets the teacher's).

The loss is `losses.hidden_state_loss` (the squared distance per position, relative to the teacher's norm there).

The stage can take as long as the training after it, so it is resumable block by block: after each block the
weights of the blocks trained so far and their records can be saved (`save_stage`), and a rerun that loads them
(`load_stage`) recomputes the trained blocks' outputs and goes on with the next block, ending with the weights of an
uninterrupted stage on the same hardware (each block's order and optimizer depend only on the seed and the block's
index, and the stage draws no other random numbers where the model has no dropout, as Llama-family models have
none in training by default).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel

from ..checkpoint import atomic_write, atomic_write_json
from ..errors import HFCompressError
from .config import HealConfig
from .losses import hidden_state_loss
from .parts import factor_parameters

logger = logging.getLogger(__name__)


# The blocks' errors are measured on the stage's first sequences only: the error of a block before its training
# takes a forward pass of its own, which over every sequence would be a sixth of a one-pass stage; on 64 sequences
# (32,768 tokens at the default length) it is a small part, and the mean over that many positions is steady to
# about two digits.
ERROR_SEQUENCES = 64


@dataclass
class BlockRecord:
    """One block: its layers (first and last index) and the relative error of its output from the teacher's,
    over the stage's first `error_sequences` sequences, before and after its training."""

    layers: tuple[int, int]
    error_before: float
    error_after: float


@dataclass
class BlockwiseResult:
    """What the stage did (the `blockwise` entry of the healing record)."""

    sequences: int
    tokens: int
    epochs: int
    steps_per_block: int
    error_sequences: int
    blocks: list[BlockRecord] = field(default_factory=list)
    wall_time_s: float = 0.0

    def record(self) -> dict[str, Any]:
        out = asdict(self)
        out["blocks"] = [{"layers": list(b.layers), "error_before": round(b.error_before, 6),
                          "error_after": round(b.error_after, 6)} for b in self.blocks]
        out["wall_time_s"] = round(self.wall_time_s, 3)
        return out

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> BlockwiseResult:
        blocks = [BlockRecord(tuple(b["layers"]), b["error_before"], b["error_after"]) for b in record["blocks"]]
        return cls(sequences=record["sequences"], tokens=record["tokens"], epochs=record["epochs"],
                   steps_per_block=record["steps_per_block"], error_sequences=record["error_sequences"],
                   blocks=blocks, wall_time_s=record["wall_time_s"])


def layer_blocks(config) -> list[tuple[int, int]]:
    """The blocks of a SharedBasisLlama config as `(first, end)` layer ranges (end exclusive): consecutive layers
    joined wherever a basis group spans them, so that no basis is shared across two blocks."""
    reach = list(range(config.num_hidden_layers))  # reach[i]: the last layer that layer i's groups tie it to
    for groups in config.basis_groups.values():
        for group in groups:
            first, last = min(group), max(group)
            for layer in range(first, last + 1):
                reach[layer] = max(reach[layer], last)
    blocks, start, end = [], 0, -1
    for layer in range(config.num_hidden_layers):
        end = max(end, reach[layer])
        if layer == end:
            blocks.append((start, end + 1))
            start = layer + 1
    return blocks


def layer_mismatch(student: PreTrainedModel, teacher: PreTrainedModel) -> str | None:
    """How the teacher's decoder differs from the student's in depth or width (None where it does not): what a
    layer-for-layer comparison of their hidden states cannot get past."""
    base = getattr(teacher, teacher.base_model_prefix, None)
    depth = len(getattr(base, "layers", ()))
    width = getattr(teacher.config, "hidden_size", None)
    want = (len(student.model.layers), student.config.hidden_size)
    if (depth, width) == want:
        return None
    return f"the teacher has {depth} layers of width {width}, the student {want[0]} of width {want[1]}"


def check_blockwise_teacher(student: PreTrainedModel, teacher: PreTrainedModel, config: HealConfig) -> None:
    """The stage matches the teacher's hidden states layer for layer: the same depth and width, and attention over
    the whole sequence (a sliding window shorter than `seq_len` is another mask than the one the stage builds)."""
    mismatch = layer_mismatch(student, teacher)
    if mismatch:
        raise HFCompressError(f"--block-tokens trains the student's layers to the teacher's, block by block: "
                              f"{mismatch}; use --block-tokens 0 with this teacher.")
    for model in (student, teacher):
        window = getattr(model.config, "sliding_window", None)
        if window and getattr(model.config, "use_sliding_window", True) and window < config.seq_len:
            raise HFCompressError(
                f"--block-tokens runs each block with full causal attention, but the model's sliding window "
                f"({window}) is shorter than --seq-len {config.seq_len}; use a --seq-len of at most {window}.")


class _Decoder:
    """Runs a span of a Llama-family decoder's layers alone on given hidden states (no cache, causal attention)."""

    def __init__(self, model: PreTrainedModel):
        self.base = getattr(model, model.base_model_prefix)
        self.config = model.config

    def _mask(self, hidden: torch.Tensor) -> torch.Tensor | None:
        # sdpa and flash attention are causal when given no mask; eager attention adds the mask it is given.
        if getattr(self.config, "_attn_implementation", "eager") != "eager":
            return None
        length = hidden.shape[1]
        blocked = torch.ones(length, length, dtype=torch.bool, device=hidden.device).triu(1)
        mask = torch.zeros(length, length, dtype=hidden.dtype, device=hidden.device)
        return mask.masked_fill(blocked, torch.finfo(hidden.dtype).min)[None, None]

    def __call__(self, hidden: torch.Tensor, first: int, end: int) -> torch.Tensor:
        positions = torch.arange(hidden.shape[1], device=hidden.device)[None]
        rotary = self.base.rotary_emb(hidden, positions)
        mask = self._mask(hidden)
        for layer in self.base.layers[first:end]:
            out = layer(hidden, attention_mask=mask, position_ids=positions, position_embeddings=rotary,
                        use_cache=False)
            hidden = out[0] if isinstance(out, tuple) else out
        return hidden


def block_parameters(student: PreTrainedModel, first: int, end: int) -> list[nn.Parameter]:
    """What a block trains: its layers' coefficients, factorised biases and RMSNorm weights, and the bases those
    layers use (each once); dense projections stay as they are."""
    return factor_parameters(student.model.layers[first:end].modules())


def _error(student_out: torch.Tensor, teacher_out: torch.Tensor) -> torch.Tensor:
    return hidden_state_loss([student_out], [teacher_out])


def blockwise_distill(student: PreTrainedModel, teacher: PreTrainedModel, sequences: torch.Tensor,
                      config: HealConfig, device: torch.device, *, progress: bool = True,
                      done: BlockwiseResult | None = None,
                      on_block: Callable[[BlockwiseResult], None] | None = None) -> BlockwiseResult:
    """Trains `student`'s blocks in place, one after the other, on `sequences` (`n x seq_len` token ids).

    Each block takes `config.block_epochs` passes over the sequences, `config.block_batch_size` a step (in an order
    drawn from `config.seed` and the block's index), AdamW at `config.block_lr` decayed to 0 on a cosine; under a
    bfloat16 run the blocks run in bfloat16 autocast and the hidden states between blocks are kept in bfloat16.
    Gradients flow only through the block being trained: the student's and the teacher's hidden states at its
    input are computed once, without gradients.

    Args:
        done: what an interrupted run of the same stage recorded, its trained blocks' weights already in `student`
            (`load_stage`): those blocks are run, not trained, and the stage goes on with the next one.
        on_block: called with the result so far after each block is trained (e.g. `save_stage`).
    """
    from tqdm.auto import tqdm
    from transformers import get_cosine_schedule_with_warmup

    started = time.perf_counter()
    bf16 = config.dtype == "bfloat16"
    store = torch.bfloat16 if bf16 else torch.float32
    blocks = layer_blocks(student.config)
    n, batch = sequences.shape[0], config.block_batch_size
    steps = config.block_epochs * math.ceil(n / batch)
    probe = min(n, ERROR_SEQUENCES)  # the sequences the errors are measured on
    result = BlockwiseResult(sequences=n, tokens=sequences.numel(), epochs=config.block_epochs,
                             steps_per_block=steps, error_sequences=probe)
    earlier = 0.0
    if done is not None:
        _check_done(done, result, blocks)
        result.blocks, earlier = list(done.blocks), done.wall_time_s
    student_run, teacher_run = _Decoder(student), _Decoder(teacher)
    was_training = student.training
    student.train()
    teacher.eval()
    grad_flags = {id(p): p.requires_grad for p in student.parameters()}
    student.requires_grad_(False)

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)

    def in_chunks(run: _Decoder, first: int, end: int, states: torch.Tensor, upcast: bool) -> torch.Tensor:
        """`run`'s layers `first..end-1` over `states`, a batch at a time, without gradients (`upcast`: the
        inputs in float32, as the student's are in training)."""
        out = torch.empty_like(states)
        with torch.no_grad(), autocast():
            for i in range(0, states.shape[0], batch):
                x = states[i:i + batch].to(device)
                out[i:i + batch] = run(x.float() if upcast else x, first, end).to(store).to(out.device)
        return out

    try:
        with torch.no_grad():
            ids = sequences.to(device)
            # The stage's inputs: the student's embeddings (frozen, the teacher's own) and the teacher's.
            student_in = torch.cat([student.get_input_embeddings()(ids[i:i + batch]).to(store)
                                    for i in range(0, n, batch)])
            teacher_in = torch.cat([teacher.get_input_embeddings()(ids[i:i + batch]).to(store)
                                    for i in range(0, n, batch)])
        trained = len(result.blocks)
        if trained < len(blocks):  # the trained blocks' outputs: the next block's inputs, as in the first session
            for first, end in blocks[:trained]:
                student_in = in_chunks(student_run, first, end, student_in, upcast=True)
                teacher_in = in_chunks(teacher_run, first, end, teacher_in, upcast=False)
        bar = tqdm(total=len(blocks) * steps, initial=trained * steps, desc="block-wise distillation", unit="step",
                   disable=not progress)
        for index, (first, end) in enumerate(blocks[trained:], start=trained):
            teacher_out = in_chunks(teacher_run, first, end, teacher_in, upcast=False)
            before = _stored_error(in_chunks(student_run, first, end, student_in[:probe], upcast=True),
                                   teacher_out[:probe], batch, device)
            params = block_parameters(student, first, end)
            for p in params:
                p.requires_grad_(True)
            optimizer = torch.optim.AdamW(params, lr=config.block_lr, weight_decay=0.0)
            scheduler = get_cosine_schedule_with_warmup(optimizer, 0, steps)
            generator = torch.Generator().manual_seed(config.seed + index)
            for _ in range(config.block_epochs):
                for chosen in torch.randperm(n, generator=generator).split(batch):
                    with autocast():
                        out = student_run(student_in[chosen].to(device).float(), first, end)
                    loss = _error(out, teacher_out[chosen].to(device))
                    loss.backward()
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                    bar.update(1)
                    bar.set_postfix(block=f"{first}-{end - 1}", error=f"{loss.item():.4f}")
            for p in params:
                p.requires_grad_(False)
            student_in = in_chunks(student_run, first, end, student_in, upcast=True)
            after = _stored_error(student_in[:probe], teacher_out[:probe], batch, device)
            result.blocks.append(BlockRecord((first, end - 1), before, after))
            teacher_in = teacher_out
            result.wall_time_s = earlier + time.perf_counter() - started
            if on_block is not None:
                on_block(result)
        bar.close()
    finally:
        for p in student.parameters():
            p.requires_grad_(grad_flags.get(id(p), False))
        student.train(was_training)
    result.wall_time_s = earlier + time.perf_counter() - started
    return result


def _check_done(done: BlockwiseResult, fresh: BlockwiseResult, blocks: list[tuple[int, int]]) -> None:
    """A resumed stage must be this stage: the same sequences, passes and blocks (the run's fingerprint, which the
    saved stage must match, already says so; this guards a caller passing another stage's record)."""
    same = (done.sequences, done.tokens, done.epochs, done.steps_per_block, done.error_sequences) == \
        (fresh.sequences, fresh.tokens, fresh.epochs, fresh.steps_per_block, fresh.error_sequences)
    if not same or not _first_blocks([tuple(b.layers) for b in done.blocks], blocks):
        raise ValueError("the recorded block-wise stage is not this one: other sequences, passes or blocks")


def _first_blocks(recorded: list[tuple[int, int]], blocks: list[tuple[int, int]]) -> bool:
    """Whether `recorded` (a record's `(first, last)` layers) are the first of `blocks` (`(first, end)` ranges)."""
    return recorded == [(first, end - 1) for first, end in blocks[:len(recorded)]]


def _stored_error(outputs: torch.Tensor, targets: torch.Tensor, batch: int, device: torch.device) -> float:
    """The relative error of a block's stored outputs from the teacher's over their sequences (mean over
    positions)."""
    total = 0.0
    for i in range(0, outputs.shape[0], batch):
        total += _error(outputs[i:i + batch].to(device), targets[i:i + batch].to(device)).item() * \
            outputs[i:i + batch].shape[0]
    return total / outputs.shape[0]


# --- the stage's resumable state ----------------------------------------------------------------------------------


def _block_file(layers: tuple[int, int]) -> str:
    return f"block-{layers[0]}-{layers[1]}.safetensors"


def _block_tensors(student: PreTrainedModel, layers: tuple[int, int]) -> dict[str, nn.Parameter]:
    """What one block trains, by the student's parameter names (a shared basis under its one name)."""
    names = {id(p): name for name, p in student.named_parameters()}
    return {names[id(p)]: p for p in block_parameters(student, layers[0], layers[1] + 1)}


def save_stage(folder: Path, student: PreTrainedModel, result: BlockwiseResult, fingerprint: str) -> None:
    """Saves the stage after its latest block: that block's weights in a file of their own, then the record so far
    (`stage.json`, with `fingerprint`, the run it belongs to). Each file replaces its old self in one step, so an
    interrupted save leaves the state of the block before; the earlier blocks' files are not written again."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    layers = result.blocks[-1].layers
    tensors = {name: p.detach().cpu().contiguous() for name, p in _block_tensors(student, layers).items()}
    atomic_write(folder / _block_file(layers), lambda tmp: save_file(tensors, tmp))
    atomic_write_json(folder / "stage.json", {"fingerprint": fingerprint, "record": result.record()})


def load_stage(folder: Path, student: PreTrainedModel, fingerprint: str) -> BlockwiseResult | None:
    """Copies the weights of the blocks a run with this `fingerprint` saved in `folder` into `student` and returns
    the stage's record so far; None, the student untouched, where there is no usable state of this run."""
    from safetensors.torch import load_file

    meta_path = folder / "stage.json"
    if not meta_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text())
        if meta.get("fingerprint") != fingerprint:
            raise ValueError("it holds the stage of a run with other settings or models")
        result = BlockwiseResult.from_record(meta["record"])
        recorded = [b.layers for b in result.blocks]
        if not _first_blocks(recorded, layer_blocks(student.config)):
            raise ValueError("its blocks are not the student's")
        pairs = []  # (parameter, saved value): copied only once every block is found whole
        for layers in recorded:
            saved, wanted = load_file(folder / _block_file(layers)), _block_tensors(student, layers)
            if set(saved) != set(wanted) or any(saved[k].shape != wanted[k].shape for k in wanted):
                raise ValueError(f"{_block_file(layers)} does not hold that block's weights")
            pairs += [(wanted[k], saved[k]) for k in wanted]
    except (OSError, ValueError, KeyError, TypeError) as err:  # a state of another run, or damaged: start afresh
        logger.warning("not resuming the block-wise stage from %s (%s); starting it afresh.", folder, err)
        return None
    with torch.no_grad():
        for parameter, value in pairs:
            parameter.copy_(value)
    logger.info("resuming the block-wise stage after %d of its blocks (%s)", len(result.blocks), folder)
    return result
