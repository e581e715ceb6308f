"""``analytic-diffusion locality``: Wiener sensitivity fields and locality-mask windows
of chosen pixels across timesteps (full covariance, or the windowed filter from patch
moments), as figures and a JSON/markdown table; optionally a trained network's fields
beside them, with their similarity."""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Dict, List, Sequence

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
    load_model as _load_model,
    mkdir,
    pick_backends,
    positive_int,
    say,
    timed,
    user_input,
    versions,
    warn_rank,
)

DEFAULTS = dict(size=32, num_train=4096, seed=0, threshold=0.02, out="locality_out", model_inputs=4)


def _pixel_arg(s: str):
    """``centre`` or ``ROW,COL`` (non-negative integers)."""
    if s.strip().lower() in ("centre", "center"):
        return "centre"
    parts = s.replace(" ", "").split(",")
    try:
        rc = tuple(int(v) for v in parts)
    except ValueError:
        rc = ()
    if len(rc) != 2 or min(rc) < 0:
        raise argparse.ArgumentTypeError(f"a pixel is 'centre' or ROW,COL with non-negative integers (e.g. 16,16), got {s!r}")
    return rc


def _timesteps_arg(values: Sequence[str]) -> List[int]:
    from ..schedule import NUM_TRAIN_TIMESTEPS

    out: List[int] = []
    for v in values:
        for part in str(v).split(","):
            if not part.strip():
                continue
            try:
                t = int(part)
            except ValueError:
                raise CLIError(f"--timesteps takes integers in [0, {NUM_TRAIN_TIMESTEPS - 1}], got {part!r}") from None
            if not 0 <= t < NUM_TRAIN_TIMESTEPS:
                raise CLIError(f"--timesteps takes integers in [0, {NUM_TRAIN_TIMESTEPS - 1}], got {t}")
            out.append(t)
    if not out:
        raise CLIError("--timesteps is empty")
    return out


def _model_fields(model, images: torch.Tensor, ts: Sequence[int], pixels: Sequence[int], prediction: str, seed: int, progress: bool) -> torch.Tensor:
    """The model's sensitivity fields ``d x0_hat[m] / d x_t`` (``analysis.sensitivity``,
    autograd): float64 ``[P, T, C, H, W]``, averaged over the noisy inputs
    ``x_t = a y + sqrt(1 - ab) eps`` of ``images`` (float32 ``[M, C, H, W]`` in [-1, 1],
    on the model's device; eps from a generator seeded by ``seed`` and t)."""
    from tqdm.auto import tqdm

    import analytic_diffusion as ad

    fields = torch.zeros(len(pixels), len(ts), *images.shape[1:], dtype=torch.float64)
    for ti, t in enumerate(tqdm(ts, desc="model fields", unit="step", disable=not progress)):
        ab = ad.alpha_bar_at(t)
        eps = torch.randn(images.shape, generator=torch.Generator().manual_seed(seed * 1000 + t)).to(images.device)
        x = math.sqrt(ab) * images + math.sqrt(1.0 - ab) * eps
        try:
            rows = ad.sensitivity(model, x, t, list(pixels), prediction=prediction)  # [M, P, C, H, W]
        except Exception as e:
            # every input here is built by this command except the network: what fails is
            # the user's model (it raised, or returned the wrong shape or dtype)
            raise CLIError(f"the model failed on x_t of shape {tuple(x.shape)} at t={t} (called as model(x_t, t) with t a long tensor [B]): {type(e).__name__}: {e}") from None
        fields[:, ti] = rows.to(torch.float64).mean(0).cpu()
    return fields


def _window_stats(window: torch.Tensor, pixel) -> dict:
    """Size of a window ``[C, H, W]`` (bool, or weights: nonzero) around ``pixel = (h, w)``:
    inputs inside, their fraction of ``C*H*W``, and Chebyshev radii in pixels: the largest
    (a few isolated far entries set it) and the one holding 90% of the window's inputs."""
    inside = window != 0 if window.dtype != torch.bool else window
    count = int(inside.sum())
    cs, hs, ws = inside.nonzero(as_tuple=True)
    if not hs.numel():
        return {"window": 0, "window_fraction": 0.0, "radius": 0, "radius90": 0}
    dist = torch.maximum((hs - pixel[0]).abs(), (ws - pixel[1]).abs()).sort().values
    r90 = int(dist[max(0, math.ceil(0.9 * dist.numel()) - 1)])
    return {"window": count, "window_fraction": count / inside.numel(), "radius": int(dist[-1]), "radius90": r90}


def _markdown_table(rows: List[dict], pixels: List[tuple], has_model: bool) -> str:
    head = ["t", "alpha_bar", "mask density"]
    for p in pixels:
        head += [f"{p} window", f"{p} radius 90% / max"]
        if has_model:
            head += [f"{p} model cosine / support IoU"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [str(r["t"]), f"{r['alpha_bar']:.4g}", f"{100 * r['density']:.2f}%"]
        for pr in r["pixels"]:
            cells += [f"{pr['window']} ({100 * pr['window_fraction']:.2f}%)", f"{pr['radius90']} / {pr['radius']}"]
            if has_model:
                cells += [f"{pr['model']['cosine']:.3f} / {pr['model']['support_iou']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def run(args) -> int:
    import numpy as np

    import analytic_diffusion as ad
    from tqdm.auto import tqdm

    t_start = time.perf_counter()
    progress = not args.no_progress
    dev = args.device
    check_device(dev)
    timings: Dict[str, float] = {}
    d = DEFAULTS

    # ---- cheap checks first: nothing below is slow until the data is read
    ts = _timesteps_arg(args.timesteps) if args.timesteps else ad.ddim_timesteps(10)
    op = "moments" if args.window is None else "patch_moments"
    backends = pick_backends(args.backend, [op], dev)
    bk = backend_arg(backends, args.backend, op)
    if args.window is not None and args.window % 2 == 0:
        raise CLIError(f"--window must be an odd number of pixels (the window is centred on the pixel), got {args.window}")
    if (args.model is None) != (args.checkpoint is None):
        raise CLIError("--model and --checkpoint go together: --model MODULE:CLASS --checkpoint FILE")
    if args.model is None and (args.model_kwargs is not None or args.prediction is not None):
        raise CLIError("--model-kwargs and --prediction need --model")
    with user_input():
        stats = ad.Moments.load(args.stats) if args.stats is not None else None
    if stats is not None and stats.kind == "full" and args.window is not None:
        raise CLIError(f"--window needs patch moments, but --stats {args.stats!r} holds full-image moments; "
                       f"write K x K patch moments with `analytic-diffusion stats DATA --patch-size K --out FILE`")
    if stats is not None and stats.kind == "patch" and args.window is not None and args.window != stats.patch_size:
        raise CLIError(f"--window {args.window} does not match the {stats.patch_size}x{stats.patch_size} patch moments in --stats {args.stats!r}")
    windowed = args.window is not None or (stats is not None and stats.kind == "patch")
    K = args.window if args.window is not None else (stats.patch_size if windowed else None)
    model = _load_model(args.model, args.checkpoint, args.model_kwargs, dev) if args.model is not None else None
    prediction = args.prediction or "epsilon"

    # ---- data: the image shape, and the images where they are needed
    source = args.data if args.data is not None else "crops"
    size = args.size
    if size is None:
        st_shape = tuple(stats.image_shape) if stats is not None and stats.kind == "full" and stats.image_shape else None
        # full stats of square RGB images and no --data: crops of the stats' size
        size = st_shape[1] if args.data is None and st_shape and st_shape[0] == 3 and st_shape[1] == st_shape[2] else d["size"]
    need_images = stats is None or model is not None  # crops are generated only when used
    images = None
    with timed(timings, "data"), user_input():
        if source == "crops":
            if args.num_train < 2 and stats is None:
                raise CLIError(f"-N/--num-train must be at least 2 (an unbiased covariance needs 2 images), got {args.num_train}")
            shape = (3, size, size)
            if need_images:
                images = ad.data.natural_crops(args.num_train, size=size, seed=args.seed)
            what = f"{args.num_train} natural {size}x{size} crops"
        elif source == "faces":
            images = ad.data.faces()
            shape = tuple(images.shape[1:])
            what = "the 100 bundled 25x25 faces"
        else:
            # moments stream the source (any size); a model reads only its first few images
            shape = ad.data.image_shape(source)
            what = str(source)
    if len(shape) != 3:
        raise CLIError(f"locality needs images [N, C, H, W]; {source} holds flat vectors of shape {tuple(shape)}")
    C, H, W = (int(v) for v in shape)
    n = C * H * W
    channel = C // 2 if args.channel is None else args.channel
    if not 0 <= channel < C:
        raise CLIError(f"--channel must be in [0, {C - 1}] for images of shape {tuple(shape)}, got {channel}")
    pixels: List[tuple] = []
    for p in args.pixels or ["centre"]:
        rc = (H // 2, W // 2) if p == "centre" else p
        if not (rc[0] < H and rc[1] < W):
            raise CLIError(f"--pixels {rc[0]},{rc[1]} is outside the {H}x{W} images (rows 0..{H - 1}, columns 0..{W - 1})")
        if rc not in pixels:
            pixels.append(rc)
    flat = [channel * H * W + h * W + w for h, w in pixels]
    if stats is not None:
        if stats.kind == "full":
            with user_input():
                stats.check_compatible(shape, f"the data ({source})")
        elif stats.image_shape is None or int(stats.image_shape[0]) != C:
            raise CLIError(f"--stats {args.stats!r} holds patch moments of shape {stats.image_shape}, but the data ({source}) has {C} channels")
    out = mkdir(Path(args.out))

    def data_source():
        return images if images is not None else source

    # ---- the filter
    mode = f"windowed {K}x{K}" if windowed else "full covariance"
    say(f"locality: {what}, image {C}x{H}x{W}, {mode}, {len(ts)} timesteps, pixels {', '.join(f'{h},{w}' for h, w in pixels)} (channel {channel})")
    with timed(timings, "moments"), user_input():  # streams the user's data
        if windowed:
            moments = stats if stats is not None else ad.estimate_patch_moments(data_source(), K, device=dev, backend=bk, progress=progress).to("cpu")
            if moments.count <= moments.n:
                say(f"note: {moments.count} patches for {moments.n} values per patch: the patch covariance is rank-deficient")
        else:
            moments = stats if stats is not None else ad.estimate_moments(data_source(), device=dev, backend=bk, progress=progress).to("cpu")
            warn_rank(moments.count, n)
    with timed(timings, "filter"), user_input():
        filt = ad.WindowedWiener(moments, image_shape=shape) if windowed else ad.WienerFilter(moments)
    rows: List[dict] = []
    fields = torch.zeros(len(flat), len(ts), C, H, W, dtype=torch.float64)
    windows = torch.zeros(len(flat), len(ts), C, H, W, dtype=torch.bool)
    densities: List[float] = []
    with timed(timings, "masks"):
        for ti, t in enumerate(tqdm(ts, desc="masks", unit="step", disable=not progress)):
            ab = ad.alpha_bar_at(t)
            if windowed:
                density = filt.mask_density(ab, args.threshold)
                win = filt.window(ab, args.threshold, flat)
            else:
                mask = filt.mask(ab, args.threshold)
                density = float((mask != 0).sum(dtype=torch.int64)) / mask.numel()
                win = mask[:, flat].T.reshape(len(flat), C, H, W)
                del mask
            windows[:, ti] = win != 0 if win.dtype != torch.bool else win
            fields[:, ti] = filt.sensitivity(ab, flat, image_shape=shape)
            densities.append(density)
            rows.append({"t": t, "alpha_bar": ab, "density": density,
                         "pixels": [{"pixel": list(p), **_window_stats(win[i], p)} for i, p in enumerate(pixels)]})
    say(f"  masks ({len(ts)} steps): {timings['masks']:.2f} s; density " + ", ".join(f"t={r['t']}: {r['density']:.1%}" for r in rows))

    model_fields = None
    if model is not None:
        with timed(timings, "model"):
            with user_input():
                inputs = images if images is not None else ad.data.load_images(source, limit=args.model_inputs)
            inputs = ad.data.to_unit_range(inputs[: args.model_inputs]).to(dev)
            if tuple(inputs.shape[1:]) != (C, H, W):
                raise CLIError(f"the model inputs have shape {tuple(inputs.shape[1:])}, expected {(C, H, W)}")
            model_fields = _model_fields(model, inputs, ts, flat, prediction, args.seed, progress)
        for ti, r in enumerate(rows):
            sim = ad.field_similarity(model_fields[:, ti], fields[:, ti], threshold=args.threshold if args.threshold > 0 else 0.02)
            for i, pr in enumerate(r["pixels"]):
                pr["model"] = {"cosine": float(sim["cosine"][i]), "support_iou": float(sim["iou"][i])}
        say(f"  model fields: {timings['model']:.2f} s; cosine with the Wiener fields " + ", ".join(
            f"t={r['t']}: {r['pixels'][0]['model']['cosine']:.3f}" for r in rows))

    # ---- figures and tables
    files: Dict[str, object] = {}
    with timed(timings, "figures"):
        from ..figures import locality_figure

        figs = []
        for i, p in enumerate(pixels):
            path = out / f"locality_r{p[0]}_c{p[1]}.{args.figure_format}"
            mf = None if model_fields is None else model_fields[i]
            fig = locality_figure(fields[i], windows[i], ts, densities, pixel=p, model_fields=mf, path=path)
            figs.append({"path": path.name, "pixel": list(p), "size": figure_size(fig)})
        files["figures"] = figs
        arrays = {"timesteps": np.asarray(ts, dtype=np.int64), "pixels": np.asarray(pixels, dtype=np.int64),
                  "wiener_fields": fields.to(torch.float32).numpy(), "windows": windows.numpy()}
        if model_fields is not None:
            arrays["model_fields"] = model_fields.to(torch.float32).numpy()
        np.savez(out / "fields.npz", **arrays)
        files["arrays"] = "fields.npz"
        md = _markdown_table(rows, pixels, model_fields is not None)
        (out / "locality.md").write_text(md)
        files["table"] = "locality.md"
    timings["total"] = time.perf_counter() - t_start
    summary = {
        "command": "locality",
        "args": args_dict(args),
        "data": what,
        "image_shape": [C, H, W],
        "filter": {"kind": "windowed" if windowed else "full", "window": K, "moments_count": int(moments.count)},
        "backends": backends if stats is None else {},
        "threshold": args.threshold,
        "channel": channel,
        "pixels": [list(p) for p in pixels],
        "timesteps": ts,
        "model": None if model is None else {"spec": args.model, "checkpoint": str(args.checkpoint), "prediction": prediction, "inputs": int(args.model_inputs)},
        "table": rows,
        "timings_s": timings,
        "files": {**files, "summary": "locality.json"},
        "versions": versions(),
    }
    (out / "locality.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    say(md.rstrip())
    say(f"done in {timings['total']:.1f} s. Wrote:")
    for f in figs:
        say(f"  {out / f['path']}")
    for name in ("locality.md", "locality.json", "fields.npz"):
        say(f"  {out / name}")
    return 0


def add_parser(sub) -> None:
    d = DEFAULTS
    lo = sub.add_parser(
        "locality",
        help="sensitivity fields and locality windows of chosen pixels across timesteps (figures, JSON/markdown table)",
        description="Build the Wiener filter of a dataset (full covariance, or the windowed filter from K x K patch "
        "moments with --window), and write, for each chosen pixel, a figure of its sensitivity field (Jacobian row) "
        "and locality-mask window at every timestep, plus locality.md / locality.json with the window sizes and "
        "the whole mask's density per timestep and fields.npz with the raw fields. With --model/--checkpoint, "
        "a trained network's own sensitivity fields (autograd, averaged over noisy data images) are added, with "
        "their cosine similarity to the Wiener fields.",
    )
    lo.add_argument("--data", default=None, help="'crops' (default: bundled natural crops), 'faces' (bundled 25x25 faces), or an image folder / .npy / .npz")
    lo.add_argument("--size", type=positive_int, default=None, help=f"crop side for --data crops (default: {d['size']}, or the --stats image size)")
    lo.add_argument("-N", "--num-train", type=positive_int, default=d["num_train"], help=f"number of crops for --data crops (default: {d['num_train']})")
    lo.add_argument("--seed", type=int, default=d["seed"], help=f"seed of the crops and of the model's input noise (default: {d['seed']})")
    lo.add_argument("--stats", default=None, help="moments saved by `stats` (full, or patch moments with --patch-size) instead of estimating them from the data")
    lo.add_argument("--window", type=positive_int, default=None, metavar="K", help="use the windowed Wiener filter from K x K patch moments (K odd) instead of the full covariance: any image size")
    lo.add_argument("--pixels", nargs="+", type=_pixel_arg, default=None, metavar="PIXEL", help="output pixels to probe: 'centre' (default) or ROW,COL; several allowed")
    lo.add_argument("--channel", type=int, default=None, help="output channel of the probed pixels (default: the middle one, green for RGB)")
    lo.add_argument("--timesteps", nargs="+", default=None, metavar="T", help="timesteps, e.g. 900 500 100 or 900,500,100 (default: the 10 DDIM steps 900, 800, ..., 0)")
    lo.add_argument("--threshold", type=finite_float, default=d["threshold"], help=f"mask threshold, docs/algorithms.md §4 (default: {d['threshold']})")
    lo.add_argument("--out", default=d["out"], help=f"output folder (default: {d['out']})")
    lo.add_argument("--model", default=None, metavar="MODULE:CLASS", help="a trained torch.nn.Module class, importable from the current folder; called as model(x_t, t)")
    lo.add_argument("--checkpoint", default=None, metavar="FILE", help="its state_dict: .safetensors, or a torch.save file (read with weights_only=True)")
    lo.add_argument("--prediction", choices=("epsilon", "x0"), default=None, help="what the model predicts (default: epsilon)")
    lo.add_argument("--model-kwargs", default=None, metavar="JSON", help="keyword arguments of the model class, as a JSON object")
    lo.add_argument("--model-inputs", type=positive_int, default=d["model_inputs"], help=f"noisy data images the model's fields are averaged over (default: {d['model_inputs']})")
    add_figure_format(lo)
    add_common_args(lo, "moments backend")
    lo.set_defaults(func=run)


