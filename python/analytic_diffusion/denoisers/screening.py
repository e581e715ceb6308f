"""GoldDiff screening (docs/algorithms.md §12): an approximate mode of the locality denoiser
that runs its exact softmax (§5) over a per-query subset of the training set.

Conventions checked against the published code (github shangxinyi/GoldDiff, methods/base.py
``_get_knn_subset_and_distances`` and methods/ours.py), which agrees with docs/algorithms.md §12:

- ``lam = 1 - sqrt(1 - ab_t)`` clamped to [0, 1] ("locality_factor = 1 - noise_level",
  noise_level = sqrt(beta_prod_t));
- pool ``m = clip(round(k_max + (N - k_max)*lam), k_max, N)`` drawn uniformly at random per
  query ("pre-sampling": the m smallest of ``torch.rand(B, N)``), fresh at every step;
- coarse: the k_max nearest within the pool by the unmasked ``||A(x_t) - a*A(y)||^2``, A =
  average pooling by ``factor`` (GoldDiff: ``low_res_dim`` = the largest divisor of the
  resolution <= 16 for CIFAR-10, i.e. factor 2 at 32 px; docs/algorithms.md §12: factor 4 at 64 px);
- fine: the ``k_t = max(k_min, round(k_max - (k_max - k_min)*lam))`` nearest of those by the
  unmasked full-resolution ``||x_t - a*y||^2``;
- then the exact (``weight_method: ss``) masked softmax of §5 over those k_t images only.

Differences from the published code, none of which changes the definition: GoldDiff computes
both screening distances in float32 with the expanded form ``|x|^2 + a^2|y|^2 - 2a x.y``;
here both stages use the expanded form in float64 (pooled images and squared norms computed
once, in float64), so the selected sets can differ from GoldDiff's
only where float32 rounding reorders near-ties. GoldDiff's StreamingSoftmax returns
``acc / (l + 1e-8)`` with ``l >= 1`` (a relative bias below 1e-8); the exact softmax here
divides by ``l``. GoldDiff clamps k_min and k_max to N the same
way; its comment in configs/defaults.yaml ("afhq 32, celeba-hq 32") suggests a 32 x 32 coarse
grid (factor 2) for the 64 px sets, where docs/algorithms.md §12 says factor 4: ``pool_size`` selects either.
"""
from __future__ import annotations

import math
from typing import Dict, Optional

import torch
import torch.nn.functional as F

from .._validate import to_unit
from ..presets import published
from ..schedule import noise_level

_BLOCK_VALUES = 1 << 22

_OPTION_KEYS = ("preset", "k_min", "k_max", "pool_size", "pool_factor", "seed", "generator", "record_error")


def pool_factor(H: int, W: int, pool_size: int = 16) -> int:
    """GoldDiff's pooling factor: H / (the largest divisor of H that is <= pool_size), kept
    only if it also divides W (else 1). 32 px -> 2, 64 px -> 4, 28 px -> 2, 16 px -> 1."""
    low = max(d for d in range(1, min(H, pool_size) + 1) if H % d == 0)
    f = H // low
    return f if W % f == 0 else 1


def _count(name: str, v) -> int:
    if isinstance(v, bool) or not isinstance(v, int) and not hasattr(v, "__index__"):
        raise TypeError(f"screening_options[{name!r}] must be an int, got {type(v).__name__} {v!r}")
    if int(v) < 1:
        raise ValueError(f"screening_options[{name!r}] must be >= 1, got {v!r}")
    return int(v)


class GoldDiffScreening:
    """Per-step, per-query candidate selection of GoldDiff (module docstring).

    ``options`` (all optional): ``preset`` (a dataset of ``presets.published.GOLDDIFF``: its
    k_min, k_max, pool_size), ``k_min``, ``k_max`` (default N/20 and N/10, the CIFAR-10
    ratios 2500/5000 of 50,000), ``pool_size`` (side of the coarse grid, default 16) or
    ``pool_factor`` (explicit), ``seed`` (default 0) or ``generator`` (a CPU torch.Generator)
    for the random pools, ``record_error`` (also run the exact denoiser every step and append
    the comparison to ``LocalityDenoiser.screening_log``).

    Random draws, per call: ``r = torch.rand((B, N), generator=g, dtype=torch.float64)``;
    the pool of query b is the m indices of the smallest ``r[b]`` (``torch.topk(r, m,
    largest=False)``).
    """

    def __init__(self, train: torch.Tensor, image_shape, options: Optional[Dict] = None):
        opts = dict(options or {})
        unknown = sorted(set(opts) - set(_OPTION_KEYS))
        if unknown:
            raise ValueError(f"screening_options has unknown key(s) {unknown}; known: {list(_OPTION_KEYS)}")
        N = train.shape[0]
        if "preset" in opts:
            name = opts.pop("preset")
            if name not in published.GOLDDIFF:
                raise ValueError(f"screening_options['preset'] must be one of {sorted(published.GOLDDIFF)}, got {name!r}")
            p = published.GOLDDIFF[name]
            for key in ("k_min", "k_max", "pool_size"):
                opts.setdefault(key, p[key])
        k_max = _count("k_max", opts["k_max"]) if opts.get("k_max") is not None else max(1, round(N / 10))
        k_min = _count("k_min", opts["k_min"]) if opts.get("k_min") is not None else max(1, round(N / 20))
        if k_min > k_max:
            raise ValueError(f"screening_options: k_min ({k_min}) must be <= k_max ({k_max})")
        self.k_max = min(k_max, N)  # clamped to N as GoldDiff does
        self.k_min = min(k_min, self.k_max)
        if len(image_shape) != 3:
            raise ValueError(f"GoldDiff screening needs image-shaped training data [N, C, H, W], got image shape {tuple(image_shape)}")
        C, H, W = image_shape
        if opts.get("pool_factor") is not None:
            f = _count("pool_factor", opts["pool_factor"])
            if H % f or W % f:
                raise ValueError(f"screening_options['pool_factor'] = {f} must divide the image size {H} x {W}")
        else:
            f = pool_factor(H, W, _count("pool_size", opts.get("pool_size", 16)))
        self.factor = f
        self.image_shape = (C, H, W)
        gen = opts.get("generator")
        if gen is not None:
            if not isinstance(gen, torch.Generator) or gen.device.type != "cpu":
                raise TypeError("screening_options['generator'] must be a CPU torch.Generator")
            self.generator = gen
        else:
            seed = opts.get("seed", 0)
            if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
                raise ValueError(f"screening_options['seed'] must be an int >= 0, got {seed!r}")
            self.generator = torch.Generator().manual_seed(seed)
        self.record_error = bool(opts.get("record_error", False))
        self._pooled: Dict[torch.device, tuple] = {}

    def sizes(self, N: int, alpha_bar: float):
        """``(m, k_t)``: pool size and fine budget at this noise level (§12)."""
        _, s2 = noise_level(alpha_bar)
        lam = min(1.0, max(0.0, 1.0 - math.sqrt(max(s2, 0.0))))
        m = min(N, max(self.k_max, int(round(self.k_max + (N - self.k_max) * lam))))
        k_t = max(self.k_min, int(round(self.k_max - (self.k_max - self.k_min) * lam)))
        return m, k_t

    def _pool(self, v: torch.Tensor) -> torch.Tensor:
        """Average pooling by ``factor`` of flat images ``[b, n]`` -> ``[b, n / factor^2]``."""
        if self.factor == 1:
            return v
        return F.avg_pool2d(v.reshape(v.shape[0], *self.image_shape), self.factor).reshape(v.shape[0], -1)

    def _pooled_train(self, train: torch.Tensor):
        """Per device, once: the pooled training images (float64, ``N * n / factor^2`` values),
        their squared norms, and the squared norms of the full-resolution images (float64)."""
        dev = train.device
        if dev not in self._pooled:
            parts, norms = [], []
            for k0 in range(0, train.shape[0], 2048):
                y = to_unit(train[k0 : k0 + 2048].reshape(-1, train[0].numel()), torch.float64)
                parts.append(self._pool(y))
                norms.append((y**2).sum(1))
            yp = torch.cat(parts)
            self._pooled[dev] = (yp, (yp**2).sum(1), torch.cat(norms))
        return self._pooled[dev]

    def select(self, x: torch.Tensor, train: torch.Tensor, alpha_bar: float) -> torch.Tensor:
        """Survivors of the screening: int64 ``[B, k_t]``, ascending indices per query.
        ``x`` ``[B, n]``, ``train`` ``[N, n]`` or ``[N, C, H, W]``. Draws one pool per query.
        Few large tensor ops (all queries at once), not per-query loops."""
        B, n = x.shape
        N = train.shape[0]
        flat = train.reshape(N, n)
        a, _ = noise_level(alpha_bar)
        m, k_t = self.sizes(N, alpha_bar)
        r = torch.rand((B, N), generator=self.generator, dtype=torch.float64).to(x.device)
        pool = torch.topk(r, m, dim=1, largest=False).indices  # [B, m]
        # coarse: pooled distances to every image (one float64 GEMM, expanded form), non-pool masked out
        xf = x.to(torch.float64)
        xp = self._pool(xf)
        yp, yp2, y2 = self._pooled_train(flat)
        dc = (xp**2).sum(1, keepdim=True) + (a * a) * yp2 - (2.0 * a) * (xp @ yp.T)  # [B, N]
        in_pool = torch.zeros(B, N, dtype=torch.bool, device=x.device)
        in_pool.scatter_(1, pool, True)
        dc.masked_fill_(~in_pool, math.inf)
        coarse = torch.topk(dc, self.k_max, dim=1, largest=False).indices  # [B, k_max]
        # fine: full-resolution distances to the coarse survivors, float64 expanded form with
        # precomputed norms (selection only; one conversion pass over the gathered rows)
        x2 = (xf**2).sum(1)
        d = torch.empty(B, self.k_max, dtype=torch.float64, device=x.device)
        cstep = max(1, min(self.k_max, _BLOCK_VALUES // n))  # candidates per block
        step = max(1, _BLOCK_VALUES // (cstep * n))  # queries per block
        for b0 in range(0, B, step):
            xb = xf[b0 : b0 + step]
            shift = 127.5 * xb.sum(1, keepdim=True)
            for c0 in range(0, self.k_max, cstep):
                idx = coarse[b0 : b0 + step, c0 : c0 + cstep]
                dots = torch.bmm(flat[idx].to(torch.float64), xb[:, :, None])[..., 0]  # [b, c]
                if flat.dtype == torch.uint8:  # y = (u - 127.5) / 127.5
                    dots = (dots - shift) / 127.5
                d[b0 : b0 + step, c0 : c0 + cstep] = x2[b0 : b0 + step, None] + (a * a) * y2[idx] - (2.0 * a) * dots
        keep = coarse.gather(1, torch.topk(d, k_t, dim=1, largest=False).indices)
        return torch.sort(keep, dim=1).values
