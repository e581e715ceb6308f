"""locality_denoise per DDIM timestep on natural crops: every backend against
(a) the published algorithm (dense float32 einsum + WSSM, written out below) and
(b) the package's reference exact mode, with relative errors against float64 exact."""
from __future__ import annotations

import math

import pytest
import torch

import analytic_diffusion as ad
from conftest import QUICK, rel_err, time_call

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
        crops = ad.data.natural_crops(N_TRAIN + BATCH, size=size, seed=0)
        moments = ad.estimate_moments(ad.data.natural_crops(N_MOMENTS[size], size=size, seed=1))
        _SETUP[size] = (crops[:N_TRAIN], crops[N_TRAIN:], ad.WienerFilter(moments))
    return _SETUP[size]


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("t", TIMESTEPS)
@pytest.mark.parametrize("backend", ad.available_backends("locality_denoise", "cpu"))
def test_locality_denoise_step(benchmark, record, backend, t, size):
    train, held, filt = setup(size)
    ab = ad.alpha_bar_at(t)
    mask = filt.mask(ab, 0.02)
    g = torch.Generator().manual_seed(t)
    x0 = held.double() / 127.5 - 1
    x = (math.sqrt(ab) * x0 + math.sqrt(1 - ab) * torch.randn(x0.shape, generator=g, dtype=torch.float64)).reshape(BATCH, -1)
    x32, train_f32 = x.float(), (train.float() / 127.5 - 1).reshape(N_TRAIN, -1)
    exact64 = ad.ops.locality_denoise_reference(x, train.reshape(N_TRAIN, -1), mask, ab)

    run = lambda: ad.ops.locality_denoise(x32, train, mask, ab, backend=backend)  # noqa: E731
    out = benchmark.pedantic(run, rounds=REPEATS, iterations=1, warmup_rounds=0 if QUICK else 1)
    seconds = benchmark.stats.stats.median if benchmark.stats else time_call(run, repeats=1, warmup=0)
    official_s = time_call(lambda: official_locality_denoise(x32, train_f32, mask, ab), repeats=REPEATS, warmup=0)
    official_out = official_locality_denoise(x32, train_f32, mask, ab)
    case = f"{size}x{size}x3 N={N_TRAIN} B={BATCH} t={t} density={mask.float().mean().item():.3f}"
    err = rel_err(out, exact64)
    row = record("locality_denoise", case, backend, seconds, baseline="official (fp32 dense + WSSM)", baseline_seconds=official_s, rel_err=err, official_rel_err=rel_err(official_out, exact64))
    benchmark.extra_info.update(row)
    assert math.isfinite(err) and err < 1e-4
