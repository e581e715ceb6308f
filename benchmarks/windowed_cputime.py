"""Second measurement for benchmarks/results/windowed_locality_cpu.md: single-thread CPU time
(``time.process_time``, less sensitive to other jobs on a shared machine than wall time) of
the windowed CPU kernel (pruned and unpruned, docs/algorithms.md §14.6) and of the dense-mask
CPU path with its plan cached, per DDIM step, calls interleaved, min of ``--repeats``.

Run as a script (not collected by pytest)::

    OMP_NUM_THREADS=1 PYTHONPATH=python python benchmarks/windowed_cputime.py --n 400

Prints one markdown table row per step and the geometric means.
"""
from __future__ import annotations

import argparse
import math
import os
import time

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=400, help="training images")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", type=str, default="", help="comma-separated timesteps (default: the 10 DDIM steps)")
    args = p.parse_args()
    torch.set_num_threads(1)
    import analytic_diffusion as ad
    from analytic_diffusion.ops.windowed_locality import cpu as wl_cpu

    steps = [int(s) for s in args.steps.split(",")] if args.steps else ad.ddim_timesteps(10)
    crops = ad.data.natural_crops(args.n + args.batch, size=args.size, seed=0)
    ww = ad.WindowedWiener(ad.estimate_patch_moments(ad.data.natural_crops(2000, size=args.size, seed=1), 9))
    train, held = crops[: args.n], crops[args.n :]
    shape = (3, args.size, args.size)

    def cpu_time(fn):
        t0 = time.process_time()
        fn()
        return time.process_time() - t0

    print(f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}, N = {args.n}, B = {args.batch}, {args.size}x{args.size}x3, "
          f"load average at the start {os.getloadavg()[0]:.1f}")
    print("| t | ours (s) | ours unpruned (s) | dense-mask cpu (s) | per call | pruning gain | skipped |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    logs, gains = [], []
    for t in steps:
        ab = ad.alpha_bar_at(t)
        window = ww.mask(ab, 0.02)
        x0 = held.double() / 127.5 - 1
        g = torch.Generator().manual_seed(t)
        x = (math.sqrt(ab) * x0 + math.sqrt(1 - ab) * torch.randn(x0.shape, generator=g, dtype=torch.float64)).float()
        mask = ww.dense_mask(ab, 0.02, image_shape=shape)
        dense = lambda: ad.ops.locality_denoise(x, train, mask, ab, backend="cpu")  # noqa: E731
        dense()  # builds and caches the dense plan
        st: dict = {}
        ours = lambda: wl_cpu.windowed_locality_denoise_cpu(x, train, window, ab, stats=st)  # noqa: E731
        plain = lambda: wl_cpu.windowed_locality_denoise_cpu(x, train, window, ab, prune=False)  # noqa: E731
        to, tu, td = [], [], []
        for _ in range(args.repeats):
            to.append(cpu_time(ours))
            tu.append(cpu_time(plain))
            td.append(cpu_time(dense))
        mask = None  # the n x n mask (150 MB at 64x64x3) is not kept across steps
        o, u, d = min(to), min(tu), min(td)
        logs.append(math.log(d / o))
        gains.append(math.log(u / o))
        print(f"| {t} | {o:.3f} | {u:.3f} | {d:.3f} | {d / o:.2f}x | {u / o:.2f}x | {st['skipped_fraction']:.1%} |", flush=True)
    print(f"\ngeometric mean per call vs dense: {math.exp(sum(logs) / len(logs)):.2f}x; "
          f"pruned vs unpruned: {math.exp(sum(gains) / len(gains)):.2f}x; load average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
