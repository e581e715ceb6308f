"""``analytic-diffusion compare``: analytical denoisers against a trained network on the user's
data, as the papers compare them (docs/algorithms.md §8.2), written as a run folder
(:mod:`analytic_diffusion.runs`: config.json, metrics.json, table.md, figures, samples)."""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch

from .common import (
    CLIError,
    add_common_args,
    add_figure_format,
    args_dict,
    check_device,
    finite_float,
    load_diffusers_unet,
    load_model,
    pick_backends,
    positive_int,
    say,
    stats_or_estimate,
    user_input,
    versions,
)

DEFAULT_METHODS = "locality,wiener,optimal,nearest_dataset"
PROTOCOLS = ("single", "trajectory", "single_step")
# the op each method runs (for --backend): a name applies to the methods whose op registers it
_OPS = {"locality": "locality_denoise", "golddiff": "locality_denoise", "optimal": "optimal_denoise", "scfdm": "optimal_denoise",
        "nearest": "nearest_denoise", "nearest_dataset": "nearest_denoise", "els": "els_denoise", "ls": "windowed_locality_denoise",
        "pspc": "patch_posterior_denoise"}
_NEED_MOMENTS = ("locality", "golddiff", "wiener")


def _methods_arg(s: str) -> List[str]:
    from ..presets import METHODS

    out = [m.strip() for m in s.split(",") if m.strip()]
    bad = [m for m in out if m not in METHODS]
    if bad or not out:
        raise argparse.ArgumentTypeError(f"--methods takes a comma-separated list of {', '.join(METHODS)}; got {s!r}")
    if len(set(out)) != len(out):
        raise argparse.ArgumentTypeError(f"--methods lists a method twice: {s!r}")
    return out


def add_parser(sub) -> None:
    co = sub.add_parser(
        "compare",
        help="analytical denoisers against your trained network: per-step r2 / MSE, time, memory; a run folder",
        description="Build analytical denoisers from your training images and compare each, step by step, with a "
        "trained network (r2 and MSE of the x0 predictions, docs/algorithms.md §8), with the seconds per step and the "
        "peak memory of each. Writes a run folder: config.json, metrics.json (per step and final), table.md (the "
        "papers' table: one row per method; MSE, r2, time, memory), agreement and sample figures, samples.npz.",
    )
    co.add_argument("--data", required=True, help="training images: an image folder, a .npy or .npz file, or the root folder of --torchvision NAME")
    co.add_argument("--torchvision", default=None, metavar="NAME", help="read --data as the root of a torchvision dataset already on disk (cifar10, mnist, fashion_mnist, celeba, ...); never downloads")
    co.add_argument("--test-split", action="store_true", help="with --torchvision: its test split instead of the training split")
    co.add_argument("--model", default=None, metavar="MODULE:CLASS", help="the network class, importable from the current folder; called as model(x_t, t) with t a long tensor [B]")
    co.add_argument("--checkpoint", required=True, metavar="FILE|FOLDER", help="its state_dict (.safetensors, or a torch.save file read with weights_only=True); "
                    "or, without --model, a diffusers UNet2DModel folder (save_pretrained; safetensors weights)")
    co.add_argument("--model-kwargs", default=None, metavar="JSON", help="keyword arguments of the model class, as a JSON object")
    co.add_argument("--prediction", choices=("epsilon", "x0"), default=None, help="what the network predicts (default: epsilon, or the diffusers scheduler's prediction_type)")
    co.add_argument("--methods", type=_methods_arg, default=_methods_arg(DEFAULT_METHODS), help=f"comma-separated denoisers (default: {DEFAULT_METHODS})")
    co.add_argument("--preset", default=None, metavar="DATASET", help="the published settings of each method for DATASET (cifar10, mnist, fashion_mnist, celeba_hq, afhq; "
                    "see analytic_diffusion.presets); e.g. locality: WSSM, chunk = the paper's loader batch size, its threshold")
    co.add_argument("--protocol", choices=PROTOCOLS, default="single", help="single (default; the paper's: the network on each method's own x_t), trajectory, or single_step "
                    "(noised --holdout images); docs/algorithms.md §8.2")
    co.add_argument("--steps", type=positive_int, default=10, help="DDIM steps (default: 10)")
    co.add_argument("--num-samples", type=positive_int, default=8, help="samples (or held-out images for single_step) (default: 8)")
    co.add_argument("--seed", type=int, default=0, help="seed of x_T (or of the held-out choice and noise) (default: 0)")
    co.add_argument("--holdout", default=None, help="held-out images for --protocol single_step (default: --data); same --size/--grayscale")
    co.add_argument("--size", type=positive_int, default=None, help="resize the images to SIZE x SIZE (bilinear, antialiased)")
    co.add_argument("--grayscale", action="store_true", help="convert the images to one channel (ITU-R 601 luma)")
    co.add_argument("--subset", type=positive_int, default=None, help="use SUBSET training images: the first ones, or a seeded choice with --subset-seed")
    co.add_argument("--subset-seed", type=int, default=None, help="choose the --subset images at random with this seed (kept in the source's order)")
    co.add_argument("--stats", default=None, help="full moments from `stats` (locality, golddiff, wiener); estimated from the data when omitted")
    co.add_argument("--threshold", type=finite_float, default=None, help="override the mask threshold of locality / golddiff")
    co.add_argument("--softmax", choices=("exact", "wssm"), default=None, help="override the locality softmax")
    co.add_argument("--chunk-size", type=positive_int, default=None, help="override the chunk size of locality (the WSSM chunks)")
    co.add_argument("--temperature", type=finite_float, default=None, help="override the softmax temperature of every method that has one")
    co.add_argument("--patch-size", type=positive_int, default=None, help="patch size P of els / ls / pspc when --preset gives none (odd)")
    co.add_argument("--batch-size", type=positive_int, default=64, help="samples per denoiser / network call (default: 64)")
    co.add_argument("--dtype", choices=("float32", "float64"), default="float32", help="dtype of x_t (default: float32)")
    co.add_argument("--out", default="compare_out", help="the run folder (default: compare_out)")
    add_figure_format(co)
    add_common_args(co, "backend of the denoiser ops")
    co.set_defaults(func=run)


def _load_images(args, source: str, what: str, progress: bool):
    import analytic_diffusion as ad

    with user_input():
        if args.torchvision is not None:
            src = ad.data.torchvision_dataset(args.torchvision, source, train=not args.test_split)
        else:
            if not os.path.exists(source):
                raise CLIError(f"{what} {source!r} does not exist")
            src = source
        images = ad.data.load_images(src, progress=progress)
        if images.dim() != 4:
            raise CLIError(f"compare needs images [N, C, H, W]; {what} {source!r} holds flat vectors of shape {tuple(images.shape)}")
        return images


def _build(method: str, args, train, moments, backend: Optional[str]):
    from .. import presets

    kw: Dict[str, object] = {}
    dataset = None
    if args.preset is not None:
        dataset = args.preset
        if method in ("wiener", "optimal", "nearest", "nearest_dataset") or presets.normalize_dataset(dataset) in presets.datasets(method) \
                or (method in ("els", "ls") and dataset.strip().lower().replace("_", "-") in presets.datasets(method)):
            pass
        elif args.patch_size is not None and method in ("els", "ls", "pspc"):
            dataset = None  # no published schedule for this dataset: the given patch size
        else:
            raise CLIError(f"--preset {args.preset!r}: {method} has no published settings for it (available: {', '.join(presets.datasets(method))})"
                           + ("; give --patch-size" if method in ("els", "ls", "pspc") else ""))
    if method in ("els", "ls", "pspc") and dataset is None:
        if args.patch_size is None:
            raise CLIError(f"{method} needs a patch size: --preset DATASET (a published schedule) or --patch-size P")
        kw["patch_size"] = args.patch_size
    if method in ("locality", "golddiff"):
        if args.threshold is not None:
            kw["threshold"] = args.threshold
    if method == "locality":
        if args.softmax is not None:
            kw["softmax"] = args.softmax
        if args.chunk_size is not None:
            kw["chunk_size"] = args.chunk_size
    if args.temperature is not None and method not in ("wiener", "nearest", "nearest_dataset"):
        kw["temperature"] = args.temperature
    if backend is not None:
        kw["backend"] = backend
    return presets.build(method, train, dataset, moments=moments if method in _NEED_MOMENTS else None, **kw)


def run(args) -> int:
    import analytic_diffusion as ad

    from ..runs import run_compare

    t_start = time.perf_counter()
    progress = not args.no_progress
    dev = args.device
    check_device(dev)
    dtype = torch.float64 if args.dtype == "float64" else torch.float32

    # ---- cheap checks first
    methods: List[str] = args.methods
    if args.subset_seed is not None and args.subset is None:
        raise CLIError("--subset-seed chooses a random --subset: give --subset N as well")
    if args.holdout is not None and args.protocol != "single_step":
        raise CLIError(f"--holdout is used by --protocol single_step only (got --protocol {args.protocol})")
    if args.test_split and args.torchvision is None:
        raise CLIError("--test-split needs --torchvision NAME")
    if args.model is None and args.model_kwargs is not None:
        raise CLIError("--model-kwargs needs --model")
    ops = sorted({_OPS[m] for m in methods if m in _OPS} | ({"moments"} if any(m in _NEED_MOMENTS for m in methods) and args.stats is None else set()))
    backends = pick_backends(args.backend, ops, dev) if ops else {}
    if args.backend is not None and not ops:
        raise CLIError(f"--backend has no effect on --methods {','.join(methods)}: they have no backends to choose from")

    # ---- the network
    if args.model is not None:
        network = load_model(args.model, args.checkpoint, args.model_kwargs, dev)
        net_prediction = None
        net_what = f"{args.model} from {args.checkpoint}"
    elif os.path.isdir(args.checkpoint):
        network, net_prediction = load_diffusers_unet(args.checkpoint, dev)
        net_what = f"diffusers UNet2DModel from {args.checkpoint}"
    elif os.path.exists(args.checkpoint):
        raise CLIError(f"--checkpoint {args.checkpoint!r} is a file: give --model MODULE:CLASS too (or a diffusers UNet2DModel folder)")
    else:
        raise CLIError(f"--checkpoint {args.checkpoint!r} does not exist")
    prediction = args.prediction or net_prediction or "epsilon"
    if any(p.is_floating_point() and p.dtype != dtype for p in network.parameters()):
        network = network.to(dtype)  # x_t's dtype: a float32 network with --dtype float64, and back

    # ---- data
    with user_input():
        data = _load_images(args, args.data, "--data", progress)
        data = ad.data.preprocess(data, size=args.size, grayscale=args.grayscale, subset=args.subset, seed=args.subset_seed)
        holdout = None
        if args.protocol == "single_step":
            holdout = data if args.holdout is None else ad.data.preprocess(_load_images(args, args.holdout, "--holdout", progress),
                                                                          size=args.size, grayscale=args.grayscale)
            if tuple(holdout.shape[1:]) != tuple(data.shape[1:]):
                raise CLIError(f"--holdout images are {tuple(holdout.shape[1:])}, the training images {tuple(data.shape[1:])}")
            if args.num_samples > holdout.shape[0]:
                raise CLIError(f"--num-samples {args.num_samples} exceeds the {holdout.shape[0]} held-out images")
    if args.protocol == "single_step" and args.holdout is None:
        say("note: --protocol single_step without --holdout noises training images (--data); the papers use held-out images")
    shape = tuple(int(v) for v in data.shape[1:])
    N = data.shape[0]
    what = (f"torchvision {args.torchvision} at {args.data}" if args.torchvision else str(args.data)) + f": {N} images {'x'.join(map(str, shape))}"
    say(f"compare: {what}; network {net_what} (predicts {prediction}); methods {', '.join(methods)}; protocol {args.protocol}, "
        f"{args.steps} steps, {args.num_samples} samples" + (f"; preset {args.preset}" if args.preset else ""))

    # the network must take these images: one call now, so a mismatch is a clear error, not a traceback later
    try:
        with torch.no_grad():
            probe = ad.ModelDenoiser(network, prediction)(torch.zeros((1, *shape), dtype=dtype, device=dev), 999)
    except Exception as e:
        raise CLIError(f"the network fails on {'x'.join(map(str, shape))} images ({net_what}): {type(e).__name__}: {e}") from None
    del probe

    # ---- moments and denoisers
    moments = None
    if any(m in _NEED_MOMENTS for m in methods):
        bk = backends.get("moments") if args.backend is not None and backends.get("moments") == args.backend else None
        moments = stats_or_estimate(args.stats, data, shape, args.data, progress=progress, backend=bk, device=dev)
    dens = {}
    with user_input():
        for m in methods:
            op = _OPS.get(m)
            bk = backends.get(op) if op is not None and args.backend is not None and backends.get(op) == args.backend else None
            dens[m] = _build(m, args, data, moments, bk)

    config = {
        "command": "compare",
        "args": args_dict(args),
        "data": what,
        "preset": args.preset,
        "network": net_what,
        "backends": backends,
        "versions": versions(),
    }
    out = run_compare(
        dens, network, out_dir=Path(args.out), data=holdout, shape=shape, protocol=args.protocol, steps=args.steps,
        num_samples=args.num_samples, seed=args.seed, batch_size=args.batch_size, prediction=prediction, dtype=dtype,
        device=dev, config=config, title=f"compare: {what}", figure_format=args.figure_format, progress=progress,
    )
    say((out / "table.md").read_text().rstrip())
    say(f"done in {time.perf_counter() - t_start:.1f} s. Wrote the run folder {out}:")
    for f in sorted(p.name for p in out.iterdir()):
        say(f"  {out / f}")
    return 0
