"""Index maps shared by the patch-moments backends: from per-lag sums to the patch vector's
(channel, row, column) order (docs/patch_moments.md). Only ``k^4``-sized index grids are
built; the ``[d, d]`` results (d = C*k*k) are the only d^2 allocations."""
from __future__ import annotations

import functools
from typing import Tuple

import torch


@functools.lru_cache(maxsize=8)
def _window_pairs(k: int) -> Tuple[torch.Tensor, ...]:
    """For every pair of window offsets (i, j), (i', j'), as ``[k, k, k, k]`` int64 grids: the
    lag e = (i'-i, j'-j) oriented so that e >= 0 lexicographically (di > 0, or di == 0 and
    dj >= 0) -> ``(Di, Dj)``, the top-left offset of the pair in that orientation ``(pi, pj)``,
    and whether the orientation swapped the pair (then the channel pair is transposed)."""
    I = torch.arange(k)
    i, j = I.view(k, 1, 1, 1), I.view(1, k, 1, 1)
    i2, j2 = I.view(1, 1, k, 1), I.view(1, 1, 1, k)
    di, dj = (i2 - i).expand(k, k, k, k), (j2 - j).expand(k, k, k, k)
    swap = (di < 0) | ((di == 0) & (dj < 0))
    Di = di.abs()
    Dj = torch.where(swap, -dj, dj)
    pi = torch.where(swap, i2.expand(k, k, k, k), i.expand(k, k, k, k))
    pj = torch.where(swap, j2.expand(k, k, k, k), j.expand(k, k, k, k))
    return Di, Dj, pi, pj, swap


def _to_patch_matrix(G: torch.Tensor, swap: torch.Tensor, C: int, k: int) -> torch.Tensor:
    """``G [k, k, k, k, C, C]`` (offsets i, j, i', j', channels of the oriented pair) -> the
    ``[C*k*k, C*k*k]`` matrix in (channel, row, column) order."""
    G = torch.where(swap.to(G.device)[..., None, None], G.transpose(-1, -2), G)
    return G.permute(4, 0, 1, 5, 2, 3).reshape(C * k * k, C * k * k)


# Up to this d = C*k*k (k = 15 at C = 3: 3.6 MB) the flat int64 gather index is cached; one
# gather is then ~10x faster than the grid path, which needs no d^2 index at any size.
_FLAT_INDEX_MAX_D = 2048


@functools.lru_cache(maxsize=4)
def _flat_patch_index(C: int, k: int) -> torch.Tensor:
    T = torch.arange(k * (2 * k - 1) * C * C * k * k).reshape(k, 2 * k - 1, C, C, k, k)
    return _grid_patch_s2(T, C, k)


def _grid_patch_s2(T: torch.Tensor, C: int, k: int) -> torch.Tensor:
    Di, Dj, pi, pj, swap = (t.to(T.device) for t in _window_pairs(k))
    Tp = T.permute(0, 1, 4, 5, 2, 3)  # [di, dj, i, j, c, c']
    return _to_patch_matrix(Tp[Di, Dj + k - 1, pi, pj], swap, C, k)


def patch_s2(T: torch.Tensor, C: int, k: int) -> torch.Tensor:
    """Full symmetric ``s2 [d, d]`` from lag-rectangle sums ``T [k, 2k-1, C, C, k, k]``
    (lag di, dj + k - 1, channel, channel', rectangle corner i, j)."""
    if C * k * k <= _FLAT_INDEX_MAX_D:
        return T.reshape(-1)[_flat_patch_index(C, k).to(T.device)]
    return _grid_patch_s2(T, C, k)


def stationary_cov(cov_lags: torch.Tensor, C: int, k: int) -> torch.Tensor:
    """``[d, d]`` patch covariance of a k x k window from per-lag values ``cov_lags [Li+1,
    2Lj+1, C, C]`` (di in [0, Li], dj in [-Lj, Lj], every entry filled); lags beyond Li / Lj
    are 0."""
    Li, Lj = cov_lags.shape[0] - 1, (cov_lags.shape[1] - 1) // 2
    Di, Dj, _, _, swap = (t.to(cov_lags.device) for t in _window_pairs(k))
    valid = (Di <= Li) & (Dj.abs() <= Lj)
    G = cov_lags[Di.clamp(max=Li), Dj.clamp(-Lj, Lj) + Lj] * valid[..., None, None]
    return _to_patch_matrix(G, swap, C, k)


def window_sums(S1: torch.Tensor, k: int) -> torch.Tensor:
    """``s1 [C*k*k]``: sums of the per-pixel sums ``S1 [C, H, W]`` over the
    ``(H-k+1) x (W-k+1)`` rectangles with top-left corner (i, j), i, j < k (one integral image)."""
    C, H, W = S1.shape
    oh, ow = H - k + 1, W - k + 1
    I = torch.nn.functional.pad(S1.cumsum(-2).cumsum(-1), (1, 0, 1, 0))
    R = I[:, oh : oh + k, ow : ow + k] - I[:, :k, ow : ow + k] - I[:, oh : oh + k, :k] + I[:, :k, :k]
    return R.reshape(-1)
