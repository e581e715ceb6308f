"""CPU backend of the ``patch_moments`` op (contract in ``ops/patch_moments/reference.py``).

``_C.lag_rect_sums`` computes, per lag e = (di, dj), channel pair and rectangle, the sums of
the lag products ``z[c, q] z[c', q + e]`` without unfolding a patch: uint8 images through
AVX-512 VNNI int8 dot products (four images per instruction, int32 inside blocks of at most
16384 images, int64 across blocks: exact, independent of batch order, size and thread count),
float images in float64 (AVX-512 FMA). A portable C++ micro-kernel runs where the CPU lacks
AVX-512 (identical integer results). The kernels use torch's OpenMP runtime, so
``torch.set_num_threads`` applies to them.
"""
from __future__ import annotations

from types import SimpleNamespace
from typing import Optional, Tuple

import torch

from ... import _ext, registry
from .layout import patch_s2, window_sums

_SYMBOLS = ("lag_rect_sums",)


def available() -> bool:
    """``_C`` loads and has the patch-moments kernels."""
    return _ext.cpu_has(_SYMBOLS)


def has_vnni() -> bool:
    """Whether uint8 lag sums run the AVX-512 VNNI micro-kernel (else the portable one)."""
    mod = _ext.cpu_module()
    return mod is not None and hasattr(mod, "lag_sums_has_vnni") and bool(mod.lag_sums_has_vnni())


def _module():
    return _ext.require_cpu(_SYMBOLS, "patch_moments")


def lag_rect_sums(
    x: torch.Tensor, Li: int, Lj: int, nh: int, nw: int, oh: int, ow: int, shift: Optional[torch.Tensor] = None,
    *, force_portable: bool = False, block_images: int = 0,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(T, S1)``: ``T [Li+1, 2Lj+1, C, C, nh, nw]`` rectangle sums of the lag products and
    ``S1 [C, H, W]`` per-pixel sums of ``x [B, C, H, W]`` (see ``csrc/cpu/patch_moments.h``).
    uint8 ``x`` (``shift`` None): int64, exact. Float ``x``: float64 sums of ``x - shift``
    (``shift`` float64 ``[C]``; zeros if None). Entries with di = 0, dj < 0 stay 0."""
    if x.dim() != 4 or x.device.type != "cpu":
        raise ValueError(f"x must be a CPU tensor [B, C, H, W], got shape {tuple(x.shape)} on {x.device}")
    B, C, H, W = x.shape
    if x.dtype == torch.uint8:
        if shift is not None:
            raise ValueError("uint8 sums are exact integers: shift must be None")
        dtype, out = 0, torch.int64
    else:
        if x.dtype not in (torch.float32, torch.float64):
            x = x.to(torch.float64)
        dtype, out = (2 if x.dtype == torch.float64 else 1), torch.float64
        shift = torch.zeros(C, dtype=torch.float64) if shift is None else shift.to("cpu", torch.float64).contiguous()
        if tuple(shift.shape) != (C,):
            raise ValueError(f"shift must be float64 [{C}], got shape {tuple(shift.shape)}")
    T = torch.zeros(Li + 1, 2 * Lj + 1, C, C, nh, nw, dtype=out)
    S1 = torch.zeros(C, H, W, dtype=out)
    _module().lag_rect_sums(
        x.data_ptr(), dtype, B, C, H, W, *x.stride(), 0 if shift is None else shift.data_ptr(),
        int(Li), int(Lj), int(nh), int(nw), int(oh), int(ow), T.data_ptr(), S1.data_ptr(),
        bool(force_portable), int(block_images),
    )
    return T, S1


def patch_sums(x: torch.Tensor, k: int, shift: Optional[torch.Tensor] = None, *, force_portable: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(s1 [d], s2 [d, d])`` over every k x k patch of ``x [B, C, H, W]``, d = C*k*k,
    s2 full and symmetric: int64 exact for uint8 ``x``, float64 sums of ``x - shift`` otherwise."""
    B, C, H, W = x.shape
    T, S1 = lag_rect_sums(x, k - 1, k - 1, k, k, H - k + 1, W - k + 1, shift, force_portable=force_portable)
    return window_sums(S1, k), patch_s2(T, C, k)


def lag_sums(x: torch.Tensor, Li: int, Lj: int, shift: Optional[torch.Tensor] = None, *, force_portable: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """Whole-image lag sums ``A [Li+1, 2Lj+1, C, C]`` (``A[di, dj+Lj, c, c'] = sum_b sum_q
    z[b,c,q] z[b,c',q+e]`` over the q with q + e inside; di = 0, dj < 0 left 0) and the
    per-pixel sums ``S1 [C, H, W]``: int64 exact for uint8, float64 of ``x - shift`` otherwise."""
    B, C, H, W = x.shape
    T, S1 = lag_rect_sums(x, Li, Lj, 1, 1, H, W, shift, force_portable=force_portable)
    return T[..., 0, 0].contiguous(), S1


BACKEND = SimpleNamespace(name="cpu", patch_sums=patch_sums, lag_sums=lag_sums)

registry.register("patch_moments", "cpu", BACKEND, devices=("cpu",), priority=10, is_available=available)
