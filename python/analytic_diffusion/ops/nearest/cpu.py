"""CPU backend of ``nearest_denoise`` (docs/algorithms.md §6): ``_C.nearest_denoise_run``
(csrc/cpu/nearest_denoise.cpp) computes the optimal denoiser's distances -- the same
float64 direct differences ``(x - a y)^2``, never the expanded form, from the same compiled
function -- and keeps an argmin instead of a softmax: O(N n), parallel over contiguous
blocks of training images, reduced in index order so that the lowest index wins every tie
(like ``torch.argmin``) whatever the thread count. uint8, float32 and float64 training sets
are read in place with any strides (float16/bfloat16 are converted to float32, exactly).

Importing this module only registers the backend; the compiled module is loaded on the
first availability probe or call.
"""
from __future__ import annotations

from typing import Tuple

import torch

from ... import _ext, registry
from ...schedule import noise_level
from .. import pruning
from ..locality.cpu import full_plan
from .state import NearestState

_SYMBOLS = ("nearest_denoise_run", "full_pruned_run")


def available() -> bool:
    """``_C`` loads and has the nearest kernel."""
    return _ext.cpu_has(_SYMBOLS)


def _module():
    return _ext.require_cpu(_SYMBOLS, "nearest")


def nearest_run(x: torch.Tensor, train: torch.Tensor, alpha_bar: float, *, force_portable: bool = False) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(out [B, n] in x's dtype, index [B] int64, dist [B] float64)``: the nearest training
    image of each query, its index (lowest on ties) and its float64 distance
    ``||x - a y||^2``. ``x``: float32/float64 ``[B, n]``; ``train``: uint8 or float ``[N, n]``;
    any strides. ``force_portable`` uses the plain C++ distances instead of AVX-512."""
    mod = _module()
    # Not input validation (the public op did that): the kernel reads and writes through raw
    # pointers, so anything it would misread is fixed here.
    if x.device.type != "cpu" or train.device.type != "cpu":
        raise ValueError("the cpu nearest backend needs CPU tensors")
    if x.dtype not in (torch.float32, torch.float64) or x.dim() != 2 or train.dim() != 2 or train.shape[1] != x.shape[1]:
        raise ValueError(f"need x float32/float64 [B, n] and train [N, n], got {x.dtype} {tuple(x.shape)} and {tuple(train.shape)}")
    if train.dtype not in _ext.TRAIN_KIND:
        train = train.float()  # float16 / bfloat16 images: exact in float32
    B, n = x.shape
    N = train.shape[0]
    a, _ = noise_level(alpha_bar)
    # outputs start as NaN / -1 so that anything the kernel failed to write is visible
    out = torch.full((B, n), float("nan"), dtype=x.dtype)
    index = torch.full((B,), -1, dtype=torch.int64)
    dist = torch.full((B,), float("nan"), dtype=torch.float64)
    mod.nearest_denoise_run(
        x.data_ptr(), B, n, x.stride(0), x.stride(1), x.dtype == torch.float64,
        train.data_ptr(), N, train.stride(0), train.stride(1), _ext.TRAIN_KIND[train.dtype],
        a, out.data_ptr(), x.dtype == torch.float64, index.data_ptr(), dist.data_ptr(),
        bool(force_portable),
    )
    return out, index, dist


# Below this many training images the bound costs more than it saves.
PRUNE_MIN_N = 256
PRUNE_MAX_KEPT = 0.5


def nearest_pruned_run(x: torch.Tensor, train: torch.Tensor, alpha_bar: float):
    """:func:`nearest_run` with certified pruning (docs/algorithms.md §14): an image is skipped only
    when a proven lower bound on its distance exceeds a proven upper bound on the smallest, so
    the result (index, lowest on ties, and its float64 distance, bit for bit) is the unpruned
    one. Returns None where pruning would not pay (then run :func:`nearest_run`)."""
    B, n = x.shape
    N = train.shape[0]
    if N < PRUNE_MIN_N:
        return None
    offsets, index = pruning.survivors(x, train, alpha_bar, 0.0)
    kept = int(index.numel())
    if kept > PRUNE_MAX_KEPT * B * N:
        return None
    if train.dtype not in _ext.TRAIN_KIND:
        train = train.float()
    a, _ = noise_level(alpha_bar)
    out = pruning.nan_array((B, n), x.dtype)  # numpy fill: see pruning.nan_array
    arg = torch.full((B,), -1, dtype=torch.int64)
    dist = torch.full((B,), float("nan"), dtype=torch.float64)
    _module().full_pruned_run(
        full_plan(n), x.data_ptr(), B, x.stride(0), x.stride(1), x.dtype == torch.float64,
        train.data_ptr(), N, train.stride(0), train.stride(1), _ext.TRAIN_KIND[train.dtype],
        a, 1.0, offsets.data_ptr(), index.data_ptr(), True,
        out.data_ptr(), x.dtype == torch.float64, 0, dist.data_ptr(), 0, arg.data_ptr(),
    )
    pruning.set_stats(B * N, B * N - kept)
    return out, arg, dist


def nearest_denoise_cpu(x, train, alpha_bar, chunk_size=256, return_state=False, prune=True):
    """Backend of ``ops.nearest_denoise`` (reference signature; inputs validated).
    ``chunk_size`` is a memory knob of the reference only; ``prune`` (default) skips images
    that provably cannot be the nearest (docs/algorithms.md §14; same result)."""
    res = nearest_pruned_run(x, train, alpha_bar) if prune else None
    if res is None:
        pruning.set_stats(x.shape[0] * train.shape[0], 0)
        res = nearest_run(x, train, alpha_bar)
    out, index, dist = res
    return NearestState(dist, index, out) if return_state else out


registry.register("nearest_denoise", "cpu", nearest_denoise_cpu, devices=("cpu",), priority=10, is_available=available)
