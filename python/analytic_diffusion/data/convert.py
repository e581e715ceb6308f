"""The value convention (docs/algorithms.md §1) in both directions: uint8 ``u`` stands for the float
``u / 127.5 - 1`` in [-1, 1]."""
from __future__ import annotations

from typing import Union

import numpy as np
import torch

from .._validate import to_unit
from .items import _check_torch_dtype, _numpy_dtype, _numpy_to_tensor

__all__ = ["to_uint8", "to_unit_range"]


def _tensor(x, what: str) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        return _numpy_to_tensor(_numpy_dtype(x, what))
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor or numpy array, got {type(x).__name__}")
    _check_torch_dtype(x, what)
    return x


def to_unit_range(
    x: Union[torch.Tensor, np.ndarray], dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """uint8 images -> float ``u / 127.5 - 1`` in [-1, 1]; float images pass through.

    Args:
        x: uint8 or float16/32/64 tensor (or numpy array) of any shape.
            Float input is assumed to be in [-1, 1] already and is only cast.
        dtype: floating result dtype (default torch.float32).

    Returns:
        A tensor of ``dtype``; a new tensor for uint8 input. Float input of
        the same dtype is returned as is (never modified). uint8 values are
        correctly rounded in ``dtype`` (computed as ``(u - 127.5) / 127.5``,
        whose subtraction is exact).
    """
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    x = _tensor(x, "x")
    return to_unit(x, dtype)


def to_uint8(x: Union[torch.Tensor, np.ndarray]) -> torch.Tensor:
    """Float images in [-1, 1] -> uint8 ``round((x + 1) * 127.5)``; uint8 passes through.

    Args:
        x: float16/32/64 or uint8 tensor (or numpy array) of any shape, on any device.
    Returns:
        A uint8 tensor of x's shape and device, the inverse of :func:`to_unit_range`:
        every uint8 image survives the round trip exactly (computed in float64).
        Values outside [-1, 1] (a Wiener sample may overshoot) are clipped, not
        rescaled; NaN maps to 0. uint8 input is returned as is.
    """
    x = _tensor(x, "x")
    if x.dtype == torch.uint8:
        return x
    return ((x.detach().to(torch.float64) + 1.0) * 127.5).nan_to_num(0.0).round().clamp(0, 255).to(torch.uint8)
