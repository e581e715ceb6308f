"""Second measurement for benchmarks/results/windowed_locality_cpu.md: single-thread CPU time
(``time.process_time``, less sensitive to other jobs on a shared machine than wall time) of
the windowed CPU kernel (pruned and unpruned, docs/algorithms.md §14.6) and of the dense-mask
CPU path with its plan cached, per DDIM step, calls interleaved, min of ``--repeats``.

Run as a script (not collected by pytest)::

    OMP_NUM_THREADS=1 PYTHONPATH=python python benchmarks/windowed_cputime.py --n 400

Prints one markdown table row per step and the geometric means. With ``--gap`` a second
table follows: per (query, training image, 8 pixel positions), the kernel's phase times
(``last_stats()``), the dense path's time and what 5x would allow, and the share of the work
that *any* certified pruning could skip at best: from the exact float64 logits
(``window_distances``) and their final maxima, the fractions of (query, image, channel,
8 pixels) vectors, of whole (query, image) rows and of whole (query, image) pairs whose logits
all lie more than the pruning margin (docs/algorithms.md §14.6) below the maximum.
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
    p.add_argument("--gap", action="store_true", help="also the per-unit cost table and the pruning bounds")
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
    gap_rows = []
    for t in steps:
        ab = ad.alpha_bar_at(t)
        window = ww.mask(ab, 0.02)
        x0 = held.double() / 127.5 - 1
        g = torch.Generator().manual_seed(t)
        x = (math.sqrt(ab) * x0 + math.sqrt(1 - ab) * torch.randn(x0.shape, generator=g, dtype=torch.float64)).float()
        mask = ww.dense_mask(ab, 0.02, image_shape=shape)
        dense = lambda: ad.ops.locality_denoise(x, train, mask, ab, backend="cpu")  # noqa: E731
        dense()  # builds and caches the dense plan
        plain = lambda: wl_cpu.windowed_locality_denoise_cpu(x, train, window, ab, prune=False)  # noqa: E731
        to, tu, td = [], [], []
        for _ in range(args.repeats):
            call: dict = {}
            to.append(cpu_time(lambda: wl_cpu.windowed_locality_denoise_cpu(x, train, window, ab, stats=call)))
            if to[-1] == min(to):
                st = call  # the phase times of the fastest call, the one reported
            tu.append(cpu_time(plain))
            td.append(cpu_time(dense))
        mask = None  # the n x n mask (150 MB at 64x64x3) is not kept across steps
        o, u, d = min(to), min(tu), min(td)
        logs.append(math.log(d / o))
        gains.append(math.log(u / o))
        print(f"| {t} | {o:.3f} | {u:.3f} | {d:.3f} | {d / o:.2f}x | {u / o:.2f}x | {st['skipped_fraction']:.1%} |", flush=True)
        if args.gap:
            gap_rows.append((t, st, o, d, dead_fractions(x, train, window, ab)))
    print(f"\ngeometric mean per call vs dense: {math.exp(sum(logs) / len(logs)):.2f}x; "
          f"pruned vs unpruned: {math.exp(sum(gains) / len(gains)):.2f}x; load average at the end {os.getloadavg()[0]:.1f}")
    if gap_rows:
        units = args.batch * args.n * args.size * args.size / 8  # (query, image, 8 pixel positions)
        ns = lambda sec: sec / units * 1e9  # noqa: E731
        print("\nns per (query, training image, 8 pixel positions), one thread; dead: the best any certified pruning could skip")
        print("| t | ours | load | distances | softmax | dense-mask cpu | 5x needs | dead vectors | dead rows | dead pairs |")
        print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for t, st, o, d, (fv, fr, fp) in gap_rows:
            print(f"| {t} | {ns(o):.1f} | {ns(st['load_seconds']):.1f} | {ns(st['distance_seconds']):.1f} | "
                  f"{ns(st['softmax_seconds']):.1f} | {ns(d):.1f} | {ns(d) / 5:.1f} | {fv:.1%} | {fr:.1%} | {fp:.1%} |")


def dead_fractions(x, train, window, alpha_bar):
    """Fractions of (query, image, channel, 8 pixels) vectors, (query, image) rows and
    (query, image) pairs whose exact float64 logits all lie more than the pruning margin below
    their final maximum: an upper bound on what a certified skip test, before or after the
    distances, could leave out (docs/algorithms.md §14.6)."""
    from analytic_diffusion._validate import to_unit
    from analytic_diffusion.ops.pruning import softmax_logit_margin
    from analytic_diffusion.ops.windowed_locality.reference import window_distances
    from analytic_diffusion.schedule import noise_level

    a, s2 = noise_level(alpha_bar)
    y = to_unit(train, torch.float64)  # the images exactly as the kernel sees them
    N, (C, H, W) = y.shape[0], y.shape[1:]
    margin = softmax_logit_margin(N)
    dv = dr = dp = 0
    for b in range(x.shape[0]):
        lg = -window_distances(x[b : b + 1].double(), y, window, a)[0] / (2 * s2)  # [N, C, H, W]
        dead = lg < lg.max(0).values - margin
        vec = dead[..., : W - W % 8].reshape(N, C, H, W // 8, 8).all(-1)
        dv += vec.float().mean().item()
        dr += dead.all(1).all(-1).float().mean().item()
        dp += dead.reshape(N, -1).all(1).float().mean().item()
    B = x.shape[0]
    return dv / B, dr / B, dp / B


if __name__ == "__main__":
    main()
