"""The nearest image of a shard of the training set, mergeable across shards: per query
its float64 distance ``||x - a y||^2``, its index and the image itself. Two shards merge
by the smaller distance; equal distances go to the lower index, i.e. the earlier shard
(``torch.argmin``'s rule over the concatenated training set)."""
from __future__ import annotations

from typing import NamedTuple

import torch

__all__ = ["NearestState", "merge_nearest", "all_reduce_nearest"]


class NearestState(NamedTuple):
    """``dist``: float64 ``[B]``, the distance to the nearest image; ``index``: int64 ``[B]``,
    its index in the training set (a shard's own numbering until merged); ``image``:
    ``[B, n]`` in the query's dtype, the image in [-1, 1] (``result()``)."""

    dist: torch.Tensor
    index: torch.Tensor
    image: torch.Tensor

    def result(self) -> torch.Tensor:
        """The denoised values (the nearest images): ``[B, n]``."""
        return self.image


def merge_nearest(*states: NearestState, sizes=None) -> NearestState:
    """Merge the states of consecutive shards of one training set, in order. ``sizes``:
    the shards' image counts, to renumber ``index`` globally (None: keep each shard's own
    indices). The smaller distance wins; on a tie the earlier shard does."""
    if not states:
        raise ValueError("merge_nearest needs at least one state")
    offsets = [0] * len(states)
    if sizes is not None:
        if len(sizes) != len(states):
            raise ValueError(f"sizes has {len(sizes)} entries for {len(states)} states")
        for i in range(1, len(states)):
            offsets[i] = offsets[i - 1] + int(sizes[i - 1])
    dist, index, image = states[0].dist, states[0].index + offsets[0], states[0].image
    for s, off in zip(states[1:], offsets[1:]):
        better = s.dist < dist  # strict: the earlier shard keeps a tie
        dist = torch.where(better, s.dist, dist)
        index = torch.where(better, s.index + off, index)
        image = torch.where(better[:, None], s.image, image)
    return NearestState(dist, index, image)


def all_reduce_nearest(state: NearestState, num_images: int, group=None) -> NearestState:
    """Merge the states of every rank of ``group`` (torch.distributed), rank r holding the
    r-th consecutive shard of the training set (``num_images`` images): the global nearest
    image, on ties the lowest global index, i.e. the lowest rank. Every rank gets the
    merged state, ``index`` numbered over the whole training set; the input is not
    modified. Collectives: a MIN all-reduce of the distances, a MIN all-reduce of the
    winning rank, SUM all-reduces of the shard sizes and of the images (the winner's only,
    so the sum is exact). Works with gloo (CPU tensors) and NCCL (GPU tensors)."""
    import torch.distributed as dist

    world = dist.get_world_size(group)
    rank = dist.get_rank(group)
    dev = state.dist.device
    sizes = torch.zeros(world, dtype=torch.int64, device=dev)
    sizes[rank] = int(num_images)
    dist.all_reduce(sizes, group=group)
    offset = int(sizes[:rank].sum())
    best = state.dist.clone()
    dist.all_reduce(best, op=dist.ReduceOp.MIN, group=group)
    mine = state.dist == best
    winner = torch.where(mine, torch.full_like(state.index, rank), torch.full_like(state.index, world))
    dist.all_reduce(winner, op=dist.ReduceOp.MIN, group=group)
    won = winner == rank
    image = torch.where(won[:, None], state.image, torch.zeros_like(state.image))
    index = torch.where(won, state.index + offset, torch.zeros_like(state.index))
    dist.all_reduce(image, group=group)
    dist.all_reduce(index, group=group)
    return NearestState(best, index, image)
