"""Wiener filter (docs/algorithms.md §3) and locality mask (docs/algorithms.md §4) against dense float64 formulas."""
import math

import pytest
import torch

import analytic_diffusion as ad
from analytic_diffusion.filters import mask_from_wiener_matrix


def dense_wiener(cov, ab):
    n = cov.shape[0]
    return ab * cov @ torch.linalg.inv(ab * cov + (1 - ab) * torch.eye(n, dtype=torch.float64))


def dense_mask(A, thr):
    d = A.diagonal().clone()
    d = torch.where(d.abs() < 1e-6, torch.ones_like(d), d)
    Mt = torch.stack([A[i] / d[i] for i in range(A.shape[0])])
    return Mt if thr <= 0 else (Mt.abs() >= thr * Mt.abs().max())


@pytest.mark.parametrize("t", [999, 500, 50, 0])
def test_eigenbasis_filter_equals_dense_formula(t, crop_moments):
    ab = ad.alpha_bar_at(t)
    A = ad.wiener_matrix(crop_moments, ab)
    ref = dense_wiener(crop_moments.cov, ab)
    assert A.dtype == torch.float64 and A.shape == (768, 768)
    assert (A - ref).abs().max().item() < 1e-9


def test_apply_equals_dense_denoiser_and_jacobian(crop_moments, crops):
    f = ad.WienerFilter(crop_moments)
    ab = ad.alpha_bar_at(300)
    a = math.sqrt(ab)
    x = (a * (crops[200:203].double() / 127.5 - 1) + math.sqrt(1 - ab) * torch.randn(3, 3, 16, 16, dtype=torch.float64))
    A = dense_wiener(crop_moments.cov, ab)
    mu = crop_moments.mean
    ref = x.reshape(3, -1) @ A.T / a + mu @ (torch.eye(768, dtype=torch.float64) - A).T
    out = f.apply(x, ab)
    assert out.shape == x.shape and (out.reshape(3, -1) - ref).abs().max().item() < 1e-9
    # sensitivity fields are Jacobian rows: check against autograd
    pixels = [0, 100, 767]
    J = torch.autograd.functional.jacobian(lambda v: f.apply(v[None], ab)[0], x[0].reshape(-1))
    S = f.sensitivity(ab, pixels)
    assert S.shape == (3, 3, 16, 16)
    assert (S.reshape(3, -1) - J[pixels]).abs().max().item() < 1e-9
    den = ad.WienerDenoiser(crop_moments)
    assert torch.allclose(den(x, 300), out, atol=0, rtol=0)
    assert torch.equal(den.sensitivity(300, pixels), S)


def test_eigenvalues_clamped_for_low_rank_covariance():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(5, 40, generator=g, dtype=torch.float64)
    cov = torch.cov(X.T)  # rank 4, eigenvalues ~ -1e-16 present
    f = ad.WienerFilter(cov)
    assert (f.lam >= 0).all()
    assert (ad.wiener_matrix(cov, 0.5) - dense_wiener(cov + 0 * cov, 0.5)).abs().max().item() < 1e-8


@pytest.mark.parametrize("thr", [0.02, 0.05, 0.0, -1.0])
@pytest.mark.parametrize("t", [900, 400, 100, 10])
def test_mask_equals_spec(thr, t, crop_moments, crop_filter):
    ab = ad.alpha_bar_at(t)
    M = ad.locality_mask(crop_filter, ab, threshold=thr)
    ref = dense_mask(dense_wiener(crop_moments.cov, ab), thr)
    if thr > 0:
        assert M.dtype == torch.bool
        # entries exactly at the threshold may flip with rounding; there are none in practice
        assert (M != ref).sum().item() <= 2
        assert M.diagonal().all()
    else:
        assert M.dtype == torch.float64 and (M - ref).abs().max().item() < 1e-8


def test_mask_shrinks_as_noise_falls(crop_filter):
    sizes = [ad.locality_mask(crop_filter, ad.alpha_bar_at(t)).float().mean().item() for t in (900, 500, 100, 10)]
    assert sizes[0] > 0.9 and sizes[-1] < 0.2
    assert all(a >= b for a, b in zip(sizes, sizes[1:]))


def test_tiny_diagonal_replaced_by_one():
    A = torch.tensor([[1e-9, 0.5], [0.5, 2.0]], dtype=torch.float64)
    Mt = mask_from_wiener_matrix(A, 0.0)
    assert Mt[0, 1].item() == 0.5 and Mt[1, 0].item() == 0.25


def test_bad_covariance():
    with pytest.raises(ValueError, match="square"):
        ad.WienerFilter(torch.zeros(3, 4))
    with pytest.raises(ValueError, match="NaN/Inf"):
        ad.WienerFilter(torch.full((3, 3), float("nan")))
    with pytest.raises(ValueError, match="alpha_bar"):
        ad.wiener_matrix(torch.eye(3), 1.5)
    with pytest.raises(ValueError, match="pixels"):
        ad.WienerFilter(torch.eye(3)).sensitivity(0.5, [3])


@pytest.mark.parametrize("threshold, error", [(float("nan"), ValueError), (float("inf"), ValueError), (-float("inf"), ValueError), (torch.tensor(float("nan")), ValueError), ("0.02", TypeError), (True, TypeError), (None, TypeError)])
def test_bad_threshold_is_refused_everywhere(crops, crop_moments, threshold, error):
    """Review: a NaN threshold compared False everywhere, emptying every window silently
    (every pixel then averaged the whole training set)."""
    f = ad.WienerFilter(crop_moments)
    match = "threshold must be"
    with pytest.raises(error, match=match):
        ad.locality_mask(crop_moments, 0.5, threshold=threshold)
    with pytest.raises(error, match=match):
        f.mask(0.5, threshold)
    with pytest.raises(error, match=match):
        mask_from_wiener_matrix(f.matrix(0.5), threshold)
    with pytest.raises(error, match=match):
        ad.LocalityDenoiser(crops[:20], moments=crop_moments, threshold=threshold)
    pm = ad.estimate_patch_moments(crops[:20], 3)
    with pytest.raises(error, match=match):
        ad.WindowedWiener(pm).mask(0.5, threshold)
    with pytest.raises(error, match=match):
        ad.WindowedWienerDenoiser(pm).mask(500, threshold=threshold)
    if threshold is not None:  # None: the denoiser's own threshold
        with pytest.raises(error, match=match):
            ad.LocalityDenoiser(crops[:20], moments=crop_moments).mask(500, threshold=threshold)
    with pytest.raises(error, match=match):
        ad.LocalityDenoiser(crops[:20], moments=pm, threshold=threshold)


def test_finite_thresholds_still_work(crop_moments):
    f = ad.WienerFilter(crop_moments)
    assert f.mask(0.5, 0.02).dtype == torch.bool
    assert f.mask(0.5, 0).dtype == torch.float64  # <= 0: real-valued weights
    assert torch.equal(f.mask(0.5, torch.tensor(0.02)), f.mask(0.5, 0.02))
    import numpy as np

    assert torch.equal(f.mask(0.5, np.float32(0.02)), f.mask(0.5, float(np.float32(0.02))))
