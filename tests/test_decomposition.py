"""Basis Sharing maths: rank rule, whitening, shared SVD, rank allocation, refit, eigh path."""

from __future__ import annotations

import math

import pytest
import torch

from hf_compress.basis_sharing.decomposition import (
    allocate_ranks,
    calibration_loss,
    factors_at_rank,
    make_groups,
    params_of_ranks,
    rank_for_ratio,
    refit_coefficients,
    spectrum,
    truncation_loss,
    whiten,
)
from hf_compress.errors import HFCompressError

torch.manual_seed(0)


def correlated_inputs(tokens: int, d_in: int, seed: int = 0) -> torch.Tensor:
    """Activations with a strongly non-isotropic covariance, as real hidden states have."""
    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(d_in, d_in, generator=g, dtype=torch.float64) * torch.logspace(0, -2, d_in, dtype=torch.float64)
    return torch.randn(tokens, d_in, generator=g, dtype=torch.float64) @ mixing


def weights(n: int, d_in: int, d_out: int, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(d_in, d_out, generator=g, dtype=torch.float64) for _ in range(n)]


def output_error(x: torch.Tensor, ws, factors) -> float:
    return sum(float(((x @ w - x @ factors.basis @ c) ** 2).sum()) for w, c in zip(ws, factors.coefficients))


def test_rank_formula_matches_the_paper():
    # LLaMA-7B q/k/v (4096 x 4096), groups of 2 at 20%: floor(2*4096*4096*0.8 / (4096 + 2*4096)) = 2184.
    assert rank_for_ratio(2, 4096, 4096, 0.2) == 2184
    assert rank_for_ratio(2, 4096, 4096, 0.5) == 1365
    # Group of one is SVD-LLM's per-layer rank: floor(d_in d_out (1-CR) / (d_in + d_out)).
    assert rank_for_ratio(1, 4096, 11008, 0.2) == math.floor(4096 * 11008 * 0.8 / (4096 + 11008))
    with pytest.raises(HFCompressError, match="ratio must be in"):
        rank_for_ratio(2, 8, 8, 1.0)


def test_make_groups_keeps_a_remainder_group():
    assert make_groups(5, 2) == [[0, 1], [2, 3], [4]]
    assert make_groups(4, 1) == [[0], [1], [2], [3]]
    with pytest.raises(HFCompressError, match="group size"):
        make_groups(4, 5)
    with pytest.raises(HFCompressError, match="group size"):
        make_groups(4, 0)


def test_full_rank_reconstructs_the_group_exactly():
    ws = weights(2, 12, 8)
    x = correlated_inputs(400, 12)
    spec = spectrum("q_proj", [0, 1], ws, x.T @ x)
    factors = factors_at_rank(spec, spec.max_rank)
    for w, c in zip(ws, factors.coefficients):
        torch.testing.assert_close(factors.basis @ c, w, atol=1e-9, rtol=1e-9)


def test_whitened_truncation_beats_plain_svd_on_calibration_loss():
    ws = weights(2, 16, 12)
    x = correlated_inputs(600, 16)
    whitened = factors_at_rank(spectrum("q_proj", [0, 1], ws, x.T @ x), 6)
    plain = factors_at_rank(spectrum("q_proj", [0, 1], ws, None), 6)
    assert output_error(x, ws, whitened) < 0.8 * output_error(x, ws, plain)


def test_whitened_loss_equals_discarded_singular_values():
    ws = weights(2, 10, 6)
    x = correlated_inputs(300, 10)
    spec = spectrum("gate_proj", [0, 1], ws, x.T @ x)
    for rank in (1, 4, 7):
        assert output_error(x, ws, factors_at_rank(spec, rank)) == pytest.approx(truncation_loss(spec, rank), rel=1e-8)


def test_group_of_one_equals_svd_llm():
    """Independent SVD-LLM: S = chol(X^T X)^T, SVD(S W), W' = S^-1 U_k S_k V_k^T."""
    (w,) = weights(1, 14, 9)
    x = correlated_inputs(500, 14)
    s = torch.linalg.cholesky(x.T @ x).T
    u, sv, vh = torch.linalg.svd(s @ w)
    k = 5
    reference = torch.linalg.inv(s) @ u[:, :k] @ torch.diag(sv[:k]) @ vh[:k]
    factors = factors_at_rank(spectrum("o_proj", [3], [w], x.T @ x), k)
    torch.testing.assert_close(factors.basis @ factors.coefficients[0], reference, atol=1e-8, rtol=1e-8)


def test_shared_basis_is_optimal_over_the_group():
    """The shared solution has lower summed loss than using either layer's own optimal basis for both."""
    ws = weights(2, 12, 8)
    x = correlated_inputs(400, 12)
    shared = factors_at_rank(spectrum("q_proj", [0, 1], ws, x.T @ x), 5)
    own = factors_at_rank(spectrum("q_proj", [0], ws[:1], x.T @ x), 5)
    # Best coefficients for layer 1 given layer 0's basis (least squares on the whitened problem).
    coeff_1 = torch.linalg.lstsq(x @ own.basis, x @ ws[1]).solution
    borrowed = type(shared)("q_proj", [0, 1], own.basis, [own.coefficients[0], coeff_1])
    assert output_error(x, ws, shared) < output_error(x, ws, borrowed)


def test_singular_gram_gets_smallest_shift_and_is_reported():
    x = correlated_inputs(5, 12)  # 5 tokens: rank-5 Gram of size 12
    gram = x.T @ x
    result = whiten(gram)
    assert result.shift > 0
    torch.testing.assert_close(result.factor.T @ result.factor, gram + result.shift * torch.eye(12, dtype=torch.float64))
    # Small relative to the Gram's scale: just past its lowest eigenvalue.
    assert result.shift < 1e-6 * gram.diagonal().mean()
    # A positive definite Gram is left alone.
    x = correlated_inputs(200, 12)
    assert whiten(x.T @ x).shift == 0.0
    # And the decomposition still works on the singular one.
    spec = spectrum("q_proj", [0], weights(1, 12, 4), gram)
    assert torch.isfinite(factors_at_rank(spec, 3).basis).all()


def test_nan_gram_is_reported():
    gram = torch.eye(4, dtype=torch.float64)
    gram[1, 1] = float("nan")
    with pytest.raises(HFCompressError, match="NaN or inf"):
        whiten(gram)
    bad = weights(1, 4, 4)
    bad[0][0, 0] = float("inf")
    with pytest.raises(HFCompressError, match=r"q_proj of layer\(s\) \[7\] has NaN or inf weights"):
        spectrum("q_proj", [7], bad, None)


@pytest.mark.parametrize("shape", [(12, 40), (40, 12), (16, 16)])
def test_eigh_path_matches_svd_up_to_sign(shape):
    d_in, width = shape
    ws = [torch.randn(d_in, width, dtype=torch.float64)]
    x = correlated_inputs(300, d_in)
    svd = spectrum("up_proj", [0], ws, x.T @ x, solver="svd")
    eig = spectrum("up_proj", [0], ws, x.T @ x, solver="eigh")
    k = min(shape) - 2
    torch.testing.assert_close(eig.singular_values[:k], svd.singular_values[:k], atol=1e-8, rtol=1e-8)
    signs = torch.sign((eig.left[:, :k] * svd.left[:, :k]).sum(0))
    assert torch.all(signs.abs() == 1)
    torch.testing.assert_close(eig.left[:, :k] * signs, svd.left[:, :k], atol=1e-7, rtol=1e-6)
    torch.testing.assert_close(eig.right[:k] * signs[:, None], svd.right[:k], atol=1e-7, rtol=1e-6)
    a, b = factors_at_rank(svd, k), factors_at_rank(eig, k)
    torch.testing.assert_close(a.basis @ a.coefficients[0], b.basis @ b.coefficients[0], atol=1e-7, rtol=1e-6)


def spectra_for_allocation():
    specs = []
    for i, (n, d_in, d_out) in enumerate([(2, 24, 24), (2, 24, 8), (1, 24, 24), (1, 40, 24), (2, 24, 40)]):
        x = correlated_inputs(300, d_in, seed=i)
        specs.append(spectrum(f"p{i}", list(range(n)), weights(n, d_in, d_out, seed=10 + i), x.T @ x))
    return specs


@pytest.mark.parametrize("ratio", [0.2, 0.35, 0.5])
def test_uniform_allocation_lands_on_target(ratio):
    specs = spectra_for_allocation()
    ranks = allocate_ranks(specs, ratio)
    dense = sum(s.dense_params for s in specs)
    budget = math.floor((1 - ratio) * dense)
    assert params_of_ranks(specs, ranks) <= budget
    # Within one rank of the cheapest group of the budget.
    assert budget - params_of_ranks(specs, ranks) < min(s.cost_per_rank for s in specs)
    formula = [rank_for_ratio(s.n, s.d_in, s.d_out, ratio) for s in specs]
    assert all(r - f in (0, 1) for r, f in zip(ranks, formula))


@pytest.mark.parametrize("ratio", [0.2, 0.5])
def test_global_allocation_hits_budget_and_lowers_loss(ratio):
    specs = spectra_for_allocation()
    dense = sum(s.dense_params for s in specs)
    budget = math.floor((1 - ratio) * dense)
    ranks = allocate_ranks(specs, ratio, strategy="global", score="absolute")
    spent = params_of_ranks(specs, ranks)
    assert spent <= budget and budget - spent < min(s.cost_per_rank for s in specs)
    uniform = allocate_ranks(specs, ratio)
    total = lambda rs: sum(truncation_loss(s, r) for s, r in zip(specs, rs))  # noqa: E731
    assert total(ranks) <= total(uniform)
    assert ranks != uniform


def test_rank_multiple_keeps_the_budget():
    specs = spectra_for_allocation()
    for strategy in ("uniform", "global"):
        ranks = allocate_ranks(specs, 0.3, strategy=strategy, multiple=4)
        assert all(r % 4 == 0 and r >= 4 for r in ranks)
        budget = math.floor(0.7 * sum(s.dense_params for s in specs))
        spent = params_of_ranks(specs, ranks)
        assert spent <= budget and budget - spent < 4 * min(s.cost_per_rank for s in specs)


def test_refit_never_increases_calibration_loss():
    ws = weights(2, 12, 8)
    x = correlated_inputs(400, 12)
    factors = factors_at_rank(spectrum("q_proj", [0, 1], ws, x.T @ x), 4)
    # The compressed model's inputs drift away from the dense ones.
    x_hat = x + 0.3 * correlated_inputs(400, 12, seed=5)
    for w, c in zip(ws, factors.coefficients):
        grams = (x.T @ x, x_hat.T @ x_hat, x_hat.T @ x)
        before = calibration_loss(factors.basis, c, w, *grams)
        refit = refit_coefficients(factors.basis, w, grams[1], grams[2])
        after = calibration_loss(factors.basis, refit, w, *grams)
        # Loss from Grams equals the loss computed on the activations themselves.
        assert before == pytest.approx(float(((x @ w - x_hat @ factors.basis @ c) ** 2).sum()), rel=1e-9)
        assert after <= before
        assert after < 0.99 * before  # strictly better here, since the inputs drifted
        # And it is the least-squares optimum: an independent lstsq on the activations agrees.
        reference = torch.linalg.lstsq(x_hat @ factors.basis, x @ w).solution
        torch.testing.assert_close(refit, reference, atol=1e-5, rtol=1e-4)
