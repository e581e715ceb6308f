"""locality_denoise on the GPU at the CIFAR shape (N = 50000 training images, n = 3072,
B = 128 queries) per DDIM timestep: the Triton backend (exact softmax) against the
reference backend (exact, float32) and the published algorithm (dense float32 einsum +
WSSM, ``official_locality_denoise`` of bench_locality_denoise.py), all on the same
device; relative errors against float64 exact.

Data: natural 32x32 crops (a quarter of N drawn, each also flipped horizontally,
vertically and both, to reach N quickly), uint8 on the device; masks from the Wiener
filter of 5000 other crops at threshold 0.02; queries = noisy copies of held-out crops.

Costs, so that the run fits a short GPU lease: the Triton backend is timed at full size
(CUDA events, median of ``--repeats``); the two baselines are timed on the first
``--n-base`` training images and scaled by N / n_base (both are linear in N; the rows
say ``baseline_extrapolated``), and accuracy is measured on the first ``--b-acc``
queries against a float64 reference over the whole training set.

As a pytest-benchmark module it is skipped without a CUDA device and records rows with
the ``record`` fixture (AD_BENCH_QUICK=1 shrinks it). As a script
(``python benchmarks/bench_locality_gpu.py --json out.json``) it prints one JSON line per
row and writes them all; benchmarks/gpu_check.sh runs it that way.
"""
from __future__ import annotations

import json
import math
import sys
import time

import pytest
import torch

import analytic_diffusion as ad
import gpu_bench
from analytic_diffusion.ops import triton_support
from analytic_diffusion.ops.locality import triton as _triton

try:  # pytest (benchmarks/ is the rootdir's conftest directory) or script (same folder)
    from conftest import QUICK
except ImportError:  # pragma: no cover
    QUICK = False
from bench_locality_denoise import official_locality_denoise

TARGET_S = 0.06  # the target: seconds per step, averaged over the 10 DDIM steps (H100)


def cuda_seconds(fn, repeats: int = 3, warmup: int = 1) -> float:
    return gpu_bench.cuda_seconds(fn, repeats, warmup, dev="cuda" if torch.cuda.is_available() else "cpu")


rel_err = gpu_bench.rel_err


def make_data(N: int, B: int, size: int = 32, device: str = "cuda"):
    """uint8 train [N, n] and held-out clean images [B, n] on ``device``; Wiener filter."""
    quarter = -(-N // 4)
    c = ad.data.natural_crops(quarter + B, size=size, seed=0)
    base, held = c[:quarter], c[quarter:]
    train = torch.cat([base, base.flip(3), base.flip(2), base.flip(2, 3)])[:N]
    mom = ad.estimate_moments(ad.data.natural_crops(max(5000 if size >= 32 else 400, 2), size=size, seed=1))
    filt = ad.WienerFilter(mom.cov.to(device), mom.mean.to(device))  # float64 eigh on the device
    return train.reshape(N, -1).to(device), held.reshape(B, -1).to(device), filt


def run(N: int = 50000, B: int = 128, timesteps=None, n_base: int = 5000, b_acc: int = 4, repeats: int = 3, size: int = 32, dev: str = "cuda"):
    """One row per timestep (plus an average and an optimal_denoise row). ``dev="cpu"``
    with TRITON_INTERPRET=1 and tiny sizes is a dry run of this script's logic."""
    timesteps = list(ad.ddim_timesteps(10) if timesteps is None else timesteps)
    t0 = time.perf_counter()
    train, held, filt = make_data(N, B, size, dev)
    setup_s = time.perf_counter() - t0
    name = torch.cuda.get_device_name() if dev == "cuda" else "cpu (Triton interpreter)"
    n = train.shape[1]
    nb = min(n_base, N)
    train_f32_base = (train[:nb].float() - 127.5) / 127.5
    rows = []
    for t in timesteps:
        ab = ad.alpha_bar_at(t)
        mask = filt.mask(ab, 0.02)
        g = torch.Generator(device=dev).manual_seed(t)
        x0 = (held.double() - 127.5) / 127.5
        x = math.sqrt(ab) * x0 + math.sqrt(1 - ab) * torch.randn(x0.shape, generator=g, device=dev, dtype=torch.float64)
        x32 = x.float()
        row = dict(bench="locality_gpu", t=t, N=N, B=B, n=n, device=name, density=float(mask.float().mean()))
        try:
            t1 = time.perf_counter()
            _triton._prepare_locality(mask)
            if dev == "cuda":
                torch.cuda.synchronize()
            row["plan_s"] = time.perf_counter() - t1
            blk, bms, _ = _triton._loc_blocks(torch.device(dev), n, B, None)
            plan = _triton._plan(mask, blk["BJ"], bms)
            row["single_window"] = plan.single
            row["block_density"] = 1.0 if plan.single else plan.density()
            row["hi_lo_split"] = (not plan.single) and _triton._precision_split(plan, 1 / (2 * (1 - ab)), None)
            t1 = time.perf_counter()
            _triton.locality_denoise_triton(x32, train, mask, ab)  # compiles / autotunes on first use
            if dev == "cuda":
                torch.cuda.synchronize()
            row["first_call_s"] = time.perf_counter() - t1
            row["seconds"] = cuda_seconds(lambda: _triton.locality_denoise_triton(x32, train, mask, ab), repeats=repeats, warmup=0)
            # accuracy: the first b_acc queries, full training set, against float64
            xa = x[:b_acc]
            ref64 = ad.ops.locality_denoise_reference(xa, train, mask, ab)
            row["rel_err"] = rel_err(_triton.locality_denoise_triton(xa.float(), train, mask, ab), ref64)
            row["official_rel_err"] = rel_err(official_locality_denoise(xa.float(), (train.float() - 127.5) / 127.5, mask, ab), ref64)
            # baselines on the first nb images, scaled to N
            scale = N / nb
            row["reference_f32_s"] = scale * cuda_seconds(
                lambda: ad.ops.locality_denoise_reference(x32, train[:nb], mask, ab), repeats=1, warmup=0)
            row["official_s"] = scale * cuda_seconds(
                lambda: official_locality_denoise(x32, train_f32_base, mask, ab), repeats=1, warmup=0)
            row["baseline_extrapolated"] = nb < N
            row["speedup_vs_official"] = row["official_s"] / row["seconds"]
            row["speedup_vs_reference"] = row["reference_f32_s"] / row["seconds"]
        except Exception as e:  # keep going: one failing step must not hide the rest
            row["error"] = f"{type(e).__name__}: {e}"[:500]
        if dev == "cuda":
            torch.cuda.empty_cache()
        rows.append(row)
        print(json.dumps(row), flush=True)
    ok = [r for r in rows if "seconds" in r]
    if len(ok) == len(rows) and rows:
        avg = sum(r["seconds"] for r in ok) / len(ok)
        rows.append(dict(bench="locality_gpu average", N=N, B=B, n=n, device=name, steps=len(ok), seconds=avg,
                         target_s=TARGET_S, meets_target=avg <= TARGET_S, max_rel_err=max(r["rel_err"] for r in ok),
                         official_s=sum(r["official_s"] for r in ok) / len(ok), setup_s=setup_s))
        print(json.dumps(rows[-1]), flush=True)
    # the optimal denoiser (one distance per image), same data
    try:
        ab = ad.alpha_bar_at(300)
        x = math.sqrt(ab) * (held.double() - 127.5) / 127.5 + math.sqrt(1 - ab) * torch.randn(held.shape, device=dev, dtype=torch.float64)
        x32 = x.float()
        sec = cuda_seconds(lambda: _triton.optimal_denoise_triton(x32, train, ab), repeats=repeats)
        ref_s = cuda_seconds(lambda: ad.ops.optimal_denoise_reference(x32, train, ab), repeats=1)
        err = rel_err(_triton.optimal_denoise_triton(x32[:b_acc], train, ab), ad.ops.optimal_denoise_reference(x[:b_acc], train, ab))
        rows.append(dict(bench="optimal_gpu", t=300, N=N, B=B, n=n, device=name, seconds=sec, reference_f32_s=ref_s, rel_err=err))
    except Exception as e:
        rows.append(dict(bench="optimal_gpu", N=N, B=B, n=n, device=name, error=f"{type(e).__name__}: {e}"[:500]))
    print(json.dumps(rows[-1]), flush=True)
    return rows


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_locality_gpu_cifar_shape(benchmark, record):
    if not triton_support.available():
        pytest.skip("the Triton backend is not available")
    kw = dict(N=2000, B=16, timesteps=[900, 300, 0], n_base=500) if QUICK else {}
    rows = run(**kw)
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)  # timings come from CUDA events
    for r in rows:
        assert "error" not in r, r
        if r["bench"] == "locality_gpu":
            record("locality_gpu", f"N={r['N']} B={r['B']} n={r['n']} t={r['t']} density={r['density']:.3f}", "triton",
                   r["seconds"], baseline="official (fp32 dense + WSSM)", baseline_seconds=r["official_s"], rel_err=r["rel_err"],
                   device="cuda", reference_f32_s=r["reference_f32_s"], baseline_extrapolated=r["baseline_extrapolated"],
                   hi_lo_split=r["hi_lo_split"], single_window=r["single_window"], official_rel_err=r["official_rel_err"])
            assert r["rel_err"] < 1e-3
        elif r["bench"] == "locality_gpu average":
            record("locality_gpu average", f"N={r['N']} B={r['B']} n={r['n']}, {r['steps']} DDIM steps", "triton", r["seconds"],
                   baseline="official (fp32 dense + WSSM)", baseline_seconds=r["official_s"], device="cuda",
                   target_s=r["target_s"], max_rel_err=r["max_rel_err"])
        else:
            record("optimal_gpu", f"N={r['N']} B={r['B']} n={r['n']} t=300", "triton", r["seconds"], baseline="reference (fp32)",
                   baseline_seconds=r["reference_f32_s"], rel_err=r["rel_err"], device="cuda")


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    gpu_bench.add_common_args(p)
    p.add_argument("--N", type=int, default=None, help="training images (default 50000; dry run 40)")
    p.add_argument("--B", type=int, default=None, help="queries (default 128; dry run 2)")
    p.add_argument("--t", type=int, nargs="*", default=None, help="timesteps (default: the 10 DDIM steps; dry run 900 300 0)")
    p.add_argument("--n-base", type=int, default=5000, help="training images the baselines are timed on")
    p.add_argument("--b-acc", type=int, default=4, help="queries the float64 accuracy check uses")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    dev = gpu_bench.pick_device(args)
    if dev == "cuda":
        rows = run(args.N or 50000, args.B or 128, args.t, args.n_base, args.b_acc, args.repeats)
    else:  # 8x8 crops (n = 192), a few images: the same code paths, in the interpreter
        rows = run(args.N or 40, args.B or 2, args.t or [900, 300, 0], n_base=20, b_acc=2, repeats=1, size=8, dev="cpu")
    gpu_bench.write_json(args.json, rows, dev)
    return 0 if all("error" not in r for r in rows) and all(r.get("rel_err", 0) < 1e-3 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
