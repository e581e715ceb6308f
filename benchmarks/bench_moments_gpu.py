"""uint8 moment sums on the GPU: the int8 tensor-core SYRK (CUDA and Triton backends)
against torch float64 ``X^T X`` (the exact float path) on the same data, same run; and the
uint8 patch sums of ``patch_moments`` (Triton) with the tensor-core lag products against the
CUDA-core kernel (script only, ``PATCH_CASES``).

As a pytest-benchmark module it is skipped without a CUDA device. As a script
(``python benchmarks/bench_moments_gpu.py --json out.json``) it prints one line per
case and writes a JSON record; benchmarks/gpu_check.sh runs it that way.

Work is counted as the lower triangle SYRK does: ``2 * N * n * (n + 1) / 2`` integer
operations per update; "peak" is the dense int8 tensor-core rate of an H100 SXM
(1979 TOPS, KERNEL-NOTES.md), so on an H200 or PCIe card the percentage is relative to
that figure, not the card's own.
"""
from __future__ import annotations

import json
import sys

import pytest
import torch

import analytic_diffusion as ad
import gpu_bench
from analytic_diffusion.ops.moments import cuda as _cuda
from analytic_diffusion.ops import triton_support
from analytic_diffusion.ops.moments import triton as _triton
from analytic_diffusion.ops.patch_moments import triton as _patch_triton

try:  # pytest (benchmarks/ is the rootdir's conftest directory) or script (same folder)
    from conftest import QUICK
except ImportError:  # pragma: no cover
    QUICK = False

INT8_PEAK_TOPS = 1979.0  # H100 SXM dense int8
CASES = [(2048, 1024)] if QUICK else [(20000, 3072), (20000, 12288)]
# Triton launch shapes the script times ({} = the library's default). Each compiles for
# sm_80 and sm_90 without register spills (benchmarks/gpu_static_check.py checks every
# entry); the 128 x 128 int64-accumulator tiles tried before spilled ~900 B per thread.
TRITON_CONFIGS = [{}, {"block": 64, "bk": 128, "num_warps": 4, "num_stages": 3}, {"block": 64, "bk": 128, "num_warps": 8, "num_stages": 4}]


def run_case(impl: str, N: int, n: int, seed: int = 0, check: bool = True, dev: str = "cuda", repeats: int = 5, **kw) -> dict:
    g = torch.Generator(device=dev).manual_seed(seed)
    x = torch.randint(0, 256, (N, n), dtype=torch.uint8, device=dev, generator=g)
    s1 = torch.zeros(n, dtype=torch.int64, device=dev)
    s2 = torch.zeros(n, n, dtype=torch.int64, device=dev)
    update = {"cuda": _cuda.u8_syrk_update, "triton": _triton.u8_syrk_update}[impl]
    row = dict(impl=impl, N=N, n=n, device=gpu_bench.device_name(dev), **{k: v for k, v in kw.items() if v is not None})
    if check:  # one update, compared with an exact float64 GEMM (integer sums < 2^53)
        update(x, s1, s2, **kw)
        xd = x.double()
        ref = xd.T @ xd
        row["exact"] = bool(torch.equal(s2.tril(), ref.tril().to(torch.int64))) and bool(torch.equal(s1, x.sum(0, dtype=torch.int64)))
        del xd, ref
        gpu_bench.free(dev)
    seconds = gpu_bench.cuda_seconds(lambda: update(x, s1, s2, **kw), repeats=repeats, warmup=2 if dev == "cuda" else 0, dev=dev)
    ops = 2.0 * N * n * (n + 1) / 2
    row.update(seconds=seconds, tops=ops / seconds / 1e12)
    row["pct_of_int8_peak"] = 100 * row["tops"] / INT8_PEAK_TOPS
    row.update(_baselines(x, N, n, seed, dev))
    return row


_BASELINES: dict = {}


def _baselines(x: torch.Tensor, N: int, n: int, seed: int, dev: str = "cuda") -> dict:
    """torch float64 GEMM on the same data (what the float path costs) and cuBLASLt int8
    GEMM with int32 output (the vendor's tensor-core rate; not exact for large N, shown
    for scale only). Cached per case: every launch config sees the same data."""
    key = (N, n, seed)
    if key in _BASELINES:
        return _BASELINES[key]
    row = {}
    xd = x.double()
    row["torch_f64_seconds"] = gpu_bench.cuda_seconds(lambda: xd.T @ xd, repeats=3, warmup=1, dev=dev)
    row["torch_f64_tflops"] = 2.0 * N * n * n / row["torch_f64_seconds"] / 1e12
    del xd
    gpu_bench.free(dev)
    try:
        s = (x.to(torch.int16) - 128).to(torch.int8)
        st = s.T.contiguous()
        row["torch_int_mm_seconds"] = gpu_bench.cuda_seconds(lambda: torch._int_mm(st, s), repeats=3, warmup=1, dev=dev)
        row["torch_int_mm_tops"] = 2.0 * N * n * n / row["torch_int_mm_seconds"] / 1e12
        del s, st
    except Exception as e:  # _int_mm is a private API with shape rules
        row["torch_int_mm_error"] = gpu_bench.error_text(e)[:200]
    gpu_bench.free(dev)
    _BASELINES[key] = row
    return row


def _available(impl: str) -> bool:
    return {"cuda": _cuda.available, "triton": triton_support.available}[impl]()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("N,n", CASES)
@pytest.mark.parametrize("impl", ["cuda", "triton"])
def test_u8_syrk_gpu(benchmark, record, impl, N, n):
    if not _available(impl):
        pytest.skip(f"the {impl} moments backend is not available")
    row = run_case(impl, N, n)
    assert row["exact"]
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)  # timings come from CUDA events
    benchmark.extra_info.update(row)
    record("moments_gpu", f"uint8 N={N} n={n}", impl, row["seconds"], baseline="torch float64 X^T X",
           baseline_seconds=row["torch_f64_seconds"], device="cuda", tops=row["tops"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_estimate_moments_gpu_end_to_end(benchmark, record):
    if not _cuda.available():
        pytest.skip("the CUDA moments backend is not available")
    N, n = (512, 768) if QUICK else (20000, 3072)
    x = torch.randint(0, 256, (N, n), dtype=torch.uint8, device="cuda")
    run = lambda: ad.estimate_moments(x, batch_size=4096, backend="cuda")  # noqa: E731
    seconds = gpu_bench.cuda_seconds(run, repeats=3, warmup=1)
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    record("moments_gpu", f"estimate_moments uint8 N={N} n={n}", "cuda", seconds, device="cuda")


# patch_moments (Triton): uint8 patch sums of one batch, tensor-core lag products against the
# CUDA-core kernel (docs/patch_moments.md, "GPU kernels"); (B, C, H, W, k)
PATCH_CASES = [(256, 3, 64, 64, 15), (256, 1, 64, 64, 15), (256, 3, 128, 128, 15)]
PATCH_DRY = [(5, 1, 5, 7, 3)]


def patch_case(B: int, C: int, H: int, W: int, k: int, dev: str = "cuda", repeats: int = 5) -> list:
    """Time ``patch_sums`` (whole call) and one launch of the lag products (row lags 0..k-1)
    with each kernel on the same natural-looking random bytes; the tensor-core result must be
    bit-identical to the CUDA-core one."""
    g = torch.Generator(device=dev).manual_seed(0)
    x = torch.randint(0, 256, (B, C, H, W), dtype=torch.uint8, device=dev, generator=g)
    U = x.sum(0, dtype=torch.int64)
    dummy = torch.zeros(1, dtype=torch.float64, device=dev)
    rows, sums = [], {}
    for mma in (True, False):
        blocks = dict(mma=mma)
        row = dict(impl="patch_sums " + ("tensor cores" if mma else "CUDA cores"), shape=f"uint8 B={B} {C}x{H}x{W} k={k}",
                   device=gpu_bench.device_name(dev), auto_picks_mma=_patch_triton.use_mma(x.shape, x.device, True, k - 1))
        sums[mma] = _patch_triton.patch_sums(x, k, blocks=blocks)
        row["seconds"] = gpu_bench.cuda_seconds(lambda: _patch_triton.patch_sums(x, k, blocks=blocks), repeats=repeats,
                                                warmup=1 if dev == "cuda" else 0, dev=dev)
        if mma:
            launch = lambda: _patch_triton._launch_mma(x, U, 0, k, k - 1, blocks)  # noqa: E731
        else:
            launch = lambda: _patch_triton._launch(x, dummy, True, 0, k, k - 1, False, blocks)  # noqa: E731
        row["kernel_seconds"] = gpu_bench.cuda_seconds(launch, repeats=repeats, warmup=1 if dev == "cuda" else 0, dev=dev)
        rows.append(row)
        gpu_bench.free(dev)
    exact = all(torch.equal(a, b) for a, b in zip(sums[True], sums[False]))
    for row in rows:
        row["exact"] = exact
    return rows


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    gpu_bench.add_common_args(p)
    p.add_argument("--N", type=int, default=None, help="images per update (default 20000; dry run 96)")
    p.add_argument("--n", type=int, nargs="*", default=None, help="pixels (default 3072 12288; dry run 40)")
    p.add_argument("--impl", nargs="*", default=None, help="cuda, triton (dry run: triton)")
    p.add_argument("--no-check", action="store_true", help="skip the exactness check (saves memory)")
    args = p.parse_args(argv)
    dev = gpu_bench.pick_device(args)
    dry = dev != "cuda"
    N = args.N or (96 if dry else 20000)
    ns = args.n or ([40] if dry else [3072, 12288])
    impls = args.impl or (["triton"] if dry else ["cuda", "triton"])
    rows = []
    for n in ns:
        for impl in impls:
            # a few launch shapes for Triton: nobody has tuned them on this card yet
            for kw in TRITON_CONFIGS if impl == "triton" else [{}]:
                if not _available(impl):
                    rows.append(dict(impl=impl, N=N, n=n, error="backend not available"))
                    continue
                try:
                    row = run_case(impl, N, n, check=not args.no_check, dev=dev, repeats=1 if dry else 5, **kw)
                except Exception as e:  # keep going: one failing config must not hide the rest
                    row = dict(impl=impl, N=N, n=n, **kw, error=gpu_bench.error_text(e))
                    gpu_bench.free(dev)
                rows.append(row)
                print(json.dumps(row), flush=True)
    for case in PATCH_DRY if dry else PATCH_CASES:
        try:
            for row in patch_case(*case, dev=dev, repeats=1 if dry else 5):
                rows.append(row)
                print(json.dumps(row), flush=True)
        except Exception as e:  # keep going
            rows.append(dict(impl="patch_sums", shape=str(case), error=gpu_bench.error_text(e)))
            gpu_bench.free(dev)
    gpu_bench.write_json(args.json, rows, dev)
    return 0 if all(r.get("exact", True) and "error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
