"""``nearest_denoise``: the validated public entry dispatching to the registered backends
(``reference.py`` and the compiled ``cpu.py`` in this folder)."""
from __future__ import annotations

from typing import Optional

from ... import registry
from ..._validate import check_alpha_bar, check_chunk_size, check_queries_and_train, check_same_device
from .reference import nearest_denoise_reference, nearest_topk_reference
from .state import NearestState, all_reduce_nearest, merge_nearest

__all__ = ["NearestState", "all_reduce_nearest", "merge_nearest", "nearest_denoise", "nearest_denoise_reference", "nearest_topk", "nearest_topk_reference"]

registry.register("nearest_denoise", "reference", nearest_denoise_reference, priority=0)
registry.register("nearest_topk", "reference", nearest_topk_reference, priority=0)


def nearest_denoise(x, train, alpha_bar: float, *, chunk_size: int = 256, backend: Optional[str] = None, return_state: bool = False,
                    scaled: bool = True):
    """The nearest training image to ``x / a`` (docs/algorithms.md §6), as x's shape and dtype;
    the first one (lowest index) on ties.

    ``scaled=False``: the nearest by ``||x - y_k||`` instead of ``||x - a y_k||`` (the
    locality paper's ``nearest_dataset`` baseline, docs/algorithms.md §8.2); ``alpha_bar`` is
    then checked but not used.

    ``return_state=True`` returns a :class:`NearestState` instead (float64 distances
    ``[B]``, indices ``[B]``, images ``[B, n]``), mergeable across shards of the training
    set (:func:`merge_nearest`, :func:`all_reduce_nearest`).
    """
    x, train, x2, t2 = check_queries_and_train(x, train)
    ab = check_alpha_bar(alpha_bar)
    if not isinstance(scaled, bool):
        raise TypeError(f"scaled must be a bool, got {type(scaled).__name__}")
    if not scaled:
        ab = 1.0  # the backends compute ||x - sqrt(ab) y||^2: ab = 1 is the unscaled distance
    chunk_size = check_chunk_size(chunk_size)
    check_same_device(x=x, train=train)
    impl = registry.select("nearest_denoise", x.device, backend).fn
    if return_state:
        return impl(x2, t2, ab, chunk_size, True)
    return impl(x2, t2, ab, chunk_size).reshape(x.shape)


def nearest_topk(x, train, alpha_bar: float, k: int, *, chunk_size: int = 256, backend: Optional[str] = None):
    """The ``k`` training images nearest to ``x / a`` (docs/algorithms.md §6.2, §11): returns
    ``(indices, sqdist)``, int64 and float64 ``[B, k]``, ascending in ``||x - a*y||^2`` (the
    lower index first on ties). ``k`` is clamped to N. Chunked over N: never an N x n temporary."""
    x, train, x2, t2 = check_queries_and_train(x, train)
    ab = check_alpha_bar(alpha_bar)
    if isinstance(k, bool) or int(k) != k or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    chunk_size = check_chunk_size(chunk_size)
    check_same_device(x=x, train=train)
    impl = registry.select("nearest_topk", x.device, backend).fn
    return impl(x2, t2, ab, min(int(k), t2.shape[0]), chunk_size)


# The backends register where they are defined; importing them here makes them visible.
from . import cpu as _cpu_backend  # noqa: E402,F401
