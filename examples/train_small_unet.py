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
import torch.nn.functional as F

try:
    import analytic_diffusion as ad
except ImportError:  # running from a source checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))
    import analytic_diffusion as ad

from analytic_diffusion.figures import fields_figure


# --------------------------------------------------------------------------- #
# the network
# --------------------------------------------------------------------------- #
def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of integer timesteps ``t`` (long ``[B]``): float32 ``[B, dim]``."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.to(torch.float32)[:, None] * freqs[None]
    return torch.cat([args.sin(), args.cos()], dim=1)


class Block(nn.Module):
    """Two 3x3 convolutions with group norm, SiLU and the time embedding added in between."""

    def __init__(self, cin: int, cout: int, temb: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm1 = nn.GroupNorm(4, cout)
        self.time = nn.Linear(temb, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.norm2 = nn.GroupNorm(4, cout)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x, emb):
        h = F.silu(self.norm1(self.conv1(x)) + self.time(emb)[:, :, None, None])
        h = F.silu(self.norm2(self.conv2(h)))
        return h + self.skip(x)


class TinyUNet(nn.Module):
    """A 3-level UNet (resolutions S, S/2, S/4; widths w, 2w, 2w) predicting epsilon.

    ``forward(x_t, t)``: ``x_t`` float32 ``[B, C, S, S]`` (S divisible by 4),
    ``t`` long ``[B]`` -> ``[B, C, S, S]``. Group norm (not batch norm) keeps the
    samples of a batch independent, which :func:`ad.sensitivity` relies on.
    """

    def __init__(self, channels: int = 3, width: int = 16):
        super().__init__()
        w, temb = width, 4 * width
        self.temb_dim = temb
        self.time = nn.Sequential(nn.Linear(temb, temb), nn.SiLU(), nn.Linear(temb, temb))
        self.inc = nn.Conv2d(channels, w, 3, padding=1)
        self.d1 = Block(w, w, temb)
        self.down1 = nn.Conv2d(w, 2 * w, 3, stride=2, padding=1)
        self.d2 = Block(2 * w, 2 * w, temb)
        self.down2 = nn.Conv2d(2 * w, 2 * w, 3, stride=2, padding=1)
        self.mid = Block(2 * w, 2 * w, temb)
        self.up2 = nn.Conv2d(2 * w, 2 * w, 3, padding=1)
        self.u2 = Block(4 * w, 2 * w, temb)
        self.up1 = nn.Conv2d(2 * w, w, 3, padding=1)
        self.u1 = Block(2 * w, w, temb)
        self.out = nn.Sequential(nn.GroupNorm(4, w), nn.SiLU(), nn.Conv2d(w, channels, 3, padding=1))

    def forward(self, x, t):
        emb = self.time(timestep_embedding(t, self.temb_dim))
        h1 = self.d1(self.inc(x), emb)
        h2 = self.d2(self.down1(h1), emb)
        h3 = self.mid(self.down2(h2), emb)
        u = self.up2(F.interpolate(h3, scale_factor=2.0, mode="nearest"))
        u = self.u2(torch.cat([u, h2], 1), emb)
        u = self.up1(F.interpolate(u, scale_factor=2.0, mode="nearest"))
        u = self.u1(torch.cat([u, h1], 1), emb)
        return self.out(u)


# --------------------------------------------------------------------------- #
# stages
# --------------------------------------------------------------------------- #
def train(model: nn.Module, data: torch.Tensor, steps: int, batch_size: int, lr: float, seed: int, log_every: int) -> list:
    """Standard DDPM epsilon-prediction training on uint8 ``data``; returns the loss curve."""
    ab = ad.linear_alphas_cumprod()
    x_all = ad.data.to_unit_range(data)
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    warm = max(1, steps // 10)  # short linear warm-up, then cosine decay to zero

    def factor(i):
        return (i + 1) / warm if i < warm else 0.5 * (1 + math.cos(math.pi * (i - warm) / max(1, steps - warm)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    losses = []
    model.train()
    for step in range(steps):
        idx = torch.randint(0, x_all.shape[0], (batch_size,), generator=g)
        x0 = x_all[idx]
        t = torch.randint(0, ab.shape[0], (batch_size,), generator=g)
        eps = torch.randn(x0.shape, generator=g)
        a = ab[t].sqrt()[:, None, None, None]
        s = (1 - ab[t]).sqrt()[:, None, None, None]
        loss = F.mse_loss(model(a * x0 + s * eps, t), eps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        if log_every and (step + 1) % log_every == 0:
            print(f"  step {step + 1:5d}/{steps}  loss {sum(losses[-log_every:]) / log_every:.4f}", flush=True)
    model.eval()
    return losses


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
        return TinyUNet(channels=3, width=args.width)

    model = make()
    n_params = sum(q.numel() for q in model.parameters())
    print(f"training a {n_params}-parameter UNet on {args.num_train} {args.size}x{args.size} crops for {args.steps} steps")
    t0 = time.perf_counter()
    losses = train(model, train_data, args.steps, args.batch_size, args.lr, args.seed, log_every=max(1, args.steps // 6))
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
