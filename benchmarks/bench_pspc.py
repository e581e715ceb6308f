"""PSPC-square (docs/algorithms.md §13) per DDIM step with the published CIFAR-10 patch-size
schedule: the library's best CPU backend (``windowed``: the windowed locality kernel on shifted
channels for P = 3, else ``boxsum``: all windows at once from integral images, float64) against
the published algorithm (plai-group/pspc ``PSPCDenoiser.forward`` + ``empirical_pmean``,
transcribed in torch below: one window position at a time, float32, batches of 100 training
images), same inputs, same run; relative errors against the float64 reference backend (query 0)."""
from __future__ import annotations

import math
import os
import time

import pytest
import torch

import analytic_diffusion as ad
from analytic_diffusion.ops.patch_posterior import windowed as pw
from conftest import QUICK, crops_split, geo_mean, noisy_queries, rel_err, time_call, write_bench_table

SIZE = 8 if QUICK else 32
N_TRAIN = 40 if QUICK else int(os.environ.get("AD_BENCH_N", 200))
BATCH = 2 if QUICK else 4
TIMESTEPS = [900, 300, 0] if QUICK else ad.ddim_timesteps(10)
SCHEDULE = ad.denoisers.pspc_schedule("cifar10")


def published_pspc_square(z, sigma, imgs_u8, P, bs=100):
    """The published algorithm in torch (VE convention: z = x_t / a, sigma = sqrt(s2 / ab)):
    for every window position a float32 online-softmax posterior mean over the cropped
    training patches (uint8 crops converted per batch of ``bs``), composite / normaliser."""
    B, C, H, W = z.shape
    N = imgs_u8.shape[0]
    composite = torch.zeros_like(z)
    normalizer = torch.zeros_like(z)
    for x0 in range(W):
        for y0 in range(H):
            if x0 + P > W or y0 + P > H:
                continue  # an empty mask: skipped, as in the published code
            mask = torch.zeros(H, W, dtype=torch.bool)
            mask[y0 : y0 + P, x0 : x0 + P] = True
            zc = z.flatten(2)[:, :, mask.view(-1)].reshape(B, -1)
            pc = imgs_u8.flatten(2)[:, :, mask.view(-1)].reshape(N, -1)
            m = torch.full((B, 1), -math.inf)
            norm = torch.zeros(B, 1)
            mean = torch.zeros_like(zc)
            for s in range(0, N, bs):
                batch = pc[s : s + bs].float() / 127.5 - 1
                score = (zc[:, None] - batch).square().sum(-1) / (-2 * sigma**2)
                m_new = torch.maximum(score.max(1, keepdim=True).values, m)
                p = (score - m_new).exp()
                adj = (m - m_new).exp()
                new_norm = norm * adj + p.sum(1, keepdim=True)
                mean = (mean * norm * adj + p @ batch) / new_norm
                m, norm = m_new, new_norm
            out = torch.zeros(B, C, H * W)
            out[:, :, mask.view(-1)] = mean.reshape(B, C, -1)
            composite += out.reshape(B, C, H, W)
            ones = torch.zeros(B, C, H * W)
            ones[:, :, mask.view(-1)] = 1
            normalizer += ones.reshape(B, C, H, W)
    return composite / normalizer


_SPEEDUPS: list = []


@pytest.mark.parametrize("t", TIMESTEPS)
def test_pspc_square_step(record, t):
    train, held = crops_split(N_TRAIN, BATCH, SIZE)
    P = min(SCHEDULE[t], SIZE)
    x, ab = noisy_queries(held, t)
    x32 = x.float()
    sigma = math.sqrt((1 - ab) / ab)
    exact64 = ad.ops.patch_posterior_denoise(x[:1], train, P, ab, backend="reference")  # errors on query 0
    t0 = time.perf_counter()
    pub = published_pspc_square(x32 / math.sqrt(ab), sigma, train, P)
    pub_s = time.perf_counter() - t0
    pub_err = rel_err(pub[:1], exact64)
    run = lambda: ad.ops.patch_posterior_denoise(x32, train, P, ab)  # noqa: E731  (the default backend)
    impl = ad.registry.select("patch_posterior_denoise", "cpu", None).name
    if impl == "windowed" and (P % 2 == 0 or 3 * P * P > pw.MAX_CHANNELS or P == SIZE):
        impl = "windowed->boxsum"  # the cases the windowed backend hands to boxsum
    secs = time_call(run, repeats=1 if QUICK else 3, warmup=0 if QUICK else 1)
    err = rel_err(run()[:1], exact64)
    record("pspc_square", f"{SIZE}x{SIZE}x3 N={N_TRAIN} B={BATCH} t={t} P={P}", impl, secs,
           baseline="published (per-window loop, fp32)", baseline_seconds=pub_s, rel_err=err, published_rel_err=pub_err)
    _SPEEDUPS.append(pub_s / secs)
    assert err < 1e-6


def test_pspc_square_geo_mean(record):
    if len(_SPEEDUPS) == len(TIMESTEPS):
        geo = geo_mean(_SPEEDUPS)
        record("pspc_square geo-mean", f"{SIZE}x{SIZE}x3 N={N_TRAIN} B={BATCH}, {len(TIMESTEPS)} DDIM steps", "default backend", None,
               speedup_vs_published=geo, min_speedup=min(_SPEEDUPS))
    write_bench_table("pspc_square", "PSPC-square: default CPU backend (windowed for P = 3, else boxsum) vs the published per-window algorithm")
