"""The ``analytic-diffusion`` command line (also ``python -m analytic_diffusion``).

Subcommands:

- ``demo``: the whole pipeline on bundled natural-image crops - moments, Wiener
  filter, locality masks, samples from all four denoisers - written as a PNG grid,
  a PNG of locality maps and a JSON summary with timings.
- ``stats``: full or patch moments of a dataset to a safetensors file.
- ``sample``: samples from one denoiser on the user's data, as a PNG grid and a
  uint8 ``.npy``.
- ``locality``: Wiener sensitivity fields and locality-mask windows of chosen pixels
  across timesteps (full covariance, or the windowed filter from patch moments), as
  PNG figures and a JSON/markdown table of window sizes and mask densities;
  optionally the same fields of a trained network, with their similarity.

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
    from . import registry as _registry

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
# locality
# --------------------------------------------------------------------------- #
LOCALITY_DEFAULTS = dict(size=32, num_train=4096, seed=0, threshold=0.02, out="locality_out", model_inputs=4)


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
    from .schedule import NUM_TRAIN_TIMESTEPS

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


def _load_model(spec: str, checkpoint: str, kwargs_json: Optional[str], device: torch.device) -> torch.nn.Module:
    """Instantiate ``module:Class`` (importable from the current folder or sys.path) and load
    a state_dict from ``checkpoint`` (safetensors, or torch.load with weights_only=True:
    pickled objects are refused)."""
    import importlib

    module_name, sep, cls_name = spec.partition(":")
    if not sep or not module_name or not cls_name or not all(p.isidentifier() for p in module_name.split(".")) or not cls_name.isidentifier():
        raise CLIError(f"--model must be MODULE:CLASS (e.g. mynet:UNet, importable from the current folder), got {spec!r}")
    kwargs = {}
    if kwargs_json is not None:
        try:
            kwargs = json.loads(kwargs_json)
        except json.JSONDecodeError as e:
            raise CLIError(f"--model-kwargs must be a JSON object, got {kwargs_json!r}: {e}") from None
        if not isinstance(kwargs, dict):
            raise CLIError(f"--model-kwargs must be a JSON object, got {kwargs_json!r}")
    if not os.path.exists(checkpoint):
        raise CLIError(f"--checkpoint {checkpoint!r} does not exist")
    # a console script's sys.path does not hold the current folder (python -m does)
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # ImportError, or any error raised while the module runs
        raise CLIError(f"--model {spec!r}: cannot import module {module_name!r} (it must be importable from the current folder or PYTHONPATH): {type(e).__name__}: {e}") from None
    cls = getattr(module, cls_name, None)
    if cls is None or not callable(cls):
        raise CLIError(f"--model {spec!r}: module {module_name!r} has no class {cls_name!r}")
    try:
        model = cls(**kwargs)
    except Exception as e:
        raise CLIError(f"--model {spec!r}: {cls_name}(**{kwargs}) failed: {type(e).__name__}: {e}") from None
    if not isinstance(model, torch.nn.Module):
        raise CLIError(f"--model {spec!r} is not a torch.nn.Module (got {type(model).__name__})")
    try:
        if checkpoint.endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(checkpoint)
        else:
            state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    except Exception as e:
        msg = str(e)
        # torch's weights_only message is long and suggests weights_only=False: keep only its reason
        reason = next((ln.strip() for ln in msg.splitlines() if "WeightsUnpickler error" in ln), msg.splitlines()[0] if msg else "")
        raise CLIError(
            f"could not read --checkpoint {checkpoint!r} (a safetensors file, or a torch.save'd state_dict read with "
            f"weights_only=True: pickled objects are refused): {type(e).__name__}: {reason}"
        ) from None
    if isinstance(state, dict):
        for key in ("state_dict", "model_state_dict"):
            if isinstance(state.get(key), dict):
                state = state[key]
                break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CLIError(f"--checkpoint {checkpoint!r} does not hold a state_dict (a dict of tensors)")
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise CLIError(f"--checkpoint {checkpoint!r} does not fit {spec}: {e}") from None
    model = model.to(device).eval()
    for prm in model.parameters():
        prm.requires_grad_(False)  # only d output / d input is wanted
    return model


def _model_fields(model, images: torch.Tensor, ts: Sequence[int], pixels: Sequence[int], prediction: str, seed: int, progress: bool) -> torch.Tensor:
    """The model's sensitivity fields ``d x0_hat[m] / d x_t`` (``analysis.sensitivity``,
    autograd): float64 ``[P, T, C, H, W]``, averaged over the noisy inputs
    ``x_t = a y + sqrt(1 - ab) eps`` of ``images`` (float32 ``[M, C, H, W]`` in [-1, 1],
    on the model's device; eps from a generator seeded by ``seed`` and t)."""
    from tqdm.auto import tqdm

    from .analysis import sensitivity
    from .schedule import alpha_bar_at

    fields = torch.zeros(len(pixels), len(ts), *images.shape[1:], dtype=torch.float64)
    for ti, t in enumerate(tqdm(ts, desc="model fields", unit="step", disable=not progress)):
        ab = alpha_bar_at(t)
        eps = torch.randn(images.shape, generator=torch.Generator().manual_seed(seed * 1000 + t)).to(images.device)
        x = math.sqrt(ab) * images + math.sqrt(1.0 - ab) * eps
        try:
            rows = sensitivity(model, x, t, list(pixels), prediction=prediction)  # [M, P, C, H, W]
        except (ValueError, TypeError):
            raise  # the library's own input errors: reported as they are
        except Exception as e:  # anything the user's network raises
            raise CLIError(f"the model failed on x_t of shape {tuple(x.shape)} at t={t} (called as model(x_t, t) with t a long tensor [B]): {type(e).__name__}: {e}") from None
        fields[:, ti] = rows.to(torch.float64).mean(0).cpu()
    return fields


def _fields_strip(rows: Sequence[tuple], timesteps: Sequence[int], scale: int, pixel, label_w: int, col_w: int, pad: int = 6):
    """Rows of signed fields (label, float ``[T, C, H, W]``) drawn like
    :func:`viz.locality_figure`'s sensitivity row (sum over channels, symmetric scale
    and colour bar per timestep), on columns of width ``col_w`` after a ``label_w`` label."""
    import numpy as np
    from PIL import Image, ImageDraw

    from .viz import _font, _outline, _text_size, _upscale, colorbar, diverging_colormap

    small = _font(11)
    T, _, H, W = rows[0][1].shape
    cw, ch = W * scale, H * scale
    bars = [[colorbar(float(f[i].sum(0).abs().max()), width=cw) for i in range(T)] for _, f in rows]
    bar_h = max(b.height for row in bars for b in row)
    row_h = ch + 2 + bar_h + pad
    width = label_w + T * (col_w + pad) + pad
    canvas = np.full((len(rows) * row_h, width, 3), 255, dtype=np.uint8)
    for ri, (_, f) in enumerate(rows):
        for i in range(T):
            summed = f[i].sum(0)
            img = _upscale(diverging_colormap(summed, float(summed.abs().max())), scale)
            if pixel is not None:
                _outline(img, pixel, scale)
            x = label_w + pad + i * (col_w + pad) + (col_w - cw) // 2
            canvas[ri * row_h : ri * row_h + ch, x : x + cw] = img
    out = Image.fromarray(canvas, "RGB")
    draw = ImageDraw.Draw(out)
    for ri, (label, f) in enumerate(rows):
        draw.multiline_text((pad, ri * row_h), label, fill=(0, 0, 0), font=small)
        for i in range(T):
            x = label_w + pad + i * (col_w + pad) + (col_w - cw) // 2
            out.paste(bars[ri][i], (x, ri * row_h + ch + 2))
    return out


def _locality_png(fields, windows, ts, densities, scale, pixel, model_fields=None):
    """``viz.locality_figure`` of one pixel, with a row of the model's fields appended."""
    from PIL import Image

    from .viz import _font, _text_size, locality_figure

    fig = locality_figure(fields, windows, ts, densities, scale=scale, pixel=pixel)
    if model_fields is None:
        return fig
    pad = 6
    W = fields.shape[-1]
    col_w = max(W * scale, 72)  # locality_figure's column width
    small = _font(11)
    label = "model\nsensitivity\n(sum over C)"
    fig_label_w = fig.width - len(ts) * (col_w + pad) - pad
    label_w = max(fig_label_w, _text_size(label, small)[0] + 2 * pad)
    strip = _fields_strip([(label, model_fields)], ts, scale, pixel, label_w, col_w, pad)
    out = Image.new("RGB", (label_w - fig_label_w + fig.width, fig.height + strip.height), (255, 255, 255))
    out.paste(fig, (label_w - fig_label_w, 0))
    out.paste(strip, (0, fig.height))
    return out


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


def _cmd_locality(args) -> int:
    import numpy as np

    import analytic_diffusion as ad
    from tqdm.auto import tqdm

    t_start = time.perf_counter()
    progress = not args.no_progress
    dev = args.device
    _check_device(dev)
    timings: Dict[str, float] = {}
    d = LOCALITY_DEFAULTS

    # ---- cheap checks first: nothing below is slow until the data is read
    ts = _timesteps_arg(args.timesteps) if args.timesteps else ad.ddim_timesteps(10)
    backends = _pick_backends(args.backend, ["moments"], dev)
    bk = _backend_arg(backends, args.backend, "moments")
    if args.window is not None and args.window % 2 == 0:
        raise CLIError(f"--window must be an odd number of pixels (the window is centred on the pixel), got {args.window}")
    if (args.model is None) != (args.checkpoint is None):
        raise CLIError("--model and --checkpoint go together: --model MODULE:CLASS --checkpoint FILE")
    if args.model is None and (args.model_kwargs is not None or args.prediction is not None):
        raise CLIError("--model-kwargs and --prediction need --model")
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
    with _timed(timings, "data"):
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
            stats.check_compatible(shape, f"the data ({source})")
        elif stats.image_shape is None or int(stats.image_shape[0]) != C:
            raise CLIError(f"--stats {args.stats!r} holds patch moments of shape {stats.image_shape}, but the data ({source}) has {C} channels")
    out = _mkdir(Path(args.out))

    def data_source():
        return images if images is not None else source

    # ---- the filter
    mode = f"windowed {K}x{K}" if windowed else "full covariance"
    _say(f"locality: {what}, image {C}x{H}x{W}, {mode}, {len(ts)} timesteps, pixels {', '.join(f'{h},{w}' for h, w in pixels)} (channel {channel})")
    with _timed(timings, "moments"):
        if windowed:
            moments = stats if stats is not None else ad.estimate_patch_moments(data_source(), K, device=dev, backend=bk, progress=progress).to("cpu")
            if moments.count <= moments.n:
                _say(f"note: {moments.count} patches for {moments.n} values per patch: the patch covariance is rank-deficient")
        else:
            moments = stats if stats is not None else ad.estimate_moments(data_source(), device=dev, backend=bk, progress=progress).to("cpu")
            _warn_rank(moments.count, n)
    with _timed(timings, "filter"):
        filt = ad.WindowedWiener(moments, image_shape=shape) if windowed else ad.WienerFilter(moments)
    rows: List[dict] = []
    fields = torch.zeros(len(flat), len(ts), C, H, W, dtype=torch.float64)
    windows = torch.zeros(len(flat), len(ts), C, H, W, dtype=torch.bool)
    densities: List[float] = []
    with _timed(timings, "masks"):
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
    _say(f"  masks ({len(ts)} steps): {timings['masks']:.2f} s; density " + ", ".join(f"t={r['t']}: {r['density']:.1%}" for r in rows))

    model_fields = None
    if model is not None:
        with _timed(timings, "model"):
            inputs = images if images is not None else ad.data.load_images(source, limit=args.model_inputs)
            inputs = ad.data.to_unit_range(inputs[: args.model_inputs]).to(dev)
            if tuple(inputs.shape[1:]) != (C, H, W):
                raise CLIError(f"the model inputs have shape {tuple(inputs.shape[1:])}, expected {(C, H, W)}")
            model_fields = _model_fields(model, inputs, ts, flat, prediction, args.seed, progress)
        from .analysis import field_similarity

        for ti, r in enumerate(rows):
            sim = field_similarity(model_fields[:, ti], fields[:, ti], threshold=args.threshold if args.threshold > 0 else 0.02)
            for i, pr in enumerate(r["pixels"]):
                pr["model"] = {"cosine": float(sim["cosine"][i]), "support_iou": float(sim["iou"][i])}
        _say(f"  model fields: {timings['model']:.2f} s; cosine with the Wiener fields " + ", ".join(
            f"t={r['t']}: {r['pixels'][0]['model']['cosine']:.3f}" for r in rows))

    # ---- figures and tables
    files: Dict[str, object] = {}
    with _timed(timings, "figures"):
        scale = _display_scale(H, W)
        figs = []
        for i, p in enumerate(pixels):
            fig = _locality_png(fields[i], windows[i], ts, densities, scale, p, None if model_fields is None else model_fields[i])
            path = out / f"locality_r{p[0]}_c{p[1]}.png"
            fig.save(path, optimize=True)
            figs.append({"path": path.name, "pixel": list(p), "size": list(fig.size)})
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
        "args": {k: (str(v) if isinstance(v, (Path, torch.device)) else v) for k, v in vars(args).items() if k != "func"},
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
        "versions": _versions(),
    }
    (out / "locality.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    _say(md.rstrip())
    _say(f"done in {timings['total']:.1f} s. Wrote:")
    for f in figs:
        _say(f"  {out / f['path']}")
    for name in ("locality.md", "locality.json", "fields.npz"):
        _say(f"  {out / name}")
    return 0


def _add_locality_parser(sub, common) -> None:
    d = LOCALITY_DEFAULTS
    lo = sub.add_parser(
        "locality",
        help="sensitivity fields and locality windows of chosen pixels across timesteps (PNGs, JSON/markdown table)",
        description="Build the Wiener filter of a dataset (full covariance, or the windowed filter from K x K patch "
        "moments with --window), and write, for each chosen pixel, a PNG of its sensitivity field (Jacobian row) "
        "and locality-mask window at every timestep, plus locality.md / locality.json with the window sizes and "
        "the whole mask's density per timestep and fields.npz with the raw fields. With --model/--checkpoint, "
        "a trained network's own sensitivity fields (autograd, averaged over noisy data images) are added, with "
        "their cosine similarity to the Wiener fields.",
    )
    lo.add_argument("--data", default=None, help="'crops' (default: bundled natural crops), 'faces' (bundled 25x25 faces), or an image folder / .npy / .npz")
    lo.add_argument("--size", type=_positive_int, default=None, help=f"crop side for --data crops (default: {d['size']}, or the --stats image size)")
    lo.add_argument("-N", "--num-train", type=_positive_int, default=d["num_train"], help=f"number of crops for --data crops (default: {d['num_train']})")
    lo.add_argument("--seed", type=int, default=d["seed"], help=f"seed of the crops and of the model's input noise (default: {d['seed']})")
    lo.add_argument("--stats", default=None, help="moments saved by `stats` (full, or patch moments with --patch-size) instead of estimating them from the data")
    lo.add_argument("--window", type=_positive_int, default=None, metavar="K", help="use the windowed Wiener filter from K x K patch moments (K odd) instead of the full covariance: any image size")
    lo.add_argument("--pixels", nargs="+", type=_pixel_arg, default=None, metavar="PIXEL", help="output pixels to probe: 'centre' (default) or ROW,COL; several allowed")
    lo.add_argument("--channel", type=int, default=None, help="output channel of the probed pixels (default: the middle one, green for RGB)")
    lo.add_argument("--timesteps", nargs="+", default=None, metavar="T", help="timesteps, e.g. 900 500 100 or 900,500,100 (default: the 10 DDIM steps 900, 800, ..., 0)")
    lo.add_argument("--threshold", type=float, default=d["threshold"], help=f"mask threshold, SPEC 4 (default: {d['threshold']})")
    lo.add_argument("--out", default=d["out"], help=f"output folder (default: {d['out']})")
    lo.add_argument("--model", default=None, metavar="MODULE:CLASS", help="a trained torch.nn.Module class, importable from the current folder; called as model(x_t, t)")
    lo.add_argument("--checkpoint", default=None, metavar="FILE", help="its state_dict: .safetensors, or a torch.save file (read with weights_only=True)")
    lo.add_argument("--prediction", choices=("epsilon", "x0"), default=None, help="what the model predicts (default: epsilon)")
    lo.add_argument("--model-kwargs", default=None, metavar="JSON", help="keyword arguments of the model class, as a JSON object")
    lo.add_argument("--model-inputs", type=_positive_int, default=d["model_inputs"], help=f"noisy data images the model's fields are averaged over (default: {d['model_inputs']})")
    common(lo, "moments backend")
    lo.set_defaults(func=_cmd_locality)


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

    _add_locality_parser(sub, common)
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
