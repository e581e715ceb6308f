"""Reference backend of the ``patch_moments`` op (pure torch, any device; docs/algorithms.md
§2.4, docs/patch_moments.md), and the backend contract.

A "patch_moments" backend is a namespace with
  patch_sums(x [B, C, H, W], k, shift=None) -> (s1 [d], s2 [d, d]), d = C*k*k:
      sums over every k x k patch (vector order channel, row, column) of z = x, s2 full and
      symmetric. uint8 x (shift None): int64, exact. Float x: float64 sums of z = x - shift,
      shift float64 [C] (one value per channel).
  lag_sums(x [B, C, H, W], Li, Lj, shift=None) -> (A [Li+1, 2Lj+1, C, C], S1 [C, H, W]):
      A[di, dj + Lj, c, c'] = sum_b sum_q z[b, c, q] z[b, c', q + e] over the q with q and
      q + e = q + (di, dj) inside the image (entries with di = 0, dj < 0 are not computed and
      stay 0: they are transposes), S1 the per-pixel sums of z; same dtypes as patch_sums.
Neither modifies x.
"""
from __future__ import annotations

from types import SimpleNamespace
from typing import Optional, Tuple

import torch

from ... import registry

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


def _ref_patch_sums(x: torch.Tensor, k: int, shift: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    if x.dtype == torch.uint8:
        if shift is not None:
            raise ValueError("uint8 sums are exact integers: shift must be None")
        d = x.shape[1] * k * k
        s1 = torch.zeros(d, dtype=torch.int64, device=x.device)
        s2 = torch.zeros(d, d, dtype=torch.int64, device=x.device)
        for b in range(0, x.shape[0], 256):  # 256 images: exact float32 products
            a1, a2 = patch_sums(x[b : b + 256], k)
            s1 += a1.to(torch.int64)
            s2 += a2.to(torch.int64)
        return s1, s2
    z = x.to(torch.float64)
    if shift is not None:
        z = z - shift.to(z.device, torch.float64).reshape(1, -1, 1, 1)
    return patch_sums(z, k)


def lag_sums(x: torch.Tensor, Li: int, Lj: int, shift: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Whole-image lag sums by a loop over lags (one float64 contraction per lag; the
    backend contract above). uint8 input is exact: float64 sums of integer products stay
    below 2^53 for chunks of images with B*H*W*255^2 < 2^53."""
    B, C, H, W = x.shape
    u8 = x.dtype == torch.uint8
    if u8 and shift is not None:
        raise ValueError("uint8 sums are exact integers: shift must be None")
    out = torch.int64 if u8 else torch.float64
    A = torch.zeros(Li + 1, 2 * Lj + 1, C, C, dtype=out, device=x.device)
    S1 = torch.zeros(C, H, W, dtype=out, device=x.device)
    step = max(1, (1 << 53) // (H * W * 255 * 255 + 1)) if u8 else max(1, B)
    for b0 in range(0, B, step):
        z = x[b0 : b0 + step].to(torch.float64)
        if shift is not None:
            z = z - shift.to(z.device, torch.float64).reshape(1, -1, 1, 1)
        S1 += z.sum(0).to(out)
        for di in range(Li + 1):
            for dj in range(0 if di == 0 else -Lj, Lj + 1):
                a = z[:, :, : H - di, max(0, -dj) : W - max(0, dj)]
                b = z[:, :, di:, max(0, dj) : W - max(0, -dj)]
                A[di, dj + Lj] += torch.einsum("bchw,bdhw->cd", a, b).to(out)
    return A, S1


BACKEND = SimpleNamespace(name="reference", patch_sums=_ref_patch_sums, lag_sums=lag_sums)

registry.register("patch_moments", "reference", BACKEND, devices=("any",), priority=0)
