"""``boxsum`` backend of ``patch_posterior_denoise`` (PSPC-square, docs/algorithms.md §13):
every window position at once, float64, pure PyTorch (any device).

Distances: the squared distance of window ``(i, j)`` between ``x`` and ``a*y`` is the box sum
of the per-pixel squared-difference image ``e = sum_c (x - a*y)^2`` (direct differences, never
the expanded form) over the P x P window: two 1-D integral images (cumulative sums along H,
then W) give all ``(H-P+1) x (W-P+1)`` window sums in O(1) each, for O(n) per training image
whatever P is.

Softmax: per (query, window) an exact softmax over the N training images, in two passes over
N: pass 1 finds the running max ``mx`` and the normaliser ``l`` (online, chunked); pass 2 forms
the final weights ``w = exp(logit - mx) / l`` and, instead of materialising the per-window
patch means (``C*P*P`` values per window), sums for every pixel the weights of the windows
covering it (a "cover" box sum of ``w``, again two 1-D integral images) and accumulates
``sum_k cover_w[k, p] * y[k, c, p]``. Dividing by the number of windows covering p gives
exactly the average of the window means. Pass 1 keeps its exponentials (relative to each
chunk's running max) for pass 2 when they fit (``_CACHE_VALUES``): pass 2 then rescales them by
one exp per (query, window) instead of one per logit; else the logits are recomputed. Cost per query and training image: O(n), vs
O((H-P+1)(W-P+1) * C * P^2) for the published per-window loop.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ... import registry
from ..._validate import to_unit
from ...schedule import noise_level

_BLOCK_VALUES = 1 << 22  # bound on the [b, chunk, C, H, W] difference temporaries
_CACHE_VALUES = 1 << 23  # keep pass-1 logits [B, N, Hp, Wp] for pass 2 up to this size


def _window_sums(e: torch.Tensor, P: int, dim: int) -> torch.Tensor:
    """Sums of P consecutive entries along ``dim`` (valid positions only: L - P + 1 of them)."""
    L = e.shape[dim]
    cs = torch.cumsum(e, dim)
    # window i is cs[i + P - 1] - cs[i - 1] (cs[-1] = 0): no zero-padded copy of cs
    out = cs.narrow(dim, P - 1, L - P + 1).clone()
    if L > P:
        out.narrow(dim, 1, L - P).sub_(cs.narrow(dim, 0, L - P))
    return out


def _cover_sums(w: torch.Tensor, P: int, dim: int, L: int) -> torch.Tensor:
    """For each of L positions h along ``dim``: the sum of ``w`` over the window starts that
    cover h, i.e. ``sum_{i = max(0, h-P+1)}^{min(h, Lp-1)} w[i]`` with ``Lp = w.shape[dim]``:
    the P-sums of ``w`` zero-padded by P - 1 on both sides (L = Lp + P - 1 of them)."""
    if P == 1:
        return w
    pad = [0, 0] * (w.dim() - 1 - dim) + [P - 1, P - 1]
    return _window_sums(F.pad(w, pad), P, dim)


def window_logits(x: torch.Tensor, y: torch.Tensor, P: int, a: float, scale: float) -> torch.Tensor:
    """``-||x|_w - a*y|_w||^2 * scale`` for every window: ``[b, c, H-P+1, W-P+1]`` (float64 inputs)."""
    # channel by channel into one [b, c, H, W] buffer: no [b, c, C, H, W] temporaries
    ay = a * y
    e = None
    for ch in range(x.shape[1]):
        d = x[:, None, ch] - ay[None, :, ch]
        e = d.mul_(d) if e is None else e.addcmul_(d, d)
    return _window_sums(_window_sums(e, P, 2), P, 3).mul_(-scale)


def patch_posterior_denoise_boxsum(
    x: torch.Tensor,
    train: torch.Tensor,
    patch_size: int,
    alpha_bar: float,
    temperature: float = 1.0,
    chunk_size: int = 256,
) -> torch.Tensor:
    B, C, H, W = x.shape
    N = train.shape[0]
    P = int(patch_size)
    if P == H and P == W:  # one window, the whole image: the optimal denoiser (§6.1), fastest backend
        impl = registry.select("optimal_denoise", x.device).fn
        out = impl(x.reshape(B, -1), train.reshape(N, -1), alpha_bar, temperature, chunk_size, False)
        return out.reshape(x.shape).to(x.dtype)
    Hp, Wp = H - P + 1, W - P + 1
    n = C * H * W
    a, s2 = noise_level(alpha_bar)
    scale = 1.0 / (2.0 * s2 * temperature)
    dt = torch.float64
    xf = x.to(dt)
    chunk = max(1, min(chunk_size, _BLOCK_VALUES // (B * n)))
    cache = B * N * Hp * Wp <= _CACHE_VALUES
    kept = []
    # pass 1: running max and normaliser per (query, window)
    mx = torch.full((B, Hp, Wp), -torch.inf, dtype=dt, device=x.device)
    l = torch.zeros(B, Hp, Wp, dtype=dt, device=x.device)
    # (cached: exp(logit - the running max of its chunk) and that max, so pass 2 rescales
    # instead of taking a second exp)
    for k0 in range(0, N, chunk):
        y = to_unit(train[k0 : k0 + chunk], dt)
        lg = window_logits(xf, y, P, a, scale)
        new = torch.maximum(mx, lg.amax(1))
        ex = lg.sub_(new[:, None]).exp_()
        if cache:
            kept.append((ex, new))
        l = l * torch.exp(mx - new) + ex.sum(1)
        mx = new
    # pass 2: final weights, summed over the windows covering each pixel, times y
    out = torch.zeros(B, C, H, W, dtype=dt, device=x.device)
    for i, k0 in enumerate(range(0, N, chunk)):
        y = to_unit(train[k0 : k0 + chunk], dt)
        if cache:
            ex, m_i = kept[i]
            w = ex.mul_((torch.exp(m_i - mx) / l)[:, None])  # [b, c, Hp, Wp]
        else:
            w = window_logits(xf, y, P, a, scale).sub_(mx[:, None]).exp_().div_(l[:, None])
        cover = _cover_sums(_cover_sums(w, P, 2, H), P, 3, W)  # [b, c, H, W]
        # out[b, d] += sum_k cover[b, k] * y[k, d], pixel by pixel: per (query, channel) a
        # product-and-reduce over the chunk (einsum would batch 1-pixel matmuls over H*W)
        for b in range(B):
            out[b] += (cover[b][:, None] * y).sum(0)
    ones = torch.ones(1, 1, Hp, Wp, dtype=dt, device=x.device)
    count = _cover_sums(_cover_sums(ones, P, 2, H), P, 3, W)[0, 0]
    return (out / count).to(x.dtype)


registry.register("patch_posterior_denoise", "boxsum", patch_posterior_denoise_boxsum, priority=5)
