"""The full stationary covariance: per-lag autocovariances over all offsets up to the image
size, as patch moments of any window size (docs/patch_moments.md).

Model. docs/algorithms.md §2's patch moments average over the positions where a k x k window fits, which
for k > H is none. At high noise the true window is most of the image, so for large k this
module uses the stationary model directly: the covariance between the pixel of channel c at
q and the pixel of channel c' at q + e depends only on the lag e = (di, dj), and is
estimated from ALL pixel pairs at lag e inside the images (the autocorrelation):

    m_c       = mean of channel c over all N*H*W pixels
    S_e[c,c'] = sum_b sum_{q, q+e inside} (x[b,c,q] - m_c)(x[b,c',q+e] - m_c')
    M_e       = N (H - |di|)(W - |dj|)            (the number of pixel pairs at lag e)
    estimator "pairs" (default):  Cov_e = S_e / (M_e - 1)   (lag 0: the unbiased pixel variance;
                                   lags with M_e < 2 are 0)
    estimator "psd":              Cov_e = S_e / (N H W - 1) (the classical tapered autocovariance:
                                   every window's matrix is positive semidefinite)
    Cov_{-e}[c, c'] = Cov_e[c', c];  Cov_e = 0 for lags outside the image (|di| >= H or |dj| >= W).

The k x k patch moments are then ``mean[(c, i, j)] = m_c`` and ``cov[(c,i,j), (c',i',j')] =
Cov_{(i'-i, j'-j)}[c, c']``, for any odd k (k up to 2 max(H, W) - 1 reaches every lag inside
the image), returned as :class:`Moments` of kind "patch" with ``image_shape (C, k, k)`` so
:class:`analytic_diffusion.WindowedWiener` takes them directly. (For k <= H, W this differs from
docs/algorithms.md §2's patch moments only in which pixel pairs are averaged: all pairs at a lag instead of the
pairs inside fitting windows.)

Computation. The lag sums ``A_e[c,c'] = sum_b sum_q x[b,c,q] x[b,c',q+e]`` are a cross-
correlation: per chunk of images, ``irfft2(sum_b conj(F_bc) F_bc')`` of zero-padded FFTs
(size >= 2H-1 x 2W-1, so no wrap-around): O(N C^2 H W log HW). For uint8 the exact sums are
integers; the float64 result is rounded to the nearest integer only when the a-priori error
bound (:func:`fft_error_bound`) of that chunk is below 0.5 - chunks are sized so it is, and a
single image whose bound is not goes through the exact direct lag sums of the selected
``patch_moments`` backend instead. The int64 sums are then exact, independent of batch order
and size. Float data: float64 FFTs of ``x - shift`` (shift = per-channel mean of the first
batch), no rounding. ``method="direct"`` skips the FFT (exact O(N C^2 H^2 W^2) lag sums, the
faster choice for uint8 images up to about 40 x 40 on the compiled CPU backend, which
``method="auto"`` takes).
"""
from __future__ import annotations

import json
import math
import os
from typing import Optional, Tuple, Union

import torch

from ... import registry
from ..._validate import check_fits, to_unit
from ..moments import Moments
from ..moments.stats import FORMAT, U8_SCALE, save_safetensors
from . import _stream
from .layout import stationary_cov

__all__ = ["StationaryMomentAccumulator", "estimate_stationary_moments", "fft_error_bound"]

STATIONARY_FORMAT = FORMAT + "+stationary-accumulator"
UNIT_ROUNDOFF = 2.0**-53
ESTIMATORS = ("pairs", "psd")
METHODS = ("auto", "fft", "direct")
# "auto" on uint8: the compiled direct sums up to this many pixels per image (measured on one
# core: direct 0.7x the FFT's time at 32x32, 2.7x at 64x64; exact either way).
AUTO_DIRECT_MAX_PIXELS = 40 * 40
# Rounding a chunk's float64 FFT sums to integers is allowed only below this bound.
ROUND_LIMIT = 0.5


def fft_error_bound(l1: torch.Tensor, l2: torch.Tensor, fft_len: int) -> float:
    """A-priori bound on ``|computed - exact|`` of every entry of ``sum_b x_b (*) y_b``
    (cross-correlations) computed as ``irfft2(sum_b conj(rfft2 x_b) rfft2 y_b)`` in float64,
    for one chunk of ``nb`` images with per-image, per-channel norms ``l1 = ||x_bc||_1``,
    ``l2 = ||x_bc||_2`` (float64 ``[nb, C]``) and transform length ``fft_len = L``::

        bound = 2 u (21 log2 L + nb + 3) max_{c,c'} sum_b ||x_bc||_1 ||x_bc'||_2,   u = 2^-53

    From Higham (Accuracy and Stability of Numerical Algorithms, 2nd ed., Thm 24.2): a
    float64 FFT has ``||fl(FFT x) - FFT x||_2 <= eta_L ||FFT x||_2`` with ``eta_L ~ 7 u log2 L``
    (accurate twiddles). The two forward transforms (2 eta_L), the complex products (3u), the
    sum over the chunk (nb u) give, through Parseval and ``|IFFT d|_inf <= mean |d|``, at most
    ``(2 eta_L + (nb + 3) u) sum_b ||x_b||_2 ||y_b||_2``; the inverse transform adds
    ``eta_L ||result||_2 <= eta_L sum_b ||x_b||_1 ||y_b||_2`` (Young). ``||.||_2 <= ||.||_1``
    merges the terms, and the factor 2 is a margin for real-input, mixed-radix transforms.
    """
    if l1.numel() == 0:
        return 0.0
    pair = l1.T @ l2  # [C, C]: sum_b ||x_bc||_1 ||x_bc'||_2
    worst = float(torch.maximum(pair, pair.T).max())
    return 2.0 * UNIT_ROUNDOFF * (21.0 * math.log2(max(fft_len, 2)) + l1.shape[0] + 3.0) * worst


def _fast_len(n: int) -> int:
    """Smallest 2,3,5-smooth integer >= n (fast FFT sizes)."""
    m = n
    while True:
        r = m
        for p in (2, 3, 5):
            while r % p == 0:
                r //= p
        if r == 1:
            return m
        m += 1


def _region_sums(S1: torch.Tensor, Li: int, Lj: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For per-pixel sums ``S1 [C, H, W]`` and lags di in [0, Li], dj in [-Lj, Lj]:
    ``Lsum [Li+1, 2Lj+1, C]`` = sums over the q with q and q + e inside, ``Rsum`` = sums over
    the partners q + e, and the pixel-pair count per image ``M [Li+1, 2Lj+1]`` (int64)."""
    C, H, W = S1.shape
    I = torch.nn.functional.pad(S1.cumsum(-2).cumsum(-1), (1, 0, 1, 0))  # [C, H+1, W+1]
    dev = S1.device
    di = torch.arange(Li + 1, device=dev)[:, None].expand(Li + 1, 2 * Lj + 1)
    dj = torch.arange(-Lj, Lj + 1, device=dev)[None, :].expand(Li + 1, 2 * Lj + 1)

    def rect(r0, r1, c0, c1):
        return (I[:, r1, c1] - I[:, r0, c1] - I[:, r1, c0] + I[:, r0, c0]).permute(1, 2, 0)

    zero = torch.zeros_like(di)
    Lsum = rect(zero, H - di, (-dj).clamp(min=0), W - dj.clamp(min=0))
    Rsum = rect(di, zero + H, dj.clamp(min=0), W - (-dj).clamp(min=0))
    M = (H - di) * (W - dj.abs())
    return Lsum, Rsum, M


class StationaryMomentAccumulator:
    """Streaming stationary (all-offsets) moments of images ``[B, C, H, W]`` of one size.

    ``max_lag``: largest lag kept per axis (None: all, ``H - 1`` and ``W - 1``); ``method``:
    ``"fft"`` (exact for uint8 under the checked bound, direct sums where it fails),
    ``"direct"``, or ``"auto"`` (uint8 images of at most 40 x 40 pixels through the compiled
    direct sums, where they are faster, otherwise ``"fft"``); ``backend``: the ``patch_moments`` backend of the direct sums. ``update``,
    ``merge``, ``all_reduce``, ``save``/``load`` as for the other accumulators; ``result(k)``
    gives k x k patch moments of the stationary model (module docstring).
    """

    def __init__(self, channels: int, *, max_lag: Optional[int] = None, method: str = "auto", device=None, backend: Optional[str] = None):
        from . import _check_channels

        self.channels = _check_channels(channels)
        if max_lag is not None and (isinstance(max_lag, bool) or int(max_lag) != max_lag or max_lag < 0):
            raise ValueError(f"max_lag must be an integer >= 0 or None, got {max_lag!r}")
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        self.max_lag = None if max_lag is None else int(max_lag)
        self.method, self.backend = method, backend
        self.device = None if device is None else torch.device(device)
        self.images = 0
        self.mode: Optional[str] = None  # None, "int" (exact uint8 sums) or "float"
        self.size: Optional[Tuple[int, int]] = None
        self._A = self._S1 = self._shift = None
        self.methods_used: set = set()
        self.backends_used: set = set()
        self.max_bound = 0.0  # largest FFT error bound of a rounded chunk
        self.max_residual = 0.0  # largest |float result - nearest integer| seen

    # ---- internals
    @property
    def lags(self) -> Tuple[int, int]:
        H, W = self.size
        m = self.max_lag
        return (H - 1, W - 1) if m is None else (min(H - 1, m), min(W - 1, m))

    def _alloc(self, device, mode: str, size: Tuple[int, int]) -> None:
        self.device, self.mode, self.size = torch.device(device), mode, tuple(size)
        Li, Lj = self.lags
        C, (H, W) = self.channels, self.size
        dt = torch.int64 if mode == "int" else torch.float64
        self._A = torch.zeros(Li + 1, 2 * Lj + 1, C, C, dtype=dt, device=self.device)
        self._S1 = torch.zeros(C, H, W, dtype=dt, device=self.device)
        self._shift = None if mode == "int" else torch.zeros(C, dtype=torch.float64, device=self.device)

    def _to_float_mode(self) -> None:
        """Exact uint8 sums -> float sums of z = y + 1 = u / 127.5 (shift -1)."""
        self._A = self._A.to(torch.float64) / U8_SCALE**2
        self._S1 = self._S1.to(torch.float64) / U8_SCALE
        self._shift = torch.full((self.channels,), -1.0, dtype=torch.float64, device=self.device)
        self.mode = "float"

    def _recenter(self, new_shift: torch.Tensor) -> None:
        """Float sums around ``new_shift``: z' = z + delta, delta = shift - new_shift."""
        delta = self._shift - new_shift
        Li, Lj = self.lags
        H, W = self.size
        Lsum, Rsum, M = _region_sums(self._S1, Li, Lj)
        N = self.images
        self._A = (self._A + Lsum[..., :, None] * delta[None, None, None, :] + delta[None, None, :, None] * Rsum[..., None, :]
                   + (N * M).to(torch.float64)[..., None, None] * torch.outer(delta, delta))
        self._S1 = self._S1 + N * delta[:, None, None]
        self._shift = new_shift.clone()
        self._zero_unused()

    def _zero_unused(self) -> None:
        Lj = self.lags[1]
        self._A[0, :Lj] = 0  # di = 0, dj < 0: transposes, never stored

    def _direct(self, x: torch.Tensor, shift: Optional[torch.Tensor]):
        impl = registry.select("patch_moments", x.device, self.backend)
        self.backends_used.add(impl.name)
        self.methods_used.add("direct")
        Li, Lj = self.lags
        return impl.fn.lag_sums(x, Li, Lj, shift)

    def _fft_lags(self, z: torch.Tensor) -> torch.Tensor:
        """float64 ``[Li+1, 2Lj+1, C, C]`` lag sums of ``z [nb, C, H, W]`` (float64) by FFT."""
        H, W = self.size
        Li, Lj = self.lags
        Hf, Wf = _fast_len(2 * H - 1), _fast_len(2 * W - 1)
        F = torch.fft.rfft2(z, s=(Hf, Wf))  # [nb, C, Hf, Wf//2+1]
        G = torch.einsum("bcxy,bdxy->cdxy", F.conj(), F)
        corr = torch.fft.irfft2(G, s=(Hf, Wf))  # corr[c, c', e mod] = sum_b sum_q z_c(q) z_c'(q + e)
        cols = torch.arange(-Lj, Lj + 1, device=z.device) % Wf
        A = corr[:, :, : Li + 1][:, :, :, cols].permute(2, 3, 0, 1).contiguous()
        A[0, :Lj] = 0
        return A

    def _direct_is_cheaper(self, device) -> bool:
        H, W = self.size
        if H * W > AUTO_DIRECT_MAX_PIXELS:
            return False
        return registry.select("patch_moments", device, self.backend).name == "cpu"

    def _add_u8(self, x: torch.Tensor) -> None:
        self._S1 += x.sum(0, dtype=torch.int64)
        if self.method == "direct" or (self.method == "auto" and self._direct_is_cheaper(x.device)):
            A, _ = self._direct(x, None)
            self._A += A
            return
        H, W = self.size
        L = _fast_len(2 * H - 1) * _fast_len(2 * W - 1)
        xf = x.to(torch.float64)
        l1 = xf.sum((2, 3))
        l2 = xf.square().sum((2, 3)).sqrt()
        b, B = 0, x.shape[0]
        while b < B:
            # the largest chunk from b whose bound stays below half the rounding limit
            e = b + 1
            while e < B and e - b < 256 and fft_error_bound(l1[b : e + 1], l2[b : e + 1], L) < 0.5 * ROUND_LIMIT:
                e += 1
            bound = fft_error_bound(l1[b:e], l2[b:e], L)
            if bound < ROUND_LIMIT:
                A = self._fft_lags(xf[b:e])
                R = A.round()
                resid = float((A - R).abs().max())
                if resid <= bound:  # always, if the bound holds; anything else is not trusted
                    self._A += R.to(torch.int64)
                    self.methods_used.add("fft")
                    self.max_bound = max(self.max_bound, bound)
                    self.max_residual = max(self.max_residual, resid)
                    b = e
                    continue
            self._A += self._direct(x[b:e], None)[0]
            b = e

    def _add_float(self, y: torch.Tensor) -> None:
        z = y - self._shift.reshape(1, -1, 1, 1)
        self._S1 += z.sum(0)
        if self.method == "direct":
            self._A += self._direct(y, self._shift)[0]
        else:
            self._A += self._fft_lags(z)
            self.methods_used.add("fft")

    # ---- public API
    def update(self, images) -> "StationaryMomentAccumulator":
        """Accumulate the lag sums of ``images``: uint8 or float (in [-1, 1]) ``[B, C, H, W]``,
        all of this accumulator's image size. ``images`` is not modified."""
        from . import check_images

        images = check_images(images, self.channels)
        size = (int(images.shape[2]), int(images.shape[3]))
        if self.size is not None and size != self.size:
            raise ValueError(f"images have size {size[0]}x{size[1]}, but this accumulator holds {self.size[0]}x{self.size[1]} images (one size per accumulator)")
        if images.shape[0] == 0:
            return self
        device = self.device or images.device
        images = images.to(device)
        want = "int" if images.dtype == torch.uint8 else "float"
        if self.mode is None:
            self._alloc(device, want, size)
            if want == "float":
                self._shift = to_unit(images, torch.float64).mean((0, 2, 3))
        elif self.mode == "int" and want == "float":
            self._to_float_mode()
        if self.mode == "int":
            self._add_u8(images)
        else:
            self._add_float(to_unit(images, torch.float64))
        self.images += int(images.shape[0])
        return self

    def merge(self, other: "StationaryMomentAccumulator") -> "StationaryMomentAccumulator":
        """Fold ``other`` in (not modified). Exact for two uint8 states."""
        if not isinstance(other, StationaryMomentAccumulator):
            raise TypeError(f"other must be a StationaryMomentAccumulator, got {type(other).__name__}")
        if other.channels != self.channels or other.max_lag != self.max_lag:
            raise ValueError(f"cannot merge stationary accumulators with different channels or max_lag: ({self.channels}, {self.max_lag}) vs ({other.channels}, {other.max_lag})")
        if other.images == 0:
            return self
        if self.size is not None and other.size != self.size:
            raise ValueError(f"cannot merge stationary accumulators of different image sizes: {self.size} vs {other.size}")
        o = StationaryMomentAccumulator(other.channels, max_lag=other.max_lag).load_state_dict(other.state_dict(), self.device or other.device)
        if self.images == 0:
            self._alloc(self.device or other.device, o.mode, o.size)
            if o.mode == "float":
                self._shift = o._shift.clone()
        if self.mode == "int" and o.mode == "int":
            self._A += o._A
            self._S1 += o._S1
        else:
            if self.mode == "int":
                self._to_float_mode()
            if o.mode == "int":
                o._to_float_mode()
            o._recenter(self._shift)
            self._A += o._A
            self._S1 += o._S1
        self.images += other.images
        self.methods_used |= other.methods_used
        self.backends_used |= other.backends_used
        self.max_bound = max(self.max_bound, other.max_bound)
        self.max_residual = max(self.max_residual, other.max_residual)
        return self

    def all_reduce(self, group=None) -> "StationaryMomentAccumulator":
        """Merge the accumulators of every rank of ``group`` (torch.distributed); afterwards every
        rank holds the merged state. uint8-only states are summed as exact integers; otherwise
        every rank re-centres its float sums on the global per-channel mean first."""
        import torch.distributed as dist

        dev = self.device or (torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else torch.device("cpu"))
        H, W = self.size or (0, 0)
        info = torch.tensor([{None: 0, "int": 1, "float": 2}[self.mode], H, W, -H if self.size else -(1 << 40), -W if self.size else -(1 << 40)], dtype=torch.int64, device=dev)
        dist.all_reduce(info, op=dist.ReduceOp.MAX, group=group)
        mode = {0: None, 1: "int", 2: "float"}[int(info[0])]
        if mode is None:
            return self
        if int(info[1]) != -int(info[3]) or int(info[2]) != -int(info[4]):
            raise ValueError("all_reduce: ranks hold stationary accumulators of different image sizes")
        size = (int(info[1]), int(info[2]))
        if self.mode is None:
            self._alloc(dev if self.device is None else self.device, "int" if mode == "int" else "float", size)
        if mode == "float" and self.mode == "int":
            self._to_float_mode()
        n = torch.tensor([self.images], dtype=torch.int64, device=dev)
        dist.all_reduce(n, group=group)
        if mode == "float":
            # global per-channel mean: sum over ranks of (S1 + images * H * W * shift)
            tot = (self._S1.sum((1, 2)) + self.images * size[0] * size[1] * self._shift).to(dev)
            dist.all_reduce(tot, group=group)
            mean = (tot / max(int(n[0]) * size[0] * size[1], 1)).to(self.device)
            self._recenter(mean)
        A, S1 = self._A.to(dev), self._S1.to(dev)
        dist.all_reduce(A, group=group)
        dist.all_reduce(S1, group=group)
        self._A, self._S1 = A.to(self.device), S1.to(self.device)
        self.images = int(n[0])
        return self

    def lag_covariance(self, estimator: str = "pairs") -> Tuple[torch.Tensor, torch.Tensor]:
        """``(mean [C], cov_lags [Li+1, 2Lj+1, C, C])`` float64 in [-1, 1] units: the per-channel
        mean and ``Cov_e[c, c']`` for di in [0, Li], dj in [-Lj, Lj] (module docstring)."""
        if estimator not in ESTIMATORS:
            raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
        if self.images == 0:
            raise ValueError("no images accumulated (empty dataset?)")
        H, W = self.size
        Li, Lj = self.lags
        K = self.images * H * W
        if K < 2:
            raise ValueError(f"need at least 2 pixels per channel for a covariance, got {K}")
        Lsum, Rsum, M = _region_sums(self._S1, Li, Lj)
        A = self._A.clone()
        # di = 0, dj < 0 from the transposes
        A[0, :Lj] = A[0, Lj + 1 :].flip(0).transpose(-1, -2)
        A = A.to(torch.float64)
        Lsum, Rsum = Lsum.to(torch.float64), Rsum.to(torch.float64)
        mz = self._S1.to(torch.float64).sum((1, 2)) / K  # mean of z (u for uint8 sums)
        Mt = (self.images * M).to(torch.float64)[..., None, None]
        S = A - Lsum[..., :, None] * mz[None, None, None, :] - mz[None, None, :, None] * Rsum[..., None, :] + Mt * torch.outer(mz, mz)
        if estimator == "pairs":
            cov = torch.where(Mt >= 2, S / (Mt - 1).clamp(min=1), torch.zeros((), dtype=torch.float64, device=S.device))
        else:
            cov = S / (K - 1)
        if self.mode == "int":
            return (mz - U8_SCALE) / U8_SCALE, cov / U8_SCALE**2
        return self._shift + mz, cov

    def result(self, patch_size: Optional[int] = None, *, estimator: str = "pairs") -> Moments:
        """k x k patch moments of the stationary model: :class:`Moments` of kind "patch",
        ``image_shape (C, k, k)``; ``patch_size`` odd, default ``2 max(H, W) - 1`` (windows that
        see the whole image from any pixel), or with ``max_lag`` the largest odd k with
        ``k - 1 <= max_lag``. A k x k window holds lags up to k - 1: lags beyond the image are 0,
        lags beyond ``max_lag`` inside the image were not accumulated and cannot be asked for. ``count`` = pixels per channel (N*H*W); ``extra`` records the model,
        estimator, method(s), backend(s), image size and the FFT bound and residual."""
        from . import _check_patch_size

        mean_c, cov_lags = self.lag_covariance(estimator)
        H, W = self.size
        Li, Lj = self.lags
        if patch_size is None:
            # every lag that was accumulated: the whole image's (k = 2 max(H, W) - 1), or up to max_lag
            k = 2 * max(H, W) - 1 if self.max_lag is None else self.max_lag + 1 - self.max_lag % 2
        else:
            k = _check_patch_size(patch_size)
        r = k - 1
        if (r > Li and Li < H - 1) or (r > Lj and Lj < W - 1):
            raise ValueError(f"patch_size {k} needs lags up to {r}, but only lags up to max_lag={self.max_lag} were accumulated")
        C = self.channels
        d = C * k * k
        check_fits(8 * d * d * 3, cov_lags.device, f"a {d} x {d} patch covariance (k = {k})",
                   "Pass a smaller patch_size (or max_lag), or use lag_covariance() for the per-lag values.")
        cov = stationary_cov(cov_lags, C, k)
        cov = 0.5 * (cov + cov.T)
        mean = mean_c.repeat_interleave(k * k)
        extra = {
            "model": "stationary", "estimator": estimator, "method": "+".join(sorted(self.methods_used)),
            "backend": ",".join(sorted(self.backends_used)), "images": self.images, "image_size": [H, W],
            "max_lag": [Li, Lj], "exact": self.mode == "int",
            "fft_error_bound": self.max_bound, "fft_max_rounding_residual": self.max_residual,
        }
        return Moments(self.images * H * W, mean, cov, (C, k, k), "patch", extra)

    # ---- checkpoints (safetensors)
    def state_dict(self) -> dict:
        st = {"channels": torch.tensor(self.channels), "images": torch.tensor(self.images, dtype=torch.int64),
              "mode": torch.tensor({None: 0, "int": 1, "float": 2}[self.mode]),
              "max_lag": torch.tensor(-1 if self.max_lag is None else self.max_lag)}
        if self.mode is not None:
            st.update(A=self._A.cpu(), S1=self._S1.cpu(), size=torch.tensor(self.size))
            if self._shift is not None:
                st["shift"] = self._shift.cpu()
        return st

    def load_state_dict(self, st: dict, device=None) -> "StationaryMomentAccumulator":
        if int(st["channels"]) != self.channels:
            raise ValueError(f"state is for {int(st['channels'])} channels, this accumulator has {self.channels}")
        ml = int(st["max_lag"])
        self.max_lag = None if ml < 0 else ml
        self.mode = {0: None, 1: "int", 2: "float"}[int(st["mode"])]
        self.images = int(st["images"])
        if self.mode is not None:
            self.device = torch.device(device) if device is not None else (self.device or torch.device("cpu"))
            self.size = tuple(int(s) for s in st["size"])
            self._A, self._S1 = st["A"].to(self.device).clone(), st["S1"].to(self.device).clone()
            self._shift = st["shift"].to(self.device).clone() if "shift" in st else None
        return self

    def save(self, path: Union[str, os.PathLike]) -> None:
        """Checkpoint to safetensors (temporary file, then rename: never a torn file)."""
        meta = {"format": STATIONARY_FORMAT, "methods": json.dumps(sorted(self.methods_used)), "backends": json.dumps(sorted(self.backends_used)),
                "method": self.method, "max_bound": repr(self.max_bound), "max_residual": repr(self.max_residual)}
        save_safetensors(self.state_dict(), path, meta)

    @classmethod
    def load(cls, path: Union[str, os.PathLike], device=None, backend: Optional[str] = None, method: Optional[str] = None) -> "StationaryMomentAccumulator":
        """Read a checkpoint written by :meth:`save`."""
        from safetensors import safe_open
        from safetensors.torch import load_file

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        if meta.get("format") != STATIONARY_FORMAT:
            raise ValueError(f"{os.fspath(path)!r} is not a stationary-moments checkpoint (format={meta.get('format')!r})")
        st = load_file(str(path))
        ml = int(st["max_lag"])
        acc = cls(int(st["channels"]), max_lag=None if ml < 0 else ml, method=method or meta.get("method", "auto"), device=device, backend=backend)
        acc.load_state_dict(st, device)
        acc.methods_used = set(json.loads(meta.get("methods", "[]")))
        acc.backends_used = set(json.loads(meta.get("backends", "[]")))
        acc.max_bound, acc.max_residual = float(meta.get("max_bound", 0.0)), float(meta.get("max_residual", 0.0))
        return acc


def estimate_stationary_moments(
    data,
    max_lag: Optional[int] = None,
    *,
    patch_size: Optional[int] = None,
    estimator: str = "pairs",
    method: str = "auto",
    batch_size: int = 256,
    device=None,
    backend: Optional[str] = None,
    progress: bool = False,
    num_workers: int = 0,
    checkpoint: Optional[Union[str, os.PathLike]] = None,
    checkpoint_every: int = 100,
) -> Moments:
    """Stationary moments over all offsets up to the image size, as k x k patch moments.

    ``data``: images ``[N, C, H, W]`` of one size (uint8 or float in [-1, 1]; any source
    :func:`analytic_diffusion.data.iter_batches` takes). ``max_lag``: largest lag per axis
    (None: everything inside the image). ``patch_size``: odd k of the result (default
    ``2 * max(H, W) - 1``: windows that see the whole image from any pixel; with ``max_lag``
    the largest odd k <= max_lag + 1, since a k x k window holds lags up to k - 1); may exceed
    the image, lags outside it are 0. ``estimator``: ``"pairs"`` (per-lag
    average over the pixel pairs at that lag) or ``"psd"`` (tapered, positive semidefinite);
    see :mod:`.stationary`. ``method``: ``"fft"`` (exact for uint8 under a checked error bound,
    direct sums where it fails), ``"direct"``, or ``"auto"`` (``"fft"``, except uint8 images of
    at most 40 x 40 pixels on the compiled CPU backend, whose direct sums are faster). The
    uint8 sums are bit-identical whichever method runs. ``backend``: the ``patch_moments`` backend
    of the direct sums. ``num_workers``, ``checkpoint``, ``checkpoint_every`` as in
    :func:`estimate_moments` (uint8 resumes are bit-identical).

    Returns :class:`Moments` of kind ``"patch"`` with ``image_shape (C, k, k)``, usable by
    :class:`analytic_diffusion.WindowedWiener`; ``extra["model"] == "stationary"``.
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
    if patch_size is not None:
        from . import _check_patch_size

        _check_patch_size(patch_size)
    acc = _stream.drive(
        data,
        lambda batch, dev: StationaryMomentAccumulator(batch.shape[1], max_lag=max_lag, method=method, device=dev or batch.device, backend=backend),
        lambda path: StationaryMomentAccumulator.load(path, device=device, backend=backend, method=method),
        batch_size=batch_size, device=device, progress=progress, num_workers=num_workers,
        checkpoint=checkpoint, checkpoint_every=checkpoint_every, desc="stationary moments",
    )
    if acc.max_lag != (None if max_lag is None else int(max_lag)):
        raise ValueError(f"checkpoint {os.fspath(checkpoint)!r} holds max_lag={acc.max_lag}, not {max_lag}")
    return acc.result(patch_size, estimator=estimator)
