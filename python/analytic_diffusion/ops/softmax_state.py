"""The mergeable online-softmax state shared by the softmax denoiser ops (docs/algorithms.md §5).

A shard of the training set (a chunk, a thread's block, a split, another process's
images) reduces to a triple per output value: the running max ``mx`` of the logits,
``l = sum exp(logit - mx)`` and ``acc = sum exp(logit - mx) * y``. Two triples merge
exactly, whatever order the shards come in, so the result never depends on how the
training set was split. States returned to users are float64 whatever the query dtype:
a float32 ``l`` would lose the small contributions that a later merge may need.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

__all__ = ["SoftmaxState", "merge_states", "all_reduce_state", "online_update"]


class SoftmaxState(NamedTuple):
    """Partial online-softmax state, mergeable across shards of the training set.

    ``mx``: running max of the logits, ``l``: ``sum exp(logit - mx)``,
    ``acc``: ``sum exp(logit - mx) * y``. For the locality op all three are
    ``[B, n]``; for the optimal op ``mx`` and ``l`` are ``[B, 1]``. The ops return
    them as float64.
    """

    mx: torch.Tensor
    l: torch.Tensor
    acc: torch.Tensor

    def result(self) -> torch.Tensor:
        """The denoised values ``acc / l``: ``[B, n]``."""
        return self.acc / self.l

    def double(self) -> "SoftmaxState":
        """The same state in float64 (a no-op for float64 fields)."""
        return SoftmaxState(*(t.to(torch.float64) for t in self))


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
    that rank's shard of the training set: the merge of :func:`merge_states` as
    collectives (a MAX all-reduce of ``mx``, then SUM all-reduces of the rescaled ``l``
    and ``acc``). Every rank gets the merged state; the inputs are not modified. Works
    with gloo (CPU tensors) and NCCL (GPU tensors)."""
    import torch.distributed as dist

    mx = state.mx.clone()
    dist.all_reduce(mx, op=dist.ReduceOp.MAX, group=group)
    corr = torch.exp(state.mx - mx)  # a rank with no images has mx = -inf: corr = 0
    corr = torch.nan_to_num(corr, nan=0.0)  # -inf - -inf: every rank empty for this output
    l, acc = state.l * corr, state.acc * corr
    dist.all_reduce(l, group=group)
    dist.all_reduce(acc, group=group)
    return SoftmaxState(mx, l, acc)


def online_update(state: Optional[SoftmaxState], logits: torch.Tensor, y: torch.Tensor, einsum: str) -> SoftmaxState:
    """Fold one chunk of logits ``[b, c, ...]`` (softmax over dim 1) with values ``y [c, n]``
    into ``state`` (None for the first chunk); ``einsum`` contracts the weights with ``y``."""
    cmx = logits.amax(1)
    mx = cmx if state is None else torch.maximum(state.mx, cmx)
    p = torch.exp(logits - mx.unsqueeze(1))
    l_c = p.sum(1)
    acc_c = torch.einsum(einsum, p, y)
    if state is None:
        return SoftmaxState(mx, l_c, acc_c)
    corr = torch.exp(state.mx - mx)
    return SoftmaxState(mx, state.l * corr + l_c, state.acc * corr + acc_c)
