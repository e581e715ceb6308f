"""The local score machines of Kamb & Ganguli (docs/algorithms.md §10, docs/algorithms.md §10): LS (the
windowed locality op with a full box window) and ELS / bbELS (the ``els_denoise`` op), with
patch-size schedules (:mod:`.schedules`)."""
from __future__ import annotations

from typing import Optional

import torch

from .._validate import check_chunk_size, check_positive
from ..ops.els import PADDINGS, check_patch_size
from .base import TrainSetDenoiser
from .schedules import KAMB_GANGULI_SCHEDULES, PatchSchedule

__all__ = ["ELSDenoiser", "LSDenoiser"]


class _PatchDenoiser(TrainSetDenoiser):
    """Shared: a 4-D training set, a patch-size schedule, flat ``[B, n]`` input reshaped."""

    def __init__(self, train, patch_size, *, temperature=1.0, chunk_size=64, backend=None, alphas_cumprod=None, process_group=None):
        super().__init__(train, backend=backend, alphas_cumprod=alphas_cumprod, process_group=process_group)
        if self.train.dim() != 4:
            raise ValueError(f"train must be images [N, C, H, W] (patches are spatial), got shape {tuple(self.train.shape)}")
        self.schedule = PatchSchedule(patch_size, self.alphas_cumprod)
        self.temperature = check_positive("temperature", temperature)
        self.chunk_size = check_chunk_size(chunk_size)

    def patch_size(self, t) -> int:
        """P at timestep ``t``."""
        return self.schedule(t)

    def _images(self, x: torch.Tensor) -> torch.Tensor:
        train = self._train_for(x)
        return x.reshape(x.shape[0], *train.shape[1:]) if x.dim() == 2 else x

    def _finish(self, out, x):
        if self.sharded:
            out = self._merged(out).to(x.dtype)
        return out.reshape(x.shape)


class LSDenoiser(_PatchDenoiser):
    """The local score (LS) machine: for each pixel, the softmax over the N training images of
    the P x P x C patch distance at the same position (zero contribution outside the image),
    all channels sharing the weights (docs/algorithms.md §10).

    It is the windowed locality denoiser (``ops.windowed_locality_denoise``, §9) with the full
    box window ``ones(C, C, P, P)``, so it runs on that op's backends.

    Args:
        train: training images ``[N, C, H, W]`` (uint8 or float in [-1, 1]) or a path.
        patch_size: odd int, ``{timestep: P}`` or a preset name of
            ``KAMB_GANGULI_SCHEDULES`` (e.g. ``"cifar10-unet"``).
        temperature: softmax temperature tau (default 1).
        chunk_size: training images per block (memory only).
        backend: backend of ``windowed_locality_denoise`` (default: the best available).
        process_group: shard the training set across ranks (see ``TrainSetDenoiser``).
    """

    name = "ls"

    def __init__(self, train, patch_size, *, temperature: float = 1.0, chunk_size: int = 256, backend: Optional[str] = None,
                 alphas_cumprod=None, process_group=None):
        super().__init__(train, patch_size, temperature=temperature, chunk_size=chunk_size, backend=backend,
                         alphas_cumprod=alphas_cumprod, process_group=process_group)

    def window(self, t) -> torch.Tensor:
        """The box window ``ones(C, C, P, P)`` at timestep ``t`` (P above 2*max(H, W) - 1 is cut
        there: the window already covers the whole image from every pixel)."""
        C, H, W = self.train.shape[1:]
        P = min(self.patch_size(t), 2 * max(H, W) - 1)
        return torch.ones(C, C, P, P, dtype=torch.bool)

    def denoise(self, x, t, alpha_bar):
        xi = self._images(x)
        train = self._train_for(x)
        window = self.window(t).to(x.device)
        impl = self._impl("windowed_locality_denoise", x)
        out = impl(xi, train, window, alpha_bar, self.temperature, "exact", self.chunk_size, self.sharded)
        return self._finish(out, x)


class ELSDenoiser(_PatchDenoiser):
    """The equivariant local score machine: ELS (``padding="circular"``) or the
    boundary-broken bbELS (``padding="zeros"``) of Kamb & Ganguli (docs/algorithms.md §10).

    Per pixel p, the softmax over candidate patches q of every training image of
    ``-||Q_p(x_t) - a*q||^2 / (2*s2*tau)``; ``x0_hat[:, p]`` is the weighted centre pixel.
    Circular: every fully-inside patch is a candidate of every pixel (x wraps around).
    Zeros: corners like LS, edges slide along their edge, the interior is full ELS; P >= H, W
    is LS.

    Args:
        train: training images ``[N, C, H, W]`` (uint8 or float in [-1, 1]) or a path.
        patch_size: odd int, ``{timestep: P}`` or a preset name of ``KAMB_GANGULI_SCHEDULES``
            (each preset was calibrated for one padding; see its ``"padding"`` field).
        padding: ``"circular"`` (ELS) or ``"zeros"`` (bbELS).
        temperature, chunk_size, backend, process_group: as for :class:`LSDenoiser`
            (backends of ``els_denoise``: ``reference``, ``cpu``, ``triton``).
    """

    def __init__(self, train, patch_size, padding: str = "circular", *, temperature: float = 1.0, chunk_size: int = 64,
                 backend: Optional[str] = None, alphas_cumprod=None, process_group=None):
        if padding not in PADDINGS:
            raise ValueError(f"padding must be one of {PADDINGS} ('circular': ELS, 'zeros': bbELS), got {padding!r}")
        super().__init__(train, patch_size, temperature=temperature, chunk_size=chunk_size, backend=backend,
                         alphas_cumprod=alphas_cumprod, process_group=process_group)
        self.padding = padding
        self.name = "els" if padding == "circular" else "bbels"
        H, W = self.train.shape[2:]
        sched = self.schedule
        sizes = [sched.constant] if sched.constant is not None else (
            list(sched.mapping.values()) if sched.mapping is not None else KAMB_GANGULI_SCHEDULES[sched.preset]["scales"][1:]
        )
        for P in sizes:
            self._size(P, H, W)

    def _size(self, P: int, H: int, W: int) -> int:
        if self.padding == "zeros":
            return min(P, 2 * max(H, W) - 1)  # larger boxes see nothing more
        return check_patch_size(P, H, W, "circular")

    def denoise(self, x, t, alpha_bar):
        xi = self._images(x)
        train = self._train_for(x)
        P = self._size(self.patch_size(t), *train.shape[2:])
        impl = self._impl("els_denoise", x)
        out = impl(xi, train, P, alpha_bar, self.padding, self.temperature, self.chunk_size, self.sharded)
        return self._finish(out, x)
