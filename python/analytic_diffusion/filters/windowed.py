"""The windowed Wiener filter: the optimal linear denoiser restricted to k x k windows,
from stationary patch moments (docs/algorithms.md §2), for images whose full covariance does not fit.

Derivation. Let ``y_w`` be the clean ``C*k*k`` window centred at an output pixel, with
patch mean ``mu`` and patch covariance ``S`` (the stationary patch moments), and
``x_w = a y_w + s eps`` its noisy observation (``a = sqrt(ab)``, ``s2 = 1 - ab``).
The minimum-MSE *linear* estimate of the clean centre value of channel c (index
``cc = c*k*k + r*k + r``, ``r = (k-1)/2``) from ``x_w`` is::

    E[y_cc] + Cov(y_cc, x_w) Cov(x_w)^-1 (x_w - a mu)
      with Cov(y_cc, x_w) = a S[cc, :],  Cov(x_w) = ab S + s2 I,

i.e. ``x0_hat[c] = mu_cc + w_c . (x_w - a mu)`` with ``w_c = a (ab S + s2 I)^-1 S[:, cc]``.
With ``S = V diag(lam) V^T`` this is ``w_c = (V diag(g) V^T)[cc] / a``, ``g = ab lam /
(ab lam + s2)``: row ``cc`` of the patch-sized Wiener filter divided by ``a``, exactly
like the Jacobian ``A_t / a`` of the full filter (docs/algorithms.md §3). Stacking ``w_c`` over the
output channels gives a convolution kernel ``K [C_out, C_in, k, k]`` (``torch`` conv2d is a
cross-correlation, so ``K[c, c', i, j]`` multiplies input pixel ``(h + i - r, w + j - r)``,
matching the patch vector's (channel, row, column) order) and a bias
``b_c = mu_cc - a K[c] . mu``. The kernel depends on ``ab`` only, never on the image
size, so one set of patch moments serves every resolution.

Borders. A window that sticks out of the image is not padded with invented values:
a border pixel gets the MMSE linear estimate from the part of its window inside the
image, ``w = a (ab S_OO + s2 I)^-1 S[O, cc]`` over the observed offsets ``O`` (the
stationary model's marginal). The part inside is a rectangle fixed by how far the
window sticks out on each side, so there are at most ``k^2`` distinct kernels per
timestep (``(2r+1)`` row cases times ``(2r+1)`` column cases), each a small float64
Cholesky solve, cached per timestep. Applying them is one ``conv2d`` over each block
of pixels sharing a case (the interior is one block). Padding values are multiplied by
the zero weights of the cut kernels, so zero padding is used and never matters.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch

from .._validate import check_alpha_bar, check_fits, check_queries, check_threshold
from ..ops.moments import Moments
from .wiener import DIAG_EPS
from ..schedule import noise_level

Cuts = Tuple[int, int, int, int]  # window rows cut at the top, bottom; columns cut left, right
_CACHE_STEPS = 32  # timesteps whose kernels are kept (a DDIM schedule has 10-100)


def _image_shape_arg(image_shape, name: str = "image_shape") -> Tuple[int, int, int]:
    try:
        shape = tuple(int(s) for s in image_shape)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be (C, H, W), got {image_shape!r}") from None
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"{name} must be (C, H, W) with positive sizes, got {image_shape!r}")
    return shape


def _runs(size: int, r: int) -> List[Tuple[int, int, int, int]]:
    """Output positions ``0..size-1`` grouped into runs ``(start, stop, cut_lo, cut_hi)`` of
    consecutive positions whose window ``[p - r, p + r]`` sticks out by the same amounts."""
    runs: List[Tuple[int, int, int, int]] = []
    for p in range(size):
        cut = (max(0, r - p), max(0, p + r - (size - 1)))
        if runs and runs[-1][2:] == cut:
            runs[-1] = (runs[-1][0], p + 1) + cut
        else:
            runs.append((p, p + 1) + cut)
    return runs


class WindowedWiener:
    """The Wiener filter of docs/algorithms.md §3 restricted to k x k windows, from patch moments.

    Args:
        patch_moments: :class:`Moments` with ``kind == "patch"`` and ``image_shape ==
            (C, k, k)``, k odd (``estimate_patch_moments`` or ``Moments.load`` of a
            ``stats --patch-size`` file): float64 mean ``[C*k*k]``, cov ``[C*k*k, C*k*k]``.
        image_shape: optional default ``(C, H, W)`` for the methods that need an image
            size (:meth:`sensitivity`, :meth:`dense_mask`, :meth:`matrix`, flat
            ``[B, n]`` input to :meth:`apply`). Any ``H, W`` works, including ones
            smaller than the window.

    The patch covariance is symmetrised and its eigenvalues clamped at 0 once (as
    :class:`WienerFilter` does), so every system ``ab S + s2 I`` is positive definite.
    The moments are not modified.
    """

    def __init__(self, patch_moments: Moments, image_shape: Optional[Sequence[int]] = None):
        if not isinstance(patch_moments, Moments):
            raise TypeError(f"patch_moments must be analytic_diffusion.Moments, got {type(patch_moments).__name__}")
        if patch_moments.kind != "patch":
            raise ValueError(
                f"patch_moments must be patch moments (kind 'patch', from estimate_patch_moments), got kind {patch_moments.kind!r}; "
                "use WienerFilter for full-image moments"
            )
        shape = patch_moments.image_shape
        if shape is None or len(shape) != 3 or shape[1] != shape[2] or shape[1] % 2 == 0:
            raise ValueError(f"patch_moments.image_shape must be (C, k, k) with k odd, got {shape!r}")
        C, k = int(shape[0]), int(shape[1])
        d = C * k * k
        if patch_moments.mean.shape != (d,) or patch_moments.cov.shape != (d, d):
            raise ValueError(
                f"patch_moments of image_shape {tuple(shape)} need mean [{d}] and cov [{d}, {d}], "
                f"got {tuple(patch_moments.mean.shape)} and {tuple(patch_moments.cov.shape)}"
            )
        if not bool(torch.isfinite(patch_moments.cov).all()) or not bool(torch.isfinite(patch_moments.mean).all()):
            raise ValueError("patch_moments contains NaN/Inf")
        self.channels, self.k, self.r = C, k, k // 2
        self.image_shape = None if image_shape is None else self._shape(image_shape)
        c = patch_moments.cov.to(torch.float64)
        c = 0.5 * (c + c.T)
        lam, V = torch.linalg.eigh(c)
        self.cov = (V * lam.clamp_min(0.0)) @ V.T  # float64 [d, d], PSD: the model the solves use
        self.mean = patch_moments.mean.to(torch.float64).clone()  # float64 [d]
        centre = self.r * k + self.r
        self.centres = torch.arange(C, device=self.cov.device) * (k * k) + centre  # cc of each channel
        # (ab, device) -> {cuts: (weight float64 [C, C, k, k], bias float64 [C])}
        self._cache: "OrderedDict[Tuple[float, torch.device], Dict[Cuts, Tuple[torch.Tensor, torch.Tensor]]]" = OrderedDict()

    # ------------------------------------------------------------------ helpers
    @property
    def patch_size(self) -> int:
        return self.k

    @property
    def device(self) -> torch.device:
        return self.cov.device

    def _shape(self, image_shape) -> Tuple[int, int, int]:
        shape = _image_shape_arg(image_shape)
        if shape[0] != self.channels:
            raise ValueError(f"image_shape {shape} has {shape[0]} channels, but the patch moments have {self.channels}")
        return shape

    def _shape_or_default(self, image_shape) -> Tuple[int, int, int]:
        if image_shape is not None:
            return self._shape(image_shape)
        if self.image_shape is None:
            raise ValueError("image_shape is needed (the windowed filter works at any size): pass image_shape=(C, H, W) here or to WindowedWiener")
        return self.image_shape

    def _kernels(self, ab: float, device: torch.device) -> Dict[Cuts, Tuple[torch.Tensor, torch.Tensor]]:
        key = (ab, torch.device(device))
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        if len(self._cache) >= _CACHE_STEPS:
            self._cache.popitem(last=False)
        entry: Dict[Cuts, Tuple[torch.Tensor, torch.Tensor]] = {}
        self._cache[key] = entry
        return entry

    def kernel(self, alpha_bar: float, cuts: Cuts = (0, 0, 0, 0), device=None) -> Tuple[torch.Tensor, torch.Tensor]:
        """The filter of one output pixel at noise level ``alpha_bar``.

        ``cuts = (top, bottom, left, right)``: how many window rows/columns lie outside
        the image on each side (all 0 away from the borders). Returns ``(weight, bias)``:
        float64 ``weight [C_out, C_in, k, k]`` (zero on the cut rows/columns) and
        ``bias [C_out]`` with ``x0_hat[c] = sum(weight[c] * x_window) + bias[c]``; the
        weight is the Jacobian ``d x0_hat / d x_t`` (``A / a`` in docs/algorithms.md §3's terms).
        Solved once per (timestep, cuts) in float64 and cached.
        """
        ab = check_alpha_bar(alpha_bar)
        top, bottom, left, right = (int(v) for v in cuts)
        k = self.k
        if min(top, bottom, left, right) < 0 or max(top, bottom, left, right) > self.r:
            raise ValueError(f"cuts must be 4 integers in [0, {self.r}] (the window's centre is always inside), got {tuple(cuts)}")
        device = torch.device(device) if device is not None else self.device
        entry = self._kernels(ab, device)
        key = (top, bottom, left, right)
        if key not in entry:
            if device != self.device:
                w, b = self.kernel(ab, key)  # solved once on the moments' device
                entry[key] = (w.to(device), b.to(device))
            else:
                entry[key] = self._solve(ab, key)
        return entry[key]

    def _solve(self, ab: float, cuts: Cuts) -> Tuple[torch.Tensor, torch.Tensor]:
        top, bottom, left, right = cuts
        C, k = self.channels, self.k
        a, s2 = noise_level(ab)
        inside = torch.zeros(C, k, k, dtype=torch.bool, device=self.device)
        inside[:, top : k - bottom, left : k - right] = True
        O = inside.reshape(-1).nonzero().squeeze(1)  # observed window offsets
        S_OO = self.cov[O][:, O]
        system = ab * S_OO + s2 * torch.eye(O.numel(), dtype=torch.float64, device=self.device)
        L = torch.linalg.cholesky(system)  # PD: S is clamped PSD and s2 > 0
        rhs = a * self.cov[O][:, self.centres]  # Cov(x_O, y_cc) for every output channel c: [|O|, C]
        w_O = torch.cholesky_solve(rhs, L)  # [|O|, C]
        weight = torch.zeros(C, C * k * k, dtype=torch.float64, device=self.device)
        weight[:, O] = w_O.T
        bias = self.mean[self.centres] - a * (weight @ self.mean)
        return weight.reshape(C, C, k, k), bias

    # ------------------------------------------------------------------ the denoiser
    def apply(self, x: torch.Tensor, alpha_bar: float) -> torch.Tensor:
        """The windowed Wiener estimate ``x0_hat`` of every pixel from its k x k window.

        ``x``: float32/float64 ``[B, C, H, W]`` (any ``H, W``), or ``[B, n]`` when an
        ``image_shape`` was given. Computed in float64 on ``x``'s device; returns a new
        tensor of ``x``'s shape and dtype (``x`` is not modified).
        """
        ab = check_alpha_bar(alpha_bar)
        x = check_queries(x, "x")
        flat = x.dim() == 2
        if flat:
            C, H, W = self._shape_or_default(None)
            if x.shape[1] != C * H * W:
                raise ValueError(f"x has {x.shape[1]} values per image, but image_shape {(C, H, W)} has {C * H * W}")
            z = x.reshape(x.shape[0], C, H, W)
        else:
            if x.shape[1] != self.channels:
                raise ValueError(f"x has {x.shape[1]} channels, but the patch moments have {self.channels}")
            z = x
        B, C, H, W = z.shape
        r = self.r
        zp = torch.nn.functional.pad(z.to(torch.float64), (r, r, r, r))  # zeros: multiplied by the cut kernels' zeros
        out = torch.empty(B, C, H, W, dtype=torch.float64, device=x.device)
        for h0, h1, top, bottom in _runs(H, r):
            for w0, w1, left, right in _runs(W, r):
                weight, bias = self.kernel(ab, (top, bottom, left, right), device=x.device)
                block = zp[:, :, h0 : h1 + 2 * r, w0 : w1 + 2 * r]
                out[:, :, h0:h1, w0:w1] = torch.nn.functional.conv2d(block, weight) + bias[:, None, None]
        return out.to(x.dtype).reshape(x.shape)

    # ------------------------------------------------------------------ fields and masks
    def _flat_pixels(self, pixels, n: int) -> torch.Tensor:
        if isinstance(pixels, torch.Tensor):
            idx = pixels.reshape(-1).to(torch.long).cpu()
        else:
            idx = torch.as_tensor([pixels] if isinstance(pixels, int) else list(pixels), dtype=torch.long)
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= n):
            raise ValueError(f"pixels must be flat indices c*H*W + h*W + w in [0, {n - 1}], got {idx.tolist()}")
        return idx

    def _place(self, rows: torch.Tensor, pixels: torch.Tensor, shape, fill) -> torch.Tensor:
        """Put the per-pixel ``[C_in, k, k]`` arrays produced by ``fill(c, cuts)`` at each
        pixel's window in a ``[P, C, H, W]`` zero image."""
        C, H, W = shape
        r, k = self.r, self.k
        for p, m in enumerate(pixels.tolist()):
            c, h, w = m // (H * W), (m // W) % H, m % W
            cuts = (max(0, r - h), max(0, h + r - (H - 1)), max(0, r - w), max(0, w + r - (W - 1)))
            src = fill(c, cuts)
            top, bottom, left, right = cuts
            rows[p, :, h - r + top : h + r + 1 - bottom, w - r + left : w + r + 1 - right] = src[:, top : k - bottom, left : k - right]
        return rows

    def sensitivity(self, alpha_bar: float, pixels: Union[int, Sequence[int], torch.Tensor], image_shape: Optional[Sequence[int]] = None) -> torch.Tensor:
        """Jacobian rows ``d x0_hat[m] / d x_t`` of output pixels ``pixels`` (flat indices
        ``c*H*W + h*W + w``): float64 ``[P, C, H, W]``, the pixel's kernel placed at the
        pixel (the cut kernel near a border), zero outside its window. Like
        :meth:`WienerFilter.sensitivity`, this already includes the ``1 / a``."""
        ab = check_alpha_bar(alpha_bar)
        shape = self._shape_or_default(image_shape)
        n = shape[0] * shape[1] * shape[2]
        idx = self._flat_pixels(pixels, n)
        rows = torch.zeros(idx.numel(), *shape, dtype=torch.float64, device=self.device)
        return self._place(rows, idx, shape, lambda c, cuts: self.kernel(ab, cuts)[0][c])

    def matrix(self, alpha_bar: float, image_shape: Optional[Sequence[int]] = None) -> torch.Tensor:
        """The dense windowed filter ``A_w = a * Jacobian``: float64 ``[n, n]`` (row m is output
        pixel m's gains), the analogue of :meth:`WienerFilter.matrix`. For small images."""
        ab = check_alpha_bar(alpha_bar)
        shape = self._shape_or_default(image_shape)
        n = shape[0] * shape[1] * shape[2]
        check_fits(8 * n * n, self.device, f"a dense {n} x {n} windowed filter matrix")
        return self.sensitivity(ab, torch.arange(n), shape).reshape(n, n) * math.sqrt(ab)

    def mask(self, alpha_bar: float, threshold: float = 0.02) -> torch.Tensor:
        """The locality window pattern, the windowed analogue of docs/algorithms.md §4.

        docs/algorithms.md §4 gives output pixel m the window ``{j : |A[m, j] / A[j, j]| >= threshold *
        max |Mt|}`` for the (symmetric) full filter. Here ``A[m, j]`` is the interior
        kernel (times ``a``) and ``A[j, j]`` the centre weight of input channel c', so::

            Mt[c, c', i, j] = K[c, c', i, j] / K[c', c', r, r]       (|K[c', c', r, r]| * a < 1e-6 -> 1)

        and the max is over the whole pattern. Stationary: the same for every pixel away
        from the borders (:meth:`dense_mask` clips it at the borders).

        Returns bool ``[C_out, C_in, k, k]`` (``[c]`` is the window of an output pixel of
        channel c, centred at ``(r, r)``) if ``threshold > 0``, else the float64 weights
        ``Mt`` of that shape.
        """
        threshold = check_threshold(threshold)
        ab = check_alpha_bar(alpha_bar)
        weight = self.kernel(ab)[0]
        a = math.sqrt(ab)
        centre = weight[torch.arange(self.channels), torch.arange(self.channels), self.r, self.r] * a
        centre = torch.where(centre.abs() < DIAG_EPS, torch.ones_like(centre), centre)
        Mt = (weight * a) / centre[None, :, None, None]
        if threshold <= 0:
            return Mt
        return Mt.abs() >= threshold * Mt.abs().max()

    def window(self, alpha_bar: float, threshold: float, pixels, image_shape: Optional[Sequence[int]] = None) -> torch.Tensor:
        """The windows of output pixels ``pixels`` (flat indices) in image coordinates: the
        :meth:`mask` pattern of the pixel's channel placed at the pixel and clipped to the
        image; bool (or float64 if ``threshold <= 0``) ``[P, C, H, W]``. Column m of
        :meth:`dense_mask`, without building it."""
        shape = self._shape_or_default(image_shape)
        pattern = self.mask(alpha_bar, threshold)
        idx = self._flat_pixels(pixels, shape[0] * shape[1] * shape[2])
        rows = torch.zeros(idx.numel(), *shape, dtype=pattern.dtype, device=self.device)
        return self._place(rows, idx, shape, lambda c, cuts: pattern[c])

    def mask_density(self, alpha_bar: float, threshold: float = 0.02, image_shape: Optional[Sequence[int]] = None) -> float:
        """The fraction of nonzero entries of :meth:`dense_mask`, counted without building it
        (usable at any image size)."""
        C, H, W = self._shape_or_default(image_shape)
        nz = self.mask(alpha_bar, threshold) != 0  # [C, C, k, k]
        off = torch.arange(self.k) - self.r
        rows = (H - off.abs()).clamp_min(0).to(torch.float64)  # output rows whose input row h + di is inside
        cols = (W - off.abs()).clamp_min(0).to(torch.float64)
        count = (nz.to(torch.float64).sum((0, 1)).cpu() * rows[:, None] * cols[None, :]).sum()
        n = C * H * W
        return float(count) / (n * n)

    def dense_mask(self, alpha_bar: float, threshold: float = 0.02, image_shape: Optional[Sequence[int]] = None) -> torch.Tensor:
        """The [n, n] locality mask for :class:`LocalityDenoiser` (docs/algorithms.md §4's layout): column m
        is the window of output pixel m, i.e. :meth:`mask`'s pattern of m's channel placed
        at m and clipped to the image. bool ``[n, n]`` (float64 weights if ``threshold <= 0``).

        It is dense: ``n^2`` bytes (8 n^2 for weights), e.g. 150 MB for 3x64x64 images and
        2.4 GB for 3x128x128, so it is for moderate n (the locality denoiser's own cost,
        ``B * N * n^2`` per step, has the same limit). Refused before allocating if it
        would not fit in memory.
        """
        ab = check_alpha_bar(alpha_bar)
        C, H, W = self._shape_or_default(image_shape)
        n = C * H * W
        pattern = self.mask(ab, threshold).cpu()
        itemsize = 1 if pattern.dtype == torch.bool else 8
        check_fits(itemsize * n * n, torch.device("cpu"), f"a dense {n} x {n} locality mask", "Use WindowedWiener.mask / window for the compact windows.")
        M = torch.zeros(n, n, dtype=pattern.dtype)
        r = self.r
        hh = torch.arange(H)[:, None]
        ww = torch.arange(W)[None, :]
        for c, ci, i, j in pattern.nonzero().tolist():
            di, dj = i - r, j - r
            h = hh[max(0, -di) : min(H, H - di)]  # output rows whose input row h + di is inside
            w = ww[:, max(0, -dj) : min(W, W - dj)]
            out_idx = c * H * W + h * W + w
            in_idx = ci * H * W + (h + di) * W + (w + dj)
            M[in_idx, out_idx] = pattern[c, ci, i, j]
        return M
