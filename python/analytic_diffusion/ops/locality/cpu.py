"""CPU backend of ``locality_denoise`` / ``optimal_denoise`` (docs/algorithms.md §5, §6): ``_C.locality_denoise_run`` runs a per-mask
*plan* (:func:`locality_plan`): pixels with identical windows share one distance; windows are
runs of consecutive pixels, each costing two lookups in per-segment prefix sums of the
squared differences (one for a lone pixel); a spanning tree lets a window start from a
similar one. Distances, logits and softmax state are float64 (direct differences, never the
expanded form), so float32 and float64 queries are both exact to rounding; the online
softmax is merged across threads with the docs/algorithms.md §5.3 rule. Plans are cached by mask content (LRU
of 32), so a sampler that passes the same masks every run builds each plan once; an op that
is given the same mask tensor again skips even the hashing. Real-valued masks (threshold <= 0)
that are not 0/1 fall back to the float64 reference. All-ones windows (the optimal
denoiser) cost O(N n).

Importing this module only registers the backends; the compiled module is loaded on the
first availability probe or call.
"""
from __future__ import annotations

import threading

import torch

from ... import _ext, registry
from .. import pruning
from ..pruning import last_stats  # noqa: F401  (re-exported: the benchmarks read it here)
from ..softmax_state import SoftmaxState
from .plan_cache import PlanCache
from .reference import locality_denoise_reference
from ...schedule import noise_level

_SYMBOLS = ("locality_plan_build", "locality_plan_full", "locality_denoise_run", "full_pruned_run", "LocalityPlan")
_plans = PlanCache(max_entries=32)  # (mask content, segment, use_tree) -> _C.LocalityPlan
_full_lock = threading.Lock()
_full_plans: dict = {}  # n -> plan of the all-ones mask
def available() -> bool:
    """``_C`` loads and has the locality kernels."""
    return _ext.cpu_has(_SYMBOLS)


def _module():
    return _ext.require_cpu(_SYMBOLS, "locality")


def is_binary(mask: torch.Tensor) -> bool:
    """Whether ``mask`` holds only 0 and 1 (bool masks always do)."""
    return mask.dtype == torch.bool or bool(((mask == 0) | (mask == 1)).all())


def locality_plan(mask: torch.Tensor, *, segment: int = 0, use_tree: bool = True):
    """The CPU kernel's plan for ``mask`` (bool, or float with only 0/1 values, ``[n, n]``,
    column m the window of pixel m): built on first use, then cached by content (LRU of 32).

    Returns an ``_C.LocalityPlan`` (attributes ``num_groups``, ``lookups``, ``area``,
    ``build_seconds``, ...), or None for a real-valued mask (those run the reference).
    ``segment`` (0 = default) and ``use_tree`` are tuning knobs for tests and benchmarks.
    Calling it ahead of time (``LocalityDenoiser.prepare`` does, through the registry's
    ``prepare``) keeps plan building out of the first sampling run.
    """
    if mask.dim() != 2 or mask.shape[0] != mask.shape[1]:
        raise ValueError(f"mask must be [n, n], got shape {tuple(mask.shape)}")
    mask = mask.cpu()
    if not is_binary(mask):
        return None

    def build():
        n = mask.shape[0]
        m8 = (mask != 0).contiguous().view(torch.uint8)
        return _module().locality_plan_build(m8.data_ptr(), n, n, 1, int(segment), bool(use_tree))

    return _plans.get(mask, (int(segment), bool(use_tree)), build)


def full_plan(n: int):
    """The cached plan of the all-ones mask for n pixels (the optimal denoiser; ``full_pruned_run`` takes it)."""
    with _full_lock:
        plan = _full_plans.get(n)
    if plan is None:
        plan = _module().locality_plan_full(n, 0)
        with _full_lock:
            _full_plans[n] = plan
    return plan


def clear_plan_cache() -> None:
    """Forget every cached plan (tests, memory)."""
    _plans.clear()
    with _full_lock:
        _full_plans.clear()




def _run(plan, x: torch.Tensor, train: torch.Tensor, alpha_bar: float, temperature: float, chunk: int, return_state: bool, expand_state: bool):
    # Not input validation (the public op did that): the kernel reads and writes through raw
    # pointers, so anything it would misread is fixed here.
    if x.device.type != "cpu" or train.device.type != "cpu":
        raise ValueError("the cpu locality backend needs CPU tensors")
    if train.dtype not in _ext.TRAIN_KIND:
        train = train.float()  # float16 / bfloat16 images: exact in float32
    B, n = x.shape
    N = train.shape[0]
    pruning.set_stats(B * N, 0)
    if plan.n != n:
        raise ValueError(f"plan is for n = {plan.n}, the queries have n = {n}")
    a, s2 = noise_level(alpha_bar)
    scale = 1.0 / (2.0 * s2 * temperature)
    nan = float("nan")
    # outputs start as NaN so that anything the kernel failed to write is visible
    out = None if return_state else torch.full((B, n), nan, dtype=x.dtype)
    mx = l = acc = None
    if return_state:
        G = plan.num_groups
        mx = torch.full((B, G), nan, dtype=torch.float64)
        l = torch.full((B, G), nan, dtype=torch.float64)
        acc = torch.full((B, n), nan, dtype=torch.float64)
    _module().locality_denoise_run(
        plan, x.data_ptr(), B, x.stride(0), x.stride(1), x.dtype == torch.float64,
        train.data_ptr(), N, train.stride(0), train.stride(1), _ext.TRAIN_KIND[train.dtype],
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
    return SoftmaxState(mx, l, acc)  # float64 whatever x's dtype


def locality_denoise_cpu(x, train, mask, alpha_bar, temperature=1.0, softmax="exact", chunk_size=256, return_state=False):
    """Backend of ``ops.locality_denoise`` (reference signature; inputs validated)."""
    plan = locality_plan(mask)
    if plan is None:  # real-valued weights: the float64 reference, in x's dtype
        res = locality_denoise_reference(x.double(), train, mask.cpu().double(), alpha_bar, temperature, softmax, chunk_size, return_state)
        return res if return_state else res.to(x.dtype)
    return _run(plan, x, train, alpha_bar, temperature, 0 if softmax == "exact" else chunk_size, return_state, True)


# Below this many training images the bound's GEMM and per-query calls cost more than they save.
PRUNE_MIN_N = 256
# Pruning pays only when most pairs are skipped.
PRUNE_MAX_KEPT = 0.5
# Below this alpha_bar (t > ~430 on the linear schedule) the softmax is too flat for the bound
# to pay for itself: measured at N = 20,000 natural 32x32 crops (results/pruning.md), t = 500
# skips 59% and runs 0.55x, t >= 600 skips nothing. A speed setting only: exactness never
# depends on it.
PRUNE_MIN_ALPHA_BAR = 0.15


def optimal_denoise_cpu(x, train, alpha_bar, temperature=1.0, chunk_size=256, return_state=False, prune=True):
    """Backend of ``ops.optimal_denoise``: the one-group plan, O(N n); with ``prune`` (default)
    certified pruning (docs/algorithms.md §14): images whose weight is provably below
    ``2^-64 / N`` of a kept image's are never read. :func:`last_stats` counts what was skipped."""
    B, n = x.shape
    N = train.shape[0]
    plan = full_plan(n)
    if not prune or N < PRUNE_MIN_N or alpha_bar < PRUNE_MIN_ALPHA_BAR:
        return _run(plan, x, train, alpha_bar, temperature, 0, return_state, False)
    offsets, index = pruning.survivors(x, train, alpha_bar, pruning.softmax_margin(N, alpha_bar, temperature))
    kept = int(index.numel())
    if kept > PRUNE_MAX_KEPT * B * N:
        return _run(plan, x, train, alpha_bar, temperature, 0, return_state, False)
    if train.dtype not in _ext.TRAIN_KIND:
        train = train.float()
    a, s2 = noise_level(alpha_bar)
    # outputs start as NaN so that anything the kernel failed to write is visible (numpy: a
    # torch fill this size runs on the thread pool, whose join can wait ms on a busy machine)
    out = None if return_state else pruning.nan_array((B, n), x.dtype)
    mx = l = acc = None
    if return_state:
        mx, l, acc = (pruning.nan_array(s, torch.float64) for s in ((B, 1), (B, 1), (B, n)))
    _module().full_pruned_run(
        plan, x.data_ptr(), B, x.stride(0), x.stride(1), x.dtype == torch.float64,
        train.data_ptr(), N, train.stride(0), train.stride(1), _ext.TRAIN_KIND[train.dtype],
        a, 1.0 / (2.0 * s2 * temperature), offsets.data_ptr(), index.data_ptr(), False,
        0 if out is None else out.data_ptr(), x.dtype == torch.float64,
        0 if mx is None else mx.data_ptr(), 0 if l is None else l.data_ptr(), 0 if acc is None else acc.data_ptr(), 0,
    )
    pruning.set_stats(B * N, B * N - kept)
    return SoftmaxState(mx, l, acc) if return_state else out


registry.register("locality_denoise", "cpu", locality_denoise_cpu, devices=("cpu",), priority=10, is_available=available, prepare=locality_plan)
registry.register("optimal_denoise", "cpu", optimal_denoise_cpu, devices=("cpu",), priority=10, is_available=available)
