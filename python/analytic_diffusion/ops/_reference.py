"""Reference implementations of the denoiser ops: pure PyTorch, float64-capable.

These are the executable form of SPEC 5 and 6. They favour clarity over speed
(they form ``[B, chunk, n]`` squared differences and multiply by the dense mask,
like the published code) but use the exact online softmax, direct differences
``(x - a*y)^2`` (never the cancelling expanded form), and bounded memory.
Every backend is tested against them.

Backend signature (inputs already validated by the public op):
``x [B, n]`` float32/float64, ``train [N, n]`` uint8 or float in [-1, 1],
``mask [n, n]`` bool or float (column m is the window of output pixel m).
Computation happens in x's dtype (float64 for float64 queries).
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch

from .._validate import compute_dtype, to_unit

_BLOCK_VALUES = 1 << 24  # bound on the [B, chunk, n] temporaries, in elements


class SoftmaxState(NamedTuple):
    """Partial online-softmax state (SPEC 5), mergeable across shards of the training set.

    ``mx``: running max of the logits, ``l``: ``sum exp(logit - mx)``,
    ``acc``: ``sum exp(logit - mx) * y``. For the locality op all three are
    ``[B, n]``; for the optimal op ``mx`` and ``l`` are ``[B, 1]``.
    """

    mx: torch.Tensor
    l: torch.Tensor
    acc: torch.Tensor

    def result(self) -> torch.Tensor:
        return self.acc / self.l


def merge_states(*states: SoftmaxState) -> SoftmaxState:
    """Exact merge: ``mx = max``, ``l`` and ``acc`` rescaled by ``exp(mx_i - mx)``."""
    if not states:
        raise ValueError("merge_states needs at least one state")
    mx = states[0].mx
    for s in states[1:]:
        mx = torch.maximum(mx, s.mx)
    l = sum(s.l * torch.exp(s.mx - mx) for s in states)
    acc = sum(s.acc * torch.exp(s.mx - mx) for s in states)
    return SoftmaxState(mx, l, acc)


def all_reduce_state(state: SoftmaxState, group=None) -> SoftmaxState:
    """Merge the states of every rank of ``group`` (torch.distributed), each computed on
    that rank's shard of the training set: the SPEC 5 merge as collectives (a MAX
    all-reduce of ``mx``, then SUM all-reduces of the rescaled ``l`` and ``acc``).
    Every rank gets the merged state; the inputs are not modified. Works with gloo
    (CPU tensors) and NCCL (GPU tensors)."""
    import torch.distributed as dist

    mx = state.mx.clone()
    dist.all_reduce(mx, op=dist.ReduceOp.MAX, group=group)
    corr = torch.exp(state.mx - mx)  # a rank with no images has mx = -inf: corr = 0
    corr = torch.nan_to_num(corr, nan=0.0)  # -inf - -inf: every rank empty for this output
    l, acc = state.l * corr, state.acc * corr
    dist.all_reduce(l, group=group)
    dist.all_reduce(acc, group=group)
    return SoftmaxState(mx, l, acc)


def _query_blocks(B: int, per_query: int):
    step = max(1, _BLOCK_VALUES // max(1, per_query))
    return [(i, min(B, i + step)) for i in range(0, B, step)]


def _online_update(state: Optional[SoftmaxState], logits: torch.Tensor, y: torch.Tensor, einsum: str) -> SoftmaxState:
    """Fold one chunk of logits ``[b, c, ...]`` (softmax over dim 1) with values ``y [c, n]``."""
    cmx = logits.amax(1)
    mx = cmx if state is None else torch.maximum(state.mx, cmx)
    p = torch.exp(logits - mx.unsqueeze(1))
    l_c = p.sum(1)
    acc_c = torch.einsum(einsum, p, y)
    if state is None:
        return SoftmaxState(mx, l_c, acc_c)
    corr = torch.exp(state.mx - mx)
    return SoftmaxState(mx, state.l * corr + l_c, state.acc * corr + acc_c)


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
    """SPEC 5. ``out[b, m] = sum_k softmax_k(-d[b, k, m] / (2 s2 tau)) y[k, m]`` with
    ``d[b, k, m] = sum_j M[j, m] (x[b, j] - a y[k, j])^2``.

    Returns ``[B, n]`` in x's dtype, or a :class:`SoftmaxState` (exact mode).
    """
    dt = compute_dtype(x)
    B, n = x.shape
    N = train.shape[0]
    a, s2 = math.sqrt(alpha_bar), 1.0 - alpha_bar
    scale = 1.0 / (2.0 * s2 * temperature)
    M = mask.to(dt)
    xf = x.to(dt)
    if softmax == "exact":
        # chunking is only a memory knob here: the result does not depend on it
        chunk = max(1, min(chunk_size, _BLOCK_VALUES // (B * n)))
        outs = []
        for b0, b1 in _query_blocks(B, chunk * n):
            st = None
            for k0 in range(0, N, chunk):
                y = to_unit(train[k0 : k0 + chunk], dt)
                logits = -((xf[b0:b1, None, :] - a * y) ** 2 @ M) * scale  # [b, c, n]
                st = _online_update(st, logits, y, "bcn,cn->bn")
            outs.append(st)
        state = SoftmaxState(*(torch.cat(parts) for parts in zip(*outs)))
        return state if return_state else state.result().to(x.dtype)
    # WSSM: the mean of per-chunk softmax means, as in the paper's code (chunks are semantic)
    num = torch.zeros(B, n, dtype=dt, device=x.device)
    den = torch.zeros(B, n, dtype=dt, device=x.device)
    for k0 in range(0, N, chunk_size):
        y = to_unit(train[k0 : k0 + chunk_size], dt)
        for b0, b1 in _query_blocks(B, y.shape[0] * n):
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
    """SPEC 6: ``out = sum_k softmax_k(-||x - a y_k||^2 / (2 s2 tau)) y_k`` over all N, exact."""
    dt = compute_dtype(x)
    B, n = x.shape
    a, s2 = math.sqrt(alpha_bar), 1.0 - alpha_bar
    scale = 1.0 / (2.0 * s2 * temperature)
    xf = x.to(dt)
    chunk = max(1, min(chunk_size, _BLOCK_VALUES // (B * n)))
    st = None
    for k0 in range(0, train.shape[0], chunk):
        y = to_unit(train[k0 : k0 + chunk], dt)
        logits = -((xf[:, None, :] - a * y) ** 2).sum(-1, keepdim=True) * scale  # [B, c, 1]
        st = _online_update(st, logits, y, "bcz,cn->bn")
    return st if return_state else st.result().to(x.dtype)


def nearest_denoise_reference(x: torch.Tensor, train: torch.Tensor, alpha_bar: float, chunk_size: int = 256) -> torch.Tensor:
    """SPEC 6: ``y_{k*}``, ``k* = argmin_k ||x - a y_k||^2`` (the first index on ties)."""
    dt = compute_dtype(x)
    B, n = x.shape
    a = math.sqrt(alpha_bar)
    xf = x.to(dt)
    best = torch.full((B,), math.inf, dtype=dt, device=x.device)
    arg = torch.zeros(B, dtype=torch.long, device=x.device)
    chunk = max(1, min(chunk_size, _BLOCK_VALUES // (B * n)))
    for k0 in range(0, train.shape[0], chunk):
        d = ((xf[:, None, :] - a * to_unit(train[k0 : k0 + chunk], dt)) ** 2).sum(-1)  # [B, c]
        dmin, kmin = d.min(1)
        better = dmin < best  # strict: an earlier chunk keeps its tie
        best = torch.where(better, dmin, best)
        arg = torch.where(better, kmin + k0, arg)
    return to_unit(train[arg], x.dtype)
