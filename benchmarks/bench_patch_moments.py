"""Patch moments: the compiled CPU lag sums against today's torch lag sums (the reference
backend's per-lag GEMMs + integral images), same inputs, same run; and the stationary
(all-offsets) lag sums by FFT against the exact direct sums.

Full size: 64x64x3 images, k = 15, one batch of 256 uint8 images (the accumulator's batch),
plus a float64 batch; ``AD_BENCH_QUICK=1``: 16x16x3, k = 3 (CI)."""
from __future__ import annotations

import pytest
import torch

import analytic_diffusion as ad
from analytic_diffusion.ops.patch_moments import cpu as pm_cpu
from analytic_diffusion.ops.patch_moments import reference as pm_ref
from analytic_diffusion.ops.patch_moments.stationary import StationaryMomentAccumulator
from conftest import QUICK, time_call

pytestmark = pytest.mark.skipif(not pm_cpu.available(), reason="compiled _C without the patch-moments kernels")

SUMS_CASES = [(16, 3, 16, 3)] if QUICK else [(256, 3, 64, 15)]
FLOAT_CASES = [(8, 3, 16, 3)] if QUICK else [(64, 3, 64, 15)]
STAT_CASES = [(8, 3, 8)] if QUICK else [(32, 3, 64)]


def _timed(benchmark, fn, rounds, warmup_rounds=0):
    """(fn(), median seconds): pytest-benchmark's timing, or one timed call of our own when
    benchmarks are disabled (``--benchmark-disable`` in CI keeps no stats)."""
    out = benchmark.pedantic(fn, rounds=rounds, iterations=1, warmup_rounds=warmup_rounds)
    stats = getattr(benchmark, "stats", None)
    return out, (stats.stats.median if stats is not None else time_call(fn, repeats=1, warmup=0))


def _images(N, C, size, seed=0):
    return torch.randint(0, 256, (N, C, size, size), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


@pytest.mark.parametrize("N,C,size,k", SUMS_CASES)
def test_patch_sums_uint8(benchmark, record, N, C, size, k):
    x = _images(N, C, size)
    (s1, s2), seconds = _timed(benchmark, lambda: pm_cpu.patch_sums(x, k), 1 if QUICK else 3, warmup_rounds=1)
    ref_s = time_call(lambda: pm_ref.patch_sums(x, k), repeats=1, warmup=0)
    r1, r2 = pm_ref.BACKEND.patch_sums(x, k)
    exact = torch.equal(s2, r2) and torch.equal(s1, r1)
    row = record(
        "patch_moments", f"uint8 sums B={N} {C}x{size}x{size} k={k}", "cpu (VNNI)" if pm_cpu.has_vnni() else "cpu (portable)",
        seconds, baseline="torch lag sums (reference)", baseline_seconds=ref_s, rel_err=0.0 if exact else float("nan"),
        bit_identical=exact, images_per_s=N / seconds, threads=torch.get_num_threads(),
    )
    benchmark.extra_info.update(row)
    assert exact


@pytest.mark.parametrize("N,C,size,k", FLOAT_CASES)
def test_patch_sums_float64(benchmark, record, N, C, size, k):
    x = (_images(N, C, size).double() - 127.5) / 127.5
    shift = x.mean((0, 2, 3))
    (s1, s2), seconds = _timed(benchmark, lambda: pm_cpu.patch_sums(x, k, shift), 1 if QUICK else 2)
    ref_s = time_call(lambda: pm_ref.patch_sums(x - shift.reshape(1, -1, 1, 1), k), repeats=1, warmup=0)
    _, r2 = pm_ref.patch_sums(x - shift.reshape(1, -1, 1, 1), k)
    err = float((s2 - r2).abs().max() / r2.abs().max())
    row = record("patch_moments", f"float64 sums B={N} {C}x{size}x{size} k={k}", "cpu (AVX-512)", seconds,
                 baseline="torch lag sums (reference)", baseline_seconds=ref_s, rel_err=err, images_per_s=N / seconds)
    benchmark.extra_info.update(row)
    assert err < 1e-13


@pytest.mark.parametrize("N,C,size", STAT_CASES)
def test_stationary_fft_vs_direct(benchmark, record, N, C, size):
    x = _images(N, C, size, seed=1)
    fft, seconds = _timed(benchmark, lambda: StationaryMomentAccumulator(C, method="fft").update(x), 1 if QUICK else 2)
    direct_s = time_call(lambda: StationaryMomentAccumulator(C, method="direct", backend="cpu").update(x), repeats=1, warmup=0)
    direct = StationaryMomentAccumulator(C, method="direct", backend="cpu").update(x)
    exact = torch.equal(fft._A, direct._A)
    row = record("stationary_moments", f"uint8 N={N} {C}x{size}x{size} all lags", "fft (torch, rounded)", seconds,
                 baseline="direct lag sums (cpu)", baseline_seconds=direct_s, rel_err=0.0 if exact else float("nan"),
                 bit_identical=exact, fft_error_bound=fft.max_bound, max_rounding_residual=fft.max_residual)
    benchmark.extra_info.update(row)
    assert exact and fft.methods_used == {"fft"}
