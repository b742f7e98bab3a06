"""Distillation and language-modelling losses computed a chunk of sequence positions at a time.

A vocabulary-wide logit tensor of a whole batch is large (4 x 512 x 49152 float32 = 400 MB for SmolLM2, twice for
student and teacher, and again for their softmaxes). Here the logits of `chunk` positions are computed from the final
hidden states, reduced to a loss sum, and dropped; each chunk runs under `torch.utils.checkpoint`, so the backward
pass recomputes that chunk's logits instead of keeping them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100


def _upcast(logits: torch.Tensor) -> torch.Tensor:
    """Softmaxes in float32 at least (bfloat16/float16 logits under autocast), float64 left as it is."""
    return logits if logits.dtype in (torch.float32, torch.float64) else logits.float()


def _kl_sum(student_hidden: torch.Tensor, teacher_hidden: torch.Tensor, student_head: nn.Module,
            teacher_head: nn.Module, temperature: float) -> torch.Tensor:
    """Sum over the positions of KL(teacher || student) of the softened distributions (float32 softmaxes)."""
    student_logp = F.log_softmax(_upcast(student_head(student_hidden)) / temperature, dim=-1)
    with torch.no_grad():
        teacher_logp = F.log_softmax(_upcast(teacher_head(teacher_hidden)) / temperature, dim=-1)
    return F.kl_div(student_logp, teacher_logp, reduction="sum", log_target=True)


def chunked_kl_loss(student_hidden: torch.Tensor, teacher_hidden: torch.Tensor, student_head: nn.Module,
                    teacher_head: nn.Module, temperature: float = 1.0, chunk: int = 128) -> torch.Tensor:
    """Mean over the positions of KL(teacher || student) of the next-token distributions softened by `temperature`,
    times `temperature**2` (so that its gradients keep their scale as the temperature changes).

    Args:
        student_hidden, teacher_hidden: final hidden states (`batch x seq x hidden`, each its own width) of the
            base models (`model.model(...)`), before the heads.
        student_head, teacher_head: the `lm_head` modules.
        chunk: positions of the sequence whose logits are computed at a time (and recomputed in the backward pass).
    """
    if student_hidden.shape[:2] != teacher_hidden.shape[:2]:
        raise ValueError(f"student and teacher hidden states cover different positions: "
                         f"{tuple(student_hidden.shape[:2])} vs {tuple(teacher_hidden.shape[:2])}")
    teacher_hidden = teacher_hidden.detach()
    length = student_hidden.shape[1]
    total = None
    for start in range(0, length, chunk):
        piece = slice(start, start + chunk)
        part = checkpoint(_kl_sum, student_hidden[:, piece], teacher_hidden[:, piece], student_head, teacher_head,
                          temperature, use_reentrant=False)
        total = part if total is None else total + part
    positions = student_hidden.shape[0] * length
    return total / positions * temperature**2


def _ce_sum(hidden: torch.Tensor, head: nn.Module, labels: torch.Tensor) -> torch.Tensor:
    logits = _upcast(head(hidden))
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="sum",
                           ignore_index=IGNORE_INDEX)


def chunked_lm_loss(hidden: torch.Tensor, head: nn.Module, labels: torch.Tensor, chunk: int = 128) -> torch.Tensor:
    """The causal LM loss of `transformers` (position `t` predicts `labels[:, t + 1]`; `-100` ignored), mean over the
    predicted tokens, computed `chunk` positions at a time as `chunked_kl_loss` does."""
    hidden, targets = hidden[:, :-1], labels[:, 1:]
    total = None
    for start in range(0, hidden.shape[1], chunk):
        piece = slice(start, start + chunk)
        part = checkpoint(_ce_sum, hidden[:, piece], head, targets[:, piece], use_reentrant=False)
        total = part if total is None else total + part
    if total is None:  # a single position predicts nothing
        return hidden.sum() * 0.0
    count = (targets != IGNORE_INDEX).sum().clamp(min=1)
    return total / count
