"""CPU backends: the ``moments`` op, and ``locality_denoise`` / ``optimal_denoise``.

moments (see the backend contract in moments.py):

uint8 batches go to ``_C.u8_syrk_update``: exact int64 sums from int8 dot products
(AVX-512 VNNI, chosen at run time where the CPU has it, otherwise a portable
micro-kernel), lower triangle only, OpenMP over tiles. Float batches go to
``_C.f64_syrk_update``: a float64 lower-triangle SYRK on ``z = rows - ref`` (AVX-512
FMA); it does half of ``z.T @ z``'s work and measured 1.3-1.5x faster than torch's
float64 ``addmm_`` on the 2-core development machine, with the same accuracy (~1e-15
relative). ``finalize_u8`` (beyond the two-update contract) turns exact sums into
mean and covariance bit-identically to ``MomentAccumulator.result()``, ~10x faster.
The kernels use torch's OpenMP runtime, so ``torch.set_num_threads`` applies to them.

locality_denoise / optimal_denoise (SPEC 5, 6): ``_C.locality_denoise_run`` runs a per-mask
*plan* (:func:`locality_plan`): pixels with identical windows share one distance; windows are
runs of consecutive pixels, each costing two lookups in per-segment prefix sums of the
squared differences (one for a lone pixel); a spanning tree lets a window start from a
similar one. Distances, logits and softmax state are float64 (direct differences, never the
expanded form), so float32 and float64 queries are both exact to rounding; the online
softmax is merged across threads with the SPEC 5 rule. Plans are cached by mask content (LRU
of 32), so a sampler that passes the same masks every run builds each plan once; an op that
is given the same mask tensor again skips even the hashing. Real-valued masks (threshold <= 0)
that are not 0/1 fall back to the float64 reference. All-ones windows (the optimal
denoiser) cost O(N n).

Importing this module only registers the backends; the compiled module is loaded on the
first availability probe or call.
"""
from __future__ import annotations

import hashlib
import math
import threading
import weakref
from collections import OrderedDict
from types import SimpleNamespace
from typing import Optional, Tuple

import numpy as np
import torch

from . import _ext, _registry
from .ops import SoftmaxState, locality_denoise_reference

_NAME = "analytic_diffusion._C"
_SYMBOLS = ("u8_syrk_update", "f64_syrk_update", "u8_moments_finalize")


def _module():
    mod = _ext.cpu_module()
    if mod is None or not all(hasattr(mod, s) for s in _SYMBOLS):
        reason = _ext.build_info()["cpu"].get("error") or "it was built without the moments kernels"
        raise RuntimeError(
            f"the CPU moments backend needs the compiled extension {_NAME}, which is not usable ({reason}). "
            "Reinstall with `pip install --no-build-isolation -v .`, or use backend='reference'."
        )
    return mod


def available() -> bool:
    """``_C`` loads and has the moments kernels."""
    mod = _ext.cpu_module()
    return mod is not None and all(hasattr(mod, s) for s in _SYMBOLS)


def has_vnni() -> bool:
    """Whether uint8 updates run the AVX-512 VNNI micro-kernel (else the portable one)."""
    mod = _ext.cpu_module()
    return mod is not None and hasattr(mod, "u8_syrk_has_vnni") and bool(mod.u8_syrk_has_vnni())


def _check_sums(rows: torch.Tensor, s1: torch.Tensor, s2: torch.Tensor, dtype: torch.dtype) -> None:
    # Not input validation (the public API did that): the kernel writes through raw
    # pointers, so a wrong accumulator would corrupt memory instead of raising.
    if rows.dim() != 2 or rows.device.type != "cpu":
        raise ValueError(f"rows must be a CPU tensor [B, n], got shape {tuple(rows.shape)} on {rows.device}")
    n = rows.shape[1]
    for name, t, shape in (("s1", s1, (n,)), ("s2", s2, (n, n))):
        if t.dtype != dtype or tuple(t.shape) != shape or not t.is_contiguous() or t.device.type != "cpu":
            raise ValueError(f"{name} must be a contiguous CPU {dtype} tensor of shape {shape}, got {t.dtype} {tuple(t.shape)} on {t.device}")


def u8_syrk_update(rows: torch.Tensor, s1: torch.Tensor, s2: torch.Tensor, *, force_portable: bool = False, chunk_rows: int = 0) -> None:
    """``s1 += rows.sum(0)``, lower triangle of ``s2 += rows^T rows``, exactly, in place.

    ``rows``: uint8 ``[B, n]`` on the CPU, any strides; ``s1``: int64 ``[n]``; ``s2``:
    int64 ``[n, n]``, both contiguous. ``force_portable`` runs the plain C++ micro-kernel
    even where the VNNI one exists (the results are identical). ``chunk_rows``: images per
    int32 accumulation before the flush to int64 (0 = default, at most 65536).
    """
    if rows.dtype != torch.uint8:
        raise TypeError(f"rows must be uint8, got {rows.dtype}")
    _check_sums(rows, s1, s2, torch.int64)
    B, n = rows.shape
    if B == 0 or n == 0:
        return
    _module().u8_syrk_update(
        rows.data_ptr(), B, n, rows.stride(0), rows.stride(1), s1.data_ptr(), s2.data_ptr(),
        bool(force_portable), int(chunk_rows),
    )


def f64_syrk_update(rows: torch.Tensor, ref: torch.Tensor, s1: torch.Tensor, s2: torch.Tensor, *, force_portable: bool = False) -> None:
    """Float batches: ``z = rows - ref`` in float64, ``s1 += z.sum(0)``, lower triangle of
    ``s2 += z^T z``. ``rows``: float32 or float64 ``[B, n]`` (other float dtypes are
    converted to float64 first), any strides; ``ref``, ``s1``: float64 ``[n]``; ``s2``:
    float64 ``[n, n]``, all contiguous. ``force_portable`` runs the plain C++ micro-kernel
    instead of the AVX-512 one (same sums up to rounding)."""
    if rows.dtype not in (torch.float32, torch.float64):
        rows = rows.to(torch.float64)
    _check_sums(rows, s1, s2, torch.float64)
    if ref.dtype != torch.float64 or tuple(ref.shape) != (rows.shape[1],) or not ref.is_contiguous():
        raise ValueError(f"ref must be a contiguous float64 tensor of shape ({rows.shape[1]},)")
    B, n = rows.shape
    if B == 0 or n == 0:
        return
    _module().f64_syrk_update(
        rows.data_ptr(), B, n, rows.stride(0), rows.stride(1), rows.dtype == torch.float64,
        ref.data_ptr(), s1.data_ptr(), s2.data_ptr(), bool(force_portable),
    )


def u8_finalize(count: int, s1: torch.Tensor, s2: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(mean [n], cov [n, n])``, float64, [-1, 1] units, from exact uint8 sums over
    ``count >= 2`` images: bit-identical to ``MomentAccumulator.result()`` on the same
    sums, in one fused pass (the torch version costs more than the SYRK for large n).
    ``s1``: int64 ``[n]``; ``s2``: int64 ``[n, n]`` (only the lower triangle is read)."""
    n = s1.shape[0] if s1.dim() == 1 else -1
    for name, t, shape in (("s1", s1, (n,)), ("s2", s2, (n, n))):
        if t.dtype != torch.int64 or tuple(t.shape) != shape or not t.is_contiguous() or t.device.type != "cpu":
            raise ValueError(f"{name} must be a contiguous CPU int64 tensor of shape {shape}, got {t.dtype} {tuple(t.shape)} on {t.device}")
    if count < 2:
        raise ValueError(f"need at least 2 images for an unbiased covariance, got {count}")
    mean = torch.empty(n, dtype=torch.float64)
    cov = torch.empty(n, n, dtype=torch.float64)
    _module().u8_moments_finalize(int(count), n, s1.data_ptr(), s2.data_ptr(), mean.data_ptr(), cov.data_ptr())
    return mean, cov


# finalize_u8 goes beyond the two-update contract; the accumulator may use it when present.
BACKEND = SimpleNamespace(update_u8=u8_syrk_update, update_float=f64_syrk_update, finalize_u8=u8_finalize)

_registry.register("moments", "cpu", BACKEND, devices=("cpu",), priority=10, is_available=available)


# ============================================================================ locality
_LOCALITY_SYMBOLS = ("locality_plan_build", "locality_plan_full", "locality_denoise_run", "LocalityPlan")
_PLAN_CACHE_SIZE = 32
_plan_lock = threading.Lock()
_plans: "OrderedDict[tuple, object]" = OrderedDict()  # content key -> _C.LocalityPlan
# id(mask) -> (weakref to it, its version counter, content key): the same tensor object,
# unmodified (torch bumps _version on every in-place write, through any view), is not hashed
# again. Keyed by id, not by the tensor: a WeakKeyDictionary would compare tensors with ==.
_seen_masks: dict = {}
_full_plans: dict = {}  # n -> plan of the all-ones mask


def locality_available() -> bool:
    """``_C`` loads and has the locality kernels."""
    mod = _ext.cpu_module()
    return mod is not None and all(hasattr(mod, s) for s in _LOCALITY_SYMBOLS)


def _locality_module():
    mod = _ext.cpu_module()
    if mod is None or not all(hasattr(mod, s) for s in _LOCALITY_SYMBOLS):
        reason = _ext.build_info()["cpu"].get("error") or "it was built without the locality kernels"
        raise RuntimeError(
            f"the CPU locality backend needs the compiled extension {_NAME}, which is not usable ({reason}). "
            "Reinstall with `pip install --no-build-isolation -v .`, or use backend='reference'."
        )
    return mod


def _binary_mask(mask: torch.Tensor) -> Optional[torch.Tensor]:
    """The mask as a bool CPU tensor, or None for real-valued weights (not all 0 or 1)."""
    if mask.dtype == torch.bool:
        return mask.cpu()
    m = mask.cpu()
    if not bool(((m == 0) | (m == 1)).all()):
        return None
    return m != 0


def _content_key(mask: torch.Tensor, segment: int, use_tree: bool) -> tuple:
    arr = np.packbits(mask.contiguous().numpy())
    return (mask.shape[0], segment, use_tree, hashlib.blake2b(arr.tobytes(), digest_size=16).hexdigest())


def locality_plan(mask: torch.Tensor, *, segment: int = 0, use_tree: bool = True):
    """The CPU kernel's plan for ``mask`` (bool, or float with only 0/1 values, ``[n, n]``,
    column m the window of pixel m): built on first use, then cached by content (LRU of 32).

    Returns an ``_C.LocalityPlan`` (attributes ``num_groups``, ``lookups``, ``area``,
    ``build_seconds``, ...), or None for a real-valued mask (those run the reference).
    ``segment`` (0 = default) and ``use_tree`` are tuning knobs for tests and benchmarks.
    Calling it ahead of time (``LocalityDenoiser.prepare`` does) keeps plan building out of
    the first sampling run.
    """
    if mask.dim() != 2 or mask.shape[0] != mask.shape[1]:
        raise ValueError(f"mask must be [n, n], got shape {tuple(mask.shape)}")
    key = None
    version = _version(mask)
    seen = _seen_masks.get(id(mask))
    if version is not None and seen is not None and seen[0]() is mask and seen[1] == version and seen[2][1:3] == (segment, use_tree):
        key = seen[2]
    with _plan_lock:
        if key is not None and key in _plans:
            _plans.move_to_end(key)
            return _plans[key]
    bmask = _binary_mask(mask)
    if bmask is None:
        return None
    key = _content_key(bmask, segment, use_tree)
    _remember(mask, key)
    with _plan_lock:
        if key in _plans:
            _plans.move_to_end(key)
            return _plans[key]
    n = bmask.shape[0]
    m8 = bmask.contiguous().view(torch.uint8)
    plan = _locality_module().locality_plan_build(m8.data_ptr(), n, n, 1, int(segment), bool(use_tree))
    with _plan_lock:
        _plans[key] = plan
        _plans.move_to_end(key)
        while len(_plans) > _PLAN_CACHE_SIZE:
            _plans.popitem(last=False)
    return plan


def _version(mask: torch.Tensor) -> Optional[int]:
    try:
        return mask._version
    except RuntimeError:  # an inference-mode tensor has no version counter: hash every call
        return None


def _remember(mask: torch.Tensor, key: tuple) -> None:
    version = _version(mask)
    if version is None:
        return
    ident = id(mask)
    try:
        ref = weakref.ref(mask, lambda _r, ident=ident: _seen_masks.pop(ident, None))
    except TypeError:  # pragma: no cover - an object without weakref support: always hash
        return
    with _plan_lock:
        _seen_masks[ident] = (ref, version, key)


def _full_plan(n: int):
    with _plan_lock:
        plan = _full_plans.get(n)
    if plan is None:
        plan = _locality_module().locality_plan_full(n, 0)
        with _plan_lock:
            _full_plans[n] = plan
    return plan


def clear_plan_cache() -> None:
    """Forget every cached plan (tests, memory)."""
    with _plan_lock:
        _plans.clear()
        _full_plans.clear()
    _seen_masks.clear()


_TRAIN_KIND = {torch.uint8: 0, torch.float32: 1, torch.float64: 2}


def _run(plan, x: torch.Tensor, train: torch.Tensor, alpha_bar: float, temperature: float, chunk: int, return_state: bool, expand_state: bool):
    # Not input validation (the public op did that): the kernel reads and writes through raw
    # pointers, so anything it would misread is fixed here.
    if x.device.type != "cpu" or train.device.type != "cpu":
        raise ValueError("the cpu locality backend needs CPU tensors")
    if train.dtype not in _TRAIN_KIND:
        train = train.float()  # float16 / bfloat16 images: exact in float32
    B, n = x.shape
    N = train.shape[0]
    if plan.n != n:
        raise ValueError(f"plan is for n = {plan.n}, the queries have n = {n}")
    a = math.sqrt(alpha_bar)
    scale = 1.0 / (2.0 * (1.0 - alpha_bar) * temperature)
    nan = float("nan")
    # outputs start as NaN so that anything the kernel failed to write is visible
    out = None if return_state else torch.full((B, n), nan, dtype=x.dtype)
    mx = l = acc = None
    if return_state:
        G = plan.num_groups
        mx = torch.full((B, G), nan, dtype=torch.float64)
        l = torch.full((B, G), nan, dtype=torch.float64)
        acc = torch.full((B, n), nan, dtype=torch.float64)
    _locality_module().locality_denoise_run(
        plan, x.data_ptr(), B, x.stride(0), x.stride(1), x.dtype == torch.float64,
        train.data_ptr(), N, train.stride(0), train.stride(1), _TRAIN_KIND[train.dtype],
        a, scale, int(chunk),
        0 if out is None else out.data_ptr(), x.dtype == torch.float64,
        0 if mx is None else mx.data_ptr(), 0 if l is None else l.data_ptr(), 0 if acc is None else acc.data_ptr(),
        # fixed-point distances (within a 3e-4 logit error bound) only where that is far below
        # the output's own rounding: float32 results, not states (their max would be shifted)
        x.dtype == torch.float32 and not return_state,
    )
    if not return_state:
        return out
    if expand_state:  # per-group max and sum -> every pixel of the group
        idx = torch.from_numpy(plan.group_of_pixel).long()
        mx, l = mx[:, idx], l[:, idx]
    return SoftmaxState(mx.to(x.dtype), l.to(x.dtype), acc.to(x.dtype))


def locality_denoise_cpu(x, train, mask, alpha_bar, temperature=1.0, softmax="exact", chunk_size=256, return_state=False):
    """Backend of ``ops.locality_denoise`` (reference signature; inputs validated)."""
    plan = locality_plan(mask)
    if plan is None:  # real-valued weights: the float64 reference, in x's dtype
        res = locality_denoise_reference(x.double(), train, mask.cpu().double(), alpha_bar, temperature, softmax, chunk_size, return_state)
        if return_state:
            return SoftmaxState(*(t.to(x.dtype) for t in res))
        return res.to(x.dtype)
    return _run(plan, x, train, alpha_bar, temperature, 0 if softmax == "exact" else chunk_size, return_state, True)


def optimal_denoise_cpu(x, train, alpha_bar, temperature=1.0, chunk_size=256, return_state=False):
    """Backend of ``ops.optimal_denoise``: the one-group plan, O(N n)."""
    return _run(_full_plan(x.shape[1]), x, train, alpha_bar, temperature, 0, return_state, False)


def _prepare(mask) -> None:
    """Build (and cache) the plan of ``mask`` ahead of the first call."""
    locality_plan(mask)


locality_denoise_cpu.prepare = _prepare

_registry.register("locality_denoise", "cpu", locality_denoise_cpu, devices=("cpu",), priority=10, is_available=locality_available)
_registry.register("optimal_denoise", "cpu", optimal_denoise_cpu, devices=("cpu",), priority=10, is_available=locality_available)


# ============================================================================ nearest
_NEAREST_SYMBOLS = ("nearest_denoise_run",)


def nearest_available() -> bool:
    """``_C`` loads and has the nearest kernel."""
    mod = _ext.cpu_module()
    return mod is not None and all(hasattr(mod, s) for s in _NEAREST_SYMBOLS)


def nearest_run(x: torch.Tensor, train: torch.Tensor, alpha_bar: float, *, force_portable: bool = False):
    """``(out [B, n] in x's dtype, index [B] int64, dist [B] float64)``: the nearest training
    image of each query, its index (lowest on ties) and its float64 distance
    ``||x - a y||^2``. ``x``: float32/float64 ``[B, n]``; ``train``: uint8 or float ``[N, n]``;
    any strides. ``force_portable`` uses the plain C++ distances instead of AVX-512."""
    mod = _ext.cpu_module()
    if mod is None or not all(hasattr(mod, s) for s in _NEAREST_SYMBOLS):
        reason = _ext.build_info()["cpu"].get("error") or "it was built without the nearest kernel"
        raise RuntimeError(
            f"the CPU nearest backend needs the compiled extension {_NAME}, which is not usable ({reason}). "
            "Reinstall with `pip install --no-build-isolation -v .`, or use backend='reference'."
        )
    # Not input validation (the public op did that): the kernel reads and writes through raw
    # pointers, so anything it would misread is fixed here.
    if x.device.type != "cpu" or train.device.type != "cpu":
        raise ValueError("the cpu nearest backend needs CPU tensors")
    if x.dtype not in (torch.float32, torch.float64) or x.dim() != 2 or train.dim() != 2 or train.shape[1] != x.shape[1]:
        raise ValueError(f"need x float32/float64 [B, n] and train [N, n], got {x.dtype} {tuple(x.shape)} and {tuple(train.shape)}")
    if train.dtype not in _TRAIN_KIND:
        train = train.float()  # float16 / bfloat16 images: exact in float32
    B, n = x.shape
    N = train.shape[0]
    # outputs start as NaN / -1 so that anything the kernel failed to write is visible
    out = torch.full((B, n), float("nan"), dtype=x.dtype)
    index = torch.full((B,), -1, dtype=torch.int64)
    dist = torch.full((B,), float("nan"), dtype=torch.float64)
    mod.nearest_denoise_run(
        x.data_ptr(), B, n, x.stride(0), x.stride(1), x.dtype == torch.float64,
        train.data_ptr(), N, train.stride(0), train.stride(1), _TRAIN_KIND[train.dtype],
        math.sqrt(alpha_bar), out.data_ptr(), x.dtype == torch.float64, index.data_ptr(), dist.data_ptr(),
        bool(force_portable),
    )
    return out, index, dist


def nearest_denoise_cpu(x, train, alpha_bar, chunk_size=256):
    """Backend of ``ops.nearest_denoise`` (reference signature; inputs validated): the
    optimal denoiser's float64 distances with an argmin, O(N n), lowest index on ties.
    ``chunk_size`` is a memory knob of the reference only."""
    return nearest_run(x, train, alpha_bar)[0]


_registry.register("nearest_denoise", "cpu", nearest_denoise_cpu, devices=("cpu",), priority=10, is_available=nearest_available)
