"""Certified pruning of whole-image distances (docs/algorithms.md §14), shared by the CPU
backends of ``optimal_denoise`` (ops/locality) and ``nearest_denoise`` (ops/nearest).

A training image is skipped for a query only when a proven lower bound on its distance
``d_k = ||x - a y_k||^2`` exceeds a proven upper bound ``U`` on the smallest distance by a
margin ``delta``: for the softmax, ``delta = (64 ln 2 + ln N) / scale`` makes every skipped
weight smaller than ``2^-64 / N`` times the weight of an image that is kept, so all of them
together change the normaliser by less than ``2^-64`` relative and the output by less than
``2^-63`` (absolute, images in [-1, 1]); for the argmin, ``delta = 0``.

The lower bound (docs/algorithms.md §14.1) is the expanded distance
``||x||^2 - 2a <x, y_k> + a^2 ||y_k||^2`` with the cross terms from one float32 GEMM
``[B, n] x [n, N]`` (exact float32 operands: uint8 images as ``u - 127.5``), minus a proven
bound on its error: a float32 dot product of length n with one more rounding of x is off by at
most ``gamma_{n+1} sum_j |x_j| |y_j| <= gamma_{n+1} ||x|| ||y||`` for any summation order
(Higham, Accuracy and Stability, Thm 3.1 / §3.5), ``gamma_m = m u / (1 - m u)``,
``u = 2^-24``; the float64 parts add at most ``(4n + 64) 2^-53 (||x|| + a ||y||)^2``. The
expanded form cancels at low noise (docs/algorithms.md §5.7), which only makes the bound
looser, never wrong: the subtracted error bound holds whatever the cancellation. The
float32 GEMM runs only when torch computes float32 matmuls in IEEE float32
(``torch.get_float32_matmul_precision() == "highest"``, no oneDNN bf16/tf32 override);
otherwise the same bound is computed in float64 (``u = 2^-53``).

For a uint8 training set the cross terms come instead from exact integer dot products of
the images with the query quantised in two int8 levels (``METHOD = "int8"``; AMX-INT8 tiles,
AVX-512 VNNI or plain C++ in ``_C.prune_bound_u8``), the residual's contribution bounded by
Cauchy-Schwarz / Hoelder with per-image norms precomputed here (docs/algorithms.md §14.1,
"integer bound"): 1 byte read per pixel, and the bound, the upper bound and the survivor lists
in one compiled pass.

The upper bound: the exact float64 distances (direct differences) of the ``CANDIDATES``
images with the smallest lower bounds; the smallest, enlarged by its own rounding bound.
"""
from __future__ import annotations

import math
import threading
import weakref
from typing import Tuple

import numpy as np
import torch

from .. import _ext
from .._validate import to_unit
from ..schedule import noise_level

__all__ = ["TrainFeatures", "train_features", "survivors", "quantise", "last_stats", "set_stats", "clear_feature_cache", "CANDIDATES", "METHOD", "LEVELS", "softmax_margin", "softmax_logit_margin", "fp32_gemm_is_ieee"]

CANDIDATES = 4  # exact distances per query for the upper bound
# Bound for uint8 training sets: "int8" (exact integer dot products, _C.prune_bound_u8, VNNI
# where the CPU has it), "int8-portable" (the same without VNNI; tests) or "gemm" (the float32
# GEMM bound, which float training sets always use). A speed setting: every one is certified.
METHOD = "int8"
LEVELS = 2  # int8 quantisation levels of the query (2: the residual error is ~2^-8 of one level's)
_CHUNK = 2048  # images converted to float64 at a time (2048 x 3072 x 8 B = 50 MB)
_U = 2.0**-53  # float64 unit roundoff

_stats = threading.local()


def last_stats() -> dict:
    """Counters of this thread's last pruned CPU call (optimal, nearest, locality):
    ``pairs`` (query x image pairs), ``skipped`` (pairs whose distance the kernel never
    computed) and ``skipped_fraction``. Empty before the first call; a debugging and
    benchmarking hook."""
    return dict(getattr(_stats, "value", {}))


def set_stats(pairs: int, skipped: int) -> None:
    """Record the counters :func:`last_stats` returns (called by the backends)."""
    _stats.value = {"pairs": int(pairs), "skipped": int(skipped), "skipped_fraction": skipped / pairs if pairs else 0.0}


def fp32_gemm_is_ieee() -> bool:
    """Whether torch's CPU float32 matmul is plain IEEE float32 (the error bound of the module
    docstring assumes it): no reduced-precision setting is active."""
    if torch.get_float32_matmul_precision() != "highest":
        return False
    mk = getattr(getattr(torch.backends, "mkldnn", None), "matmul", None)
    prec = getattr(mk, "fp32_precision", None) if mk is not None else None
    return prec in (None, "none", "ieee")


class TrainFeatures:
    """Per training set (computed once, cached by identity and version): ``y2`` / ``ynorm``
    float64 ``[N]``, squared norms and norms in [-1, 1] units; ``Y`` ``[N, n]`` float32 exact
    copies of the images for the GEMM bound (uint8 as ``u - 127.5``, ``scale`` = 1/127.5 maps
    them to [-1, 1]; a float32 training set is used in place, float64 is kept as float64),
    built on first use. A uint8 set also has what the integer bound needs
    (docs/algorithms.md §14.1): ``u8`` (the images, rows contiguous: the set itself or a
    copy), ``ucn`` / ``uc1`` float64 ``[N]``, the 2-norm (rounded up) and the 1-norm (exact)
    of ``u_k - 127.5``. Nothing here keeps a reference to the training set (the cache
    is keyed by a weak reference to it): the methods take it again."""

    def __init__(self, train: torch.Tensor):
        N, n = train.shape
        self.n, self.N = n, N
        self._Y = None
        self._u8 = None
        self.scale = 1.0 / 127.5 if train.dtype == torch.uint8 else 1.0
        norms = []
        for k0 in range(0, N, _CHUNK):
            norms.append(to_unit(train[k0 : k0 + _CHUNK], torch.float64).pow(2).sum(1))
        self.y2 = torch.cat(norms)
        self.ynorm = self.y2.sqrt()
        self.ucn = self.uc1 = None
        if train.dtype == torch.uint8:
            sq, ab = [], []
            for k0 in range(0, N, _CHUNK):
                c = train[k0 : k0 + _CHUNK].to(torch.int64).mul_(2).sub_(255)  # 2 (u - 127.5), exact
                sq.append(c.pow(2).sum(1))
                ab.append(c.abs_().sum(1))
            # integer sums, exact in float64 (< 2^53); the square root is rounded up by a margin
            self.ucn = (torch.cat(sq).to(torch.float64).sqrt() * 0.5) * (1.0 + 2.0**-50)
            self.uc1 = torch.cat(ab).to(torch.float64) * 0.5

    def u8(self, train: torch.Tensor) -> torch.Tensor:
        """``train`` (uint8, the set these features are of) with contiguous rows: itself, or a
        copy made once."""
        if train.stride(1) == 1 and train.stride(0) >= self.n:
            return train
        if self._u8 is None:
            self._u8 = train.contiguous()
        return self._u8

    def Y(self, train: torch.Tensor) -> torch.Tensor:
        """The GEMM operand (see the class docstring) of ``train``, built on first use."""
        if self._Y is None:
            N, n = self.N, self.n
            if train.dtype == torch.uint8:
                Y = torch.empty(N, n, dtype=torch.float32)
                for k0 in range(0, N, _CHUNK):
                    Y[k0 : k0 + _CHUNK] = train[k0 : k0 + _CHUNK].to(torch.float32).sub_(127.5)
            elif train.dtype == torch.float64:
                Y = train
            else:
                Y = train.to(torch.float32)  # float32 in place; float16/bfloat16 exactly
            self._Y = Y
        return self._Y

    def dots(self, x: torch.Tensor, train: torch.Tensor) -> Tuple[np.ndarray, float]:
        """``(<x, y_k> [B, N], g)``: the cross terms (float64 numpy) and ``g`` with
        ``|computed - exact| <= g ||x|| ||y_k||``."""
        n = self.n
        Y = self.Y(train)
        if Y.dtype == torch.float32 and fp32_gemm_is_ieee():
            u = 2.0**-24
            d = (x.to(torch.float32) @ Y.T).numpy().astype(np.float64)
        else:
            u = _U
            xd = x.to(torch.float64)
            d = torch.cat([xd @ Y[k0 : k0 + _CHUNK].to(torch.float64).T for k0 in range(0, self.N, _CHUNK)], 1).numpy()
        if self.scale != 1.0:
            d *= self.scale
        m = n + 2  # n products and sums, one rounding of x, one of the scaling
        return d, m * u / (1.0 - m * u) * (1.0 + 1e-6)


_cache_lock = threading.RLock()  # re-entrant: a weakref callback (_forget) can run inside a locked section when gc collects a training set
_cache: dict = {}  # (id(base), data_ptr, shape, stride, dtype) -> (weakref to base, version, TrainFeatures)


def _version(t: torch.Tensor):
    try:
        return t._version
    except RuntimeError:  # inference-mode tensors have no version counter
        return None


def train_features(train: torch.Tensor) -> TrainFeatures:
    """The cached :class:`TrainFeatures` of ``train`` ``[N, n]`` (uint8 or float in [-1, 1]).
    Reused while the tensor it was computed from -- or, for a view such as the ops' flattened
    ``[N, n]`` of an ``[N, C, H, W]`` set, the tensor it views -- is alive, unchanged (its
    version counter, which views share) and seen through the same address, shape and
    strides; anything else recomputes (a stale entry would make the bound wrong)."""
    base = train._base if train._base is not None else train
    ver = _version(train)
    sig = (train.data_ptr(), tuple(train.shape), tuple(train.stride()), train.dtype)
    key = (id(base),) + sig
    if ver is not None:
        with _cache_lock:
            hit = _cache.get(key)
        if hit is not None and hit[0]() is base and hit[1] == ver:
            return hit[2]
    feats = TrainFeatures(train)
    if ver is not None:
        ref = weakref.ref(base, lambda _r, key=key: _forget(key))
        with _cache_lock:
            _cache[key] = (ref, ver, feats)
            while len(_cache) > 8:
                _cache.pop(next(iter(_cache)))
    return feats


def _forget(key) -> None:
    with _cache_lock:
        _cache.pop(key, None)


def clear_feature_cache() -> None:
    """Forget every cached :class:`TrainFeatures` (tests, memory)."""
    with _cache_lock:
        _cache.clear()


def nan_array(shape, dtype: torch.dtype) -> torch.Tensor:
    """A CPU tensor of ``shape`` and float ``dtype`` filled with NaN by numpy (single-threaded:
    the pruned backends' outputs are small, and a torch fill this size runs on torch's thread
    pool, whose join waited milliseconds for a descheduled thread on a busy machine)."""
    return torch.from_numpy(np.full(shape, np.nan, dtype=np.float64 if dtype == torch.float64 else np.float32))


def softmax_logit_margin(N: int) -> float:
    """The pruning margin of a softmax over N images in logits, ``64 ln 2 + ln N``: every
    skipped weight is below ``2^-64 / N`` of the largest (docs/algorithms.md §14.2)."""
    return 64.0 * math.log(2.0) + math.log(max(N, 1))


def softmax_margin(N: int, alpha_bar: float, temperature: float) -> float:
    """``delta`` of the module docstring for a softmax over N images: the distance margin
    whose logit is :func:`softmax_logit_margin` (docs/algorithms.md §14.2)."""
    _, s2 = noise_level(alpha_bar)
    return softmax_logit_margin(N) * 2.0 * s2 * temperature


def survivors(x: torch.Tensor, train: torch.Tensor, alpha_bar: float, margin: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(offsets [B + 1], index)`` int64 (CSR): per query b, ``index[offsets[b]:offsets[b+1]]`` are the ascending indices of the training images whose distance may lie
    within ``margin`` of the smallest: every image with ``d_k <= min_j d_j + margin`` is
    listed (proof in the module docstring and docs/algorithms.md §14.1), the others may be
    dropped. ``x`` float32/float64 ``[B, n]``, ``train`` ``[N, n]`` (uint8 or float), CPU.
    A uint8 set uses the integer bound (``METHOD``), a float set the float32 GEMM bound."""
    a, _ = noise_level(alpha_bar)
    tf = train_features(train)
    # the compiled kernels have no autograd: the caller sees a result without grad. numpy, not
    # torch: a [B, n] torch op runs on torch's thread pool, and on a busy machine its join
    # waited ~8 ms for the second thread (0.05 ms of work; results/pruning_notes.md)
    xf = torch.from_numpy(x.detach().numpy().astype(np.float64))
    if train.dtype == torch.uint8 and METHOD != "gemm" and _ext.cpu_has(("prune_bound_u8",)):
        return _survivors_u8(xf, train, tf, a, margin, LEVELS, force_portable=METHOD == "int8-portable")
    return _survivors_gemm(xf, train, tf, a, margin)


def _survivors_gemm(xf: torch.Tensor, train: torch.Tensor, tf: TrainFeatures, a: float, margin: float):
    """The GEMM bound (module docstring): any training dtype."""
    B, n = xf.shape
    N = train.shape[0]
    # Everything after the GEMM is [B, N] elementwise work: numpy, single-threaded (a torch
    # op this small costs more in thread wake-ups than in arithmetic on a shared machine).
    x2 = xf.pow(2).sum(1).numpy()  # [B]
    xn = np.sqrt(x2)[:, None]
    y2, ynorm = tf.y2.numpy()[None, :], tf.ynorm.numpy()[None, :]
    dots, g = tf.dots(xf, train)
    est = dots
    est *= -2.0 * a
    est += x2[:, None]
    est += (a * a) * y2  # [B, N]
    err = (xn + a * ynorm) ** 2
    err *= (4 * n + 64) * _U
    err += (2.0 * a * g) * xn * ynorm
    # upper bound: exact distances of the few images with the smallest estimates
    c = min(CANDIDATES, N)
    cand = np.argpartition(est, c - 1, axis=1)[:, :c] if c < N else np.tile(np.arange(N), (B, 1))
    cand_t = torch.from_numpy(np.ascontiguousarray(cand)).long()
    yc = to_unit(train[cand_t.reshape(-1)], torch.float64).reshape(B, c, n)
    dc = (xf[:, None, :] - a * yc).pow(2).sum(2).numpy()  # direct differences, float64
    # enlarged by its rounding bound: each term's error is below 3u (|x| + a|y|)^2 and the
    # sum adds gamma_n; (4n + 64) u (||x|| + a ||y||)^2 covers both
    dc = dc + (4 * n + 64) * _U * (xn + a * tf.ynorm.numpy()[cand]) ** 2
    U = np.minimum(dc.min(1), (est + err).min(1))
    est -= err  # the lower bounds L_k
    keep = est <= (U + margin)[:, None]
    rows, cols = np.nonzero(keep)  # row-major: ascending per query
    offsets = np.zeros(B + 1, dtype=np.int64)
    np.cumsum(np.bincount(rows, minlength=B), out=offsets[1:])
    return torch.from_numpy(offsets), torch.from_numpy(cols.astype(np.int64))



def quantise(xf: torch.Tensor, levels: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``x = sum_l s_l q_l + r`` exactly (docs/algorithms.md §14.1, integer bound): ``xf`` float64
    ``[B, n]`` (finite) -> ``(q int8 [levels * B, n] (level-major), s float64 [B, levels]
    (powers of two), Q float64 [B, levels] (sum_j q_lj), rn [B], rmax [B])`` with ``rn >=
    ||r||_2`` and ``rmax >= max_j |r_j|``. Each level quantises the previous residual with the
    power of two ``s_l >= max|r| / 127``: ``r / s_l`` and ``s_l q`` are exact, and ``r - s_l q``
    is exact too (|r - s_l q| <= s_l / 2 <= |r| where q != 0, on the same binade grid)."""
    r = xf.numpy().copy()
    B, n = r.shape
    q = np.empty((levels, B, n), dtype=np.int8)
    s = np.empty((B, levels))
    Q = np.empty((B, levels))
    for lev in range(levels):
        m = np.abs(r).max(1) / 127.0
        _, e = np.frexp(m)  # m < 2^e
        sl = np.where(m > 0, np.ldexp(1.0, e), 1.0)
        ql = np.rint(r / sl[:, None])
        r -= ql * sl[:, None]
        q[lev] = ql.astype(np.int8)
        s[:, lev] = sl
        Q[:, lev] = ql.sum(1)
    # exact in theory; the margins cover a rounding anywhere above all the same
    rn = np.sqrt(np.square(r).sum(1)) * (1.0 + 2.0**-40)
    rmax = np.abs(r).max(1) * (1.0 + 2.0**-40)
    return q.reshape(levels * B, n), s, Q, rn, rmax


def _survivors_u8(xf: torch.Tensor, train: torch.Tensor, tf: TrainFeatures, a: float, margin: float, levels: int,
                  force_portable: bool = False, lower: torch.Tensor = None, upper: torch.Tensor = None):
    """The integer bound (docs/algorithms.md §14.1): one pass of ``_C.prune_bound_u8`` over
    the uint8 set. ``lower`` ``[B, N]`` / ``upper`` ``[B]`` float64 receive the bounds (tests)."""
    B, n = xf.shape
    N = train.shape[0]
    xf = xf.contiguous()
    q, s, Q, rn, rmax = quantise(xf, levels)
    R = -(-levels * B // 4) * 4
    qp = np.zeros((R, n), dtype=np.int8)
    qp[: levels * B] = q
    x2 = np.square(xf.numpy()).sum(1)
    qpar = np.ascontiguousarray(np.concatenate([x2[:, None], np.sqrt(x2)[:, None], rn[:, None], rmax[:, None], s, Q], 1))
    u8 = tf.u8(train)
    L = lower if lower is not None else torch.empty(B, N, dtype=torch.float64)
    offsets = torch.empty(B + 1, dtype=torch.int64)
    index = torch.empty(B * N, dtype=torch.int64)
    kept = _ext.cpu_module().prune_bound_u8(
        qp.ctypes.data, B, levels, n, xf.data_ptr(), qpar.ctypes.data, u8.data_ptr(), N, u8.stride(0),
        tf.y2.data_ptr(), tf.ynorm.data_ptr(), tf.ucn.data_ptr(), tf.uc1.data_ptr(), a, float(margin), CANDIDATES,
        L.data_ptr(), 0 if upper is None else upper.data_ptr(), offsets.data_ptr(), index.data_ptr(), bool(force_portable),
    )
    return offsets, index[:kept]
