"""Reference implementation of ``windowed_locality_denoise``: pure PyTorch, float64-capable
(docs/algorithms.md §9).

With a translation-invariant window the masked distance of every output pixel is a
convolution: ``d[b, k, c, p] = sum_{c', o: W[c, c', o]} E[b, k, c', p + o]`` with
``E = (x - a*y)^2`` and out-of-image terms absent, i.e. ``conv2d(E, W, padding=k//2)`` with
zero padding (a zero-padded E contributes nothing, which is exactly the border cut).
Memory: ``[b, chunk, C, H, W]`` blocks of at most ``_BLOCK_VALUES`` elements; never n x n.

Backend signature (inputs validated by the public op): ``x`` float32/float64
``[B, C, H, W]``; ``train`` uint8 or float in [-1, 1] ``[N, C, H, W]``; ``window`` bool
``[C, C, k, k]`` (output channel, input channel, offsets centred at ``(k//2, k//2)``);
``alpha_bar`` in (0, 1). Returns ``[B, C, H, W]`` in x's dtype, or a float64
:class:`SoftmaxState` with flat ``[B, n]`` fields.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..._validate import compute_dtype, to_unit
from ...schedule import noise_level
from ..softmax_state import SoftmaxState, online_update

_BLOCK_VALUES = 1 << 23  # bound on the [b, chunk, C, H, W] temporaries, in elements


def window_distances(x: torch.Tensor, y: torch.Tensor, window: torch.Tensor, a: float) -> torch.Tensor:
    """Windowed distances ``d [b, c, C, H, W]`` between queries ``x [b, C, H, W]`` and training
    images ``y [c, C, H, W]`` (both in the compute dtype) under ``window [C, C, k, k]``."""
    b, C, H, W = x.shape
    c = y.shape[0]
    E = (x[:, None] - a * y[None]) ** 2  # [b, c, C, H, W], direct differences (no cancellation)
    r = window.shape[-1] // 2
    d = F.conv2d(E.reshape(b * c, C, H, W), window.to(E.dtype), padding=r)
    return d.reshape(b, c, C, H, W)


def windowed_locality_denoise_reference(
    x: torch.Tensor,
    train: torch.Tensor,
    window: torch.Tensor,
    alpha_bar: float,
    temperature: float = 1.0,
    softmax: str = "exact",
    chunk_size: int = 256,
    return_state: bool = False,
):
    """``out[b, c, p] = sum_k softmax_k(-d[b, k, c, p] / (2 s2 tau)) y[k, c, p]`` with the
    windowed distance of :func:`window_distances`; exact online softmax or WSSM."""
    dt = compute_dtype(x)
    B, C, H, W = x.shape
    N = train.shape[0]
    n = C * H * W
    a, s2 = noise_level(alpha_bar)
    scale = 1.0 / (2.0 * s2 * temperature)
    xf = x.to(dt)
    if softmax == "exact":
        # chunking is only a memory knob here: the result does not depend on it
        chunk = max(1, min(chunk_size, _BLOCK_VALUES // (B * n)))
        parts = []
        step = max(1, _BLOCK_VALUES // (chunk * n))
        for b0 in range(0, B, step):
            st = None
            for k0 in range(0, N, chunk):
                y = to_unit(train[k0 : k0 + chunk], dt)
                logits = -window_distances(xf[b0 : b0 + step], y, window, a).reshape(-1, y.shape[0], n) * scale
                st = online_update(st, logits, y.reshape(y.shape[0], n), "bcn,cn->bn")
            parts.append(st)
        state = SoftmaxState(*(torch.cat(p) for p in zip(*parts)))
        return state.double() if return_state else state.result().to(x.dtype).reshape(x.shape)
    # WSSM: the mean of per-chunk softmax means, as in the paper's code (chunks are semantic)
    num = torch.zeros(B, n, dtype=dt, device=x.device)
    den = torch.zeros(B, n, dtype=dt, device=x.device)
    for k0 in range(0, N, chunk_size):
        y = to_unit(train[k0 : k0 + chunk_size], dt)
        step = max(1, _BLOCK_VALUES // (y.shape[0] * n))
        for b0 in range(0, B, step):
            logits = -window_distances(xf[b0 : b0 + step], y, window, a).reshape(-1, y.shape[0], n) * scale
            w = torch.softmax(logits, dim=1)
            num[b0 : b0 + step] += torch.einsum("bcn,cn->bn", w, y.reshape(y.shape[0], n))
            den[b0 : b0 + step] += w.sum(1)
    return (num / (den + 1e-8)).to(x.dtype).reshape(x.shape)
