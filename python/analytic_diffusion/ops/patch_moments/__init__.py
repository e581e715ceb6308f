"""The ``patch_moments`` op: stationary k x k patch mean and covariance (docs/algorithms.md §2.4)."""
from __future__ import annotations

from typing import Optional

import torch

from ..._validate import IMAGE_DTYPES, as_tensor, check_pixels, to_unit
from .. import streaming
from ..moments import MomentAccumulator, Moments
from .reference import patch_sums

__all__ = ["PatchMomentAccumulator", "estimate_patch_moments", "patch_sums"]


class PatchMomentAccumulator:
    """Stationary k x k patch moments (SPEC 2) over images ``[B, C, H, W]``.

    The patch vector at position p is the ``C*k*k`` values (C, then row, then
    column) of the window whose top-left corner is p, over every position where
    the window fits. Patches are never unfolded (see :func:`patch_sums`); uint8
    images give exact integer sums, float images float64 sums around a
    per-channel shift. Works on any device.
    """

    def __init__(self, channels: int, patch_size: int, *, device=None, backend: Optional[str] = None):
        if int(patch_size) != patch_size or patch_size < 1 or patch_size % 2 == 0:
            raise ValueError(f"patch_size must be a positive odd integer, got {patch_size!r}")
        if int(channels) != channels or channels < 1:
            raise ValueError(f"channels must be a positive integer, got {channels!r}")
        self.k, self.channels = int(patch_size), int(channels)
        self.inner = MomentAccumulator((self.channels, self.k, self.k), device=device, backend=backend)

    def update(self, images) -> "PatchMomentAccumulator":
        """Accumulate every k x k patch of ``images``: uint8 or float ``[B, C, H, W]``."""
        images = as_tensor("images", images)
        if images.dim() != 4 or images.shape[1] != self.channels:
            raise ValueError(f"images must be [B, {self.channels}, H, W], got shape {tuple(images.shape)}")
        if images.dtype not in IMAGE_DTYPES:
            raise TypeError(f"images must be uint8 or float, got {images.dtype}")
        H, W, k = images.shape[2], images.shape[3], self.k
        if H < k or W < k:
            raise ValueError(f"images of size {H}x{W} are smaller than the {k}x{k} patch")
        check_pixels("images", images)
        if images.shape[0] == 0:
            return self
        acc = self.inner
        device = acc.device or images.device
        images = images.to(device)
        per_image = (H - k + 1) * (W - k + 1)
        if images.dtype == torch.uint8 and acc.shift is None:
            for b in range(0, images.shape[0], 256):  # 256 images: exact float32 products
                s1, s2 = patch_sums(images[b : b + 256], k)
                acc.add_sums(per_image * images[b : b + 256].shape[0], s1.to(torch.int64), s2.to(torch.int64))
            return self
        y = to_unit(images, torch.float64)
        # a per-channel shift keeps the sums small: patches are stationary
        ref = acc.shift
        shift_c = y.mean((0, 2, 3)) if ref is None else ref.reshape(self.channels, k * k)[:, 0]
        s1, s2 = patch_sums(y - shift_c.reshape(1, -1, 1, 1), k)
        acc.add_sums(per_image * images.shape[0], s1, s2, shift=shift_c.repeat_interleave(k * k))
        return self

    def merge(self, other: "PatchMomentAccumulator") -> "PatchMomentAccumulator":
        if not isinstance(other, PatchMomentAccumulator) or (other.k, other.channels) != (self.k, self.channels):
            raise ValueError("can only merge patch accumulators with the same channels and patch size")
        self.inner.merge(other.inner)
        return self

    def all_reduce(self, group=None) -> "PatchMomentAccumulator":
        """Merge across the ranks of ``group`` (see :meth:`MomentAccumulator.all_reduce`)."""
        self.inner.all_reduce(group)
        return self

    def result(self) -> Moments:
        m = self.inner.result()
        m.kind = "patch"
        m.image_shape = (self.channels, self.k, self.k)
        return m


def estimate_patch_moments(data, patch_size: int, *, batch_size: int = 256, device=None, backend: Optional[str] = None, progress: bool = False) -> Moments:
    """Stationary patch moments: mean float64 ``[C*k*k]``, cov float64 ``[C*k*k, C*k*k]``;
    ``count`` is the number of patches."""
    acc = None
    for batch in streaming.batches(data, batch_size, progress, "patch moments"):
        if batch.dim() != 4:
            raise ValueError(f"patch moments need images [N, C, H, W], got batches of shape {tuple(batch.shape)}")
        if acc is None:
            acc = PatchMomentAccumulator(batch.shape[1], patch_size, device=device or batch.device, backend=backend)
        acc.update(batch)
    if acc is None:
        raise ValueError("data is an empty dataset: no images to estimate patch moments from")
    return acc.result()
