"""GPU backends of the ``moments`` op: CUDA (int8 tensor cores, csrc/cuda/moments.cu) and
Triton (python/analytic_diffusion/ops/moments/triton.py).

Where each part runs:
  * everywhere: a CPU replay of the CUDA kernel's index maps against a model of the PTX
    ldmatrix/mma semantics (tests/u8_syrk_emulator.cpp, built with the host compiler);
    backend selection, launch-argument checks and error messages without a GPU; the
    Triton kernels under Triton's CPU interpreter: the tests marked ``triton_interpret``,
    collected only in a process started with TRITON_INTERPRET=1 (`.ci/run`'s interpreter
    step), because Triton reads the variable when a kernel is first built and the package
    registers the interpreter's CPU device at import, both before this module runs.
  * on a CUDA machine: the tensor-core kernel against the plain int64 kernel and numpy,
    the int32 flush at its bound, the float path, estimate_moments bit-identical to the
    reference backend, and the Triton kernels compiled for the GPU.
uint8 results are compared bit for bit: they are exact integer sums.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import analytic_diffusion as ad
from analytic_diffusion import _ext
from analytic_diffusion import registry as _registry
from analytic_diffusion.ops.moments import cuda as _cuda
from analytic_diffusion.ops.moments import triton as _triton

HERE = Path(__file__).resolve().parent
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
HAS_TRITON = importlib.util.find_spec("triton") is not None
HAS_CUDA = torch.cuda.is_available()
CUDA_KERNELS = HAS_CUDA and _cuda.available()

interp = pytest.mark.triton_interpret  # collected only with TRITON_INTERPRET=1 (tests/conftest.py)
needs_cuda_kernels = pytest.mark.skipif(not CUDA_KERNELS, reason="needs a CUDA device and the _C_cuda moments kernels")
needs_cuda_triton = pytest.mark.skipif(not (HAS_CUDA and HAS_TRITON and not INTERPRET), reason="needs a CUDA device and Triton (not interpreted)")


# --------------------------------------------------------------------------- helpers
def u8(shape, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, shape, generator=g, dtype=torch.uint8).to(device)


def exact_sums(x: torch.Tensor):
    """int64 numpy column sums and lower-triangle products of uint8 x [B, n]."""
    u = x.cpu().numpy().astype(np.int64)
    return u.sum(0), np.tril(u.T @ u)


def check_update(update, x: torch.Tensor, **kw) -> None:
    """``update`` adds exactly sum u and the lower triangle of u^T u onto existing sums and
    leaves the upper triangle alone."""
    n = x.shape[1]
    s1 = torch.full((n,), 7, dtype=torch.int64, device=x.device)
    s2 = torch.full((n, n), -3, dtype=torch.int64, device=x.device)
    update(x, s1, s2, **kw)
    if x.device.type == "cuda":
        torch.cuda.synchronize(x.device)
    r1, r2 = exact_sums(x)
    got1 = s1.cpu().numpy() - 7
    got2 = s2.cpu().numpy() + 3
    assert np.array_equal(got1, r1), "column sums differ"
    bad = np.argwhere(np.tril(got2) != r2)
    assert bad.size == 0, f"{len(bad)} lower-triangle entries differ, first at {bad[0].tolist()}: {np.tril(got2)[tuple(bad[0])]} != {r2[tuple(bad[0])]}"
    assert np.all(np.triu(got2, 1) == 0), "entries above the diagonal were written"


def layouts(device):
    """uint8 [B, n] views with the strides the kernels must handle."""
    base = u8((61, 90), seed=3, device=device)
    return {
        "contiguous n%4==0": u8((50, 132), seed=4, device=device),
        "column slice (misaligned start)": base[:, 1:70],
        "every other column": base[:, ::2],
        "transposed": u8((77, 45), seed=5, device=device).T,
        "every third row": base[::3, :40],
        "broadcast row (stride0 = 0)": base[:1, :33].expand(25, 33),
        "padded rows (stride0 % 4 == 0, n odd)": u8((40, 136), seed=6, device=device)[:, :131],
    }


SHAPES = [(B, n) for n in (5, 33, 70) for B in (1, 37, 130)]


# --------------------------------------------------------------------------- no GPU needed
def test_emulator_replays_cuda_kernel(tmp_path):
    """The CUDA kernel's index maps, run on the CPU through a PTX ldmatrix/mma model."""
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if cxx is None:
        pytest.skip("no host C++ compiler")
    exe = tmp_path / "u8_syrk_emulator"
    build = subprocess.run([cxx, "-std=c++17", "-O2", "-o", str(exe), str(HERE / "u8_syrk_emulator.cpp")], capture_output=True, text=True)
    assert build.returncode == 0, build.stderr
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "all emulator checks passed" in run.stdout


def test_cuda_backend_not_offered_for_cpu_tensors():
    assert "cuda" not in ad.available_backends("moments", "cpu")
    x = u8((4, 3, 2, 2))
    with pytest.raises(ValueError, match="does not run on cpu"):
        ad.estimate_moments(x, backend="cuda")
    with pytest.raises(ValueError, match="does not run on cpu"):
        ad.MomentAccumulator((3, 2, 2), backend="cuda").update(x)
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        _cuda.u8_syrk_update(x.reshape(4, -1), torch.zeros(12, dtype=torch.int64), torch.zeros(12, 12, dtype=torch.int64))


@pytest.mark.skipif(HAS_CUDA, reason="checks the behaviour without a GPU")
def test_cuda_backend_unavailable_without_gpu():
    assert "cuda" not in ad.available_backends("moments", "cuda")
    with pytest.raises(RuntimeError, match="not available"):
        _registry.select("moments", "cuda", "cuda")
    mod = _ext.cuda_module()
    if mod is None:
        pytest.skip("_C_cuda was not built")
    with pytest.raises(RuntimeError, match="CUDA"):  # no driver/device: a clean error, no crash
        mod.u8_syrk_update(0, 2, 2, 2, 1, 0, 0, 0)


@pytest.mark.skipif(INTERPRET, reason="the interpreter registers Triton for CPU tensors")
def test_triton_backend_not_offered_for_cpu_tensors():
    assert "triton" not in ad.available_backends("moments", "cpu")
    with pytest.raises(ValueError, match="does not run on cpu"):
        ad.estimate_moments(u8((4, 3, 2, 2)), backend="triton")


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(bk=16), "bk must be one of"),  # an int8 tl.dot needs K >= 32: no GPU compiles it
        (dict(bk=4096), "bk must be one of"),  # 1.3 MB of shared memory: no GPU launches it
        (dict(bk=48), "bk must be one of"),  # not a power of two
        (dict(block=24), "block must be one of"),
        (dict(block=8), "block must be one of"),
        (dict(block=128, bk=256, num_stages=2), "shared memory"),  # 128 KiB of staged tiles
        (dict(num_stages=5), "num_stages"),
        (dict(num_warps=3), "num_warps"),
    ],
)
def test_triton_syrk_refuses_launch_arguments_no_gpu_runs(kw, match):
    """The same ValueError on every device, before anything else is looked at: CPU tensors
    without the interpreter, under it, and CUDA tensors."""
    x = u8((40, 33))
    s1, s2 = torch.zeros(33, dtype=torch.int64), torch.zeros(33, 33, dtype=torch.int64)
    with pytest.raises(ValueError, match=match):
        _triton.u8_syrk_update(x, s1, s2, **kw)
    assert not s1.any() and not s2.any()


def test_triton_syrk_limits_admit_the_defaults_and_benchmark_shapes():
    sys.path.insert(0, str(HERE.parent / "benchmarks"))
    try:
        import bench_moments_gpu  # its Triton launch shapes
    finally:
        sys.path.pop(0)
    for cfg in [_triton._SYRK_GPU_DEFAULT, _triton._SYRK_GPU_STRIDED] + [dict(_triton._SYRK_GPU_DEFAULT, **c) for c in bench_moments_gpu.TRITON_CONFIGS]:
        _triton._check_syrk_launch(cfg["block"], cfg["bk"], cfg["num_warps"], cfg["num_stages"])
    _triton._check_syrk_launch(_triton._SYRK_CPU_DEFAULT["block"], _triton._SYRK_CPU_DEFAULT["bk"], None, None)


def test_package_imports_without_triton():
    code = (
        "import sys; sys.modules['triton'] = None\n"  # makes `import triton` fail
        "import analytic_diffusion as ad\n"
        "for op in ('moments', 'locality_denoise', 'optimal_denoise'):\n"  # one subprocess for every Triton op
        "    assert 'triton' not in ad.available_backends(op, 'cpu'), (op, ad.available_backends(op, 'cpu'))\n"
        "    assert 'triton' not in ad.available_backends(op), op\n"
        "print('ok')\n"
    )
    env = dict(os.environ, TRITON_INTERPRET="1")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0 and "ok" in r.stdout, r.stdout + r.stderr


# --------------------------------------------------------------------------- Triton, interpreted on CPU
@interp
def test_interp_registered_for_cpu():
    assert "triton" in ad.available_backends("moments", "cpu")


@interp
@pytest.mark.parametrize("B,n", SHAPES)
def test_interp_u8_syrk_exact(B, n):
    check_update(_triton.u8_syrk_update, u8((B, n), seed=B * 1000 + n))


@interp
def test_interp_k_block_flushes():
    # 37 images in int32 blocks of 7: six flushes, the last one partial
    check_update(_triton.u8_syrk_update, u8((37, 33), seed=9), k_block=7)
    check_update(_triton.u8_syrk_update, u8((130, 20), seed=10), k_block=64, bk=32)


@interp
@pytest.mark.slow
def test_interp_int32_overflow_is_flushed():
    # u = 0 is s = -128: each image adds 2^14 to sum s_i s_j, so 131200 images sum to
    # 2149580800 > 2^31 - 1. One int32 accumulator would wrap; K blocks of 65536 do not.
    B = 131200
    assert B * 128 * 128 > 2**31 - 1
    x = torch.zeros((B, 5), dtype=torch.uint8)
    x[::3, 1] = 255
    x[5::7, 4] = 17
    check_update(_triton.u8_syrk_update, x, bk=256)  # the largest K step accepted (SYRK_LIMITS)


@interp
@pytest.mark.parametrize("name", list(layouts("cpu")))
def test_interp_strided_rows(name):
    check_update(_triton.u8_syrk_update, layouts("cpu")[name])


@interp
def test_interp_estimate_moments_bitwise_equal_reference():
    x = u8((40, 3, 4, 4), seed=11)
    ref = ad.estimate_moments(x, batch_size=16, backend="reference")
    got = ad.estimate_moments(x, batch_size=16, backend="triton")
    assert got.count == ref.count
    assert torch.equal(got.mean, ref.mean) and torch.equal(got.cov, ref.cov)
    # float data goes through the float64 path: same maths, float64 rounding
    xf = x.double() / 127.5 - 1
    ref_f = ad.estimate_moments(xf, batch_size=16, backend="reference")
    got_f = ad.estimate_moments(xf, batch_size=16, backend="triton")
    assert torch.allclose(got_f.cov, ref_f.cov, rtol=0, atol=1e-14)


# --------------------------------------------------------------------------- CUDA kernels
@needs_cuda_kernels
@pytest.mark.parametrize("B,n", SHAPES + [(33, 129), (200, 257), (1000, 300), (64, 128), (65, 16)])
def test_cuda_mma_matches_fallback_and_numpy(B, n):
    x = u8((B, n), seed=B + n, device="cuda")
    check_update(_cuda.u8_syrk_update, x)  # tensor cores
    check_update(_cuda.u8_syrk_update, x, use_mma=False)  # plain int64 loops


@needs_cuda_kernels
@pytest.mark.parametrize("name", list(layouts("cpu")))
def test_cuda_strided_rows(name):
    x = layouts("cuda")[name]
    check_update(_cuda.u8_syrk_update, x)
    check_update(_cuda.u8_syrk_update, x, use_mma=False)


@needs_cuda_kernels
@pytest.mark.parametrize("k_block", [1, 64, 100, 4096])
def test_cuda_k_block_flushes(k_block):
    # several K ranges per tile: atomically flushed partial sums, unshift applied once
    check_update(_cuda.u8_syrk_update, u8((1000, 150), seed=k_block, device="cuda"), k_block=k_block)


@needs_cuda_kernels
def test_cuda_k_block_at_int32_bound():
    # 25 tiles per side = 325 tiles: enough to fill a 132-SM (or 148-SM) GPU without extra
    # K splits, so with k_block = 131071 (-> 131008, a multiple of the 64-image stage)
    # one block really sums all B = 131008 images in int32. Mostly u = 0 (s = -128,
    # s^2 = 2^14): 131008 * 2^14 = 2146435072 is within 2^31 - 1 by 0.05%; 64 more
    # images would wrap.
    B, n = 131008, 25 * 128
    assert B * 2**14 <= 2**31 - 1 < (B + 64) * 2**14
    x = torch.zeros((B, n), dtype=torch.uint8, device="cuda")
    g = torch.Generator(device="cuda").manual_seed(0)
    x[torch.rand((B, n), device="cuda", generator=g) < 0.05] = 255
    s1 = torch.zeros(n, dtype=torch.int64, device="cuda")
    s2 = torch.zeros(n, n, dtype=torch.int64, device="cuda")
    _cuda.u8_syrk_update(x, s1, s2, k_block=131071)
    # exact reference on the GPU: float64 GEMM of integers below 2^53 is exact
    ref = torch.zeros(n, n, dtype=torch.float64, device="cuda")
    for k in range(0, B, 16384):
        xk = x[k : k + 16384].double()
        ref.addmm_(xk.T, xk)
    assert torch.equal(s1, x.sum(0, dtype=torch.int64))
    assert torch.equal(s2.tril(), ref.tril().to(torch.int64))
    with pytest.raises(ValueError, match="k_block"):
        _cuda.u8_syrk_update(x[:2], s1, s2, k_block=131072)


@needs_cuda_kernels
def test_cuda_float_path_is_float64():
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(300, 200, generator=g, dtype=torch.float64) * 2 - 1).to(torch.float32)
    ref = x.double().mean(0)
    s1 = torch.zeros(200, dtype=torch.float64, device="cuda")
    s2 = torch.zeros(200, 200, dtype=torch.float64, device="cuda")
    _cuda.f64_syrk_update(x.cuda(), ref.cuda(), s1, s2)
    z = x.double() - ref
    want = z.T @ z
    err = float((s2.cpu().tril() - want.tril()).abs().max() / want.abs().max())
    assert err <= 1e-12, err
    assert float((s1.cpu() - z.sum(0)).abs().max()) <= 1e-12


@needs_cuda_kernels
def test_cuda_estimate_moments_bitwise_equal_reference():
    x = u8((300, 3, 8, 8), seed=12)
    ref = ad.estimate_moments(x, batch_size=64, backend="reference")
    got = ad.estimate_moments(x.cuda(), batch_size=64, backend="cuda")
    assert got.mean.device.type == "cuda"
    assert torch.equal(got.mean.cpu(), ref.mean) and torch.equal(got.cov.cpu(), ref.cov)
    # host data streamed to the GPU (pinned copies on a side stream)
    got2 = ad.estimate_moments(x, batch_size=64, device="cuda", backend="cuda")
    assert torch.equal(got2.cov.cpu(), ref.cov)
    # the default backend for CUDA tensors is the fastest registered one
    assert ad.available_backends("moments", "cuda")[0] == "cuda"


@needs_cuda_kernels
def test_cuda_rejects_host_memory():
    mod = _ext.cuda_module()
    x = u8((4, 4))
    s1 = torch.zeros(4, dtype=torch.int64, device="cuda")
    s2 = torch.zeros(4, 4, dtype=torch.int64, device="cuda")
    ws = torch.zeros(4, dtype=torch.int64, device="cuda")
    with pytest.raises(ValueError, match="host memory"):
        mod.u8_syrk_update(x.data_ptr(), 4, 4, 4, 1, s1.data_ptr(), s2.data_ptr(), ws.data_ptr(), 0, 0, True)


# --------------------------------------------------------------------------- Triton on the GPU
@needs_cuda_triton
@pytest.mark.parametrize("B,n", SHAPES + [(33, 129), (200, 257)])
def test_triton_cuda_exact(B, n):
    check_update(_triton.u8_syrk_update, u8((B, n), seed=B + n, device="cuda"))


@needs_cuda_triton
def test_triton_cuda_layouts_and_flush():
    for x in layouts("cuda").values():
        check_update(_triton.u8_syrk_update, x)
    check_update(_triton.u8_syrk_update, u8((1000, 150), seed=1, device="cuda"), k_block=100)


@needs_cuda_triton
def test_triton_cuda_estimate_moments_bitwise_equal_reference():
    x = u8((300, 3, 8, 8), seed=12)
    ref = ad.estimate_moments(x, batch_size=64, backend="reference")
    got = ad.estimate_moments(x.cuda(), batch_size=64, backend="triton")
    assert torch.equal(got.mean.cpu(), ref.mean) and torch.equal(got.cov.cpu(), ref.cov)
