"""``els_denoise``: the equivariant local score machine of Kamb & Ganguli, circular (ELS) or
zero-padded (bbELS) (docs/algorithms.md §10, docs/algorithms.md §10).

Validated public entry dispatching to the registered backends (``reference.py`` and the
compiled ``cpu.py`` and ``triton.py`` in this folder)."""
from __future__ import annotations

import operator
from typing import Optional

from ... import registry
from ..._validate import (
    check_alpha_bar,
    check_chunk_size,
    check_positive,
    check_queries,
    check_same_device,
    check_train,
)
from .reference import axis_groups, els_denoise_reference, els_groups

__all__ = ["PADDINGS", "check_patch_size", "els_denoise", "els_denoise_reference", "els_groups", "axis_groups"]

registry.register("els_denoise", "reference", els_denoise_reference, priority=0)

PADDINGS = ("circular", "zeros")


def check_patch_size(patch_size, height: int, width: int, padding: str, name: str = "patch_size") -> int:
    """An odd int >= 1; circular ELS needs at least one fully-inside patch (P <= min(H, W));
    zero padding allows up to 2*max(H, W) - 1 (beyond that nothing changes)."""
    if isinstance(patch_size, bool):
        raise TypeError(f"{name} must be an odd int, got bool")
    try:
        P = operator.index(patch_size)
    except TypeError:
        raise TypeError(f"{name} must be an odd int, got {type(patch_size).__name__} {patch_size!r}") from None
    if P < 1 or P % 2 == 0:
        raise ValueError(f"{name} must be an odd positive int (patches are centred), got {P}")
    if padding == "circular" and P > min(height, width):
        raise ValueError(
            f"{name} = {P} is larger than the {height}x{width} image: circular ELS needs fully-inside "
            f"training patches (P <= {min(height, width)}); use padding='zeros' (bbELS, LS for P >= H)"
        )
    if P > 2 * max(height, width) - 1:
        raise ValueError(f"{name} = {P} is larger than 2*max(H, W)-1 = {2 * max(height, width) - 1} for {height}x{width} images")
    return P


def els_denoise(
    x,
    train,
    patch_size: int,
    alpha_bar: float,
    *,
    padding: str = "circular",
    temperature: float = 1.0,
    chunk_size: int = 64,
    backend: Optional[str] = None,
    return_state: bool = False,
):
    """The ELS machine's denoiser (docs/algorithms.md §10): for each pixel p, the softmax over its
    candidate patches q (every training image) of ``-||Q_p(x) - a*q||^2 / (2*s2*tau)``, and
    ``x0_hat[:, p]`` = the weighted centre pixels of the candidates.

    ``x``: float32/float64 ``[B, C, H, W]``; ``train``: uint8 or float in [-1, 1]
    ``[N, C, H, W]``; ``patch_size``: odd P; ``padding``: ``"circular"`` (ELS: every
    fully-inside patch is a candidate of every pixel, x wraps around) or ``"zeros"`` (bbELS:
    corners like LS, edges slide along the edge, interior ELS; P >= H, W is LS).
    ``chunk_size``: training images per block (memory only; the result does not depend on
    it). ``return_state``: a float64 :class:`SoftmaxState` with flat ``[B, C*H*W]`` fields,
    mergeable across shards of the training set. Returns x's shape and dtype.
    """
    x = check_queries(x)
    if x.dim() != 4:
        raise ValueError(f"x must be images [B, C, H, W] (patches are spatial), got shape {tuple(x.shape)}")
    train = check_train(train, x[0].numel(), tuple(x.shape[1:]))
    if train.dim() != 4:
        raise ValueError(f"train must be images [N, C, H, W], got shape {tuple(train.shape)}")
    if padding not in PADDINGS:
        raise ValueError(f"padding must be one of {PADDINGS} ('circular': ELS, 'zeros': bbELS), got {padding!r}")
    _, C, H, W = x.shape
    P = check_patch_size(patch_size, H, W, padding)
    ab = check_alpha_bar(alpha_bar)
    tau = check_positive("temperature", temperature)
    chunk_size = check_chunk_size(chunk_size)
    check_same_device(x=x, train=train)
    impl = registry.select("els_denoise", x.device, backend).fn
    return impl(x, train, P, ab, padding, tau, chunk_size, bool(return_state))


from . import cpu as _cpu  # noqa: E402,F401  (registers the compiled backend where it is defined)
from . import triton as _triton_backend  # noqa: E402,F401  (registers the Triton backend; Triton is imported lazily)
