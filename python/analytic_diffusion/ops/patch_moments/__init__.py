"""The ``patch_moments`` op: stationary k x k patch mean and covariance (docs/algorithms.md §2.4,
docs/patch_moments.md), streaming, with the contract of the full moments op: exact integer
sums for uint8 (independent of batch order and size), float64 shifted sums for float data,
``num_workers``, checkpoint/resume, ``merge`` / ``all_reduce``, and backends chosen through
the registry (``"reference"``: torch lag GEMMs, any device; ``"cpu"``: compiled lag sums;
``"triton"``: GPU lag-product images, exact integer sums for uint8, on int8 tensor cores
where the band of products fills them enough) and recorded in
``Moments.extra["backend"]``.

Also the full stationary covariance (all offsets up to the image size):
:class:`StationaryMomentAccumulator` / :func:`estimate_stationary_moments` (FFT
autocorrelation, exact for uint8 under a checked error bound).
"""
from __future__ import annotations

import json
import os
from typing import Optional, Union

import torch

from ... import registry
from ..._validate import IMAGE_DTYPES, as_tensor, check_pixels, to_unit
from ..moments import MomentAccumulator, Moments
from ..moments.stats import FORMAT, save_safetensors
from . import _stream
from .reference import patch_sums

__all__ = [
    "PatchMomentAccumulator",
    "StationaryMomentAccumulator",
    "estimate_patch_moments",
    "estimate_stationary_moments",
    "patch_sums",
]

PATCH_FORMAT = FORMAT + "+patch-accumulator"


def _check_patch_size(patch_size) -> int:
    if isinstance(patch_size, bool) or not isinstance(patch_size, (int, float)) or int(patch_size) != patch_size or patch_size < 1 or patch_size % 2 == 0:
        raise ValueError(f"patch_size must be a positive odd integer, got {patch_size!r}")
    return int(patch_size)


def _check_channels(channels) -> int:
    if isinstance(channels, bool) or not isinstance(channels, (int, float)) or int(channels) != channels or channels < 1:
        raise ValueError(f"channels must be a positive integer, got {channels!r}")
    return int(channels)


def check_images(images, channels: int, name: str = "images") -> torch.Tensor:
    """uint8 or float ``[B, C, H, W]`` with ``channels`` channels, finite, float values in
    [-1, 1] (the checks every patch accumulator makes before touching its sums)."""
    images = as_tensor(name, images)
    if images.dim() != 4:
        raise ValueError(f"{name} must be [B, C, H, W], got shape {tuple(images.shape)}")
    if images.shape[1] != channels:
        raise ValueError(f"{name} have {images.shape[1]} channels, but this accumulator holds {channels}-channel moments (shape {tuple(images.shape)})")
    if images.dtype not in IMAGE_DTYPES:
        raise TypeError(f"{name} must be uint8 or float, got {images.dtype}")
    check_pixels(name, images)
    return images


class PatchMomentAccumulator:
    """Stationary k x k patch moments (docs/algorithms.md §2) over images ``[B, C, H, W]``.

    The patch vector at position p is the ``C*k*k`` values (C, then row, then column) of
    the window whose top-left corner is p, over every position where the window fits.
    Patches are never unfolded: per lag e, the products ``x[q] x[q + e]`` summed over the
    batch give every pair of patch offsets with that lag through rectangle sums. uint8
    images give exact integer sums (independent of batch order and size), float images
    float64 sums around a per-channel shift. ``backend``: a ``patch_moments`` backend name
    (``"cpu"``, ``"reference"``) or None (the registry's choice for the device; the
    ``ANALYTIC_DIFFUSION_BACKEND`` environment variable applies). The backends that ran are
    recorded in ``result().extra["backend"]``.
    """

    def __init__(self, channels: int, patch_size: int, *, device=None, backend: Optional[str] = None):
        self.k, self.channels = _check_patch_size(patch_size), _check_channels(channels)
        self.backend = backend
        self.inner = MomentAccumulator((self.channels, self.k, self.k), device=device)
        self.images = 0
        self.backends_used: set = set()
        if backend is not None and device is not None:
            registry.select("patch_moments", device, backend)  # fail now, not at the first batch

    @property
    def count(self) -> int:
        """Patches accumulated so far."""
        return self.inner.count

    def _impl(self, device) -> registry.Backend:
        return registry.select("patch_moments", device, self.backend)

    def update(self, images) -> "PatchMomentAccumulator":
        """Accumulate every k x k patch of ``images``: uint8 or float (in [-1, 1]) ``[B, C, H, W]``.
        ``images`` is not modified."""
        images = check_images(images, self.channels)
        H, W, k = images.shape[2], images.shape[3], self.k
        if H < k or W < k:
            raise ValueError(f"images of size {H}x{W} are smaller than the {k}x{k} patch (patch_size={k})")
        if images.shape[0] == 0:
            return self
        acc = self.inner
        device = acc.device or images.device
        images = images.to(device)
        impl = self._impl(device)
        per_image = (H - k + 1) * (W - k + 1)
        if images.dtype == torch.uint8 and acc.shift is None:
            s1, s2 = impl.fn.patch_sums(images, k)
            acc.add_sums(per_image * images.shape[0], s1, s2)
        else:
            y = to_unit(images, torch.float64)
            # a per-channel shift keeps the sums small: patches are stationary
            ref = acc.shift
            shift_c = y.mean((0, 2, 3)) if ref is None else ref.reshape(self.channels, k * k)[:, 0].clone()
            s1, s2 = impl.fn.patch_sums(y, k, shift_c)
            acc.add_sums(per_image * images.shape[0], s1, s2, shift=shift_c.repeat_interleave(k * k))
        self.images += int(images.shape[0])
        self.backends_used.add(impl.name)
        return self

    def merge(self, other: "PatchMomentAccumulator") -> "PatchMomentAccumulator":
        """Fold ``other`` in (``other`` is not modified); exact for two uint8 states."""
        if not isinstance(other, PatchMomentAccumulator):
            raise TypeError(f"other must be a PatchMomentAccumulator, got {type(other).__name__}")
        if (other.k, other.channels) != (self.k, self.channels):
            raise ValueError(f"can only merge patch accumulators with the same channels and patch size: ({self.channels}, k={self.k}) vs ({other.channels}, k={other.k})")
        self.inner.merge(other.inner)
        self.images += other.images
        self.backends_used |= other.backends_used
        return self

    def all_reduce(self, group=None) -> "PatchMomentAccumulator":
        """Merge across the ranks of ``group`` (see :meth:`MomentAccumulator.all_reduce`);
        uint8-only states stay exact integers."""
        import torch.distributed as dist

        self.inner.all_reduce(group)
        dev = self.inner.device or (torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else torch.device("cpu"))
        n = torch.tensor([self.images], dtype=torch.int64, device=dev)
        dist.all_reduce(n, group=group)
        self.images = int(n[0])
        return self

    def result(self) -> Moments:
        """Patch mean float64 ``[C*k*k]`` and unbiased covariance ``[C*k*k, C*k*k]``
        (``count`` = number of patches); ``extra`` records the backend(s) and image count."""
        m = self.inner.result()
        m.kind = "patch"
        m.image_shape = (self.channels, self.k, self.k)
        m.extra = {"model": "patches", "backend": ",".join(sorted(self.backends_used)), "images": self.images,
                   "exact": self.inner.mode == "int"}
        return m

    # ---- checkpoints (safetensors)
    def state_dict(self) -> dict:
        st = self.inner.state_dict()
        st.update(patch_size=torch.tensor(self.k), channels=torch.tensor(self.channels), images=torch.tensor(self.images, dtype=torch.int64))
        return st

    def save(self, path: Union[str, os.PathLike]) -> None:
        """Checkpoint to safetensors (temporary file, then rename: never a torn file)."""
        save_safetensors(self.state_dict(), path, {"format": PATCH_FORMAT, "backends": json.dumps(sorted(self.backends_used))})

    @classmethod
    def load(cls, path: Union[str, os.PathLike], device=None, backend: Optional[str] = None) -> "PatchMomentAccumulator":
        """Read a checkpoint written by :meth:`save`."""
        from safetensors import safe_open
        from safetensors.torch import load_file

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        if meta.get("format") != PATCH_FORMAT:
            raise ValueError(f"{os.fspath(path)!r} is not a patch-moments checkpoint (format={meta.get('format')!r})")
        st = load_file(str(path))
        acc = cls(int(st["channels"]), int(st["patch_size"]), device=device, backend=backend)
        acc.inner.load_state_dict(st)
        acc.images = int(st["images"])
        acc.backends_used = set(json.loads(meta.get("backends", "[]")))
        return acc


def estimate_patch_moments(
    data,
    patch_size: int,
    *,
    batch_size: int = 256,
    device=None,
    backend: Optional[str] = None,
    progress: bool = False,
    num_workers: int = 0,
    checkpoint: Optional[Union[str, os.PathLike]] = None,
    checkpoint_every: int = 100,
) -> Moments:
    """Stationary k x k patch moments of a dataset in one streaming pass (docs/algorithms.md §2).

    ``data``: anything :func:`analytic_diffusion.data.iter_batches` takes, images
    ``[N, C, H, W]`` uint8 or float in [-1, 1]. ``patch_size``: odd k <= H, W. ``backend``:
    ``"cpu"`` (compiled; the default on CPU when built), ``"reference"`` (torch, any device)
    or None. ``num_workers``, ``checkpoint`` and ``checkpoint_every`` work as in
    :func:`estimate_moments` (a resumed uint8 run ends bit-identical to an uninterrupted one).
    Returns :class:`Moments` of kind ``"patch"``: mean float64 ``[C*k*k]``, cov float64
    ``[C*k*k, C*k*k]``, ``count`` = number of patches, ``extra["backend"]`` = the backend(s) used.
    """
    k = _check_patch_size(patch_size)
    acc = _stream.drive(
        data,
        lambda batch, dev: PatchMomentAccumulator(batch.shape[1], k, device=dev or batch.device, backend=backend),
        lambda path: PatchMomentAccumulator.load(path, device=device, backend=backend),
        batch_size=batch_size, device=device, progress=progress, num_workers=num_workers,
        checkpoint=checkpoint, checkpoint_every=checkpoint_every, desc="patch moments",
    )
    if acc.k != k:
        raise ValueError(f"checkpoint {os.fspath(checkpoint)!r} holds patch size {acc.k}, not {k}")
    return acc.result()


# The backends register where they are defined; importing them here makes them visible.
from . import reference as _reference_backend  # noqa: E402,F401
from . import cpu as _cpu_backend  # noqa: E402,F401
from . import triton as _triton_backend  # noqa: E402,F401  (Triton itself is imported lazily)
from .stationary import StationaryMomentAccumulator, estimate_stationary_moments  # noqa: E402
