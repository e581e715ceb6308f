"""Triton backend of the ``patch_moments`` op (contract in ``ops/patch_moments/reference.py``;
docs/algorithms.md §2.4, docs/patch_moments.md): the lag-product images of the batch on the
GPU, without unfolding a patch.

Kernel (``lagprod_kernel``): one program per (block of ``BP`` pixels of the row-major image,
lag e = (di, dj)). It streams the batch in tiles of ``BB`` images, loads ``[BB, C, BP]``
values at q and at q + e (each reused for all C channel pairs) and sums
``z[b, c, q] * z[b, c', q + e]`` over the images for each pixel q of its block and every
channel pair (0 where q + e lies outside the image): the lag-e product image
``P_e[c, c', q]``. uint8 images: integer products summed in int32 within blocks of
``_U8_BLOCK_IMAGES`` images (each product <= 255^2 = 65025, so a block sums to at most
16384 * 65025 < 2^31 - 1: no wrap) and in int64 across blocks: exact, independent of the
batch order, of how the images are split into calls, of the launch shape. Float images:
float64 products of ``z = x - shift[c]``. ``REDUCE``: each program stores the sum over its
pixels instead (the whole-image lag sums of ``lag_sums``; the host adds the blocks in a
fixed order, so float results are deterministic too).

Host: ``patch_sums`` turns ``P_e`` into the rectangle sums ``T [k, 2k-1, C, C, k, k]`` with
one integral image per (lag, channel pair) (int64 for uint8: exact) and reads ``s1`` and
the ``[d, d]`` ``s2`` off with layout.py's index maps, as the CPU backend does. Lags are
processed in groups of row lags so that the ``P_e`` buffer stays below ``_P_BUDGET``
bytes. ``S1`` (per-pixel sums of z) is a torch reduction (int64 for uint8).

Work: ``B * H * W * C^2`` multiply-adds per lag, on the CUDA cores. Integer tensor cores
are not used: the lag products are a banded GEMM whose band (|dj| < k) is narrow for
k << W (docs/patch_moments.md, "GPU kernel").
"""
from __future__ import annotations

import functools
from types import SimpleNamespace
from typing import Optional, Tuple

import torch

from ... import registry
from .. import triton_support
from .layout import patch_s2, window_sums

# GPU launch shape: (BB, products per tile, num_warps); BP = products / (BB * CP^2) pixels,
# clamped to [32, 512], so a tile of products [BB, CP, CP, BP] is at most 8192 values (64
# per thread at 4 warps; C = 1 gets 2048: with 2048 pixels its float variants spilled). Untuned (no GPU was available while writing it);
# gpu_static_check.py compiles it for sm_80 and sm_90 for every input dtype, C = 1 and 3,
# with and without REDUCE.
PATCH_GPU_CONFIG = (4, 8192, 4)
_U8_BLOCK_IMAGES = 16384  # int32 partial sums: 16384 * 255^2 < 2^31 - 1
_P_BUDGET = 1 << 28  # bytes of lag-product images per launch (patch_sums)
_INTERP_VALUES = 1 << 18  # interpreter: bound on BB * CP^2 * BP


@functools.lru_cache(maxsize=None)
def _kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def lagprod_kernel(
        x_ptr,  # [B, C, H, W] uint8 or float, element strides sxb, sxc, sxh, sxw
        sxb,
        sxc,
        sxh,
        sxw,
        shift_ptr,  # f64 [C] (float x; unused for uint8)
        out_ptr,  # int64 / f64: [L, C, C, H*W] (not REDUCE) or [L, C, C, nblk] (REDUCE)
        B,
        C,
        H,
        W,
        di0,  # first row lag of this launch; lag l: di = di0 + l // (2Lj + 1), dj = l % (2Lj + 1) - Lj
        Lj,
        nblk,  # pixel blocks
        IS_U8: tl.constexpr,
        REDUCE: tl.constexpr,
        BB: tl.constexpr,
        BP: tl.constexpr,
        CP: tl.constexpr,  # channels rounded up to a power of two
        BLOCK_IMAGES: tl.constexpr,  # uint8: images per int32 partial sum
    ):
        pid_p = tl.program_id(0)
        lag = tl.program_id(1)
        nj = 2 * Lj + 1
        di = di0 + lag // nj
        dj = lag % nj - Lj
        HW = H * W
        q = pid_p * BP + tl.arange(0, BP)
        r = q // W
        col = q % W
        ok = (q < HW) & (r + di < H) & (col + dj >= 0) & (col + dj < W)
        rc = tl.arange(0, CP)
        c_ok = rc < C
        oc = rc.to(tl.int64)[:, None] * sxc  # [CP, 1]
        oa = oc + (r.to(tl.int64) * sxh + col.to(tl.int64) * sxw)[None, :]  # [CP, BP]
        ob = oc + ((r + di).to(tl.int64) * sxh + (col + dj).to(tl.int64) * sxw)[None, :]
        cq = c_ok[:, None] & ok[None, :]
        rb = tl.arange(0, BB)
        # di = 0, dj < 0: transposes of dj > 0, never computed (the contract leaves them 0)
        b_end = tl.where((di == 0) & (dj < 0), 0, B)
        if IS_U8:
            acc = tl.zeros([CP, CP, BP], tl.int64)
            for b0 in range(0, b_end, BLOCK_IMAGES):
                part = tl.zeros([CP, CP, BP], tl.int32)
                for b1 in range(b0, tl.minimum(b0 + BLOCK_IMAGES, b_end), BB):
                    b = b1 + rb
                    m = (b < b_end)[:, None, None] & cq[None, :, :]  # [BB, CP, BP]
                    ob_b = b.to(tl.int64)[:, None, None] * sxb
                    va = tl.load(x_ptr + ob_b + oa[None, :, :], mask=m, other=0).to(tl.int32)
                    vb = tl.load(x_ptr + ob_b + ob[None, :, :], mask=m, other=0).to(tl.int32)
                    part += tl.sum(va[:, :, None, :] * vb[:, None, :, :], axis=0)  # [CP, CP, BP]
                acc += part.to(tl.int64)
        else:
            sv = tl.load(shift_ptr + rc, mask=c_ok, other=0.0)[None, :, None]  # [1, CP, 1]
            acc = tl.zeros([CP, CP, BP], tl.float64)
            for b1 in range(0, b_end, BB):
                b = b1 + rb
                m = (b < b_end)[:, None, None] & cq[None, :, :]
                ob_b = b.to(tl.int64)[:, None, None] * sxb
                va = tl.where(m, tl.load(x_ptr + ob_b + oa[None, :, :], mask=m, other=0).to(tl.float64) - sv, 0.0)
                vb = tl.where(m, tl.load(x_ptr + ob_b + ob[None, :, :], mask=m, other=0).to(tl.float64) - sv, 0.0)
                acc += tl.sum(va[:, :, None, :] * vb[:, None, :, :], axis=0)
        pair = (lag * C * C + rc[:, None] * C + rc[None, :]).to(tl.int64)  # [CP, CP]: (lag, c, c')
        pm = c_ok[:, None] & c_ok[None, :]
        if REDUCE:
            tl.store(out_ptr + pair * nblk + pid_p, tl.sum(acc, axis=2), mask=pm)
        else:
            tl.store(out_ptr + pair[:, :, None] * HW + q[None, None, :], acc, mask=pm[:, :, None] & (q < HW)[None, None, :])

    return lagprod_kernel


def gpu_pixels(C: int) -> int:
    """Pixels per program on a GPU for C channels (PATCH_GPU_CONFIG)."""
    bb, products, _ = PATCH_GPU_CONFIG
    cp = triton_support.pow2_at_least(C, 1)
    return min(512, max(32, products // (bb * cp * cp)))


def _blocks(device: torch.device, B: int, C: int, HW: int, blocks: Optional[dict]) -> dict:
    """GPU: PATCH_GPU_CONFIG. Interpreter: few large steps (it pays per operation)."""
    blk = dict(blocks or {})
    cp = triton_support.pow2_at_least(C, 1)
    if device.type == "cuda":
        blk.setdefault("BB", PATCH_GPU_CONFIG[0])
        blk.setdefault("BP", gpu_pixels(C))
        blk.setdefault("num_warps", PATCH_GPU_CONFIG[2])
    else:
        blk.setdefault("BP", triton_support.pow2_at_least(min(HW, 1024), 16))
        blk.setdefault("BB", triton_support.pow2_at_least(min(B, max(1, _INTERP_VALUES // (blk["BP"] * cp * cp))), 1))
    for key in ("BB", "BP"):
        if blk[key] < 1 or blk[key] & (blk[key] - 1):
            raise ValueError(f"blocks[{key!r}] must be a power of two, got {blk[key]}")
    return blk


def _prepare(x: torch.Tensor, shift: Optional[torch.Tensor]):
    """(x as the kernel reads it, shift float64 [C] on x's device or a dummy, is_u8)."""
    triton_support.check_device(x, "patch_moments", "x")
    C = x.shape[1]
    if x.dtype == torch.uint8:
        if shift is not None:
            raise ValueError("uint8 sums are exact integers: shift must be None")
        return x, torch.zeros(1, dtype=torch.float64, device=x.device), True
    if x.dtype not in (torch.float16, torch.float32, torch.float64):
        x = x.to(torch.float64)
    shift = torch.zeros(C, dtype=torch.float64, device=x.device) if shift is None else shift.to(x.device, torch.float64).contiguous()
    if tuple(shift.shape) != (C,):
        raise ValueError(f"shift must be float64 [{C}], got shape {tuple(shift.shape)}")
    return x, shift, False


def _launch(x, shift, is_u8, di0: int, n_di: int, Lj: int, reduce: bool, blocks: Optional[dict]) -> torch.Tensor:
    """Lag products for row lags [di0, di0 + n_di) and every dj in [-Lj, Lj]:
    ``[n_di, 2Lj+1, C, C, H, W]`` (or ``[n_di, 2Lj+1, C, C]`` whole-image sums if ``reduce``),
    int64 for uint8, float64 otherwise."""
    B, C, H, W = x.shape
    HW = H * W
    blk = _blocks(x.device, B, C, HW, blocks)
    nblk = -(-HW // blk["BP"])
    L = n_di * (2 * Lj + 1)
    dt = torch.int64 if is_u8 else torch.float64
    # every element is written by the kernel (zeros for the di = 0, dj < 0 transposes)
    out = torch.empty(L * C * C * (nblk if reduce else HW), dtype=dt, device=x.device)
    launch = {"num_warps": blk["num_warps"]} if x.device.type == "cuda" and "num_warps" in blk else {}
    with triton_support.launch_context(x):
        _kernels()[(nblk, L)](
            x, *x.stride(), shift, out, B, C, H, W, di0, Lj, nblk,
            IS_U8=is_u8, REDUCE=reduce, BB=blk["BB"], BP=blk["BP"], CP=triton_support.pow2_at_least(C, 1), BLOCK_IMAGES=max(blk["BB"], _U8_BLOCK_IMAGES // blk["BB"] * blk["BB"]),
            **launch,
        )
    if reduce:
        return out.reshape(n_di, 2 * Lj + 1, C, C, nblk).sum(-1)
    return out.reshape(n_di, 2 * Lj + 1, C, C, H, W)


def _per_pixel_sums(x: torch.Tensor, shift: torch.Tensor, is_u8: bool) -> torch.Tensor:
    if is_u8:
        return x.sum(0, dtype=torch.int64)
    return (x.to(torch.float64) - shift.reshape(-1, 1, 1)).sum(0)


def _corner_sums(P: torch.Tensor, k: int, oh: int, ow: int) -> torch.Tensor:
    """Sums of ``P [..., H, W]`` over the ``oh x ow`` rectangles with top-left corner (i, j),
    i, j < k: ``[..., k, k]``, one integral image (int64 for integer P: exact)."""
    I = torch.nn.functional.pad(P.cumsum(-2).cumsum(-1), (1, 0, 1, 0))
    return I[..., oh : oh + k, ow : ow + k] - I[..., :k, ow : ow + k] - I[..., oh : oh + k, :k] + I[..., :k, :k]


def patch_sums(x: torch.Tensor, k: int, shift: Optional[torch.Tensor] = None, *, blocks: Optional[dict] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(s1 [d], s2 [d, d])`` over every k x k patch of ``x [B, C, H, W]`` (any strides),
    d = C*k*k, s2 full and symmetric: int64 exact for uint8 ``x``, float64 sums of
    ``x - shift`` otherwise (the backend contract). ``blocks``: BB, BP, num_warps (tests)."""
    x, sh, is_u8 = _prepare(x, shift)
    B, C, H, W = x.shape
    oh, ow = H - k + 1, W - k + 1
    dt = torch.int64 if is_u8 else torch.float64
    T = torch.empty(k, 2 * k - 1, C, C, k, k, dtype=dt, device=x.device)
    per_di = (2 * k - 1) * C * C * H * W * 8
    group = max(1, min(k, _P_BUDGET // per_di))
    for di0 in range(0, k, group):
        n_di = min(group, k - di0)
        T[di0 : di0 + n_di] = _corner_sums(_launch(x, sh, is_u8, di0, n_di, k - 1, False, blocks), k, oh, ow)
    S1 = _per_pixel_sums(x, sh, is_u8)
    return window_sums(S1, k), patch_s2(T, C, k)


def lag_sums(x: torch.Tensor, Li: int, Lj: int, shift: Optional[torch.Tensor] = None, *, blocks: Optional[dict] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Whole-image lag sums ``A [Li+1, 2Lj+1, C, C]`` (di = 0, dj < 0 left 0) and per-pixel
    sums ``S1 [C, H, W]``: int64 exact for uint8, float64 of ``x - shift`` otherwise."""
    x, sh, is_u8 = _prepare(x, shift)
    A = _launch(x, sh, is_u8, 0, Li + 1, Lj, True, blocks)
    return A, _per_pixel_sums(x, sh, is_u8)


BACKEND = SimpleNamespace(name="triton", patch_sums=patch_sums, lag_sums=lag_sums)

registry.register(
    "patch_moments", "triton", BACKEND,
    devices=triton_support.devices(), priority=15, is_available=triton_support.available,
)
