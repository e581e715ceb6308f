"""One sample row per analytical denoiser of the library, all from the same x_T.

    python examples/denoisers_grid.py                      # -> docs/denoisers_grid.png
    python examples/denoisers_grid.py --size 32 -N 4096    # larger, slower

Every denoiser is built on the same bundled natural crops (``ad.data.natural_crops``) and
sampled by ``ad.sample`` with the same seed, so every row starts from the same noise
``x_T`` and differences between rows are the denoisers' own. The first row shows training
crops for comparison. Defaults (16x16 crops, N = 1000, 6 samples, 10 DDIM steps) keep the
whole run to a few minutes on a 2-core CPU; ELS/bbELS are the slowest (their cost grows as
N * H^2 * W^2, docs/algorithms.md §10). N must exceed 3 * size^2 for the full-covariance
locality denoiser's masks to be local (docs/algorithms.md §9).

Timings per denoiser and, per sample, the RMS distance to the nearest training image (about
0: a copy of a training image) are printed and written beside the figure as JSON.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import analytic_diffusion as ad
from analytic_diffusion.denoisers.schedules import preset_schedule
from analytic_diffusion.figures import image_grid


def clipped(schedule, steps: int, size: int) -> dict:
    """A published patch-size schedule (a preset name or ``{t: P}``) at the ``steps`` DDIM timesteps, each P
    cut to the largest odd size that fits a ``size`` x ``size`` image (the presets were
    made for 32x32 images)."""
    top = size if size % 2 else size - 1
    table = preset_schedule(schedule, ad.ddim_timesteps(steps)) if isinstance(schedule, str) else schedule
    return {t: min(table[t], top) for t in ad.ddim_timesteps(steps)}


def build_denoisers(train: torch.Tensor, steps: int, patch_sizes=(5, 9)) -> dict:
    """``{label: denoiser}`` for every denoiser of the library on ``train`` (uint8
    ``[N, C, H, W]``), with the published settings where there are any."""
    size = train.shape[-1]
    kg = clipped("cifar10-unet", steps, size)
    pspc = clipped(ad.denoisers.pspc_schedule("cifar10"), steps, size) if size < 32 else "cifar10"
    moments = ad.estimate_moments(train)
    stats = [ad.estimate_patch_moments(train, k) for k in patch_sizes if k <= size]
    loc = ad.LocalityDenoiser(train, moments)
    return {
        "wiener": ad.WienerDenoiser(loc.filter, alphas_cumprod=loc.alphas_cumprod),  # shares the eigendecomposition
        "optimal": ad.OptimalDenoiser(train),
        "nearest": ad.NearestDenoiser(train),
        "locality\n(full cov.)": loc,
        "locality\n(windowed)": ad.LocalityDenoiser(train, stats),
        "GoldDiff\n(screened\nlocality)": ad.LocalityDenoiser(train, moments, screening="golddiff"),
        "LS\n(cifar10-unet)": ad.LSDenoiser(train, kg),
        "ELS\n(cifar10-unet)": ad.ELSDenoiser(train, kg, padding="circular"),
        "bbELS\n(cifar10-unet)": ad.ELSDenoiser(train, kg, padding="zeros"),
        "PSPC-square\n(cifar10)": ad.PSPCSquareDenoiser(train, pspc),
        "SCFDM\n(smoothed CF)": ad.SmoothedCFDMDenoiser(train),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=16, help="crop side in pixels (default 16)")
    p.add_argument("-N", "--num-train", type=int, default=1000, help="training crops (default 1000; keep it above 3*size^2)")
    p.add_argument("--num-samples", type=int, default=6, help="samples per denoiser (default 6)")
    p.add_argument("--steps", type=int, default=10, help="DDIM steps (default 10)")
    p.add_argument("--seed", type=int, default=0, help="seed of the crops and of x_T (default 0)")
    p.add_argument("--out", default="docs/denoisers_grid.png", help="figure path (.png/.pdf/.svg)")
    args = p.parse_args(argv)

    train = ad.data.natural_crops(args.num_train, size=args.size, seed=args.seed)
    shape = tuple(train.shape[1:])
    t0 = time.perf_counter()
    denoisers = build_denoisers(train, args.steps)
    timings = {"setup": time.perf_counter() - t0}
    rows, labels = [train[: args.num_samples]], ["training\ncrops"]
    flat_train = ad.data.to_unit_range(train).reshape(train.shape[0], -1).float()
    novelty = {}
    for label, den in denoisers.items():
        name = label.replace("\n", " ")
        t0 = time.perf_counter()
        x = ad.sample(den, args.num_samples, shape, steps=args.steps, seed=args.seed, progress=True)
        timings[name] = time.perf_counter() - t0
        rows.append(x)
        labels.append(label)
        # per sample: RMS distance to the nearest training image (about 0: a copy)
        dist = torch.cdist(x.reshape(x.shape[0], -1).float(), flat_train).min(1).values / flat_train.shape[1] ** 0.5
        novelty[name] = [round(float(v), 4) for v in dist]
        print(f"{name}: {timings[name]:.1f} s, RMS distance to the nearest training image {dist.mean():.3f} (mean)", flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    image_grid(rows, labels, path=out)
    info = {"args": vars(args), "image_shape": list(shape), "timings_s": timings,
            "nearest_train_rms": novelty, "torch": torch.__version__}
    out.with_suffix(".json").write_text(json.dumps(info, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
