"""``analytic-diffusion sample``: samples from one denoiser on the user's data."""
from __future__ import annotations

import time
from pathlib import Path

from .common import (
    CLIError,
    add_common_args,
    add_figure_format,
    backend_arg,
    check_device,
    finite_float,
    mkdir,
    pick_backends,
    positive_int,
    say,
    stats_or_estimate,
    user_input,
)
from .demo import METHODS

_DENOISE_OPS = {"locality": "locality_denoise", "optimal": "optimal_denoise", "nearest": "nearest_denoise"}


def add_parser(sub) -> None:
    sa = sub.add_parser(
        "sample",
        help="sample one denoiser on your data; write a grid figure (PNG, PDF or SVG) and a uint8 .npy",
        description="Load a dataset, build a denoiser from it and draw DDIM samples. Writes METHOD_samples.png "
        "and METHOD_samples.npy (uint8 [N, C, H, W]) to --out.",
    )
    sa.add_argument("--method", required=True, choices=METHODS, help="which denoiser")
    sa.add_argument("--data", required=True, help="training images: an image folder, a .npy or a .npz file")
    sa.add_argument("--stats", default=None, help="moments from `stats` (locality, wiener); estimated from --data when omitted")
    sa.add_argument("--steps", type=positive_int, default=10, help="DDIM steps (default: 10)")
    sa.add_argument("-n", "--num", type=positive_int, default=8, help="number of samples (default: 8)")
    sa.add_argument("--out", required=True, help="output folder")
    sa.add_argument("--seed", type=int, default=0, help="seed of the initial noise (default: 0)")
    sa.add_argument("--threshold", type=finite_float, default=0.02, help="locality mask threshold, docs/algorithms.md §4 (default: 0.02)")
    sa.add_argument("--temperature", type=float, default=1.0, help="softmax temperature tau (default: 1)")
    sa.add_argument("--softmax", choices=("exact", "wssm"), default="exact", help="locality softmax: exact, or the published code's WSSM (default: exact)")
    sa.add_argument("--chunk-size", type=positive_int, default=256, help="training images per chunk (memory; the WSSM chunks) (default: 256)")
    sa.add_argument("--limit", type=positive_int, default=None, help="use only the first LIMIT training images")
    sa.add_argument("--ncols", type=positive_int, default=8, help="images per row of the grid figure (default: 8)")
    add_figure_format(sa)
    add_common_args(sa, "backend of the denoiser op")
    sa.set_defaults(func=run)


def _build(args, data, moments, bk):
    import analytic_diffusion as ad

    if args.method == "locality":
        return ad.LocalityDenoiser(
            data, moments, threshold=args.threshold, temperature=args.temperature, softmax=args.softmax, chunk_size=args.chunk_size, backend=bk["locality_denoise"]
        )
    if args.method == "wiener":
        return ad.WienerDenoiser(moments)
    if args.method == "optimal":
        return ad.OptimalDenoiser(data, temperature=args.temperature, chunk_size=args.chunk_size, backend=bk["optimal_denoise"])
    return ad.NearestDenoiser(data, backend=bk["nearest_denoise"])


def run(args) -> int:
    import numpy as np

    import analytic_diffusion as ad

    progress = not args.no_progress
    dev = args.device
    check_device(dev)
    if args.method in ("optimal", "nearest") and args.stats is not None:
        say(f"note: --stats is not used by --method {args.method} (it needs only the training images)")
    ops = (["moments"] if args.method in ("locality", "wiener") and args.stats is None else []) + (
        [_DENOISE_OPS[args.method]] if args.method in _DENOISE_OPS else []
    )
    if args.backend is not None and not ops:
        raise CLIError(f"--backend has no effect on --method {args.method}: it has no backends to choose from")
    backends = pick_backends(args.backend, ops, dev) if ops else {}
    bk = {op: backend_arg(backends, args.backend, op) for op in ops}

    with user_input():
        data = ad.data.load_images(args.data, limit=args.limit, progress=progress)
    if data.dim() != 4:
        raise CLIError(f"sample needs images [N, C, H, W]; {args.data} holds flat vectors of shape {tuple(data.shape)}")
    shape = tuple(data.shape[1:])
    if shape[0] not in (1, 3):
        raise CLIError(f"sample draws its samples as images and needs 1 or 3 channels; the data has shape {shape}")

    moments = None
    if args.method in ("locality", "wiener"):
        moments = stats_or_estimate(args.stats, data, shape, args.data, progress=progress, backend=bk.get("moments"))
    with user_input():  # --temperature, --threshold, --chunk-size against the data
        den = _build(args, data, moments, bk)

    t0 = time.perf_counter()
    x = ad.sample(den, args.num, shape, steps=args.steps, seed=args.seed, progress=progress, device=dev).cpu()
    elapsed = time.perf_counter() - t0

    from ..figures import image_grid

    out = mkdir(Path(args.out))
    npy_path = out / f"{args.method}_samples.npy"
    np.save(npy_path, ad.data.to_uint8(x).numpy(), allow_pickle=False)
    rows = [x[i : i + args.ncols] for i in range(0, x.shape[0], args.ncols)]
    labels = [args.method] + [""] * (len(rows) - 1)
    fig_path = out / f"{args.method}_samples.{args.figure_format}"
    image_grid(rows, labels, path=fig_path)
    say(f"{args.num} {args.method} samples of shape {shape} in {args.steps} steps ({elapsed:.2f} s). Wrote:")
    say(f"  {fig_path}")
    say(f"  {npy_path}  (uint8 [{args.num}, {', '.join(map(str, shape))}])")
    return 0
