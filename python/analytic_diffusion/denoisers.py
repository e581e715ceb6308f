"""Analytical denoisers with one interface: ``den(x_t, t) -> x0_hat``.

``x_t``: float32/float64 ``[B, C, H, W]`` (or ``[B, n]``); ``t``: an integer
timestep of the 1000-step linear schedule (int or 0-d tensor). The output has
x_t's shape and dtype.
"""
from __future__ import annotations

from typing import Dict, Optional, Union

import torch

from . import ops as _ops
from . import _registry
from ._validate import check_chunk_size, check_positive, check_queries, check_threshold, check_train
from .moments import MomentAccumulator, Moments, estimate_moments
from .schedule import alpha_bar_at, default_alphas_cumprod, timestep_to_int
from .wiener import WienerFilter


def _as_train(train) -> torch.Tensor:
    if not isinstance(train, torch.Tensor):
        from .data import load_images

        train = load_images(train)
    return check_train(train)


class Denoiser:
    """Base class: validates ``x_t`` and ``t``, maps ``t`` to ``alpha_bar``."""

    name = "denoiser"

    def __init__(self, alphas_cumprod: Optional[torch.Tensor] = None):
        self.alphas_cumprod = default_alphas_cumprod() if alphas_cumprod is None else alphas_cumprod

    def alpha_bar(self, t) -> float:
        return alpha_bar_at(t, self.alphas_cumprod)

    def __call__(self, x_t, t) -> torch.Tensor:
        t = timestep_to_int(t, self.alphas_cumprod.shape[0])
        x = check_queries(x_t, "x_t")
        return self.denoise(x, t, self.alpha_bar(t))

    def denoise(self, x: torch.Tensor, t: int, alpha_bar: float) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError


class _TrainSetDenoiser(Denoiser):
    """Holds a training set (validated once) and a copy per device it is used on."""

    def __init__(self, train, backend: Optional[str] = None, alphas_cumprod=None, process_group=None):
        super().__init__(alphas_cumprod)
        self.train = _as_train(train)
        self.backend = backend
        self.process_group = process_group
        self._on_device: Dict[torch.device, torch.Tensor] = {self.train.device: self.train}

    @property
    def sharded(self) -> bool:
        """True when ``train`` is this rank's shard and results are merged across ranks."""
        return self.process_group is not None

    def _merged(self, state) -> torch.Tensor:
        # Each rank holds a shard of the training set: the softmax states of the shards
        # merge exactly (SPEC 5), so every rank returns the full-dataset result.
        group = None if self.process_group is True else self.process_group
        return _ops.all_reduce_state(state, group).result()

    @property
    def image_shape(self):
        return tuple(self.train.shape[1:])

    def _train_for(self, x: torch.Tensor) -> torch.Tensor:
        if x[0].numel() != self.train[0].numel() or (x.dim() == 4 and self.train.dim() == 4 and x.shape[1:] != self.train.shape[1:]):
            raise ValueError(f"x_t has image shape {tuple(x.shape[1:])}, but the training images are {tuple(self.train.shape[1:])}")
        if x.device not in self._on_device:
            self._on_device[x.device] = self.train.to(x.device)
        return self._on_device[x.device]

    def _impl(self, op: str, x: torch.Tensor):
        return _registry.select(op, x.device, self.backend).fn


class OptimalDenoiser(_TrainSetDenoiser):
    """The empirical optimal denoiser: exact softmax over the whole training set (SPEC 6).

    ``process_group``: a torch.distributed group (or ``True`` for the default group)
    when ``train`` is this rank's shard of the training set; every rank then returns
    the result over the union of the shards.
    """

    name = "optimal"

    def __init__(self, train, temperature: float = 1.0, backend: Optional[str] = None, chunk_size: int = 256, alphas_cumprod=None, process_group=None):
        super().__init__(train, backend, alphas_cumprod, process_group)
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


class NearestDenoiser(_TrainSetDenoiser):
    """Returns the training image nearest to ``x_t / sqrt(alpha_bar)`` (SPEC 6)."""

    name = "nearest"

    def denoise(self, x, t, alpha_bar):
        train = self._train_for(x)
        return self._impl("nearest_denoise", x)(x.reshape(x.shape[0], -1), train.reshape(train.shape[0], -1), alpha_bar, 256).reshape(x.shape)


class WienerDenoiser(Denoiser):
    """The optimal linear denoiser ``mean + A_t (x/a - mean)`` from dataset moments (SPEC 3).

    ``moments``: :class:`Moments`, or a :class:`WienerFilter` already built from them
    (several denoisers can then share one eigendecomposition).
    """

    name = "wiener"

    def __init__(self, moments: Union[Moments, WienerFilter], alphas_cumprod=None):
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

    def sensitivity(self, t, pixels):
        """Jacobian rows (sensitivity fields) for flat output pixels: float64 ``[P, C, H, W]``."""
        return self.filter.sensitivity(self.alpha_bar(t), pixels)


class LocalityDenoiser(_TrainSetDenoiser):
    """The paper's locality denoiser (SPEC 5) with Wiener-derived windows (SPEC 4).

    ``train``: uint8 or float ``[N, C, H, W]`` (or any source ``data.load_images``
    takes); ``moments``: :class:`Moments` of the data the windows come from
    (full-image moments estimated from ``train`` when None). Patch moments
    (``kind == "patch"``, e.g. ``estimate_patch_moments(train, 9)``) are accepted too,
    for images whose full covariance does not fit: the windows then come from the
    windowed Wiener filter (``WindowedWiener.dense_mask``: its k x k window pattern
    placed at every pixel, clipped at the borders). The masks are still dense
    ``[n, n]`` (n^2 bits packed per step, n^2 bytes for the step in use), so this is
    for moderate n (3x64x64: 150 MB unpacked). Each timestep's mask is built once
    and cached bit-packed (n*n/8 bytes; the bool mask of the step in use is kept
    unpacked); :meth:`prepare` builds the masks, and the backend's plans, of a
    whole sampling schedule up front (``ad.sample`` calls it).

    ``process_group``: a torch.distributed group (or ``True`` for the default group)
    when ``train`` is this rank's shard (exact softmax only). Moments estimated here
    are then all-reduced, so every rank builds the same masks, and each step merges
    the ranks' softmax states: every rank returns the full-dataset result.
    """

    name = "locality"

    def __init__(
        self,
        train,
        moments: Optional[Moments] = None,
        threshold: float = 0.02,
        temperature: float = 1.0,
        softmax: str = "exact",
        chunk_size: int = 256,
        backend: Optional[str] = None,
        alphas_cumprod=None,
        process_group=None,
    ):
        threshold = check_threshold(threshold)  # before the training set and moments
        super().__init__(train, backend, alphas_cumprod, process_group)
        if softmax not in ("exact", "wssm"):
            raise ValueError(f"softmax must be 'exact' or 'wssm', got {softmax!r}")
        if softmax == "wssm" and self.sharded:
            raise ValueError("softmax='wssm' cannot be sharded across processes (its per-chunk softmaxes do not merge); use softmax='exact'")
        self.threshold = threshold
        self.temperature = check_positive("temperature", temperature)
        self.softmax = softmax
        self.chunk_size = check_chunk_size(chunk_size)
        if moments is None:
            if self.sharded:
                acc = MomentAccumulator(tuple(self.train.shape[1:])).update(self.train)
                moments = acc.all_reduce(None if process_group is True else process_group).result()
            else:
                moments = estimate_moments(self.train)
        elif not isinstance(moments, Moments):
            raise TypeError(f"moments must be analytic_diffusion.Moments or None, got {type(moments).__name__}")
        if moments.kind == "patch":
            # windows from the windowed Wiener filter: only the channel count must match
            if self.train.dim() != 4:
                raise ValueError(f"patch moments need training images [N, C, H, W], got shape {tuple(self.train.shape)}")
            if not moments.image_shape or int(moments.image_shape[0]) != self.train.shape[1]:
                raise ValueError(f"the patch moments are for {moments.image_shape} patches, but the training images have {self.train.shape[1]} channels")
        else:
            moments.check_compatible(self.train.shape[1:], "the training set")
        self.moments = moments
        self._filter = None  # WienerFilter, or WindowedWiener for patch moments
        self._masks: Dict[int, _StoredMask] = {}
        self._dense: Optional[tuple] = None  # (t, device, mask): the unpacked mask in use

    @property
    def filter(self):
        """The filter the windows come from: :class:`WienerFilter` (full moments) or
        :class:`WindowedWiener` (patch moments). Both have ``sensitivity(alpha_bar,
        pixels, image_shape=None) -> [P, C, H, W]``."""
        if self._filter is None:
            if self.moments.kind == "patch":
                from .windowed import WindowedWiener  # windowed imports this module

                self._filter = WindowedWiener(self.moments, self.image_shape)
            else:
                self._filter = WienerFilter(self.moments)
        return self._filter

    def mask(self, t, device=None) -> torch.Tensor:
        """The mask for timestep ``t``: bool ``[n, n]`` (float64 if threshold <= 0), on
        ``device`` (default CPU). Built once per timestep, stored bit-packed."""
        t = timestep_to_int(t, self.alphas_cumprod.shape[0])
        device = torch.device(device or "cpu")
        if self._dense is not None and self._dense[0] == t and self._dense[1] == device:
            return self._dense[2]
        if t not in self._masks:
            f, ab = self.filter, self.alpha_bar(t)
            # patch moments: the windowed filter's k x k pattern expanded to [n, n]
            built = f.dense_mask(ab, self.threshold) if self.moments.kind == "patch" else f.mask(ab, self.threshold)
            self._masks[t] = _StoredMask(built)
        m = self._masks[t].unpack(device)
        self._dense = (t, device, m)
        return m

    def prepare(self, timesteps, device=None) -> "LocalityDenoiser":
        """Build the masks of ``timesteps`` (and, where the backend plans its work per
        mask, its plans) now rather than during the first sampling run."""
        device = torch.device(device or self.train.device)
        impl = _registry.select("locality_denoise", device, self.backend).fn
        prep = getattr(impl, "prepare", None)
        for t in timesteps:
            m = self.mask(t, device)
            if prep is not None:
                prep(m)
        return self

    def mask_bytes(self) -> int:
        """Memory held by the cached masks (packed), in bytes."""
        return sum(m.nbytes for m in self._masks.values())

    def denoise(self, x, t, alpha_bar):
        train = self._train_for(x)
        mask = self.mask(t, x.device)
        impl = self._impl("locality_denoise", x)
        out = impl(
            x.reshape(x.shape[0], -1), train.reshape(train.shape[0], -1), mask, alpha_bar,
            self.temperature, self.softmax, self.chunk_size, self.sharded,
        )
        if self.sharded:
            out = self._merged(out).to(x.dtype)
        return out.reshape(x.shape)


class _StoredMask:
    """A mask kept compactly: bool masks bit-packed along rows (n * ceil(n/8) bytes);
    real-valued masks (threshold <= 0) as they are."""

    def __init__(self, mask: torch.Tensor):
        self.shape = tuple(mask.shape)
        if mask.dtype == torch.bool:
            import numpy as np

            self.packed = torch.from_numpy(np.packbits(mask.cpu().numpy(), axis=1))
            self.dense = None
        else:
            self.packed, self.dense = None, mask

    @property
    def nbytes(self) -> int:
        t = self.packed if self.packed is not None else self.dense
        return t.numel() * t.element_size()

    def unpack(self, device) -> torch.Tensor:
        if self.dense is not None:
            return self.dense.to(device)
        import numpy as np

        bits = np.unpackbits(self.packed.numpy(), axis=1, count=self.shape[1])
        return torch.from_numpy(bits.view(np.bool_)).to(device)
