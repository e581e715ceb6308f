"""Streaming, mergeable mean and covariance (docs/algorithms.md §2): :class:`MomentAccumulator`."""
from __future__ import annotations

import os
from typing import Optional, Sequence, Tuple, Union

import torch

from ... import registry
from ..._validate import IMAGE_DTYPES, as_tensor, check_fits, check_pixels, to_unit
from .reference import sym_from_lower
from .stats import FORMAT, U8_SCALE, Moments, save_safetensors

ShapeLike = Union[int, Sequence[int]]


def _shape_arg(n: ShapeLike) -> Tuple[int, Optional[Tuple[int, ...]]]:
    if isinstance(n, int) and not isinstance(n, bool):
        if n < 1:
            raise ValueError(f"n must be a positive number of values per image, got {n}")
        return n, None
    shape = tuple(int(s) for s in n)
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"n must be an int or an image shape (C, H, W), got {n!r}")
    return shape[0] * shape[1] * shape[2], shape


class MomentAccumulator:
    """Streaming mean/covariance over vectors of length ``n`` (docs/algorithms.md §2).

    ``MomentAccumulator(n)`` with ``n`` an int or an image shape ``(C, H, W)``.
    ``update(batch)`` takes uint8 or float ``[B, n]`` / ``[B, C, H, W]``;
    ``merge(other)`` folds another accumulator in exactly; ``result()`` returns
    :class:`Moments`. While every batch is uint8 the sums are exact integers.
    """

    def __init__(self, n: ShapeLike, *, device=None, backend: Optional[str] = None):
        self.n, self.image_shape = _shape_arg(n)
        self.device = None if device is None else torch.device(device)
        self.backend = backend
        self.count = 0
        self.mode: Optional[str] = None  # None (empty), "int" (exact uint8 sums) or "float"
        self._s1 = self._s2 = self._ref = None

    # ---- internals
    def _alloc(self, device: torch.device, mode: str) -> None:
        nbytes = 8 * self.n * self.n * 2  # the n x n sums plus the result's covariance
        check_fits(
            nbytes,
            device,
            f"an {self.n} x {self.n} covariance",
            "Use patch moments (estimate_patch_moments) for images this large.",
        )
        self.device = device
        self.mode = mode
        dt = torch.int64 if mode == "int" else torch.float64
        self._s1 = torch.zeros(self.n, dtype=dt, device=device)
        self._s2 = torch.zeros(self.n, self.n, dtype=dt, device=device)
        self._ref = None if mode == "int" else torch.zeros(self.n, dtype=torch.float64, device=device)

    def _to_float_mode(self) -> None:
        """Re-express exact integer sums as float sums around the shift u = 0 (y = -1)."""
        s1 = self._s1.to(torch.float64) / U8_SCALE
        s2 = sym_from_lower(self._s2).to(torch.float64) / U8_SCALE**2
        self._s1, self._s2, self.mode = s1, s2, "float"
        self._ref = torch.full((self.n,), -1.0, dtype=torch.float64, device=self.device)

    def _impl(self):
        return registry.select("moments", self.device, self.backend).fn

    def _rows(self, batch, name: str) -> torch.Tensor:
        batch = as_tensor(name, batch)
        if batch.dtype not in IMAGE_DTYPES:
            raise TypeError(f"{name} must be uint8 or float, got {batch.dtype}")
        if batch.dim() not in (2, 4):
            raise ValueError(f"{name} must be [B, n] or [B, C, H, W], got shape {tuple(batch.shape)}")
        if batch.dim() == 4 and self.image_shape is not None and tuple(batch.shape[1:]) != self.image_shape:
            raise ValueError(f"{name} has image shape {tuple(batch.shape[1:])}, but this accumulator holds {self.image_shape} (mixed image shapes)")
        if batch.shape[1:].numel() != self.n:
            raise ValueError(f"{name} has {batch.shape[1:].numel()} values per image, expected n = {self.n}")
        check_pixels(name, batch)
        if batch.dim() == 4 and self.image_shape is None:
            self.image_shape = tuple(batch.shape[1:])
        return batch.reshape(batch.shape[0], self.n)

    # ---- public API
    def update(self, batch) -> "MomentAccumulator":
        """Accumulate a batch: uint8 or float (in [-1, 1]) ``[B, n]`` or ``[B, C, H, W]``."""
        rows = self._rows(batch, "batch")
        if rows.shape[0] == 0:
            return self
        device = self.device or rows.device
        rows = rows.to(device)
        want = "int" if rows.dtype == torch.uint8 else "float"
        if self.mode is None:
            self._alloc(device, want)
            if want == "float":
                # shift by the first batch's mean: later sums stay small, no cancellation
                self._ref = rows.to(torch.float64).mean(0)
        elif self.mode == "int" and want == "float":
            self._to_float_mode()
        impl = self._impl()
        if self.mode == "int":
            impl.update_u8(rows, self._s1, self._s2)
        else:
            impl.update_float(to_unit(rows, torch.float64), self._ref, self._s1, self._s2)
        self.count += rows.shape[0]
        return self

    @property
    def shift(self) -> Optional[torch.Tensor]:
        """The float64 ``[n]`` vector that float sums are taken around (None while the sums
        are exact integers or empty)."""
        return self._ref if self.mode == "float" else None

    def add_sums(self, count: int, s1: torch.Tensor, s2: torch.Tensor, *, shift: Optional[torch.Tensor] = None) -> "MomentAccumulator":
        """Fold in sums computed elsewhere over ``count`` vectors (e.g. patches that were never
        unfolded). ``shift=None``: exact uint8 sums, int64 ``s1 [n] = sum u`` and
        ``s2 [n, n] = sum u u^T`` (lower triangle read); only while this accumulator is empty
        or holds integer sums. Otherwise float64 sums of ``z = v - shift`` in [-1, 1] units,
        ``shift`` float64 ``[n]``; any shift works (it is re-centred on this accumulator's own,
        exactly in exact arithmetic). Nothing passed in is modified."""
        if count < 0:
            raise ValueError(f"count must be >= 0, got {count}")
        device = self.device or s1.device
        if shift is None:
            if self.mode == "float":
                raise ValueError("integer sums cannot be added to float sums; pass shift= (float64 sums)")
            if self.mode is None:
                self._alloc(device, "int")
            self._s1 += s1.to(device, torch.int64)
            self._s2 += s2.to(device, torch.int64)
        else:
            shift = shift.to(device, torch.float64)
            if self.mode is None:
                self._alloc(device, "float")
                self._ref = shift.clone()
            elif self.mode == "int":
                self._to_float_mode()
            s1, s2 = s1.to(device, torch.float64), s2.to(device, torch.float64)
            # sum (v - ref)(v - ref)^T with v - ref = z + delta
            delta = shift - self._ref
            self._s1 += s1 + count * delta
            self._s2 += s2 + torch.outer(s1, delta) + torch.outer(delta, s1) + count * torch.outer(delta, delta)
        self.count += int(count)
        return self

    def _centered(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """(mean, M2) with M2 = sum of centred outer products, float64, [-1, 1] units."""
        N = self.count
        if self.mode == "int":
            s1, s2 = self._s1, sym_from_lower(self._s2)
            mean_u = s1.to(torch.float64) / N
            if N * N * 255 * 255 < 2**63:
                # N*S2 - s1 s1^T is an exact int64: one rounding in the final division
                m2_u = (N * s2 - torch.outer(s1, s1)).to(torch.float64) / N
            else:
                m2_u = s2.to(torch.float64) - torch.outer(s1.to(torch.float64), s1.to(torch.float64)) / N
            return (mean_u - U8_SCALE) / U8_SCALE, m2_u / U8_SCALE**2
        mean_z = self._s1 / N
        return self._ref + mean_z, sym_from_lower(self._s2) - torch.outer(self._s1, self._s1) / N

    def merge(self, other: "MomentAccumulator") -> "MomentAccumulator":
        """Fold ``other`` into ``self`` (``other`` is not modified). Exact for two uint8 states."""
        if not isinstance(other, MomentAccumulator):
            raise TypeError(f"other must be a MomentAccumulator, got {type(other).__name__}")
        if other.n != self.n or (self.image_shape and other.image_shape and self.image_shape != other.image_shape):
            raise ValueError(f"cannot merge accumulators of different sizes: {self.image_shape or self.n} vs {other.image_shape or other.n}")
        if other.count == 0:
            return self
        if self.count == 0:
            self._alloc(other.device if self.device is None else self.device, other.mode)
            self.image_shape = self.image_shape or other.image_shape
        dev = self.device
        if self.mode == "int" and other.mode == "int":
            self._s1 += other._s1.to(dev)
            self._s2 += other._s2.to(dev)
        else:
            # Chan et al.: combine centred sums, then keep the merged mean as the shift
            mean_a, m2_a = self._centered() if self.count else (None, None)
            mean_b, m2_b = (t.to(dev) for t in other._centered())
            if self.count == 0:
                mean, m2 = mean_b, m2_b
            else:
                na, nb = self.count, other.count
                d = mean_b - mean_a
                mean = mean_a + d * (nb / (na + nb))
                m2 = m2_a + m2_b + torch.outer(d, d) * (na * nb / (na + nb))
            self.mode, self._ref = "float", mean
            self._s1, self._s2 = torch.zeros_like(mean), m2.clone()
        self.count += other.count
        self.image_shape = self.image_shape or other.image_shape
        return self

    def result(self) -> Moments:
        """Mean and unbiased covariance (float64, [-1, 1] units). Needs at least 2 vectors."""
        if self.count < 2:
            raise ValueError(f"need at least 2 images for an unbiased covariance, got {self.count} (empty dataset?)")
        fin = getattr(self._impl(), "finalize_u8", None) if self.mode == "int" else None
        if fin is not None:
            # A backend's fused finalisation is bit-identical to the lines below, and for
            # large n costs ~10x less than them (they dominate a CPU run otherwise).
            mean, cov = fin(self.count, self._s1, self._s2)
            return Moments(self.count, mean, cov, self.image_shape, "full")
        mean, m2 = self._centered()
        cov = m2 / (self.count - 1)
        cov = 0.5 * (cov + cov.T)  # exact symmetry for eigh; the sums are symmetric up to rounding
        return Moments(self.count, mean, cov, self.image_shape, "full")

    # ---- several processes / GPUs
    def all_reduce(self, group=None) -> "MomentAccumulator":
        """Merge the accumulators of every rank of ``group`` (torch.distributed); afterwards
        every rank holds the merged state. Each rank streams its own shard first.

        uint8-only states are summed as exact integers (bit-identical to one process);
        otherwise the ranks' centred sums are combined with Chan's formula in float64.
        Works with gloo (CPU tensors) and NCCL (tensors on the rank's GPU).
        """
        import torch.distributed as dist

        dev = self.device or (torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else torch.device("cpu"))
        # agree on n and on the mode: 0 empty, 1 exact integers, 2 float
        info = torch.tensor([self.n, -self.n, {None: 0, "int": 1, "float": 2}[self.mode], self.count], dtype=torch.int64, device=dev)
        flags = info[:3].clone()
        dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=group)
        if int(flags[0]) != self.n or int(-flags[1]) != self.n:
            raise ValueError(f"all_reduce: ranks hold accumulators of different sizes (this rank n = {self.n})")
        mode = {0: None, 1: "int", 2: "float"}[int(flags[2])]
        total = info[3:].clone()
        dist.all_reduce(total, group=group)
        if mode is None:
            return self
        if self.mode is None:
            self._alloc(dev, "int" if mode == "int" else "float")
        if mode == "int":
            s1, s2 = self._s1.to(dev), self._s2.to(dev)
            s2 = s2.tril()  # only the lower triangle is defined
            dist.all_reduce(s1, group=group)
            dist.all_reduce(s2, group=group)
            self._s1, self._s2 = s1.to(self.device), s2.to(self.device)
        else:
            N = int(total[0])
            mean_i, m2_i = self._centered() if self.count else (torch.zeros(self.n, dtype=torch.float64, device=self.device), torch.zeros(self.n, self.n, dtype=torch.float64, device=self.device))
            wsum = (mean_i * self.count).to(dev)
            dist.all_reduce(wsum, group=group)
            mean = wsum / N
            d = mean_i.to(dev) - mean
            m2 = m2_i.to(dev) + torch.outer(d, d) * self.count
            dist.all_reduce(m2, group=group)
            self.mode, self._ref = "float", mean.to(self.device)
            self._s1, self._s2 = torch.zeros_like(self._ref), m2.to(self.device)
        self.count = int(total[0])
        return self

    # ---- checkpoints (safetensors-friendly: tensors + plain metadata)
    def state_dict(self) -> dict:
        st = {"count": torch.tensor(self.count, dtype=torch.int64), "n": torch.tensor(self.n)}
        if self.mode is not None:
            st.update(s1=self._s1.cpu(), s2=self._s2.cpu())
            if self._ref is not None:
                st["ref"] = self._ref.cpu()
        st["mode"] = torch.tensor({None: 0, "int": 1, "float": 2}[self.mode])
        if self.image_shape:
            st["image_shape"] = torch.tensor(self.image_shape)
        return st

    def load_state_dict(self, st: dict) -> "MomentAccumulator":
        if int(st["n"]) != self.n:
            raise ValueError(f"state is for n = {int(st['n'])}, this accumulator has n = {self.n}")
        self.mode = {0: None, 1: "int", 2: "float"}[int(st["mode"])]
        self.count = int(st["count"])
        dev = self.device or torch.device("cpu")
        if self.mode is not None:
            self.device = dev
            self._s1, self._s2 = st["s1"].to(dev).clone(), st["s2"].to(dev).clone()
            self._ref = st["ref"].to(dev).clone() if "ref" in st else None
        if "image_shape" in st:
            self.image_shape = tuple(int(s) for s in st["image_shape"])
        return self

    def save(self, path: Union[str, os.PathLike]) -> None:
        """Checkpoint to safetensors (written to a temporary file, then renamed, so an
        interruption never leaves a torn checkpoint)."""
        save_safetensors(self.state_dict(), path, {"format": FORMAT + "+accumulator"})

    @classmethod
    def load(cls, path: Union[str, os.PathLike], device=None, backend: Optional[str] = None) -> "MomentAccumulator":
        """Read a checkpoint written by :meth:`save`."""
        from safetensors.torch import load_file

        st = load_file(str(path))
        shape = tuple(int(s) for s in st["image_shape"]) if "image_shape" in st else int(st["n"])
        return cls(shape, device=device, backend=backend).load_state_dict(st)
