"""Triton backend of ``windowed_locality_denoise`` (docs/algorithms.md §5, §9): one fused
kernel, squared differences, window sums, online softmax and weighted accumulation, with
no ``[B, N, n]`` (or any per-training-image) tensor in memory.

Kernel (``wloc_kernel``): one program per (query block of ``BB``, output channel ``c`` and
strip of ``TH`` full-width image rows, split of the training set). It streams over tiles
of ``BK`` training images; per tile it holds the windowed distances ``D [BB, BK, TH, TWP]``
(``TWP``: the image width rounded up to a power of two) and per (query, pixel) the online
softmax state (running max, sum, weighted sum, fp32) in registers. The window sums use
row runs: the window of output channel ``c`` is a list of rows ``(c', di)`` (input
channel, row offset), each a union of column runs. For one row the squared differences
``E = (x - a*y)^2`` of input channel ``c'`` on image rows ``h + di`` (for the strip's rows
``h``, loaded at the shifted rows, zero outside the image) are summed along the row into
a prefix ``P`` (``tl.cumsum``), and a run ``[j0, j1]`` of column offsets contributes
``P[w + j1] - P[w + j0 - 1]`` to output column ``w`` (a ``tl.gather`` along the row;
``P[-1] = 0`` and ``P`` is constant from column ``W - 1`` on, which is the border cut).
So a row of the window costs O(1) per pixel per run boundary, whatever its length, and
``E`` of one row is shared by every run of that row. The window is passed as two small
tables built once per window content (``_RunTables``): rows per output channel and
signed run boundaries per row. Because the strips are full-width, any window size (up
to ``k = 2W - 1``) needs no column halo; rows outside the image are simply skipped. A window
that is the whole image for every pixel (high noise) makes every distance of a (query,
training image) pair the same: that case runs the optimal denoiser's single-window
kernels of ops/locality/triton.py (one fp32 distance per pair, O(B*N*n) work).

Precision: direct differences only (never ``||x||^2 - 2a<x,y> + a^2||y||^2``). ``E`` is
taken relative to a per-(query, pixel) shift ``c_b(p)`` (the expected squared difference
under a per-pixel Gaussian model of the data, :func:`..locality.triton.distance_shift`); it does
not depend on the training image, so it moves every logit of an output by the same
constant and leaves the softmax unchanged, while the prefix sums (whose differences give
the run sums) stay small. fp32 throughout; ``return_state=True`` adds the shift's window
sum back on the host in float64 (a conv2d of the shift with the window), so the states
merge with other backends'. float64 queries run the reference implementation (the fp32
kernel cannot deliver float64 accuracy; documented fallback).

Splits of the training set (grid axis 2) give small query batches enough programs; their
partial states are merged exactly on the host (docs/algorithms.md §5.3). WSSM restarts the softmax at every
chunk of ``chunk_size`` images and sums the chunk means; splits are chunk-aligned.
"""
from __future__ import annotations

import functools
import hashlib
from collections import OrderedDict
from typing import Optional

import torch
import torch.nn.functional as F

from ... import registry
from ...schedule import noise_level
from .. import triton_support
from ..locality.triton import distance_shift, merge_exact, single_window, split_plan
from ..softmax_state import SoftmaxState
from .reference import windowed_locality_denoise_reference

# GPU launch shapes, by padded image width TWP (the width rounded up to a power of two):
# (TWP, BB, BK, TH, num_warps, num_stages, maxnreg). D [BB, BK, TH, TWP] holds 2048 fp32
# values (16 per thread at 4 warps, 8 at 8). Untuned (no GPU was available while writing
# them). Each compiles for sm_80 and sm_90 in every mode (uint8/float16/float32/float64
# train, exact/WSSM, state or not) without register spills and with 2-4 KB of shared
# memory (checked offline with Triton's ptxas; benchmarks/results/windowed-locality-triton.md).
# maxnreg is needed: without it the ptxas of triton 3.9 (run with --regAllocOptLevel=2)
# settled at 56-80 registers and spilled for some shapes and modes; at 128 and 256
# columns 128 registers were too few for some modes (8-16 bytes spilled), hence 192 there
# (ptxas then allocates ~190: 2 blocks of 4 warps per SM). gpu_static_check.py
# enumerates this list.
_WLOC_GPU_CONFIGS = [
    (16, 4, 8, 4, 4, 2, 128),
    (32, 8, 4, 2, 8, 2, 128),
    (64, 4, 8, 1, 4, 2, 128),
    (128, 2, 8, 1, 4, 2, 192),
    (256, 2, 4, 1, 4, 2, 192),
]
_WLOC_MAX_WIDTH = 256  # wider images run the reference implementation
_TABLES: "OrderedDict[tuple, _RunTables]" = OrderedDict()
_TABLES_MAX = 32


@functools.lru_cache(maxsize=None)
def _kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def wloc_kernel(
        x_ptr,  # f32 [B, C, H, W] contiguous: queries
        c_ptr,  # f32 [B, C, H, W] contiguous: the k-independent shift
        y_ptr,  # train [N, C, H, W] (uint8 or float), element strides syk, syc, syh, syw
        syk,
        syc,
        syh,
        syw,
        row_x,  # int32 [C, ld_rows]: offset of window row (c', di) in a query, c'*H*W + di*W
        row_y,  # int64 [C, ld_rows]: its offset in a training image, c'*syc + di*syh
        row_d,  # int32 [C, ld_rows]: di
        row_q0,  # int32 [C, ld_rows]: its first run boundary
        row_nq,  # int32 [C, ld_rows]: its number of run boundaries
        row_cnt,  # int32 [C]: rows of each output channel's window
        ld_rows,
        bnd_off,  # int32 [*]: column offset b of a run boundary (contributes sign * P[w + b])
        bnd_sgn,  # f32 [*]: its sign (+1: run end, -1: the column before a run start)
        out_ptr,  # f32 [B, C*H*W] contiguous (not STATE)
        mx_ptr,  # f32 [S, B, C*H*W] (STATE, exact)
        l_ptr,  # f32 [S, B, C*H*W] (STATE, exact)
        acc_ptr,  # f32 [S, B, C*H*W] (STATE: exact acc, or WSSM sum of chunk means)
        B,
        C,
        H,
        W,
        N,
        n_th,  # strips of TH rows per channel
        split_len,  # images per split (grid axis 2)
        chunk,  # images per softmax (WSSM chunk; = split_len in exact mode)
        a_mul,  # a*y = y_raw * a_mul + a_add
        a_add,
        lscale,  # logit = D * lscale = -D / (2 s2 tau)
        inv_den,  # WSSM: 1 / (chunks + 1e-8)
        WSSM: tl.constexpr,
        STATE: tl.constexpr,
        IS_U8: tl.constexpr,
        BB: tl.constexpr,
        BK: tl.constexpr,
        TH: tl.constexpr,
        TWP: tl.constexpr,
    ):
        pid_b = tl.program_id(0)
        pid_ct = tl.program_id(1)
        pid_s = tl.program_id(2)
        c = pid_ct // n_th
        h0 = (pid_ct % n_th) * TH
        HW = H * W
        n = C * HW
        offs_b = pid_b * BB + tl.arange(0, BB)
        b_ok = offs_b < B
        xrow = offs_b.to(tl.int64) * n  # [BB]
        oh = h0 + tl.arange(0, TH)  # output rows [TH]
        rw = tl.arange(0, TWP)  # columns [TWP]
        w_ok = rw < W
        o_ok = (oh < H)[:, None] & w_ok[None, :]  # [TH, TWP]
        rel = oh[:, None] * W + rw[None, :]  # [TH, TWP] pixel index within a channel
        yrel = oh[:, None].to(tl.int64) * syh + rw[None, :].to(tl.int64) * syw  # [TH, TWP]
        opix = c * HW + rel  # output pixel index
        yout = c * syc + yrel
        rk = tl.arange(0, BK)
        nrows = tl.load(row_cnt + c)
        rbase = c * ld_rows
        k_lo = pid_s * split_len
        k_hi = tl.minimum(k_lo + split_len, N)
        mx = tl.full([BB, TH, TWP], float("-inf"), tl.float32)
        l = tl.zeros([BB, TH, TWP], tl.float32)
        acc = tl.zeros([BB, TH, TWP], tl.float32)
        num = tl.zeros([BB, TH, TWP], tl.float32)
        for c0 in range(k_lo, k_hi, chunk):
            c1 = tl.minimum(c0 + chunk, k_hi)
            for k0 in range(c0, c1, BK):
                offs_k = k0 + rk
                k_ok = offs_k < c1
                yrow = offs_k.to(tl.int64) * syk  # [BK]
                D = tl.zeros([BB, BK, TH, TWP], tl.float32)
                for r in range(rbase, rbase + nrows):
                    di = tl.load(row_d + r)
                    q0 = tl.load(row_q0 + r)
                    nq = tl.load(row_nq + r)
                    ih = oh + di  # input rows [TH]
                    in_ok = ((ih >= 0) & (ih < H))[:, None] & w_ok[None, :]  # [TH, TWP]
                    xo = tl.load(row_x + r) + rel  # [TH, TWP]; addresses outside the image are masked
                    xm = b_ok[:, None, None] & in_ok[None, :, :]
                    xv = tl.load(x_ptr + xrow[:, None, None] + xo[None, :, :], mask=xm, other=0.0)
                    cv = tl.load(c_ptr + xrow[:, None, None] + xo[None, :, :], mask=xm, other=0.0)
                    yo = tl.load(row_y + r) + yrel
                    yv = tl.load(
                        y_ptr + yrow[:, None, None] + yo[None, :, :],
                        mask=k_ok[:, None, None] & in_ok[None, :, :],
                        other=0,
                    )
                    ay = yv.to(tl.float32) * a_mul + a_add  # [BK, TH, TWP]
                    diff = xv[:, None, :, :] - ay[None, :, :, :]
                    e = diff * diff - cv[:, None, :, :]
                    e = tl.where(in_ok[None, None, :, :], e, 0.0)
                    P = tl.cumsum(e, axis=3)  # row prefix; constant from column W - 1 on
                    for q in range(q0, q0 + nq):
                        bo = tl.load(bnd_off + q)
                        sg = tl.load(bnd_sgn + q)
                        gi = rw + bo
                        gw = tl.where(gi >= 0, sg, 0.0)  # P[negative] = 0
                        gi = tl.minimum(tl.maximum(gi, 0), TWP - 1)
                        g = tl.gather(P, tl.broadcast_to(gi[None, None, None, :], [BB, BK, TH, TWP]), axis=3)
                        D += g * gw[None, None, None, :]
                s = D * lscale
                s = tl.where(k_ok[None, :, None, None], s, float("-inf"))
                mx_new = tl.maximum(mx, tl.max(s, axis=1))
                corr = tl.exp(mx - mx_new)
                p = tl.exp(s - mx_new[:, None, :, :])
                yv = tl.load(
                    y_ptr + yrow[:, None, None] + yout[None, :, :],
                    mask=k_ok[:, None, None] & o_ok[None, :, :],
                    other=0,
                )
                if IS_U8:
                    yv = yv.to(tl.float32) * (1.0 / 127.5) - 1.0
                else:
                    yv = yv.to(tl.float32)
                l = l * corr + tl.sum(p, axis=1)
                acc = acc * corr + tl.sum(p * yv[None, :, :, :], axis=1)
                mx = mx_new
            if WSSM:
                num += acc / l
                mx = tl.full([BB, TH, TWP], float("-inf"), tl.float32)
                l = tl.zeros([BB, TH, TWP], tl.float32)
                acc = tl.zeros([BB, TH, TWP], tl.float32)
        om = b_ok[:, None, None] & o_ok[None, :, :]
        o = xrow[:, None, None] + opix[None, :, :]
        if STATE:
            o += pid_s.to(tl.int64) * B * n
            if WSSM:
                tl.store(acc_ptr + o, num, mask=om)
            else:
                tl.store(mx_ptr + o, mx, mask=om)
                tl.store(l_ptr + o, l, mask=om)
                tl.store(acc_ptr + o, acc, mask=om)
        else:
            if WSSM:
                tl.store(out_ptr + o, num * inv_den, mask=om)
            else:
                tl.store(out_ptr + o, acc / l, mask=om)

    return wloc_kernel


class _RunTables:
    """The window ``[C, C, k, k]`` as row runs: per output channel c the list of rows
    ``(c', di)`` with at least one True entry (and ``|di| < H``), each with its signed run
    boundaries: a run of column offsets ``[j0, j1]`` gives ``(+1, j1)`` and ``(-1, j0 - 1)``."""

    def __init__(self, window: torch.Tensor, H: int, W: int):
        w = window.detach().to("cpu", torch.bool)
        C, k = w.shape[0], w.shape[-1]
        r = k // 2
        rows = [[] for _ in range(C)]
        offs, sgns = [], []
        pad = torch.zeros(C, C, k, k + 2, dtype=torch.int8)
        pad[..., 1:-1] = w.to(torch.int8)
        edges = pad[..., 1:] - pad[..., :-1]  # +1 where a run starts at column j, -1 after it ends at j - 1
        for c in range(C):
            for ci in range(C):
                for i in range(k):
                    di = i - r
                    if abs(di) >= H:
                        continue
                    e = edges[c, ci, i]
                    starts = torch.nonzero(e == 1).flatten().tolist()
                    ends = (torch.nonzero(e == -1).flatten() - 1).tolist()
                    if not starts:
                        continue
                    q0 = len(offs)
                    for j0, j1 in zip(starts, ends):
                        lo, hi = j0 - r - 1, j1 - r  # + P[w + hi] - P[w + lo]
                        if hi < -(W - 1) or lo >= W - 1:
                            continue  # the run never overlaps the image
                        offs += [hi, max(lo, -W)]
                        sgns += [1.0, -1.0]
                    if len(offs) > q0:
                        rows[c].append((ci, di, q0, len(offs) - q0))
        ld = max(1, max(len(rc) for rc in rows))
        tab = torch.zeros(C, ld, 4, dtype=torch.int64)
        for c, rc in enumerate(rows):
            if rc:
                tab[c, : len(rc)] = torch.tensor(rc, dtype=torch.int64)
        self.rows = tab  # [C, ld, 4]: (c', di, first boundary, boundaries)
        self.H, self.W = H, W
        self.counts = torch.tensor([len(rc) for rc in rows], dtype=torch.int32)
        self.offs = torch.tensor(offs or [0], dtype=torch.int32)
        self.sgns = torch.tensor(sgns or [0.0], dtype=torch.float32)
        self.ld = ld
        self.boundaries = len(offs)
        self._on = {}

    def on(self, device: torch.device, syc: int, syh: int):
        """The kernel's tables on ``device`` for training images of channel/row strides
        (syc, syh): row_x, row_y, row_d, row_q0, row_nq, row_cnt, bnd_off, bnd_sgn."""
        key = (str(device), syc, syh)
        if key not in self._on:
            ci, di, q0, nq = self.rows.unbind(-1)
            x = (ci * (self.H * self.W) + di * self.W).to(torch.int32)
            y = ci * syc + di * syh
            tabs = (x, y, di.to(torch.int32), q0.to(torch.int32), nq.to(torch.int32), self.counts, self.offs, self.sgns)
            if len(self._on) >= 4:
                self._on.clear()
            self._on[key] = tuple(t.contiguous().to(device) for t in tabs)
        return self._on[key]


def _tables(window: torch.Tensor, H: int, W: int) -> _RunTables:
    wc = window.detach().to("cpu", torch.bool).contiguous()
    key = (tuple(wc.shape), H, W, hashlib.sha1(wc.numpy().tobytes()).hexdigest())
    t = _TABLES.get(key)
    if t is None:
        t = _RunTables(wc, H, W)
        _TABLES[key] = t
        while len(_TABLES) > _TABLES_MAX:
            _TABLES.popitem(last=False)
    else:
        _TABLES.move_to_end(key)
    return t


def _whole_image(window: torch.Tensor, H: int, W: int) -> bool:
    """Every output pixel's window is the whole image (all channels): every offset
    ``(di, dj)`` with ``|di| < H``, ``|dj| < W`` is in the window of every channel pair."""
    r = window.shape[-1] // 2
    if r < H - 1 or r < W - 1:
        return False
    return bool(window[:, :, r - (H - 1) : r + H, r - (W - 1) : r + W].all())


def _blocks(device: torch.device, B: int, N: int, H: int, W: int, blocks: Optional[dict]) -> dict:
    """Launch shape. GPU: the entry of _WLOC_GPU_CONFIGS for the padded width. Interpreter:
    few large steps (it pays per operation, not per element)."""
    twp = triton_support.pow2_at_least(W, 16)
    blk = dict(blocks or {})
    blk["TWP"] = twp
    if device.type == "cuda":
        cfg = next(c for c in _WLOC_GPU_CONFIGS if c[0] == twp)
        for key, v in zip(("BB", "BK", "TH", "num_warps", "num_stages", "maxnreg"), cfg[1:]):
            blk.setdefault(key, v)
        return blk
    blk.setdefault("BB", triton_support.pow2_at_least(min(B, 8), 1))
    blk.setdefault("BK", triton_support.pow2_at_least(min(N, 128), 16))
    blk.setdefault("TH", triton_support.pow2_at_least(min(H, max(1, 512 // twp)), 1))
    return blk


def windowed_locality_denoise_triton(
    x: torch.Tensor,
    train: torch.Tensor,
    window: torch.Tensor,
    alpha_bar: float,
    temperature: float = 1.0,
    softmax: str = "exact",
    chunk_size: int = 256,
    return_state: bool = False,
    *,
    splits: Optional[int] = None,
    blocks: Optional[dict] = None,
):
    """Triton ``windowed_locality_denoise`` (backend contract of reference.py).

    ``x`` float32 ``[B, C, H, W]`` (any strides; copied contiguous), ``train`` uint8 or float
    ``[N, C, H, W]`` (any strides, read in place), ``window`` bool ``[C, C, k, k]``. float64
    queries and images wider than 256 run the reference implementation. Beyond the contract,
    for tests and tuning: ``splits`` (training-set splits merged on the host; default:
    enough programs for the GPU, 1 in the interpreter) and ``blocks`` (any of BB, BK, TH,
    num_warps, num_stages, maxnreg).
    """
    B, C, H, W = x.shape
    if x.dtype == torch.float64 or W > _WLOC_MAX_WIDTH:
        return windowed_locality_denoise_reference(x, train, window, alpha_bar, temperature, softmax, chunk_size, return_state)
    triton_support.check_device(x, "windowed denoiser", "x")
    N = train.shape[0]
    n = C * H * W
    dev = x.device
    if _whole_image(window, H, W):
        # one distance per (query, training image): the optimal denoiser's kernels, O(B*N*n)
        res = single_window(x.reshape(B, n), train.reshape(N, n), None, alpha_bar, temperature, softmax, chunk_size, return_state, splits=splits)
        if return_state:
            mx, l, acc = res
            return SoftmaxState(mx.expand(B, n).contiguous(), l.expand(B, n).contiguous(), acc).double()
        return res.to(x.dtype).reshape(B, C, H, W)
    blk = _blocks(dev, B, N, H, W, blocks)
    tabs = _tables(window, H, W)
    sk, sc, sh, sw = train.stride()
    tables = tabs.on(dev, sc, sh)
    kern = _kernels()

    a, s2 = noise_level(alpha_bar)
    scale = 1.0 / (2.0 * s2 * temperature)
    x32 = x.to(torch.float32).contiguous()
    shift = distance_shift(x32.reshape(B, n), train.reshape(N, n), alpha_bar).reshape(B, C, H, W).contiguous()
    is_u8 = train.dtype == torch.uint8
    a_mul, a_add = (a / 127.5, -a) if is_u8 else (a, 0.0)

    wssm = softmax == "wssm"
    n_th = -(-H // blk["TH"])
    nb = -(-B // blk["BB"])
    unit = chunk_size if wssm else blk["BK"]
    n_split, split_len = split_plan(N, nb * C * n_th, dev, unit, splits)
    direct = n_split == 1 and not return_state
    inv_den = 1.0 / (-(-N // chunk_size) + 1e-8)
    out = triton_support.nan_output((B, n), dev)
    if direct:
        mxw = lw = accw = out
    elif wssm:  # the kernel writes the sums of chunk means only
        mxw = lw = accw = triton_support.nan_output((n_split, B, n), dev)
    else:
        mxw, lw, accw = (triton_support.nan_output((n_split, B, n), dev) for _ in range(3))
    launch = {k: blk[k] for k in ("num_warps", "num_stages", "maxnreg")} if dev.type == "cuda" else {}
    with triton_support.launch_context(x):
        kern[(nb, C * n_th, n_split)](
            x32, shift, train, sk, sc, sh, sw, *tables[:6], tabs.ld, *tables[6:],
            out, mxw, lw, accw, B, C, H, W, N, n_th, split_len, chunk_size if wssm else split_len,
            a_mul, a_add, -scale, inv_den,
            WSSM=wssm, STATE=not direct, IS_U8=is_u8,
            BB=blk["BB"], BK=blk["BK"], TH=blk["TH"], TWP=blk["TWP"], **launch,
        )
    if direct:
        return out.to(x.dtype).reshape(B, C, H, W)
    if wssm:
        return (accw.sum(0) * inv_den).to(x.dtype).reshape(B, C, H, W)
    mx, l, acc = merge_exact(mxw, lw, accw)
    if return_state:
        # the kernel's logits are relative to scale * (window sum of the shift); add it back
        # (float64 on the host) so that the state merges with other backends' states
        r = window.shape[-1] // 2
        wsum = F.conv2d(shift.to(torch.float64), window.to(dev, torch.float64), padding=r).reshape(B, n)
        return SoftmaxState(mx.to(torch.float64) - scale * wsum, l, acc).double()
    return (acc / l).to(x.dtype).reshape(B, C, H, W)


registry.register(
    "windowed_locality_denoise", "triton", windowed_locality_denoise_triton,
    devices=triton_support.devices(), priority=15, is_available=triton_support.available,
)
