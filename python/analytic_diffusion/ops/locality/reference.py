"""Reference implementations of ``locality_denoise`` and ``optimal_denoise``: pure
PyTorch, float64-capable.

These are the executable form of docs/algorithms.md §5 and §6. They favour clarity over speed
(they form ``[B, chunk, n]`` squared differences and multiply by the dense mask,
like the published code) but use the exact online softmax, direct differences
``(x - a*y)^2`` (never the cancelling expanded form), and bounded memory.
Every backend is tested against them.

Backend signature (inputs already validated by the public op):
``x [B, n]`` float32/float64, ``train [N, n]`` uint8 or float in [-1, 1],
``mask [n, n]`` bool or float (column m is the window of output pixel m).
Computation happens in x's dtype (float64 for float64 queries); returned states are
float64.
"""
from __future__ import annotations



import torch

from ..._validate import compute_dtype, to_unit
from ..softmax_state import SoftmaxState, online_update
from ...schedule import noise_level

_BLOCK_VALUES = 1 << 24  # bound on the [B, chunk, n] temporaries, in elements


def query_blocks(B: int, per_query: int):
    step = max(1, _BLOCK_VALUES // max(1, per_query))
    return [(i, min(B, i + step)) for i in range(0, B, step)]


def locality_denoise_reference(
    x: torch.Tensor,
    train: torch.Tensor,
    mask: torch.Tensor,
    alpha_bar: float,
    temperature: float = 1.0,
    softmax: str = "exact",
    chunk_size: int = 256,
    return_state: bool = False,
):
    """docs/algorithms.md §5. ``out[b, m] = sum_k softmax_k(-d[b, k, m] / (2 s2 tau)) y[k, m]`` with
    ``d[b, k, m] = sum_j M[j, m] (x[b, j] - a y[k, j])^2``.

    Returns ``[B, n]`` in x's dtype, or a :class:`SoftmaxState` (exact mode).
    """
    dt = compute_dtype(x)
    B, n = x.shape
    N = train.shape[0]
    a, s2 = noise_level(alpha_bar)
    scale = 1.0 / (2.0 * s2 * temperature)
    M = mask.to(dt)
    xf = x.to(dt)
    if softmax == "exact":
        # chunking is only a memory knob here: the result does not depend on it
        chunk = max(1, min(chunk_size, _BLOCK_VALUES // (B * n)))
        outs = []
        for b0, b1 in query_blocks(B, chunk * n):
            st = None
            for k0 in range(0, N, chunk):
                y = to_unit(train[k0 : k0 + chunk], dt)
                logits = -((xf[b0:b1, None, :] - a * y) ** 2 @ M) * scale  # [b, c, n]
                st = online_update(st, logits, y, "bcn,cn->bn")
            outs.append(st)
        state = SoftmaxState(*(torch.cat(parts) for parts in zip(*outs)))
        return state.double() if return_state else state.result().to(x.dtype)
    # WSSM: the mean of per-chunk softmax means, as in the paper's code (chunks are semantic)
    num = torch.zeros(B, n, dtype=dt, device=x.device)
    den = torch.zeros(B, n, dtype=dt, device=x.device)
    for k0 in range(0, N, chunk_size):
        y = to_unit(train[k0 : k0 + chunk_size], dt)
        for b0, b1 in query_blocks(B, y.shape[0] * n):
            logits = -((xf[b0:b1, None, :] - a * y) ** 2 @ M) * scale
            w = torch.softmax(logits, dim=1)
            num[b0:b1] += torch.einsum("bcn,cn->bn", w, y)
            den[b0:b1] += w.sum(1)
    return (num / (den + 1e-8)).to(x.dtype)


def optimal_denoise_reference(
    x: torch.Tensor,
    train: torch.Tensor,
    alpha_bar: float,
    temperature: float = 1.0,
    chunk_size: int = 256,
    return_state: bool = False,
):
    """docs/algorithms.md §6: ``out = sum_k softmax_k(-||x - a y_k||^2 / (2 s2 tau)) y_k`` over all N, exact."""
    dt = compute_dtype(x)
    B, n = x.shape
    a, s2 = noise_level(alpha_bar)
    scale = 1.0 / (2.0 * s2 * temperature)
    xf = x.to(dt)
    chunk = max(1, min(chunk_size, _BLOCK_VALUES // (B * n)))
    st = None
    for k0 in range(0, train.shape[0], chunk):
        y = to_unit(train[k0 : k0 + chunk], dt)
        logits = -((xf[:, None, :] - a * y) ** 2).sum(-1, keepdim=True) * scale  # [B, c, 1]
        st = online_update(st, logits, y, "bcz,cn->bn")
    return st.double() if return_state else st.result().to(x.dtype)
