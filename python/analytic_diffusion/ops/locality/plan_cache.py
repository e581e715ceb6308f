"""One cache of per-mask plans for the locality backends (CPU and Triton).

A backend that prepares work per mask (the CPU kernel's window groups and spanning tree,
the Triton kernel's padded fp16 mask and block lists) keys it by the mask's *content*, so
a sampler that rebuilds equal masks every run plans each one once. Hashing a 3072 x 3072
mask costs milliseconds, so the same tensor object, unchanged since it was hashed, is
recognised by its identity and version counter (torch bumps ``_version`` on every in-place
write, through any view). Tensors made under ``torch.inference_mode()`` have no version
counter: they are hashed on every call instead (correct, a little slower).
"""
from __future__ import annotations

import hashlib
import threading
import weakref
from collections import OrderedDict
from typing import Callable, Optional

import numpy as np
import torch

__all__ = ["PlanCache", "mask_key", "tensor_version"]

_BIT_WEIGHTS = (1, 2, 4, 8, 16, 32, 64, 128)  # little-endian bit order, as np.packbits(bitorder="little")
_lock = threading.Lock()
# id(mask) -> (weakref to it, its version counter, content key). Keyed by id, not by the
# tensor: a WeakKeyDictionary would compare tensors with ==.
_seen: "OrderedDict[int, tuple]" = OrderedDict()
_SEEN_MAX = 256


def tensor_version(t: torch.Tensor) -> Optional[int]:
    """``t._version``, or None for an inference-mode tensor (which has no version counter)."""
    try:
        return t._version
    except RuntimeError:
        return None


def _packed_bytes(mask: torch.Tensor) -> bytes:
    """The mask's nonzero pattern as bits (packed on its own device: no n x n copy to the host)."""
    if mask.device.type == "cpu":
        return np.packbits((mask != 0).contiguous().numpy(), bitorder="little").tobytes()
    flat = (mask != 0).reshape(-1)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    weights = torch.tensor(_BIT_WEIGHTS, dtype=torch.uint8, device=mask.device)
    return (flat.view(-1, 8).to(torch.uint8) * weights).sum(1, dtype=torch.uint8).cpu().numpy().tobytes()


def mask_key(mask: torch.Tensor) -> tuple:
    """Content key of a 0/1 mask ``[n, n]`` (bool, or float with only 0 and 1): its shape
    and the blake2b digest of its packed bits; equal on every device."""
    version = tensor_version(mask)
    with _lock:
        seen = _seen.get(id(mask))
        if version is not None and seen is not None and seen[0]() is mask and seen[1] == version:
            return seen[2]
    key = (tuple(mask.shape), hashlib.blake2b(_packed_bytes(mask), digest_size=16).hexdigest())
    if version is not None:
        ident = id(mask)
        ref = weakref.ref(mask, lambda _r, ident=ident: _forget(ident))
        with _lock:
            _seen[ident] = (ref, version, key)
            while len(_seen) > _SEEN_MAX:
                _seen.popitem(last=False)
    return key


def _forget(ident: int) -> None:
    with _lock:
        _seen.pop(ident, None)


class PlanCache:
    """LRU of plans by ``(mask_key(mask), *params)``, bounded in entries and in bytes
    (a plan may expose ``nbytes``; one without counts as 0)."""

    def __init__(self, max_entries: int, max_bytes: Optional[int] = None):
        self.max_entries, self.max_bytes = int(max_entries), max_bytes
        self._plans: "OrderedDict[tuple, object]" = OrderedDict()
        self._lock = threading.Lock()

    def get(self, mask: torch.Tensor, params: tuple, build: Callable[[], object]):
        """The cached plan of ``mask`` for ``params``, built by ``build()`` on a miss."""
        key = (mask_key(mask),) + tuple(params)
        with self._lock:
            plan = self._plans.get(key)
            if plan is not None:
                self._plans.move_to_end(key)
                return plan
        plan = build()
        with self._lock:
            self._plans[key] = plan
            self._plans.move_to_end(key)
            while len(self._plans) > 1 and (len(self._plans) > self.max_entries or self._over_bytes()):
                self._plans.popitem(last=False)
        return plan

    def _over_bytes(self) -> bool:
        if self.max_bytes is None:
            return False
        return sum(getattr(p, "nbytes", 0) for p in self._plans.values()) > self.max_bytes

    def values(self) -> list:
        with self._lock:
            return list(self._plans.values())

    def __len__(self) -> int:
        return len(self._plans)

    def clear(self) -> None:
        with self._lock:
            self._plans.clear()


def clear_seen() -> None:
    """Forget which tensors were hashed (tests)."""
    with _lock:
        _seen.clear()

