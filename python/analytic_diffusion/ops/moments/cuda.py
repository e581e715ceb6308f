"""CUDA backend of the ``moments`` op (see the backend contract in ``reference.py``).

uint8 batches go to ``_C_cuda.u8_syrk_update`` (int8 tensor cores, exact int64 sums).
Float batches use torch's float64 GEMM (cuBLAS DGEMM, IEEE float64 FMAs; the TF32
switches never apply to float64) through ``addmm_`` into the accumulator, which needs
no n x n temporary. A hand-written float64 kernel would not beat cuBLAS here.

Importing this module only registers the backend; the compiled module is loaded on
the first availability probe or call.
"""
from __future__ import annotations

from types import SimpleNamespace

import torch

from ... import _ext, registry

_NAME = "analytic_diffusion._C_cuda"


def _module():
    mod = _ext.cuda_module()
    if mod is None or not hasattr(mod, "u8_syrk_update"):
        reason = _ext.build_info()["cuda"].get("error") or "it was built without u8_syrk_update"
        raise RuntimeError(
            f"the CUDA moments backend needs the compiled extension {_NAME}, which is not usable ({reason}). "
            "Reinstall with `pip install --no-build-isolation -v .` on a machine with nvcc, or use backend='triton' or 'reference'."
        )
    return mod


def available() -> bool:
    """CUDA device present and ``_C_cuda`` built with the moments kernels."""
    if not torch.cuda.is_available():
        return False
    mod = _ext.cuda_module()
    return mod is not None and hasattr(mod, "u8_syrk_update")


def check_sums(rows: torch.Tensor, s1: torch.Tensor, s2: torch.Tensor, dtype: torch.dtype) -> None:
    if rows.dim() != 2:
        raise ValueError(f"rows must be [B, n], got shape {tuple(rows.shape)}")
    n = rows.shape[1]
    for name, t, shape in (("s1", s1, (n,)), ("s2", s2, (n, n))):
        if t.dtype != dtype or tuple(t.shape) != shape or not t.is_contiguous():
            raise ValueError(f"{name} must be a contiguous {dtype} tensor of shape {shape}, got {t.dtype} {tuple(t.shape)}")
        if t.device != rows.device:
            raise ValueError(f"{name} is on {t.device} but rows are on {rows.device}")


def u8_syrk_update(rows: torch.Tensor, s1: torch.Tensor, s2: torch.Tensor, *, k_block: int = 0, use_mma: bool = True) -> None:
    """``s1 += rows.sum(0)``, lower triangle of ``s2 += rows^T rows``, exactly, in place.

    ``rows``: uint8 ``[B, n]`` on a CUDA device, any strides; ``s1``: int64 ``[n]``;
    ``s2``: int64 ``[n, n]``, both contiguous on the same device. ``k_block``: most images
    per int32 accumulation before the flush to int64 (0 = default 65536; at most
    131071). ``use_mma=False`` runs the plain int64 cross-check kernel instead of the
    tensor cores. Asynchronous on the current stream of ``rows.device``.
    """
    if rows.device.type != "cuda":
        raise ValueError(f"the CUDA moments backend needs CUDA tensors, got rows on {rows.device}")
    if rows.dtype != torch.uint8:
        raise TypeError(f"rows must be uint8, got {rows.dtype}")
    check_sums(rows, s1, s2, torch.int64)
    B, n = rows.shape
    if B == 0 or n == 0:
        return
    mod = _module()
    # per-batch column sums for the int8 shift correction; freed into torch's caching
    # allocator on this stream, so reuse is ordered after the kernels that read it
    ws = torch.empty(n, dtype=torch.int64, device=rows.device) if use_mma else None
    with torch.cuda.device(rows.device):
        stream = torch.cuda.current_stream(rows.device).cuda_stream
        mod.u8_syrk_update(
            rows.data_ptr(), B, n, rows.stride(0), rows.stride(1), s1.data_ptr(), s2.data_ptr(),
            0 if ws is None else ws.data_ptr(), stream, int(k_block), bool(use_mma),
        )


def f64_syrk_update(rows: torch.Tensor, ref: torch.Tensor, s1: torch.Tensor, s2: torch.Tensor) -> None:
    """Float batches: ``z = rows - ref`` in float64, ``s1 += z.sum(0)``, ``s2 += z^T z``
    (the full matrix; the contract reads only the lower triangle). ``rows``: float32 or
    float64 ``[B, n]`` in [-1, 1]; ``ref``, ``s1``: float64 ``[n]``; ``s2``: float64 ``[n, n]``."""
    if rows.device.type != "cuda":
        raise ValueError(f"the CUDA moments backend needs CUDA tensors, got rows on {rows.device}")
    float_update_f64(rows, ref, s1, s2)


def float_update_f64(rows: torch.Tensor, ref: torch.Tensor, s1: torch.Tensor, s2: torch.Tensor) -> None:
    """The float path of both GPU backends (CUDA and Triton): float64 torch GEMM on the
    rows' device, never TF32 (``z = rows - ref``, ``s1 += z.sum(0)``, ``s2 += z^T z``)."""
    if rows.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"rows must be float32 or float64, got {rows.dtype}")
    check_sums(rows, s1, s2, torch.float64)
    if rows.shape[0] == 0:
        return
    z = rows.to(torch.float64) - ref
    s1 += z.sum(0)
    s2.addmm_(z.T, z)


BACKEND = SimpleNamespace(update_u8=u8_syrk_update, update_float=f64_syrk_update)

registry.register("moments", "cuda", BACKEND, devices=("cuda",), priority=20, is_available=available)
