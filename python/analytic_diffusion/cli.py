"""The ``analytic-diffusion`` command line (also ``python -m analytic_diffusion``).

Subcommands:

- ``demo``: the whole pipeline on bundled natural-image crops - moments, Wiener
  filter, locality masks, samples from all four denoisers - written as a PNG grid,
  a PNG of locality maps and a JSON summary with timings.
- ``stats``: full or patch moments of a dataset to a safetensors file.
- ``sample``: samples from one denoiser on the user's data, as a PNG grid and a
  uint8 ``.npy``.

Errors the library raises for bad input (ValueError, TypeError, missing files,
MemoryError) are reported as ``analytic-diffusion: error: <message>`` with exit
status 2, like argparse's own usage errors, without a traceback.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence

import torch

PROG = "analytic-diffusion"
METHODS = ("wiener", "optimal", "nearest", "locality")
_DENOISE_OPS = {"locality": "locality_denoise", "optimal": "optimal_denoise", "nearest": "nearest_denoise"}

# Defaults of `demo`, sized to finish in well under 3 minutes on a 2-core CPU with
# the pure-PyTorch backend (about 1.5 min measured; see README). N must exceed
# n = 3*32*32 = 3072 or the covariance is singular and the masks are not local.
DEMO_DEFAULTS = dict(size=32, num_train=4096, num_samples=8, steps=10, seed=0, threshold=0.02, out="demo_out")


class CLIError(Exception):
    """A user error found by the command line itself (reported like library errors)."""


# --------------------------------------------------------------------------- #
# helpers
# --------------------------------------------------------------------------- #
def _say(msg: str) -> None:
    print(msg, flush=True)


@contextmanager
def _timed(timings: Dict[str, float], key: str) -> Iterator[None]:
    t0 = time.perf_counter()
    yield
    timings[key] = time.perf_counter() - t0


def _device(s: str) -> torch.device:
    try:
        dev = torch.device(s)
    except (RuntimeError, ValueError) as e:
        raise argparse.ArgumentTypeError(f"invalid device {s!r}: {e}") from None
    return dev


def _check_device(dev: torch.device) -> None:
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CLIError(f"--device {dev} was requested but CUDA is not available (torch {torch.__version__})")


def _positive_int(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v}")
    return v


def _pick_backends(requested: Optional[str], ops: Sequence[str], device: torch.device) -> Dict[str, Optional[str]]:
    """The backend each op will run, resolved now so that a bad ``--backend`` fails
    before any work. A name given for all ops applies only to ops that register it
    (like the ANALYTIC_DIFFUSION_BACKEND environment variable); it must fit one."""
    from . import _registry

    out: Dict[str, Optional[str]] = {}
    if requested is not None:
        known = {op: set(_registry.registered_backends(op)) for op in ops}
        if not any(requested in names for names in known.values()):
            listed = sorted(set().union(*known.values()))
            raise CLIError(f"--backend {requested!r} is not a backend of any op used here ({', '.join(ops)}); registered: {', '.join(listed)}")
    for op in ops:
        ask = requested if requested is not None and requested in _registry.registered_backends(op) else None
        try:
            out[op] = _registry.select(op, device, ask).name
        except RuntimeError as e:  # registered but not built/usable here: a user-facing condition
            raise CLIError(str(e)) from None
    return out


def _backend_arg(backends: Dict[str, Optional[str]], requested: Optional[str], op: str) -> Optional[str]:
    """What to pass as ``backend=`` for ``op``: the request where it applies, else None
    (so the library's own selection, which honours the environment variable, decides)."""
    return backends[op] if requested is not None and backends.get(op) == requested else None


def _display_scale(h: int, w: int) -> int:
    # about 128 px per image: 32x32 -> 4x, 25x25 (faces) -> 5x, 256x256 -> 1x
    return max(1, 128 // max(h, w))


def _versions() -> dict:
    import numpy
    import PIL
    import tqdm

    from . import __version__

    v = {
        "analytic_diffusion": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "pillow": PIL.__version__,
        "tqdm": tqdm.__version__,
        "platform": platform.platform(),
        "torch_threads": torch.get_num_threads(),
    }
    try:
        import safetensors

        v["safetensors"] = safetensors.__version__
    except (ImportError, AttributeError):  # pragma: no cover - a dependency, but report, never fail
        v["safetensors"] = None
    return v


def _to_uint8_nchw(x: torch.Tensor):
    """[-1, 1] float ``[N, C, H, W]`` -> uint8 numpy ``[N, C, H, W]`` (round((x+1)*127.5), clamped)."""
    from .viz import to_uint8_images

    return to_uint8_images(x).transpose(0, 3, 1, 2).copy()


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def _warn_rank(N: int, n: int) -> None:
    if N <= n:
        _say(
            f"note: {N} training images for n = {n} values per image: the covariance is rank-deficient, "
            "so the Wiener filter keeps whole-image directions and the locality masks are not local. "
            f"Use more than {n} images for local windows."
        )


# --------------------------------------------------------------------------- #
# demo
# --------------------------------------------------------------------------- #
def _cmd_demo(args) -> int:
    import analytic_diffusion as ad
    from tqdm.auto import tqdm

    from .viz import image_grid, locality_figure

    t_start = time.perf_counter()
    progress = not args.no_progress
    dev = args.device
    _check_device(dev)
    if args.num_train < 2:
        raise CLIError(f"-N/--num-train must be at least 2 (an unbiased covariance needs 2 images), got {args.num_train}")
    ts = ad.ddim_timesteps(args.steps)
    ops = ["moments", "locality_denoise", "optimal_denoise", "nearest_denoise"]
    backends = _pick_backends(args.backend, ops, dev)
    bk = {op: _backend_arg(backends, args.backend, op) for op in ops}
    timings: Dict[str, object] = {}
    sampling: Dict[str, float] = {}

    _say(f"demo: {args.num_train} natural {args.size}x{args.size} crops, {args.num_samples} samples, {args.steps} steps, seed {args.seed}")
    with _timed(timings, "data"):
        train = ad.data.natural_crops(args.num_train, size=args.size, seed=args.seed)
    shape = tuple(train.shape[1:])
    C, H, W = shape
    n = C * H * W
    _warn_rank(args.num_train, n)
    out = _mkdir(Path(args.out))  # after the cheap checks (natural_crops validates --size), before the long stages

    with _timed(timings, "moments"):
        moments = ad.estimate_moments(train, batch_size=256, device=dev, backend=bk["moments"], progress=progress)
        moments = moments.to("cpu")  # masks and the eigendecomposition are built on the CPU
    _say(f"  moments: {timings['moments']:.2f} s")

    loc = ad.LocalityDenoiser(train, moments, threshold=args.threshold, backend=bk["locality_denoise"])
    with _timed(timings, "eigendecomposition"):
        wf = loc.filter  # float64 eigh of the n x n covariance, shared by every mask and the Wiener denoiser
    _say(f"  eigendecomposition (n = {n}): {timings['eigendecomposition']:.2f} s")

    # the probed output pixel: the centre of the middle channel (green for RGB)
    pix = (H // 2, W // 2)
    m = (C // 2) * H * W + pix[0] * W + pix[1]
    mask_info: List[dict] = []
    fields, windows = [], []
    with _timed(timings, "masks"):
        for t in tqdm(ts, desc="masks", unit="step", disable=not progress):
            mask = loc.mask(t)
            ab = loc.alpha_bar(t)
            col = mask[:, m]
            win = (col != 0) if mask.dtype != torch.bool else col
            if mask.dtype == torch.bool:
                density = float(mask.sum(dtype=torch.int64)) / mask.numel()
            else:  # threshold <= 0: real-valued weights; report where they are nonzero
                density = float((mask != 0).sum(dtype=torch.int64)) / mask.numel()
            mask_info.append({"t": t, "alpha_bar": ab, "density": density, "centre_window": float(win.sum()) / n})
            windows.append(win.reshape(shape))
    with _timed(timings, "sensitivity"):
        for t in ts:
            fields.append(wf.sensitivity(loc.alpha_bar(t), m, image_shape=shape)[0])
    _say(f"  masks ({len(ts)} steps): {timings['masks']:.2f} s; density " + ", ".join(f"t={d['t']}: {d['density']:.1%}" for d in mask_info))

    denoisers = {
        "wiener": ad.WienerDenoiser(wf, alphas_cumprod=loc.alphas_cumprod),  # shares the eigendecomposition
        "optimal": ad.OptimalDenoiser(train, backend=bk["optimal_denoise"]),
        "nearest": ad.NearestDenoiser(train, backend=bk["nearest_denoise"]),
        "locality": loc,
    }
    samples: Dict[str, torch.Tensor] = {}
    for name, den in denoisers.items():
        with _timed(sampling, name):
            samples[name] = ad.sample(den, args.num_samples, shape, steps=args.steps, seed=args.seed, progress=progress, device=dev).cpu()
        _say(f"  sampling {name}: {sampling[name]:.2f} s")
    timings["sampling"] = sampling

    with _timed(timings, "figures"):
        flat_train = ad.data.to_unit_range(train).reshape(train.shape[0], -1)
        nearest_idx, nearest_rmse = {}, {}
        for name, x in samples.items():
            d = torch.cdist(x.reshape(x.shape[0], -1).float(), flat_train)
            dist, idx = d.min(1)
            nearest_idx[name] = idx.tolist()
            nearest_rmse[name] = [float(v) / math.sqrt(n) for v in dist]
        rows = [samples[k] for k in METHODS] + [train[torch.tensor(nearest_idx["locality"])]]
        labels = list(METHODS) + ["nearest train\nimage to\nlocality"]
        scale = _display_scale(H, W)
        grid = image_grid(rows, labels, scale=scale)
        grid_path = out / "grid.png"
        grid.save(grid_path, optimize=True)
        fig = locality_figure(torch.stack(fields), torch.stack(windows), ts, [d["density"] for d in mask_info], scale=scale, pixel=pix)
        fig_path = out / "locality.png"
        fig.save(fig_path, optimize=True)
    timings["total"] = time.perf_counter() - t_start

    summary = {
        "command": "demo",
        "args": {k: (str(v) if isinstance(v, (Path, torch.device)) else v) for k, v in vars(args).items() if k != "func"},
        "sizes": {
            "num_train": int(train.shape[0]),
            "image_shape": list(shape),
            "n": n,
            "num_samples": args.num_samples,
            "steps": args.steps,
        },
        "timesteps": ts,
        "threshold": args.threshold,
        "probe_pixel": {"channel": C // 2, "h": pix[0], "w": pix[1], "flat_index": m},
        "timings_s": timings,
        "masks": mask_info,
        "nearest_train": {
            "description": "per sample: index of and RMSE ([-1,1] units) to the nearest training image; ~0 means memorised",
            "index": nearest_idx,
            "rmse": nearest_rmse,
        },
        "backends": {**backends, "wiener": "torch (float64 eigendecomposition, applied as U (g * U^T v))"},
        "device": str(dev),
        "versions": _versions(),
        "build_info": ad.build_info(),
        "files": {
            "grid": {"path": grid_path.name, "size": list(grid.size), "rows": labels},
            "locality": {"path": fig_path.name, "size": list(fig.size)},
            "summary": "summary.json",
        },
    }
    json_path = out / "summary.json"
    json_path.write_text(json.dumps(summary, indent=2, default=str) + "\n")
    _say(f"done in {timings['total']:.1f} s. Wrote:")
    for p in (grid_path, fig_path, json_path):
        _say(f"  {p}")
    return 0


# --------------------------------------------------------------------------- #
# stats
# --------------------------------------------------------------------------- #
def _cmd_stats(args) -> int:
    import analytic_diffusion as ad

    progress = not args.no_progress
    _check_device(args.device)
    backends = _pick_backends(args.backend, ["moments"], args.device)
    out = Path(args.out)
    if out.is_dir():
        raise CLIError(f"--out {str(out)!r} is a folder; give the name of the .safetensors file to write")
    if out.parent != Path(""):
        _mkdir(out.parent)  # fail on an unwritable place now, not after the pass over the data
    t0 = time.perf_counter()
    if args.patch_size is None:
        m = ad.estimate_moments(args.data, batch_size=args.batch_size, device=args.device, backend=_backend_arg(backends, args.backend, "moments"), progress=progress)
        what = f"full moments of {m.count} images of shape {tuple(m.image_shape or (m.n,))}"
    else:
        m = ad.estimate_patch_moments(args.data, args.patch_size, batch_size=args.batch_size, device=args.device, backend=_backend_arg(backends, args.backend, "moments"), progress=progress)
        what = f"{args.patch_size}x{args.patch_size} patch moments of {m.count} patches (patch vector {tuple(m.image_shape)})"
    elapsed = time.perf_counter() - t0
    m.extra = {**m.extra, "source": str(args.data), "backend": backends["moments"]}
    try:
        m.to("cpu").save(out)
    except Exception as e:
        # safetensors reports I/O failures as its own SafetensorError, not as OSError
        if type(e).__name__ == "SafetensorError":
            raise CLIError(f"could not write {str(out)!r}: {e}") from None
        raise
    _say(f"{what}: mean [{m.n}], cov [{m.n}, {m.n}] in {elapsed:.2f} s")
    _say(f"wrote {out}")
    return 0


# --------------------------------------------------------------------------- #
# sample
# --------------------------------------------------------------------------- #
def _cmd_sample(args) -> int:
    import numpy as np

    import analytic_diffusion as ad

    from .viz import image_grid

    progress = not args.no_progress
    dev = args.device
    _check_device(dev)
    if args.method in ("optimal", "nearest") and args.stats is not None:
        _say(f"note: --stats is not used by --method {args.method} (it needs only the training images)")
    ops = (["moments"] if args.method in ("locality", "wiener") and args.stats is None else []) + (
        [_DENOISE_OPS[args.method]] if args.method in _DENOISE_OPS else []
    )
    backends = _pick_backends(args.backend, ops, dev) if ops else {}
    if args.backend is not None and not ops:
        raise CLIError(f"--backend has no effect on --method {args.method}: it has no backends to choose from")
    bk = {op: _backend_arg(backends, args.backend, op) for op in ops}

    data = ad.data.load_images(args.data, limit=args.limit, progress=progress)
    if data.dim() != 4:
        raise CLIError(f"sample needs images [N, C, H, W]; {args.data} holds flat vectors of shape {tuple(data.shape)}")
    shape = tuple(data.shape[1:])
    if shape[0] not in (1, 3):
        raise CLIError(f"sample writes PNGs and needs 1 or 3 channels; the data has shape {shape}")
    N, n = data.shape[0], data[0].numel()

    moments = None
    if args.method in ("locality", "wiener"):
        if args.stats is not None:
            moments = ad.Moments.load(args.stats)
            moments.check_compatible(shape, f"the data ({args.data})")
        else:
            if N < 2:
                raise CLIError(f"need at least 2 images to estimate moments, {args.data} has {N}")
            moments = ad.estimate_moments(data, progress=progress, backend=bk.get("moments"))
        _warn_rank(moments.count, n)

    if args.method == "locality":
        den = ad.LocalityDenoiser(
            data, moments, threshold=args.threshold, temperature=args.temperature, softmax=args.softmax, chunk_size=args.chunk_size, backend=bk["locality_denoise"]
        )
    elif args.method == "wiener":
        den = ad.WienerDenoiser(moments)
    elif args.method == "optimal":
        den = ad.OptimalDenoiser(data, temperature=args.temperature, chunk_size=args.chunk_size, backend=bk["optimal_denoise"])
    else:
        den = ad.NearestDenoiser(data, backend=bk["nearest_denoise"])

    t0 = time.perf_counter()
    x = ad.sample(den, args.num, shape, steps=args.steps, seed=args.seed, progress=progress, device=dev).cpu()
    elapsed = time.perf_counter() - t0

    out = _mkdir(Path(args.out))
    u8 = _to_uint8_nchw(x)
    npy_path = out / f"{args.method}_samples.npy"
    np.save(npy_path, u8, allow_pickle=False)
    cols = max(1, args.ncols)
    rows = [x[i : i + cols] for i in range(0, x.shape[0], cols)]
    labels = [args.method] + [""] * (len(rows) - 1)
    png_path = out / f"{args.method}_samples.png"
    image_grid(rows, labels, scale=_display_scale(shape[1], shape[2])).save(png_path, optimize=True)
    _say(f"{args.num} {args.method} samples of shape {shape} in {args.steps} steps ({elapsed:.2f} s). Wrote:")
    _say(f"  {png_path}")
    _say(f"  {npy_path}  (uint8 [{args.num}, {', '.join(map(str, shape))}])")
    return 0


# --------------------------------------------------------------------------- #
# parser and entry point
# --------------------------------------------------------------------------- #
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Analytical (training-free) diffusion denoisers: locality, Wiener, optimal and nearest.",
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    def common(sp, backend_help: str):
        sp.add_argument("--backend", default=None, help=backend_help + " (default: the best available; see ANALYTIC_DIFFUSION_BACKEND)")
        sp.add_argument("--device", type=_device, default=torch.device("cpu"), help="torch device to compute on (default: cpu)")
        sp.add_argument("--no-progress", action="store_true", help="no progress bars")

    d = DEMO_DEFAULTS
    demo = sub.add_parser(
        "demo",
        help="sample bundled natural crops with all four denoisers; write a grid, locality maps and a JSON summary",
        description="Estimate moments of bundled natural-image crops, build locality masks, sample the same seeds "
        "with the Wiener, optimal, nearest and locality denoisers, and write grid.png, locality.png and summary.json.",
    )
    demo.add_argument("--size", type=_positive_int, default=d["size"], help=f"crop side in pixels (default: {d['size']})")
    demo.add_argument("-N", "--num-train", type=_positive_int, default=d["num_train"], help=f"training crops (default: {d['num_train']}; keep it above 3*size^2 for local masks)")
    demo.add_argument("--num-samples", type=_positive_int, default=d["num_samples"], help=f"samples per method (default: {d['num_samples']})")
    demo.add_argument("--steps", type=_positive_int, default=d["steps"], help=f"DDIM steps (default: {d['steps']})")
    demo.add_argument("--seed", type=int, default=d["seed"], help=f"seed of the crops and of the initial noise (default: {d['seed']})")
    demo.add_argument("--threshold", type=float, default=d["threshold"], help=f"mask threshold, SPEC 4 (default: {d['threshold']})")
    demo.add_argument("--out", default=d["out"], help=f"output folder (default: {d['out']})")
    common(demo, "backend of the denoiser and moment ops")
    demo.set_defaults(func=_cmd_demo)

    st = sub.add_parser(
        "stats",
        help="dataset moments (mean, covariance) to a safetensors file",
        description="Stream a dataset (image folder, .npy, .npz) once and save its mean and unbiased covariance "
        "(or stationary k x k patch moments) to a safetensors file readable by Moments.load.",
    )
    st.add_argument("data", help="an image folder, a .npy or a .npz file (uint8, or float in [-1, 1])")
    st.add_argument("--out", required=True, help="output .safetensors file")
    st.add_argument("--batch-size", type=_positive_int, default=256, help="images per batch (default: 256)")
    st.add_argument("--patch-size", type=_positive_int, default=None, metavar="K", help="patch moments of K x K windows (K odd) instead of full-image moments")
    common(st, "moments backend")
    st.set_defaults(func=_cmd_stats)

    sa = sub.add_parser(
        "sample",
        help="sample one denoiser on your data; write a PNG grid and a uint8 .npy",
        description="Load a dataset, build a denoiser from it and draw DDIM samples. Writes METHOD_samples.png "
        "and METHOD_samples.npy (uint8 [N, C, H, W]) to --out.",
    )
    sa.add_argument("--method", required=True, choices=METHODS, help="which denoiser")
    sa.add_argument("--data", required=True, help="training images: an image folder, a .npy or a .npz file")
    sa.add_argument("--stats", default=None, help="moments from `stats` (locality, wiener); estimated from --data when omitted")
    sa.add_argument("--steps", type=_positive_int, default=10, help="DDIM steps (default: 10)")
    sa.add_argument("-n", "--num", type=_positive_int, default=8, help="number of samples (default: 8)")
    sa.add_argument("--out", required=True, help="output folder")
    sa.add_argument("--seed", type=int, default=0, help="seed of the initial noise (default: 0)")
    sa.add_argument("--threshold", type=float, default=0.02, help="locality mask threshold, SPEC 4 (default: 0.02)")
    sa.add_argument("--temperature", type=float, default=1.0, help="softmax temperature tau (default: 1)")
    sa.add_argument("--softmax", choices=("exact", "wssm"), default="exact", help="locality softmax: exact, or the published code's WSSM (default: exact)")
    sa.add_argument("--chunk-size", type=_positive_int, default=256, help="training images per chunk (memory; the WSSM chunks) (default: 256)")
    sa.add_argument("--limit", type=_positive_int, default=None, help="use only the first LIMIT training images")
    sa.add_argument("--ncols", type=_positive_int, default=8, help="images per row of the PNG grid (default: 8)")
    common(sa, "backend of the denoiser op")
    sa.set_defaults(func=_cmd_sample)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line with ``argv`` (default ``sys.argv[1:]``); returns the exit status.

    0 on success, 2 on a usage error or a library error about the input (printed as
    ``analytic-diffusion: error: ...``), 130 on Ctrl-C.
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help and usage errors: keep argparse's message, return its status
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    try:
        return int(args.func(args) or 0)
    except (CLIError, ValueError, TypeError, OSError, MemoryError) as e:
        # OSError covers FileNotFoundError and unwritable outputs: input problems, not bugs
        msg = str(e) or type(e).__name__
        print(f"{PROG}: error: {msg}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr, flush=True)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
