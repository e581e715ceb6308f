"""Denoiser classes, metrics and the backend registry."""
import pytest
import torch

import analytic_diffusion as ad
from analytic_diffusion import registry as _registry

from spec_dense import noisy_queries, unit


def test_locality_denoiser_uses_cached_masks_and_the_op(crops, crop_moments):
    den = ad.LocalityDenoiser(crops[:200], moments=crop_moments, threshold=0.02)
    ab = ad.alpha_bar_at(100)
    x = noisy_queries(crops[200:202], ab).float()
    out = den(x, torch.tensor(100))
    M = den.mask(100)
    assert den.mask(100) is M  # cached
    ref = ad.ops.locality_denoise(x, crops[:200], M, ab)
    assert out.dtype == torch.float32 and torch.equal(out, ref)


def test_masks_stored_packed_and_prepared_once(crops, crop_moments, monkeypatch, restore_registry):
    den = ad.LocalityDenoiser(crops[:200], moments=crop_moments, threshold=0.02)
    n = crops[0].numel()
    ts = ad.ddim_timesteps(5)
    seen = []

    def fake(x, train, mask, *args):
        return torch.zeros_like(x)

    _registry.register("locality_denoise", "fake", fake, priority=-1, prepare=lambda mask: seen.append(mask.clone()))
    den.backend = "fake"
    den.prepare(ts)
    assert len(seen) == len(ts)
    for t, m in zip(ts, seen):
        assert torch.equal(m, den.filter.mask(ad.alpha_bar_at(t), 0.02))  # unpacking is lossless
        assert torch.equal(den.mask(t), m)
    assert den.mask_bytes() == len(ts) * n * ((n + 7) // 8)  # bit-packed, not n*n bool or float


def test_locality_denoiser_estimates_moments_when_none_given(crops):
    den = ad.LocalityDenoiser(crops[:50])
    ref = ad.estimate_moments(crops[:50])
    assert torch.equal(den.moments.cov, ref.cov)


def test_high_noise_locality_equals_optimal(crops, crop_moments):
    # at t = 900 every window is the whole image (docs/algorithms.md §4.2): locality is the optimal denoiser
    den = ad.LocalityDenoiser(crops[:200], moments=crop_moments)
    assert den.mask(900).all()
    x = noisy_queries(crops[200:203], ad.alpha_bar_at(900))
    assert (den(x, 900) - ad.OptimalDenoiser(crops[:200])(x, 900)).abs().max().item() < 1e-12


def test_nearest_returns_training_images(crops):
    den = ad.NearestDenoiser(crops[:30])
    x = noisy_queries(crops[:3], ad.alpha_bar_at(10)).float()
    out = den(x, 10)
    assert (out - unit(crops[:3]).float()).abs().max().item() < 1e-6


def test_metrics_against_hand_computation():
    target = torch.tensor([[1.0, 2.0, 3.0, 4.0], [0.0, 0.0, 1.0, 1.0]])
    pred = torch.tensor([[1.0, 2.0, 3.0, 5.0], [0.0, 1.0, 1.0, 1.0]])
    # sample 0: sse 1, var_unbiased 5/3 -> 1 - 1/(4*5/3) = 0.85 ; sample 1: sse 1, var 1/3 -> 1 - 1/(4/3) = 0.25
    assert ad.r2(pred, target).item() == pytest.approx((0.85 + 0.25) / 2, abs=1e-12)
    assert ad.r2(pred, target, reduction="none").tolist() == pytest.approx([0.85, 0.25])
    assert ad.mse(pred, target).item() == pytest.approx(0.25)
    assert ad.r2(target, target).item() == 1.0
    # a constant target counts its variance as 1: sse 2 over n = 4 -> 1 - 2/4, finite (not -inf)
    flat = torch.full((1, 4), 0.3, dtype=torch.float64)
    assert ad.r2(flat + torch.tensor([[1.0, 1.0, 0.0, 0.0]], dtype=torch.float64), flat).item() == pytest.approx(0.5, abs=1e-12)
    assert ad.r2(flat, flat).item() == 1.0
    with pytest.raises(ValueError, match="same shape"):
        ad.r2(pred[:1], target)


@pytest.mark.parametrize("fn", [ad.r2, ad.mse])
@pytest.mark.parametrize("reduction", ["sum", "Mean", "", None, 1])
def test_metrics_reject_unknown_reduction(fn, reduction):
    """Review: an unknown reduction returned the per-sample tensor silently."""
    x = torch.rand(3, 4)
    with pytest.raises(ValueError, match="reduction must be one of"):
        fn(x, x + 0.1, reduction=reduction)


def test_registry_selection_order(monkeypatch, restore_registry):
    calls = []
    _registry.register("toy_op", "slow", lambda: calls.append("slow"), priority=0)
    _registry.register("toy_op", "fast", lambda: calls.append("fast"), priority=10, devices=("cuda",))
    _registry.register("toy_op", "broken", lambda: None, priority=20, is_available=lambda: 1 / 0)
    assert ad.available_backends("toy_op", "cpu") == ["slow"]
    assert ad.available_backends("toy_op") == ["fast", "slow"]
    assert _registry.select("toy_op", "cpu").name == "slow"
    assert _registry.select("toy_op", "cuda").name == "fast"
    monkeypatch.setenv(_registry.ENV_VAR, "slow")
    assert _registry.select("toy_op", "cuda").name == "slow"
    assert _registry.select("toy_op", "cuda", backend="fast").name == "fast"  # argument beats env
    monkeypatch.setenv(_registry.ENV_VAR, "toy_op=fast,other=x")
    with pytest.raises(ValueError, match=f"environment variable {_registry.ENV_VAR}='fast': .*does not run on cpu"):
        _registry.select("toy_op", "cpu")
    monkeypatch.setenv(_registry.ENV_VAR, "cpu")  # a global name the op lacks is ignored
    assert _registry.select("toy_op", "cpu").name == "slow"
    with pytest.raises(RuntimeError, match="not available"):
        _registry.select("toy_op", "cpu", backend="broken")
    assert _registry.registered_backends("toy_op") == ["broken", "fast", "slow"]  # usable or not
    with pytest.raises(ValueError, match="unknown op"):
        ad.available_backends("no_such_op")


def test_reference_registered_for_every_op():
    for op in ("locality_denoise", "optimal_denoise", "nearest_denoise", "moments"):
        assert "reference" in ad.available_backends(op, "cpu")


def test_wiener_denoiser_shares_a_filter():
    x0 = torch.randint(0, 256, (300, 2, 4, 4), generator=torch.Generator().manual_seed(3), dtype=torch.uint8)
    m = ad.estimate_moments(x0)
    f = ad.WienerFilter(m)
    shared = ad.WienerDenoiser(f)
    assert shared.filter is f  # no second eigendecomposition
    xt = torch.randn(3, 2, 4, 4, dtype=torch.float64)
    assert torch.equal(shared(xt, 500), ad.WienerDenoiser(m)(xt, 500))
    with pytest.raises(ValueError, match="n = 32"):
        shared(torch.randn(3, 2, 4, 5, dtype=torch.float64), 500)
    with pytest.raises(TypeError, match="Moments or WienerFilter"):
        ad.WienerDenoiser(m.cov)
    assert f.to("cpu") is f


def _entry_points():
    """Every place float training data enters, as (name, call(data))."""
    x = torch.zeros(2, 3, 4, 4)
    return [
        ("ops.optimal_denoise", lambda d: ad.ops.optimal_denoise(x, d, 0.5)),
        ("ops.nearest_denoise", lambda d: ad.ops.nearest_denoise(x, d, 0.5)),
        ("ops.locality_denoise", lambda d: ad.ops.locality_denoise(x, d, torch.ones(48, 48, dtype=torch.bool), 0.5)),
        ("OptimalDenoiser", lambda d: ad.OptimalDenoiser(d)),
        ("NearestDenoiser", lambda d: ad.NearestDenoiser(d)),
        ("LocalityDenoiser", lambda d: ad.LocalityDenoiser(d)),
        ("estimate_moments", lambda d: ad.estimate_moments(d)),
        ("MomentAccumulator.update", lambda d: ad.MomentAccumulator((3, 4, 4)).update(d)),
        ("estimate_patch_moments", lambda d: ad.estimate_patch_moments(d, 3)),
    ]


@pytest.mark.parametrize("name, call", _entry_points(), ids=[n for n, _ in _entry_points()])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_float_data_outside_unit_range_is_refused(crops, name, call, dtype, tmp_path):
    """Review: float data in [0, 255] (a float .npy) was accepted and gave white samples.
    Float images must be in [-1, 1] up to rounding; the error names the fix."""
    pixels = crops[:20, :, :4, :4].to(dtype)  # 0..255 as floats
    with pytest.raises(ValueError, match=r"must be in \[-1, 1\].*divide by 127.5 and subtract 1"):
        call(pixels)
    with pytest.raises(ValueError, match=r"must be in \[-1, 1\]"):
        call((pixels / 255).to(dtype) * 1.01)  # [0, 1.01]: not rounding any more
    ok = ((crops[:20, :, :4, :4].double() - 127.5) / 127.5 * (1 + 5e-4)).to(dtype)  # within rounding
    call(ok)


def test_float_npy_of_pixels_is_refused_by_the_denoiser(crops, tmp_path):
    import numpy as np

    path = tmp_path / "train.npy"
    np.save(path, crops[:20].numpy().astype(np.float32))
    with pytest.raises(ValueError, match=r"float32 with values in \[\d.*255\].*divide by 127.5 and subtract 1"):
        ad.NearestDenoiser(str(path))
    with pytest.raises(ValueError, match=r"divide by 127.5 and subtract 1"):
        ad.estimate_moments(str(path))
