"""What every subcommand shares: the user-error path, argument types, backend
resolution, timing and the versions written into summaries."""
from __future__ import annotations

import argparse
import math
import platform
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
