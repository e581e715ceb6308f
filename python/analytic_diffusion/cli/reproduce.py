"""``analytic-diffusion reproduce``: the agreement experiment of the locality paper, offline.

Trains a small epsilon UNet (:class:`~analytic_diffusion.models.SmallUNet`) on bundled natural
crops, or loads one (``--checkpoint``), then compares every analytical denoiser with it
(:func:`~analytic_diffusion.compare`, docs/algorithms.md §8) and writes a run folder. What
this measures and what decides the ordering of the methods: docs/reproduction.md.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

from .common import (
    CLIError,
    add_common_args,
    args_dict,
    check_device,
    finite_float,
    mkdir,
    positive_int,
    say,
    timed,
    user_input,
    versions,
)

#: Every method ``--methods`` accepts, in the order of the table. ``els`` (bbELS) is not in
#: the default set: its cost grows as n * N * (H-P+1)(W-P+1) * P^2 per query (minutes here).
METHODS = (
    "wiener", "optimal", "nearest", "locality", "locality_cifar10", "locality_windowed", "ls", "els", "pspc", "scfdm",
)
DEFAULT_METHODS = tuple(m for m in METHODS if m != "els")

#: The default run: what docs/reproduction.md measures (about 5 minutes of training on one
#: CPU core, a 279k-parameter UNet, 2048 16x16 crops).
DEFAULTS = dict(size=16, num_train=2048, width=24, train_steps=3000, batch_size=32, lr=3e-3,
                num_samples=32, steps=10, seed=0, threshold=0.02, patch_sizes="5,9,15", out="reproduce_out")
#: ``--quick``: seconds, for tests and CI (a tiny network that has barely started to learn).
QUICK = dict(size=8, num_train=64, width=4, train_steps=5, batch_size=8, num_samples=2, steps=3)


def add_parser(sub) -> None:
    d = DEFAULTS
    p = sub.add_parser(
        "reproduce",
        help="train a small UNet on bundled natural crops (or load one) and compare every analytical denoiser with it; write a run folder",
        description="Offline reproduction of the locality paper's agreement experiment: train a small epsilon UNet on bundled "
        "natural crops (or load --checkpoint), run every analytical denoiser through compare and write config.json, "
        "metrics.json, table.md, figures and grids to --out. See docs/reproduction.md.",
    )
    p.add_argument("--checkpoint", default=None, help="a SmallUNet safetensors checkpoint to load instead of training "
                   "(written by an earlier run as model.safetensors); the crops it was trained on are rebuilt from its metadata")
    p.add_argument("--out", default=d["out"], help=f"run folder (default: {d['out']})")
    p.add_argument("--quick", action="store_true", help="seconds instead of minutes: 8x8 crops, a 4-wide UNet, 5 training steps, "
                   "3 DDIM steps (for tests and CI; the numbers mean nothing)")
    p.add_argument("--size", type=positive_int, default=None, help=f"crop side, a multiple of 4 (default: {d['size']})")
    p.add_argument("-N", "--num-train", type=positive_int, default=None, help=f"training crops, for the network and the denoisers (default: {d['num_train']})")
    p.add_argument("--width", type=positive_int, default=None, help=f"UNet base width, a multiple of 4 (default: {d['width']}: 279k parameters)")
    p.add_argument("--train-steps", type=positive_int, default=None, help=f"training steps (default: {d['train_steps']})")
    p.add_argument("--batch-size", type=positive_int, default=None, help=f"training batch (default: {d['batch_size']})")
    p.add_argument("--lr", type=finite_float, default=d["lr"], help=f"peak learning rate (default: {d['lr']})")
    p.add_argument("--num-samples", type=positive_int, default=None, help=f"samples compared (default: {d['num_samples']})")
    p.add_argument("--steps", type=positive_int, default=None, help=f"DDIM steps (default: {d['steps']})")
    p.add_argument("--seed", type=int, default=d["seed"], help=f"seed of the crops, the training and x_T (default: {d['seed']})")
    p.add_argument("--threshold", type=finite_float, default=d["threshold"], help=f"locality threshold, docs/algorithms.md §4 (default: {d['threshold']})")
    p.add_argument("--patch-sizes", default=d["patch_sizes"], help=f"odd patch sizes of the windowed locality denoiser's statistics (default: {d['patch_sizes']})")
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS), help=f"comma-separated, from {', '.join(METHODS)} (default: all but els)")
    p.add_argument("--protocol", choices=("single", "trajectory"), default="single",
                   help="compare protocol, docs/algorithms.md §8.2 (default: single, the paper's); the final r2 of both is the "
                   "trajectory r2 at the last step")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave torch's default)")
    add_common_args(p, "backend of the denoisers' ops")
    p.set_defaults(func=run)


def _methods(spec: str) -> List[str]:
    names = [m.strip() for m in str(spec).split(",") if m.strip()]
    bad = [m for m in names if m not in METHODS]
    if not names or bad:
        raise CLIError(f"--methods must be a comma-separated list from {', '.join(METHODS)}, got {spec!r}")
    return list(dict.fromkeys(names))


def _patch_sizes(spec: str, size: int) -> List[int]:
    try:
        ks = sorted({int(v) for v in str(spec).split(",") if v.strip()})
    except ValueError:
        raise CLIError(f"--patch-sizes must be comma-separated odd integers such as 5,9,15, got {spec!r}") from None
    if not ks or any(k < 1 or k % 2 == 0 for k in ks):
        raise CLIError(f"--patch-sizes must be positive odd integers, got {spec!r}")
    fit = [k for k in ks if k <= size]
    return fit or [size - 1 + size % 2]  # small crops: the largest odd size that fits


def build_denoisers(
    train: torch.Tensor,
    methods: Sequence[str] = DEFAULT_METHODS,
    *,
    threshold: float = 0.02,
    patch_sizes: Sequence[int] = (5, 9, 15),
    backend: Optional[str] = None,
    progress: bool = False,
) -> Dict[str, object]:
    """The analytical denoisers of the reproduction, ``{name: denoiser}`` in ``methods``' order.

    ``train``: uint8 ``[N, C, H, W]``, the network's training crops. Full moments (for
    ``wiener``, ``locality`` and ``locality_cifar10``, the latter with the locality paper's
    CIFAR-10 settings: WSSM over chunks of 512 images, threshold 0.05, docs/algorithms.md
    §5, §8.2; docs/algorithms.md §2-§5) and patch moments of each size in
    ``patch_sizes`` (for ``locality_windowed``, §9: a step whose window reaches the edge of a
    smaller patch uses the next larger one) are estimated from it. ``ls``/``els`` use Kamb &
    Ganguli's CIFAR-10 UNet patch schedule (§10), ``pspc`` the published CIFAR-10 schedule
    (§13), ``scfdm`` the published defaults (§11); sizes beyond the image are clamped by the
    denoisers. ``backend`` goes to every denoiser that takes one."""
    import analytic_diffusion as ad

    need_full = any(m in methods for m in ("wiener", "locality", "locality_cifar10"))
    moments = ad.estimate_moments(train, progress=progress) if need_full else None
    out: Dict[str, object] = {}
    for m in methods:
        if m == "wiener":
            out[m] = ad.WienerDenoiser(moments)
        elif m == "optimal":
            out[m] = ad.OptimalDenoiser(train, backend=backend)
        elif m == "nearest":
            out[m] = ad.NearestDenoiser(train, backend=backend)
        elif m == "locality":
            out[m] = ad.LocalityDenoiser(train, moments, threshold=threshold, backend=backend)
        elif m == "locality_cifar10":  # the paper's CIFAR-10 arithmetic: WSSM over chunks of 512, threshold 0.05
            out[m] = ad.LocalityDenoiser.from_preset(train, "cifar10", moments, backend=backend)
        elif m == "locality_windowed":
            pm = [ad.estimate_patch_moments(train, k, progress=progress) for k in patch_sizes]
            out[m] = ad.LocalityDenoiser(train, pm, threshold=threshold, backend=backend)
        elif m == "ls":
            out[m] = ad.LSDenoiser(train, "cifar10-unet", backend=backend)
        elif m == "els":
            out[m] = ad.ELSDenoiser(train, "cifar10-unet", padding="zeros", backend=backend)
        elif m == "pspc":
            out[m] = ad.PSPCSquareDenoiser(train, "cifar10")
        elif m == "scfdm":
            out[m] = ad.SmoothedCFDMDenoiser.from_preset(train, backend=backend)
        else:  # pragma: no cover - _methods checked the names
            raise ValueError(f"unknown method {m!r}")
    return out


def _settings(args) -> dict:
    base = dict(DEFAULTS)
    if args.quick:
        base.update(QUICK)
    s = {k: getattr(args, k) if getattr(args, k, None) is not None else base[k]
         for k in ("size", "num_train", "width", "train_steps", "batch_size", "num_samples", "steps")}
    if s["size"] % 4:
        raise CLIError(f"--size must be a multiple of 4 (the UNet halves it twice), got {s['size']}")
    if s["width"] % 4:
        raise CLIError(f"--width must be a multiple of 4 (group norm with 4 groups), got {s['width']}")
    if s["num_train"] < 2:
        raise CLIError(f"-N/--num-train must be at least 2 (a covariance needs 2 images), got {s['num_train']}")
    if not args.lr > 0:
        raise CLIError(f"--lr must be > 0, got {args.lr}")
    if args.seed < 0:
        raise CLIError(f"--seed must be >= 0, got {args.seed}")
    if args.threads < 0:
        raise CLIError(f"--threads must be >= 0, got {args.threads}")
    return s


def run(args) -> int:
    import analytic_diffusion as ad
    from ..runs import run_compare
    from ..models import SmallUNet, load_unet, save_unet, train_unet

    t_start = time.perf_counter()
    progress = not args.no_progress
    dev = args.device
    check_device(dev)
    s = _settings(args)
    methods = _methods(args.methods)
    if args.threads:
        torch.set_num_threads(args.threads)
    protocol = args.protocol
    timings: Dict[str, object] = {}
    model = None
    training: dict = {}
    if args.checkpoint is not None:
        with user_input():  # a missing or foreign file is the user's
            model = load_unet(args.checkpoint, device=dev)
        meta = model.checkpoint_metadata
        # the denoisers must see the crops the network was trained on
        for k in ("size", "num_train", "seed"):
            if k in meta:
                if k == "seed":
                    args.seed = int(meta[k])
                else:
                    s[k] = int(meta[k])
        training = {"checkpoint": str(args.checkpoint), **meta}
    size, N = s["size"], s["num_train"]
    say(f"reproduce: {N} natural {size}x{size} crops, {s['num_samples']} samples, {s['steps']} DDIM steps, protocol {protocol}")
    with timed(timings, "data"), user_input():
        train = ad.data.natural_crops(N, size=size, seed=args.seed)
    patch_sizes = _patch_sizes(args.patch_sizes, size)
    out = mkdir(Path(args.out))

    if model is None:
        torch.manual_seed(args.seed)
        model = SmallUNet(train.shape[1], s["width"]).to(dev)
        say(f"  training a {model.num_parameters}-parameter UNet for {s['train_steps']} steps (batch {s['batch_size']}, lr {args.lr})")
        with timed(timings, "training"):
            losses = train_unet(model, train, s["train_steps"], batch_size=s["batch_size"], lr=args.lr, seed=args.seed, progress=progress)
        k = max(1, len(losses) // 10)
        training = {
            "parameters": model.num_parameters, "width": s["width"], "steps": s["train_steps"], "batch_size": s["batch_size"],
            "lr": args.lr, "seed": args.seed, "size": size, "num_train": N, "seconds": timings["training"],
            "loss_first": sum(losses[:k]) / k, "loss_last": sum(losses[-k:]) / k,
        }
        save_unet(model, out / "model.safetensors", training)
        say(f"  trained in {timings['training']:.1f} s: loss {training['loss_first']:.4f} -> {training['loss_last']:.4f}")
    with timed(timings, "denoisers"), user_input():
        dens = build_denoisers(train, methods, threshold=args.threshold, patch_sizes=patch_sizes, backend=args.backend, progress=progress)
    windows = []
    if "locality_windowed" in dens:  # which statistics each step's window came from (docs/algorithms.md §9)
        windows = [dens["locality_windowed"].window_info(t) for t in ad.ddim_timesteps(s["steps"])]
    config = {
        "command": "reproduce", "args": args_dict(args), "settings": s, "methods": methods, "threshold": args.threshold,
        "patch_sizes": patch_sizes, "data": f"ad.data.natural_crops({N}, size={size}, seed={args.seed})",
        "network_training": training, "windowed_steps": windows, "cli_versions": versions(), "build_info": ad.build_info(),
    }
    with timed(timings, "compare"):
        run_compare(dens, model, out_dir=out, shape=tuple(train.shape[1:]), protocol=protocol, steps=s["steps"],
                    num_samples=s["num_samples"], seed=args.seed, prediction="epsilon", device=dev, config=config,
                    title=f"reproduce: {len(methods)} analytical denoisers against a {model.num_parameters}-parameter UNet "
                    f"on {N} natural {size}x{size} crops", keep_images=min(4, s["num_samples"]), progress=progress)
    timings["total"] = time.perf_counter() - t_start
    cfg = json.loads((out / "config.json").read_text())
    cfg["timings_s"] = timings
    (out / "config.json").write_text(json.dumps(cfg, indent=2, default=str) + "\n")
    table = (out / "table.md").read_text()
    say(table.split("\n\n## Per step")[0])
    say(f"done in {timings['total']:.1f} s; wrote {out}/")
    return 0
