"""Denoiser ops: validated public entry points dispatching to registered backends.

Shapes: ``x`` float32/float64 ``[B, n]`` or ``[B, C, H, W]`` (outputs have x's
shape and dtype); ``train`` uint8 or float in [-1, 1], ``[N, n]`` or
``[N, C, H, W]``; ``mask`` ``[n, n]``, column m the window of output pixel m;
``alpha_bar`` a Python float in (0, 1).
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import _registry
from .._validate import (
    check_alpha_bar,
    check_chunk_size,
    check_mask,
    check_positive,
    check_queries,
    check_same_device,
    check_train,
)
from ._reference import (
    SoftmaxState,
    all_reduce_state,
    locality_denoise_reference,
    merge_states,
    nearest_denoise_reference,
    optimal_denoise_reference,
)

__all__ = [
    "SoftmaxState",
    "all_reduce_state",
    "locality_denoise",
    "locality_denoise_reference",
    "merge_states",
    "nearest_denoise",
    "nearest_denoise_reference",
    "optimal_denoise",
    "optimal_denoise_reference",
]

_registry.register("locality_denoise", "reference", locality_denoise_reference, priority=0)
_registry.register("optimal_denoise", "reference", optimal_denoise_reference, priority=0)
_registry.register("nearest_denoise", "reference", nearest_denoise_reference, priority=0)

_SOFTMAX_MODES = ("exact", "wssm")


def _flat(x: torch.Tensor, train: torch.Tensor):
    n = x[0].numel()
    return x.reshape(x.shape[0], n), train.reshape(train.shape[0], n)


def _check_common(x, train):
    x = check_queries(x)
    train = check_train(train, x[0].numel(), tuple(x.shape[1:]) if x.dim() == 4 else None)
    return x, train


def _finish(out, x: torch.Tensor, return_state: bool):
    return out if return_state else out.reshape(x.shape)


def locality_denoise(
    x,
    train,
    mask,
    alpha_bar: float,
    temperature: float = 1.0,
    softmax: str = "exact",
    chunk_size: int = 256,
    backend: Optional[str] = None,
    return_state: bool = False,
):
    """The paper's locality denoiser (SPEC 5): a per-pixel softmax over training images
    of distances restricted to each pixel's window.

    ``softmax="exact"``: one global softmax over all N images (independent of
    ``chunk_size``). ``softmax="wssm"``: the published code's mean of per-chunk
    softmaxes over chunks of ``chunk_size`` images in the given order.
    ``return_state=True`` (exact mode) returns the mergeable :class:`SoftmaxState`
    with ``[B, n]`` fields instead of the output.
    Returns the predicted clean image, x's shape and dtype.
    """
    x, train = _check_common(x, train)
    n = x[0].numel()
    mask = check_mask(mask, n)
    ab = check_alpha_bar(alpha_bar)
    tau = check_positive("temperature", temperature)
    if softmax not in _SOFTMAX_MODES:
        raise ValueError(f"softmax must be one of {_SOFTMAX_MODES}, got {softmax!r}")
    chunk_size = check_chunk_size(chunk_size)
    if return_state and softmax != "exact":
        raise ValueError("return_state=True needs softmax='exact' (WSSM chunks do not merge exactly)")
    check_same_device(x=x, train=train, mask=mask)
    impl = _registry.select("locality_denoise", x.device, backend).fn
    x2, t2 = _flat(x, train)
    return _finish(impl(x2, t2, mask, ab, tau, softmax, chunk_size, return_state), x, return_state)


def optimal_denoise(
    x,
    train,
    alpha_bar: float,
    temperature: float = 1.0,
    backend: Optional[str] = None,
    chunk_size: int = 256,
    return_state: bool = False,
):
    """The empirical optimal (memorising) denoiser (SPEC 6), exact over all N images.

    Returns x's shape and dtype, or a :class:`SoftmaxState` (``mx``, ``l``: ``[B, 1]``;
    ``acc``: ``[B, n]``) with ``return_state=True``.
    """
    x, train = _check_common(x, train)
    ab = check_alpha_bar(alpha_bar)
    tau = check_positive("temperature", temperature)
    chunk_size = check_chunk_size(chunk_size)
    check_same_device(x=x, train=train)
    impl = _registry.select("optimal_denoise", x.device, backend).fn
    x2, t2 = _flat(x, train)
    return _finish(impl(x2, t2, ab, tau, chunk_size, return_state), x, return_state)


def nearest_denoise(x, train, alpha_bar: float, backend: Optional[str] = None, chunk_size: int = 256):
    """The nearest training image to ``x / a`` (SPEC 6), as x's shape and dtype."""
    x, train = _check_common(x, train)
    ab = check_alpha_bar(alpha_bar)
    chunk_size = check_chunk_size(chunk_size)
    check_same_device(x=x, train=train)
    impl = _registry.select("nearest_denoise", x.device, backend).fn
    x2, t2 = _flat(x, train)
    return impl(x2, t2, ab, chunk_size).reshape(x.shape)
