"""``locality_denoise`` and ``optimal_denoise``: validated public entries dispatching to the
registered backends (``reference.py``, ``cpu.py``, ``triton.py`` in this folder).

The optimal denoiser is the locality denoiser whose windows are all the whole image, so the
two ops share their kernels. Shapes: ``x`` float32/float64 ``[B, n]`` or ``[B, C, H, W]``
(outputs have x's shape and dtype); ``train`` uint8 or float in [-1, 1], ``[N, n]`` or
``[N, C, H, W]``; ``mask`` ``[n, n]``, column m the window of output pixel m; ``alpha_bar``
a Python float in (0, 1).
"""
from __future__ import annotations

from typing import Optional

from ... import registry
from ..._validate import (
    check_alpha_bar,
    check_chunk_size,
    check_mask,
    check_positive,
    check_queries_and_train,
    check_same_device,
)
from .reference import locality_denoise_reference, optimal_denoise_reference

__all__ = ["locality_denoise", "optimal_denoise", "locality_denoise_reference", "optimal_denoise_reference"]

registry.register("locality_denoise", "reference", locality_denoise_reference, priority=0)
registry.register("optimal_denoise", "reference", optimal_denoise_reference, priority=0)

SOFTMAX_MODES = ("exact", "wssm")


def locality_denoise(
    x,
    train,
    mask,
    alpha_bar: float,
    *,
    temperature: float = 1.0,
    softmax: str = "exact",
    chunk_size: int = 256,
    backend: Optional[str] = None,
    return_state: bool = False,
):
    """The paper's locality denoiser (docs/algorithms.md §5): a per-pixel softmax over
    training images of distances restricted to each pixel's window.

    ``softmax="exact"``: one global softmax over all N images (independent of
    ``chunk_size``). ``softmax="wssm"``: the published code's mean of per-chunk
    softmaxes over chunks of ``chunk_size`` images in the given order.
    ``return_state=True`` (exact mode) returns the mergeable :class:`SoftmaxState`
    (float64 ``[B, n]`` fields) instead of the output.
    Returns the predicted clean image, x's shape and dtype.
    """
    x, train, x2, t2 = check_queries_and_train(x, train)
    mask = check_mask(mask, x2.shape[1])
    ab = check_alpha_bar(alpha_bar)
    tau = check_positive("temperature", temperature)
    if softmax not in SOFTMAX_MODES:
        raise ValueError(f"softmax must be one of {SOFTMAX_MODES}, got {softmax!r}")
    chunk_size = check_chunk_size(chunk_size)
    if return_state and softmax != "exact":
        raise ValueError("return_state=True needs softmax='exact' (WSSM chunks do not merge exactly)")
    check_same_device(x=x, train=train, mask=mask)
    impl = registry.select("locality_denoise", x.device, backend).fn
    out = impl(x2, t2, mask, ab, tau, softmax, chunk_size, return_state)
    return out if return_state else out.reshape(x.shape)


def optimal_denoise(
    x,
    train,
    alpha_bar: float,
    *,
    temperature: float = 1.0,
    chunk_size: int = 256,
    backend: Optional[str] = None,
    return_state: bool = False,
):
    """The empirical optimal (memorising) denoiser (docs/algorithms.md §6), exact over all N images.

    Returns x's shape and dtype, or a :class:`SoftmaxState` (float64; ``mx``, ``l``:
    ``[B, 1]``; ``acc``: ``[B, n]``) with ``return_state=True``.
    """
    x, train, x2, t2 = check_queries_and_train(x, train)
    ab = check_alpha_bar(alpha_bar)
    tau = check_positive("temperature", temperature)
    chunk_size = check_chunk_size(chunk_size)
    check_same_device(x=x, train=train)
    impl = registry.select("optimal_denoise", x.device, backend).fn
    out = impl(x2, t2, ab, tau, chunk_size, return_state)
    return out if return_state else out.reshape(x.shape)


# The backends register where they are defined; importing them here makes them visible.
from . import cpu as _cpu_backend  # noqa: E402,F401
from . import triton as _triton_backend  # noqa: E402,F401
