"""Reference implementation of ``nearest_denoise``: pure PyTorch, float64-capable.

Backend signature (inputs validated by the public op): ``x [B, n]`` float32/float64,
``train [N, n]`` uint8 or float in [-1, 1], ``alpha_bar`` in (0, 1).
"""
from __future__ import annotations

import math

import torch

from ..._validate import compute_dtype, to_unit
from ...schedule import noise_level
from .state import NearestState

_BLOCK_VALUES = 1 << 24  # bound on the [B, chunk, n] temporaries, in elements


def nearest_denoise_reference(x: torch.Tensor, train: torch.Tensor, alpha_bar: float, chunk_size: int = 256, return_state: bool = False):
    """docs/algorithms.md §6: ``y_{k*}``, ``k* = argmin_k ||x - a y_k||^2`` (the first index on ties).
    ``return_state``: a :class:`NearestState` (distances in x's compute dtype, widened)."""
    dt = compute_dtype(x)
    B, n = x.shape
    a, _ = noise_level(alpha_bar)
    xf = x.to(dt)
    best = torch.full((B,), math.inf, dtype=dt, device=x.device)
    arg = torch.zeros(B, dtype=torch.long, device=x.device)
    chunk = max(1, min(chunk_size, _BLOCK_VALUES // (B * n)))
    for k0 in range(0, train.shape[0], chunk):
        d = ((xf[:, None, :] - a * to_unit(train[k0 : k0 + chunk], dt)) ** 2).sum(-1)  # [B, c]
        dmin, kmin = d.min(1)
        better = dmin < best  # strict: an earlier chunk keeps its tie
        best = torch.where(better, dmin, best)
        arg = torch.where(better, kmin + k0, arg)
    if return_state:
        return NearestState(best.to(torch.float64), arg, to_unit(train[arg], x.dtype))
    return to_unit(train[arg], x.dtype)


def nearest_topk_reference(x: torch.Tensor, train: torch.Tensor, alpha_bar: float, k: int, chunk_size: int = 256):
    """The ``k`` training images nearest to ``x / a``: ``(indices [B, k] int64, d [B, k] float64)``
    with ``d = ||x - a y||^2`` (= a^2 ||x/a - y||^2, the same order), ascending, the lower index
    first on ties. Float64 direct differences, chunked over N (running merge of the best k):
    memory O(B*k + block), never N x n."""
    B, n = x.shape
    N = train.shape[0]
    a, _ = noise_level(alpha_bar)
    xf = x.to(torch.float64)
    best_d = torch.empty(B, 0, dtype=torch.float64, device=x.device)
    best_i = torch.empty(B, 0, dtype=torch.long, device=x.device)
    chunk = max(1, min(chunk_size, _BLOCK_VALUES // (B * n)))
    step = max(1, _BLOCK_VALUES // (chunk * n))
    for k0 in range(0, N, chunk):
        y = to_unit(train[k0 : k0 + chunk], torch.float64)
        d = torch.cat([((xf[b0 : b0 + step, None, :] - a * y) ** 2).sum(-1) for b0 in range(0, B, step)])  # [B, c]
        idx = torch.arange(k0, k0 + y.shape[0], device=x.device).expand(B, -1)
        md, mi = torch.cat([best_d, d], 1), torch.cat([best_i, idx], 1)
        order = torch.sort(md, dim=1, stable=True).indices[:, :k]  # stable: earlier (lower) indices win ties
        best_d, best_i = md.gather(1, order), mi.gather(1, order)
    return best_i, best_d
