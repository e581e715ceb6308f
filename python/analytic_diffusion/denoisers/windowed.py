"""The windowed Wiener denoiser: the Wiener filter restricted to k x k windows, from
stationary patch moments (docs/algorithms.md §9)."""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

from .._validate import check_threshold
from ..filters import WindowedWiener
from ..ops import Moments
from .base import Denoiser


class WindowedWienerDenoiser(Denoiser):
    """``den(x_t, t) -> x0_hat`` with the windowed Wiener filter (see :class:`WindowedWiener`).

    Args:
        patch_moments: patch :class:`Moments` (``kind == "patch"``), or a
            :class:`WindowedWiener` built from them (shared kernel cache).
        image_shape: optional default ``(C, H, W)`` (needed only for flat ``[B, n]``
            input and for :meth:`sensitivity` without an explicit shape); ``x_t`` of any
            ``H, W`` works.
        alphas_cumprod: the schedule (default: docs/algorithms.md §1's linear schedule).

    ``x_t``: float32/float64 ``[B, C, H, W]``; the output has its shape and dtype.
    """

    name = "windowed-wiener"

    def __init__(self, patch_moments: Union[Moments, WindowedWiener], *, image_shape: Optional[Sequence[int]] = None, alphas_cumprod: Optional[torch.Tensor] = None):
        super().__init__(alphas_cumprod)
        if isinstance(patch_moments, WindowedWiener):
            self.filter = patch_moments
        elif isinstance(patch_moments, Moments):
            self.filter = WindowedWiener(patch_moments)
        else:
            raise TypeError(f"patch_moments must be analytic_diffusion.Moments (kind 'patch') or WindowedWiener, got {type(patch_moments).__name__}")
        self.image_shape = None if image_shape is None else self.filter._shape(image_shape)

    def denoise(self, x, t, alpha_bar):
        if x.dim() == 2:
            shape = self.image_shape or self.filter.image_shape
            if shape is None:
                raise ValueError("x_t is flat [B, n]: give the denoiser an image_shape, or pass x_t as [B, C, H, W]")
            if x.shape[1] != shape[0] * shape[1] * shape[2]:
                raise ValueError(f"x_t has {x.shape[1]} values per image, but image_shape {tuple(shape)} has {shape[0] * shape[1] * shape[2]}")
            return self.filter.apply(x.reshape(x.shape[0], *shape), alpha_bar).reshape(x.shape)
        return self.filter.apply(x, alpha_bar)

    def sensitivity(self, t, pixels, *, image_shape: Optional[Sequence[int]] = None) -> torch.Tensor:
        """Jacobian rows (sensitivity fields) for flat output pixels: float64 ``[P, C, H, W]``."""
        return self.filter.sensitivity(self.alpha_bar(t), pixels, image_shape or self.image_shape)

    def mask(self, t, *, threshold: float = 0.02, device=None) -> torch.Tensor:
        """The compact window pattern at timestep ``t`` (see :meth:`WindowedWiener.mask`)."""
        return self.filter.mask(self.alpha_bar(t), check_threshold(threshold)).to(device or "cpu")
