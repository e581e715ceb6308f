"""``analytic-diffusion demo``: the whole pipeline on bundled natural-image crops."""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Dict, List

import torch

from .common import (
    CLIError,
    add_common_args,
    add_figure_format,
    args_dict,
    backend_arg,
    check_device,
    figure_size,
    finite_float,
    mkdir,
    pick_backends,
    positive_int,
    say,
    timed,
    user_input,
    versions,
    warn_rank,
)

METHODS = ("wiener", "optimal", "nearest", "locality", "windowed")
LABELS = {
    "wiener": "wiener",
    "optimal": "optimal",
    "nearest": "nearest",
    "locality": "locality\n(full cov.)",
    "windowed": "locality\n(windowed,\nstationary)",
}

# N must exceed n = 3*32*32 = 3072 or the full covariance is singular and the masks are
# not local; even at 4096 crops its smallest eigenvalues are noise, which is why the full
# covariance's low-noise windows are speckled (docs/algorithms.md §9). Stationary patch
# statistics have C*k^2 <= 675 dimensions estimated from ~10^6 patches: trustworthy.
DEFAULTS = dict(size=32, num_train=4096, num_samples=8, steps=10, seed=0, threshold=0.02, out="demo_out", patch_sizes="5,9,15")


def add_parser(sub) -> None:
    d = DEFAULTS
    demo = sub.add_parser(
        "demo",
        help="sample bundled natural crops with five denoisers (Wiener, optimal, nearest, locality with full and with windowed statistics); write a grid, window maps and a JSON summary",
        description="Estimate moments of bundled natural-image crops, build locality masks, sample the same seeds "
        "with the Wiener, optimal, nearest and locality denoisers, and write grid.png, locality.png (or --figure-format) and summary.json.",
    )
    demo.add_argument("--size", type=positive_int, default=d["size"], help=f"crop side in pixels (default: {d['size']})")
    demo.add_argument("-N", "--num-train", type=positive_int, default=d["num_train"], help=f"training crops (default: {d['num_train']}; keep it above 3*size^2 for local masks)")
    demo.add_argument("--num-samples", type=positive_int, default=d["num_samples"], help=f"samples per method (default: {d['num_samples']})")
    demo.add_argument("--steps", type=positive_int, default=d["steps"], help=f"DDIM steps (default: {d['steps']})")
    demo.add_argument("--seed", type=int, default=d["seed"], help=f"seed of the crops and of the initial noise (default: {d['seed']})")
    demo.add_argument("--threshold", type=finite_float, default=d["threshold"], help=f"mask threshold, docs/algorithms.md §4 (default: {d['threshold']})")
    demo.add_argument(
        "--patch-sizes", type=patch_sizes_arg, default=DEFAULT_PATCH_SIZES,
        help=f"odd patch sizes of the stationary statistics of the windowed locality denoiser; a step whose window reaches "
        f"the edge of a smaller patch uses the next larger one (default: {d['patch_sizes']})",
    )
    demo.add_argument("--out", default=d["out"], help=f"output folder (default: {d['out']})")
    add_figure_format(demo)
    add_common_args(demo, "backend of the denoiser and moment ops")
    demo.set_defaults(func=run)


DEFAULT_PATCH_SIZES = [5, 9, 15]


def patch_sizes_arg(s: str) -> List[int]:
    import argparse

    try:
        sizes = sorted({int(v) for v in str(s).split(",") if v.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated odd integers such as 5,9,15, got {s!r}") from None
    if not sizes or any(k < 1 or k % 2 == 0 for k in sizes):
        raise argparse.ArgumentTypeError(f"patch sizes must be positive odd integers, got {s!r}")
    return sizes


def run(args) -> int:
    import analytic_diffusion as ad
    from tqdm.auto import tqdm

    t_start = time.perf_counter()
    progress = not args.no_progress
    dev = args.device
    check_device(dev)
    if args.num_train < 2:
        raise CLIError(f"-N/--num-train must be at least 2 (an unbiased covariance needs 2 images), got {args.num_train}")
    ts = ad.ddim_timesteps(args.steps)
    ops = ["moments", "locality_denoise", "optimal_denoise", "nearest_denoise", "windowed_locality_denoise"]
    backends = pick_backends(args.backend, ops, dev)
    bk = {op: backend_arg(backends, args.backend, op) for op in ops}
    timings: Dict[str, object] = {}
    sampling: Dict[str, float] = {}

    say(f"demo: {args.num_train} natural {args.size}x{args.size} crops, {args.num_samples} samples, {args.steps} steps, seed {args.seed}")
    with timed(timings, "data"), user_input():  # natural_crops checks --size
        train = ad.data.natural_crops(args.num_train, size=args.size, seed=args.seed)
    shape = tuple(train.shape[1:])
    C, H, W = shape
    n = C * H * W
    warn_rank(args.num_train, n)
    out = mkdir(Path(args.out))  # after the cheap checks, before the long stages

    with timed(timings, "moments"):
        moments = ad.estimate_moments(train, batch_size=256, device=dev, backend=bk["moments"], progress=progress)
        moments = moments.to("cpu")  # masks and the eigendecomposition are built on the CPU
    say(f"  moments: {timings['moments']:.2f} s")

    with user_input():  # --threshold
        loc = ad.LocalityDenoiser(train, moments, threshold=args.threshold, backend=bk["locality_denoise"])
    with timed(timings, "eigendecomposition"):
        wf = loc.filter  # float64 eigh of the n x n covariance, shared by every mask and the Wiener denoiser
    say(f"  eigendecomposition (n = {n}): {timings['eigendecomposition']:.2f} s")

    # the probed output pixel: the centre of the middle channel (green for RGB)
    pix = (H // 2, W // 2)
    m = (C // 2) * H * W + pix[0] * W + pix[1]
    mask_info: List[dict] = []
    fields, windows = [], []
    with timed(timings, "masks"):
        for t in tqdm(ts, desc="masks", unit="step", disable=not progress):
            mask = loc.mask(t)
            col = mask[:, m]
            win = col if mask.dtype == torch.bool else col != 0  # threshold <= 0: real-valued weights
            density = float((mask != 0).sum(dtype=torch.int64)) / mask.numel()
            mask_info.append({"t": t, "alpha_bar": loc.alpha_bar(t), "density": density, "centre_window": float(win.sum()) / n})
            windows.append(win.reshape(shape))
    with timed(timings, "sensitivity"):
        for t in ts:
            fields.append(wf.sensitivity(loc.alpha_bar(t), m, image_shape=shape)[0])
    say(f"  masks ({len(ts)} steps): {timings['masks']:.2f} s; density " + ", ".join(f"t={d['t']}: {d['density']:.1%}" for d in mask_info))

    # the default sizes adapt to small crops; sizes the user chose must fit
    if args.patch_sizes == DEFAULT_PATCH_SIZES:
        args.patch_sizes = [k for k in args.patch_sizes if k <= min(H, W)] or [min(H, W) - 1 + min(H, W) % 2]
    elif max(args.patch_sizes) > min(H, W):
        raise CLIError(f"--patch-sizes must not exceed the crop size {min(H, W)}, got {max(args.patch_sizes)}")
    with timed(timings, "patch_moments"):
        patch_moments = [ad.estimate_patch_moments(train, k, device=dev, progress=progress).to("cpu") for k in args.patch_sizes]
    say(f"  stationary patch moments (k = {', '.join(map(str, args.patch_sizes))}): {timings['patch_moments']:.2f} s")
    with user_input():
        win = ad.LocalityDenoiser(train, patch_moments, threshold=args.threshold, backend=bk["windowed_locality_denoise"])
    win_info, win_fields, win_windows = [], [], []
    for t in ts:
        info = win.window_info(t)
        win_info.append(info)
        win_windows.append(win.window_of(t, m))
        win_fields.append(win.sensitivity(t, m, image_shape=shape)[0])
    say("  windowed: radius " + ", ".join(f"t={i['t']}: {i['radius']} (k={i['patch_size']})" for i in win_info))

    denoisers = {
        "wiener": ad.WienerDenoiser(wf, alphas_cumprod=loc.alphas_cumprod),  # shares the eigendecomposition
        "optimal": ad.OptimalDenoiser(train, backend=bk["optimal_denoise"]),
        "nearest": ad.NearestDenoiser(train, backend=bk["nearest_denoise"]),
        "locality": loc,
        "windowed": win,
    }
    samples: Dict[str, torch.Tensor] = {}
    for name, den in denoisers.items():
        with timed(sampling, name):
            samples[name] = ad.sample(den, args.num_samples, shape, steps=args.steps, seed=args.seed, progress=progress, device=dev).cpu()
        say(f"  sampling {name}: {sampling[name]:.2f} s")
    timings["sampling"] = sampling

    with timed(timings, "figures"):
        from ..figures import image_grid, locality_figure

        flat_train = ad.data.to_unit_range(train).reshape(train.shape[0], -1)
        nearest_idx, nearest_rmse = {}, {}
        for name, x in samples.items():
            dist, idx = torch.cdist(x.reshape(x.shape[0], -1).float(), flat_train).min(1)
            nearest_idx[name] = idx.tolist()
            nearest_rmse[name] = [float(v) / math.sqrt(n) for v in dist]
        rows = [samples[k] for k in METHODS] + [train[torch.tensor(nearest_idx[k])] for k in ("locality", "windowed")]
        labels = [LABELS[k] for k in METHODS] + ["nearest train\nimage to\nlocality", "nearest train\nimage to\nwindowed"]
        grid_path, fig_path = out / f"grid.{args.figure_format}", out / f"locality.{args.figure_format}"
        win_path = out / f"windows.{args.figure_format}"
        grid = image_grid(rows, labels, path=grid_path)
        fig = locality_figure(torch.stack(fields), torch.stack(windows), ts, [d["density"] for d in mask_info], pixel=pix, path=fig_path)
        wfig = locality_figure(torch.stack(win_fields), torch.stack(win_windows), ts, [i["density"] for i in win_info], pixel=pix, path=win_path)
    timings["total"] = time.perf_counter() - t_start

    summary = {
        "command": "demo",
        "args": args_dict(args),
        "sizes": {"num_train": int(train.shape[0]), "image_shape": list(shape), "n": n, "num_samples": args.num_samples, "steps": args.steps},
        "timesteps": ts,
        "threshold": args.threshold,
        "probe_pixel": {"channel": C // 2, "h": pix[0], "w": pix[1], "flat_index": m},
        "timings_s": timings,
        "masks": mask_info,
        "windowed": {
            "description": "the windowed locality denoiser: stationary patch statistics, one [C, C, k, k] window per step "
            "(patch_size: k of the statistics used; radius: largest |offset| in the window; touches_edge: the window "
            "reaches the edge of the largest patch given)",
            "patch_sizes": list(args.patch_sizes),
            "steps": win_info,
        },
        "nearest_train": {
            "description": "per sample: index of and RMSE ([-1,1] units) to the nearest training image; ~0 means memorised",
            "index": nearest_idx,
            "rmse": nearest_rmse,
            "mean_rmse": {k: sum(v) / len(v) for k, v in nearest_rmse.items()},
            "min_rmse": {k: min(v) for k, v in nearest_rmse.items()},
        },
        "backends": {**backends, "wiener": "torch (float64 eigendecomposition, applied as U (g * U^T v))"},
        "device": str(dev),
        "versions": versions(),
        "build_info": ad.build_info(),
        "files": {
            "grid": {"path": grid_path.name, "size": figure_size(grid), "rows": labels},
            "locality": {"path": fig_path.name, "size": figure_size(fig)},
            "windows": {"path": win_path.name, "size": figure_size(wfig)},
            "summary": "summary.json",
        },
    }
    json_path = out / "summary.json"
    json_path.write_text(json.dumps(summary, indent=2, default=str) + "\n")
    say(f"done in {timings['total']:.1f} s. Wrote:")
    say("  novelty (mean RMSE to the nearest training image): " + ", ".join(f"{k} {v:.3f}" for k, v in summary["nearest_train"]["mean_rmse"].items()))
    for p in (grid_path, fig_path, win_path, json_path):
        say(f"  {p}")
    return 0
