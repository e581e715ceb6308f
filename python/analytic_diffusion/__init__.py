"""analytic-diffusion: fast, exact analytical (training-free) diffusion denoisers.

The locality denoiser of Lukoianov et al. (2025), the Wiener, optimal and
nearest baselines, streaming dataset moments and a DDIM sampler. The maths the
code computes is written down in docs/algorithms.md; the ``*_reference`` functions
are its executable form. The layout: docs/architecture.md.
"""
from __future__ import annotations

from importlib import metadata as _metadata

from . import ops, presets
from ._ext import build_info
from .registry import available_backends
from .ops import (
    MomentAccumulator,
    Moments,
    PatchMomentAccumulator,
    StationaryMomentAccumulator,
    estimate_moments,
    estimate_patch_moments,
    estimate_stationary_moments,
)
from .filters import WienerFilter, WindowedWiener, locality_mask, wiener_matrix
from .denoisers import (
    Denoiser,
    ELSDenoiser,
    LSDenoiser,
    LocalityDenoiser,
    NearestDenoiser,
    OptimalDenoiser,
    PSPCSquareDenoiser,
    SmoothedCFDMDenoiser,
    WienerDenoiser,
    WindowedWienerDenoiser,
)
from .denoisers.schedules import calibrate as calibrate_patch_sizes
from .analysis import Agreement, ModelDenoiser, compare, field_similarity, sensitivity
from .interop import DiffusersModelAdapter
from .metrics import mse, r2
from .sampling import ddim_step, sample
from .schedule import alpha_bar_at, ddim_timesteps, linear_alphas_cumprod

try:  # one version source: the installed package's metadata (pyproject.toml)
    __version__ = _metadata.version("analytic-diffusion")
except _metadata.PackageNotFoundError:  # a source tree on sys.path, never installed
    __version__ = "0+unknown"

_LAZY = ("data", "figures", "runs")  # scikit-image, Pillow, matplotlib: loaded on first use, not at import


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "Agreement",
    "Denoiser",
    "DiffusersModelAdapter",
    "ELSDenoiser",
    "LSDenoiser",
    "LocalityDenoiser",
    "ModelDenoiser",
    "MomentAccumulator",
    "Moments",
    "NearestDenoiser",
    "OptimalDenoiser",
    "PSPCSquareDenoiser",
    "PatchMomentAccumulator",
    "SmoothedCFDMDenoiser",
    "StationaryMomentAccumulator",
    "WienerDenoiser",
    "WienerFilter",
    "WindowedWiener",
    "WindowedWienerDenoiser",
    "alpha_bar_at",
    "available_backends",
    "build_info",
    "calibrate_patch_sizes",
    "compare",
    "data",
    "ddim_step",
    "ddim_timesteps",
    "estimate_moments",
    "estimate_patch_moments",
    "estimate_stationary_moments",
    "field_similarity",
    "figures",
    "linear_alphas_cumprod",
    "locality_mask",
    "mse",
    "ops",
    "presets",
    "r2",
    "runs",
    "sample",
    "sensitivity",
    "wiener_matrix",
]
