"""Lazy access to the compiled extensions ``_C`` (CPU) and ``_C_cuda`` (CUDA).

Nothing here imports a compiled module at import time and no loader ever raises: a
missing or broken build (no compiler at install time, no CUDA, a GPU-less host) must
leave the pure-PyTorch package fully usable. Callers ask ``cpu_module()`` /
``cuda_module()`` and fall back when they get ``None``; ``build_info()`` explains why.

The compiled functions take raw addresses (``tensor.data_ptr()``), sizes and element
strides, never tensors, so the extensions do not link libtorch. The typed wrappers
below are the only place that turns tensors into those arguments.
"""

from __future__ import annotations

import importlib
import importlib.util
import threading
from types import ModuleType
from typing import Any

import torch

__all__ = ["cpu_module", "cuda_module", "cpu_has", "require_cpu", "build_info", "dequantize_u8"]

_CPU_NAME = "analytic_diffusion._C"
_CUDA_NAME = "analytic_diffusion._C_cuda"

_lock = threading.Lock()
# name -> (module or None, error message or None); filled on first request only.
_cache: dict[str, tuple[ModuleType | None, str | None]] = {}


def _load(name: str) -> ModuleType | None:
    with _lock:
        if name not in _cache:
            try:
                _cache[name] = (importlib.import_module(name), None)
            except (ImportError, OSError) as exc:
                # Keep the reason (not found vs. unresolved symbol vs. bad ELF) for
                # build_info(); a silent None makes "why is it slow" undebuggable.
                _cache[name] = (None, f"{type(exc).__name__}: {exc}")
        return _cache[name][0]


def cpu_module() -> ModuleType | None:
    """The compiled CPU extension ``analytic_diffusion._C``, or ``None`` if unavailable."""
    return _load(_CPU_NAME)


def cpu_has(symbols) -> bool:
    """``_C`` loads and has every one of ``symbols`` (a backend's availability probe)."""
    mod = cpu_module()
    return mod is not None and all(hasattr(mod, s) for s in symbols)


def require_cpu(symbols, what: str) -> ModuleType:
    """``_C`` for a CPU backend that calls ``symbols``, or a ``RuntimeError`` naming the
    backend (``what``) and why the module is unusable."""
    if cpu_has(symbols):
        return cpu_module()
    reason = build_info()["cpu"].get("error") or f"it was built without the {what} kernels"
    raise RuntimeError(
        f"the CPU {what} backend needs the compiled extension {_CPU_NAME}, which is not usable ({reason}). "
        "Reinstall with `pip install --no-build-isolation -v .`, or use backend='reference'."
    )


def cuda_module() -> ModuleType | None:
    """The compiled CUDA extension ``analytic_diffusion._C_cuda``, or ``None``.

    Being importable does not imply a usable GPU: the CUDA runtime is linked statically,
    so the module loads on any host and its functions raise ``RuntimeError`` when no
    device is present. ``build_info()["cuda"]["available"]`` says whether it is usable.
    """
    return _load(_CUDA_NAME)


def _built(name: str) -> bool:
    """Whether the package ships a file for the extension (it may still fail to load)."""
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def _module_info(name: str, needs_device: bool) -> dict[str, Any]:
    mod = _load(name)
    if mod is None:
        return {"available": False, "loaded": False, "built": _built(name), "error": _cache[name][1]}
    try:
        info = dict(mod.build_info())
    except Exception as exc:  # a module that loads but cannot describe itself is broken
        return {"available": False, "loaded": True, "built": True, "error": f"build_info() failed: {type(exc).__name__}: {exc}"}
    info["loaded"] = True
    info["built"] = True
    usable = True
    if needs_device:
        # _C_cuda links the CUDA runtime statically, so it loads on any host: usable means a
        # device is present too
        count = info.get("device_count")
        usable = isinstance(count, int) and count > 0
        if not usable:
            info["error"] = "no CUDA device: " + (info.get("device_error") or f"device_count = {count}")
    info["available"] = usable
    info["path"] = getattr(mod, "__file__", None)
    return info


def build_info() -> dict[str, dict[str, Any]]:
    """How the extensions were built, or why they are missing or unusable. Never raises.

    Returns ``{"cpu": {...}, "cuda": {...}}``. Each entry has ``available`` (the module
    can run here: it loads, and for CUDA a device is present), ``loaded`` (the module
    imported), ``built`` (the package has a file for it) and either the module's own
    ``build_info()`` fields or, when not available, an ``error`` string saying why.
    """
    return {"cpu": _module_info(_CPU_NAME, False), "cuda": _module_info(_CUDA_NAME, True)}


def _require(name: str, mod: ModuleType | None, what: str) -> ModuleType:
    if mod is None:
        raise RuntimeError(
            f"{what} requires the compiled extension {name}, which is not available "
            f"({_cache.get(name, (None, 'not loaded'))[1]}). Reinstall with "
            "`pip install --no-build-isolation -v .` and check the build log, or use the "
            "PyTorch backend."
        )
    return mod


#: ``train_kind`` code of the compiled CPU kernels for each training-set dtype they read
#: (csrc/cpu: 0 uint8 in [0, 255] mapped to [-1, 1], 1 float32, 2 float64).
TRAIN_KIND = {torch.uint8: 0, torch.float32: 1, torch.float64: 2}


def dequantize_u8(t: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Map a 2-D uint8 tensor ``u`` to ``u / 127.5 - 1`` in ``dtype`` (docs/algorithms.md §1).

    ``t`` may have any strides (transposed, sliced, expanded); the result is a new
    contiguous ``[rows, cols]`` tensor on ``t``'s device, bit-identical to
    ``((t.double() - 127.5) / 127.5).to(dtype)``. CPU tensors go to ``_C``, CUDA tensors to
    ``_C_cuda`` on the current stream of ``t``'s device.
    """
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"dequantize_u8 expects a torch.Tensor, got {type(t).__name__}")
    if t.dtype != torch.uint8:
        raise TypeError(f"dequantize_u8 expects a uint8 tensor, got {t.dtype}")
    if t.dim() != 2:
        raise ValueError(f"dequantize_u8 expects a 2-D tensor, got shape {tuple(t.shape)}")
    if dtype not in (torch.float32, torch.float64):
        raise TypeError(f"dequantize_u8 output dtype must be float32 or float64, got {dtype}")
    rows, cols = t.shape
    s0, s1 = t.stride()
    out = torch.empty((rows, cols), dtype=dtype, device=t.device)
    is_double = dtype == torch.float64

    if t.device.type == "cpu":
        mod = _require(_CPU_NAME, cpu_module(), "dequantize_u8 on CPU")
        mod.dequantize_u8(t.data_ptr(), out.data_ptr(), rows, cols, s0, s1, is_double)
    elif t.device.type == "cuda":
        mod = _require(_CUDA_NAME, cuda_module(), "dequantize_u8 on CUDA")
        # The kernel launches on the current device; make that t's device so pointers,
        # stream and launch all agree.
        with torch.cuda.device(t.device):
            stream = torch.cuda.current_stream(t.device).cuda_stream
            mod.dequantize_u8(t.data_ptr(), out.data_ptr(), rows, cols, s0, s1, is_double, stream)
    else:
        raise RuntimeError(f"dequantize_u8: unsupported device {t.device}")
    return out
