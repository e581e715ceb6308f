"""The Wiener (optimal linear) denoiser (docs/algorithms.md §3) and the locality mask (docs/algorithms.md §4).

One float64 eigendecomposition ``cov = U diag(lam) U^T`` serves every timestep:
the filter ``A_t = U diag(g) U^T`` with ``g = ab*lam / (ab*lam + s2)`` is applied
as ``U (g * (U^T v))`` and never formed densely unless asked for.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

from .._validate import check_alpha_bar, check_positive, check_threshold
from ..ops.moments import Moments

DIAG_EPS = 1e-6  # |A_ii| below this is replaced by 1 in the mask normalisation (docs/algorithms.md §4)


class WienerFilter:
    """Eigendecomposition of a covariance, done once in float64.

    ``WienerFilter(moments)`` or ``WienerFilter(cov, mean=None)`` with ``cov``
    float ``[n, n]`` (symmetric) and ``mean`` ``[n]``.
    """

    def __init__(self, cov: Union[Moments, torch.Tensor], mean: Optional[torch.Tensor] = None):
        if isinstance(cov, Moments):
            mean = cov.mean if mean is None else mean
            self.image_shape = cov.image_shape
            cov = cov.cov
        else:
            self.image_shape = None
        if not isinstance(cov, torch.Tensor) or cov.dim() != 2 or cov.shape[0] != cov.shape[1]:
            raise ValueError(f"cov must be a square [n, n] tensor, got {getattr(cov, 'shape', type(cov).__name__)}")
        if not bool(torch.isfinite(cov).all()):
            raise ValueError("cov contains NaN/Inf")
        c = cov.to(torch.float64)
        c = 0.5 * (c + c.T)  # eigh reads one triangle; symmetrise so the result does not depend on which
        lam, U = torch.linalg.eigh(c)
        self.lam = lam.clamp_min(0.0)  # float64 [n]
        self.U = U  # float64 [n, n], columns are eigenvectors
        self.n = c.shape[0]
        if mean is None:
            mean = torch.zeros(self.n, dtype=torch.float64, device=c.device)
        if mean.shape != (self.n,):
            raise ValueError(f"mean must be [{self.n}], got {tuple(mean.shape)}")
        self.mean = mean.to(torch.float64)

    @property
    def device(self) -> torch.device:
        return self.U.device

    def to(self, device) -> "WienerFilter":
        """This filter on ``device`` (``self`` if already there): the eigendecomposition is
        moved, never recomputed."""
        device = torch.device(device)
        if self.U.device == device or (device.index is None and self.U.device.type == device.type):
            return self
        f = WienerFilter.__new__(WienerFilter)
        f.__dict__.update({k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in self.__dict__.items()})
        return f

    def gains(self, alpha_bar: float) -> torch.Tensor:
        """``g = ab*lam / (ab*lam + s2)``: float64 ``[n]``."""
        ab = check_alpha_bar(alpha_bar)
        return ab * self.lam / (ab * self.lam + (1.0 - ab))

    def matrix(self, alpha_bar: float) -> torch.Tensor:
        """The dense filter ``A_t``: float64 ``[n, n]``."""
        g = self.gains(alpha_bar)
        return (self.U * g) @ self.U.T

    def apply(self, x: torch.Tensor, alpha_bar: float) -> torch.Tensor:
        """``D_W(x) = mean + A_t (x / a - mean)``; ``x`` ``[B, n]`` or ``[B, C, H, W]``, output like ``x``."""
        ab = check_alpha_bar(alpha_bar)
        a = ab**0.5
        v = x.reshape(x.shape[0], -1).to(torch.float64) / a - self.mean
        out = self.mean + ((v @ self.U) * self.gains(ab)) @ self.U.T
        return out.to(x.dtype).reshape(x.shape)

    def sensitivity(self, alpha_bar: float, pixels: Union[int, Sequence[int]], image_shape: Optional[Sequence[int]] = None) -> torch.Tensor:
        """Rows of the Jacobian ``A_t / a`` for output pixels ``pixels`` (flat indices).

        Returns float64 ``[P, C, H, W]`` when an image shape is known, else ``[P, n]``.
        """
        ab = check_alpha_bar(alpha_bar)
        idx = torch.as_tensor([pixels] if isinstance(pixels, int) else list(pixels), dtype=torch.long, device=self.U.device)
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= self.n):
            raise ValueError(f"pixels must be flat indices in [0, {self.n - 1}], got {idx.tolist()}")
        rows = ((self.U[idx] * self.gains(ab)) @ self.U.T) / ab**0.5
        shape = image_shape or self.image_shape
        return rows.reshape(len(idx), *shape) if shape else rows

    def mask(self, alpha_bar: float, threshold: float = 0.02) -> torch.Tensor:
        """The locality mask of docs/algorithms.md §4 from this filter (see :func:`locality_mask`)."""
        return mask_from_wiener_matrix(self.matrix(alpha_bar), threshold)


def wiener_matrix(cov: Union[Moments, torch.Tensor, WienerFilter], alpha_bar: float) -> torch.Tensor:
    """``A_t = ab*cov (ab*cov + s2 I)^-1`` through the eigendecomposition: float64 ``[n, n]``."""
    f = cov if isinstance(cov, WienerFilter) else WienerFilter(cov)
    return f.matrix(alpha_bar)


def mask_from_wiener_matrix(A: torch.Tensor, threshold: float = 0.02) -> torch.Tensor:
    """docs/algorithms.md §4 from a dense ``A_t``: bool ``[n, n]`` if ``threshold > 0`` else float64 weights."""
    threshold = check_threshold(threshold)
    d = A.diagonal().clone()
    d[d.abs() < DIAG_EPS] = 1.0
    Mt = A / d[:, None]  # row i divided by A_ii
    if threshold <= 0:
        return Mt
    return Mt.abs() >= threshold * Mt.abs().max()


def locality_mask(cov: Union[Moments, torch.Tensor, WienerFilter], alpha_bar: float, threshold: float = 0.02) -> torch.Tensor:
    """The locality mask at noise level ``alpha_bar`` (docs/algorithms.md §4).

    ``threshold > 0``: bool ``[n, n]``, ``M[j, m]`` is True when pixel j is in the
    window of output pixel m (column m is the window). ``threshold <= 0``: the
    real-valued float64 ``Mt``. Pass a :class:`WienerFilter` to reuse its
    eigendecomposition across timesteps.
    """
    threshold = check_threshold(threshold)  # before the eigendecomposition
    f = cov if isinstance(cov, WienerFilter) else WienerFilter(cov)
    return f.mask(alpha_bar, threshold)
