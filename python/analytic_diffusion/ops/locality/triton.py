"""Triton backend of ``locality_denoise`` and ``optimal_denoise`` (docs/algorithms.md §5, §6):
flash-attention style, exact online softmax.

Locality kernel (``loc_kernel``), one program per (query block of ``BB``, output
tile of ``BM`` pixels, split of the training set). It streams over tiles of ``BK``
training images and holds the online-softmax state (running max, sum, weighted sum)
of its ``[BB, BM]`` outputs in registers. Per training tile the masked distances are
a tensor-core GEMM over the window rows j::

    D[(b, k), m] = sum_j E[(b, k), j] M[j, m],   E = (x_bj - a y_kj)^2 - c_bj

with E as fp16 operands (``[BB*BK, BJ]``), the 0/1 mask tile (exact in fp16) and
fp32 accumulation; only the j-blocks where the mask tile of the output tile has a
nonzero entry are visited (per-mask compacted block lists, built once per mask and
cached). Direct differences, never the expanded ``||x||^2 - 2a<x,y> + a^2||y||^2``.

Precision. ``c_bj`` is a per-(query, pixel) shift that does not depend on the
training image k, so it changes every logit of an output (b, m) by the same constant
``sum_j M[j,m] c_bj`` and leaves the softmax unchanged; it is chosen as the expected
value of ``(x_bj - a y_j)^2`` under a per-pixel Gaussian model of the data (diagonal
Wiener posterior): at high noise, where windows are large, that cuts the fp16 error of
the result 10-30x (measured). E is scaled by an exact power of two into fp16's range
(no subnormals for small differences). Where one fp16 product is not accurate enough
(the sharp softmax at low noise, logit scale ``1/(2 s2 tau) >= 2``) or the second one is
cheap (at most 35% of the mask blocks occupied), E is split into ``hi + lo`` (two fp16
terms, two dots: ~22 bits). Measured in the interpreter on natural crops, queries =
noisy held-out images, relative error (norm) vs float64 over the 10 DDIM steps:
32x32 (N = 100): one product 1.6e-5 .. 1.4e-4 for t = 900..100 but 9.4e-4 at t = 0,
two products <= 1.1e-6, the default policy <= 1.4e-4; 8x8 (N = 300): one product
<= 2.5e-4, two <= 4e-7, the default <= 6.6e-5 (the reference backend in float32:
<= 4e-5). tests/test_locality_triton.py checks 1e-3 at every step.
``return_state=True`` adds the shift's constant back (float64 ``c @ M`` on the host),
so the states merge with the reference backend's.

Single window (all mask columns identical, e.g. high noise on natural images, and
``optimal_denoise``): ``dist_kernel`` computes one fp32 logit per (b, k) from direct
differences (CUDA cores, no fp16), ``wsum_kernel`` streams them with an online
softmax and accumulates ``p @ y`` (fp32 FMA dot, never TF32) per output tile.

Splits of the training set (grid axis 2) give small query batches enough programs;
their partial states are merged on the host exactly (docs/algorithms.md §5.3). WSSM restarts the
softmax at every chunk of ``chunk_size`` images (tiles start at chunk starts, the
last tile of a chunk is masked) and sums the chunk means; splits are chunk-aligned.

Fallbacks (documented behaviour): float64 queries and real-valued (float) masks run
the reference implementation (the fp16 tensor-core scheme cannot deliver float64
accuracy, and real weights would need a split mask too).
"""
from __future__ import annotations

import functools
import math
import os
from types import SimpleNamespace
from typing import Dict, Optional, Tuple

import torch

from ... import registry
from .. import triton_support
from ..softmax_state import SoftmaxState
from .plan_cache import PlanCache
from .reference import locality_denoise_reference, optimal_denoise_reference
from ...schedule import noise_level

_PLANS = PlanCache(max_entries=16, max_bytes=1 << 30)  # (mask content, device, BJ, BMs) -> _MaskPlan
_SPLIT_DENSITY = 0.35  # hi+lo split where at most this fraction of mask blocks is occupied ...
_SPLIT_SCALE = 2.0  # ... or where the logit scale 1/(2 s2 tau) is at least this
_SHIFT_SAMPLE = 2048  # training images used to estimate the per-pixel mean/variance of the shift
_FP16_TARGET = 16384.0  # |E| * 2^S stays below this (fp16 max 65504)
_LOGITS_BUDGET = 1 << 22  # single-window path: logits held at a time, at least B*n


@functools.lru_cache(maxsize=None)
def _denoise_kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def loc_kernel(
        x_ptr,  # f32 [B, n] contiguous: queries scaled by 2^(S/2)
        c_ptr,  # f32 [B, n] contiguous: shift scaled by 2^S
        y_ptr,  # train [N, n] (uint8 or float), element strides syk, syj
        syk,
        syj,
        m_ptr,  # f16 [nJ*BJ, nM*BM] row-major 0/1 mask, zero padded, row stride m_ld
        m_ld,
        blk_a,  # int32 [nM, ld_a]: nonzero j-blocks of each m-tile of BM_A pixels, ascending
        cnt_a,  # int32 [nM]: how many
        ld_a,
        blk_b,  # the same for tiles of the other width (used when BM != BM_A)
        cnt_b,
        ld_b,
        out_ptr,  # f32 [B, n] contiguous (not STATE)
        mx_ptr,  # f32 [S, B, n] (STATE, exact)
        l_ptr,  # f32 [S, B, n] (STATE, exact)
        acc_ptr,  # f32 [S, B, n] (STATE: exact acc, or WSSM sum of chunk means)
        B,
        n,
        N,
        split_len,  # images per split (grid axis 2)
        chunk,  # images per softmax (WSSM chunk; = split_len in exact mode)
        a_mul,  # a*y*2^(S/2) = y_raw * a_mul + a_add
        a_add,
        lscale,  # logit = D * lscale = -D / (2 s2 tau 2^S)
        inv_den,  # WSSM: 1 / (chunks + 1e-8)
        WSSM: tl.constexpr,
        STATE: tl.constexpr,
        SPLIT: tl.constexpr,
        IS_U8: tl.constexpr,
        BB: tl.constexpr,
        BK: tl.constexpr,
        BJ: tl.constexpr,
        BM: tl.constexpr,
        BM_A: tl.constexpr,
    ):
        pid_b = tl.program_id(0)
        pid_m = tl.program_id(1)
        pid_s = tl.program_id(2)
        if BM == BM_A:
            blk_row = blk_a + pid_m * ld_a
            cnt = tl.load(cnt_a + pid_m)
        else:
            blk_row = blk_b + pid_m * ld_b
            cnt = tl.load(cnt_b + pid_m)
        offs_b = pid_b * BB + tl.arange(0, BB)
        b_ok = offs_b < B
        offs_m = pid_m * BM + tl.arange(0, BM)
        m_ok = offs_m < n
        xrow = offs_b.to(tl.int64) * n
        ycol_m = offs_m.to(tl.int64) * syj
        rk = tl.arange(0, BK)
        rj = tl.arange(0, BJ)
        k_lo = pid_s * split_len
        k_hi = tl.minimum(k_lo + split_len, N)
        mx = tl.full([BB, BM], float("-inf"), tl.float32)
        l = tl.zeros([BB, BM], tl.float32)
        acc = tl.zeros([BB, BM], tl.float32)
        num = tl.zeros([BB, BM], tl.float32)
        for c0 in range(k_lo, k_hi, chunk):
            c1 = tl.minimum(c0 + chunk, k_hi)
            for k0 in range(c0, c1, BK):
                offs_k = k0 + rk
                k_ok = offs_k < c1
                yrow = offs_k.to(tl.int64) * syk
                D = tl.zeros([BB * BK, BM], tl.float32)
                for jj in range(0, cnt):
                    jb = tl.load(blk_row + jj)
                    offs_j = jb * BJ + rj
                    j_ok = offs_j < n
                    xm = b_ok[:, None] & j_ok[None, :]
                    xv = tl.load(x_ptr + xrow[:, None] + offs_j[None, :], mask=xm, other=0.0)
                    cv = tl.load(c_ptr + xrow[:, None] + offs_j[None, :], mask=xm, other=0.0)
                    yv = tl.load(
                        y_ptr + yrow[:, None] + offs_j.to(tl.int64)[None, :] * syj,
                        mask=k_ok[:, None] & j_ok[None, :],
                        other=0,
                    )
                    ay = yv.to(tl.float32) * a_mul + a_add
                    diff = xv[:, None, :] - ay[None, :, :]
                    e = tl.reshape(diff * diff - cv[:, None, :], [BB * BK, BJ])
                    mt = tl.load(m_ptr + offs_j.to(tl.int64)[:, None] * m_ld + offs_m[None, :])
                    hi = e.to(tl.float16)
                    D = tl.dot(hi, mt, D)
                    if SPLIT:
                        lo = (e - hi.to(tl.float32)).to(tl.float16)
                        D = tl.dot(lo, mt, D)
                s = tl.reshape(D, [BB, BK, BM]) * lscale
                s = tl.where(k_ok[None, :, None], s, float("-inf"))
                mx_new = tl.maximum(mx, tl.max(s, axis=1))
                corr = tl.exp(mx - mx_new)
                p = tl.exp(s - mx_new[:, None, :])
                yo = tl.load(y_ptr + yrow[:, None] + ycol_m[None, :], mask=k_ok[:, None] & m_ok[None, :], other=0)
                if IS_U8:
                    yo = yo.to(tl.float32) * (1.0 / 127.5) - 1.0
                else:
                    yo = yo.to(tl.float32)
                l = l * corr + tl.sum(p, axis=1)
                acc = acc * corr + tl.sum(p * yo[None, :, :], axis=1)
                mx = mx_new
            if WSSM:
                num += acc / l
                mx = tl.full([BB, BM], float("-inf"), tl.float32)
                l = tl.zeros([BB, BM], tl.float32)
                acc = tl.zeros([BB, BM], tl.float32)
        om = b_ok[:, None] & m_ok[None, :]
        if STATE:
            o = pid_s.to(tl.int64) * B * n + xrow[:, None] + offs_m[None, :]
            if WSSM:
                tl.store(acc_ptr + o, num, mask=om)
            else:
                tl.store(mx_ptr + o, mx, mask=om)
                tl.store(l_ptr + o, l, mask=om)
                tl.store(acc_ptr + o, acc, mask=om)
        else:
            o = xrow[:, None] + offs_m[None, :]
            if WSSM:
                tl.store(out_ptr + o, num * inv_den, mask=om)
            else:
                tl.store(out_ptr + o, acc / l, mask=om)

    @triton.jit
    def dist_kernel(
        x_ptr,  # f32 [B, n] contiguous (unscaled)
        w_ptr,  # f32 [n]: the window's weights (HAS_W)
        y_ptr,
        syk,
        syj,
        d_ptr,  # f32 [B, d_ld]: logits of images k_base .. k_base + Nc
        d_ld,
        B,
        n,
        k_base,
        Nc,
        a_mul,  # a*y = y_raw * a_mul + a_add
        a_add,
        lscale,  # -1 / (2 s2 tau)
        HAS_W: tl.constexpr,
        BB: tl.constexpr,
        BK: tl.constexpr,
        BJ: tl.constexpr,
    ):
        pid_k = tl.program_id(0)  # axis 0: up to 2^31 - 1 programs (N / BK can exceed 65535)
        pid_b = tl.program_id(1)
        offs_b = pid_b * BB + tl.arange(0, BB)
        b_ok = offs_b < B
        rel_k = pid_k * BK + tl.arange(0, BK)
        k_ok = rel_k < Nc
        xrow = offs_b.to(tl.int64) * n
        yrow = (k_base + rel_k).to(tl.int64) * syk
        rj = tl.arange(0, BJ)
        d = tl.zeros([BB, BK], tl.float32)
        for j0 in range(0, n, BJ):
            offs_j = j0 + rj
            j_ok = offs_j < n
            xv = tl.load(x_ptr + xrow[:, None] + offs_j[None, :], mask=b_ok[:, None] & j_ok[None, :], other=0.0)
            yv = tl.load(y_ptr + yrow[:, None] + offs_j.to(tl.int64)[None, :] * syj, mask=k_ok[:, None] & j_ok[None, :], other=0)
            ay = yv.to(tl.float32) * a_mul + a_add
            diff = xv[:, None, :] - ay[None, :, :]
            e = diff * diff
            if HAS_W:
                wv = tl.load(w_ptr + offs_j, mask=j_ok, other=0.0)
                e = e * wv[None, None, :]
            else:
                e = tl.where(j_ok[None, None, :], e, 0.0)
            d += tl.sum(e, axis=2)
        tl.store(d_ptr + offs_b.to(tl.int64)[:, None] * d_ld + rel_k[None, :], d * lscale, mask=b_ok[:, None] & k_ok[None, :])

    @triton.jit
    def wsum_kernel(
        d_ptr,  # f32 [B, d_ld] logits (dist_kernel)
        d_ld,
        y_ptr,
        syk,
        syj,
        out_ptr,  # f32 [B, n] contiguous (not STATE)
        mx_ptr,  # f32 [S, B] (STATE, exact)
        l_ptr,  # f32 [S, B] (STATE, exact)
        acc_ptr,  # f32 [S, B, n] (STATE)
        B,
        n,
        k_base,
        Nc,
        split_len,
        chunk,
        inv_den,
        WSSM: tl.constexpr,
        STATE: tl.constexpr,
        IS_U8: tl.constexpr,
        BB: tl.constexpr,
        BK: tl.constexpr,
        BN: tl.constexpr,
    ):
        pid_b = tl.program_id(0)
        pid_n = tl.program_id(1)
        pid_s = tl.program_id(2)
        offs_b = pid_b * BB + tl.arange(0, BB)
        b_ok = offs_b < B
        offs_n = pid_n * BN + tl.arange(0, BN)
        n_ok = offs_n < n
        ycol = offs_n.to(tl.int64) * syj
        drow = offs_b.to(tl.int64) * d_ld
        rk = tl.arange(0, BK)
        k_lo = pid_s * split_len
        k_hi = tl.minimum(k_lo + split_len, Nc)
        mx = tl.full([BB], float("-inf"), tl.float32)
        l = tl.zeros([BB], tl.float32)
        acc = tl.zeros([BB, BN], tl.float32)
        num = tl.zeros([BB, BN], tl.float32)
        for c0 in range(k_lo, k_hi, chunk):
            c1 = tl.minimum(c0 + chunk, k_hi)
            for k0 in range(c0, c1, BK):
                rel_k = k0 + rk
                k_ok = rel_k < c1
                s = tl.load(d_ptr + drow[:, None] + rel_k[None, :], mask=b_ok[:, None] & k_ok[None, :], other=float("-inf"))
                s = tl.where(b_ok[:, None], s, 0.0)  # rows past B stay finite
                mx_new = tl.maximum(mx, tl.max(s, axis=1))
                corr = tl.exp(mx - mx_new)
                p = tl.exp(s - mx_new[:, None])
                yv = tl.load(
                    y_ptr + (k_base + rel_k).to(tl.int64)[:, None] * syk + ycol[None, :],
                    mask=k_ok[:, None] & n_ok[None, :],
                    other=0,
                )
                if IS_U8:
                    yv = yv.to(tl.float32) * (1.0 / 127.5) - 1.0
                else:
                    yv = yv.to(tl.float32)
                l = l * corr + tl.sum(p, axis=1)
                acc = tl.dot(p, yv, acc * corr[:, None], input_precision="ieee")
                mx = mx_new
            if WSSM:
                num += acc / l[:, None]
                mx = tl.full([BB], float("-inf"), tl.float32)
                l = tl.zeros([BB], tl.float32)
                acc = tl.zeros([BB, BN], tl.float32)
        om = b_ok[:, None] & n_ok[None, :]
        if STATE:
            o = pid_s.to(tl.int64) * B * n + offs_b.to(tl.int64)[:, None] * n + offs_n[None, :]
            if WSSM:
                tl.store(acc_ptr + o, num, mask=om)
            else:
                tl.store(acc_ptr + o, acc, mask=om)
                if pid_n == 0:
                    tl.store(mx_ptr + pid_s * B + offs_b, mx, mask=b_ok)
                    tl.store(l_ptr + pid_s * B + offs_b, l, mask=b_ok)
        else:
            o = offs_b.to(tl.int64)[:, None] * n + offs_n[None, :]
            if WSSM:
                tl.store(out_ptr + o, num * inv_den, mask=om)
            else:
                tl.store(out_ptr + o, acc / l[:, None], mask=om)

    loc_tuned = None
    if not triton_support.interpreting():
        configs = [
            triton.Config({"BB": bb, "BK": bk, "BM": bm}, num_warps=w, num_stages=st)
            for bb, bk, bm, w, st in _LOC_GPU_CONFIGS + _LOC_GPU_SM8X_WSSM_SPLIT  # pruned per GPU and mode
        ]
        loc_tuned = triton.autotune(
            configs=configs,
            key=["B", "n", "SPLIT", "WSSM", "STATE", "IS_U8"],
            prune_configs_by={"early_config_prune": _loc_prune},
        )(loc_kernel)
    return SimpleNamespace(loc=loc_kernel, loc_tuned=loc_tuned, dist=dist_kernel, wsum=wsum_kernel)


# GPU launch shapes of the locality kernel, untuned (no GPU was available while writing
# them), autotuned per (B, n, precision, mode): (BB, BK, BM, num_warps, num_stages), the
# first is the default. BB*BK = 64 or 128 rows of the distance GEMM; BJ = 64 rows of the
# mask per step; per-mask block lists are built for both output-tile widths (64 and 128).
# benchmarks/gpu_static_check.py compiles each for sm_80 and sm_90 in every mode (exact,
# WSSM, state, hi+lo split; uint8 and float training sets): on sm_90 none spills
# registers; on sm_8x the ones in _LOC_GPU_SPILLS do and are not offered there.
# (16, 8, 64, 8, 3) was dropped: it spilled 56-176 B on sm_90 in WSSM mode and
# 84-936 B on sm_80 in every mode.
_LOC_GPU_CONFIGS = [
    (8, 16, 64, 8, 3),
    (4, 16, 128, 8, 3),
    (4, 32, 64, 8, 3),
    (8, 16, 64, 8, 4),
    (4, 16, 64, 4, 3),
]
# (config, spills on GPUs of compute capability major below this, in WSSM mode?, with the
# hi+lo split?); None = in either. Measured with ptxas for sm_80 (bytes spilled per thread):
_LOC_GPU_SPILLS = [
    ((4, 16, 128, 8, 3), 9, None, True),  # 180-788 B
    ((4, 32, 64, 8, 3), 9, True, True),  # 4-32 B
    ((8, 16, 64, 8, 3), 9, True, True),  # 16 B (136 B for strided training sets)
    ((8, 16, 64, 8, 4), 9, True, True),  # 16 B
    ((4, 16, 64, 4, 3), 9, True, True),  # 328 B for strided training sets
]
# Offered only on sm_8x in WSSM mode with the hi+lo split, where every config above spills:
# 32-row distance GEMM tiles on 8 warps (at most 160 registers; with 4 warps float32 spilled 8 B).
_LOC_GPU_SM8X_WSSM_SPLIT = [(2, 16, 64, 8, 3)]
_LOC_GPU_BJ = 64
_LOC_GPU_BMS = (64, 128)
# single-window path (dist_kernel, wsum_kernel): wsum with 4 or 8 warps spilled 4-16 B
# (WSSM, float16 or strided training sets); with 16 none does
_OPT_GPU = dict(BB=16, BK=32, BJ=32, BN=128, dist_warps=4, wsum_warps=16)


def _loc_gpu_configs(major: int, wssm: bool, split: bool) -> list:
    """The launch shapes offered to autotuning on a GPU of compute capability ``major``.x
    in this mode (first = the one used with ANALYTIC_DIFFUSION_TRITON_AUTOTUNE=0)."""
    out = [
        c for c in _LOC_GPU_CONFIGS
        if not any(c == cfg and major < below and w in (None, wssm) and sp in (None, split) for cfg, below, w, sp in _LOC_GPU_SPILLS)
    ]
    if major < 9 and wssm and split:
        out += _LOC_GPU_SM8X_WSSM_SPLIT
    if os.environ.get("ANALYTIC_DIFFUSION_TRITON_AUTOTUNE", "1") == "0":
        out = out[:1]
    return out


def _loc_prune(configs, named_args, **kwargs):
    """Triton autotuner hook: keep the configs ``_loc_gpu_configs`` offers on this GPU."""
    major = torch.cuda.get_device_capability(named_args["x_ptr"].device)[0]
    keep = _loc_gpu_configs(major, bool(kwargs.get("WSSM")), bool(kwargs.get("SPLIT")))
    out = [c for c in configs if (c.kwargs["BB"], c.kwargs["BK"], c.kwargs["BM"], c.num_warps, c.num_stages) in keep]
    return out or configs[:1]


def _check_blocks(blk: dict, pow2: Tuple[str, ...], dot_dims: Tuple[Tuple[str, ...], ...]) -> None:
    """Refuse block sizes that cannot compile, on every device (the interpreter included):
    ``pow2`` must be powers of two (tl.arange), each product in ``dot_dims`` (a tl.dot
    operand dimension) at least 16, num_warps a power of two up to 16."""
    for k in pow2:
        v = blk.get(k)
        if v is not None and (not isinstance(v, int) or v < 1 or v & (v - 1)):
            raise ValueError(f"blocks[{k!r}] must be a power of two, got {v!r}")
    for names in dot_dims:
        if all(k in blk for k in names) and math.prod(blk[k] for k in names) < 16:
            got = ", ".join(f"{k}={blk[k]}" for k in names)
            raise ValueError(f"{' * '.join(names)} must be at least 16 (a tl.dot operand dimension), got {got}")
    if blk.get("num_warps", 4) not in (1, 2, 4, 8, 16):
        raise ValueError(f"blocks['num_warps'] must be 1, 2, 4, 8 or 16, got {blk['num_warps']!r}")


class _MaskPlan:
    """What the kernels need of one bool mask, built once and cached by content: whether
    every window is the same (then ``w``, that window as float32 weights); else the mask
    as a zero-padded fp16 matrix and, for each output-tile width BM in ``bms``, the
    ascending list of j-blocks (BJ mask rows) where each tile has a nonzero entry."""

    def __init__(self, mask: torch.Tensor, bj: int, bms: Tuple[int, ...]):
        n = mask.shape[0]
        self.n, self.bj = n, bj
        self.single = bool((mask == mask[:, :1]).all())
        self.mask16 = None
        self.tables: Dict[int, tuple] = {}
        self.w = None
        if self.single:
            self.w = mask[:, 0].to(torch.float32).contiguous()
            self.nbytes = self.w.numel() * 4
            return
        pad = max((bj,) + tuple(bms))
        npad = -(-n // pad) * pad
        m16 = torch.zeros(npad, npad, dtype=torch.float16, device=mask.device)
        m16[:n, :n] = mask
        self.mask16 = m16
        self.nbytes = m16.numel() * 2
        nj = npad // bj
        for bm in bms:
            nm = -(-n // bm)
            occ = m16[:, : nm * bm].reshape(nj, bj, nm, bm).ne(0).any(3).any(1).cpu()  # [nj, nm]
            counts = occ.sum(0).to(torch.int32)
            blocks = torch.zeros(nm, max(1, int(counts.max())), dtype=torch.int32)
            for m in range(nm):
                idx = torch.nonzero(occ[:, m]).flatten()
                blocks[m, : idx.numel()] = idx.to(torch.int32)
            self.tables[bm] = (blocks.to(mask.device), counts.to(mask.device), float(occ.float().mean()))
            self.nbytes += blocks.numel() * 4 + counts.numel() * 4

    def density(self) -> float:
        """Fraction of (j-block, m-tile) pairs visited, at the finest tile width."""
        return self.tables[min(self.tables)][2] if self.tables else 1.0


def _plan(mask: torch.Tensor, bj: int, bms: Tuple[int, ...]) -> _MaskPlan:
    return _PLANS.get(mask, (str(mask.device), bj, tuple(bms)), lambda: _MaskPlan(mask, bj, tuple(bms)))


def _loc_blocks(device: torch.device, n: int, B: int, blocks: Optional[dict]) -> Tuple[dict, Tuple[int, ...], bool]:
    """(block sizes, tile widths to plan for, autotuned?). GPU: BJ = 64, BB/BK/BM autotuned
    unless given. Interpreter: few large steps (it pays per operation, not per element)."""
    blk = dict(blocks or {})
    if device.type == "cuda":
        blk.setdefault("BJ", _LOC_GPU_BJ)
        if "BM" in blk or "BB" in blk or "BK" in blk:
            first = _LOC_GPU_CONFIGS[0]
            for k, v in zip(("BB", "BK", "BM"), first):
                blk.setdefault(k, v)
            blk.setdefault("num_warps", first[3])
            blk.setdefault("num_stages", first[4])
            return blk, (blk["BM"],), False
        return blk, _LOC_GPU_BMS, True
    size = 16 if n <= 64 else 64
    blk.setdefault("BJ", size)
    blk.setdefault("BM", size)
    blk.setdefault("BB", triton_support.pow2_at_least(B, 1, 8))
    blk.setdefault("BK", max(16, 64 // blk["BB"]))
    return blk, (blk["BM"],), False


def split_plan(N: int, programs: int, device: torch.device, unit: int, splits: Optional[int]) -> Tuple[int, int]:
    """(number of splits, images per split): enough programs to fill the GPU, splits a
    multiple of ``unit`` images (the WSSM chunk, or the tile) and never empty."""
    if splits is None:
        if device.type == "cuda":
            sms = torch.cuda.get_device_properties(device).multi_processor_count
            splits = max(1, min(-(-2 * sms // max(1, programs)), N // 512))
        else:
            splits = 1
    splits = max(1, min(int(splits), -(-N // unit)))
    split_len = -(-(-(-N // splits)) // unit) * unit
    return -(-N // split_len), split_len


def merge_exact(mx: torch.Tensor, l: torch.Tensor, acc: torch.Tensor):
    """Exact merge of split states along dim 0 (docs/algorithms.md §5.3)."""
    if mx.shape[0] == 1:
        return mx[0], l[0], acc[0]
    top = mx.amax(0)
    w = torch.exp(mx - top)
    lw = (l * w).sum(0)
    if w.dim() < acc.dim():
        w = w.unsqueeze(-1)
    return top, lw, (acc * w).sum(0)


def distance_shift(x32: torch.Tensor, train: torch.Tensor, ab: float) -> torch.Tensor:
    """Per-(query, pixel) shift ``c = E[(x - a y)^2]`` under a per-pixel Gaussian model of
    the training data (the posterior of y given x, from the mean and variance of up to
    _SHIFT_SAMPLE evenly spaced training images). Independent of k, so it leaves the
    softmax unchanged; it makes the fp16 operands small where windows are large."""
    N = train.shape[0]
    ys = train[:: max(1, N // _SHIFT_SAMPLE)][:_SHIFT_SAMPLE]
    ys = (ys.to(torch.float32) - 127.5) / 127.5 if ys.dtype == torch.uint8 else ys.to(torch.float32)
    ybar = ys.mean(0)
    yvar = ys.var(0, unbiased=False)
    a, s2 = noise_level(ab)
    g = ab * yvar / (ab * yvar + s2)
    yhat = ybar + g * (x32 / a - ybar)
    return (x32 - a * yhat) ** 2 + ab * yvar * s2 / (ab * yvar + s2)


def _precision_split(plan: _MaskPlan, scale: float, precision: Optional[str]) -> bool:
    """Whether E goes to the tensor cores as hi + lo (two fp16 products) or as one."""
    precision = precision or os.environ.get("ANALYTIC_DIFFUSION_TRITON_PRECISION", "auto")
    if precision == "fp16":
        return False
    if precision == "fp16x2":
        return True
    if precision != "auto":
        raise ValueError(f"precision must be 'auto', 'fp16' or 'fp16x2', got {precision!r}")
    return plan.density() <= _SPLIT_DENSITY or scale >= _SPLIT_SCALE


def single_window(x, train, w, ab, tau, softmax, chunk_size, return_state, *, splits=None, blocks=None):
    """Softmax over one distance per (b, k) (all windows equal, or the optimal denoiser).
    Returns out [B, n] float32, or (mx [B, 1], l [B, 1], acc [B, n])."""
    K = _denoise_kernels()
    B, n = x.shape
    N = train.shape[0]
    dev = x.device
    on_gpu = dev.type == "cuda"
    if on_gpu:
        blk = dict(_OPT_GPU)
    else:
        size = 16 if n <= 64 else 64
        blk = dict(BB=16, BK=32, BJ=size, BN=size)
    blk.update(blocks or {})
    _check_blocks(blk, ("BB", "BK", "BJ", "BN"), (("BB",), ("BK",), ("BN",)))  # wsum: p [BB, BK] @ y [BK, BN]
    a, s2 = noise_level(ab)
    scale = 1.0 / (2.0 * s2 * tau)
    x32 = x.to(torch.float32).contiguous()
    is_u8 = train.dtype == torch.uint8
    a_mul, a_add = (a / 127.5, -a) if is_u8 else (a, 0.0)
    wssm = softmax == "wssm"
    unit = chunk_size if wssm else blk["BK"]
    # logits of at most ~max(B*n, _LOGITS_BUDGET) values at a time: memory O(B*n), not O(B*N)
    per_launch = max(unit, (max(B * n, _LOGITS_BUDGET) // B) // unit * unit)
    nb = -(-B // blk["BB"])
    nn = -(-n // blk["BN"])
    dws = torch.empty(B, min(per_launch, N), dtype=torch.float32, device=dev)
    launches = []
    for k_base in range(0, N, per_launch):
        Nc = min(per_launch, N - k_base)
        launches.append((k_base, Nc) + split_plan(Nc, nb * nn, dev, unit, splits))
    direct = len(launches) == 1 and launches[0][2] == 1 and not return_state
    inv_den = 1.0 / (-(-N // chunk_size) + 1e-8)
    out = triton_support.nan_output((B, n), dev)
    parts = []
    ys0, ys1 = train.stride()
    with triton_support.launch_context(x):
        for k_base, Nc, S, split_len in launches:
            K.dist[(-(-Nc // blk["BK"]), nb)](
                x32, w if w is not None else x32, train, ys0, ys1, dws, dws.stride(0), B, n, k_base, Nc,
                a_mul, a_add, -scale, HAS_W=w is not None, BB=blk["BB"], BK=blk["BK"], BJ=blk["BJ"],
                **({"num_warps": blk["dist_warps"]} if on_gpu else {}),
            )
            if direct:
                mxw = lw = accw = out
            else:
                accw = triton_support.nan_output((S, B, n), dev)
                mxw, lw = (accw, accw) if wssm else (triton_support.nan_output((S, B), dev), triton_support.nan_output((S, B), dev))
                parts.append((mxw, lw, accw))
            K.wsum[(nb, nn, S)](
                dws, dws.stride(0), train, ys0, ys1, out, mxw, lw, accw, B, n, k_base, Nc,
                split_len, chunk_size if wssm else split_len, inv_den,
                WSSM=wssm, STATE=not direct, IS_U8=is_u8, BB=blk["BB"], BK=blk["BK"], BN=blk["BN"],
                **({"num_warps": blk["wsum_warps"]} if on_gpu else {}),
            )
    if direct:
        return out
    if wssm:
        return torch.cat([p[2] for p in parts]).sum(0) * inv_den
    mx, l, acc = merge_exact(*(torch.cat([p[i] for p in parts]) for i in range(3)))
    if return_state:
        return mx.unsqueeze(1), l.unsqueeze(1), acc
    return acc / l.unsqueeze(1)


def locality_denoise_triton(
    x: torch.Tensor,
    train: torch.Tensor,
    mask: torch.Tensor,
    alpha_bar: float,
    temperature: float = 1.0,
    softmax: str = "exact",
    chunk_size: int = 256,
    return_state: bool = False,
    *,
    splits: Optional[int] = None,
    blocks: Optional[dict] = None,
    precision: Optional[str] = None,
):
    """Triton ``locality_denoise`` (backend contract of ops/_reference.py).

    ``x`` float32 ``[B, n]``, ``train`` uint8 or float ``[N, n]`` (any strides, read in
    place), ``mask`` bool ``[n, n]``. float64 queries and real-valued (float) masks run
    the reference implementation instead (fp16 tensor-core distances cannot give float64
    accuracy; real weights are not exact in fp16). Beyond the contract, for tests and
    tuning: ``splits`` (training-set splits, merged on the host; default: enough programs
    for the GPU, 1 in the interpreter), ``blocks`` (any of BB, BK, BJ, BM, num_warps,
    num_stages; given ones switch autotuning off), ``precision`` ('auto', 'fp16': one fp16
    product, 'fp16x2': hi + lo; default from the environment variable
    ANALYTIC_DIFFUSION_TRITON_PRECISION, else 'auto').
    """
    if x.dtype == torch.float64 or mask.dtype != torch.bool:
        return locality_denoise_reference(x, train, mask, alpha_bar, temperature, softmax, chunk_size, return_state)
    B, n = x.shape
    N = train.shape[0]
    dev = x.device
    blk, bms, tuned = _loc_blocks(dev, n, B, blocks)
    # first, so that sizes no GPU could compile fail the same way on every device
    _check_blocks(blk, ("BB", "BK", "BJ", "BM"), (("BB", "BK"), ("BJ",), ("BM",)))  # D [BB*BK, BM] += E [BB*BK, BJ] @ M [BJ, BM]
    triton_support.check_device(x, "denoiser", "x")
    plan = _plan(mask, blk["BJ"], bms)
    if plan.single:
        res = single_window(x, train, plan.w, alpha_bar, temperature, softmax, chunk_size, return_state, splits=splits)
        if return_state:
            mx, l, acc = res
            return SoftmaxState(mx.expand(B, n).contiguous(), l.expand(B, n).contiguous(), acc).double()
        return res.to(x.dtype)

    K = _denoise_kernels()
    a, s2 = noise_level(alpha_bar)
    scale = 1.0 / (2.0 * s2 * temperature)
    split = _precision_split(plan, scale, precision)
    x32 = x.to(torch.float32)
    c = distance_shift(x32, train, alpha_bar)
    # E * 2^S with an exact even power of two: |E| <= (max|x| + a max|y|)^2 + a^2 lands
    # below 2^14, inside fp16's range and clear of its subnormals for small differences
    ymax = 1.0 if train.dtype == torch.uint8 else max(1.0, float(train.abs().max()))
    bound = (float(x32.abs().max()) + a * ymax) ** 2 + alpha_bar * ymax**2
    S = max(-40, min(40, 2 * int(math.floor(math.log2(_FP16_TARGET / bound) / 2))))
    half = 2.0 ** (S // 2)
    xs = (x32 * half).contiguous()
    cs = (c * 2.0**S).contiguous()
    is_u8 = train.dtype == torch.uint8
    a_mul, a_add = ((a * half) / 127.5, -(a * half)) if is_u8 else (a * half, 0.0)
    lscale = -scale / 2.0**S

    wssm = softmax == "wssm"
    bb_min = min(c_[0] for c_ in _LOC_GPU_CONFIGS) if tuned else blk["BB"]
    unit = chunk_size if wssm else (16 if tuned else blk["BK"])
    n_split, split_len = split_plan(N, -(-B // bb_min) * -(-n // max(bms)), dev, unit, splits)
    direct = n_split == 1 and not return_state
    inv_den = 1.0 / (-(-N // chunk_size) + 1e-8)
    out = triton_support.nan_output((B, n), dev)
    if direct:
        mxw = lw = accw = out
    elif wssm:  # the kernel writes the sums of chunk means only
        mxw = lw = accw = triton_support.nan_output((n_split, B, n), dev)
    else:
        mxw, lw, accw = triton_support.nan_output((n_split, B, n), dev), triton_support.nan_output((n_split, B, n), dev), triton_support.nan_output((n_split, B, n), dev)
    ta, tb = plan.tables[bms[0]], plan.tables[bms[-1]]
    ys0, ys1 = train.stride()
    args = (
        xs, cs, train, ys0, ys1, plan.mask16, plan.mask16.stride(0),
        ta[0], ta[1], ta[0].stride(0), tb[0], tb[1], tb[0].stride(0),
        out, mxw, lw, accw, B, n, N, split_len, chunk_size if wssm else split_len,
        a_mul, a_add, lscale, inv_den,
    )
    flags = dict(WSSM=wssm, STATE=not direct, SPLIT=split, IS_U8=is_u8, BJ=blk["BJ"], BM_A=bms[0])
    with triton_support.launch_context(x):
        if tuned:
            grid = lambda meta: (-(-B // meta["BB"]), -(-n // meta["BM"]), n_split)  # noqa: E731
            K.loc_tuned[grid](*args, **flags)
        else:
            launch = {"num_warps": blk["num_warps"], "num_stages": blk["num_stages"]} if dev.type == "cuda" else {}
            grid = (-(-B // blk["BB"]), -(-n // blk["BM"]), n_split)
            K.loc[grid](*args, **flags, BB=blk["BB"], BK=blk["BK"], BM=blk["BM"], **launch)
    if direct:
        return out.to(x.dtype)
    if wssm:
        return (accw.sum(0) * inv_den).to(x.dtype)
    mx, l, acc = merge_exact(mxw, lw, accw)
    if return_state:
        # the kernel's logits are shifted by scale * sum_j M[j, m] c[b, j]; undo that so the
        # state merges with other backends' states
        shift = torch.empty(B, n, dtype=torch.float64, device=dev)
        cd = c.to(torch.float64)
        for m0 in range(0, n, 1024):
            shift[:, m0 : m0 + 1024] = cd @ mask[:, m0 : m0 + 1024].to(torch.float64)
        mx = mx.to(torch.float64) - scale * shift
        return SoftmaxState(mx, l, acc).double()
    return (acc / l).to(x.dtype)


def optimal_denoise_triton(
    x: torch.Tensor,
    train: torch.Tensor,
    alpha_bar: float,
    temperature: float = 1.0,
    chunk_size: int = 256,
    return_state: bool = False,
    *,
    splits: Optional[int] = None,
    blocks: Optional[dict] = None,
):
    """Triton ``optimal_denoise``: fp32 direct-difference distances (CUDA cores), exact
    online softmax, fp32 weighted sums. float64 queries run the reference implementation."""
    if x.dtype == torch.float64:
        return optimal_denoise_reference(x, train, alpha_bar, temperature, chunk_size, return_state)
    _check_blocks(dict(blocks or {}), ("BB", "BK", "BJ", "BN"), (("BB",), ("BK",), ("BN",)))  # the same answer on every device
    triton_support.check_device(x, "denoiser", "x")
    res = single_window(x, train, None, alpha_bar, temperature, "exact", chunk_size, return_state, splits=splits, blocks=blocks)
    if return_state:
        return SoftmaxState(*res).double()
    return res.to(x.dtype)


def _prepare_locality(mask: torch.Tensor) -> None:
    """Build (and cache) the per-mask plan ahead of the first call (LocalityDenoiser.prepare)."""
    if mask.dtype != torch.bool or not triton_support.available():
        return
    n = mask.shape[0]
    blk, bms, _ = _loc_blocks(mask.device, n, 1, None)
    _plan(mask, blk["BJ"], bms)


registry.register(
    "locality_denoise", "triton", locality_denoise_triton,
    devices=triton_support.devices(), priority=15, is_available=triton_support.available, prepare=_prepare_locality,
)
registry.register(
    "optimal_denoise", "triton", optimal_denoise_triton,
    devices=triton_support.devices(), priority=15, is_available=triton_support.available,
)
