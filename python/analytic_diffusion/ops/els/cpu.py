"""Compiled CPU backend of ``els_denoise`` (``csrc/cpu/els.cpp``, docs/algorithms.md §10):
distances by shifts (box sums of float64 squared differences, never the expanded form),
exact online softmax per query pixel, OpenMP over training images. Registers itself here.

Importing this module only registers the backend; the compiled module is loaded on the
first call (``_ext.cpu_module()``), and the backend reports itself unavailable when the
extension is missing or predates the ELS kernel.
"""
from __future__ import annotations

import math

import torch

from ... import _ext, registry
from ...schedule import noise_level
from ..softmax_state import SoftmaxState

_SYMBOLS = ("els_denoise_run",)


def available() -> bool:
    """``_C`` loads and has the ELS kernel."""
    return _ext.cpu_has(_SYMBOLS)


def _module():
    return _ext.require_cpu(_SYMBOLS, "els_denoise")


def els_denoise_cpu(x, train, patch_size, alpha_bar, padding="circular", temperature=1.0, chunk_size=64, return_state=False):
    """Backend contract of :func:`~analytic_diffusion.ops.els.reference.els_denoise_reference`.
    ``chunk_size`` is unused (the kernel streams one training image at a time per thread)."""
    mod = _module()
    if x.device.type != "cpu" or train.device.type != "cpu":
        raise ValueError("the cpu els_denoise backend needs CPU tensors")
    B, C, H, W = x.shape
    N = train.shape[0]
    a, s2 = noise_level(alpha_bar)
    scale = 1.0 / (2.0 * s2 * temperature)
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"alpha_bar = {alpha_bar} gives a logit scale of {scale}")
    xd = x.to(torch.float64).contiguous()  # [B, C, H, W]: the kernel reads float64 queries
    if train.dtype not in _ext.TRAIN_KIND:  # float16: widen once (exact)
        train = train.to(torch.float32)
    mx = torch.empty(B, H, W, dtype=torch.float64)
    l = torch.empty(B, H, W, dtype=torch.float64)
    acc = torch.empty(B, C, H, W, dtype=torch.float64)
    s = train.stride()
    if any(v < 0 for v in s):  # pragma: no cover - torch has no negative strides
        train = train.contiguous()
        s = train.stride()
    mod.els_denoise_run(
        xd.data_ptr(), B, C, H, W,
        train.data_ptr(), N, s[0], s[1], s[2], s[3], _ext.TRAIN_KIND[train.dtype],
        int(patch_size), padding == "circular", a, scale,
        mx.data_ptr(), l.data_ptr(), acc.data_ptr(),
    )
    if return_state:
        rep = lambda t: t[:, None].expand(B, C, H, W).reshape(B, -1).contiguous()  # noqa: E731
        return SoftmaxState(rep(mx), rep(l), acc.reshape(B, -1))
    return (acc / l[:, None]).to(x.dtype)


registry.register("els_denoise", "cpu", els_denoise_cpu, devices=("cpu",), priority=10, is_available=available)
