"""Train a tiny epsilon-prediction UNet on natural crops and compare it with the analytical denoisers.

    python examples/train_small_unet.py                       # about a minute on a 2-core CPU
    python examples/train_small_unet.py --steps 20 --out tiny # a quick smoke run

Stages: bundled natural crops (``ad.data.natural_crops``) -> train a ~125k-parameter
3-level UNet with a sinusoidal time embedding to predict the noise -> save its
weights with safetensors and load them back -> agreement (r2, MSE; docs/algorithms.md §8) of the
locality, Wiener and optimal denoisers with the network on held-out crops, on the
same x_t (single step) and along each one's own DDIM trajectory -> the network's
sensitivity field of the centre pixel (autograd) next to the Wiener field (analytic)
and the locality window. Writes to ``--out``: ``model.safetensors``,
``agreement_single_step.{md,png}``, ``agreement_trajectory.{md,png}``,
``sensitivity.png`` and ``summary.json``.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn

try:
    import analytic_diffusion as ad
except ImportError:  # running from a source checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))
    import analytic_diffusion as ad

from analytic_diffusion.figures import fields_figure


# The network (SmallUNet: a 3-level UNet with a sinusoidal time embedding) and its DDPM
# training loop live in the package, analytic_diffusion.models, shared with
# `analytic-diffusion reproduce`.
from analytic_diffusion.models import SmallUNet, train_unet  # noqa: E402


def save_and_reload(model: nn.Module, path: Path, make) -> nn.Module:
    """Save the weights with safetensors and load them into a fresh model (no pickles)."""
    from safetensors.torch import load_file, save_file

    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    fresh = make()
    fresh.load_state_dict(load_file(str(path)))
    for (k, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        if not torch.equal(a, b):
            raise RuntimeError(f"weight {k} did not survive the safetensors round trip")
    return fresh.eval()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--size", type=int, default=16, help="crop side (divisible by 4)")
    p.add_argument("-N", "--num-train", type=int, default=1024, help="training crops (also the analytical denoisers' data)")
    p.add_argument("--steps", type=int, default=800, help="training steps")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--width", type=int, default=16, help="UNet base width (16: ~125k parameters, 12: ~70k)")
    p.add_argument("--num-samples", type=int, default=8, help="held-out images / samples in the comparison")
    p.add_argument("--ddim-steps", type=int, default=10)
    p.add_argument("--threshold", type=float, default=0.02, help="locality mask threshold")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (0: torch's default). The network is tiny: with more threads its convolutions "
                   "gain little, and on a busy machine wait at every OpenMP barrier for a descheduled thread")
    p.add_argument("--out", default="unet_out")
    args = p.parse_args(argv)
    if args.size < 4 or args.size % 4:
        p.error(f"--size must be a multiple of 4 (the UNet halves it twice), got {args.size}")
    if args.width < 4 or args.width % 4:
        p.error(f"--width must be a multiple of 4 (group norm with 4 groups), got {args.width}")
    for name in ("num_train", "steps", "batch_size", "num_samples", "ddim_steps"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.threads < 0:
        p.error(f"--threads must be >= 0, got {args.threads}")
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    times = {}
    torch.manual_seed(args.seed)

    t0 = time.perf_counter()
    train_data = ad.data.natural_crops(args.num_train, size=args.size, seed=args.seed)
    held_out = ad.data.natural_crops(args.num_samples, size=args.size, seed=args.seed + 1)
    times["data_s"] = time.perf_counter() - t0

    def make():
        return SmallUNet(channels=3, width=args.width)

    model = make()
    n_params = sum(q.numel() for q in model.parameters())
    print(f"training a {n_params}-parameter UNet on {args.num_train} {args.size}x{args.size} crops for {args.steps} steps")
    t0 = time.perf_counter()
    losses = train_unet(model, train_data, args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed)
    times["train_s"] = time.perf_counter() - t0
    model = save_and_reload(model, out / "model.safetensors", make)

    t0 = time.perf_counter()
    moments = ad.estimate_moments(train_data)
    denoisers = {
        "locality": ad.LocalityDenoiser(train_data, moments, threshold=args.threshold),
        "wiener": ad.WienerDenoiser(moments),
        "optimal": ad.OptimalDenoiser(train_data),
    }
    times["moments_s"] = time.perf_counter() - t0

    results = {}
    for protocol in ("single_step", "trajectory"):
        t0 = time.perf_counter()
        res = ad.compare(
            denoisers, model, held_out, protocol=protocol, num_samples=args.num_samples,
            seed=args.seed, steps=args.ddim_steps, prediction="epsilon",
        )
        times[f"compare_{protocol}_s"] = time.perf_counter() - t0
        (out / f"agreement_{protocol}.md").write_text(res.table() + "\n")
        res.plot(out / f"agreement_{protocol}.png")
        results[protocol] = res.to_dict()
        print(f"\nagreement with the network ({protocol.replace('_', ' ')}, {args.num_samples} samples):\n{res.table()}")

    # Sensitivity fields of the centre pixel (green channel) at a few timesteps, at a
    # held-out image's x_t: the network's (autograd) against the Wiener filter's (analytic).
    t0 = time.perf_counter()
    S = args.size
    pixel = 1 * S * S + (S // 2) * S + S // 2
    ts = ad.ddim_timesteps(args.ddim_steps)
    ts = sorted({ts[0], ts[len(ts) // 2], ts[-1]}, reverse=True) if len(ts) >= 3 else ts
    x0 = ad.data.to_unit_range(held_out[:1])
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(args.seed))
    net_f, wie_f, windows, sims = [], [], [], []
    for t in ts:
        a = ad.alpha_bar_at(t)
        x_t = math.sqrt(a) * x0 + math.sqrt(1 - a) * eps
        fn = ad.sensitivity(model, x_t, t, [pixel], prediction="epsilon")[0, 0]
        fw = ad.sensitivity(denoisers["wiener"], x_t, t, [pixel])[0, 0]
        net_f.append(fn)
        wie_f.append(fw)
        windows.append(denoisers["locality"].mask(t)[:, pixel].reshape(3, S, S))
        sim = ad.field_similarity(fn[None], fw[None], threshold=args.threshold)
        sims.append({"t": t, "cosine": float(sim["cosine"][0]), "iou": float(sim["iou"][0])})
    fields_figure(
        {"network": torch.stack(net_f), "Wiener": torch.stack(wie_f), "locality window": torch.stack(windows)},
        ts,
        captions={"network": [f"cos {s['cosine']:.2f} IoU {s['iou']:.2f}" for s in sims]},
        pixel=(S // 2, S // 2),
        scale=max(2, 96 // S),
        path=out / "sensitivity.png",
    )
    times["sensitivity_s"] = time.perf_counter() - t0
    print("\nnetwork vs Wiener sensitivity field of the centre pixel (green):")
    for s in sims:
        print(f"  t={s['t']:4d}  cosine {s['cosine']:.3f}  support IoU {s['iou']:.3f}")

    summary = {
        "args": vars(args),
        "parameters": n_params,
        "loss_first": losses[0],
        "loss_last_mean": sum(losses[-max(1, len(losses) // 10):]) / max(1, len(losses) // 10),
        "agreement": results,
        "sensitivity_similarity": sims,
        "times": times,
        "files": sorted(f.name for f in out.iterdir()) + ["summary.json"],
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"\nwrote {out}/: " + ", ".join(sorted(set(summary["files"]))))
    print("times: " + ", ".join(f"{k} {v:.1f}" for k, v in times.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
