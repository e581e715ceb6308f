"""Triton backend of ``els_denoise`` (docs/algorithms.md §10): one fused kernel, patch
distances, exact online softmax with a running max per query pixel, and the weighted sum
of candidate centre pixels, with no ``[B, N * positions, n]`` (or any per-candidate)
tensor in memory.

Work items. Every pixel belongs to one group of reference.py's :func:`els_groups` (a
rectangle of pixels sharing one rectangle of candidate centres; circular: one group).
The *query rows* of a group are its (query, pixel) pairs, its *candidates* the (training
image, centre) pairs. A host-built tile table lists, per program, the group and the
first of its ``BQ`` query rows (``_tiles``); grid axis 1 splits the training set (the
split states merge exactly on the host, docs/algorithms.md §5.3). Candidate indices are
int32, so one launch takes at most ``_MAX_CANDIDATES`` (image, centre) pairs per pixel;
larger training sets run several launches whose states merge the same way.

Kernel (``els_kernel``): per block of ``BC`` candidates the distances
``D [BQ, BC] = sum_{c, i, j} (X[c, p + o] - a * Y_k[c, u + o])^2`` (``o = (i, j) - P//2``)
are accumulated over the ``K = C * P^2`` patch entries in chunks of ``KB``: one gather of
``[BQ, KB]`` query values (wrapped for circular, zero outside for zero padding) and
``[BC, KB]`` training values (zero outside: candidates are zero-padded) per chunk, then
``[BQ, BC, KB]`` squared differences summed over the chunk: the structure of a GEMM with
inner dimension K, but direct differences instead of products. Then the online-softmax
update per query row and ``acc += p @ centres`` (``tl.dot`` in IEEE fp32, the centres
padded to ``CP >= 16`` channels). Work is ``O(C * P^2)`` per (pixel, candidate), the
published conv2d cost, with ``(BQ + BC) * KB`` loads per ``BQ * BC * KB`` differences.

Precision: direct differences only (never ``||Q||^2 - 2a<Q, q> + a^2||q||^2``, which
cancels when x is close to a*q: the low-noise regime), fp32 throughout; the logits are
the true ones (no shift), so ``return_state`` states merge with other backends' as they
are. float64 queries run the reference implementation (the fp32 kernel cannot deliver
float64 accuracy; documented fallback, as in the windowed backend).
"""
from __future__ import annotations

import functools
from typing import Optional

import torch

from ... import registry
from ...schedule import noise_level
from .. import triton_support
from ..locality.triton import merge_exact, split_plan
from ..softmax_state import SoftmaxState
from .reference import els_denoise_reference, els_groups

# GPU launch shape: (BQ, BC, KB, num_warps, num_stages). The squared differences
# [BQ, BC, KB] are 16384 fp32 values (64 per thread at 8 warps), D and the probabilities
# [BQ, BC] 4096 each. Untuned (no GPU was available while writing it);
# gpu_static_check.py compiles it for sm_80 and sm_90 in every mode.
ELS_GPU_CONFIG = (64, 64, 4, 8, 2)
_INTERP_VALUES = 1 << 19  # interpreter: bound on BQ * BC * KB (few, large numpy operations)
_TILE_FIELDS = 10
_MAX_CANDIDATES = (1 << 31) - (1 << 16)  # int32 candidate indices, with room for one block past the end  # q0, Qg, npix, pr0, pc0, npc, cr0, cc0, ncc, ncand


@functools.lru_cache(maxsize=None)
def _kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def els_kernel(
        x_ptr,  # f32 [B, C, H, W] contiguous: queries
        y_ptr,  # train [N, C, H, W] (uint8 or float), element strides syk, syc, syh, syw
        syk,
        syc,
        syh,
        syw,
        tile_ptr,  # int32 [T, 10]: per program (q0, Qg, npix, pr0, pc0, npc, cr0, cc0, ncc, ncand)
        out_ptr,  # f32 [B, C, H, W] (not STATE)
        mx_ptr,  # f32 [S, B, H, W] (STATE)
        l_ptr,  # f32 [S, B, H, W] (STATE)
        acc_ptr,  # f32 [S, B, C, H, W] (STATE)
        B,
        C,
        H,
        W,
        N,
        P,
        split_len,  # training images per split (grid axis 1)
        a_mul,  # a*y = y_raw * a_mul + a_add
        a_add,
        lscale,  # logit = D * lscale = -D / (2 s2 tau)
        CIRCULAR: tl.constexpr,
        STATE: tl.constexpr,
        IS_U8: tl.constexpr,
        BQ: tl.constexpr,
        BC: tl.constexpr,
        KB: tl.constexpr,
        CP: tl.constexpr,
    ):
        tb = tile_ptr + tl.program_id(0) * 10
        pid_s = tl.program_id(1)
        q0 = tl.load(tb)
        Qg = tl.load(tb + 1)  # query rows of the group: B * npix
        npix = tl.load(tb + 2)
        pr0 = tl.load(tb + 3)
        pc0 = tl.load(tb + 4)
        npc = tl.load(tb + 5)
        cr0 = tl.load(tb + 6)
        cc0 = tl.load(tb + 7)
        ncc = tl.load(tb + 8)
        ncand = tl.load(tb + 9)  # candidate centres per training image
        h = P // 2
        HW = H * W
        q = q0 + tl.arange(0, BQ)
        q_ok = q < Qg
        b = q // npix
        pix = q % npix
        pr = pr0 + pix // npc  # query pixel row / column [BQ]
        pc = pc0 + pix % npc
        xbase = b.to(tl.int64) * C * HW  # [BQ]
        k_lo = pid_s * split_len
        k_hi = tl.minimum(k_lo + split_len, N)
        m_hi = k_hi * ncand
        rm = tl.arange(0, BC)
        rk = tl.arange(0, KB)
        rc = tl.arange(0, CP)
        PP = P * P
        K = C * PP
        c_ok = rc < C
        mx = tl.full([BQ], float("-inf"), tl.float32)
        l = tl.zeros([BQ], tl.float32)
        acc = tl.zeros([BQ, CP], tl.float32)
        for m0 in range(k_lo * ncand, m_hi, BC):
            m = m0 + rm  # candidates (image k, centre u) [BC]
            m_ok = m < m_hi
            k = m // ncand
            ui = m % ncand
            ur = cr0 + ui // ncc
            uc = cc0 + ui % ncc
            ybase = k.to(tl.int64) * syk + ur.to(tl.int64) * syh + uc.to(tl.int64) * syw  # [BC]: the centre
            D = tl.zeros([BQ, BC], tl.float32)
            for kk0 in range(0, K, KB):
                kk = kk0 + rk  # patch entries (c, i, j) [KB]
                kk_ok = kk < K
                ch = kk // PP
                di = (kk // P) % P - h
                dj = kk % P - h
                xr = pr[:, None] + di[None, :]  # [BQ, KB]
                xc = pc[:, None] + dj[None, :]
                if CIRCULAR:  # |di|, |dj| <= P//2 < H, W: one wrap at most
                    xr = tl.where(xr < 0, xr + H, tl.where(xr >= H, xr - H, xr))
                    xc = tl.where(xc < 0, xc + W, tl.where(xc >= W, xc - W, xc))
                    xm = q_ok[:, None] & kk_ok[None, :]
                else:
                    xm = q_ok[:, None] & kk_ok[None, :] & (xr >= 0) & (xr < H) & (xc >= 0) & (xc < W)
                xv = tl.load(x_ptr + xbase[:, None] + ch[None, :] * HW + xr * W + xc, mask=xm, other=0.0)
                yr = ur[:, None] + di[None, :]  # [BC, KB]
                yc = uc[:, None] + dj[None, :]
                ym = m_ok[:, None] & kk_ok[None, :] & (yr >= 0) & (yr < H) & (yc >= 0) & (yc < W)
                yo = ch.to(tl.int64) * syc + di.to(tl.int64) * syh + dj.to(tl.int64) * syw  # [KB]
                yv = tl.load(y_ptr + ybase[:, None] + yo[None, :], mask=ym, other=0)
                ay = tl.where(ym, yv.to(tl.float32) * a_mul + a_add, 0.0)  # zero padding: a * 0
                d = xv[:, None, :] - ay[None, :, :]  # [BQ, BC, KB]
                D += tl.sum(d * d, axis=2)
            s = tl.where(m_ok[None, :], D * lscale, float("-inf"))
            mx_new = tl.maximum(mx, tl.max(s, axis=1))
            corr = tl.exp(mx - mx_new)
            p = tl.exp(s - mx_new[:, None])
            cen = tl.load(
                y_ptr + ybase[:, None] + rc[None, :].to(tl.int64) * syc,
                mask=m_ok[:, None] & c_ok[None, :],
                other=0,
            )
            if IS_U8:
                cen = cen.to(tl.float32) * (1.0 / 127.5) - 1.0
            else:
                cen = cen.to(tl.float32)
            cen = tl.where(m_ok[:, None] & c_ok[None, :], cen, 0.0)
            l = l * corr + tl.sum(p, axis=1)
            acc = acc * corr[:, None] + tl.dot(p, cen, input_precision="ieee")
            mx = mx_new
        pixo = pr * W + pc  # [BQ]
        om = q_ok[:, None] & c_ok[None, :]
        o = xbase[:, None] + rc[None, :].to(tl.int64) * HW + pixo[:, None]
        if STATE:
            so = pid_s.to(tl.int64) * B * HW + b.to(tl.int64) * HW + pixo
            tl.store(mx_ptr + so, mx, mask=q_ok)
            tl.store(l_ptr + so, l, mask=q_ok)
            tl.store(acc_ptr + pid_s.to(tl.int64) * B * C * HW + o, acc, mask=om)
        else:
            tl.store(out_ptr + o, acc / l[:, None], mask=om)

    return els_kernel


def _blocks(device: torch.device, B: int, N: int, K: int, groups, blocks: Optional[dict]) -> dict:
    """Launch shape. GPU: ELS_GPU_CONFIG. Interpreter: few large steps (it pays per
    operation, not per element)."""
    blk = dict(blocks or {})
    if device.type == "cuda":
        for key, v in zip(("BQ", "BC", "KB", "num_warps", "num_stages"), ELS_GPU_CONFIG):
            blk.setdefault(key, v)
        return blk
    most_q = max(B * (g[0][1] - g[0][0]) * (g[1][1] - g[1][0]) for g in groups)
    most_c = max(N * (g[2][1] - g[2][0]) * (g[3][1] - g[3][0]) for g in groups)
    blk.setdefault("KB", triton_support.pow2_at_least(min(K, 128), 1))
    blk.setdefault("BQ", triton_support.pow2_at_least(min(most_q, 64), 16))
    blk.setdefault("BC", triton_support.pow2_at_least(min(most_c, max(16, _INTERP_VALUES // (blk["BQ"] * blk["KB"]))), 16))
    return blk


def _tiles(groups, B: int, BQ: int) -> torch.Tensor:
    """int32 [T, 10]: one row per program, (q0, Qg, npix, pr0, pc0, npc, cr0, cc0, ncc,
    ncand), the group's query rows [q0, q0 + BQ) of its B * npix."""
    rows = []
    for (pr, pc, cr, cc) in groups:
        npc = pc[1] - pc[0]
        npix = (pr[1] - pr[0]) * npc
        ncc = cc[1] - cc[0]
        ncand = (cr[1] - cr[0]) * ncc
        Qg = B * npix
        for q0 in range(0, Qg, BQ):
            rows.append((q0, Qg, npix, pr[0], pc[0], npc, cr[0], cc[0], ncc, ncand))
    return torch.tensor(rows, dtype=torch.int32)


def els_denoise_triton(
    x: torch.Tensor,
    train: torch.Tensor,
    patch_size: int,
    alpha_bar: float,
    padding: str = "circular",
    temperature: float = 1.0,
    chunk_size: int = 64,
    return_state: bool = False,
    *,
    splits: Optional[int] = None,
    blocks: Optional[dict] = None,
):
    """Triton ``els_denoise`` (backend contract of reference.py, docs/algorithms.md §10).

    ``x`` float32 ``[B, C, H, W]`` (any strides; copied contiguous), ``train`` uint8 or
    float ``[N, C, H, W]`` (any strides, read in place). ``chunk_size`` is unused (the
    kernel streams ``BC`` candidates at a time). float64 queries run the reference
    implementation. Beyond the contract, for tests and tuning: ``splits`` (training-set
    splits merged on the host; default: enough programs for the GPU, 1 in the
    interpreter) and ``blocks`` (any of BQ, BC, KB, num_warps, num_stages).
    """
    if x.dtype == torch.float64:
        return els_denoise_reference(x, train, patch_size, alpha_bar, padding, temperature, chunk_size, return_state)
    triton_support.check_device(x, "ELS", "x")
    B, C, H, W = x.shape
    N = train.shape[0]
    P = int(patch_size)
    dev = x.device
    groups = els_groups(H, W, P, padding)
    blk = _blocks(dev, B, N, C * P * P, groups, blocks)
    for key in ("BQ", "BC"):
        v = blk[key]
        if v < 16 or v & (v - 1):
            raise ValueError(f"blocks[{key!r}] must be a power of two >= 16 (tl.dot operands), got {v}")
    if blk["KB"] < 1 or blk["KB"] & (blk["KB"] - 1):
        raise ValueError(f"blocks['KB'] must be a power of two, got {blk['KB']}")
    tiles = _tiles(groups, B, blk["BQ"]).to(dev)
    a, s2 = noise_level(alpha_bar)
    scale = 1.0 / (2.0 * s2 * temperature)
    x32 = x.to(torch.float32).contiguous()
    is_u8 = train.dtype == torch.uint8
    a_mul, a_add = (a / 127.5, -a) if is_u8 else (a, 0.0)
    # candidate indices (image, centre) are int32 in the kernel: launches of at most
    # _MAX_CANDIDATES // ncand images (e.g. 33000 256x256 images at P = 3 per launch)
    most_cand = int(tiles[:, 9].max()) if tiles.numel() else 1
    per_launch = max(1, _MAX_CANDIDATES // max(1, most_cand))
    plans = [(k0, min(per_launch, N - k0)) for k0 in range(0, N, per_launch)]
    plans = [(k0, n) + split_plan(n, tiles.shape[0], dev, 1, splits) for k0, n in plans]
    direct = len(plans) == 1 and plans[0][2] == 1 and not return_state
    out = triton_support.nan_output((B, C, H, W), dev)
    sk, sc, sh, sw = train.stride()
    launch = {k: blk[k] for k in ("num_warps", "num_stages")} if dev.type == "cuda" else {}
    kern = _kernels()
    parts = []
    with triton_support.launch_context(x):
        for k0, n, n_split, split_len in plans:
            if direct:
                mxw = lw = accw = out
            else:
                mxw, lw = triton_support.nan_output((n_split, B, H, W), dev), triton_support.nan_output((n_split, B, H, W), dev)
                accw = triton_support.nan_output((n_split, B, C, H, W), dev)
                parts.append((mxw, lw, accw))
            kern[(tiles.shape[0], n_split)](
                x32, train[k0 : k0 + n], sk, sc, sh, sw, tiles, out, mxw, lw, accw,
                B, C, H, W, n, P, split_len, a_mul, a_add, -scale,
                CIRCULAR=padding == "circular", STATE=not direct, IS_U8=is_u8,
                BQ=blk["BQ"], BC=blk["BC"], KB=blk["KB"], CP=triton_support.pow2_at_least(C, 16), **launch,
            )
    if direct:
        return out.to(x.dtype)
    mxw, lw, accw = (torch.cat(f) for f in zip(*parts))
    mx, l, acc = merge_exact(mxw[:, :, None], lw[:, :, None], accw)  # [B, 1, H, W] (shared by channels), [B, C, H, W]
    if return_state:
        rep = lambda t: t.expand(B, C, H, W).reshape(B, -1)  # noqa: E731
        return SoftmaxState(rep(mx), rep(l), acc.reshape(B, -1)).double()
    return (acc / l).to(x.dtype)


registry.register(
    "els_denoise", "triton", els_denoise_triton,
    devices=triton_support.devices(), priority=15, is_available=triton_support.available,
)
