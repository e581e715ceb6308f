"""Agreement metrics between a denoiser's predictions and a reference (docs/algorithms.md §8)."""
from __future__ import annotations

import torch


_REDUCTIONS = ("mean", "none")


def _reduce(per: torch.Tensor, reduction: str) -> torch.Tensor:
    return per.mean() if reduction == "mean" else per


def _check_reduction(reduction) -> None:
    if not isinstance(reduction, str) or reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS} ('mean': the average over the batch, 'none': per sample), got {reduction!r}")


def _pair(pred: torch.Tensor, target: torch.Tensor):
    if pred.shape != target.shape:
        raise ValueError(f"pred and target must have the same shape, got {tuple(pred.shape)} and {tuple(target.shape)}")
    if pred.dim() < 1 or pred.shape[0] == 0:
        raise ValueError(f"pred must be a non-empty batch [B, ...], got shape {tuple(pred.shape)}")
    return pred.reshape(pred.shape[0], -1).to(torch.float64), target.reshape(target.shape[0], -1).to(torch.float64)


def r2(pred: torch.Tensor, target: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """``1 - sum (pred - target)^2 / (n * var_unbiased(target))`` per sample ``[B]``, then averaged
    (docs/algorithms.md §8.1). A sample whose target has zero variance (a constant image)
    counts its variance as 1, so its score is ``1 - mse`` rather than -inf or NaN.

    ``pred``, ``target``: ``[B, ...]``. Returns a float64 scalar (``reduction="mean"``)
    or ``[B]`` (``"none"``).
    """
    _check_reduction(reduction)
    p, t = _pair(pred, target)
    n = t.shape[1]
    if n < 2:
        raise ValueError("r2 needs at least 2 values per sample (unbiased variance)")
    var = t.var(1, unbiased=True)
    var = torch.where(var == 0, torch.ones_like(var), var)
    per = 1.0 - ((p - t) ** 2).sum(1) / (n * var)
    return _reduce(per, reduction)


def mse(pred: torch.Tensor, target: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Per-pixel mean squared error: float64 scalar, or ``[B]`` with ``reduction="none"``."""
    _check_reduction(reduction)
    p, t = _pair(pred, target)
    per = ((p - t) ** 2).mean(1)
    return _reduce(per, reduction)
