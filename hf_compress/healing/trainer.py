"""Healing: distillation of a compressed SharedBasisLlama from the model it was compressed from.

`heal` loads the student (a checkpoint of `hf-compress convert`, or a model in memory) and the teacher, checks that
they speak the same vocabulary, trains the student's factors (or LoRA adapters on them) on the KL divergence from the
teacher's next-token distributions, and writes a new checkpoint whose `config.compression` keeps the conversion
record and gains a `healing` entry.

The loop runs on `accelerate.Accelerator`: bfloat16 autocast where `HealConfig.dtype` resolves to bfloat16, and
DDP/FSDP from an accelerate config without code of ours (each process takes its share of every step's sequences).
Every `save_steps` steps the training state is written atomically to `.OUTPUT.heal-state/` beside the output (and
during a block-wise stage, after each block); a rerun with the same settings continues from there and ends with the
weights of an uninterrupted run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
import warnings
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

from ..checkpoint import clean_stale_staging, prepare_output, save_pretrained_checkpoint, write_state
from ..basis_sharing.config import EVAL_SEQ_LEN
from ..basis_sharing.evaluation import check_window_options
from ..basis_sharing.save import cast_weights, round_weights
from ..data.text import load_text_option
from ..device import PeakMemory, pick_device
from ..errors import HFCompressError
from ..provenance import DataRef, SourceRef
from .config import HealConfig
from .blockwise import blockwise_distill, check_blockwise_teacher, layer_mismatch, load_stage, save_stage
from .data import HealingData, has_chat_template, load_healing_data, recorded_options
from .losses import chunked_kl_loss, chunked_lm_loss, hidden_state_loss, kl_lm_loss
from .parts import factor_parameters, is_factorised, is_norm

logger = logging.getLogger(__name__)

MODEL_TYPE = "shared_basis_llama"
STATE_SUFFIX = ".heal-state"
# The block-wise stage's state, inside the run's state folder until the training's first saved state replaces it.
STAGE_FOLDER = "blockwise"
# Both tokenizers must cut this the same way (with the vocabulary size, the check that the teacher fits the student).
TOKENIZER_SAMPLE = "Healing check: The quick brown fox jumps over 13 lazy dogs.\n\n  Naïve café, Zürich 東京 — ½ €5!"
# The record keeps at most this many loss values (the mean of every k steps beyond).
MAX_LOSS_HISTORY = 512
LOSS_WINDOW = 10


@dataclass
class HealResult:
    """What `heal` produced and measured.

    Args:
        output_dir: the healed checkpoint (None: not saved).
        steps: optimizer steps of the run (a resumed run counts those before the interruption too).
        tokens: training tokens (`steps x batch_size x seq_len`).
        trainable_params: parameters that trained (shared bases counted once; LoRA: the adapters and norms).
        final_loss, initial_loss: mean loss of the last and the first (up to) 10 steps.
        losses: the loss of every step.
        wall_time_s: seconds of training (of every session of a resumed run), loading and saving excluded.
        tokens_per_s: training tokens per second of this session.
        peak_memory_mb: peak CUDA allocation on a GPU, else peak resident memory.
        resumed_from: the step this session started from (0: a fresh run).
    """

    output_dir: Path | None
    steps: int
    tokens: int
    trainable_params: int
    final_loss: float
    losses: list[float]
    wall_time_s: float
    tokens_per_s: float
    peak_memory_mb: float
    initial_loss: float = float("nan")
    resumed_from: int = 0
    provenance: dict[str, Any] = field(default_factory=dict)


@dataclass
class HealingEvaluation:
    """The student's perplexity on one text before and after healing (`heal(eval_dataset=...)`)."""

    dataset: str
    texts: list[str]
    seq_len: int
    max_windows: int | None
    progress: bool = True
    before: float | None = None
    after: float | None = None

    def measure(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, device: torch.device) -> float:
        from ..evaluation.perplexity import perplexity

        model.to(device)
        model.eval()
        return perplexity(model, tokenizer, self.texts, seq_len=self.seq_len, max_windows=self.max_windows,
                          progress=self.progress)

    def record(self) -> dict[str, Any]:
        """What the provenance keeps: the text by name (never a local path), the windows and both perplexities."""
        return {"dataset": DataRef.of("evaluation", self.dataset).name, "seq_len": self.seq_len,
                "max_windows": self.max_windows, "before": round(self.before, 4), "after": round(self.after, 4)}


def _save_dtype(student: PreTrainedModel) -> torch.dtype:
    """The dtype the conversion saved the student in (its record's `output_dtype`), so that healing keeps the
    checkpoint's size; float32 when the record does not say."""
    name = (getattr(student.config, "compression", None) or {}).get("output_dtype")
    dtype = getattr(torch, name, None) if isinstance(name, str) else None
    return dtype if isinstance(dtype, torch.dtype) else torch.float32


def state_dir_for(output: str | os.PathLike) -> Path:
    """The folder of the resumable training state of a run writing `output` (`.NAME.heal-state` beside it)."""
    output = Path(output)
    return output.parent / f".{output.name}{STATE_SUFFIX}"


# --- checks and loading -------------------------------------------------------------------------------------------


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())


def _not_shared_basis(what: str, model_type: Any) -> HFCompressError:
    return HFCompressError(
        f"{what} is a {model_type!r} model, not a SharedBasisLlama: `heal` recovers what compression lost and takes "
        f"the output of `hf-compress convert`; a dense model has nothing to heal."
    )


def _is_module(value: Any) -> bool:
    return isinstance(value, nn.Module)


def load_student(student: str | os.PathLike | PreTrainedModel,
                 tokenizer: PreTrainedTokenizerBase | None) -> tuple[PreTrainedModel, PreTrainedTokenizerBase | None]:
    """The student as a float32 SharedBasisLlama in memory (checked before its weights load) and its tokenizer."""
    if _is_module(student):
        config = getattr(student, "config", None)
        model_type = getattr(config, "model_type", type(student).__name__)
        if model_type != MODEL_TYPE or not hasattr(getattr(student, "model", None), "shared_bases"):
            raise _not_shared_basis("the student", model_type)
        if getattr(student, "_load_time_changes", None):
            raise HFCompressError(
                f"the student was changed for inference at load time ({', '.join(student._load_time_changes)}); "
                "load it without fuse_bases/densify_above_break_even to heal it.")
        return student, tokenizer
    from ..modeling.shared_basis_llama import SharedBasisLlamaConfig
    from ..sources import load_causal_lm

    name = str(student)
    try:
        config_dict = PretrainedConfig.get_config_dict(name)[0]
    except (OSError, ValueError) as err:
        raise HFCompressError(f"cannot read the config of the student {name!r}: {_one_line(err)}") from err
    if config_dict.get("model_type") != MODEL_TYPE:
        raise _not_shared_basis(f"the student {name!r}", config_dict.get("model_type"))
    # Trained as stored: the inference-time rewrites (fused bases, densified projections) would not train.
    overrides = {"fuse_bases": False, "densify_above_break_even": False}
    try:
        config = SharedBasisLlamaConfig.from_dict({**config_dict, **overrides})
    except (ValueError, TypeError) as err:
        raise HFCompressError(f"the student {name!r} has a bad config.json: {_one_line(err)}") from err
    model, own_tokenizer = load_causal_lm(name, config=config)
    tokenizer = tokenizer if tokenizer is not None else own_tokenizer
    return model, tokenizer


def load_teacher(teacher: str | os.PathLike | PreTrainedModel, *, gguf_file: str | None = None,
                 revision: str | None = None, teacher_ref: SourceRef | None = None,
                 ) -> tuple[PreTrainedModel, PreTrainedTokenizerBase | None, SourceRef]:
    """The teacher (a source loaded with `load_causal_lm`, or the model given), its tokenizer and its record."""
    if _is_module(teacher):
        name = getattr(teacher, "name_or_path", None) or None
        return teacher, None, teacher_ref or SourceRef.of(name)
    from ..sources import (
        SMOLLM2_ALIAS,
        SMOLLM2_ALIAS_ID,
        load_causal_lm,
        resolve_source,
    )

    source = str(teacher)
    _, gguf_name = resolve_source(source, gguf_file)
    model, tokenizer = load_causal_lm(source, gguf_file=gguf_file, revision=revision)
    model_id = SMOLLM2_ALIAS_ID if source == SMOLLM2_ALIAS else source
    return model, tokenizer, teacher_ref or SourceRef.of(model_id, revision, gguf_name)


def _vocab_rows(model: PreTrainedModel) -> int:
    head = model.get_output_embeddings()
    return int(head.weight.shape[0]) if head is not None else int(model.config.vocab_size)


def check_compatible(student: PreTrainedModel, teacher: PreTrainedModel,
                     student_tokenizer: PreTrainedTokenizerBase | None,
                     teacher_tokenizer: PreTrainedTokenizerBase | None) -> None:
    """The teacher's next-token distributions must be over the student's vocabulary, cut by the same tokenizer."""
    if not callable(getattr(teacher, "get_output_embeddings", None)) or not hasattr(teacher, teacher.base_model_prefix):
        raise HFCompressError(f"the teacher ({type(teacher).__name__}) is not a causal language model with a head.")
    student_vocab, teacher_vocab = _vocab_rows(student), _vocab_rows(teacher)
    if student_vocab != teacher_vocab:
        raise HFCompressError(
            f"the teacher's vocabulary has {teacher_vocab} tokens and the student's {student_vocab}: the teacher "
            "must be the model the student was compressed from (or one with the same tokenizer).")
    if student_tokenizer is not None and teacher_tokenizer is not None:
        ids_s = student_tokenizer(TOKENIZER_SAMPLE, add_special_tokens=False).input_ids
        ids_t = teacher_tokenizer(TOKENIZER_SAMPLE, add_special_tokens=False).input_ids
        if list(ids_s) != list(ids_t):
            raise HFCompressError(
                "the teacher's tokenizer cuts text differently from the student's: the teacher must be the model "
                "the student was compressed from (or one with the same tokenizer).")


def check_same_layers(student: PreTrainedModel, teacher: PreTrainedModel) -> None:
    """`hidden_weight` compares the decoder layers one to one: the teacher needs the student's depth and width."""
    mismatch = layer_mismatch(student, teacher)
    if mismatch:
        raise HFCompressError(f"--hidden-weight compares the decoder layers one to one: {mismatch}; use "
                              "--hidden-weight 0 with this teacher.")


# --- what trains --------------------------------------------------------------------------------------------------


def _projection(layer: nn.Module, name: str) -> nn.Module:
    return getattr(layer.self_attn if hasattr(layer.self_attn, name) else layer.mlp, name)


def relink_bases(student: PreTrainedModel) -> None:
    """Points every layer's `SharedBasisLinear.basis` at the module that now sits in `shared_bases` (peft replaces
    that module by its LoRA wrapper, and `merge_and_unload` puts the merged base layer back)."""
    decoder, config = student.model, student.config
    for layer_idx, layer in enumerate(decoder.layers):
        for name in config.basis_groups:
            module = _projection(layer, name)
            if is_factorised(module):
                object.__setattr__(module, "basis", decoder.shared_bases[name][config.group_of(name, layer_idx)])


def mark_trainable(student: PreTrainedModel, everything: bool = False) -> None:
    """`"factors"`: the shared bases, every layer's coefficients (and bias) and the RMSNorm weights train; the
    embeddings, the head and any dense projection stay frozen. A shared basis is one parameter for its whole group.
    With `everything` (`"all"`), every parameter trains (a tied head is the embeddings' one parameter)."""
    if everything:
        student.requires_grad_(True)
        return
    student.requires_grad_(False)
    for parameter in factor_parameters(student.modules()):
        parameter.requires_grad_(True)


@torch.no_grad()
def balance_factors(student: PreTrainedModel) -> int:
    """Rescales every rank component `j` of each basis and of its members' coefficients, `B[j] / d_j` and
    `C_i[:, j] * d_j`, with `d_j` chosen so that both then have the norm `sqrt(|B[j]| |C[:, j]|)` (`C` stacking the
    members); the products `B C_i`, and so the model, are unchanged. Returns how many bases were balanced.

    A component whose basis row or coefficients are all zero is left as it is.
    """
    groups: dict[int, tuple[nn.Linear, list[nn.Module]]] = {}
    for module in student.modules():
        if is_factorised(module):
            groups.setdefault(id(module.basis), (module.basis, []))[1].append(module)
    for basis, members in groups.values():
        basis_norms = basis.weight.norm(dim=1)
        coefficient_norms = torch.stack([m.coefficients.norm(dim=0) for m in members]).norm(dim=0)
        scale = (basis_norms / coefficient_norms).sqrt()
        scale = torch.where(torch.isfinite(scale) & (scale > 0), scale, torch.ones_like(scale))
        basis.weight.div_(scale[:, None])
        for member in members:
            member.coefficients.mul_(scale)
    return len(groups)


def add_lora(student: PreTrainedModel, config: HealConfig):
    """`"lora"`: peft LoRA adapters on every shared basis and dense projection (the factorised layers' bases are
    re-pointed at the wrapped modules), RMSNorm weights trainable; returns the `PeftModel` (for `merge_and_unload`)."""
    from peft import LoraConfig, get_peft_model

    projections = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    targets = [name for name, module in student.named_modules()
               if isinstance(module, nn.Linear)
               and (name.startswith("model.shared_bases.") or name.rsplit(".", 1)[-1] in projections)]
    lora = LoraConfig(r=config.lora_rank, lora_alpha=config.lora_alpha, lora_dropout=0.0, bias="none",
                      target_modules=targets)
    with warnings.catch_warnings():  # peft asks transformers by a deprecated name whether checkpointing is on
        warnings.simplefilter("ignore", FutureWarning)
        peft_model = get_peft_model(student, lora)
    relink_bases(student)
    for module in student.modules():
        if is_norm(module):
            module.weight.requires_grad_(True)
    return peft_model


def merge_lora(peft_model) -> PreTrainedModel:
    """The adapters merged into the weights: a plain SharedBasisLlama again."""
    student = peft_model.merge_and_unload()
    relink_bases(student)
    for attr in ("peft_config", "_hf_peft_config_loaded"):
        if attr in student.__dict__:
            delattr(student, attr)
    return student


# --- the objective ------------------------------------------------------------------------------------------------


class HealingObjective(nn.Module):
    """The student and its loss against the teacher's final hidden states, as one module (what accelerate wraps).

    `forward(input_ids, teacher_hidden, teacher_layers)` runs the student's base model and returns the KL (and/or
    LM) loss computed chunk by chunk from the student's and the teacher's heads, plus `hidden_weight` times the
    distance of the student's decoder-layer outputs from `teacher_layers` where `hidden_weight` > 0; the teacher's
    head is referenced, not registered.
    """

    def __init__(self, student: PreTrainedModel, teacher_head: nn.Module | None, config: HealConfig):
        super().__init__()
        self.student = student
        object.__setattr__(self, "teacher_head", teacher_head)
        self.loss_name, self.temperature, self.lm_weight = config.loss, config.temperature, config.lm_weight
        self.hidden_weight = config.hidden_weight
        self.chunk = config.kl_chunk

    def forward(self, input_ids: torch.Tensor, teacher_hidden: torch.Tensor | None = None,
                teacher_layers: list[torch.Tensor] | None = None) -> torch.Tensor:
        layered = self.hidden_weight > 0
        if layered and teacher_layers is None:
            raise ValueError("hidden_weight > 0 needs the teacher's layer outputs (teacher_states(..., layers=True))")
        # the hooks are gone by the backward pass: layers recomputed there (gradient checkpointing) add nothing
        with (layer_outputs(self.student.model.layers) if layered else nullcontext()) as student_layers:
            hidden = self.student.model(input_ids=input_ids, use_cache=False).last_hidden_state
        loss = self._output_loss(hidden, input_ids, teacher_hidden)
        if layered:
            loss = loss + self.hidden_weight * hidden_state_loss(student_layers, teacher_layers)
        return loss

    def _output_loss(self, hidden: torch.Tensor, input_ids: torch.Tensor,
                     teacher_hidden: torch.Tensor | None) -> torch.Tensor:
        head = self.student.lm_head
        if self.loss_name == "lm":
            return chunked_lm_loss(hidden, head, input_ids, self.chunk)
        if self.loss_name == "kl+lm":
            return kl_lm_loss(hidden, teacher_hidden, head, self.teacher_head, input_ids, self.temperature,
                              self.lm_weight, self.chunk)
        return chunked_kl_loss(hidden, teacher_hidden, head, self.teacher_head, self.temperature, self.chunk)


@contextmanager
def layer_outputs(layers: nn.ModuleList):
    """Collects the output of each of `layers` as the forward pass computes it (a forward hook on each, removed
    on exit); yields the list, in layer order."""
    outputs: list[torch.Tensor] = []

    def keep(module: nn.Module, args: Any, output: Any) -> None:
        outputs.append(output[0] if isinstance(output, tuple) else output)

    handles = [layer.register_forward_hook(keep) for layer in layers]
    try:
        yield outputs
    finally:
        for handle in handles:
            handle.remove()


def teacher_states(teacher: PreTrainedModel, input_ids: torch.Tensor, *, layers: bool = False,
                   ) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
    """The teacher's final hidden states (before its head) and, with `layers`, the output of each decoder layer
    (else None), without gradients."""
    base = getattr(teacher, teacher.base_model_prefix)
    with torch.no_grad(), (layer_outputs(base.layers) if layers else nullcontext()) as outputs:
        final = base(input_ids=input_ids, use_cache=False).last_hidden_state
    return final, outputs


# --- resumable state ----------------------------------------------------------------------------------------------


def _digest_tensors(digest, named: list[tuple[str, torch.Tensor]]) -> None:
    """Feeds names, shapes and a strided sample of every tensor's values to `digest` (cheap for any model size)."""
    for name, tensor in named:
        flat = tensor.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 4096)].float().cpu()
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(sample.numpy().tobytes())


def run_fingerprint(config: HealConfig, student: nn.Module, teacher: nn.Module, data: HealingData,
                    teacher_ref: SourceRef, num_processes: int) -> str:
    """What a saved state must match to be resumed: the options (bar `save_steps`), the teacher, the tokens, the
    process count and the student's starting weights."""
    digest = hashlib.sha256()
    options = {k: v for k, v in config.to_dict().items() if k != "save_steps"}
    digest.update(json.dumps({"options": options, "teacher": asdict(teacher_ref), "processes": num_processes},
                             sort_keys=True).encode())
    digest.update(data.chunks.numpy().tobytes())
    digest.update(data.order.numpy().tobytes())
    _digest_tensors(digest, list(student.state_dict().items()))
    _digest_tensors(digest, list(teacher.state_dict().items()))
    return digest.hexdigest()


def save_state(state_dir: Path, *, step: int, named_params: list[tuple[str, nn.Parameter]], optimizer, scheduler,
               losses: list[float], fingerprint: str, wall_time_s: float, blockwise: dict | None = None) -> None:
    """Writes the training state as a whole into `state_dir` (a staging folder, then a swap); `blockwise` is the
    record of the block-wise stage the weights went through."""
    from safetensors.torch import save_file

    def write(staging: Path) -> None:
        save_file({name: p.detach().cpu().contiguous() for name, p in named_params}, staging / "trainable.safetensors")
        torch.save(optimizer.state_dict(), staging / "optimizer.pt")
        torch.save(scheduler.state_dict(), staging / "scheduler.pt")
        rng = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        torch.save(rng, staging / "rng.pt")
        (staging / "state.json").write_text(json.dumps(
            {"step": step, "fingerprint": fingerprint, "losses": losses, "wall_time_s": wall_time_s,
             "blockwise": blockwise}, indent=1))

    write_state(state_dir, write)


def saved_meta(state_dir: Path | None, fingerprint: str, *, warn: bool = True) -> dict[str, Any] | None:
    """The `state.json` of a saved state of this run (same fingerprint); None where there is none."""
    meta_path = state_dir / "state.json" if state_dir is not None else None
    if meta_path is None or not meta_path.is_file():
        return None
    meta = json.loads(meta_path.read_text())
    if meta.get("fingerprint") != fingerprint:
        if warn:
            logger.warning("%s holds the state of a run with other settings or models; starting afresh.",
                           state_dir)
        return None
    return meta


def load_state(state_dir: Path, *, fingerprint: str, named_params: list[tuple[str, nn.Parameter]], optimizer,
               scheduler) -> dict[str, Any] | None:
    """Restores a saved state of the same run (weights, optimizer, scheduler, RNG); None where there is none.

    Tensors are read with safetensors and `torch.load(weights_only=True)`: nothing is unpickled.
    """
    meta = saved_meta(state_dir, fingerprint)
    if meta is None:
        return None
    from safetensors.torch import load_file

    tensors = load_file(state_dir / "trainable.safetensors")
    if set(tensors) != {name for name, _ in named_params}:
        logger.warning("%s does not hold this run's trainable weights; starting afresh.", state_dir)
        return None
    with torch.no_grad():
        for name, parameter in named_params:
            parameter.copy_(tensors[name])
    optimizer.load_state_dict(torch.load(state_dir / "optimizer.pt", weights_only=True))
    scheduler.load_state_dict(torch.load(state_dir / "scheduler.pt", weights_only=True))
    rng = torch.load(state_dir / "rng.pt", weights_only=True)
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return meta


# --- the loop -----------------------------------------------------------------------------------------------------


def make_accelerator(bf16: bool, device: torch.device):
    """An `Accelerator` with bfloat16 autocast or none, on `device`'s type.

    accelerate keeps one process-wide state; a single process that already made an Accelerator with other settings
    (an earlier run in the same session) gets that state reset. Under a distributed launch the launch's settings
    stand.
    """
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, PartialState

    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)
    kwargs = {"mixed_precision": "bf16" if bf16 else "no", "cpu": device.type == "cpu"}
    for attempt in range(2):
        try:
            accelerator = Accelerator(**kwargs)
        except ValueError as err:
            if attempt or "already been initialized" not in str(err) or PartialState().num_processes > 1:
                raise
            AcceleratorState._reset_state(reset_partial_state=True)
            continue
        # An earlier CPU-only state would silently keep a GPU run on the CPU.
        if attempt or accelerator.num_processes > 1 or accelerator.device.type == device.type:
            return accelerator
        AcceleratorState._reset_state(reset_partial_state=True)
    return Accelerator(**kwargs)


def _set_checkpointing(model: PreTrainedModel, on: bool) -> None:
    """Gradient (activation) checkpointing of the decoder layers, non-reentrant, by the name this transformers has."""
    if hasattr(model, "activation_checkpointing_enable"):
        if on:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.activation_checkpointing_disable()
    elif on:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_disable()


def _make_scheduler(optimizer, config: HealConfig, steps: int):
    from transformers import (
        get_constant_schedule_with_warmup,
        get_cosine_schedule_with_warmup,
    )

    warmup = round(config.warmup_ratio * steps)
    if config.schedule == "cosine":
        return get_cosine_schedule_with_warmup(optimizer, warmup, steps)
    return get_constant_schedule_with_warmup(optimizer, warmup)


def _make_optimizer(named_params: list[tuple[str, nn.Parameter]], config: HealConfig) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; weight decay on matrices only (not on norms and biases)."""
    matrices = [p for _, p in named_params if p.dim() >= 2]
    vectors = [p for _, p in named_params if p.dim() < 2]
    groups = [{"params": matrices, "weight_decay": config.weight_decay}, {"params": vectors, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=config.lr)


def _mean(values: list[float]) -> float:
    return float(sum(values) / len(values)) if values else float("nan")


def loss_history(losses: list[float]) -> tuple[list[float], int]:
    """The losses for the record: every step's, or the mean of every k steps when there are more than 512."""
    every = max(1, -(-len(losses) // MAX_LOSS_HISTORY))
    history = [_mean(losses[i:i + every]) for i in range(0, len(losses), every)]
    return [round(v, 6) for v in history], every


def heal(
    student: str | os.PathLike | PreTrainedModel,
    output_dir: str | os.PathLike | None,
    *,
    teacher: str | os.PathLike | PreTrainedModel,
    config: HealConfig | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
    device: str | torch.device | None = None,
    overwrite: bool = False,
    progress: bool = True,
    gguf_file: str | None = None,
    revision: str | None = None,
    teacher_ref: SourceRef | None = None,
    on_step: Callable[[int, float], None] | None = None,
    eval_dataset: str | None = None,
    eval_seq_len: int = EVAL_SEQ_LEN,
    eval_max_windows: int | None = None,
) -> HealResult:
    """Heals a Basis Sharing compression by distillation from its source and saves the result as a new checkpoint.

    Args:
        student: a SharedBasisLlama checkpoint (folder or Hub id; never modified) or a SharedBasisLlama in memory
            (trained in place, e.g. by `convert` before it saves).
        output_dir: the new checkpoint; it appears only once complete. `None`: nothing is saved (nor is a resumable
            state); the student in memory is healed in place and carries the record (for `convert`, which saves).
        teacher: the source model: Hub id, folder, `.gguf` file, `"smollm2"`, or a causal LM in memory (moved to the
            training device).
        config: `HealConfig` (its defaults when None), resolved here once: its "auto" dtype for the device, its
            "auto" chat fraction by whether the tokenizer of the run has a chat template.
        tokenizer: the student's tokenizer (default: the student checkpoint's, else the teacher's).
        device: where training runs (default: cuda if present).
        gguf_file, revision: of a teacher given by name (as `hf-compress convert` takes them).
        teacher_ref: how the record names a teacher given in memory (default: its `name_or_path`).
        on_step: called as `on_step(step, loss)` after each optimizer step (and after the state save due then).
        eval_dataset: if given, the student's perplexity on this text before and after healing (windows of
            `eval_seq_len`, at most `eval_max_windows`) goes into the record and the card.
    """
    config = config if config is not None else HealConfig()
    config.validate()
    sources = [str(model) for model in (student, teacher) if not _is_module(model)]
    output = prepare_output(output_dir, overwrite=overwrite, sources=sources) if output_dir is not None else None
    compute_device = pick_device(device)
    evaluation = _healing_evaluation(eval_dataset, eval_seq_len, eval_max_windows, progress)
    student_model, teacher_model, tokenizer, teacher_ref = _load_models(
        student, teacher, tokenizer, gguf_file=gguf_file, revision=revision, teacher_ref=teacher_ref)
    # The one resolution of the run: the tokenizer that would write the chat text decides "auto" (the record then
    # holds the number the run trained with).
    config = config.resolve(compute_device, chat_template=has_chat_template(tokenizer))
    if config.uses_hidden:
        check_same_layers(student_model, teacher_model)
    if config.uses_blocks:
        check_blockwise_teacher(student_model, teacher_model, config)
    data, data_ref = load_healing_data(tokenizer, config, teacher_model, device=compute_device, progress=progress)
    with PeakMemory() as peak:
        result = _train(student_model, teacher_model, tokenizer, data, data_ref, teacher_ref, config, compute_device,
                        output, overwrite, progress, on_step, evaluation)
    result.peak_memory_mb = peak.cuda_peak_mb if compute_device.type == "cuda" else peak.peak_mb
    return result


def _healing_evaluation(eval_dataset: str | None, eval_seq_len: int, eval_max_windows: int | None,
                        progress: bool) -> HealingEvaluation | None:
    """The perplexity measure `heal(eval_dataset=...)` asks for, its options and text checked before any model
    loads; None without `eval_dataset`."""
    if eval_dataset is None:
        return None
    check_window_options(eval_seq_len, eval_max_windows, seq_flag="--eval-seq-len", windows_flag="--eval-max-windows")
    return HealingEvaluation(eval_dataset, load_text_option("--eval-dataset", eval_dataset), eval_seq_len,
                             eval_max_windows, progress)


def _load_models(student: str | os.PathLike | PreTrainedModel, teacher: str | os.PathLike | PreTrainedModel,
                 tokenizer: PreTrainedTokenizerBase | None, *, gguf_file: str | None, revision: str | None,
                 teacher_ref: SourceRef | None,
                 ) -> tuple[PreTrainedModel, PreTrainedModel, PreTrainedTokenizerBase, SourceRef]:
    """The student and the teacher, checked to share a vocabulary, the tokenizer of the run (the student's, else
    the teacher's) and the teacher's record."""
    student_model, tokenizer = load_student(student, tokenizer)
    teacher_model, teacher_tokenizer, teacher_ref = load_teacher(teacher, gguf_file=gguf_file, revision=revision,
                                                                 teacher_ref=teacher_ref)
    check_compatible(student_model, teacher_model, tokenizer, teacher_tokenizer)
    tokenizer = tokenizer if tokenizer is not None else teacher_tokenizer
    if tokenizer is None:
        raise HFCompressError("no tokenizer for the healing text: pass tokenizer= with a student and teacher in memory.")
    return student_model, teacher_model, tokenizer, teacher_ref


def _train(student: PreTrainedModel, teacher: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, data: HealingData,
           data_ref: DataRef, teacher_ref: SourceRef, config: HealConfig, device: torch.device, output: Path | None,
           overwrite: bool, progress: bool, on_step: Callable[[int, float], None] | None,
           evaluation: HealingEvaluation | None = None) -> HealResult:
    accelerator = make_accelerator(config.dtype == "bfloat16", device)
    if evaluation is not None:
        evaluation.before = evaluation.measure(student, tokenizer, device)
    state_dir = state_dir_for(output) if output is not None else None
    if state_dir is not None:
        clean_stale_staging(state_dir)  # what a killed state save left
    fingerprint = run_fingerprint(config, student, teacher, data, teacher_ref, accelerator.num_processes)
    torch.manual_seed(config.seed)
    blockwise = _blockwise_stage(student, teacher, data, config, accelerator, state_dir, fingerprint, progress)
    peft_model = add_lora(student, config) if config.trainable == "lora" else None
    try:
        return _train_prepared(student, peft_model, teacher, tokenizer, data, data_ref, teacher_ref, config,
                               accelerator, state_dir, fingerprint, output, overwrite, progress, on_step, evaluation,
                               blockwise)
    except BaseException:
        if peft_model is not None:  # a student given in memory is not left with adapters in it
            peft_model.unload()
            relink_bases(student)
        raise


def _blockwise_stage(student: PreTrainedModel, teacher: PreTrainedModel, data: HealingData, config: HealConfig,
                     accelerator, state_dir: Path | None, fingerprint: str, progress: bool) -> dict[str, Any] | None:
    """The block-wise stage (`config.block_tokens` > 0) on the run's first sequences; returns its record.

    A resumed run whose saved weights include everything the stage trained (`trainable` "factors" or "all") takes
    the record from the saved state instead of training the blocks again; under LoRA the stage's bases are not in
    the saved state and it runs again (it is deterministic for a seed). Before that, the stage saves its own state
    after each block (`state_dir/blockwise/`, which the training's first saved state replaces), and a rerun goes on
    after the last block saved. Under several processes each process runs the same stage (the main process saves
    it), and accelerate's DDP wrapper then starts every process from the main process's weights.
    """
    if not config.uses_blocks:
        return None
    meta = saved_meta(state_dir, fingerprint, warn=False)  # load_state warns
    if meta and meta.get("blockwise") and config.trainable != "lora":
        return meta["blockwise"]
    stage_dir = state_dir / STAGE_FOLDER if state_dir is not None else None
    done, save = None, None
    if stage_dir is not None:
        done = load_stage(stage_dir, student, fingerprint)
        if accelerator.is_main_process:
            if done is None:
                shutil.rmtree(stage_dir, ignore_errors=True)  # another run's blocks: none of them is resumed

            def save(result):
                save_stage(stage_dir, student, result, fingerprint)
    student.to(accelerator.device)
    teacher.to(accelerator.device)
    result = blockwise_distill(student, teacher, data.first_sequences(config.block_sequences), config,
                               accelerator.device, progress=progress and accelerator.is_main_process, done=done,
                               on_block=save)
    return result.record()


@dataclass
class _Run:
    """What the loop trains with (`_prepare_run`) and where a resumed run stands (`_resume`)."""

    objective: nn.Module  # accelerate's wrapper of the `HealingObjective`
    named_params: list[tuple[str, nn.Parameter]]  # the trainable parameters, by name (what the state saves)
    optimizer: torch.optim.Optimizer  # the plain optimizer: its state is what is saved
    prepared_optimizer: Any  # accelerate's wrapper of it: what steps
    scheduler: Any
    start_step: int = 0
    losses: list[float] = field(default_factory=list)
    earlier_time: float = 0.0  # seconds of training of the sessions before this one
    blockwise: dict[str, Any] | None = None  # the record of the block-wise stage before the loop

    @property
    def trainable_params(self) -> int:
        return sum(p.numel() for _, p in self.named_params)


def _train_prepared(student, peft_model, teacher, tokenizer, data, data_ref, teacher_ref, config, accelerator,
                    state_dir, fingerprint, output, overwrite, progress, on_step, evaluation,
                    blockwise) -> HealResult:
    run = _prepare_run(student, peft_model, teacher, config, accelerator, data.steps)
    run.blockwise = blockwise
    _resume(run, state_dir, fingerprint, data.steps)
    train_time = _run_steps(run, teacher, data, config, accelerator, state_dir, fingerprint, progress, on_step)
    student = _finish_student(student, peft_model, config, tokenizer, accelerator.device, evaluation)
    wall_time = run.earlier_time + train_time
    figures = _healing_figures(config, data, data_ref, teacher_ref, run, wall_time, evaluation)
    record = _attach_record(student, figures)
    if output is not None and accelerator.is_main_process:
        _save(student, tokenizer, output, overwrite)
        shutil.rmtree(state_dir, ignore_errors=True)
    accelerator.wait_for_everyone()
    session_tokens = (data.steps - run.start_step) * data.tokens_per_step
    return HealResult(
        output_dir=output, steps=data.steps, tokens=figures["tokens"], trainable_params=run.trainable_params,
        final_loss=_mean(run.losses[-LOSS_WINDOW:]), losses=run.losses, wall_time_s=wall_time,
        tokens_per_s=session_tokens / train_time if train_time > 0 else 0.0, peak_memory_mb=0.0,
        initial_loss=_mean(run.losses[:LOSS_WINDOW]), resumed_from=run.start_step, provenance=record,
    )


def _prepare_run(student: PreTrainedModel, peft_model, teacher: PreTrainedModel, config: HealConfig, accelerator,
                 steps: int) -> _Run:
    """The student in training mode with what trains marked, the teacher on the device (for a KL), the objective
    and the optimizer prepared by accelerate, and the learning-rate schedule of `steps` steps."""
    if peft_model is None:
        if config.balance_factors:
            balance_factors(student)
        mark_trainable(student, everything=config.trainable == "all")
    if config.gradient_checkpointing:
        _set_checkpointing(student, True)
    student.train()
    teacher.eval()
    if config.needs_teacher:
        teacher.to(accelerator.device)
    objective = accelerator.prepare(HealingObjective(student, teacher.get_output_embeddings(), config))
    named_params = [(name, p) for name, p in accelerator.unwrap_model(objective).named_parameters() if p.requires_grad]
    optimizer = _make_optimizer(named_params, config)
    scheduler = _make_scheduler(optimizer, config, steps)
    return _Run(objective, named_params, optimizer, accelerator.prepare(optimizer), scheduler)


def _resume(run: _Run, state_dir: Path | None, fingerprint: str, steps: int) -> None:
    """Restores the saved state of the same run into `run` (weights, optimizer, scheduler, RNG, losses so far),
    where there is one."""
    if state_dir is None:
        return
    meta = load_state(state_dir, fingerprint=fingerprint, named_params=run.named_params, optimizer=run.optimizer,
                      scheduler=run.scheduler)
    if not meta:
        return
    run.start_step, run.losses = meta["step"], list(meta["losses"])
    run.earlier_time = float(meta.get("wall_time_s", 0.0))
    logger.info("resuming from step %d of %d (%s)", run.start_step, steps, state_dir)


def _run_steps(run: _Run, teacher: PreTrainedModel, data: HealingData, config: HealConfig, accelerator,
               state_dir: Path | None, fingerprint: str, progress: bool,
               on_step: Callable[[int, float], None] | None) -> float:
    """The optimizer steps from `run.start_step` to the last (each loss appended to `run.losses`, the state saved
    every `save_steps` steps); returns the seconds of training of this session."""
    from tqdm.auto import tqdm

    bar = tqdm(total=data.steps, initial=run.start_step, desc="healing", unit="step",
               disable=not progress or not accelerator.is_main_process)
    started = time.perf_counter()
    for step in range(run.start_step, data.steps):
        ids = data.batch(step, accelerator.process_index, accelerator.num_processes).to(accelerator.device)
        value = _step(run, teacher, ids, config, accelerator)
        run.losses.append(value)
        done = step + 1
        elapsed = time.perf_counter() - started
        bar.update(1)
        bar.set_postfix(loss=f"{value:.4f}", tok_s=f"{(done - run.start_step) * data.tokens_per_step / elapsed:,.0f}")
        if state_dir is not None and done % config.save_steps == 0 and done < data.steps and accelerator.is_main_process:
            save_state(state_dir, step=done, named_params=run.named_params, optimizer=run.optimizer,
                       scheduler=run.scheduler, losses=run.losses, fingerprint=fingerprint,
                       wall_time_s=run.earlier_time + elapsed, blockwise=run.blockwise)
        if on_step is not None:
            on_step(done, value)
    bar.close()
    return time.perf_counter() - started


def _step(run: _Run, teacher: PreTrainedModel, ids: torch.Tensor, config: HealConfig, accelerator) -> float:
    """One optimizer step on the sequences `ids`; returns its loss (the mean over the processes)."""
    with accelerator.autocast():
        teacher_hidden, teacher_layers = (teacher_states(teacher, ids, layers=config.uses_hidden)
                                          if config.needs_teacher else (None, None))
        loss = run.objective(ids, teacher_hidden, teacher_layers)
    accelerator.backward(loss)
    run.prepared_optimizer.step()
    run.scheduler.step()
    run.prepared_optimizer.zero_grad(set_to_none=True)
    return accelerator.reduce(loss.detach(), reduction="mean").item()


def _finish_student(student: PreTrainedModel, peft_model, config: HealConfig, tokenizer: PreTrainedTokenizerBase,
                    device: torch.device, evaluation: HealingEvaluation | None) -> PreTrainedModel:
    """The trained student as it will be saved: checkpointing off, in eval mode, adapters merged, frozen, its
    weights rounded to the dtype of the conversion's output (so that the perplexity after healing, measured here,
    is the checkpoint's)."""
    if config.gradient_checkpointing:
        _set_checkpointing(student, False)
    student.eval()
    if peft_model is not None:
        student = merge_lora(peft_model)
    student.requires_grad_(False)
    round_weights(student, _save_dtype(student))
    if evaluation is not None:
        evaluation.after = evaluation.measure(student, tokenizer, device)
    return student


def _healing_figures(config: HealConfig, data: HealingData, data_ref: DataRef, teacher_ref: SourceRef, run: _Run,
                     wall_time_s: float, evaluation: HealingEvaluation | None) -> dict[str, Any]:
    """The `healing` entry of the record: options (resolved), teacher, data, budget, losses, time, perplexity."""
    from .. import __version__

    history, every = loss_history(run.losses)
    figures = {
        "options": recorded_options(config, data_ref),
        "teacher": asdict(teacher_ref),
        "data": [asdict(data_ref)],
        "tokens": data.steps * data.tokens_per_step,
        "steps": data.steps,
        "initial_loss": round(_mean(run.losses[:LOSS_WINDOW]), 6),
        "final_loss": round(_mean(run.losses[-LOSS_WINDOW:]), 6),
        "loss_history": history,
        "loss_history_every": every,
        "trainable_params": run.trainable_params,
        "wall_time_s": round(wall_time_s, 3),
    }
    if run.blockwise is not None:
        figures["blockwise"] = run.blockwise
    if evaluation is not None:
        figures["perplexity"] = evaluation.record()
    figures["hf_compress_version"] = __version__
    return figures


def _attach_record(student: PreTrainedModel, figures: dict[str, Any]) -> dict[str, Any]:
    """The student's compression record with `figures` as its `healing` entry (an earlier healing kept under
    `previous`), set on the student's config and returned."""
    record = dict(student.config.compression or {})
    if "healing" in record:  # healed again: the earlier healing stays on record
        figures["previous"] = record["healing"]
    record["healing"] = figures
    student.config.compression = record
    return record


def _save(student: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, output: Path, overwrite: bool) -> None:
    from ..cards import write_model_card

    cast_weights(student, _save_dtype(student))  # already rounded to that dtype: the cast is exact
    save_pretrained_checkpoint(student, output, processor=tokenizer, overwrite=overwrite,
                               card=lambda folder: write_model_card(folder))
