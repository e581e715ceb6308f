"""Dataset moments on uint8 images: every backend against the reference (torch float64
two-pass: mean, then ``Xc.T @ Xc``), same data, same run."""
from __future__ import annotations

import pytest
import torch

import analytic_diffusion as ad
from conftest import QUICK, time_call

# n = 3072 (CIFAR / 32x32 RGB) at the N = 20000; n = 12288 (64x64 RGB) with fewer
# images so the float64 reference stays around ten seconds on two cores.
CASES = [(64, 192)] if QUICK else [(20000, 3072), (1000, 12288)]
_FP32_GEMM: dict = {}


def fp32_gemm_gmacs() -> float:
    """This machine's measured float32 GEMM rate (torch, all threads), in GMAC/s: the
    yardstick for how close the integer kernels come to the hardware."""
    if not _FP32_GEMM:
        a = torch.randn(2048, 2048)
        s = time_call(lambda: a @ a, repeats=3, warmup=1)
        _FP32_GEMM["gmacs"] = 2048**3 / s / 1e9
    return _FP32_GEMM["gmacs"]


def two_pass_float64(u8):
    X = u8.double() / 127.5 - 1
    mean = X.mean(0)
    Xc = X - mean
    return mean, Xc.T @ Xc / (X.shape[0] - 1)


@pytest.mark.parametrize("N,n", CASES)
@pytest.mark.parametrize("backend", ad.available_backends("moments", "cpu"))
def test_moments_uint8(benchmark, record, backend, N, n):
    u8 = torch.randint(0, 256, (N, n), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    run = lambda: ad.estimate_moments(u8, batch_size=1024, backend=backend)  # noqa: E731
    m = benchmark.pedantic(run, rounds=1 if QUICK else 3, iterations=1)
    seconds = benchmark.stats.stats.median if benchmark.stats else time_call(run, repeats=1, warmup=0)
    ref_s = time_call(lambda: two_pass_float64(u8), repeats=1 if QUICK else 3, warmup=0)
    mean, cov = two_pass_float64(u8)
    err = float((m.cov - cov).abs().max() / cov.abs().max())
    gmacs = N * n * (n + 1) / 2 / seconds / 1e9  # lower-triangle multiply-adds
    fp32 = fp32_gemm_gmacs()
    row = record(
        "moments", f"uint8 N={N} n={n}", backend, seconds, baseline="torch float64 two-pass", baseline_seconds=ref_s,
        rel_err=err, images_per_s=N / seconds, gmacs=gmacs, fp32_gemm_gmacs=fp32, vs_fp32_gemm=gmacs / fp32,
    )
    benchmark.extra_info.update(row)
    assert err < 1e-12


PATCH_CASES = [(16, 3, 16, 3)] if QUICK else [(2000, 3, 32, 7), (500, 3, 64, 15)]


def unfold_gemm_patch_moments(u8, k):
    """The usual way: materialise every patch, then one float64 GEMM."""
    d = u8.shape[1] * k * k
    P = u8.unfold(2, k, 1).unfold(3, k, 1).permute(0, 2, 3, 1, 4, 5).reshape(-1, d).double() / 127.5 - 1
    mean = P.mean(0)
    Pc = P - mean
    return mean, Pc.T @ Pc / (P.shape[0] - 1)


@pytest.mark.parametrize("N,C,size,k", PATCH_CASES)
def test_patch_moments_uint8(benchmark, record, N, C, size, k):
    u8 = torch.randint(0, 256, (N, C, size, size), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    run = lambda: ad.estimate_patch_moments(u8, k, batch_size=256)  # noqa: E731
    m = benchmark.pedantic(run, rounds=1 if QUICK else 2, iterations=1)
    seconds = benchmark.stats.stats.median if benchmark.stats else time_call(run, repeats=1, warmup=0)
    ref_s = time_call(lambda: unfold_gemm_patch_moments(u8, k), repeats=1, warmup=0)
    _, cov = unfold_gemm_patch_moments(u8, k)
    err = float((m.cov - cov).abs().max() / cov.abs().max())
    row = record("patch_moments", f"uint8 N={N} {C}x{size}x{size} k={k}", "lag sums (torch)", seconds, baseline="unfold + float64 GEMM", baseline_seconds=ref_s, rel_err=err)
    benchmark.extra_info.update(row)
    assert err < 1e-12
