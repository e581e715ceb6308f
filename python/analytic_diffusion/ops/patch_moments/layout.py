"""Index maps shared by the patch-moments backends: from per-lag sums to the patch vector's
(channel, row, column) order (docs/patch_moments.md)."""
from __future__ import annotations

import functools

import torch


def _offsets(C: int, k: int):
    c = torch.arange(C).repeat_interleave(k * k)
    i = torch.arange(k).repeat_interleave(k).repeat(C)
    j = torch.arange(k).repeat(C * k)
    return c, i, j


def _pair_lags(C: int, k: int):
    """For every pair (a, b) of patch entries: the lag e = pos(b) - pos(a) oriented so that
    e >= 0 lexicographically (di > 0, or di == 0 and dj >= 0), the channel pair in that
    orientation, and the top-left position of the first entry. ``[d, d]`` each, d = C*k*k."""
    c, i, j = _offsets(C, k)
    di = i[None, :] - i[:, None]
    dj = j[None, :] - j[:, None]
    neg = (di < 0) | ((di == 0) & (dj < 0))
    first = torch.where(neg, c[None, :], c[:, None])
    second = torch.where(neg, c[:, None], c[None, :])
    pi = torch.where(neg, i[None, :], i[:, None])
    pj = torch.where(neg, j[None, :], j[:, None])
    return di.abs(), torch.where(neg, -dj, dj), first, second, pi, pj


@functools.lru_cache(maxsize=4)
def patch_gather_index(C: int, k: int) -> torch.Tensor:
    """int64 ``[d, d]``: ``s2 = T.reshape(-1)[index]`` for lag-rectangle sums
    ``T [k, 2k-1, C, C, k, k]`` (lag di, dj + k - 1, channel, channel', corner i, j)."""
    Di, Dj, first, second, pi, pj = _pair_lags(C, k)
    L = k - 1
    return ((((Di * (2 * L + 1) + Dj + L) * C + first) * C + second) * k + pi) * k + pj


@functools.lru_cache(maxsize=4)
def stationary_gather_index(C: int, k: int, Li: int, Lj: int):
    """``(index, valid)`` int64/bool ``[d, d]``: ``cov = G.reshape(-1)[index] * valid`` for per-lag
    values ``G [Li+1, 2Lj+1, C, C]`` (lags beyond ``Li``/``Lj`` are not valid)."""
    Di, Dj, first, second, _, _ = _pair_lags(C, k)
    valid = (Di <= Li) & (Dj.abs() <= Lj)
    index = ((Di.clamp(max=Li) * (2 * Lj + 1) + Dj.clamp(-Lj, Lj) + Lj) * C + first) * C + second
    return index, valid


def patch_s2(T: torch.Tensor, C: int, k: int) -> torch.Tensor:
    """Full symmetric ``s2 [d, d]`` from lag-rectangle sums ``T [k, 2k-1, C, C, k, k]``."""
    index = patch_gather_index(C, k).to(T.device)
    return T.reshape(-1)[index]


def window_sums(S1: torch.Tensor, k: int) -> torch.Tensor:
    """``s1 [C*k*k]``: sums of the per-pixel sums ``S1 [C, H, W]`` over the
    ``(H-k+1) x (W-k+1)`` rectangles with top-left corner (i, j), i, j < k (one integral image)."""
    C, H, W = S1.shape
    oh, ow = H - k + 1, W - k + 1
    I = torch.nn.functional.pad(S1.cumsum(-2).cumsum(-1), (1, 0, 1, 0))
    R = I[:, oh : oh + k, ow : ow + k] - I[:, :k, ow : ow + k] - I[:, oh : oh + k, :k] + I[:, :k, :k]
    return R.reshape(-1)
