"""What every Triton backend needs: is Triton importable, is a GPU (or the interpreter) there.

Triton is imported lazily: importing a backend module only registers it, and the package
imports fine without Triton. Under ``TRITON_INTERPRET=1`` (read by Triton when the kernels
are first built, and by the registrations at import) the kernels also run on CPU tensors
through Triton's interpreter, which is how they are tested on machines without a GPU.
"""
from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
from typing import Optional

import torch

__all__ = ["interpreting", "importable", "available", "devices", "launch_context", "check_device", "pow2_at_least", "nan_output"]


def interpreting() -> bool:
    """``TRITON_INTERPRET=1``: kernels run on CPU tensors in Triton's interpreter."""
    return os.environ.get("TRITON_INTERPRET") == "1"


@functools.lru_cache(maxsize=None)
def importable() -> bool:
    """``triton`` and ``triton.language`` import (a broken install counts as absent)."""
    if importlib.util.find_spec("triton") is None:
        return False
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # a broken install must not take the package down
        return False
    return True


def available() -> bool:
    """Triton importable, and a CUDA device present (or the interpreter switched on)."""
    if not (torch.cuda.is_available() or interpreting()):
        return False
    return importable()


def devices() -> tuple:
    """Device types a Triton backend registers for: CUDA, and the CPU under the interpreter."""
    return ("cuda",) + (("cpu",) if interpreting() else ())


def launch_context(t: torch.Tensor):
    """Make ``t``'s GPU the current device for a launch (a no-op on the CPU)."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def check_device(t: torch.Tensor, what: str, name: str) -> None:
    """Refuse tensors the kernels cannot run on: CUDA, or the CPU under the interpreter."""
    if t.device.type == "cuda" or (t.device.type == "cpu" and interpreting()):
        return
    if not importable():
        raise RuntimeError(f"the Triton {what} backend needs the triton package, which is not importable")
    raise ValueError(f"the Triton {what} backend needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors), got {name} on {t.device}")


def pow2_at_least(v: int, lo: int, hi: Optional[int] = None) -> int:
    """The smallest ``lo * 2^j >= v`` (at most ``hi`` when given): block sizes are powers of two."""
    p = lo
    while p < v and (hi is None or p < hi):
        p *= 2
    return p


def nan_output(shape, device) -> torch.Tensor:
    """A float32 output filled with NaN: anything a kernel fails to write shows up in the tests."""
    return torch.full(shape, float("nan"), dtype=torch.float32, device=device)
