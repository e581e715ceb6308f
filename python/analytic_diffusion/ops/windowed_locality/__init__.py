"""``windowed_locality_denoise``: the locality denoiser with one translation-invariant window
cut at the image border (docs/algorithms.md §9), never forming an n x n object.

Validated public entry dispatching to the registered backends (``reference.py`` here and
the compiled backends beside it)."""
from __future__ import annotations

from typing import Optional

import torch

from ... import registry
from ..._validate import (
    as_tensor,
    check_alpha_bar,
    check_chunk_size,
    check_positive,
    check_queries,
    check_same_device,
    check_train,
)
from .reference import window_distances, windowed_locality_denoise_reference

__all__ = ["check_window", "window_distances", "windowed_locality_denoise", "windowed_locality_denoise_reference"]

registry.register("windowed_locality_denoise", "reference", windowed_locality_denoise_reference, priority=0)

SOFTMAX_MODES = ("exact", "wssm")


def check_window(window, channels: int, height: int, width: int, name: str = "window") -> torch.Tensor:
    """``window``: bool ``[C, C, k, k]`` with odd k no larger than the image (2*H-1 rows and
    2*W-1 columns reach every pixel from every other, so nothing larger is meaningful)."""
    window = as_tensor(name, window)
    if window.dtype != torch.bool:
        raise TypeError(f"{name} must be a bool tensor [C, C, k, k] (True: the input pixel is in the window), got {window.dtype}")
    if window.dim() != 4 or window.shape[0] != channels or window.shape[1] != channels or window.shape[2] != window.shape[3]:
        raise ValueError(
            f"{name} must be [C, C, k, k] = [{channels}, {channels}, k, k] (output channel, input channel, offsets), "
            f"got shape {tuple(window.shape)}"
        )
    k = window.shape[-1]
    if k % 2 == 0:
        raise ValueError(f"{name} must have an odd size k (offsets centred at k//2), got k = {k}")
    if k > 2 * max(height, width) - 1:
        raise ValueError(f"{name} has k = {k}, larger than 2*max(H, W)-1 = {2 * max(height, width) - 1} for {height}x{width} images")
    return window


def windowed_locality_denoise(
    x,
    train,
    window,
    alpha_bar: float,
    *,
    temperature: float = 1.0,
    softmax: str = "exact",
    chunk_size: int = 256,
    backend: Optional[str] = None,
    return_state: bool = False,
):
    """The locality denoiser (docs/algorithms.md §5) with the window of docs/algorithms.md §9:
    output pixel ``(c, p)`` compares input pixels ``(c', p + o)`` for every ``W[c, c', o]`` with
    ``p + o`` inside the image.

    ``x``: float32/float64 ``[B, C, H, W]``; ``train``: uint8 or float in [-1, 1]
    ``[N, C, H, W]``; ``window``: bool ``[C, C, k, k]``, k odd, offset ``(i - k//2, j - k//2)``
    at ``[.., i, j]``. ``softmax``, ``chunk_size``, ``return_state`` as in
    :func:`~analytic_diffusion.ops.locality_denoise` (states are float64 ``[B, C*H*W]``).
    Memory O(B*n + N*n + C^2*k^2). Returns x's shape and dtype.
    """
    x = check_queries(x)
    if x.dim() != 4:
        raise ValueError(f"x must be images [B, C, H, W] (the window is spatial), got shape {tuple(x.shape)}")
    train = check_train(train, x[0].numel(), tuple(x.shape[1:]))
    if train.dim() != 4:
        raise ValueError(f"train must be images [N, C, H, W], got shape {tuple(train.shape)}")
    _, C, H, W = x.shape
    window = check_window(window, C, H, W)
    ab = check_alpha_bar(alpha_bar)
    tau = check_positive("temperature", temperature)
    if softmax not in SOFTMAX_MODES:
        raise ValueError(f"softmax must be one of {SOFTMAX_MODES}, got {softmax!r}")
    chunk_size = check_chunk_size(chunk_size)
    if return_state and softmax != "exact":
        raise ValueError("return_state=True needs softmax='exact' (WSSM chunks do not merge exactly)")
    check_same_device(x=x, train=train, window=window)
    impl = registry.select("windowed_locality_denoise", x.device, backend).fn
    return impl(x, train, window, ab, tau, softmax, chunk_size, return_state)


# The backends register where they are defined; importing them here makes them visible.
from . import cpu as _cpu_backend  # noqa: E402,F401
from . import triton as _triton_backend  # noqa: E402,F401
