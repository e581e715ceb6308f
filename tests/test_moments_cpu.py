"""The compiled CPU backend of the ``moments`` op (_C.u8_syrk_update / f64_syrk_update):
exact integer sums against numpy int64, both micro-kernels, any strides, int32 overflow
guards, batch-split invariance, and agreement with the reference backend."""
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

import analytic_diffusion as ad
from analytic_diffusion import _ext
from analytic_diffusion.ops.moments import cpu as _cpu

pytestmark = pytest.mark.skipif(_ext.cpu_module() is None, reason="analytic_diffusion._C is not built")

PATHS = [pytest.param(False, id="vnni"), pytest.param(True, id="portable")]
HERE = Path(__file__).resolve().parent


def _u8(shape, seed):
    return torch.randint(0, 256, shape, generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def _numpy_sums(rows: torch.Tensor):
    a = rows.numpy().astype(np.int64)
    return a.sum(0), a.T @ a


def _kernel_sums(rows: torch.Tensor, force_portable: bool, chunk_rows: int = 0, s1=None, s2=None):
    n = rows.shape[1]
    # start from garbage above the diagonal: the kernel must neither read nor need it
    s1 = torch.zeros(n, dtype=torch.int64) if s1 is None else s1
    s2 = torch.triu(torch.full((n, n), -7, dtype=torch.int64), 1) if s2 is None else s2
    _cpu.u8_syrk_update(rows, s1, s2, force_portable=force_portable, chunk_rows=chunk_rows)
    return s1, s2


def _assert_exact(rows, s1, s2):
    e1, e2 = _numpy_sums(rows)
    assert np.array_equal(s1.numpy(), e1)
    assert np.array_equal(np.tril(s2.numpy()), np.tril(e2))


def test_backend_is_registered_and_preferred():
    assert _cpu.available()
    assert ad.available_backends("moments", "cpu")[0] == "cpu"
    assert "cpu" not in ad.available_backends("moments", "meta")


def test_vnni_kernel_is_compiled_where_the_cpu_has_it():
    info = ad.build_info()["cpu"]
    flags = Path("/proc/cpuinfo").read_text() if os.path.exists("/proc/cpuinfo") else ""
    if "avx512_vnni" not in flags:
        pytest.skip("this CPU has no AVX-512 VNNI")
    # dispatched at run time, so even a generic (AD_NATIVE=OFF) x86 build must use it
    assert _cpu.has_vnni() and info["vnni"] is True


@pytest.mark.parametrize("force_portable", PATHS)
@pytest.mark.parametrize("n", [1, 7, 63, 65, 200])
@pytest.mark.parametrize("B", [1, 3, 129])
def test_u8_sums_are_exact(n, B, force_portable):
    rows = _u8((B, n), seed=n * 1000 + B)
    if B >= 3:  # the extremes: u = 0 (s = -128) and u = 255 (s = 127)
        rows[0] = 0
        rows[1] = 255
    s1, s2 = _kernel_sums(rows, force_portable)
    _assert_exact(rows, s1, s2)
    assert torch.equal(torch.triu(s2, 1), torch.triu(torch.full((n, n), -7, dtype=torch.int64), 1))


@pytest.mark.parametrize("force_portable", PATHS)
@pytest.mark.parametrize(
    "view",
    [
        pytest.param(lambda x: x[:, ::2], id="column-step"),
        pytest.param(lambda x: x.T.contiguous().T, id="column-major"),
        pytest.param(lambda x: x[::3], id="row-step"),
        pytest.param(lambda x: x[5:6].expand(41, -1), id="broadcast-row"),
        pytest.param(lambda x: x[2:, 1:-3], id="offset"),
    ],
)
def test_u8_any_strides(view, force_portable):
    rows = view(_u8((123, 131), seed=7))
    assert not rows.is_contiguous()
    s1, s2 = _kernel_sums(rows, force_portable)
    _assert_exact(rows, s1, s2)


@pytest.mark.parametrize("force_portable", PATHS)
@pytest.mark.parametrize("chunk_rows", [1, 5, 512, 1000])
def test_u8_chunked_int32_flush_is_exact(chunk_rows, force_portable):
    rows = _u8((1031, 97), seed=3)
    s1, s2 = _kernel_sums(rows, force_portable, chunk_rows)
    _assert_exact(rows, s1, s2)


def test_u8_chunk_rows_guard():
    rows = _u8((4, 3), seed=0)
    with pytest.raises(ValueError):
        _kernel_sums(rows, False, chunk_rows=65537)


@pytest.mark.parametrize("force_portable", PATHS)
def test_u8_no_int32_overflow(force_portable):
    # 70000 images: a single int32 accumulator would wrap on every pair below
    # (70000 * 255 * 255 > 2^31 and, after the s = u - 128 shift, 70000 * 128 * 255 > 2^31),
    # so this passes only if the sums are flushed to int64 in bounded chunks.
    rows = torch.empty(70000, 3, dtype=torch.uint8)
    rows[:, 0] = 0
    rows[:, 1] = 255
    rows[:, 2] = 255
    rows[::7, 2] = 0
    s1, s2 = _kernel_sums(rows, force_portable)
    _assert_exact(rows, s1, s2)
    assert int(s2[1, 1]) == 70000 * 255 * 255 > 2**31
    # and the accumulation continues exactly on top of existing int64 sums
    s1, s2 = _kernel_sums(rows, force_portable, s1=s1, s2=s2)
    assert int(s2[1, 1]) == 2 * 70000 * 255 * 255 and int(s1[1]) == 2 * 70000 * 255


def test_u8_vnni_and_portable_agree_bitwise():
    rows = _u8((517, 250), seed=11)[:, ::2]
    a1, a2 = _kernel_sums(rows, False, 100)
    b1, b2 = _kernel_sums(rows, True, 0)
    assert torch.equal(a1, b1) and torch.equal(a2.tril(), b2.tril())


def test_u8_invariant_to_batch_split_and_order():
    u = _u8((301, 3, 7, 9), seed=5)
    whole = ad.MomentAccumulator((3, 7, 9), backend="cpu").update(u)
    perm = torch.randperm(301, generator=torch.Generator().manual_seed(1))
    acc = ad.MomentAccumulator((3, 7, 9), backend="cpu")
    for i, size in zip(range(0, 301, 37), [37] * 9):
        acc.update(u[perm][i : i + size])
    assert torch.equal(whole._s1, acc._s1) and torch.equal(whole._s2.tril(), acc._s2.tril())
    a, b = whole.result(), acc.result()
    assert torch.equal(a.mean, b.mean) and torch.equal(a.cov, b.cov)


def test_estimate_moments_uint8_matches_reference_bitwise():
    u = _u8((611, 3, 8, 8), seed=9)
    ref = ad.estimate_moments(u, batch_size=100, backend="reference")
    got = ad.estimate_moments(u, batch_size=100, backend="cpu")
    assert torch.equal(got.mean, ref.mean) and torch.equal(got.cov, ref.cov)
    default = ad.estimate_moments(u, batch_size=100)  # the registry picks the CPU backend
    assert torch.equal(default.cov, ref.cov)


@pytest.mark.parametrize("N,n", [(2, 1), (157, 60), (1001, 131)])
def test_u8_finalize_is_bit_identical_to_result(N, n):
    acc = ad.MomentAccumulator(n, backend="reference").update(_u8((N, n), seed=N + n))
    m = acc.result()  # the torch formula (the reference backend has no fused finalize)
    mean, cov = _cpu.u8_finalize(acc.count, acc._s1, acc._s2)
    assert torch.equal(mean, m.mean) and torch.equal(cov, m.cov)


def test_u8_finalize_beyond_the_exact_int64_range():
    # N^2 * 255^2 >= 2^63: result() switches to float64 for N*S2 - s1 s1^T; so must we
    g = torch.Generator().manual_seed(8)
    n, N = 40, 20_000_000
    acc = ad.MomentAccumulator(n, backend="reference")
    acc._alloc(torch.device("cpu"), "int")
    acc.count = N
    acc._s1 = torch.randint(0, 255 * N, (n,), generator=g, dtype=torch.int64)
    acc._s2 = torch.randint(0, 65025 * N, (n, n), generator=g, dtype=torch.int64)
    m = acc.result()
    mean, cov = _cpu.u8_finalize(acc.count, acc._s1, acc._s2)
    assert torch.equal(mean, m.mean) and torch.equal(cov, m.cov)


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("offset", [0.0, 0.9])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_estimate_moments_float_matches_reference(offset, dtype):
    g = torch.Generator().manual_seed(4)
    if offset:
        x = offset + 1e-4 * torch.randn(3000, 75, generator=g, dtype=torch.float64)
    else:
        x = torch.rand(3000, 75, generator=g, dtype=torch.float64) * 2 - 1
    x = x.to(dtype)
    ref = ad.estimate_moments(x, batch_size=512, backend="reference")
    got = ad.estimate_moments(x, batch_size=512, backend="cpu")
    assert _rel(got.mean, ref.mean) <= 1e-12
    assert _rel(got.cov, ref.cov) <= 1e-12
    # and against a float64 two-pass computation on the same values
    xd = x.double()
    c = (xd - xd.mean(0)).T @ (xd - xd.mean(0)) / (xd.shape[0] - 1)
    assert _rel(got.cov, c) <= 1e-12


@pytest.mark.parametrize("force_portable", [pytest.param(False, id="avx512"), pytest.param(True, id="portable")])
def test_float_backend_strided_float32_rows(force_portable):
    g = torch.Generator().manual_seed(6)
    x = (torch.rand(203, 2 * 67, generator=g) * 2 - 1)[:, ::2]  # float32, column stride 2
    ref = torch.rand(67, generator=g, dtype=torch.float64)
    s1 = torch.zeros(67, dtype=torch.float64)
    above = torch.triu(torch.full((67, 67), 3.0, dtype=torch.float64), 1)
    s2 = above.clone()  # garbage above the diagonal: never read, never written
    _cpu.f64_syrk_update(x, ref, s1, s2, force_portable=force_portable)
    z = x.double() - ref
    assert _rel(s1, z.sum(0)) <= 1e-13
    assert _rel(s2.tril(), (z.T @ z).tril()) <= 1e-13
    assert torch.equal(s2.triu(1), above)


def test_mixed_uint8_then_float_matches_reference():
    u = _u8((300, 48), seed=12)
    f = torch.rand(200, 48, generator=torch.Generator().manual_seed(13), dtype=torch.float64) * 2 - 1
    res = {}
    for backend in ("reference", "cpu"):
        acc = ad.MomentAccumulator(48, backend=backend).update(u).update(f)
        res[backend] = acc.result()
    assert _rel(res["cpu"].cov, res["reference"].cov) <= 1e-12


def test_generic_build_without_march_native_or_openmp(tmp_path):
    """moments.cpp as a redistributable build compiles it (no -march=native, no OpenMP):
    run-time ISA dispatch, portable kernels and scalar packing tails, against direct sums."""
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if cxx is None:
        pytest.skip("no host C++ compiler")
    exe = tmp_path / "moments_cpu_standalone"
    srcs = [str(HERE / "moments_cpu_standalone.cpp"), str(HERE.parent / "csrc" / "cpu" / "moments.cpp")]
    build = subprocess.run([cxx, "-std=c++17", "-O2", "-o", str(exe), *srcs], capture_output=True, text=True)
    assert build.returncode == 0, build.stderr
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "all standalone checks passed" in run.stdout
