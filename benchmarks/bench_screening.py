"""GoldDiff screening (docs/algorithms.md §12) vs the exact CPU locality denoiser, per DDIM step,
same inputs, same run: time of each, speed-up and the screening's relative error against the
exact result (``LocalityDenoiser.screening_error``).

Shapes: 32x32x3 natural crops, N = 10,000 training images, B = 4 queries, float32 queries,
threshold 0.03 (GoldDiff's CIFAR-10 setting), k_min = N/20 = 500, k_max = N/10 = 1000 (the
CIFAR-10 ratios 2500/5000 of 50,000), coarse pooling factor 2 (to 16 x 16). N is what the
shared 2-core machine allows in a few minutes (N = 10,000: ~2 min; ``AD_BENCH_N=20000``: ~4 min,
both recorded in results/golddiff_screening.md). ``AD_BENCH_QUICK=1``: 8x8, N = 64, 3 steps.
Each step: median of ``REPEATS`` calls (each a fresh random pool), the error of the first.
"""
from __future__ import annotations

import math
import os
import time

import pytest

import analytic_diffusion as ad
from conftest import QUICK, crops_split, geo_mean, noisy_queries, write_bench_table

SIZE = 8 if QUICK else 32
N_TRAIN = 64 if QUICK else int(os.environ.get("AD_BENCH_N", 10000))
BATCH = 2 if QUICK else 4
N_MOMENTS = 400 if QUICK else 5000
TIMESTEPS = [900, 100, 0] if QUICK else ad.ddim_timesteps(10)
REPEATS = 1 if QUICK else 3
OPTIONS = {"k_min": max(1, round(N_TRAIN / 20)), "k_max": max(1, round(N_TRAIN / 10)), "seed": 0}

_STATE: dict = {}
_RATIOS: list = []


def denoiser():
    if not _STATE:
        train, held = crops_split(N_TRAIN, BATCH, SIZE)
        moments = ad.estimate_moments(ad.data.natural_crops(N_MOMENTS, size=SIZE, seed=1))
        den = ad.LocalityDenoiser(train, moments, threshold=0.03, screening="golddiff", screening_options=OPTIONS)
        t0 = time.perf_counter()
        den.prepare(TIMESTEPS)  # masks and CPU plans of every step, shared by both modes
        _STATE.update(den=den, held=held, prepare_s=time.perf_counter() - t0)
    return _STATE["den"], _STATE["held"]


@pytest.mark.parametrize("t", TIMESTEPS)
def test_screening_step(record, t):
    den, held = denoiser()
    x = noisy_queries(held, t)[0].float()
    infos = [den.screening_error(x, t) for _ in range(REPEATS)]
    scr = sorted(i["seconds_screened"] for i in infos)[len(infos) // 2]
    exact = sorted(i["seconds_exact"] for i in infos)[len(infos) // 2]
    first = infos[0]
    record("golddiff_screening", f"{SIZE}x{SIZE}x3 N={N_TRAIN} B={BATCH} t={t}", "golddiff (cpu locality on survivors)", scr,
           baseline="exact cpu locality", baseline_seconds=exact, rel_err=first["rel_error"],
           pool_m=first["m"], k_t=first["k_t"], max_abs_error=first["max_abs_error"],
           rel_err_max_over_repeats=max(i["rel_error"] for i in infos))
    _RATIOS.append(exact / scr)
    assert math.isfinite(first["rel_error"])


def test_screening_summary(record):
    if len(_RATIOS) == len(TIMESTEPS):
        geo = geo_mean(_RATIOS)
        record("golddiff_screening geo-mean", f"{SIZE}x{SIZE}x3 N={N_TRAIN} B={BATCH}, {len(TIMESTEPS)} DDIM steps", "golddiff", None,
               speedup_vs_exact=geo, min_speedup=min(_RATIOS), max_speedup=max(_RATIOS), prepare_masks_plans_s=_STATE.get("prepare_s"))
    write_bench_table("golddiff_screening", "GoldDiff screening vs the exact CPU locality denoiser, per DDIM step")
