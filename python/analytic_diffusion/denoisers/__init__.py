"""Analytical denoisers with one interface: ``den(x_t, t) -> x0_hat``.

``x_t``: float32/float64 ``[B, C, H, W]`` (or ``[B, n]``); ``t``: an integer timestep of the
1000-step linear schedule (int or 0-d tensor). The output has x_t's shape and dtype.
"""
from __future__ import annotations

from .base import Denoiser, TrainSetDenoiser
from .baselines import NearestDenoiser, OptimalDenoiser, WienerDenoiser
from .kamb_ganguli import ELSDenoiser, LSDenoiser
from .locality import LocalityDenoiser
from .pspc import PSPCSquareDenoiser, pspc_schedule
from .scfdm import SmoothedCFDMDenoiser
from .schedules import KAMB_GANGULI_SCHEDULES, PatchSchedule, calibrate
from .windowed import WindowedWienerDenoiser

__all__ = [
    "Denoiser",
    "ELSDenoiser",
    "KAMB_GANGULI_SCHEDULES",
    "LSDenoiser",
    "LocalityDenoiser",
    "NearestDenoiser",
    "OptimalDenoiser",
    "PSPCSquareDenoiser",
    "PatchSchedule",
    "SmoothedCFDMDenoiser",
    "TrainSetDenoiser",
    "WienerDenoiser",
    "WindowedWienerDenoiser",
    "calibrate",
    "pspc_schedule",
]
