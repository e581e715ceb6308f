"""Reference backend of the ``moments`` op (pure torch, any device), and the backend contract.

A "moments" backend is a namespace with two in-place updates of the accumulator's
own sums (never of user data):
  update_u8(rows uint8 [B, n] any strides, s1 int64 [n], s2 int64 [n, n])
      s1 += sum_k rows[k];  s2[i, j] += sum_k rows[k, i] * rows[k, j]  for j <= i.
  update_float(rows float [B, n] in [-1, 1], ref float64 [n], s1 float64 [n], s2 float64 [n, n])
      z = rows - ref;  s1 += sum_k z[k];  s2[i, j] += sum_k z[k, i] * z[k, j]  for j <= i,
      with float64 accuracy.
Only the lower triangle of s2 is read (SYRK does half a GEMM's work); entries above
the diagonal may hold anything.
"""
from __future__ import annotations

from types import SimpleNamespace

import torch

from ... import registry


def sym_from_lower(s2: torch.Tensor) -> torch.Tensor:
    return s2.tril() + s2.tril(-1).T


def _ref_update_u8(rows: torch.Tensor, s1: torch.Tensor, s2: torch.Tensor) -> None:
    """Add ``sum u`` and ``sum u u^T`` of uint8 ``rows [B, n]`` into int64 ``s1 [n]``, ``s2 [n, n]``.

    float64 GEMM is exact here: every partial sum is an integer below
    B * 255^2 < 2^53 for B < 1.3e11, whatever the summation order.
    """
    u = rows.to(torch.float64)
    s1 += rows.sum(0, dtype=torch.int64)
    s2 += (u.T @ u).to(torch.int64)


def _ref_update_float(rows: torch.Tensor, ref: torch.Tensor, s1: torch.Tensor, s2: torch.Tensor) -> None:
    """Add shifted sums of float ``rows [B, n]`` (already in [-1, 1]) in float64."""
    z = rows.to(torch.float64) - ref
    s1 += z.sum(0)
    s2 += z.T @ z


registry.register(
    "moments",
    "reference",
    SimpleNamespace(update_u8=_ref_update_u8, update_float=_ref_update_float),
    devices=("any",),
    priority=0,
)
