"""Distillation and language-modelling losses computed a chunk of sequence positions at a time.

A vocabulary-wide logit tensor of a whole batch is large (4 x 512 x 49152 float32 = 400 MB for SmolLM2, twice for
student and teacher, and again for their softmaxes). Here the logits of `chunk` positions are computed from the final
hidden states, reduced to a loss sum, and dropped. For the gradient, either

- the student's head is frozen (healing's default): the KL's gradient with respect to the student's hidden states
  is computed in the forward pass itself, chunk by chunk (`frozen_head_kl_sum`), and only that (`batch x seq x
  hidden`) is kept, so the backward pass computes no logits at all; or
- the head trains: each chunk runs under `torch.utils.checkpoint`, and the backward pass recomputes that chunk's
  logits (the student's and the teacher's) instead of keeping them.
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


def _softened_log_probs(student_logits: torch.Tensor, teacher_hidden: torch.Tensor, teacher_head: nn.Module,
                        temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The student's and the teacher's log-softmax of their logits over `temperature` (float32 softmaxes); the
    teacher's without a graph."""
    student_logp = F.log_softmax(_upcast(student_logits) / temperature, dim=-1)
    with torch.no_grad():
        teacher_logp = F.log_softmax(_upcast(teacher_head(teacher_hidden)) / temperature, dim=-1)
    return student_logp, teacher_logp


def _kl_sum(student_hidden: torch.Tensor, teacher_hidden: torch.Tensor, student_head: nn.Module,
            teacher_head: nn.Module, temperature: float) -> torch.Tensor:
    """Sum over the positions of KL(teacher || student) of the softened distributions."""
    student_logp, teacher_logp = _softened_log_probs(student_head(student_hidden), teacher_hidden, teacher_head,
                                                     temperature)
    return F.kl_div(student_logp, teacher_logp, reduction="sum", log_target=True)


class _FrozenHeadLoss(torch.autograd.Function):
    """`kl_scale` times the sum over the positions of KL(teacher || student), plus `ce_scale` times the sum of the
    next-token cross-entropy, with the student's head frozen, and their gradient with respect to the student's
    hidden states worked out in the forward pass, while each chunk's logits are at hand: for logits `s`, softened
    distributions `p = softmax(s / T)`, `q = softmax(t / T)` and the target token `y`, the gradient of
    `sum q * (log q - log p)` with respect to `s` is `(p - q) / T`, that of `-log softmax(s)[y]` is
    `softmax(s) - onehot(y)`; the head's weight carries their sum back to the hidden states. One pass over the
    logits serves both terms, so `kl+lm` costs the student's logits once."""

    @staticmethod
    def forward(ctx, student_hidden: torch.Tensor, teacher_hidden: torch.Tensor | None, targets: torch.Tensor | None,
                student_head: nn.Linear, teacher_head: nn.Module | None, temperature: float, kl_scale: float,
                ce_scale: float, chunk: int) -> torch.Tensor:
        grad = torch.empty_like(student_hidden)
        total = None
        for start in range(0, student_hidden.shape[1], chunk):
            piece = slice(start, start + chunk)
            logits = F.linear(student_hidden[:, piece], student_head.weight, student_head.bias)
            part, grad_logits, logp = 0.0, 0.0, None
            if kl_scale:
                student_logp, teacher_logp = _softened_log_probs(logits, teacher_hidden[:, piece], teacher_head,
                                                                 temperature)
                part = kl_scale * F.kl_div(student_logp, teacher_logp, reduction="sum", log_target=True)
                grad_logits = kl_scale / temperature * (student_logp.exp() - teacher_logp.exp())
                logp = student_logp if temperature == 1.0 else None
            if ce_scale:
                logp = F.log_softmax(_upcast(logits), dim=-1) if logp is None else logp
                target = targets[:, piece]
                valid = (target != IGNORE_INDEX).unsqueeze(-1)
                part = part + ce_scale * F.nll_loss(logp.reshape(-1, logp.shape[-1]), target.reshape(-1),
                                                    ignore_index=IGNORE_INDEX, reduction="sum")
                ce_grad = logp.exp().scatter_add_(-1, target.clamp(min=0).unsqueeze(-1), -valid.to(logp.dtype))
                grad_logits = grad_logits + ce_scale * ce_grad * valid
            total = part if total is None else total + part
            # under autocast this matmul runs in bfloat16, as the backward pass of `student_head` would
            grad[:, piece] = (grad_logits @ student_head.weight.to(grad_logits.dtype)).to(grad.dtype)
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        (grad,) = ctx.saved_tensors
        return (grad * grad_output.to(grad.dtype),) + (None,) * 8


def _head_is_frozen(head: nn.Module) -> bool:
    return isinstance(head, nn.Linear) and not any(p.requires_grad for p in head.parameters())


def _check_frozen(head: nn.Module, caller: str) -> None:
    if not _head_is_frozen(head):
        raise ValueError(f"{caller} needs an nn.Linear student head with no parameter requiring grad")


def _check_positions(student_hidden: torch.Tensor, teacher_hidden: torch.Tensor) -> None:
    if student_hidden.shape[:2] != teacher_hidden.shape[:2]:
        raise ValueError(f"student and teacher hidden states cover different positions: "
                         f"{tuple(student_hidden.shape[:2])} vs {tuple(teacher_hidden.shape[:2])}")


def _predicted_count(labels: torch.Tensor) -> int:
    """Tokens the positions predict (`labels[:, 1:]` not ignored), at least 1."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum().clamp(min=1))


def next_token_targets(labels: torch.Tensor) -> torch.Tensor:
    """What each position predicts: `labels[:, t + 1]`, and `-100` (nothing) at the last position."""
    targets = torch.full_like(labels, IGNORE_INDEX)
    targets[:, :-1] = labels[:, 1:]
    return targets


def frozen_head_kl_sum(student_hidden: torch.Tensor, teacher_hidden: torch.Tensor, student_head: nn.Linear,
                       teacher_head: nn.Module, temperature: float = 1.0, chunk: int = 128) -> torch.Tensor:
    """Sum over the positions of KL(teacher || student) for a frozen `student_head` (an `nn.Linear` none of whose
    parameters requires a gradient), differentiable with respect to `student_hidden` only: the gradient is
    computed while the logits of each chunk are at hand, so the backward pass recomputes none of them."""
    _check_frozen(student_head, "frozen_head_kl_sum")
    return _FrozenHeadLoss.apply(student_hidden, teacher_hidden.detach(), None, student_head, teacher_head,
                                 temperature, 1.0, 0.0, chunk)


def chunked_kl_loss(student_hidden: torch.Tensor, teacher_hidden: torch.Tensor, student_head: nn.Module,
                    teacher_head: nn.Module, temperature: float = 1.0, chunk: int = 128) -> torch.Tensor:
    """Mean over the positions of KL(teacher || student) of the next-token distributions softened by `temperature`,
    times `temperature**2` (so that its gradients keep their scale as the temperature changes).

    Args:
        student_hidden, teacher_hidden: final hidden states (`batch x seq x hidden`, each its own width) of the
            base models (`model.model(...)`), before the heads.
        student_head, teacher_head: the `lm_head` modules.
        chunk: positions of the sequence whose logits are computed at a time (recomputed in the backward pass
            only where the student's head trains).
    """
    _check_positions(student_hidden, teacher_hidden)
    teacher_hidden = teacher_hidden.detach()
    length = student_hidden.shape[1]
    positions = student_hidden.shape[0] * length
    if student_hidden.requires_grad and _head_is_frozen(student_head):
        total = frozen_head_kl_sum(student_hidden, teacher_hidden, student_head, teacher_head, temperature, chunk)
        return total / positions * temperature**2
    total = None
    for start in range(0, length, chunk):
        piece = slice(start, start + chunk)
        part = checkpoint(_kl_sum, student_hidden[:, piece], teacher_hidden[:, piece], student_head, teacher_head,
                          temperature, use_reentrant=False)
        total = part if total is None else total + part
    return total / positions * temperature**2


def _ce_sum(hidden: torch.Tensor, head: nn.Module, labels: torch.Tensor) -> torch.Tensor:
    logits = _upcast(head(hidden))
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="sum",
                           ignore_index=IGNORE_INDEX)


def chunked_lm_loss(hidden: torch.Tensor, head: nn.Module, labels: torch.Tensor, chunk: int = 128) -> torch.Tensor:
    """The causal LM loss of `transformers` (position `t` predicts `labels[:, t + 1]`; `-100` ignored), mean over the
    predicted tokens, computed `chunk` positions at a time as `chunked_kl_loss` does (a frozen head: its gradient
    in the forward pass; a training one: logits recomputed in the backward pass)."""
    if hidden.requires_grad and _head_is_frozen(head):
        return _FrozenHeadLoss.apply(hidden, None, next_token_targets(labels), head, None, 1.0, 0.0,
                                     1.0 / _predicted_count(labels), chunk)
    hidden, targets = hidden[:, :-1], labels[:, 1:]
    total = None
    for start in range(0, hidden.shape[1], chunk):
        piece = slice(start, start + chunk)
        part = checkpoint(_ce_sum, hidden[:, piece], head, targets[:, piece], use_reentrant=False)
        total = part if total is None else total + part
    if total is None:  # a single position predicts nothing
        return hidden.sum() * 0.0
    return total / _predicted_count(labels)


def kl_lm_loss(student_hidden: torch.Tensor, teacher_hidden: torch.Tensor, student_head: nn.Module,
               teacher_head: nn.Module, labels: torch.Tensor, temperature: float = 1.0, lm_weight: float = 1.0,
               chunk: int = 128) -> torch.Tensor:
    """`chunked_kl_loss + lm_weight * chunked_lm_loss`. With a frozen student head both terms come from one pass
    over each chunk's logits, their gradients summed in it (`_FrozenHeadLoss`): the logits are computed once, not
    once per term."""
    if not (student_hidden.requires_grad and _head_is_frozen(student_head)):
        return (chunked_kl_loss(student_hidden, teacher_hidden, student_head, teacher_head, temperature, chunk)
                + lm_weight * chunked_lm_loss(student_hidden, student_head, labels, chunk))
    _check_positions(student_hidden, teacher_hidden)
    positions = student_hidden.shape[0] * student_hidden.shape[1]
    return _FrozenHeadLoss.apply(student_hidden, teacher_hidden.detach(), next_token_targets(labels), student_head,
                                 teacher_head, temperature, temperature**2 / positions,
                                 lm_weight / _predicted_count(labels), chunk)


def hidden_state_loss(student_states: list[torch.Tensor], teacher_states: list[torch.Tensor],
                      eps: float = 1e-6) -> torch.Tensor:
    """Mean over the layers and positions of `||s - t||^2 / ||t||^2`: how far each of the student's decoder-layer
    outputs `s` is from the teacher's `t` at the same layer and position, relative to the teacher's (float32).

    Relative per position because the residual stream of a Llama grows through the depth and carries a few
    positions of far larger norm than the rest (the first tokens, where attention parks): a plain squared error
    would be the error of those positions of the last layers alone.
    """
    if len(student_states) != len(teacher_states) or not student_states:
        raise ValueError(f"hidden_state_loss needs one teacher state per student state; got {len(student_states)} "
                         f"and {len(teacher_states)}")
    total = None
    for student, teacher in zip(student_states, teacher_states):
        _check_positions(student, teacher)
        teacher = _upcast(teacher.detach())
        error = (_upcast(student) - teacher).square().sum(-1) / teacher.square().sum(-1).clamp(min=eps)
        total = error.mean() if total is None else total + error.mean()
    return total / len(student_states)
