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

Host: ``patch_sums`` turns ``P_e`` into the rectangle sums ``T [k, 2k-1, C, C, k, k]``
(int64 for uint8: exact) by window sums along the columns (each line's total minus its
border entries: one read of ``P_e``, the largest array of the call), then along the rows of
the small ``[..., H, k]`` result, and reads ``s1`` and
the ``[d, d]`` ``s2`` off with layout.py's index maps, as the CPU backend does. Lags are
processed in groups of row lags so that the ``P_e`` buffer stays below ``_P_BUDGET``
bytes. ``S1`` (per-pixel sums of z) is a torch reduction (int64 for uint8).

Work: ``B * H * W * C^2`` multiply-adds per lag on the CUDA cores.

Tensor-core kernel (``lagprod_mma_kernel``, uint8 only). For an image row r and a row lag di,
``X_r^T X_{r+di}`` with ``X_r = [B, (c, w)]`` (the batch's row r over channel and column) is a
``[C*W, C*W]`` GEMM over the batch whose entry ``(c, w; c', w')`` is ``P_e[c, c'](r, w)`` for
``e = (di, w' - w)``: the lag products are its band ``|w' - w| <= Lj``. Columns are tiled in
blocks of ``BW = BM // C`` pixels (``C * BW <= BM`` rows of (channel, column), BM = 64 or 32);
one program per (row r, row lag di, column-tile pair (ti, tj)) with ``|tj - ti| <=
ceil(Lj / BW)``, the only pairs that meet the band, runs ``tl.dot`` on int8 tiles ``[BM, BK]
x [BK, BM]`` over the batch (int8 ``mma.sync ... s32.s8.s8`` on sm_80, ``wgmma ... s8`` on
sm_90) and scatters the band entries of its block to ``P_e``. Exactness (docs/algorithms.md
§2.3): ``s = u - 128`` (the byte with its top bit flipped, read as int8) and

    sum_b u u' = sum_b s s' + 128 (U + U') - 128^2 B,      U = per-pixel sums of u

with ``|s s'| <= 2^14``: the int32 sum of a launch (at most ``_MMA_MAX_IMAGES = 65536``
images, ``2^30 < 2^31``; larger batches are split and their products added in int64; the
``.satfinite`` of sm_80's instruction never triggers) is exact, and the corrections are added
in int64. Padding (images past the batch, pixels outside the image, rows ``r + di >= H``) is
loaded as ``u = 128``, ``s = 0``, and the corrections are applied only to pairs of valid
pixels; every element of ``P_e`` is written by exactly one program (the one whose tile tj holds
column ``w + dj``), zeros included, so results are bit-identical to the CUDA-core kernel.
Useful fraction of the int8 products (``mma_efficiency``): 36% at 64x64x3, k = 15 (10 tile
pairs of 64 x 64 for a band of ``9 (29 * 64 - 210)`` products per row pair; C = 3 leaves one
of 64 tile rows empty); tensor cores do ~30x the int32 multiply-adds of the CUDA cores
(H100 data sheet), so ``use_mma`` picks this kernel for uint8 when its modelled efficiency,
including the batch padded to BK, is at least 1/8 (``PATCH_MMA = "auto"``; True / False
force a kernel), and the CUDA-core kernel otherwise (float input always: tensor cores would
round). ``lag_sums`` uses it through per-pixel products summed per lag when they fit
``_P_BUDGET``. Compiled for sm_80 and sm_90 (benchmarks/gpu_static_check.py: IMMA /
IGMMA in the SASS, no spills) and tested in Triton's interpreter; **never run on a GPU**,
its speed is a model (benchmarks/results/gpu-model.md).
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

# lagprod_mma_kernel (uint8 on int8 tensor cores). Launch shape on a GPU: tile rows BM
# (channel, column) pairs, BK images per tl.dot, warps, pipeline stages. Untuned (no GPU was
# available while writing it); gpu_static_check.py compiles it for sm_80 and sm_90.
# 64-row tiles (a Hopper warpgroup's wgmma m64), or 32-row tiles (mma.sync) where they more
# than double the useful fraction of the products (narrow rows: C = 1 up to ~40 pixels).
PATCH_MMA_GPU_CONFIG = dict(BM=64, BK=64, num_warps=4, num_stages=2)
PATCH_MMA_GPU_SMALL = dict(BM=32, BK=64, num_warps=2, num_stages=2)
PATCH_MMA_CPU_CONFIG = dict(BM=32, BK=32)  # the interpreter: small tiles, few wasted products
# What the tensor-core kernel accepts on every device (an int8 tl.dot needs tiles of >= 16
# rows and K >= 32; powers of two for tl.arange)
PATCH_MMA_LIMITS = dict(BM=(16, 32, 64, 128), BK=(32, 64, 128))
# "auto": the tensor-core kernel for uint8 input when its modelled efficiency (useful
# products / computed products, see mma_efficiency) is at least _MMA_MIN_EFFICIENCY; True:
# always for uint8 (when C fits a tile); False: never (the CUDA-core kernel)
PATCH_MMA = "auto"
# int8 tensor cores do ~30x the int32 multiply-adds of the CUDA cores (H100: 1979 T int8
# ops/s dense against ~67 T int32 ops/s); requiring 1/8 useful work keeps a 4x margin on an
# unmeasured ratio
_MMA_MIN_EFFICIENCY = 0.125
# images per launch of the tensor-core kernel, whose int32 sums of s s' (|s s'| <= 2^14) would
# wrap beyond 131071 images: 65536 * 2^14 = 2^30; larger batches are split and their int64
# products added on the host
_MMA_MAX_IMAGES = 65536


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

    @triton.jit
    def lagprod_mma_kernel(
        x_ptr,  # int8 view of uint8 [B, C, H, W] (the bytes u), element strides sxb, sxc, sxh, sxw
        sxb,
        sxc,
        sxh,
        sxw,
        u_ptr,  # int64 [C, H, W] contiguous: per-pixel sums of the batch's bytes (U)
        out_ptr,  # int64 [L, C, C, H*W]: every element written (0 outside the valid pairs)
        B,
        C,
        H,
        W,
        di0,  # first row lag of this launch; lag l: di = di0 + l // (2Lj + 1), dj = l % (2Lj + 1) - Lj
        Lj,
        n_half,  # column-tile offsets tj - ti in [-n_half, n_half] (ceil(Lj / BW))
        corr,  # -128^2 * B, exact (a Python int: int64 when it needs it)
        BW: tl.constexpr,  # image columns per tile (C * BW <= BM)
        BM: tl.constexpr,  # tile rows (channel, column), a power of two >= 16
        BK: tl.constexpr,  # images per int8 tl.dot (>= 32)
    ):
        # program (image row r, row lag di, column tiles (ti, tj)): the [BM, BM] block of
        # X_r^T X_{r+di}, X_r = [B, (c, w)] the batch's row r; its entry (c, w; c', w') is
        # P_e[c, c'](r, w) for e = (di, w' - w)
        r = tl.program_id(0)
        di = di0 + tl.program_id(1)
        n_off = 2 * n_half + 1
        ti = tl.program_id(2) // n_off
        off = tl.program_id(2) % n_off - n_half
        tj = ti + off
        m = tl.arange(0, BM)
        ch = m // BW
        wa = ti * BW + m % BW
        wb = tj * BW + m % BW
        # conditions on program scalars enter masks as vectors (zero + scalar): the interpreter
        # turns a block & scalar-bool into int32, which tl.load refuses as a mask
        zero = m * 0
        ok_a = (ch < C) & (wa < W)
        ok_b = (ch < C) & (wb >= 0) & (wb < W) & (zero + r + di < H)
        # tiles wholly outside the image, rows past the bottom, and at di = 0 the tiles left of
        # the diagonal (dj < 0: transposes, left 0 by the contract) stream no images
        skip = (tj < 0) | (tj * BW >= W) | (r + di >= H) | ((di == 0) & (off < 0))
        b_end = tl.where(skip, 0, B)
        live = zero + b_end > 0  # [BM]: not skip (B >= 1)
        oa = ch.to(tl.int64) * sxc + r.to(tl.int64) * sxh + wa.to(tl.int64) * sxw
        ob = ch.to(tl.int64) * sxc + (r + di).to(tl.int64) * sxh + wb.to(tl.int64) * sxw
        kk = tl.arange(0, BK)
        # int32: |s s'| <= 2^14 and a launch holds at most _MMA_MAX_IMAGES <= 131071 images
        acc = tl.zeros([BM, BM], tl.int32)
        for b1 in range(0, b_end, BK):
            b = b1 + kk
            mb = b < b_end
            ob_b = b.to(tl.int64) * sxb
            # s = u - 128 is the byte u with its top bit flipped, read as int8; padding (images
            # past the batch, pixels outside the image) is u = 128: s = 0, no product
            a = tl.load(x_ptr + oa[:, None] + ob_b[None, :], mask=ok_a[:, None] & mb[None, :], other=-128) ^ -128  # [BM, BK]
            v = tl.load(x_ptr + ob_b[:, None] + ob[None, :], mask=mb[:, None] & ok_b[None, :], other=-128) ^ -128  # [BK, BM]
            acc = tl.dot(a, v, acc, out_dtype=tl.int32)
        # sum u u' = sum s s' + 128 (U + U') - 128^2 B (docs/algorithms.md §2.3); U, U' and the
        # constant enter as a row and a column vector, 0 where the pair is not valid
        HW = H * W
        ua = tl.load(u_ptr + ch.to(tl.int64) * HW + r * W + wa, mask=ok_a & live, other=0)
        ub = tl.load(u_ptr + ch.to(tl.int64) * HW + (r + di) * W + wb, mask=ok_b & live, other=0)
        ca = tl.where(ok_a & live, 128 * ua + corr, 0)  # [BM]
        cb = tl.where(ok_b & live, 128 * ub, 0)
        dj = wb[None, :] - wa[:, None]  # [BM, BM]
        lo = tl.where(di > 0, -Lj, 0)  # at di = 0 only dj >= 0
        pair_ok = (ok_a & live)[:, None] & (ok_b & live)[None, :]
        val = tl.where(pair_ok & (dj >= lo), acc.to(tl.int64) + ca[:, None] + cb[None, :], 0)
        # every (lag, c, c', r, w) with |dj| <= Lj, w < W belongs to exactly one program: the
        # one whose tile tj holds column w + dj (inside the image or not); it writes it.
        # address ((l C + c) C + c') HW + r W + w with l = (di - di0)(2Lj + 1) + Lj + dj,
        # split into a scalar, a row vector (c, w) and a column vector (c', w + dj)
        CCHW = (r.to(tl.int64) * 0 + C) * C * H * W  # int64 (C, H, W may be constexpr 1)
        base = ((di - di0) * (2 * Lj + 1) + Lj).to(tl.int64) * CCHW + r * W
        row = ch.to(tl.int64) * (C * HW) + wa - wa.to(tl.int64) * CCHW
        col = ch.to(tl.int64) * HW + wb.to(tl.int64) * CCHW
        keep = (ok_a[:, None] & (ch < C)[None, :]) & (dj <= Lj) & (dj >= -Lj)
        tl.store(out_ptr + (base + row[:, None] + col[None, :]), val, mask=keep)

    return SimpleNamespace(lagprod_kernel=lagprod_kernel, lagprod_mma_kernel=lagprod_mma_kernel)


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
        _kernels().lagprod_kernel[(nblk, L)](
            x, *x.stride(), shift, out, B, C, H, W, di0, Lj, nblk,
            IS_U8=is_u8, REDUCE=reduce, BB=blk["BB"], BP=blk["BP"], CP=triton_support.pow2_at_least(C, 1), BLOCK_IMAGES=max(blk["BB"], _U8_BLOCK_IMAGES // blk["BB"] * blk["BB"]),
            **launch,
        )
    if reduce:
        return out.reshape(n_di, 2 * Lj + 1, C, C, nblk).sum(-1)
    return out.reshape(n_di, 2 * Lj + 1, C, C, H, W)


def _mma_blocks(device: torch.device, shape, Lj: int, blocks: Optional[dict] = None) -> dict:
    """BM, BK (and num_warps, num_stages on a GPU) of the tensor-core kernel for a batch of
    ``shape = (B, C, H, W)``; ``blocks`` overrides them (tests)."""
    base = PATCH_MMA_CPU_CONFIG
    if device.type == "cuda":
        B, C, _, W = shape
        big, small = PATCH_MMA_GPU_CONFIG, PATCH_MMA_GPU_SMALL
        e_big = mma_efficiency(B, C, W, Lj, big["BM"], big["BK"])
        e_small = mma_efficiency(B, C, W, Lj, small["BM"], small["BK"])
        base = small if e_small > 2 * e_big else big
    blk = {key: (blocks or {}).get(key, base[key]) for key in base}
    for key, allowed in PATCH_MMA_LIMITS.items():
        if blk[key] not in allowed:
            raise ValueError(f"blocks[{key!r}] must be one of {allowed} (int8 tl.dot tiles), got {blk[key]}")
    return blk


def mma_tiling(C: int, W: int, Lj: int, BM: int) -> Tuple[int, int, int]:
    """``(BW, nt, n_half)``: image columns per tile (``C * BW <= BM`` rows of (channel,
    column)), column tiles, and the largest tile offset ``|tj - ti|`` that meets the band
    ``|dj| <= Lj``. BW = 0 when C channels do not fit a tile of BM rows."""
    BW = BM // C
    if BW == 0:
        return 0, 0, 0
    return BW, -(-W // BW), -(-Lj // BW)


def mma_efficiency(B: int, C: int, W: int, Lj: int, BM: int, BK: int) -> float:
    """Useful fraction of the tensor-core kernel's int8 products for one row pair: the band's
    ``sum_{|dj| <= Lj} C^2 (W - |dj|)`` products per image over the ``BM^2`` of each column-tile
    pair inside the image, times the images over the batch padded to BK."""
    BW, nt, n_half = mma_tiling(C, W, Lj, BM)
    if BW == 0 or B == 0:
        return 0.0
    lj = min(Lj, W - 1)
    useful = C * C * ((2 * lj + 1) * W - lj * (lj + 1))
    pairs = sum(nt - abs(o) for o in range(-n_half, n_half + 1) if abs(o) < nt)
    return useful / (pairs * BM * BM) * B / (-(-B // BK) * BK)


def use_mma(shape, device: torch.device, is_u8: bool, Lj: int, blocks: Optional[dict] = None) -> bool:
    """Whether the lag products of a ``shape = (B, C, H, W)`` batch with column lags up to
    ``Lj`` go to the tensor-core kernel: uint8 only; ``blocks["mma"]`` (tests) or PATCH_MMA:
    True, False, or "auto" (``mma_efficiency >= _MMA_MIN_EFFICIENCY`` at the launch shape)."""
    if not is_u8:
        return False  # float products on tensor cores would round
    B, C, H, W = shape
    choice = (blocks or {}).get("mma", PATCH_MMA)
    blk = _mma_blocks(device, shape, Lj, blocks)
    fits = blk["BM"] // C > 0
    if choice is True:
        if not fits:
            raise ValueError(f"blocks: {C} channels do not fit a tensor-core tile of BM = {blk['BM']} rows")
        return True
    if choice is False or not fits:
        return False
    return mma_efficiency(B, C, W, Lj, blk["BM"], blk["BK"]) >= _MMA_MIN_EFFICIENCY


def _launch_mma(x, U, di0: int, n_di: int, Lj: int, blocks: Optional[dict], out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """uint8 lag products on int8 tensor cores for row lags [di0, di0 + n_di) and every dj in
    [-Lj, Lj]: int64 ``[n_di, 2Lj+1, C, C, H, W]``, bit-identical to the CUDA-core kernel.
    ``U``: int64 ``[C, H, W]`` per-pixel sums of x over the batch. ``out`` (tests): a flat
    buffer to write into (every element is written). Batches above _MMA_MAX_IMAGES images
    are split (int32 bound) and the chunks' products added in int64."""
    B, C, H, W = x.shape
    blk = _mma_blocks(x.device, x.shape, Lj, blocks)
    BW, nt, n_half = mma_tiling(C, W, Lj, blk["BM"])
    L = n_di * (2 * Lj + 1)
    if out is None:
        out = torch.empty(L * C * C * H * W, dtype=torch.int64, device=x.device)
    launch = {"num_warps": blk["num_warps"], "num_stages": blk["num_stages"]} if x.device.type == "cuda" else {}
    step = _MMA_MAX_IMAGES
    for b0 in range(0, max(B, 1), step):  # an empty batch still writes its zeros
        xb = x[b0 : b0 + step]
        Ub = U if B <= step else xb.sum(0, dtype=torch.int64)
        dst = out if b0 == 0 else torch.empty_like(out)
        with triton_support.launch_context(x):
            _kernels().lagprod_mma_kernel[(H, n_di, nt * (2 * n_half + 1))](
                xb.view(torch.int8), *xb.stride(), Ub, dst, xb.shape[0], C, H, W, di0, Lj, n_half, -16384 * xb.shape[0],
                BW=BW, BM=blk["BM"], BK=blk["BK"], **launch,
            )
        if b0:
            out += dst  # int64: exact
    return out.reshape(n_di, 2 * Lj + 1, C, C, H, W)


def _per_pixel_sums(x: torch.Tensor, shift: torch.Tensor, is_u8: bool) -> torch.Tensor:
    if is_u8:
        return x.sum(0, dtype=torch.int64)
    return (x.to(torch.float64) - shift.reshape(-1, 1, 1)).sum(0)


def _window_starts(P: torch.Tensor, k: int, dim: int) -> torch.Tensor:
    """Sums of ``P`` along ``dim`` (length n) over the windows ``[j, j + n - k + 1)``, j < k:
    the whole line minus its first j and last ``k - 1 - j`` entries (one pass over P, then
    only the 2(k - 1) border entries)."""
    n = P.shape[dim]
    head = P.narrow(dim, 0, k - 1).cumsum(dim)  # [j] = sum of entries <= j
    tail = P.narrow(dim, n - k + 1, k - 1).flip(dim).cumsum(dim).flip(dim)  # [t] = sum of entries >= n - k + 1 + t
    zero = torch.zeros_like(P.narrow(dim, 0, 1).sum(dim, keepdim=True))
    left = torch.cat([zero, head], dim)  # [j] = sum of the j first entries
    right = torch.cat([tail, zero], dim)  # [j] = sum of the k - 1 - j last entries
    return P.sum(dim, keepdim=True) - left - right


def _corner_sums(P: torch.Tensor, k: int, oh: int, ow: int) -> torch.Tensor:
    """Sums of ``P [..., H, W]`` over the ``oh x ow`` rectangles (``oh = H - k + 1``,
    ``ow = W - k + 1``) with top-left corner (i, j), i, j < k: ``[..., k, k]`` (int64 for
    integer P: exact). Column windows first (one read of P: on a GPU these products are the
    largest array of the call, and an integral image would read and write it several times),
    then row windows of the small ``[..., H, k]`` result."""
    return _window_starts(_window_starts(P, k, P.dim() - 1), k, P.dim() - 2)


def patch_sums(x: torch.Tensor, k: int, shift: Optional[torch.Tensor] = None, *, blocks: Optional[dict] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(s1 [d], s2 [d, d])`` over every k x k patch of ``x [B, C, H, W]`` (any strides),
    d = C*k*k, s2 full and symmetric: int64 exact for uint8 ``x``, float64 sums of
    ``x - shift`` otherwise (the backend contract). ``blocks`` (tests): BB, BP, num_warps of
    the CUDA-core kernel; mma (True / False / "auto", see use_mma), BM, BK of the
    tensor-core kernel (uint8)."""
    x, sh, is_u8 = _prepare(x, shift)
    B, C, H, W = x.shape
    oh, ow = H - k + 1, W - k + 1
    dt = torch.int64 if is_u8 else torch.float64
    T = torch.empty(k, 2 * k - 1, C, C, k, k, dtype=dt, device=x.device)
    per_di = (2 * k - 1) * C * C * H * W * 8
    group = max(1, min(k, _P_BUDGET // per_di))
    S1 = _per_pixel_sums(x, sh, is_u8)
    mma = use_mma(x.shape, x.device, is_u8, k - 1, blocks)
    for di0 in range(0, k, group):
        n_di = min(group, k - di0)
        P = _launch_mma(x, S1, di0, n_di, k - 1, blocks) if mma else _launch(x, sh, is_u8, di0, n_di, k - 1, False, blocks)
        T[di0 : di0 + n_di] = _corner_sums(P, k, oh, ow)
    return window_sums(S1, k), patch_s2(T, C, k)


def lag_sums(x: torch.Tensor, Li: int, Lj: int, shift: Optional[torch.Tensor] = None, *, blocks: Optional[dict] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Whole-image lag sums ``A [Li+1, 2Lj+1, C, C]`` (di = 0, dj < 0 left 0) and per-pixel
    sums ``S1 [C, H, W]``: int64 exact for uint8, float64 of ``x - shift`` otherwise."""
    x, sh, is_u8 = _prepare(x, shift)
    S1 = _per_pixel_sums(x, sh, is_u8)
    B, C, H, W = x.shape
    per_di = (2 * Lj + 1) * C * C * H * W * 8
    if not (per_di <= _P_BUDGET and use_mma(x.shape, x.device, is_u8, Lj, blocks)):
        return _launch(x, sh, is_u8, 0, Li + 1, Lj, True, blocks), S1
    # tensor cores: the per-pixel products of a group of row lags, summed over the image
    A = torch.empty(Li + 1, 2 * Lj + 1, C, C, dtype=torch.int64, device=x.device)
    group = max(1, min(Li + 1, _P_BUDGET // per_di))
    for di0 in range(0, Li + 1, group):
        n_di = min(group, Li + 1 - di0)
        A[di0 : di0 + n_di] = _launch_mma(x, S1, di0, n_di, Lj, blocks).sum((-2, -1))
    return A, S1


BACKEND = SimpleNamespace(name="triton", patch_sums=patch_sums, lag_sums=lag_sums)

registry.register(
    "patch_moments", "triton", BACKEND,
    devices=triton_support.devices(), priority=15, is_available=triton_support.available,
)
