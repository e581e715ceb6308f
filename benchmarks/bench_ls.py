"""LS machine (Kamb & Ganguli, docs/algorithms.md §10: the windowed locality op with a P x P box
window over every channel pair) per DDIM step with the published CIFAR-10 UNet patch-size
schedule: ``LSDenoiser`` on the CPU windowed backend against the published LS algorithm
(``published_ls`` in bench_els.py: unfold of the per-image squared-difference image, float32,
transcribed in torch), same inputs, same run; relative errors against the float64 reference
backend (first query).

Shapes: 32x32x3 natural crops, N = 2000 (``AD_BENCH_N``), B = 4, 10 DDIM steps.
``AD_BENCH_QUICK=1``: 8x8x3, N = 16, B = 2, 3 steps (CI). Full-size runs write
``benchmarks/results/ls_denoise.md``.
"""
from __future__ import annotations

import math
import os
import time

import pytest
import torch

import analytic_diffusion as ad
from analytic_diffusion.denoisers.schedules import preset_schedule
from bench_els import published_ls
from conftest import QUICK, crops_split, geo_mean, noisy_queries, rel_err, time_call, write_bench_table

SIZE = 8 if QUICK else 32
N_TRAIN = 16 if QUICK else int(os.environ.get("AD_BENCH_N", "2000"))
BATCH = 2 if QUICK else 4
TIMESTEPS = [900, 300, 0] if QUICK else ad.ddim_timesteps(10)
SCHEDULE = preset_schedule("cifar10-unet", ad.ddim_timesteps(10) if not QUICK else TIMESTEPS)
# the published loop's [B, chunk, P*P, H*W] float32 unfold: chunk sized to ~80 MB (the work
# per training image does not depend on it)
_UNFOLD_FLOATS = 2e7

_SPEEDUPS: list = []


@pytest.mark.parametrize("t", TIMESTEPS)
def test_ls_step(record, t):
    train, held = crops_split(N_TRAIN, BATCH, SIZE)
    P = min(SCHEDULE[t], 2 * SIZE - 1)
    x, ab = noisy_queries(held, t)
    x32 = x.float()
    train_f32 = train.float() / 127.5 - 1
    box = torch.ones(3, 3, P, P, dtype=torch.bool)
    exact64 = ad.ops.windowed_locality_denoise(x[:1], train, box, ab, backend="reference")
    chunk = max(1, int(_UNFOLD_FLOATS // (BATCH * P * P * SIZE * SIZE)))
    t0 = time.perf_counter()
    pub = published_ls(x32, train_f32, P, ab, chunk=chunk)
    pub_s = time.perf_counter() - t0
    pub_err = rel_err(pub[:1], exact64)
    den = ad.LSDenoiser(train, {t: P})
    run = lambda: den(x32, t)  # noqa: E731
    secs = time_call(run, repeats=1 if QUICK else 3, warmup=0 if QUICK else 1)
    err = rel_err(run()[:1], exact64)
    backend = ad.registry.select("windowed_locality_denoise", "cpu", None).name
    record("ls_denoise", f"{SIZE}x{SIZE}x3 N={N_TRAIN} B={BATCH} t={t} P={P}", f"LSDenoiser[{backend}]", secs,
           baseline=f"published unfold fp32 (chunk {chunk})", baseline_seconds=pub_s, rel_err=err, published_rel_err=pub_err)
    _SPEEDUPS.append(pub_s / secs)
    assert math.isfinite(err) and err < 1e-6


def test_ls_geo_mean(record):
    if len(_SPEEDUPS) == len(TIMESTEPS):
        geo = geo_mean(_SPEEDUPS)
        record("ls_denoise geo-mean", f"{SIZE}x{SIZE}x3 N={N_TRAIN} B={BATCH}, {len(TIMESTEPS)} DDIM steps, cifar10-unet schedule",
               "LSDenoiser", None, speedup_vs_published=geo, min_speedup=min(_SPEEDUPS))
    write_bench_table("ls_denoise", "LS (Kamb & Ganguli): LSDenoiser (windowed CPU backend) vs the published unfold algorithm")
