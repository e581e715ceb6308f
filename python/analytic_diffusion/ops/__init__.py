"""The ops: one folder per op (``locality`` with ``optimal``, ``windowed_locality``, ``els``, ``nearest``,
``moments``, ``patch_moments``), each with its validated public entry, a pure-torch ``reference.py``
and its compiled backends, registered where they are defined.

Denoiser ops take ``x`` float32/float64 ``[B, n]`` or ``[B, C, H, W]`` (outputs have x's
shape and dtype), ``train`` uint8 or float in [-1, 1] ``[N, n]`` or ``[N, C, H, W]``, and
``alpha_bar`` in (0, 1); options are keyword-only, in the same order everywhere.
"""
from __future__ import annotations

from .els import els_denoise, els_denoise_reference
from .locality import locality_denoise, locality_denoise_reference, optimal_denoise, optimal_denoise_reference
from .moments import MomentAccumulator, Moments, estimate_moments
from .nearest import (
    NearestState,
    all_reduce_nearest,
    merge_nearest,
    nearest_denoise,
    nearest_denoise_reference,
    nearest_topk,
    nearest_topk_reference,
)
from .patch_posterior import patch_posterior_denoise, patch_posterior_denoise_reference
from .patch_moments import PatchMomentAccumulator, StationaryMomentAccumulator, estimate_patch_moments, estimate_stationary_moments, patch_sums
from .softmax_state import SoftmaxState, all_reduce_state, merge_states
from .windowed_locality import windowed_locality_denoise, windowed_locality_denoise_reference

__all__ = [
    "MomentAccumulator",
    "Moments",
    "NearestState",
    "PatchMomentAccumulator",
    "StationaryMomentAccumulator",
    "SoftmaxState",
    "all_reduce_nearest",
    "all_reduce_state",
    "els_denoise",
    "els_denoise_reference",
    "estimate_moments",
    "estimate_patch_moments",
    "estimate_stationary_moments",
    "locality_denoise",
    "locality_denoise_reference",
    "merge_nearest",
    "merge_states",
    "nearest_denoise",
    "nearest_denoise_reference",
    "nearest_topk",
    "nearest_topk_reference",
    "optimal_denoise",
    "optimal_denoise_reference",
    "patch_posterior_denoise",
    "patch_posterior_denoise_reference",
    "patch_sums",
    "windowed_locality_denoise",
    "windowed_locality_denoise_reference",
]
