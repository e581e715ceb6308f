"""Backend registry: one table of (op, backend) -> implementation.

Selection order for every op: the ``backend=`` argument, then the
``ANALYTIC_DIFFUSION_BACKEND`` environment variable, then the highest-priority
backend that is available for the input's device.

The environment variable holds either one backend name for every op
(``cpu``) or a comma-separated list of ``op=backend`` pairs
(``locality_denoise=triton,moments=cpu``). A global name is applied only to
ops that register a backend of that name, so ``ANALYTIC_DIFFUSION_BACKEND=cpu``
does not break ops that only have a reference implementation; a per-op pair is
always binding.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

import torch

ENV_VAR = "ANALYTIC_DIFFUSION_BACKEND"


@dataclass(frozen=True)
class Backend:
    op: str
    name: str
    fn: Callable
    devices: Sequence[str]  # device types it can run on: "cpu", "cuda", ...
    priority: int  # higher wins when nothing is requested
    is_available: Callable[[], bool]  # e.g. "was the extension built?"
    # Work a backend can do ahead of time for one argument it will be called with (the CPU and
    # Triton locality backends build a plan per mask): denoisers call it from ``prepare``.
    prepare: Optional[Callable] = None

    def runs_on(self, device_type: Optional[str]) -> bool:
        return device_type is None or "any" in self.devices or device_type in self.devices


_REGISTRY: Dict[str, Dict[str, Backend]] = {}


def register(
    op: str,
    name: str,
    fn: Callable,
    *,
    devices: Sequence[str] = ("any",),
    priority: int = 0,
    is_available: Callable[[], bool] = lambda: True,
    prepare: Optional[Callable] = None,
) -> Backend:
    """Register ``fn`` as backend ``name`` of ``op`` (later registrations replace earlier ones).

    Backends register in the module that defines them (``ops/<op>/<backend>.py``).
    ``prepare(arg)``: optional ahead-of-time work for an argument the backend will see
    (e.g. a per-mask plan). Returns the registered :class:`Backend`.
    """
    b = Backend(op, name, fn, tuple(devices), priority, is_available, prepare)
    _REGISTRY.setdefault(op, {})[name] = b
    return b


def registered_backends(op: str) -> List[str]:
    """Every backend registered for ``op``, usable here or not (sorted by name)."""
    return sorted(_op_table(op))


def ops() -> List[str]:
    """Names of all registered ops."""
    return sorted(_REGISTRY)


def available_backends(op: str, device: Optional[torch.device | str] = None) -> List[str]:
    """Backends of ``op`` usable on ``device`` (any device if None), best first.

    Raises ``ValueError`` for an unknown op.
    """
    table = _op_table(op)
    dev = None if device is None else torch.device(device).type
    usable = [b for b in table.values() if b.runs_on(dev) and _safe_available(b)]
    return [b.name for b in sorted(usable, key=lambda b: -b.priority)]


def _safe_available(b: Backend) -> bool:
    try:
        return bool(b.is_available())
    except Exception:  # an availability probe must never take the library down
        return False


def _op_table(op: str) -> Dict[str, Backend]:
    if op not in _REGISTRY:
        raise ValueError(f"unknown op {op!r}; known ops: {', '.join(ops())}")
    return _REGISTRY[op]


def _env_request(op: str) -> Optional[str]:
    raw = os.environ.get(ENV_VAR, "").strip()
    if not raw:
        return None
    if "=" not in raw:
        # a global name applies only where the op knows that backend
        return raw if raw in _REGISTRY.get(op, {}) else None
    for part in raw.split(","):
        key, sep, val = part.partition("=")
        if sep and key.strip() == op:
            return val.strip()
    return None


def select(op: str, device: torch.device | str, backend: Optional[str] = None) -> Backend:
    """Resolve the backend for ``op`` on ``device``; raise a clear error if impossible."""
    table = _op_table(op)
    dev = torch.device(device).type
    source = "backend="
    if backend is None:
        backend = _env_request(op)
        source = f"environment variable {ENV_VAR}="
    if backend is not None:
        if backend not in table:
            raise ValueError(
                f"{source}{backend!r}: op {op!r} has no backend {backend!r}; "
                f"registered: {', '.join(sorted(table))}"
            )
        b = table[backend]
        if not b.runs_on(dev):
            raise ValueError(
                f"{source}{backend!r}: backend {backend!r} of op {op!r} does not run on "
                f"{dev} tensors (it runs on {', '.join(b.devices)})"
            )
        if not _safe_available(b):
            raise RuntimeError(
                f"{source}{backend!r}: backend {backend!r} of op {op!r} is not available in "
                f"this installation (see analytic_diffusion.build_info())"
            )
        return b
    names = available_backends(op, dev)
    if not names:
        raise RuntimeError(f"op {op!r} has no backend available for {dev} tensors")
    return table[names[0]]
