"""CPU backend of ``windowed_locality_denoise`` (docs/algorithms.md §9 with §5):
``_C.windowed_locality_run``.

Per (query, training image) the kernel computes the squared-difference image
``E = (x - a*y)^2`` in float64 (direct differences, never the expanded form), a few
prefix-sum planes of it (vertical running sums, channel sums, 2-D integral images), and every
output pixel's windowed distance as a short signed sum of plane values at fixed offsets,
vectorised along image rows (AVX-512 where the CPU has it, a portable copy otherwise). The
plan is built per call from the ``[C, C, k, k]`` window in microseconds: output channels
with identical windows share distances and softmax weights; each window is read as column
runs, or as its bounding box over a set of input channels minus the holes, whichever is
cheaper; rows and columns are swapped when row runs are cheaper; prefix-sum planes are used
only where their rounding stays far below the logit scale. Never a per-pixel gather of the
whole window and nothing n x n: memory O(B*n + threads*k*n).

The softmax is float64 and online, in chunks of 8 training images (one exp per logit plus one
per chunk), in fixed training blocks merged exactly in order: the result depends neither on
the thread count nor on the schedule. :func:`windowed_plan` shows what the planner chose.

Certified pruning (``prune=True``, the default; docs/algorithms.md §14.6): an (image, 8
pixels, group) softmax update is skipped when all 8 logits lie more than
``64 ln 2 + ln N`` below the running maximum (``pruning.softmax_logit_margin``), so all
skipped weights together are below ``2^-64`` of the largest; in exact mode each query's running
maximum starts at the exact logits of a few training images nearest in a subsampled distance
(per 16 x 16 region), so that the bound bites from the first image on. ``last_stats()`` tells
how much was skipped.

Importing this module only registers the backend; the compiled module is loaded on the first
availability probe or call.
"""
from __future__ import annotations

import math

import torch

from ... import _ext, registry
from ...schedule import noise_level
from ..pruning import softmax_logit_margin
from ..softmax_state import SoftmaxState

__all__ = ["available", "last_stats", "windowed_locality_denoise_cpu", "windowed_plan"]

# logit margin of the unpruned kernel: only weights below e^-690 (which underflow) are skipped
_UNPRUNED_SKIP = 690.0
# warm start by default from this alpha_bar on (a speed setting: measured skipped fractions are
# 0 at t >= 500, 1-3% at t = 400 (alpha_bar 0.19), 13-22% at t = 300 (0.39), docs/algorithms.md §14.6)
_WARM_ALPHA_BAR = 0.3
_LAST: dict = {}


def last_stats() -> dict:
    """Statistics of the last call in this process: the plan's (see :func:`windowed_plan`) plus
    ``softmax_vectors`` (query x image x group x 8-pixel softmax updates), ``skipped_vectors``
    and ``skipped_fraction`` (those the pruning bound skipped), ``warm_images`` (query x image
    pairs computed once more to start the running max) and ``skip_logit``."""
    return dict(_LAST)

_SYMBOLS = ("windowed_locality_run", "windowed_locality_plan")


def available() -> bool:
    """``_C`` loads and has the windowed locality kernel."""
    return _ext.cpu_has(_SYMBOLS)


def _module():
    return _ext.require_cpu(_SYMBOLS, "windowed locality")


def _window_u8(window: torch.Tensor) -> torch.Tensor:
    return window.detach().cpu().to(torch.bool).view(torch.uint8)


def windowed_plan(window: torch.Tensor, image_shape, alpha_bar: float, *, temperature: float = 1.0, xmax: float = 4.0, options: int = 0) -> dict:
    """The CPU kernel's plan for ``window`` (bool ``[C, C, k, k]``) on ``(C, H, W)`` images at
    ``alpha_bar``: a dict with ``groups``, ``terms`` (plane reads per output pixel, summed over
    groups), ``area`` (the window's size: the dense method's adds), ``planes``,
    ``integral_planes``, ``transposed``, ``cost`` and a readable ``plan``. ``xmax`` bounds
    ``|x|`` (it decides which prefix sums are precise enough)."""
    C, H, W = (int(s) for s in image_shape)
    a, s2 = noise_level(alpha_bar)
    w8 = _window_u8(window)
    emax = (float(xmax) + a) ** 2
    return _module().windowed_locality_plan(
        w8.data_ptr(), C, w8.shape[-1], *w8.stride(), H, W, 1.0 / (2.0 * s2 * temperature), emax, int(options)
    )


def windowed_locality_denoise_cpu(
    x, train, window, alpha_bar, temperature=1.0, softmax="exact", chunk_size=256, return_state=False, *, options: int = 0, force_portable: bool = False, stats: dict = None,
    prune: bool = True,
    warm_start=None,
):
    """Backend of ``ops.windowed_locality_denoise`` (reference signature; inputs validated).

    ``options`` / ``force_portable`` restrict the planner / pick the plain C++ copy (tests);
    ``stats``, if a dict, receives the call's statistics (see :func:`last_stats`).
    ``prune=False`` skips only weights that underflow (e^-690) and starts every running max
    at -inf: the unpruned kernel, for tests and benchmarks; the pruned result differs from it
    by less than ``2^-63`` per pixel before rounding (docs/algorithms.md §14.6). ``warm_start``
    (exact mode, with ``prune``): start the running maxima from a few candidate images; the
    default (None) does so when ``alpha_bar >= 0.3`` (t <~ 330 in the DDPM schedule): at higher
    noise the softmax is flat, nothing is skipped, and the candidate search would only cost."""
    if x.device.type != "cpu" or train.device.type != "cpu" or window.device.type != "cpu":
        raise ValueError("the cpu windowed locality backend needs CPU tensors")
    if train.dtype not in _ext.TRAIN_KIND:
        train = train.float()  # float16 / bfloat16 images: exact in float32
    if x.dtype not in (torch.float32, torch.float64):
        x = x.float()
    B, C, H, W = x.shape
    N = train.shape[0]
    n = C * H * W
    a, s2 = noise_level(alpha_bar)
    scale = 1.0 / (2.0 * s2 * temperature)
    if not math.isfinite(scale):
        raise ValueError("the logit scale 1 / (2 (1 - alpha_bar) temperature) is not finite")
    w8 = _window_u8(window)
    skip = softmax_logit_margin(N) if prune else _UNPRUNED_SKIP
    warm = bool(prune) and (alpha_bar >= _WARM_ALPHA_BAR if warm_start is None else bool(warm_start))
    nan = float("nan")
    # outputs start as NaN so that anything the kernel failed to write is visible
    out = None if return_state else torch.full((B, n), nan, dtype=x.dtype)
    mx = l = acc = None
    if return_state:
        mx, l, acc = (torch.full((B, n), nan, dtype=torch.float64) for _ in range(3))
    ptr = lambda t: 0 if t is None else t.data_ptr()  # noqa: E731
    res = _module().windowed_locality_run(
        x.data_ptr(), B, C, H, W, *x.stride(), x.dtype == torch.float64,
        train.data_ptr(), N, *train.stride(), _ext.TRAIN_KIND[train.dtype],
        w8.data_ptr(), w8.shape[-1], *w8.stride(),
        a, scale, 0 if softmax == "exact" else int(chunk_size),
        ptr(out), x.dtype == torch.float64, ptr(mx), ptr(l), ptr(acc),
        int(options), bool(force_portable), float(skip), bool(warm),
    )
    res["skip_logit"] = float(skip)
    res["skipped_fraction"] = res["skipped_vectors"] / max(res["softmax_vectors"], 1)
    _LAST.clear()
    _LAST.update(res)
    if stats is not None:
        stats.update(res)
    if return_state:
        return SoftmaxState(mx, l, acc)
    return out.reshape(x.shape)


registry.register("windowed_locality_denoise", "cpu", windowed_locality_denoise_cpu, devices=("cpu",), priority=10, is_available=available)
