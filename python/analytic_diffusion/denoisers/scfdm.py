"""The smoothed closed-form diffusion model (Scarvelis et al.; docs/algorithms.md §11)."""
from __future__ import annotations

import math
from typing import Optional

import torch

from .. import registry
from .._validate import check_chunk_size, check_positive, to_unit
from ..presets import published
from ..schedule import noise_level
from .base import TrainSetDenoiser

_BLOCK_VALUES = 1 << 22  # bound on the gathered [b, k, n] neighbour blocks, in elements


def _check_count(name: str, value, allow_none: bool = False):
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) and not hasattr(value, "__index__"):
        raise TypeError(f"{name} must be a positive int{' or None' if allow_none else ''}, got {type(value).__name__} {value!r}")
    if int(value) < 1:
        raise ValueError(f"{name} must be >= 1, got {value!r}")
    return int(value)


class SmoothedCFDMDenoiser(TrainSetDenoiser):
    """Smoothed closed-form model (docs/algorithms.md §11):
    ``D_s(x_t) = (1/M) sum_m D_opt(x_t + s*xi_m)``, ``xi_m ~ N(0, I)``.

    ``D_opt`` is the optimal (memorising) denoiser (§6), restricted, when ``top_k`` is an int
    smaller than N, to the ``top_k`` training images nearest to ``(x_t + s*xi_m) / a`` (each
    smoothed point has its own neighbours; an exact softmax over them with float64 direct
    differences); with ``top_k=None`` (or >= N) it is the exact :func:`~analytic_diffusion.ops.optimal_denoise`
    over all N on the selected backend (``backend=``).

    Noise: every call draws ``xi = torch.randn((M, B, n), generator=generator, dtype=float64)``
    on the CPU (then moved to x_t's device), so a run is reproducible from ``seed`` (or the
    ``generator`` given). The smoothed points are formed in float64; the output has x_t's
    dtype. The sampler computes the DDIM eps from the unsmoothed ``x_t`` (docs/algorithms.md §11): this
    denoiser only returns ``x0_hat``.

    Published settings: :meth:`from_preset` (``presets.published.SCFDM``: M = 10, s = 0.1, or
    1 for MNIST, k = 200, tau = 1).
    """

    name = "scfdm"

    def __init__(
        self,
        train,
        *,
        num_smoothing: int = 10,
        smoothing: float = 0.1,
        top_k: Optional[int] = 200,
        temperature: float = 1.0,
        seed: int = 0,
        generator: Optional[torch.Generator] = None,
        chunk_size: int = 256,
        backend: Optional[str] = None,
        alphas_cumprod=None,
    ):
        super().__init__(train, backend=backend, alphas_cumprod=alphas_cumprod)
        self.num_smoothing = _check_count("num_smoothing", num_smoothing)
        s = float(smoothing)
        if not (s >= 0.0) or math.isinf(s):
            raise ValueError(f"smoothing must be a finite number >= 0, got {smoothing!r}")
        self.smoothing = s
        self.top_k = _check_count("top_k", top_k, allow_none=True)
        self.temperature = check_positive("temperature", temperature)
        self.chunk_size = check_chunk_size(chunk_size)
        if generator is not None:
            if not isinstance(generator, torch.Generator):
                raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
            if generator.device.type != "cpu":
                raise ValueError(f"generator must be a CPU torch.Generator (the draws are made on the CPU), got one on {generator.device}")
            self.generator = generator
        else:
            if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
                raise ValueError(f"seed must be an int >= 0, got {seed!r}")
            self.generator = torch.Generator().manual_seed(seed)

    @classmethod
    def from_preset(cls, train, dataset: str = "default", **overrides) -> "SmoothedCFDMDenoiser":
        """The published settings for ``dataset`` (a key of ``presets.published.SCFDM``), with overrides."""
        if dataset not in published.SCFDM:
            raise ValueError(f"dataset must be one of {sorted(published.SCFDM)}, got {dataset!r}")
        return cls(train, **{**published.SCFDM[dataset], **overrides})

    def smoothing_noise(self, batch: int, n: int) -> torch.Tensor:
        """The next draw ``xi [M, batch, n]`` (float64, CPU) from this denoiser's generator."""
        return torch.randn((self.num_smoothing, batch, n), generator=self.generator, dtype=torch.float64)

    def denoise(self, x, t, alpha_bar):
        train = self._train_for(x)
        B, n = x.shape[0], x[0].numel()
        N = train.shape[0]
        M = self.num_smoothing
        xi = self.smoothing_noise(B, n).to(x.device)
        xs = (x.reshape(1, B, n).double() + self.smoothing * xi).reshape(M * B, n)
        flat = train.reshape(N, n)
        if self.top_k is None or self.top_k >= N:
            out = self._impl("optimal_denoise", x)(xs, flat, alpha_bar, self.temperature, self.chunk_size, False)
        else:
            out = self._restricted(xs, flat, alpha_bar)
        return out.reshape(M, B, n).mean(0).to(x.dtype).reshape(x.shape)

    def _restricted(self, xs: torch.Tensor, flat: torch.Tensor, alpha_bar: float) -> torch.Tensor:
        """Exact softmax over each smoothed point's ``top_k`` nearest training images (float64)."""
        k = self.top_k
        idx, d = registry.select("nearest_topk", xs.device).fn(xs, flat, alpha_bar, k, self.chunk_size)
        _, s2 = noise_level(alpha_bar)
        w = torch.softmax(-d / (2.0 * s2 * self.temperature), dim=1)  # [MB, k] float64
        out = torch.empty(xs.shape, dtype=torch.float64, device=xs.device)
        step = max(1, _BLOCK_VALUES // (k * xs.shape[1]))
        for b0 in range(0, xs.shape[0], step):
            y = to_unit(flat[idx[b0 : b0 + step]], torch.float64)  # [b, k, n]
            out[b0 : b0 + step] = torch.einsum("bk,bkn->bn", w[b0 : b0 + step], y)
        return out
