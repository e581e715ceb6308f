"""``windowed`` backend of ``patch_posterior_denoise`` (PSPC-square, docs/algorithms.md §13) on
CPU: the compiled windowed locality kernel (docs/algorithms.md §9) does all the work.

A P x P window with top-left ``(i, j)`` is the P x P box centred at ``c = (i + r, j + r)``
(P = 2r + 1 odd), so its posterior weights over the training set are the softmax of the
windowed locality op with a box window at the centre c (exact float64 online softmax). PSPC
needs those weights applied to the whole patch, not only to its centre: the op is run on
``C * P^2`` "shifted" channels, channel ``(o, ch)`` of a training image being channel ``ch``
read at offset ``o`` from the pixel, and a window that compares only the ``C`` unshifted
channels. The op's output channel ``(o, ch)`` at centre c is then the window's posterior mean
of pixel ``c + o``; each pixel averages the means of the windows covering it (only windows
fully inside the image count, as in §13). One distance and one exp per (query, image,
window) whatever P is, plus ``C * P^2`` weighted sums: for small P this is far cheaper than
the per-window loops, and exact.

Used for odd P with ``C * P^2 <= MAX_CHANNELS`` (memory of the shifted training copy: N *
C * P^2 * H * W values); every other case, and non-CPU tensors, go to the ``boxsum`` backend.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ... import registry
from ..windowed_locality import windowed_locality_denoise
from ..windowed_locality import cpu as _wl_cpu
from .boxsum import patch_posterior_denoise_boxsum

__all__ = ["MAX_CHANNELS", "patch_posterior_denoise_windowed"]

#: Largest ``C * P^2`` this backend expands to (RGB: P = 3, grayscale: P <= 5): measured, at P = 5
#: on RGB the 75 weighted sums per logit and the 75x training copy left it no faster than
#: ``boxsum``; larger patches use ``boxsum``.
MAX_CHANNELS = 48


def _shifted(y: torch.Tensor, P: int) -> torch.Tensor:
    """``[N, C, H, W] -> [N, P*P*C, H, W]``: block ``o = (di + r) * P + (dj + r)`` holds ``y``
    read at offset ``(di, dj)`` (zero outside the image: never used, since only windows fully
    inside the image are kept). One gather through an unfolded view of the padded images."""
    N, C, H, W = y.shape
    r = P // 2
    yp = F.pad(y, (r, r, r, r))
    return yp.unfold(2, P, 1).unfold(3, P, 1).permute(0, 4, 5, 1, 2, 3).reshape(N, P * P * C, H, W)


def patch_posterior_denoise_windowed(
    x: torch.Tensor,
    train: torch.Tensor,
    patch_size: int,
    alpha_bar: float,
    temperature: float = 1.0,
    chunk_size: int = 256,
) -> torch.Tensor:
    """Backend of ``patch_posterior_denoise`` (docs/algorithms.md §13; inputs validated by the
    public op): ``x`` float32/float64 ``[B, C, H, W]`` on CPU, ``train`` uint8 or float in
    [-1, 1] ``[N, C, H, W]``, ``patch_size`` int. Returns x's shape and dtype. Cases it does
    not take go to the ``boxsum`` backend (see the module docstring)."""
    B, C, H, W = x.shape
    P = int(patch_size)
    if P % 2 == 0 or C * P * P > MAX_CHANNELS or (P == H and P == W) or x.device.type != "cpu" or train.device.type != "cpu":
        return patch_posterior_denoise_boxsum(x, train, P, alpha_bar, temperature, chunk_size)
    r = P // 2
    Cs = P * P * C
    c0 = (r * P + r) * C  # the unshifted block: input channels c0 .. c0 + C - 1 (< 64, see MAX_CHANNELS)
    ys = _shifted(train, P)
    xs = torch.zeros(B, Cs, H, W, dtype=x.dtype)
    xs[:, c0 : c0 + C] = x  # only the unshifted channels enter the distances
    window = torch.zeros(Cs, Cs, P, P, dtype=torch.bool)
    window[:, c0 : c0 + C] = True  # every output channel: the P x P box over the C unshifted channels
    means = windowed_locality_denoise(xs, ys, window, alpha_bar, temperature=temperature, backend="cpu").double()
    out = torch.zeros(B, C, H, W, dtype=torch.float64)
    count = torch.zeros(H, W, dtype=torch.float64)
    hc, wc = H - P + 1, W - P + 1  # centres of the windows fully inside: [r, r + hc) x [r, r + wc)
    for di in range(-r, r + 1):
        for dj in range(-r, r + 1):
            o = (di + r) * P + (dj + r)
            out[:, :, r + di : r + di + hc, r + dj : r + dj + wc] += means[:, o * C : (o + 1) * C, r : r + hc, r : r + wc]
            count[r + di : r + di + hc, r + dj : r + dj + wc] += 1
    return (out / count).to(x.dtype)


registry.register(
    "patch_posterior_denoise", "windowed", patch_posterior_denoise_windowed, devices=("cpu",), priority=6, is_available=_wl_cpu.available
)
