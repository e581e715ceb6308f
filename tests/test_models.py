"""The other analytical models against dense float64 transcriptions of their definitions (docs/algorithms.md §10-§13)
(spec_dense_models.py) on real crops, at DDIM steps down to t <= 20:
smoothed closed-form (§11), GoldDiff screening (§12), PSPC-square (§13)."""
import math

import pytest
import torch

import analytic_diffusion as ad
from analytic_diffusion.denoisers.screening import pool_factor
from analytic_diffusion.ops import nearest_topk, patch_posterior_denoise
from spec_dense import noisy_queries, unit
from spec_dense_models import dense_golddiff, dense_golddiff_survivors, dense_optimal, dense_pspc_square, dense_scfdm

STEPS = [900, 500, 200, 50, 20, 10, 0]


def rel(out, ref):
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


@pytest.fixture(scope="module")
def small():
    crops = ad.data.natural_crops(90, size=8, seed=5)  # real images: uint8 [90, 3, 8, 8]
    return crops[:80], crops[80:]


# ----------------------------------------------------------------------------- PSPC-square (§13)


@pytest.mark.parametrize("t", STEPS)
@pytest.mark.parametrize("backend", ["reference", "boxsum"])
def test_pspc_matches_dense_transcription(small, t, backend):
    train, held = small
    ab = ad.alpha_bar_at(t)
    x = noisy_queries(held[:3], ab, seed=t)
    for P in (1, 3, 6, 8):
        want = dense_pspc_square(x, unit(train), P, ab)
        got = patch_posterior_denoise(x, train, P, ab, backend=backend)
        assert got.shape == x.shape and got.dtype == torch.float64
        assert rel(got, want) < 1e-8, (P, rel(got, want))


@pytest.mark.parametrize("t", [500, 20, 0])
def test_pspc_float32_queries_float_train_and_chunking(small, t):
    train, held = small
    ab = ad.alpha_bar_at(t)
    x = noisy_queries(held[:3], ab, seed=t)
    want = dense_pspc_square(x, unit(train), 3, ab, tau=0.7)
    got = patch_posterior_denoise(x.float(), unit(train).float(), 3, ab, temperature=0.7, chunk_size=7)
    assert got.dtype == torch.float32 and rel(got, want) < 1e-6
    # the boxsum backend without its logit cache (recomputed in pass 2) gives the same
    import analytic_diffusion.ops.patch_posterior.boxsum as bs

    old = bs._CACHE_VALUES
    bs._CACHE_VALUES = 0
    try:
        assert rel(patch_posterior_denoise(x, train, 3, ab, chunk_size=9, temperature=0.7), want) < 1e-8
    finally:
        bs._CACHE_VALUES = old


@pytest.mark.skipif(not ad.ops.windowed_locality.cpu.available(), reason="compiled _C without the windowed kernel")
@pytest.mark.parametrize("t", STEPS)
def test_pspc_windowed_backend(small, t):
    """The ``windowed`` backend (the windowed locality kernel on P*P*C shifted channels) against
    the dense transcription: RGB P = 1, 3; grayscale P = 5; odd image sizes; float32 and
    non-contiguous queries; P it does not take (even, whole image, too many channels) go to boxsum."""
    from analytic_diffusion.ops.patch_posterior import windowed as pw

    train, held = small
    ab = ad.alpha_bar_at(t)
    x = noisy_queries(held[:3], ab, seed=t)
    assert ad.available_backends("patch_posterior_denoise", "cpu")[0] == "windowed"
    for P in (1, 3, 4, 5, 8):  # 4: even, 5: 75 channels, 8: the whole image -> boxsum
        want = dense_pspc_square(x, unit(train), P, ab)
        got = patch_posterior_denoise(x, train, P, ab, backend="windowed")
        assert got.shape == x.shape and got.dtype == torch.float64 and rel(got, want) < 1e-8, (P, rel(got, want))
    # odd sizes, one channel (P = 5: 25 shifted channels, through the kernel), float32, a transposed view
    g = ad.data.natural_crops(50, size=9, seed=2)[:, :1, :, :7]  # [50, 1, 9, 7]
    xg = noisy_queries(g[:2], ab, seed=t + 1)
    for P in (3, 5):
        assert 1 * P * P <= pw.MAX_CHANNELS
        want = dense_pspc_square(xg, unit(g[2:]), P, ab)
        assert rel(patch_posterior_denoise(xg, g[2:], P, ab, backend="windowed"), want) < 1e-8
        got32 = patch_posterior_denoise(xg.float(), unit(g[2:]).float(), P, ab, temperature=1.0, backend="windowed")
        assert got32.dtype == torch.float32 and rel(got32, want) < 1e-6
    xt = x.transpose(2, 3)  # non-contiguous
    want = dense_pspc_square(xt.contiguous(), unit(train.transpose(2, 3)), 3, ab, tau=0.7)
    before = xt.clone()
    got = patch_posterior_denoise(xt, train.transpose(2, 3), 3, ab, temperature=0.7, backend="windowed")
    assert rel(got, want) < 1e-8 and torch.equal(xt, before)


def test_pspc_denoiser_schedules(small):
    train, held = small
    # the published CIFAR-10 schedule mapped to DDIM steps by nearest sigma
    sched = ad.denoisers.pspc_schedule("cifar10")
    assert [sched[t] for t in range(900, -1, -100)] == [32, 32, 32, 23, 15, 11, 7, 5, 3, 3]
    assert len(sched) == 1000 and sched[999] == 32
    den = ad.PSPCSquareDenoiser(train, "cifar10")  # 8 x 8 images: 32 is clamped to 8
    assert den.patch_size_at(900) == 8 and den.patch_size_at(300) == 7 and den.patch_size_at(10) == 3
    for t in (900, 300, 20, 0):
        ab = ad.alpha_bar_at(t)
        x = noisy_queries(held[:2], ab, seed=t)
        assert rel(den(x, t), dense_pspc_square(x, unit(train), den.patch_size_at(t), ab)) < 1e-8
    # P = the image size is the optimal denoiser
    x = noisy_queries(held[:2], ad.alpha_bar_at(300), seed=1)
    assert rel(den(x, 900), ad.OptimalDenoiser(train, backend="reference")(x, 900)) < 1e-10
    # mappings: exact keys, else the nearest key; flat [B, n] queries
    den = ad.PSPCSquareDenoiser(train, {900: 8, 500: 5, 0: 3}, backend="reference")
    assert [den.patch_size_at(t) for t in (999, 900, 701, 699, 500, 250, 249, 0)] == [8, 8, 8, 5, 5, 3, 3, 3]
    flat = x.reshape(2, -1)
    assert torch.equal(den(flat, 250).reshape(x.shape), den(x, 250))
    # an int, and sampling
    den = ad.PSPCSquareDenoiser(train, 3)
    s = ad.sample(den, 2, (3, 8, 8), steps=4, seed=0)
    assert s.shape == (2, 3, 8, 8) and torch.isfinite(s).all()


def test_pspc_bad_input(small):
    train, _ = small
    for bad, err in [(0, ValueError), (9, ValueError), (2.5, TypeError), ("imagenet", ValueError), ({}, ValueError), ({500: 12}, ValueError), (True, TypeError)]:
        with pytest.raises(err, match="patch_size"):
            ad.PSPCSquareDenoiser(train, bad)
    with pytest.raises(ValueError, match="train must be"):
        ad.PSPCSquareDenoiser(train.reshape(80, -1), 3)
    with pytest.raises(ValueError, match=r"x must be \[B, C, H, W\]"):
        patch_posterior_denoise(torch.zeros(1, 192), train, 3, 0.5)
    with pytest.raises(ValueError, match="temperature"):
        ad.PSPCSquareDenoiser(train, 3, temperature=0)


# ---------------------------------------------------------------------- smoothed closed-form (§11)


def test_nearest_topk_matches_argsort(small):
    train, held = small
    for t in (900, 200, 10):
        ab = ad.alpha_bar_at(t)
        x = noisy_queries(held[:4], ab, seed=t).reshape(4, -1)
        idx, d = nearest_topk(x, train, ab, 7, chunk_size=9)
        want = torch.argsort(((x[:, None] / math.sqrt(ab) - unit(train).reshape(80, -1)) ** 2).sum(-1), dim=1, stable=True)[:, :7]
        assert torch.equal(idx, want)
        assert torch.allclose(d, ((x[:, None] - math.sqrt(ab) * unit(train).reshape(80, -1)[idx]) ** 2).sum(-1), rtol=1e-12)
    assert nearest_topk(x, train, ab, 500)[0].shape == (4, 80)  # k clamped to N


@pytest.mark.parametrize("t", STEPS)
@pytest.mark.parametrize("top_k", [10, None])
def test_scfdm_matches_dense_transcription(small, t, top_k):
    train, held = small
    ab = ad.alpha_bar_at(t)
    x = noisy_queries(held[:3], ab, seed=t)
    den = ad.SmoothedCFDMDenoiser(train, num_smoothing=3, smoothing=0.1, top_k=top_k, seed=11, backend="reference" if top_k else None)
    xi = torch.randn((3, 3, 192), generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    want = dense_scfdm(x.reshape(3, -1), unit(train).reshape(80, -1), ab, xi, 0.1, top_k)
    got = den(x, t)
    assert got.shape == x.shape and got.dtype == torch.float64
    assert rel(got.reshape(3, -1), want) < 1e-8


def test_scfdm_draws_reductions_and_presets(small):
    train, held = small
    ab = ad.alpha_bar_at(200)
    x = noisy_queries(held[:2], ab, seed=0)
    g = torch.Generator().manual_seed(4)
    den = ad.SmoothedCFDMDenoiser(train, num_smoothing=2, smoothing=0.5, top_k=5, generator=g)
    ref = torch.Generator().manual_seed(4)
    for _ in range(2):  # consecutive calls: consecutive draws of the generator
        xi = torch.randn((2, 2, 192), generator=ref, dtype=torch.float64)
        want = dense_scfdm(x.reshape(2, -1), unit(train).reshape(80, -1), ab, xi, 0.5, 5)
        assert rel(den(x, 200).reshape(2, -1), want) < 1e-8
    # s = 0, M = 1, k = N: the optimal denoiser; float32 queries keep their dtype
    den = ad.SmoothedCFDMDenoiser(train, num_smoothing=1, smoothing=0.0, top_k=80)
    assert rel(den(x, 200), dense_optimal(x.reshape(2, -1), unit(train).reshape(80, -1), ab).reshape(x.shape)) < 1e-10
    assert den(x.float(), 200).dtype == torch.float32
    den = ad.SmoothedCFDMDenoiser.from_preset(train, "mnist")
    assert (den.num_smoothing, den.smoothing, den.top_k, den.temperature) == (10, 1.0, 200, 1.0)
    assert ad.SmoothedCFDMDenoiser.from_preset(train, "cifar10", top_k=None).top_k is None
    s = ad.sample(ad.SmoothedCFDMDenoiser(train, num_smoothing=2, top_k=8), 2, (3, 8, 8), steps=4, seed=0)
    assert s.shape == (2, 3, 8, 8) and torch.isfinite(s).all()


def test_scfdm_bad_input(small):
    train, _ = small
    for kw, match in [({"num_smoothing": 0}, "num_smoothing"), ({"smoothing": -1}, "smoothing"), ({"smoothing": float("inf")}, "smoothing"),
                      ({"top_k": 0}, "top_k"), ({"top_k": 2.5}, "top_k"), ({"temperature": -1}, "temperature"), ({"seed": -3}, "seed"),
                      ({"generator": 5}, "generator")]:
        with pytest.raises((ValueError, TypeError), match=match):
            ad.SmoothedCFDMDenoiser(train, **kw)
    with pytest.raises(ValueError, match="dataset"):
        ad.SmoothedCFDMDenoiser.from_preset(train, "imagenet")


# ------------------------------------------------------------------------- GoldDiff screening (§12)


@pytest.fixture(scope="module")
def crops16(crop_moments):
    crops = ad.data.natural_crops(124, size=16, seed=7)
    return crops[:120], crops[120:], crop_moments


@pytest.mark.parametrize("t", STEPS)
def test_golddiff_matches_dense_transcription(crops16, t):
    train, held, moments = crops16
    ab = ad.alpha_bar_at(t)
    opts = {"k_min": 10, "k_max": 30, "pool_factor": 2, "seed": 3}
    den = ad.LocalityDenoiser(train, moments, threshold=0.03, screening="golddiff", screening_options=opts)
    x = noisy_queries(held[:3], ab, seed=t)
    r = torch.rand((3, 120), generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    M = den.mask(t).double()
    want = dense_golddiff(x.reshape(3, -1), unit(train).reshape(120, -1), (3, 16, 16), M, ab, r, 10, 30, 2)
    got = den(x, t)
    assert got.shape == x.shape and got.dtype == torch.float64
    assert rel(got.reshape(3, -1), want) < 1e-8
    # the survivors themselves
    keep = ad.LocalityDenoiser(train, moments, threshold=0.03, screening="golddiff", screening_options=opts).screening.select(x.reshape(3, -1), train, ab)
    want_keep, m, k_t = dense_golddiff_survivors(x.reshape(3, -1), unit(train).reshape(120, -1), (3, 16, 16), ab, r, 10, 30, 2)
    assert keep.shape == (3, k_t) and all(torch.equal(keep[b], want_keep[b]) for b in range(3))


def test_golddiff_full_budget_is_exact_and_reports_error(crops16):
    train, held, moments = crops16
    exact = ad.LocalityDenoiser(train, moments)
    full = ad.LocalityDenoiser(train, moments, screening="golddiff", screening_options={"k_min": 120, "k_max": 120, "record_error": True})
    for t in (900, 200, 10):
        x = noisy_queries(held[:2], ad.alpha_bar_at(t), seed=t).float()
        assert rel(full(x, t), exact(x, t)) < 1e-6
    assert [e["t"] for e in full.screening_log] == [900, 200, 10]
    assert all(e["rel_error"] < 1e-6 and e["k_t"] == 120 and e["m"] == 120 for e in full.screening_log)
    scr = ad.LocalityDenoiser(train, moments, screening="golddiff", screening_options={"k_min": 10, "k_max": 20})
    info = scr.screening_error(noisy_queries(held[:2], ad.alpha_bar_at(500), seed=0), 500)
    assert set(info) == {"t", "m", "k_t", "rel_error", "max_abs_error", "seconds_screened", "seconds_exact"}
    assert info["t"] == 500 and 20 <= info["m"] <= 120 and 10 <= info["k_t"] <= 20 and info["rel_error"] > 0
    # defaults: N/20 and N/10; presets clamp to N
    d = ad.LocalityDenoiser(train, moments, screening="golddiff").screening
    assert (d.k_min, d.k_max, d.factor) == (6, 12, 1)
    d = ad.LocalityDenoiser(train, moments, screening="golddiff", screening_options={"preset": "cifar10"}).screening
    assert (d.k_min, d.k_max) == (120, 120)
    s = ad.sample(scr, 2, (3, 16, 16), steps=3, seed=0)
    assert s.shape == (2, 3, 16, 16) and torch.isfinite(s).all()


def test_golddiff_windowed_path(crops16):
    train, held, _ = crops16
    pm = ad.estimate_patch_moments(train, 5)
    exact = ad.LocalityDenoiser(train, pm)
    full = ad.LocalityDenoiser(train, pm, screening="golddiff", screening_options={"k_min": 120, "k_max": 120})
    x = noisy_queries(held[:2], ad.alpha_bar_at(100), seed=0)
    assert rel(full(x, 100), exact(x, 100)) < 1e-10


def test_golddiff_pool_factor_and_bad_options(crops16):
    assert [pool_factor(s, s) for s in (32, 64, 28, 16, 8)] == [2, 4, 2, 1, 1]
    train, _, moments = crops16
    for kw, match in [({"screening": "faiss"}, "screening"), ({"screening": "golddiff", "softmax": "wssm"}, "softmax"),
                      ({"screening_options": {"k_min": 3}}, "screening_options"),
                      ({"screening": "golddiff", "screening_options": {"k_mn": 3}}, "unknown"),
                      ({"screening": "golddiff", "screening_options": {"k_min": 30, "k_max": 10}}, "k_min"),
                      ({"screening": "golddiff", "screening_options": {"k_max": 0}}, "k_max"),
                      ({"screening": "golddiff", "screening_options": {"pool_factor": 3}}, "pool_factor"),
                      ({"screening": "golddiff", "screening_options": {"preset": "imagenet"}}, "preset")]:
        with pytest.raises((ValueError, TypeError), match=match):
            ad.LocalityDenoiser(train, moments, **kw)
    with pytest.raises(ValueError, match="screening_error"):
        ad.LocalityDenoiser(train, moments).screening_error(torch.zeros(1, 3, 16, 16), 10)


# --------------------------------------------------------------------------- the common interface


def test_models_work_with_compare_and_the_diffusers_adapter(small):
    train, held = small
    dens = {
        "scfdm": ad.SmoothedCFDMDenoiser(train, num_smoothing=2, top_k=10),
        "pspc": ad.PSPCSquareDenoiser(train, "cifar10"),
        "golddiff": ad.LocalityDenoiser(train, screening="golddiff", screening_options={"k_min": 10, "k_max": 20}),
    }
    agr = ad.compare(dens, ad.OptimalDenoiser(train), held, [500, 10], num_samples=2)
    for name in dens:
        assert all(math.isfinite(v) for v in agr.r2[name])
    x = noisy_queries(held[:2], ad.alpha_bar_at(100), seed=0).float()
    for den in dens.values():
        eps = ad.DiffusersModelAdapter(den)(x, torch.tensor(100)).sample
        assert eps.shape == x.shape and torch.isfinite(eps).all()
