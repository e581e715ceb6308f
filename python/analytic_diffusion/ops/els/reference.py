"""Reference implementation of ``els_denoise``: pure PyTorch, float64-capable
(docs/algorithms.md §10, docs/algorithms.md §10).

Every pixel belongs to one *group*: a rectangle of pixels that share one candidate set,
itself a rectangle of candidate centres (in every training image):

- ``padding="circular"`` (ELS): one group, every pixel; candidates: every fully-inside
  P x P patch, centres ``[P//2, H-1-P//2] x [P//2, W-1-P//2]``; x is padded circularly.
- ``padding="zeros"`` (bbELS): per axis, a position within P//2 of either edge is its own
  group whose only candidate centre is itself; the interior positions form one group whose
  candidates are the interior positions. Groups are products of a row group and a column
  group: corners like LS, edges slide along the edge, the interior is full ELS. x and the
  candidates are zero-padded. With P >= H and P >= W every pixel is its own group: LS.

Distances are direct differences ``sum (Q_p(x) - a*q)^2`` (never the expanded form), in
float64 for float64 queries; the softmax is an exact online softmax with one running max
per query pixel (the published code shares it across the batch, which can underflow).

Backend signature (inputs validated by the public op): ``x`` float32/float64
``[B, C, H, W]``; ``train`` uint8 or float in [-1, 1] ``[N, C, H, W]``; ``patch_size`` odd
int (``<= min(H, W)`` for circular); ``alpha_bar`` in (0, 1); ``padding`` "circular" or
"zeros"; ``temperature > 0``; ``chunk_size`` (training images per block, a memory knob
only); ``return_state``. Returns ``[B, C, H, W]`` in x's dtype, or a float64
:class:`SoftmaxState` with flat ``[B, C*H*W]`` fields (``mx`` and ``l`` repeated over
channels, since all channels of a pixel share the weights).
"""
from __future__ import annotations

from typing import List, Tuple

import torch
import torch.nn.functional as F

from ..._validate import compute_dtype, to_unit
from ...schedule import noise_level
from ..softmax_state import SoftmaxState, online_update

_BLOCK_VALUES = 1 << 23  # bound on the [queries, candidates, C*P*P] temporaries, in elements

Range = Tuple[int, int]  # [start, stop)


def axis_groups(n: int, patch_size: int, padding: str) -> List[Tuple[Range, Range]]:
    """Per axis of length ``n``: ``[(pixels, candidate centres), ...]`` as half-open ranges."""
    h = patch_size // 2
    inner = (h, n - h)
    if padding == "circular":
        return [((0, n), inner)]
    groups = []
    for r in range(n):
        if h <= r < n - h:
            if r == h:  # the interior, once (it starts at h whenever it is non-empty)
                groups.append((inner, inner))
        else:
            groups.append(((r, r + 1), (r, r + 1)))
    return groups


def els_groups(H: int, W: int, patch_size: int, padding: str):
    """Pixel groups ``(rows, cols, cand_rows, cand_cols)`` covering the image once each."""
    return [
        (pr, pc, cr, cc)
        for pr, cr in axis_groups(H, patch_size, padding)
        for pc, cc in axis_groups(W, patch_size, padding)
    ]


def _patches(img_padded: torch.Tensor, rows: Range, cols: Range, P: int) -> torch.Tensor:
    """Patches centred at ``rows x cols`` of an image padded by P//2: ``[b, C*P*P, r*c]``."""
    sub = img_padded[:, :, rows[0] : rows[1] + P - 1, cols[0] : cols[1] + P - 1]
    return F.unfold(sub, P)


def els_denoise_reference(
    x: torch.Tensor,
    train: torch.Tensor,
    patch_size: int,
    alpha_bar: float,
    padding: str = "circular",
    temperature: float = 1.0,
    chunk_size: int = 64,
    return_state: bool = False,
):
    """docs/algorithms.md §10: ``out[b, :, p] = sum_q softmax_q(-||Q_p(x) - a q||^2 / (2 s2 tau)) centre(q)``
    over the candidate patches ``q`` of pixel p (see the module docstring)."""
    dt = compute_dtype(x)
    B, C, H, W = x.shape
    P = int(patch_size)
    h = P // 2
    a, s2 = noise_level(alpha_bar)
    scale = 1.0 / (2.0 * s2 * temperature)
    xf = x.to(dt)
    pad = (h, h, h, h)
    xpad = F.pad(xf, pad, mode="circular") if padding == "circular" else F.pad(xf, pad)
    D = C * P * P
    mx = torch.empty(B, H, W, dtype=dt, device=x.device)
    l = torch.empty(B, H, W, dtype=dt, device=x.device)
    acc = torch.empty(B, C, H, W, dtype=dt, device=x.device)
    for rows, cols, crows, ccols in els_groups(H, W, P, padding):
        npix = (rows[1] - rows[0]) * (cols[1] - cols[0])
        ncand = (crows[1] - crows[0]) * (ccols[1] - ccols[0])
        q = _patches(xpad, rows, cols, P).transpose(1, 2).reshape(B * npix, D)  # [Q, D], Q = (b, pixel)
        st = None
        chunk = max(1, min(chunk_size, _BLOCK_VALUES // max(1, B * npix * ncand * D)))
        for k0 in range(0, train.shape[0], chunk):
            y = to_unit(train[k0 : k0 + chunk], dt)
            cand = _patches(F.pad(y, pad), crows, ccols, P).transpose(1, 2).reshape(-1, D)  # [(k, centre), D]
            centres = y[:, :, crows[0] : crows[1], ccols[0] : ccols[1]].permute(0, 2, 3, 1).reshape(-1, C)
            step = max(1, _BLOCK_VALUES // (cand.shape[0] * D))
            for c0 in range(0, cand.shape[0], step):
                d = ((q[:, None, :] - a * cand[None, c0 : c0 + step]) ** 2).sum(-1)  # [Q, c], direct differences
                st = online_update(st, (-d * scale)[:, :, None], centres[c0 : c0 + step], "qcz,cn->qn")  # mx, l [Q, 1]
        sl = (slice(None), slice(rows[0], rows[1]), slice(cols[0], cols[1]))
        nr, nc = rows[1] - rows[0], cols[1] - cols[0]
        mx[sl] = st.mx.reshape(B, nr, nc)
        l[sl] = st.l.reshape(B, nr, nc)
        acc[(slice(None), slice(None)) + sl[1:]] = st.acc.reshape(B, nr, nc, C).permute(0, 3, 1, 2)
    if return_state:
        rep = lambda t: t[:, None].expand(B, C, H, W).reshape(B, -1).double()  # noqa: E731
        return SoftmaxState(rep(mx), rep(l), acc.reshape(B, -1).double())
    return (acc / l[:, None]).to(x.dtype)
