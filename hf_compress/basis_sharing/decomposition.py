"""Basis Sharing decomposition: whitening, shared-basis SVD, rank rules and coefficient refit.

Notation follows the paper: a layer computes `y = x W` with `W` of shape `(d_in, d_out)`; a group of `n` layers
concatenates its weights side by side, `W_G = [W_1 | ... | W_n]` (`d_in x n*d_out`). With `S` the Cholesky factor
of the group's summed Gram (`S^T S = X^T X`), `S W_G ~ U_k Sigma_k V_k^T`, the shared basis is
`B = S^-1 U_k Sigma_k` and layer i's coefficients are the i-th `d_out`-wide block of `V_k^T`. This minimises
`sum_i ||X W_i - X B C_i||_F^2` over the calibration inputs.
"""

from __future__ import annotations

import heapq
import logging
import math
from dataclasses import dataclass

import torch

from ..errors import HFCompressError

logger = logging.getLogger(__name__)


@dataclass
class Whitening:
    """Upper-triangular `S` with `S^T S = gram + shift * I`, and the diagonal `shift` that was needed."""

    factor: torch.Tensor
    shift: float


@dataclass
class GroupSpectrum:
    """Whitened SVD of one group, kept so that ranks can be chosen after all groups are seen."""

    name: str
    layers: list[int]
    d_in: int
    d_out: int
    left: torch.Tensor  # U (d_in x r), float64
    singular_values: torch.Tensor  # Sigma (r,), float64, descending
    right: torch.Tensor  # V^T (r x n*d_out), float64
    whitening: Whitening | None

    @property
    def n(self) -> int:
        return len(self.layers)

    @property
    def cost_per_rank(self) -> int:
        """Parameters one more rank costs: a column of B and a row of every C_i."""
        return self.d_in + self.n * self.d_out

    @property
    def dense_params(self) -> int:
        return self.n * self.d_in * self.d_out

    @property
    def max_rank(self) -> int:
        return int(self.singular_values.numel())


@dataclass
class GroupFactors:
    """Factors of one group: basis `B` (`d_in x k`) and coefficients `C_i` (`k x d_out`) per layer."""

    name: str
    layers: list[int]
    basis: torch.Tensor
    coefficients: list[torch.Tensor]

    @property
    def rank(self) -> int:
        return self.basis.shape[1]


def make_groups(num_layers: int, group_size: int) -> list[list[int]]:
    """Consecutive groups of `group_size` layers; the last group holds the remainder."""
    if not 1 <= group_size <= num_layers:
        raise HFCompressError(f"group size must be between 1 and the number of layers ({num_layers}); got {group_size}.")
    return [list(range(start, min(start + group_size, num_layers))) for start in range(0, num_layers, group_size)]


def rank_for_ratio(n: int, d_in: int, d_out: int, ratio: float) -> int:
    """The paper's rank for a group of `n` layers at compression ratio `ratio`: floor(n d_in d_out (1-CR) / (d_in + n d_out))."""
    if not 0.0 < ratio < 1.0:
        raise HFCompressError(f"ratio must be in (0, 1); got {ratio}.")
    return max(1, math.floor(n * d_in * d_out * (1.0 - ratio) / (d_in + n * d_out)))


def whiten(gram: torch.Tensor) -> Whitening:
    """Cholesky whitening in float64; a Gram that is not positive definite gets the smallest diagonal shift that fixes it.

    `gram` is not modified. Each intermediate is dropped as soon as the next exists, so a caller that hands its Gram
    over (`whiten(make_gram())`, keeping no reference) holds a wide Gram at most twice at once (the Gram and its
    symmetrised copy, then that and the factor, then the factor and its transpose).
    """
    gram = gram.to(torch.float64)
    gram = (gram + gram.T).mul_(0.5)  # 0.5 * (G + G^T) with one temporary
    if not torch.isfinite(gram).all():
        raise HFCompressError("the calibration Gram matrix contains NaN or inf.")
    factor, info = torch.linalg.cholesky_ex(gram)
    if info.item() == 0:
        del gram
        return Whitening(factor=factor.T.contiguous(), shift=0.0)
    eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    lowest = torch.linalg.eigvalsh(gram)[0].item()
    scale = max(gram.diagonal().abs().mean().item(), 1e-30)
    # Just past the lowest eigenvalue, with a margin that grows until Cholesky succeeds in floating point.
    margin = 1e-10 * scale
    while True:
        shift = max(-lowest, 0.0) + margin
        factor, info = torch.linalg.cholesky_ex(gram + shift * eye)
        if info.item() == 0:
            return Whitening(factor=factor.T.contiguous(), shift=shift)
        margin *= 10.0


def spectrum(
    name: str,
    layers: list[int],
    weights: list[torch.Tensor],
    gram: torch.Tensor | None,
    *,
    solver: str = "auto",
    whitening: Whitening | None = None,
) -> GroupSpectrum:
    """Whitened SVD of a group's concatenated weights (`weights[i]` is `d_in x d_out`); `gram=None` is plain SVD.

    `solver="eigh"` diagonalises the smaller Gram side of `S W_G` instead of running an SVD; `"auto"` picks it when
    `S W_G` is at least 1.5 times wider than high (or higher than wide), where it is cheaper. Both give the same
    factors up to the sign of each component (components below 1e-12 of the largest are dropped on that path).
    A `whitening` already computed for the same Gram (q/k/v and gate/up share theirs) can be passed instead.
    """
    d_in, d_out = weights[0].shape
    stacked = torch.cat([w.to(torch.float64) for w in weights], dim=1)
    if not torch.isfinite(stacked).all():
        raise HFCompressError(f"{name} of layer(s) {layers} has NaN or inf weights.")
    if whitening is None and gram is not None:
        whitening = whiten(gram)
    matrix = whitening.factor @ stacked if whitening is not None else stacked
    left, values, right = _svd(matrix, solver)
    return GroupSpectrum(name, list(layers), d_in, d_out, left, values, right, whitening)


def _svd(matrix: torch.Tensor, solver: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    rows, cols = matrix.shape
    if solver == "auto":
        # Diagonalising the smaller Gram side costs far less than an SVD of a wide matrix (groups of 2 are 1:2).
        solver = "eigh" if max(rows, cols) >= 1.5 * min(rows, cols) else "svd"
    if solver == "svd":
        left, values, right = torch.linalg.svd(matrix, full_matrices=False)
        return left, values, right
    if solver != "eigh":
        raise HFCompressError(f"unknown solver {solver!r}; expected 'auto', 'svd' or 'eigh'.")
    if rows <= cols:
        evals, left = torch.linalg.eigh(matrix @ matrix.T)
        evals, left = evals.flip(0), left.flip(1)
        values = evals.clamp_min(0).sqrt()
        keep = values > values[0] * 1e-12 if values.numel() else values.bool()
        left, values = left[:, keep], values[keep]
        right = (left.T @ matrix) / values[:, None]
    else:
        evals, right_t = torch.linalg.eigh(matrix.T @ matrix)
        evals, right_t = evals.flip(0), right_t.flip(1)
        values = evals.clamp_min(0).sqrt()
        keep = values > values[0] * 1e-12 if values.numel() else values.bool()
        right_t, values = right_t[:, keep], values[keep]
        left = (matrix @ right_t) / values[None, :]
        right = right_t.T
    return left, values, right


def shape_spectrum(name: str, layers: list[int], d_in: int, d_out: int) -> GroupSpectrum:
    """A stand-in spectrum with only the shapes known (flat singular values, no factors): enough to allocate ranks
    by shape alone, e.g. the uniform rule, or rank multiples spread evenly."""
    limit = min(d_in, len(layers) * d_out)
    return GroupSpectrum(name, list(layers), d_in, d_out, torch.empty(d_in, 0, dtype=torch.float64),
                         torch.ones(limit, dtype=torch.float64), torch.empty(0, len(layers) * d_out, dtype=torch.float64),
                         None)


def factors_at_rank(group: GroupSpectrum, rank: int) -> GroupFactors:
    """Truncates a group's spectrum to `rank` and maps the basis back through `S^-1`."""
    if not 1 <= rank <= group.max_rank:
        raise HFCompressError(f"rank {rank} for {group.name} layers {group.layers} is outside 1..{group.max_rank}.")
    scaled = group.left[:, :rank] * group.singular_values[:rank]
    if group.whitening is not None:
        basis = torch.linalg.solve_triangular(group.whitening.factor, scaled, upper=True)
    else:
        basis = scaled
    right = group.right[:rank]
    coefficients = [right[:, i * group.d_out : (i + 1) * group.d_out] for i in range(group.n)]
    return GroupFactors(group.name, group.layers, basis, coefficients)


def truncation_loss(group: GroupSpectrum, rank: int) -> float:
    """Whitened truncation loss of keeping `rank` components: the sum of the discarded squared singular values."""
    return float((group.singular_values[rank:] ** 2).sum())


def uniform_ranks(groups: list[GroupSpectrum], ratio: float) -> list[int]:
    """The paper's rule: each group gets `rank_for_ratio` for its own size, capped by what its matrix has."""
    return [min(rank_for_ratio(g.n, g.d_in, g.d_out, ratio), g.max_rank) for g in groups]


def params_of_ranks(groups: list[GroupSpectrum], ranks: list[int]) -> int:
    return sum(g.cost_per_rank * r for g, r in zip(groups, ranks))


def allocate_ranks(
    groups: list[GroupSpectrum],
    ratio: float,
    *,
    strategy: str = "uniform",
    multiple: int = 1,
    score: str = "relative",
) -> list[int]:
    """Ranks for every group so that the factorised parameters fit `(1 - ratio)` of the dense ones.

    `strategy="uniform"` is the paper's formula per group; `"global"` spends the whole budget on the components
    that remove the most whitened truncation loss per parameter, across every group and type. With `multiple=M`
    every rank is a multiple of M and the leftover budget is spent in chunks of M on the best groups, so the
    budget is met either way. `score="relative"` compares losses as fractions of each group's total energy
    (types differ in scale), `"absolute"` compares the raw squared singular values.
    """
    if multiple < 1:
        raise HFCompressError(f"rank multiple must be >= 1; got {multiple}.")
    budget = math.floor((1.0 - ratio) * sum(g.dense_params for g in groups))
    caps = [_rank_cap(g, multiple) for g in groups]
    if strategy == "uniform":
        ranks = [min(_round_down(r, multiple), cap) for r, cap in zip(uniform_ranks(groups, ratio), caps)]
        ranks = [max(r, min(multiple, cap)) for r, cap in zip(ranks, caps)]
        if multiple == 1:
            return _top_up_uniform(groups, ranks, caps, budget, ratio)
    elif strategy == "global":
        ranks = [min(multiple, cap) for cap in caps]
    else:
        raise HFCompressError(f"unknown rank allocation {strategy!r}; expected 'uniform' or 'global'.")
    if params_of_ranks(groups, ranks) > budget:
        raise HFCompressError(
            f"ratio {ratio} leaves too few parameters for even the smallest rank ({multiple}) in every group."
        )
    return _fill_budget(groups, ranks, caps, budget, multiple, score)


def _top_up_uniform(groups: list[GroupSpectrum], ranks: list[int], caps: list[int], budget: int, ratio: float) -> list[int]:
    """Spends what the per-group floors left over, one rank at a time, largest fractional part first.

    The floors alone can undershoot the target by up to one rank per group (many percent on small models).
    """
    exact = [g.dense_params * (1.0 - ratio) / g.cost_per_rank for g in groups]
    order = sorted(range(len(groups)), key=lambda i: exact[i] - ranks[i], reverse=True)
    ranks = list(ranks)
    spent = params_of_ranks(groups, ranks)
    for i in order:
        if ranks[i] < caps[i] and spent + groups[i].cost_per_rank <= budget:
            ranks[i] += 1
            spent += groups[i].cost_per_rank
    return ranks


def _round_down(rank: int, multiple: int) -> int:
    return (rank // multiple) * multiple


def _rank_cap(group: GroupSpectrum, multiple: int) -> int:
    # Past the break-even rank the factors cost more than the dense weights, so no allocation goes there.
    break_even = group.dense_params // group.cost_per_rank
    cap = min(group.max_rank, max(break_even, 1))
    return max(_round_down(cap, multiple), min(multiple, group.max_rank))


def _fill_budget(
    groups: list[GroupSpectrum], ranks: list[int], caps: list[int], budget: int, multiple: int, score: str
) -> list[int]:
    """Greedily adds chunks of `multiple` components where they remove the most loss per parameter."""
    energies = [float((g.singular_values**2).sum()) or 1.0 for g in groups]
    ranks = list(ranks)
    spent = params_of_ranks(groups, ranks)
    # Scores of the next chunk per group; within a group they only decrease, so one candidate per group suffices.
    def chunk_gain(i: int) -> float:
        g = groups[i]
        gain = float((g.singular_values[ranks[i] : ranks[i] + multiple] ** 2).sum())
        if score == "relative":
            gain /= energies[i]
        return gain / (g.cost_per_rank * multiple)

    heap = [(-chunk_gain(i), i) for i in range(len(groups)) if ranks[i] + multiple <= caps[i]]
    heapq.heapify(heap)
    while heap:
        _, i = heapq.heappop(heap)
        cost = groups[i].cost_per_rank * multiple
        if spent + cost > budget:
            continue  # a cheaper group may still fit
        ranks[i] += multiple
        spent += cost
        if ranks[i] + multiple <= caps[i]:
            heapq.heappush(heap, (-chunk_gain(i), i))
    return ranks


def refit_coefficients(
    basis: torch.Tensor,
    weight: torch.Tensor,
    gram_compressed: torch.Tensor,
    cross_gram: torch.Tensor,
    *,
    damping: float = 1e-6,
) -> torch.Tensor:
    r"""Least-squares coefficients for a fixed basis.

    Minimises `||X W - X_hat B C||_F^2` over `C`, where `X` are the layer's inputs in the dense model and `X_hat`
    its inputs in the compressed model: `C = (B^T X_hat^T X_hat B)^-1 B^T X_hat^T X W`.

    Args:
        basis: `B`, `d_in x k`.
        weight: `W`, `d_in x d_out`.
        gram_compressed: `X_hat^T X_hat`, `d_in x d_in`.
        cross_gram: `X_hat^T X`, `d_in x d_in`.
        damping: relative ridge added to the `k x k` system, only for numerical safety.
    """
    basis = basis.to(torch.float64)
    lhs = basis.T @ gram_compressed.to(torch.float64) @ basis
    rhs = basis.T @ (cross_gram.to(torch.float64) @ weight.to(torch.float64))
    ridge = damping * lhs.diagonal().abs().mean().clamp_min(1e-30)
    lhs = lhs + ridge * torch.eye(lhs.shape[0], dtype=lhs.dtype, device=lhs.device)
    return torch.linalg.solve(lhs, rhs)


def calibration_loss(
    basis: torch.Tensor,
    coefficients: torch.Tensor,
    weight: torch.Tensor,
    gram_dense: torch.Tensor,
    gram_compressed: torch.Tensor,
    cross_gram: torch.Tensor,
) -> float:
    """`||X W - X_hat B C||_F^2` from Grams alone (`X^T X`, `X_hat^T X_hat`, `X_hat^T X`)."""
    w = weight.to(torch.float64)
    bc = basis.to(torch.float64) @ coefficients.to(torch.float64)
    loss = (
        torch.trace(w.T @ gram_dense.to(torch.float64) @ w)
        - 2 * torch.trace(bc.T @ cross_gram.to(torch.float64) @ w)
        + torch.trace(bc.T @ gram_compressed.to(torch.float64) @ bc)
    )
    return float(loss)
