"""Triton backend of the ``moments`` op (see the backend contract in ``reference.py``).

uint8 batches: the same exact scheme as the CUDA kernel. Bytes are shifted to int8
(``s = u - 128``), ``tl.dot`` sums ``s_i s_j`` in int32 over at most ``k_block`` images
(|s_i s_j| <= 2^14, so 131071 images can never overflow int32), each such K block is
added into an int64 register accumulator, and

    sum_k u_i u_j = sum_k s_i s_j + 128 (U_i + U_j) - 128^2 B      (U = column sums)

restores the unsigned sums (derivation in csrc/cuda/moments_tile.cuh). One program owns
one lower-triangle tile (ti >= tj) and loops over all images, so it adds into ``s2``
with a plain load and store: no atomics, and the order of additions is fixed.

Float batches use torch float64 GEMM (``addmm_``), as the CUDA backend does.
"""
from __future__ import annotations

import functools
from types import SimpleNamespace
from typing import Dict, Optional, Tuple

import torch

from ... import registry
from .. import triton_support
from .cuda import check_sums, float_update_f64  # the accumulator checks and float path both GPU backends share

MAX_K_BLOCK = 131071  # 2^31 / 2^14 - 1: int32 bound of sum s_i s_j
DEFAULT_K_BLOCK = 65536

# GPU launch shape of syrk_kernel: output tile side, images per tl.dot, warps, pipeline
# stages. Contiguous rows: 4 warps (wgmma m64 on Hopper). Strided rows (stride1 != 1)
# load byte by byte and need 8 warps: with 4 the kernel spills 88 B (sm_80) / 164 B
# (sm_90) per thread (benchmarks/gpu_static_check.py, which checks every entry here).
_SYRK_GPU_DEFAULT = dict(block=64, bk=64, num_warps=4, num_stages=3)
_SYRK_GPU_STRIDED = dict(block=64, bk=64, num_warps=8, num_stages=3)
_SYRK_CPU_DEFAULT = dict(block=16, bk=32)  # the interpreter: few, large numpy steps
# What u8_syrk_update accepts on every device (the interpreter included), so that an
# argument that would fail to compile or launch on some GPU fails at once, everywhere:
# tl.arange needs powers of two, an int8 tl.dot needs tiles of >= 16 rows and K >= 32,
# and the staged operand tiles (num_stages * 2 * block * bk bytes) must stay within
# 64 KiB: Triton allocates up to (num_stages + 1) times one stage's tiles (more for
# strided rows), which would overflow the 99 KB of shared memory per block of sm_86 and
# sm_89 GPUs (RTX 30/40, L40S) beyond that. block = 128 compiles and runs but spills
# ~900 B per thread (the int64 128 x 128 accumulator): accepted, not recommended.
SYRK_LIMITS = dict(block=(16, 32, 64, 128), bk=(32, 64, 128, 256), num_warps=(1, 2, 4, 8, 16), max_stages=4, max_stage_bytes=65536)


def _check_syrk_launch(block: int, bk: int, num_warps: Optional[int], num_stages: Optional[int]) -> None:
    lim = SYRK_LIMITS
    if block not in lim["block"]:
        raise ValueError(f"block must be one of {lim['block']} (tile side: a power of two, >= 16 for tl.dot), got {block}")
    if bk not in lim["bk"]:
        raise ValueError(f"bk must be one of {lim['bk']} (images per int8 tl.dot: a power of two, >= 32), got {bk}")
    if num_warps is not None and num_warps not in lim["num_warps"]:
        raise ValueError(f"num_warps must be one of {lim['num_warps']}, got {num_warps}")
    stages = 3 if num_stages is None else num_stages
    if not 1 <= stages <= lim["max_stages"]:
        raise ValueError(f"num_stages must be 1..{lim['max_stages']}, got {num_stages}")
    if stages * 2 * block * bk > lim["max_stage_bytes"]:
        raise ValueError(
            f"num_stages * 2 * block * bk = {stages * 2 * block * bk} bytes of staged tiles exceeds {lim['max_stage_bytes']}: "
            f"the kernel would need more shared memory than sm_86/sm_89 GPUs give a block (99 KB); "
            f"use a smaller bk, block or num_stages (got block={block}, bk={bk}, num_stages={stages})"
        )


@functools.lru_cache(maxsize=None)
def _kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def colsum_kernel(
        x_ptr,  # uint8 [B, n], element strides (stride0, stride1)
        cs_ptr,  # int64 [n] in/out (zeroed by the caller): += this batch's column sums
        s1_ptr,  # int64 [n] in/out: s1 += column sums
        B,
        n,
        stride0,
        stride1,
        rows_per_prog,  # images per program along grid axis 1 (< 2^23: int32 partials)
        BLOCK_N: tl.constexpr,
        BLOCK_R: tl.constexpr,
    ):
        offs = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        mask = offs < n
        col = offs.to(tl.int64) * stride1
        r_lo = tl.program_id(1) * rows_per_prog
        r_hi = tl.minimum(r_lo + rows_per_prog, B)
        acc = tl.zeros((BLOCK_N,), tl.int32)
        for r0 in range(r_lo, r_hi, BLOCK_R):
            rows = r0 + tl.arange(0, BLOCK_R)
            m = (rows < r_hi)[:, None] & mask[None, :]
            u = tl.load(x_ptr + rows.to(tl.int64)[:, None] * stride0 + col[None, :], mask=m, other=0)
            acc += tl.sum(u.to(tl.int32), axis=0)
        # row chunks of one column run in parallel; integer adds commute, so atomics
        # keep the result exact and order-independent
        tl.atomic_add(cs_ptr + offs, acc.to(tl.int64), mask=mask)
        tl.atomic_add(s1_ptr + offs, acc.to(tl.int64), mask=mask)

    @triton.jit
    def syrk_kernel(
        x_ptr,  # uint8 [B, n], element strides (stride0, stride1)
        cs_ptr,  # int64 [n]: this batch's column sums (colsum_kernel)
        s2_ptr,  # int64 [n, n] row-major in/out: lower triangle += x^T x
        tiles_ptr,  # int32 [tiles, 2]: (ti, tj) of program i, ti >= tj
        B,
        n,
        stride0,
        stride1,
        k_block,  # images per int32 partial sum, <= MAX_K_BLOCK
        corr,  # -128^2 * B, exact (passed as a Python int)
        BLOCK: tl.constexpr,
        BK: tl.constexpr,
    ):
        pid = tl.program_id(0)
        ti = tl.load(tiles_ptr + 2 * pid)
        tj = tl.load(tiles_ptr + 2 * pid + 1)
        offs_i = ti * BLOCK + tl.arange(0, BLOCK)
        offs_j = tj * BLOCK + tl.arange(0, BLOCK)
        mi = offs_i < n
        mj = offs_j < n
        ci = offs_i.to(tl.int64) * stride1
        cj = offs_j.to(tl.int64) * stride1
        kk = tl.arange(0, BK)
        acc = tl.zeros((BLOCK, BLOCK), tl.int64)
        for kb in range(0, B, k_block):
            part = tl.zeros((BLOCK, BLOCK), tl.int32)
            k_hi = tl.minimum(kb + k_block, B)
            for k0 in range(kb, k_hi, BK):
                ks = k0 + kk
                mk = ks < k_hi
                r = ks.to(tl.int64) * stride0
                # padding is u = 128, i.e. s = 0: it adds nothing to the products
                a = tl.load(x_ptr + ci[:, None] + r[None, :], mask=mi[:, None] & mk[None, :], other=128)
                b = tl.load(x_ptr + r[:, None] + cj[None, :], mask=mk[:, None] & mj[None, :], other=128)
                a = (a.to(tl.int16) - 128).to(tl.int8)
                b = (b.to(tl.int16) - 128).to(tl.int8)
                part = tl.dot(a, b, part, out_dtype=tl.int32)
            acc += part.to(tl.int64)  # flush before the next K block could overflow int32
        cs_i = tl.load(cs_ptr + offs_i, mask=mi, other=0)
        cs_j = tl.load(cs_ptr + offs_j, mask=mj, other=0)
        acc += 128 * (cs_i[:, None] + cs_j[None, :]) + corr
        out = s2_ptr + offs_i.to(tl.int64)[:, None] * n + offs_j[None, :]
        m = mi[:, None] & mj[None, :] & (offs_j[None, :] <= offs_i[:, None])
        tl.store(out, tl.load(out, mask=m, other=0) + acc, mask=m)

    return colsum_kernel, syrk_kernel


_TILE_CACHE: Dict[Tuple[int, str], torch.Tensor] = {}


def _tiles(nt: int, device: torch.device) -> torch.Tensor:
    """(ti, tj) for every lower-triangle tile, row-major, as int32 [T, 2] on ``device``."""
    key = (nt, str(device))
    t = _TILE_CACHE.get(key)
    if t is None:
        ij = torch.tril_indices(nt, nt)  # row-major over ti >= tj
        t = ij.T.contiguous().to(device=device, dtype=torch.int32)
        if len(_TILE_CACHE) > 64:
            _TILE_CACHE.clear()
        _TILE_CACHE[key] = t
    return t


def u8_syrk_update(
    rows: torch.Tensor,
    s1: torch.Tensor,
    s2: torch.Tensor,
    *,
    k_block: int = 0,
    block: Optional[int] = None,
    bk: Optional[int] = None,
    num_warps: Optional[int] = None,
    num_stages: Optional[int] = None,
) -> None:
    """``s1 += rows.sum(0)``, lower triangle of ``s2 += rows^T rows``, exactly, in place.

    ``rows``: uint8 ``[B, n]``, any strides; ``s1``: int64 ``[n]``; ``s2``: int64
    ``[n, n]``, both contiguous on ``rows``' device. ``k_block``: images per int32
    partial sum (0 = 65536; 1..131071). ``block`` (output tile side: 16, 32, 64 or
    128), ``bk`` (images per ``tl.dot``: 32, 64, 128 or 256), ``num_warps``,
    ``num_stages`` (1..4): launch tuning, with ``num_stages * 2 * block * bk <= 65536``;
    sizes that could not compile or launch on a GPU raise ValueError on every device
    (``SYRK_LIMITS``). The defaults suit Hopper (64, 64, 4 warps, 3 stages; 8 warps for
    strided rows) and the interpreter (16, 32).
    """
    on_gpu = rows.device.type == "cuda"
    default = (_SYRK_GPU_DEFAULT if rows.stride(-1) == 1 else _SYRK_GPU_STRIDED) if on_gpu else _SYRK_CPU_DEFAULT
    block = int(block or default["block"])
    bk = int(bk or default["bk"])
    _check_syrk_launch(block, bk, num_warps, num_stages)  # first: the same answer on every device
    triton_support.check_device(rows, "moments", "rows")
    if rows.dtype != torch.uint8:
        raise TypeError(f"rows must be uint8, got {rows.dtype}")
    check_sums(rows, s1, s2, torch.int64)
    k_block = int(k_block) or DEFAULT_K_BLOCK
    if not 1 <= k_block <= MAX_K_BLOCK:
        raise ValueError(f"k_block must be 0 (default) or 1..{MAX_K_BLOCK} (int32 accumulation bound), got {k_block}")
    B, n = rows.shape
    if B == 0 or n == 0:
        return
    colsum_kernel, syrk_kernel = _kernels()
    launch = {"num_warps": num_warps or default["num_warps"], "num_stages": num_stages or default["num_stages"]} if on_gpu else {}
    cs = torch.zeros(n, dtype=torch.int64, device=rows.device)
    nt = -(-n // block)
    tiles = _tiles(nt, rows.device)
    s0, st1 = rows.stride()
    with triton_support.launch_context(rows):
        # GPU: 1024-image chunks give thousands of programs for large batches; the
        # interpreter prefers few, large numpy steps
        rows_per_prog = max(1024 if on_gpu else 1 << 16, -(-B // 65535))
        block_r = 32 if on_gpu else 1024
        grid = (-(-n // 128), -(-B // rows_per_prog))
        colsum_kernel[grid](rows, cs, s1, B, n, s0, st1, rows_per_prog, BLOCK_N=128, BLOCK_R=block_r)
        syrk_kernel[(tiles.shape[0],)](
            rows, cs, s2, tiles, B, n, s0, st1, k_block, -16384 * B, BLOCK=block, BK=bk, **launch
        )


def f64_syrk_update(rows: torch.Tensor, ref: torch.Tensor, s1: torch.Tensor, s2: torch.Tensor) -> None:
    """Float batches in float64 (torch GEMM, never TF32): ``z = rows - ref``,
    ``s1 += z.sum(0)``, ``s2 += z^T z``."""
    triton_support.check_device(rows, "moments", "rows")
    float_update_f64(rows, ref, s1, s2)


BACKEND = SimpleNamespace(update_u8=u8_syrk_update, update_float=f64_syrk_update)

registry.register("moments", "triton", BACKEND, devices=triton_support.devices(), priority=15, is_available=triton_support.available)
