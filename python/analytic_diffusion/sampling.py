"""DDIM sampling (docs/algorithms.md §7), step for step what diffusers' DDIMScheduler does with its defaults
(linear schedule, "leading" spacing, eta = 0, clip_sample=True, set_alpha_to_one=True)."""
from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import torch

from .schedule import check_alphas_cumprod, ddim_timesteps, noise_level


def ddim_step(x_t: torch.Tensor, x0_hat: torch.Tensor, alpha_bar: float, alpha_bar_prev: float) -> torch.Tensor:
    """One deterministic DDIM update from ``x_t`` given the denoiser's ``x0_hat`` (same shape)."""
    a, s2 = noise_level(alpha_bar)
    eps = (x_t - a * x0_hat) / math.sqrt(s2 + 1e-8)
    x0_c = ((x_t - math.sqrt(s2) * eps) / a).clamp(-1.0, 1.0)
    a_prev, s2_prev = noise_level(alpha_bar_prev)
    return a_prev * x0_c + math.sqrt(s2_prev) * eps


def _takes_progress(fn) -> bool:
    """Whether ``fn`` accepts a ``progress=`` keyword (a user's ``prepare`` may not)."""
    import inspect

    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == "progress" and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD) or p.kind == p.VAR_KEYWORD for p in params)


def sample(
    denoiser: Callable[[torch.Tensor, int], torch.Tensor],
    num_samples: int,
    shape: Sequence[int],
    steps: int = 10,
    seed: int = 0,
    progress: bool = False,
    device=None,
    dtype: torch.dtype = torch.float32,
    callback: Optional[Callable[[int, torch.Tensor, torch.Tensor], None]] = None,
    alphas_cumprod: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Draw ``num_samples`` images of ``shape`` (e.g. ``(3, 32, 32)``) with ``steps`` DDIM steps.

    ``x_T ~ N(0, I)`` comes from a CPU generator seeded with ``seed`` (so samples
    do not depend on the device). ``callback(t, x_t, x0_hat)`` is called at each
    step. A denoiser with ``prepare(timesteps, device)`` (masks, plans) is prepared
    first; ``progress=True`` shows tqdm bars for that (when its ``prepare`` takes
    ``progress=``) and for the steps. Returns the last ``x0_hat``:
    ``[num_samples, *shape]`` of ``dtype``.
    """
    if int(num_samples) != num_samples or num_samples < 1:
        raise ValueError(f"num_samples must be a positive integer, got {num_samples!r}")
    shape = tuple(int(s) for s in shape)
    if not shape or min(shape) < 1:
        raise ValueError(f"shape must be a non-empty image shape such as (C, H, W), got {shape}")
    if dtype not in (torch.float32, torch.float64):
        raise TypeError(f"dtype must be float32 or float64, got {dtype}")
    ab = check_alphas_cumprod(alphas_cumprod)
    T = ab.shape[0]
    ts = ddim_timesteps(steps, T)
    ratio = T // int(steps)
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    x = torch.randn((int(num_samples), *shape), generator=gen, dtype=dtype).to(device or "cpu")
    x0 = x
    prepare = getattr(denoiser, "prepare", None)
    if prepare is not None:  # masks and plans of the whole schedule, before the first step
        if progress and _takes_progress(prepare):
            prepare(ts, x.device, progress=True)  # seconds of eigendecomposition and masks: show them
        else:
            prepare(ts, x.device)
    it = ts
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(ts, desc=f"sampling ({getattr(denoiser, 'name', 'denoiser')})", unit="step")
    for t in it:
        x0 = denoiser(x, t)
        if callback is not None:
            callback(t, x, x0)
        prev = t - ratio
        x = ddim_step(x, x0, float(ab[t]), float(ab[prev]) if prev >= 0 else 1.0)
    return x0
