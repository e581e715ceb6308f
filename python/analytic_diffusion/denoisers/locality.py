"""The paper's locality denoiser with Wiener-derived windows (docs/algorithms.md §4, §5)."""
from __future__ import annotations

from typing import Dict, Optional

import numpy as np
import torch

from .. import registry
from .._validate import check_chunk_size, check_positive, check_threshold
from ..filters import WienerFilter, WindowedWiener
from ..ops import MomentAccumulator, Moments, estimate_moments
from ..schedule import timestep_to_int
from .base import TrainSetDenoiser


class LocalityDenoiser(TrainSetDenoiser):
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
        *,
        threshold: float = 0.02,
        temperature: float = 1.0,
        softmax: str = "exact",
        chunk_size: int = 256,
        backend: Optional[str] = None,
        alphas_cumprod=None,
        process_group=None,
    ):
        super().__init__(train, backend=backend, alphas_cumprod=alphas_cumprod, process_group=process_group)
        if softmax not in ("exact", "wssm"):
            raise ValueError(f"softmax must be 'exact' or 'wssm', got {softmax!r}")
        if softmax == "wssm" and self.sharded:
            raise ValueError("softmax='wssm' cannot be sharded across processes (its per-chunk softmaxes do not merge); use softmax='exact'")
        self.threshold = check_threshold(threshold)
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
                self._filter = WindowedWiener(self.moments, self.image_shape)
            else:
                self._filter = WienerFilter(self.moments)
        return self._filter

    def mask(self, t, *, threshold: Optional[float] = None, device=None) -> torch.Tensor:
        """The mask for timestep ``t``: bool ``[n, n]`` (float64 if threshold <= 0), on
        ``device`` (default CPU); column m is the window of output pixel m. With this
        denoiser's own threshold (``threshold=None``) it is built once per timestep and
        stored bit-packed; another threshold builds an uncached mask."""
        t = timestep_to_int(t, self.alphas_cumprod.shape[0])
        device = torch.device(device or "cpu")
        if threshold is not None and float(threshold) != self.threshold:
            return self._build_mask(t, check_threshold(threshold)).to(device)
        if self._dense is not None and self._dense[0] == t and self._dense[1] == device:
            return self._dense[2]
        if t not in self._masks:
            self._masks[t] = _StoredMask(self._build_mask(t, self.threshold))
        m = self._masks[t].unpack(device)
        self._dense = (t, device, m)
        return m

    def _build_mask(self, t: int, threshold: float) -> torch.Tensor:
        f, ab = self.filter, self.alpha_bar(t)
        # patch moments: the windowed filter's k x k pattern expanded to [n, n]
        return f.dense_mask(ab, threshold) if self.moments.kind == "patch" else f.mask(ab, threshold)

    def sensitivity(self, t, pixels, *, image_shape=None) -> torch.Tensor:
        """Sensitivity fields of the filter the windows come from (Jacobian rows of the
        Wiener or windowed Wiener denoiser) for flat output pixels: float64 ``[P, C, H, W]``."""
        return self.filter.sensitivity(self.alpha_bar(t), pixels, image_shape)

    def prepare(self, timesteps, device=None) -> "LocalityDenoiser":
        """Build the masks of ``timesteps`` (and, where the backend plans its work per
        mask, its plans) now rather than during the first sampling run."""
        device = torch.device(device or self.train.device)
        prep = registry.select("locality_denoise", device, self.backend).prepare
        for t in timesteps:
            m = self.mask(t, device=device)
            if prep is not None:
                prep(m)
        return self

    def mask_bytes(self) -> int:
        """Memory held by the cached masks (packed), in bytes."""
        return sum(m.nbytes for m in self._masks.values())

    def denoise(self, x, t, alpha_bar):
        train = self._train_for(x)
        mask = self.mask(t, device=x.device)
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
        bits = np.unpackbits(self.packed.numpy(), axis=1, count=self.shape[1])
        return torch.from_numpy(bits.view(np.bool_)).to(device)
