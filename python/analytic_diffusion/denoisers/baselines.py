"""The baselines: the empirical optimal (memorising) denoiser, the nearest training image,
and the Wiener (optimal linear) denoiser (docs/algorithms.md §3, §6)."""
from __future__ import annotations

from typing import Dict, Optional, Union

import torch

from .._validate import check_chunk_size, check_positive, check_threshold
from ..filters import WienerFilter
from ..ops import Moments, all_reduce_nearest
from .base import Denoiser, TrainSetDenoiser


class OptimalDenoiser(TrainSetDenoiser):
    """The empirical optimal denoiser: exact softmax over the whole training set (docs/algorithms.md §6).

    ``process_group``: a torch.distributed group (or ``True`` for the default group)
    when ``train`` is this rank's shard of the training set; every rank then returns
    the result over the union of the shards.
    """

    name = "optimal"

    def __init__(self, train, *, temperature: float = 1.0, chunk_size: int = 256, backend: Optional[str] = None, alphas_cumprod=None, process_group=None):
        super().__init__(train, backend=backend, alphas_cumprod=alphas_cumprod, process_group=process_group)
        self.temperature = check_positive("temperature", temperature)
        self.chunk_size = check_chunk_size(chunk_size)

    def denoise(self, x, t, alpha_bar):
        train = self._train_for(x)
        out = self._impl("optimal_denoise", x)(
            x.reshape(x.shape[0], -1), train.reshape(train.shape[0], -1), alpha_bar, self.temperature, self.chunk_size, self.sharded
        )
        if self.sharded:
            out = self._merged(out).to(x.dtype)
        return out.reshape(x.shape)


class NearestDenoiser(TrainSetDenoiser):
    """Returns the training image nearest to ``x_t / sqrt(alpha_bar)`` (docs/algorithms.md §6), the first
    one on ties.

    ``scaled=False``: the locality paper's ``nearest_dataset`` baseline instead
    (docs/algorithms.md §8.2): ``argmin_k ||x_t - y_k||``, the training images not scaled by
    ``sqrt(alpha_bar)`` (``presets.published.NEAREST_DATASET``). At high noise the two pick
    different images almost always; at t = 0 they agree.

    ``process_group``: a torch.distributed group (or ``True`` for the default group)
    when ``train`` is this rank's shard, rank r holding the r-th consecutive part of the
    training set; every rank then returns the nearest image over the union of the shards
    (on ties the lowest global index, i.e. the lowest rank).
    """

    name = "nearest"

    def __init__(self, train, *, scaled: bool = True, backend: Optional[str] = None, alphas_cumprod=None, process_group=None):
        super().__init__(train, backend=backend, alphas_cumprod=alphas_cumprod, process_group=process_group)
        if not isinstance(scaled, bool):
            raise TypeError(f"scaled must be a bool (True: ||x_t - sqrt(ab) y||, False: the paper's ||x_t - y||), got {type(scaled).__name__}")
        self.scaled = scaled
        if not scaled:
            self.name = "nearest_dataset"

    def denoise(self, x, t, alpha_bar):
        train = self._train_for(x)
        impl = self._impl("nearest_denoise", x)
        x2, t2 = x.reshape(x.shape[0], -1), train.reshape(train.shape[0], -1)
        # the backends compute ||x - sqrt(ab) y||^2: ab = 1 is the unscaled distance
        ab = alpha_bar if self.scaled else 1.0
        if not self.sharded:
            return impl(x2, t2, ab, 256).reshape(x.shape)
        group = None if self.process_group is True else self.process_group
        state = all_reduce_nearest(impl(x2, t2, ab, 256, True), train.shape[0], group)
        return state.image.reshape(x.shape)


class WienerDenoiser(Denoiser):
    """The optimal linear denoiser ``mean + A_t (x/a - mean)`` from dataset moments (docs/algorithms.md §3).

    ``moments``: :class:`Moments`, or a :class:`WienerFilter` already built from them
    (several denoisers can then share one eigendecomposition).
    """

    name = "wiener"

    def __init__(self, moments: Union[Moments, WienerFilter], *, alphas_cumprod=None):
        super().__init__(alphas_cumprod)
        if isinstance(moments, WienerFilter):
            self.filter = moments
            self.moments = None
        elif isinstance(moments, Moments):
            self.moments = moments
            self.filter = WienerFilter(moments)
        else:
            raise TypeError(f"moments must be analytic_diffusion.Moments or WienerFilter, got {type(moments).__name__}")
        self._on_device: Dict[torch.device, WienerFilter] = {self.filter.device: self.filter}

    def denoise(self, x, t, alpha_bar):
        if self.moments is not None:
            self.moments.check_compatible(x.shape[1:], "x_t")
        elif x[0].numel() != self.filter.n:
            raise ValueError(f"x_t has {x[0].numel()} values per image, but the Wiener filter is for n = {self.filter.n}")
        # one copy per device, made once: sampling on a GPU must not move [n, n] every step
        f = self._on_device.get(x.device)
        if f is None:
            f = self._on_device[x.device] = self.filter.to(x.device)
        return f.apply(x, alpha_bar)

    def sensitivity(self, t, pixels, *, image_shape=None) -> torch.Tensor:
        """Jacobian rows (sensitivity fields) ``A_t / a`` for flat output pixels: float64 ``[P, C, H, W]``."""
        return self.filter.sensitivity(self.alpha_bar(t), pixels, image_shape)

    def mask(self, t, *, threshold: float = 0.02, device=None) -> torch.Tensor:
        """The locality mask of this filter at timestep ``t`` (docs/algorithms.md §4):
        bool ``[n, n]`` (float64 weights if threshold <= 0), column m the window of pixel m."""
        return self.filter.mask(self.alpha_bar(t), check_threshold(threshold)).to(device or "cpu")
