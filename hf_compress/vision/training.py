"""Training and evaluation of image classifiers on tensor datasets (`ImageClassificationData`).

One loop serves every vision family: the loss is a callable `loss_fn(model, images, labels) -> loss`,
so a family plugs in its own objective (a joint loss over exits, cross-entropy plus a regulariser).
Device placement and data parallelism go through accelerate; on CUDA the loop uses bf16 autocast and
channels_last, and the data stays on the GPU where it is augmented batch by batch.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..data.images import ImageClassificationData
from ..errors import HFCompressError

LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


def logits_of(output) -> torch.Tensor:
    """The logits of a model output: a `ModelOutput` with `.logits`, a tuple (first item) or a tensor."""
    if isinstance(output, torch.Tensor):
        return output
    if hasattr(output, "logits"):
        return output.logits
    return output[0]


def cross_entropy_loss(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The default `loss_fn`: mean cross-entropy of the model's logits."""
    return F.cross_entropy(logits_of(model(pixel_values=images)).float(), labels)


@dataclass
class TrainingHistory:
    """Per-epoch record of a `train_classifier` run."""

    train_loss: list[float] = field(default_factory=list)
    eval_accuracy: list[float] = field(default_factory=list)
    learning_rate: list[float] = field(default_factory=list)


class TrainingState:
    """The training state of a run, in one file of a folder, replaced atomically after every epoch.

    The file is written by `torch.save` and read back with `weights_only=True`, which admits tensors and plain
    containers only (never arbitrary pickled objects), so resuming cannot run code.
    """

    FILE = "training_state.pt"

    def __init__(self, folder: Path, settings: dict):
        self.folder = folder
        self.settings = settings

    def restore(self, model: nn.Module, optimizer, scheduler, generator: torch.Generator,
                history: TrainingHistory) -> int:
        """Loads a stored state into the given objects; returns the number of finished epochs (0 without one)."""
        path = self.folder / self.FILE
        if not path.is_file():
            return 0
        state = torch.load(path, map_location="cpu", weights_only=True)
        if state["settings"] != self.settings:
            raise HFCompressError(
                f"{self.folder} holds a training run with other settings ({state['settings']}); "
                f"use the same settings ({self.settings}) or another folder"
            )
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        generator.set_state(state["generator"])
        for key, values in state["history"].items():
            getattr(history, key).extend(values)
        return int(state["epoch"])

    def save(self, model: nn.Module, optimizer, scheduler, generator: torch.Generator, history: TrainingHistory,
             epoch: int) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.folder / f".{self.FILE}.tmp"
        torch.save({"epoch": epoch, "settings": self.settings, "history": asdict(history),
                    "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "generator": generator.get_state()}, tmp)
        os.replace(tmp, self.folder / self.FILE)


def _make_scheduler(optimizer, schedule: str, total_steps: int, milestones: list[float] | None, gamma: float, warmup_steps: int):
    if schedule not in ("cosine", "step", "constant"):
        raise HFCompressError(f"schedule must be 'cosine', 'step' or 'constant', got {schedule!r}")
    # Milestones are fractions of the run, so one setting fits any number of epochs.
    marks = [int(m * total_steps) for m in (milestones or [0.5, 0.75])]

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "cosine":
            progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        if schedule == "step":
            return gamma ** sum(step >= m for m in marks)
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _autocast(device: torch.device, bf16: bool):
    if bf16:
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return torch.autocast(device_type=device.type, enabled=False)


def train_classifier(
    model: nn.Module,
    train_data: ImageClassificationData,
    *,
    epochs: int,
    lr: float = 0.1,
    batch_size: int = 128,
    loss_fn: LossFn | None = None,
    weight_decay: float = 5e-4,
    momentum: float = 0.9,
    nesterov: bool = True,
    schedule: str = "cosine",
    milestones: list[float] | None = None,
    gamma: float = 0.1,
    warmup_epochs: float = 0.0,
    augment: bool = True,
    eval_data: ImageClassificationData | None = None,
    bf16: bool | None = None,
    channels_last: bool | None = None,
    accelerator=None,
    seed: int = 0,
    progress: bool = True,
    desc: str = "train",
    resume_dir: str | os.PathLike | None = None,
) -> TrainingHistory:
    """Trains `model` in place with SGD and momentum.

    Args:
        model: a classifier called as `model(pixel_values=images)`, returning logits or an output with `.logits`.
        train_data: the training split; moved to the accelerator's device for the run.
        epochs: passes over `train_data`.
        lr, momentum, nesterov, weight_decay: SGD settings (weight decay is applied to every parameter).
        batch_size: global batch size (split across processes under data parallelism).
        loss_fn: `loss_fn(model, images, labels) -> scalar loss`; default cross-entropy. Under data
            parallelism `model` is the wrapped model, so call it rather than its submodules.
        schedule: `"cosine"` (to zero), `"step"` (`gamma` at `milestones`, fractions of the run; default
            0.5 and 0.75) or `"constant"`; stepped every batch, after `warmup_epochs` of linear warm-up.
        augment: random crop (padding 4) and horizontal flip on each batch.
        eval_data: evaluated after every epoch when given (accuracy in the history and the progress bar).
        bf16: autocast to bfloat16; default on for CUDA, off elsewhere.
        channels_last: memory format of the model and batches; default on for CUDA.
        accelerator: an `accelerate.Accelerator`; one is created (device placement, multi-GPU under
            `accelerate launch`) when not given.
        seed: seeds the batch order and augmentation.
        resume_dir: when given, the whole training state (weights, optimizer, schedule, random generator, history)
            is written there after every epoch, and a run that finds a state there continues after its last
            finished epoch; the result is the same as an uninterrupted run. The settings must match the stored run.

    Returns:
        A `TrainingHistory` with per-epoch mean loss, eval accuracy and learning rate.
    """
    from accelerate import Accelerator

    _check_settings(epochs, batch_size, lr, train_data)
    accelerator = accelerator or Accelerator()
    device = accelerator.device
    bf16 = device.type == "cuda" if bf16 is None else bf16
    channels_last = device.type == "cuda" if channels_last is None else channels_last
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model.to(device=device, memory_format=memory_format)
    per_process = max(1, batch_size // accelerator.num_processes)
    steps_per_epoch = math.ceil(len(train_data) / accelerator.num_processes / per_process)
    optimizer, scheduler = _sgd(model, epochs * steps_per_epoch, lr=lr, momentum=momentum, nesterov=nesterov,
                                weight_decay=weight_decay, schedule=schedule, milestones=milestones, gamma=gamma,
                                warmup_steps=int(warmup_epochs * steps_per_epoch))
    generator = torch.Generator().manual_seed(seed)
    history = TrainingHistory()
    state = None if resume_dir is None else TrainingState(Path(resume_dir), {
        "epochs": epochs, "lr": lr, "batch_size": batch_size, "seed": seed, "schedule": schedule,
        "weight_decay": weight_decay, "train_size": len(train_data)})
    start_epoch = state.restore(model, optimizer, scheduler, generator, history) if state is not None else 0
    wrapped, optimizer = accelerator.prepare(model, optimizer)
    run = _EpochRunner(accelerator, wrapped, optimizer, scheduler, generator, train_data.to(device),
                       loss_fn or cross_entropy_loss, per_process, steps_per_epoch, memory_format, bf16, augment)
    _run_epochs(run, history, state, start_epoch, epochs, eval_data, channels_last=channels_last,
                show=progress and accelerator.is_local_main_process, desc=desc)
    return history


def _check_settings(epochs: int, batch_size: int, lr: float, train_data: ImageClassificationData) -> None:
    """Refuses negative epochs or learning rate, a batch size below one and an empty training set."""
    if epochs < 0 or batch_size <= 0 or lr < 0:
        raise HFCompressError(f"epochs, batch_size and lr must be positive, got {epochs}, {batch_size}, {lr}")
    if len(train_data) == 0:
        raise HFCompressError("the training dataset is empty")


def _sgd(model: nn.Module, total_steps: int, *, lr: float, momentum: float, nesterov: bool, weight_decay: float,
         schedule: str, milestones: list[float] | None, gamma: float,
         warmup_steps: int) -> tuple[torch.optim.SGD, torch.optim.lr_scheduler.LambdaLR]:
    """The SGD optimizer over every parameter of `model` and its per-step learning-rate schedule."""
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, nesterov=nesterov and momentum > 0,
                                weight_decay=weight_decay)
    scheduler = _make_scheduler(optimizer, schedule, max(1, total_steps), milestones, gamma, warmup_steps)
    return optimizer, scheduler


def _run_epochs(run: _EpochRunner, history: TrainingHistory, state: TrainingState | None, start_epoch: int,
                epochs: int, eval_data: ImageClassificationData | None, *, channels_last: bool, show: bool,
                desc: str) -> None:
    """Trains epochs `start_epoch` to `epochs` (those a resumed state left), recording each in `history` and saving
    the state after each; then leaves the unwrapped model contiguous and in eval mode."""
    accelerator, wrapped = run.accelerator, run.model
    for epoch in range(start_epoch, epochs):
        history.learning_rate.append(run.optimizer.param_groups[0]["lr"])
        history.train_loss.append(run.epoch(f"{desc} epoch {epoch + 1}/{epochs}", show))
        if eval_data is not None:
            history.eval_accuracy.append(evaluate_accuracy(accelerator.unwrap_model(wrapped), eval_data,
                                                           bf16=run.bf16, channels_last=channels_last))
        if show:
            note = f" eval acc {history.eval_accuracy[-1]:.4f}" if eval_data is not None else ""
            tqdm.write(f"{desc} epoch {epoch + 1}/{epochs}: loss {history.train_loss[-1]:.4f} "
                       f"lr {history.learning_rate[-1]:.4g}{note}")
        if state is not None and accelerator.is_main_process:
            state.save(accelerator.unwrap_model(wrapped), run.optimizer, run.scheduler, run.generator, history,
                       epoch + 1)
    accelerator.wait_for_everyone()
    model = accelerator.unwrap_model(wrapped)
    model.to(memory_format=torch.contiguous_format)
    model.eval()


@dataclass
class _EpochRunner:
    """What one training epoch needs, prepared once by `train_classifier`."""

    accelerator: object
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    generator: torch.Generator
    data: ImageClassificationData
    loss_fn: LossFn
    per_process: int
    steps: int
    memory_format: torch.memory_format
    bf16: bool
    augment: bool

    def epoch(self, desc: str, progress: bool) -> float:
        """One pass over this process's shard of the data; returns the mean training loss."""
        accelerator, device = self.accelerator, self.accelerator.device
        self.model.train()
        total_loss = torch.zeros((), device=device)
        seen = 0
        shard = (accelerator.process_index, accelerator.num_processes)
        with tqdm(total=self.steps, desc=desc, disable=not progress, leave=False) as bar:
            for images, labels in self.data.batches(self.per_process, shuffle=True, augment=self.augment,
                                                    generator=self.generator, shard=shard):
                with _autocast(device, self.bf16):
                    loss = self.loss_fn(self.model, images.contiguous(memory_format=self.memory_format), labels)
                self.optimizer.zero_grad(set_to_none=True)
                accelerator.backward(loss)
                self.optimizer.step()
                self.scheduler.step()
                # Accumulated on the device: a .item() per step would synchronise the GPU every batch.
                total_loss += loss.detach().float() * len(labels)
                seen += len(labels)
                bar.update(1)
        return float(total_loss) / max(1, seen)


@torch.no_grad()
def predict_logits(
    model: nn.Module,
    data: ImageClassificationData,
    batch_size: int = 512,
    *,
    bf16: bool = False,
    channels_last: bool = False,
) -> torch.Tensor:
    """float32 logits `[N, num_labels]` of `model` (in eval mode) on `data`, on the model's device."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    outputs = []
    for images, _ in data.to(device).batches(batch_size):
        with _autocast(device, bf16):
            outputs.append(logits_of(model(pixel_values=images.contiguous(memory_format=memory_format))).float())
    model.train(was_training)
    return torch.cat(outputs) if outputs else torch.zeros(0, 0, device=device)


def evaluate_accuracy(model: nn.Module, data: ImageClassificationData, batch_size: int = 512, **predict_kwargs) -> float:
    """Top-1 accuracy (0-1) of `model` on `data`, computed on the model's device; `predict_kwargs` (`bf16`,
    `channels_last`) as for `predict_logits`."""
    if len(data) == 0:
        raise HFCompressError("the evaluation dataset is empty")
    logits = predict_logits(model, data, batch_size, **predict_kwargs)
    return float((logits.argmax(-1) == data.labels.to(logits.device)).float().mean())
