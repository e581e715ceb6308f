"""analytic-diffusion: fast, exact analytical (training-free) diffusion denoisers.

The locality denoiser of Lukoianov et al. (2025), the Wiener, optimal and
nearest baselines, streaming dataset moments and a DDIM sampler. The maths
is specified in SPEC.md; ``*_reference`` functions are its executable form.
"""
from __future__ import annotations

from . import ops
from ._ext import build_info
from ._registry import available_backends
from .denoisers import Denoiser, LocalityDenoiser, NearestDenoiser, OptimalDenoiser, WienerDenoiser
from .analysis import Agreement, ModelDenoiser, compare, field_similarity, sensitivity
from .interop import DiffusersModelAdapter
from .metrics import mse, r2
from .moments import (
    MomentAccumulator,
    Moments,
    PatchMomentAccumulator,
    estimate_moments,
    estimate_patch_moments,
)
from .sampling import ddim_step, sample
from .schedule import alpha_bar_at, ddim_timesteps, linear_alphas_cumprod
from .wiener import WienerFilter, locality_mask, wiener_matrix
from .windowed import WindowedWiener, WindowedWienerDenoiser
from . import _cpu  # registers the compiled CPU backends
from . import _cuda  # registers the CUDA backends
from . import _triton  # registers the Triton backends

__version__ = "0.1.0"


_LAZY = ("data", "figures")


def __getattr__(name):
    # data pulls in scikit-image and Pillow, figures matplotlib: load them on first
    # use, so that `import analytic_diffusion` stays light
    if name in _LAZY:
        import importlib

        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "Agreement",
    "Denoiser",
    "DiffusersModelAdapter",
    "LocalityDenoiser",
    "ModelDenoiser",
    "MomentAccumulator",
    "Moments",
    "NearestDenoiser",
    "OptimalDenoiser",
    "PatchMomentAccumulator",
    "WienerDenoiser",
    "WienerFilter",
    "WindowedWiener",
    "WindowedWienerDenoiser",
    "alpha_bar_at",
    "available_backends",
    "build_info",
    "compare",
    "ddim_step",
    "ddim_timesteps",
    "estimate_moments",
    "estimate_patch_moments",
    "field_similarity",
    "linear_alphas_cumprod",
    "locality_mask",
    "mse",
    "ops",
    "r2",
    "sample",
    "sensitivity",
    "wiener_matrix",
]
