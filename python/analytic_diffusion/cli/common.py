"""What every subcommand shares: the user-error path, argument types, backend
resolution, timing and the versions written into summaries."""
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
from typing import Dict, Iterator, Optional, Sequence

import torch

PROG = "analytic-diffusion"


class CLIError(Exception):
    """A user error: bad arguments, unusable input files or data, an unusable device.

    :func:`analytic_diffusion.cli.main` prints it as ``analytic-diffusion: error:
    <message>`` and exits with status 2, without a traceback. Any other exception is
    a bug and keeps its traceback.
    """


@contextmanager
def user_input() -> Iterator[None]:
    """Mark a stage whose ValueError/TypeError are about the user's input.

    Wrap only the stages that read what the user gave (loading data, stats files and
    models, building denoisers from their options, streaming their data through the
    moment estimate): there, the library's argument and data checks raise
    ValueError/TypeError with a message naming the problem. The same exceptions
    raised anywhere else (sampling, masks, figures) are bugs and must keep their
    traceback, so they are not caught.
    """
    try:
        yield
    except (ValueError, TypeError) as e:
        raise CLIError(str(e) or type(e).__name__) from e


def say(msg: str) -> None:
    print(msg, flush=True)


@contextmanager
def timed(timings: Dict[str, object], key: str) -> Iterator[None]:
    t0 = time.perf_counter()
    yield
    timings[key] = time.perf_counter() - t0


# --------------------------------------------------------------------------- #
# argument types (argparse reports their errors as usage errors, exit 2)
# --------------------------------------------------------------------------- #
def device_arg(s: str) -> torch.device:
    try:
        return torch.device(s)
    except (RuntimeError, ValueError) as e:
        raise argparse.ArgumentTypeError(f"invalid device {s!r}: {e}") from None


def positive_int(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v}")
    return v


def finite_float(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {s!r}") from None
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {s!r}")
    return v


def add_common_args(sp: argparse.ArgumentParser, backend_help: str) -> None:
    sp.add_argument("--backend", default=None, help=backend_help + " (default: the best available; see ANALYTIC_DIFFUSION_BACKEND)")
    sp.add_argument("--device", type=device_arg, default=torch.device("cpu"), help="torch device to compute on (default: cpu)")
    sp.add_argument("--no-progress", action="store_true", help="no progress bars")


def add_figure_format(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--figure-format", choices=("png", "pdf", "svg"), default="png", help="file format of the figures (default: png)")


def check_device(dev: torch.device) -> None:
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CLIError(f"--device {dev} was requested but CUDA is not available (torch {torch.__version__})")


# --------------------------------------------------------------------------- #
# backends
# --------------------------------------------------------------------------- #
def pick_backends(requested: Optional[str], ops: Sequence[str], device: torch.device) -> Dict[str, Optional[str]]:
    """The backend each op will run, resolved now so that a bad ``--backend`` fails
    before any work. A name given for all ops applies only to ops that register it
    (like the ANALYTIC_DIFFUSION_BACKEND environment variable); it must fit one."""
    from .. import registry as _registry

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


def backend_arg(backends: Dict[str, Optional[str]], requested: Optional[str], op: str) -> Optional[str]:
    """What to pass as ``backend=`` for ``op``: the request where it applies, else None
    (so the library's own selection, which honours the environment variable, decides)."""
    return backends[op] if requested is not None and backends.get(op) == requested else None


# --------------------------------------------------------------------------- #
# user models
# --------------------------------------------------------------------------- #
def load_model(spec: str, checkpoint: str, kwargs_json: Optional[str], device: torch.device) -> torch.nn.Module:
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


def load_diffusers_unet(folder: str, device: torch.device):
    """A diffusers ``UNet2DModel`` saved with ``save_pretrained`` (a folder holding
    ``config.json`` and ``diffusion_pytorch_model.safetensors``, or a pipeline folder with a
    ``unet/`` subfolder). Only safetensors weights are read (``use_safetensors=True``: no
    pickles). Returns ``(model, prediction)``, the prediction from the pipeline's
    ``scheduler/scheduler_config.json`` when there is one (``epsilon``, or ``sample`` read
    as ``x0``), else None; a scheduler whose schedule is not this library's linear
    1000-step one is refused (docs/algorithms.md §1)."""
    root = Path(folder)
    sub = None
    if (root / "unet" / "config.json").is_file():
        sub = "unet"
    elif not (root / "config.json").is_file():
        raise CLIError(f"--checkpoint {folder!r} is a folder but holds no config.json (nor unet/config.json): not a diffusers UNet2DModel folder")
    try:
        from diffusers import UNet2DModel
    except ImportError as e:
        raise CLIError(f"--checkpoint {folder!r} is a folder, read as a diffusers UNet2DModel, but diffusers is not importable "
                       f"({e}); pip install diffusers, or give --model MODULE:CLASS with a state_dict file") from None
    prediction = None
    sched = root / "scheduler" / "scheduler_config.json"
    if sched.is_file():
        try:
            cfg = json.loads(sched.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise CLIError(f"cannot read {sched}: {e}") from None
        kind = cfg.get("prediction_type", "epsilon")
        if kind not in ("epsilon", "sample"):
            raise CLIError(f"{sched}: prediction_type {kind!r} is not supported (epsilon or sample)")
        prediction = "x0" if kind == "sample" else "epsilon"
        schedule = (cfg.get("beta_schedule", "linear"), cfg.get("beta_start", 1e-4), cfg.get("beta_end", 0.02), cfg.get("num_train_timesteps", 1000))
        if schedule[0] != "linear" or not math.isclose(schedule[1], 1e-4) or not math.isclose(schedule[2], 0.02) or schedule[3] != 1000:
            raise CLIError(f"{sched}: the network was trained on the schedule (beta_schedule, beta_start, beta_end, T) = {schedule}; "
                           "compare uses the linear (1e-4, 0.02, 1000) schedule of docs/algorithms.md §1")
    try:
        model = UNet2DModel.from_pretrained(str(root), subfolder=sub, use_safetensors=True)
    except Exception as e:  # diffusers raises OSError/EnvironmentError/ValueError for missing or bad files
        raise CLIError(f"could not load the diffusers UNet2DModel in {folder!r} (only safetensors weights are read): {type(e).__name__}: {e}") from None
    model = model.to(device).eval()
    for prm in model.parameters():
        prm.requires_grad_(False)
    return model, prediction


# --------------------------------------------------------------------------- #
# outputs
# --------------------------------------------------------------------------- #
def mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def warn_rank(N: int, n: int) -> None:
    if N <= n:
        say(
            f"note: {N} training images for n = {n} values per image: the covariance is rank-deficient, "
            "so the Wiener filter keeps whole-image directions and the locality masks are not local. "
            f"Use more than {n} images for local windows."
        )


def stats_or_estimate(stats: Optional[str], data, shape, source: str, *, progress: bool, backend: Optional[str] = None, device=None):
    """The ``--stats`` file, checked against images of ``shape`` (C, H, W), or moments
    estimated from ``data`` (``[N, C, H, W]`` uint8 or float) when none is given; ``source``
    names the data in errors. Notes a rank-deficient covariance. Returns CPU ``Moments``."""
    import analytic_diffusion as ad

    with user_input():
        if stats is not None:
            moments = ad.Moments.load(stats)
            moments.check_compatible(shape, f"the data ({source})")
        else:
            N = data.shape[0]
            if N < 2:
                raise CLIError(f"need at least 2 images to estimate moments, {source} has {N}")
            moments = ad.estimate_moments(data, progress=progress, backend=backend, device=device).to("cpu")
    warn_rank(moments.count, math.prod(shape))
    return moments


def args_dict(args: argparse.Namespace) -> dict:
    """The parsed arguments as JSON values, for the summaries."""
    return {k: (str(v) if isinstance(v, (Path, torch.device)) else v) for k, v in vars(args).items() if k != "func"}


def figure_size(fig) -> list:
    """``[width, height]`` in pixels of a figure saved as PNG."""
    w, h = fig.get_size_inches() * fig.dpi
    return [int(round(w)), int(round(h))]


def versions() -> dict:
    import matplotlib
    import numpy
    import PIL
    import tqdm

    from .. import __version__

    v = {
        "analytic_diffusion": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "pillow": PIL.__version__,
        "matplotlib": matplotlib.__version__,
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
