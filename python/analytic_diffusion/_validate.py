"""Input checks shared by the public functions (backends trust their inputs)."""
from __future__ import annotations

import math
import os
from typing import Optional, Tuple

import torch

FLOAT_DTYPES = (torch.float32, torch.float64)
IMAGE_DTYPES = (torch.uint8, torch.float16, torch.float32, torch.float64)


def as_tensor(name: str, value) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    try:
        import numpy as np

        if isinstance(value, np.ndarray):
            if value.dtype == object:
                raise TypeError(f"{name} must be a numeric array, got dtype=object")
            return torch.from_numpy(value)
    except ImportError:  # pragma: no cover
        pass
    raise TypeError(f"{name} must be a torch.Tensor or numpy array, got {type(value).__name__}")


def check_finite(name: str, t: torch.Tensor) -> None:
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).sum())
        raise ValueError(f"{name} contains {bad} NaN/Inf value(s)")


# Float images must be in [-1, 1]; this much beyond is still rounding (resampling, a
# float16 round trip), more is data in another convention.
UNIT_RANGE_TOL = 1e-3


def check_pixels(name: str, t: torch.Tensor) -> None:
    """Image data: finite, and float values within [-1, 1] (up to ``UNIT_RANGE_TOL``).

    uint8 passes as is (it is mapped by ``u / 127.5 - 1``). One min/max pass serves both
    checks (NaN propagates through it). The error names the argument and the fix: float
    pixels in [0, 255] (a float .npy, a loaded PNG) otherwise give saturated samples."""
    if not t.is_floating_point() or t.numel() == 0:
        return
    lo, hi = (v.item() for v in torch.aminmax(t.detach().reshape(-1)))
    if not (math.isfinite(lo) and math.isfinite(hi)):
        check_finite(name, t)  # counts the bad values
        raise ValueError(f"{name} contains NaN/Inf values")  # pragma: no cover - check_finite raised
    if lo < -1.0 - UNIT_RANGE_TOL or hi > 1.0 + UNIT_RANGE_TOL:
        hint = (
            "for pixels in [0, 255] divide by 127.5 and subtract 1 (x / 127.5 - 1), or pass the uint8 pixels as they are"
            if hi > 2.0
            else "rescale them to [-1, 1] (e.g. from [0, 1]: 2 * x - 1), or pass uint8 pixels"
        )
        raise ValueError(
            f"{name} is {t.dtype} with values in [{lo:.6g}, {hi:.6g}], but float images must be in [-1, 1]: {hint}"
        )


def check_queries(x, name: str = "x") -> torch.Tensor:
    """``x``: float32/float64 ``[B, n]`` or ``[B, C, H, W]`` with B >= 1, finite."""
    x = as_tensor(name, x)
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32 or float64, got {x.dtype}")
    if x.dim() not in (2, 4):
        raise ValueError(f"{name} must be [B, n] or [B, C, H, W], got shape {tuple(x.shape)}")
    if x.shape[0] == 0 or x[0].numel() == 0:
        raise ValueError(f"{name} is empty: shape {tuple(x.shape)}")
    check_finite(name, x)
    return x


def check_train(train, n: Optional[int] = None, image_shape: Optional[Tuple[int, ...]] = None, name: str = "train") -> torch.Tensor:
    """``train``: uint8 or float in [-1, 1] ``[N, n]`` / ``[N, C, H, W]`` with N >= 1, finite."""
    train = as_tensor(name, train)
    if train.dtype not in IMAGE_DTYPES:
        raise TypeError(f"{name} must be uint8 or a float dtype, got {train.dtype}")
    if train.dim() not in (2, 4):
        raise ValueError(f"{name} must be [N, n] or [N, C, H, W], got shape {tuple(train.shape)}")
    if train.shape[0] == 0:
        raise ValueError(f"{name} is an empty dataset (N = 0)")
    if n is not None and train[0].numel() != n:
        raise ValueError(
            f"{name} images have {train[0].numel()} values each (shape {tuple(train.shape[1:])}), "
            f"but the queries have {n}"
        )
    if image_shape is not None and train.dim() == 4 and len(image_shape) == 3 and tuple(train.shape[1:]) != tuple(image_shape):
        raise ValueError(f"{name} has image shape {tuple(train.shape[1:])}, expected {tuple(image_shape)}")
    check_pixels(name, train)
    return train


def check_queries_and_train(x, train):
    """Validate queries and training set together (the ops that softmax over training
    images): returns ``x``, ``train`` and their flat ``[B, n]``, ``[N, n]`` views."""
    x = check_queries(x)
    train = check_train(train, x[0].numel(), tuple(x.shape[1:]) if x.dim() == 4 else None)
    n = x[0].numel()
    return x, train, x.reshape(x.shape[0], n), train.reshape(train.shape[0], n)


def check_same_device(**tensors: torch.Tensor) -> torch.device:
    devs = {k: v.device for k, v in tensors.items() if v is not None}
    first = next(iter(devs.values()))
    if any(d != first for d in devs.values()):
        desc = ", ".join(f"{k} on {d}" for k, d in devs.items())
        raise ValueError(f"all tensors must be on one device, got {desc}")
    return first


def check_alpha_bar(alpha_bar) -> float:
    if isinstance(alpha_bar, torch.Tensor):
        if alpha_bar.numel() != 1:
            raise ValueError(f"alpha_bar must be a scalar, got shape {tuple(alpha_bar.shape)}")
        alpha_bar = alpha_bar.item()
    try:
        ab = float(alpha_bar)
    except (TypeError, ValueError):
        raise TypeError(f"alpha_bar must be a float, got {type(alpha_bar).__name__}") from None
    if not (0.0 < ab < 1.0) or math.isnan(ab):
        raise ValueError(f"alpha_bar must be in (0, 1) (exclusive: 1 means no noise, 0 no signal), got {ab}")
    return ab


def check_positive(name: str, value) -> float:
    v = float(value)
    if not (v > 0.0) or math.isinf(v):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return v


def check_mask(mask, n: int, name: str = "mask") -> torch.Tensor:
    mask = as_tensor(name, mask)
    if mask.shape != (n, n):
        raise ValueError(f"{name} must be [n, n] = [{n}, {n}] (column m is the window of output pixel m), got {tuple(mask.shape)}")
    if mask.dtype != torch.bool and not mask.is_floating_point():
        raise TypeError(f"{name} must be bool (binary windows) or float (weights), got {mask.dtype}")
    check_finite(name, mask)
    return mask


def check_threshold(threshold, name: str = "threshold") -> float:
    """A finite float: > 0 gives binary windows, <= 0 real-valued weights (docs/algorithms.md §4).
    NaN would compare False everywhere and silently empty every window; bools and strings
    are refused rather than read as 1.0 / parsed."""
    bad_type = isinstance(threshold, (bool, str, bytes)) or (isinstance(threshold, torch.Tensor) and threshold.dtype == torch.bool)
    try:
        v = None if bad_type else float(threshold)
    except (TypeError, ValueError, RuntimeError):
        v = None
    if v is None:
        raise TypeError(f"{name} must be a real number (e.g. 0.02), got {type(threshold).__name__}")
    if not math.isfinite(v):
        raise ValueError(f"{name} must be a finite number (e.g. 0.02; <= 0 gives real-valued weights), got {v}")
    return v


def check_chunk_size(chunk_size) -> int:
    if isinstance(chunk_size, bool) or int(chunk_size) != chunk_size or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    return int(chunk_size)


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def to_unit(y: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """uint8 -> ``u / 127.5 - 1``; float data is already in [-1, 1]. Never in place.

    Computed as ``(u - 127.5) / 127.5``: the subtraction is exact, so the result is
    correctly rounded (``u / 127.5 - 1`` is one ulp off for half the values).
    """
    if y.dtype == torch.uint8:
        return (y.to(dtype) - 127.5) / 127.5
    return y.to(dtype)


def _available_bytes(device: torch.device) -> Optional[int]:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX
        return None


def check_fits(nbytes: int, device: torch.device, what: str, hint: str = "") -> None:
    """Refuse, before allocating, anything that would not fit in the device's free memory."""
    avail = _available_bytes(device)
    if avail is not None and nbytes > 0.9 * avail:
        raise MemoryError(
            f"{what} needs about {nbytes / 2**30:.2f} GiB but only {avail / 2**30:.2f} GiB is free on {device}. {hint}".strip()
        )
