"""The DDPM linear noise schedule (docs/algorithms.md §1), computed exactly as diffusers does."""
from __future__ import annotations

import math
import operator

import torch

NUM_TRAIN_TIMESTEPS = 1000


def linear_alphas_cumprod(T: int = NUM_TRAIN_TIMESTEPS, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """``alpha_bar`` for every timestep: float32 ``[T]``.

    The arithmetic is float32 on purpose: diffusers' ``DDIMScheduler`` builds the
    schedule that way, and matching its rounding keeps samples identical to
    published code.
    """
    if int(T) != T or T < 1:
        raise ValueError(f"T must be a positive integer, got {T!r}")
    if not (0.0 < beta_start <= beta_end < 1.0):
        raise ValueError(f"need 0 < beta_start <= beta_end < 1, got beta_start={beta_start}, beta_end={beta_end}")
    betas = torch.linspace(beta_start, beta_end, int(T), dtype=torch.float32)
    return torch.cumprod(1.0 - betas, dim=0)


_DEFAULT = None


def default_alphas_cumprod() -> torch.Tensor:
    global _DEFAULT
    if _DEFAULT is None:
        _DEFAULT = linear_alphas_cumprod()
    return _DEFAULT


def check_alphas_cumprod(alphas_cumprod, name: str = "alphas_cumprod") -> torch.Tensor:
    """A noise schedule ``alpha_bar[t]``: a 1-D float tensor (or array/sequence, read as
    float64) of length T >= 1, finite, every value in (0, 1], non-increasing in t.
    Returns it as a tensor (a tensor argument unchanged); clear errors otherwise."""
    if alphas_cumprod is None:
        return default_alphas_cumprod()
    ab = alphas_cumprod
    if not isinstance(ab, torch.Tensor):
        try:
            ab = torch.as_tensor(ab, dtype=torch.float64)
        except (TypeError, ValueError, RuntimeError):
            raise TypeError(f"{name} must be a 1-D float tensor [T] of alpha_bar values, got {type(alphas_cumprod).__name__}") from None
    if not ab.is_floating_point():
        raise TypeError(f"{name} must be a float tensor, got {ab.dtype}")
    if ab.dim() != 1 or ab.numel() == 0:
        raise ValueError(f"{name} must be 1-D and non-empty ([T] values of alpha_bar), got shape {tuple(ab.shape)}")
    vals = ab.detach().to("cpu", torch.float64)
    if not bool(torch.isfinite(vals).all()):
        raise ValueError(f"{name} contains {int((~torch.isfinite(vals)).sum())} NaN/Inf value(s)")
    bad = (vals <= 0) | (vals > 1)
    if bool(bad.any()):
        t = int(bad.nonzero()[0, 0])
        raise ValueError(f"{name} values must be in (0, 1] (alpha_bar: the signal fraction), got {vals[t].item()} at t = {t}")
    up = vals[1:] > vals[:-1]
    if bool(up.any()):
        t = int(up.nonzero()[0, 0]) + 1
        raise ValueError(
            f"{name} must be non-increasing in t (more noise at larger t), but alpha_bar[{t}] = {vals[t].item()} > "
            f"alpha_bar[{t - 1}] = {vals[t - 1].item()}"
        )
    return ab


def timestep_to_int(t, T: int = NUM_TRAIN_TIMESTEPS) -> int:
    """Accept a Python int or a 0-d / one-element integer tensor; return a checked int."""
    if isinstance(t, torch.Tensor):
        if t.numel() != 1:
            raise ValueError(f"t must be a scalar timestep, got a tensor of shape {tuple(t.shape)}")
        if t.is_floating_point() and t.item() != int(t.item()):
            raise ValueError(f"t must be an integer timestep, got {t.item()}")
        t = int(t.item())
    if isinstance(t, bool):
        raise TypeError("t must be an int or a 0-d tensor, got bool")
    try:
        t = operator.index(t)
    except TypeError:
        raise TypeError(f"t must be an int or a 0-d tensor, got {type(t).__name__}") from None
    if not 0 <= t < T:
        raise ValueError(f"t must be in [0, {T - 1}], got {t}")
    return t


def alpha_bar_at(t, alphas_cumprod: torch.Tensor | None = None) -> float:
    """``alpha_bar`` at integer timestep ``t`` as a Python float (the float32 value, widened)."""
    ab = default_alphas_cumprod() if alphas_cumprod is None else alphas_cumprod
    return float(ab[timestep_to_int(t, ab.shape[0])])


def ddim_timesteps(steps: int, T: int = NUM_TRAIN_TIMESTEPS) -> list[int]:
    """diffusers' "leading" spacing: ``t_i = (S-1-i) * (T // S)``, e.g. 900, 800, ..., 0."""
    if int(steps) != steps or not 1 <= steps <= T:
        raise ValueError(f"steps must be an integer in [1, {T}], got {steps!r}")
    ratio = T // int(steps)
    return [(int(steps) - 1 - i) * ratio for i in range(int(steps))]


def noise_level(alpha_bar: float) -> tuple[float, float]:
    """``(a, s2) = (sqrt(alpha_bar), 1 - alpha_bar)``."""
    return math.sqrt(alpha_bar), 1.0 - alpha_bar
