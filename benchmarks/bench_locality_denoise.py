"""locality_denoise per DDIM timestep on natural crops: every backend against
(a) the published algorithm (dense float32 einsum + WSSM, written out below) and
(b) the package's reference exact mode, with relative errors against float64 exact."""
from __future__ import annotations

import math
import time

import pytest
import torch

import analytic_diffusion as ad
from conftest import QUICK, crops_split, geo_mean, noisy_queries, rel_err, time_call

SIZES = [8] if QUICK else [16, 32]
TIMESTEPS = [900, 100, 0] if QUICK else ad.ddim_timesteps(10)
N_TRAIN = 64 if QUICK else 2000
BATCH = 2 if QUICK else 8
N_MOMENTS = {8: 400, 16: 3000, 32: 5000}  # well above n: a full-rank covariance, realistic masks
REPEATS = 1 if QUICK else 3


def official_locality_denoise(x, train_f32, mask, alpha_bar, chunk_size=256):
    """The published code's algorithm: dense fp32 einsum over a [B, chunk, n] tensor, and the
    mean of per-chunk softmaxes (WSSM)."""
    a, s2 = math.sqrt(alpha_bar), 1 - alpha_bar
    M = mask.float()
    num = torch.zeros_like(x)
    den = torch.zeros_like(x)
    for k0 in range(0, train_f32.shape[0], chunk_size):
        y = train_f32[k0 : k0 + chunk_size]
        d = torch.einsum("bcj,jm->bcm", (x[:, None, :] - a * y[None]) ** 2, M)
        w = torch.softmax(-d / (2 * s2), dim=1)
        num += torch.einsum("bcm,cm->bm", w, y)
        den += w.sum(1)
    return num / (den + 1e-8)


_SETUP: dict = {}


def setup(size: int):
    if size not in _SETUP:
        moments = ad.estimate_moments(ad.data.natural_crops(N_MOMENTS[size], size=size, seed=1))
        _SETUP[size] = (*crops_split(N_TRAIN, BATCH, size), ad.WienerFilter(moments))
    return _SETUP[size]


_BASE: dict = {}  # (size, t) -> inputs and the baselines' times, shared by every backend's row
_SPEEDUPS: dict = {}  # (size, backend) -> [(speed-up vs official, vs reference exact)] per timestep


def step_inputs(size: int, t: int):
    """Inputs of one DDIM step and the baselines timed on them, once per (size, t)."""
    if (size, t) not in _BASE:
        train, held, filt = setup(size)
        x, ab = noisy_queries(held, t)
        x = x.reshape(BATCH, -1)
        mask = filt.mask(ab, 0.02)
        x32, train_f32 = x.float(), (train.float() / 127.5 - 1).reshape(N_TRAIN, -1)
        exact64 = ad.ops.locality_denoise_reference(x, train.reshape(N_TRAIN, -1), mask, ab)
        official_s = time_call(lambda: official_locality_denoise(x32, train_f32, mask, ab), repeats=REPEATS, warmup=0)
        official_err = rel_err(official_locality_denoise(x32, train_f32, mask, ab), exact64)
        ref_s = time_call(lambda: ad.ops.locality_denoise_reference(x32, train.reshape(N_TRAIN, -1), mask, ab), repeats=REPEATS, warmup=0)
        _BASE[(size, t)] = dict(ab=ab, mask=mask, x32=x32, train=train, exact64=exact64, official_s=official_s, official_err=official_err, ref_s=ref_s)
    return _BASE[(size, t)]


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("t", TIMESTEPS)
@pytest.mark.parametrize("backend", ad.available_backends("locality_denoise", "cpu"))
def test_locality_denoise_step(benchmark, record, backend, t, size):
    b = step_inputs(size, t)
    mask, ab, x32, train = b["mask"], b["ab"], b["x32"], b["train"]
    case = f"{size}x{size}x3 N={N_TRAIN} B={BATCH} t={t} density={mask.float().mean().item():.3f}"
    prepare = getattr(ad.registry.select("locality_denoise", "cpu", backend).fn, "prepare", None)
    if prepare is not None:  # the per-mask plan: built once per timestep and cached, timed on its own
        t0 = time.perf_counter()
        prepare(mask)
        record("locality_plan", case, backend, time.perf_counter() - t0)
    run = lambda: ad.ops.locality_denoise(x32, train, mask, ab, backend=backend)  # noqa: E731
    out = benchmark.pedantic(run, rounds=REPEATS, iterations=1, warmup_rounds=0 if QUICK else 1)
    seconds = benchmark.stats.stats.median if benchmark.stats else time_call(run, repeats=1, warmup=0)
    err = rel_err(out, b["exact64"])
    row = record(
        "locality_denoise", case, backend, seconds, baseline="official (fp32 dense + WSSM)", baseline_seconds=b["official_s"],
        rel_err=err, official_rel_err=b["official_err"], reference_exact_s=b["ref_s"], vs_reference_exact=b["ref_s"] / seconds,
    )
    _SPEEDUPS.setdefault((size, backend), []).append((b["official_s"] / seconds, b["ref_s"] / seconds))
    benchmark.extra_info.update(row)
    assert math.isfinite(err) and err < 1e-4


@pytest.mark.parametrize("size", SIZES)
def test_geometric_mean_over_timesteps(record, size):
    """The issue's headline number: geometric-mean speed-up over the DDIM steps."""
    for (sz, backend), pairs in sorted(_SPEEDUPS.items()):
        if sz != size or len(pairs) != len(TIMESTEPS):
            continue
        geo = geo_mean(p[0] for p in pairs)
        geo_ref = geo_mean(p[1] for p in pairs)
        record("locality_denoise geo-mean", f"{size}x{size}x3 N={N_TRAIN} B={BATCH}, {len(pairs)} DDIM steps", backend, None,
               speedup_vs_official=geo, speedup_vs_reference_exact=geo_ref)
        assert geo > 0


@pytest.mark.parametrize("backend", ad.available_backends("optimal_denoise", "cpu"))
def test_optimal_denoise(benchmark, record, backend):
    size = SIZES[-1]
    train, held, _ = setup(size)
    ab = ad.alpha_bar_at(300)
    x = (math.sqrt(ab) * (held.double() / 127.5 - 1) + math.sqrt(1 - ab) * torch.randn(held.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)).reshape(BATCH, -1)
    exact64 = ad.ops.optimal_denoise_reference(x, train.reshape(N_TRAIN, -1), ab)
    x32 = x.float()
    run = lambda: ad.ops.optimal_denoise(x32, train, ab, backend=backend)  # noqa: E731
    out = benchmark.pedantic(run, rounds=REPEATS, iterations=1, warmup_rounds=0 if QUICK else 1)
    seconds = benchmark.stats.stats.median if benchmark.stats else time_call(run, repeats=1, warmup=0)
    ref_s = time_call(lambda: ad.ops.optimal_denoise_reference(x32, train.reshape(N_TRAIN, -1), ab), repeats=REPEATS, warmup=0)
    err = rel_err(out, exact64)
    row = record("optimal_denoise", f"{size}x{size}x3 N={N_TRAIN} B={BATCH} t=300", backend, seconds, baseline="reference (fp32)", baseline_seconds=ref_s, rel_err=err)
    benchmark.extra_info.update(row)
    assert math.isfinite(err) and err < 1e-4


@pytest.mark.parametrize("backend", ad.available_backends("nearest_denoise", "cpu"))
def test_nearest_denoise(benchmark, record, backend):
    """nearest_denoise at the optimal denoiser's shape: the same distances, an argmin."""
    size = SIZES[-1]
    train, held, _ = setup(size)
    ab = ad.alpha_bar_at(300)
    x = (math.sqrt(ab) * (held.double() / 127.5 - 1) + math.sqrt(1 - ab) * torch.randn(held.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)).reshape(BATCH, -1)
    exact64 = ad.ops.nearest_denoise_reference(x, train.reshape(N_TRAIN, -1), ab)
    x32 = x.float()
    run = lambda: ad.ops.nearest_denoise(x32, train, ab, backend=backend)  # noqa: E731
    out = benchmark.pedantic(run, rounds=REPEATS, iterations=1, warmup_rounds=0 if QUICK else 1)
    seconds = benchmark.stats.stats.median if benchmark.stats else time_call(run, repeats=1, warmup=0)
    ref_s = time_call(lambda: ad.ops.nearest_denoise_reference(x32, train.reshape(N_TRAIN, -1), ab), repeats=REPEATS, warmup=0)
    row = record("nearest_denoise", f"{size}x{size}x3 N={N_TRAIN} B={BATCH} t=300", backend, seconds, baseline="reference (fp32)", baseline_seconds=ref_s)
    benchmark.extra_info.update(row)
    assert torch.equal(out, exact64.float())  # the same training images
