"""Patch (stationary) moment sums without unfolding: the reference implementation
(pure torch, any device; docs/algorithms.md §2.4)."""
from __future__ import annotations

from typing import Tuple

import torch

_PATCH_GEMM_BUDGET = 1 << 25  # elements of one row-lag product block (256 MiB in float64)


def _region_sums(img: torch.Tensor, k: int, out_h: int, out_w: int) -> torch.Tensor:
    """Sums of ``img [..., H, W]`` over the ``out_h x out_w`` rectangles whose top-left
    corners are (i, j) for i, j in [0, k): ``[..., k, k]``, through one integral image."""
    I = torch.nn.functional.pad(img.cumsum(-2).cumsum(-1), (1, 0, 1, 0))
    return I[..., out_h : out_h + k, out_w : out_w + k] - I[..., :k, out_w : out_w + k] - I[..., out_h : out_h + k, :k] + I[..., :k, :k]


def patch_sums(x: torch.Tensor, k: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """First and second moment sums of all k x k patches of ``x [B, C, H, W]``, without
    unfolding: float64 ``s1 [C*k*k]`` and ``s2 [C*k*k, C*k*k]`` (full, symmetric).

    For patch offsets d = (i, j) and d' = d + e, ``sum_p x[p + d] x[p + d']`` is the
    sum of the lag-e product image ``P_e(q) = sum_b x[b, :, q] x[b, :, q + e]`` over
    the rectangle of positions q = p + d: one product image and one integral image
    per lag serve every pair of offsets with that lag. The batch reduction inside
    ``P_e`` is a GEMM per row lag (``X_r^T X_{r+di}`` over (channel, column)), whose
    diagonals are the column lags. Work: ``k H (C W)^2 B`` multiply-adds on GEMM
    units instead of unfold + GEMM's ``(H-k+1)(W-k+1) B (C k^2)^2``.

    uint8 input (any batch of at most 258 images) is multiplied in float32, which
    is exact there (every sum is an integer below 258 * 255^2 < 2^24); other input
    in float64.
    """
    B, C, H, W = x.shape
    oh, ow = H - k + 1, W - k + 1
    exact_f32 = x.dtype == torch.uint8 and B * 255 * 255 < (1 << 24)
    xf = x.to(torch.float32 if exact_f32 else torch.float64)
    s1 = _region_sums(xf.sum(0, dtype=torch.float64), k, oh, ow).reshape(-1)  # ordered C, row, column
    rows = xf.permute(2, 0, 1, 3).reshape(H, B, C * W)  # [row, batch, (channel, column)]
    s2 = torch.zeros(C, k, k, C, k, k, dtype=torch.float64, device=x.device)
    lags = range(-(k - 1), k)
    P = torch.zeros(len(lags), C, C, H, W, dtype=torch.float64, device=x.device)  # one product image per column lag
    row_block = max(1, _PATCH_GEMM_BUDGET // (C * W) ** 2)  # bounds G's memory at any image size
    for di in range(k):
        P.zero_()
        for r0 in range(0, H - di, row_block):
            r1 = min(H - di, r0 + row_block)
            # G[r, (c, w), (c', w')] = sum_b x[b, c, r, w] x[b, c', r + di, w']
            G = torch.bmm(rows[r0:r1].transpose(1, 2), rows[r0 + di : r1 + di]).to(torch.float64).reshape(r1 - r0, C, W, C, W)
            for li, dj in enumerate(lags):
                c0, c1 = max(0, -dj), min(W, W - dj)
                P[li, :, :, r0:r1, c0:c1] = torch.diagonal(G, offset=dj, dim1=2, dim2=4).permute(1, 2, 0, 3)
        R = _region_sums(P, k, oh, ow)  # [lag, C, C', k, k]: rectangles with top-left corner d
        for li, dj in enumerate(lags):
            if di == 0 and dj < 0:
                continue  # negative lags are transposes of positive ones
            i_idx = torch.arange(0, k - di, device=x.device)[:, None]  # offsets d with d + e inside the patch
            j_idx = torch.arange(max(0, -dj), k - max(dj, 0), device=x.device)[None, :]
            block = R[li][:, :, i_idx, j_idx].permute(2, 3, 0, 1)  # [ni, nj, C, C']
            s2[:, i_idx, j_idx, :, i_idx + di, j_idx + dj] = block
            s2[:, i_idx + di, j_idx + dj, :, i_idx, j_idx] = block.transpose(-1, -2)
    d = C * k * k
    return s1, s2.reshape(d, d)
