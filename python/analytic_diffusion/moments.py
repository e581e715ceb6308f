"""Dataset moments (SPEC 2): streaming, mergeable mean and covariance, full and patch.

uint8 data is accumulated as exact integer sums (``sum u`` and ``sum u u^T``), so
the result is independent of batch size, order and sharding. Float data is
accumulated in float64 around a shift (the first batch's mean), so
``E[xx^T] - mean mean^T`` never cancels catastrophically.

All moments are reported in the [-1, 1] value convention (uint8 ``u`` maps to
``u / 127.5 - 1``).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Iterable, Iterator, Optional, Sequence, Tuple, Union

import torch

from . import _registry
from ._validate import IMAGE_DTYPES, as_tensor, check_pixels, to_unit

FORMAT = "analytic-diffusion-moments/1"
CONVENTION = "[-1,1]"  # uint8 u maps to u/127.5 - 1
_U8_SCALE = 127.5

ShapeLike = Union[int, Sequence[int]]


# --------------------------------------------------------------------------- results
@dataclass
class Moments:
    """Mean and unbiased covariance of a dataset, float64.

    ``mean``: float64 ``[d]``; ``cov``: float64 ``[d, d]``; ``count``: number of
    vectors (images, or patches for ``kind == "patch"``). ``image_shape`` is the
    ``(C, H, W)`` the vectors flatten (for patches ``(C, k, k)``).
    """

    count: int
    mean: torch.Tensor
    cov: torch.Tensor
    image_shape: Optional[Tuple[int, ...]] = None
    kind: str = "full"
    extra: dict = field(default_factory=dict)

    @property
    def n(self) -> int:
        return int(self.mean.shape[0])

    @property
    def patch_size(self) -> Optional[int]:
        return int(self.image_shape[-1]) if self.kind == "patch" and self.image_shape else None

    def to(self, device) -> "Moments":
        return Moments(self.count, self.mean.to(device), self.cov.to(device), self.image_shape, self.kind, dict(self.extra))

    # ---- files (safetensors: never pickle)
    def save(self, path: Union[str, os.PathLike]) -> None:
        """Write ``mean``/``cov`` and metadata (count, image shape, value convention) to safetensors."""
        from safetensors.torch import save_file

        meta = {
            "format": FORMAT,
            "count": str(int(self.count)),
            "image_shape": json.dumps(list(self.image_shape) if self.image_shape else None),
            "convention": CONVENTION,
            "kind": self.kind,
            "extra": json.dumps(self.extra),
        }
        _save_safetensors({"mean": self.mean, "cov": self.cov}, path, meta)

    @classmethod
    def load(cls, path: Union[str, os.PathLike], device=None) -> "Moments":
        """Read a file written by :meth:`save`; fails clearly on anything else."""
        from safetensors import safe_open

        path = str(path)
        if not os.path.exists(path):
            raise FileNotFoundError(f"stats file {path!r} does not exist")
        try:
            with safe_open(path, framework="pt", device="cpu") as f:
                meta = f.metadata() or {}
                keys = set(f.keys())
                if meta.get("format") != FORMAT or not {"mean", "cov"} <= keys:
                    raise ValueError(f"{path!r} is not an analytic-diffusion moments file (format={meta.get('format')!r}, tensors={sorted(keys)})")
                mean, cov = f.get_tensor("mean"), f.get_tensor("cov")
        except ValueError:
            raise
        except Exception as e:  # safetensors raises its own error types for corrupt headers
            raise ValueError(f"could not read stats file {path!r}: {e}") from e
        if meta.get("convention") != CONVENTION:
            raise ValueError(f"stats file {path!r} uses value convention {meta.get('convention')!r}, expected {CONVENTION!r}")
        d = mean.shape[0]
        if mean.dim() != 1 or cov.shape != (d, d):
            raise ValueError(f"stats file {path!r} is inconsistent: mean {tuple(mean.shape)}, cov {tuple(cov.shape)}")
        shape = json.loads(meta.get("image_shape", "null"))
        m = cls(int(meta["count"]), mean.to(torch.float64), cov.to(torch.float64), tuple(shape) if shape else None, meta.get("kind", "full"), json.loads(meta.get("extra", "{}")))
        return m.to(device) if device is not None else m

    def check_compatible(self, data_shape: Sequence[int], what: str = "the data") -> None:
        """Raise if these full-image moments do not describe images of ``data_shape``.

        ``data_shape``: ``(C, H, W)`` of one image, or ``(n,)`` for flat vectors.
        """
        shape = tuple(int(s) for s in data_shape)
        n = 1
        for s in shape:
            n *= s
        if self.kind != "full":
            raise ValueError(f"these are {self.kind} moments (image shape {self.image_shape}); full-image moments are needed for {what}")
        if n != self.n or (len(shape) == 3 and self.image_shape is not None and tuple(self.image_shape) != shape):
            raise ValueError(
                f"the moments were computed for images of shape {self.image_shape or (self.n,)} "
                f"({self.n} values) but {what} has shape {shape} ({n} values)"
            )


# --------------------------------------------------------------------------- memory guard
def _available_bytes(device: torch.device) -> Optional[int]:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX
        return None


def check_fits(nbytes: int, device: torch.device, what: str, hint: str = "") -> None:
    """Refuse, before allocating, anything that would not fit in the device's free memory."""
    avail = _available_bytes(device)
    if avail is not None and nbytes > 0.9 * avail:
        raise MemoryError(
            f"{what} needs about {nbytes / 2**30:.2f} GiB but only {avail / 2**30:.2f} GiB is free on {device}. {hint}".strip()
        )


def _shape_arg(n: ShapeLike) -> Tuple[int, Optional[Tuple[int, ...]]]:
    if isinstance(n, int) and not isinstance(n, bool):
        if n < 1:
            raise ValueError(f"n must be a positive number of values per image, got {n}")
        return n, None
    shape = tuple(int(s) for s in n)
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"n must be an int or an image shape (C, H, W), got {n!r}")
    return shape[0] * shape[1] * shape[2], shape


# --------------------------------------------------------------------------- backends
# A "moments" backend is a namespace with two in-place updates of the accumulator's
# own sums (never of user data):
#   update_u8(rows uint8 [B, n] any strides, s1 int64 [n], s2 int64 [n, n])
#       s1 += sum_k rows[k];  s2[i, j] += sum_k rows[k, i] * rows[k, j]  for j <= i.
#   update_float(rows float [B, n] in [-1, 1], ref float64 [n], s1 float64 [n], s2 float64 [n, n])
#       z = rows - ref;  s1 += sum_k z[k];  s2[i, j] += sum_k z[k, i] * z[k, j]  for j <= i,
#       with float64 accuracy.
# Only the lower triangle of s2 is read (SYRK does half a GEMM's work); entries above
# the diagonal may hold anything.


def _sym_from_lower(s2: torch.Tensor) -> torch.Tensor:
    return s2.tril() + s2.tril(-1).T


def _ref_update_u8(rows: torch.Tensor, s1: torch.Tensor, s2: torch.Tensor) -> None:
    """Add ``sum u`` and ``sum u u^T`` of uint8 ``rows [B, n]`` into int64 ``s1 [n]``, ``s2 [n, n]``.

    float64 GEMM is exact here: every partial sum is an integer below
    B * 255^2 < 2^53 for B < 1.3e11, whatever the summation order.
    """
    u = rows.to(torch.float64)
    s1 += rows.sum(0, dtype=torch.int64)
    s2 += (u.T @ u).to(torch.int64)


def _ref_update_float(rows: torch.Tensor, ref: torch.Tensor, s1: torch.Tensor, s2: torch.Tensor) -> None:
    """Add shifted sums of float ``rows [B, n]`` (already in [-1, 1]) in float64."""
    z = rows.to(torch.float64) - ref
    s1 += z.sum(0)
    s2 += z.T @ z


_registry.register(
    "moments",
    "reference",
    SimpleNamespace(update_u8=_ref_update_u8, update_float=_ref_update_float),
    devices=("any",),
    priority=0,
)


# --------------------------------------------------------------------------- accumulator
class MomentAccumulator:
    """Streaming mean/covariance over vectors of length ``n`` (SPEC 2).

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
        s1 = self._s1.to(torch.float64) / _U8_SCALE
        s2 = _sym_from_lower(self._s2).to(torch.float64) / _U8_SCALE**2
        self._s1, self._s2, self.mode = s1, s2, "float"
        self._ref = torch.full((self.n,), -1.0, dtype=torch.float64, device=self.device)

    def _impl(self):
        return _registry.select("moments", self.device, self.backend).fn

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

    def _centered(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """(mean, M2) with M2 = sum of centred outer products, float64, [-1, 1] units."""
        N = self.count
        if self.mode == "int":
            s1, s2 = self._s1, _sym_from_lower(self._s2)
            mean_u = s1.to(torch.float64) / N
            if N * N * 255 * 255 < 2**63:
                # N*S2 - s1 s1^T is an exact int64: one rounding in the final division
                m2_u = (N * s2 - torch.outer(s1, s1)).to(torch.float64) / N
            else:
                m2_u = s2.to(torch.float64) - torch.outer(s1.to(torch.float64), s1.to(torch.float64)) / N
            return (mean_u - _U8_SCALE) / _U8_SCALE, m2_u / _U8_SCALE**2
        mean_z = self._s1 / N
        return self._ref + mean_z, _sym_from_lower(self._s2) - torch.outer(self._s1, self._s1) / N

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
        _save_safetensors(self.state_dict(), path, {"format": FORMAT + "+accumulator"})

    @classmethod
    def load(cls, path: Union[str, os.PathLike], device=None, backend: Optional[str] = None) -> "MomentAccumulator":
        """Read a checkpoint written by :meth:`save`."""
        from safetensors.torch import load_file

        st = load_file(str(path))
        shape = tuple(int(s) for s in st["image_shape"]) if "image_shape" in st else int(st["n"])
        return cls(shape, device=device, backend=backend).load_state_dict(st)


def _umask() -> int:
    """The process umask, read without changing it where the OS allows (Linux), else by
    the set-and-restore idiom."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _save_safetensors(tensors: dict, path, meta: dict) -> None:
    """Write to a unique temporary file beside ``path``, then rename: an interrupted write
    never leaves a torn file, concurrent writers never share a temporary, and an
    unwritable path is an OSError naming it (not a safetensors-internal error). The file
    gets the mode of any new file (0666 less the umask), not the private 0600 of the
    temporary."""
    import tempfile

    from safetensors.torch import save_file

    path = os.fspath(path)
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise FileNotFoundError(f"cannot write {path!r}: folder {parent!r} does not exist")
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=parent, prefix=os.path.basename(path) + ".", suffix=".tmp")
        os.close(fd)
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp, metadata=meta)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except Exception as e:
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(e, OSError):
            raise
        raise OSError(f"cannot write {path!r}: {e}") from e


# --------------------------------------------------------------------------- drivers
def _batches(data, batch_size: int, progress: bool, desc: str, start: int = 0) -> Iterable[torch.Tensor]:
    from . import data as _data

    return _data.iter_batches(data, batch_size, start=start, progress=progress, desc=desc)


def _prefetch(batches: Iterable[torch.Tensor], device: torch.device) -> Iterator[torch.Tensor]:
    """Copy host batches to the GPU on a side stream from pinned memory, one batch ahead,
    so the transfer of batch i+1 overlaps the update of batch i."""
    if device.type != "cuda":
        yield from batches
        return
    copy_stream = torch.cuda.Stream(device)
    pending = None
    for b in batches:
        if b.device.type == "cpu":
            b = b.contiguous().pin_memory()
            with torch.cuda.stream(copy_stream):
                g = b.to(device, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record(copy_stream)
        else:
            g, ready = b, None
        if pending is not None:
            yield _wait(*pending, device)
        pending = (g, ready)
    if pending is not None:
        yield _wait(*pending, device)


def _wait(g: torch.Tensor, ready, device) -> torch.Tensor:
    if ready is not None:
        stream = torch.cuda.current_stream(device)
        stream.wait_event(ready)
        g.record_stream(stream)  # the allocator must not reuse g's memory while the compute stream reads it
    return g


def estimate_moments(
    data,
    batch_size: int = 256,
    device=None,
    backend: Optional[str] = None,
    progress: bool = False,
    *,
    num_workers: int = 0,
    checkpoint: Optional[Union[str, os.PathLike]] = None,
    checkpoint_every: int = 100,
) -> Moments:
    """Mean and covariance of a dataset in one streaming pass.

    ``data``: anything :func:`analytic_diffusion.data.iter_batches` takes (tensor or
    array ``[N, C, H, W]`` uint8 / float in [-1, 1], a .npy/.npz path, an image
    folder, a Dataset or DataLoader). ``device``: where the sums live (default: the
    data's device); host batches are copied to a GPU on a side stream from pinned
    memory. ``num_workers > 0`` reads a Dataset through a DataLoader with that many
    workers. ``checkpoint``: a safetensors path written every ``checkpoint_every``
    batches and at the end; if it exists when the call starts, the run resumes
    after the images it already holds (the source must yield the same images in
    the same order) and, for uint8 data, ends bit-identical to an uninterrupted run.
    Returns :class:`Moments` (float64 ``mean [n]``, ``cov [n, n]``).
    """
    if int(batch_size) != batch_size or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if int(checkpoint_every) != checkpoint_every or checkpoint_every < 1:
        raise ValueError(f"checkpoint_every must be a positive integer, got {checkpoint_every!r}")
    if int(num_workers) != num_workers or num_workers < 0:
        raise ValueError(f"num_workers must be an integer >= 0, got {num_workers!r}")
    acc = None
    if checkpoint is not None and os.path.exists(checkpoint):
        acc = MomentAccumulator.load(checkpoint, device=device, backend=backend)
    start = acc.count if acc is not None else 0
    source = data
    if num_workers and isinstance(data, torch.utils.data.Dataset) and not isinstance(data, torch.utils.data.IterableDataset):
        # Resume by index so the workers never read the images the checkpoint holds.
        if start:
            data = torch.utils.data.Subset(data, range(min(start, len(data)), len(data)))
            if len(data) == 0:
                return acc.result()
        source = torch.utils.data.DataLoader(data, batch_size=int(batch_size), num_workers=int(num_workers), pin_memory=torch.cuda.is_available())
        start = 0
    batches = _batches(source, int(batch_size), progress, "moments", start)
    dev = None if device is None else torch.device(device)
    since = 0
    for batch in _prefetch(batches, dev) if dev is not None else batches:
        if acc is None:
            shape = tuple(batch.shape[1:]) if batch.dim() == 4 else int(batch.shape[1])
            acc = MomentAccumulator(shape, device=dev or batch.device, backend=backend)
        acc.update(batch)
        since += 1
        if checkpoint is not None and since >= checkpoint_every:
            acc.save(checkpoint)
            since = 0
    if acc is None or acc.count == 0:
        raise ValueError("data is an empty dataset: no images to estimate moments from")
    if checkpoint is not None:
        acc.save(checkpoint)
    return acc.result()


_PATCH_GEMM_BUDGET = 1 << 25  # elements of one row-lag product block (256 MiB in float64)


def _region_sums(img: torch.Tensor, k: int, out_h: int, out_w: int) -> torch.Tensor:
    """Sums of ``img [..., H, W]`` over the ``out_h x out_w`` rectangles whose top-left
    corners are (i, j) for i, j in [0, k): ``[..., k, k]``, through one integral image."""
    I = torch.nn.functional.pad(img.cumsum(-2).cumsum(-1), (1, 0, 1, 0))
    return I[..., out_h : out_h + k, out_w : out_w + k] - I[..., :k, out_w : out_w + k] - I[..., out_h : out_h + k, :k] + I[..., :k, :k]


def patch_sums(x: torch.Tensor, k: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """First and second moment sums of all k x k patches of ``x [B, C, H, W]``, without
    unfolding: float64 ``s1 [C*k*k]`` and ``s2 [C*k*k, C*k*k]`` (full, symmetric).

    For patch offsets d = (i, j) and d' = d + e, ``sum_p x[p + d] x[p + d']`` is the
    sum of the lag-e product image ``P_e(q) = sum_b x[b, :, q] x[b, :, q + e]`` over
    the rectangle of positions q = p + d: one product image and one integral image
    per lag serve every pair of offsets with that lag. The batch reduction inside
    ``P_e`` is a GEMM per row lag (``X_r^T X_{r+di}`` over (channel, column)), whose
    diagonals are the column lags. Work: ``k H (C W)^2 B`` multiply-adds on GEMM
    units instead of unfold + GEMM's ``(H-k+1)(W-k+1) B (C k^2)^2``.

    uint8 input (any batch of at most 258 images) is multiplied in float32, which
    is exact there (every sum is an integer below 258 * 255^2 < 2^24); other input
    in float64.
    """
    B, C, H, W = x.shape
    oh, ow = H - k + 1, W - k + 1
    exact_f32 = x.dtype == torch.uint8 and B * 255 * 255 < (1 << 24)
    xf = x.to(torch.float32 if exact_f32 else torch.float64)
    s1 = _region_sums(xf.sum(0, dtype=torch.float64), k, oh, ow).reshape(-1)  # ordered C, row, column
    rows = xf.permute(2, 0, 1, 3).reshape(H, B, C * W)  # [row, batch, (channel, column)]
    s2 = torch.zeros(C, k, k, C, k, k, dtype=torch.float64, device=x.device)
    lags = range(-(k - 1), k)
    P = torch.zeros(len(lags), C, C, H, W, dtype=torch.float64, device=x.device)  # one product image per column lag
    row_block = max(1, _PATCH_GEMM_BUDGET // (C * W) ** 2)  # bounds G's memory at any image size
    for di in range(k):
        P.zero_()
        for r0 in range(0, H - di, row_block):
            r1 = min(H - di, r0 + row_block)
            # G[r, (c, w), (c', w')] = sum_b x[b, c, r, w] x[b, c', r + di, w']
            G = torch.bmm(rows[r0:r1].transpose(1, 2), rows[r0 + di : r1 + di]).to(torch.float64).reshape(r1 - r0, C, W, C, W)
            for li, dj in enumerate(lags):
                c0, c1 = max(0, -dj), min(W, W - dj)
                P[li, :, :, r0:r1, c0:c1] = torch.diagonal(G, offset=dj, dim1=2, dim2=4).permute(1, 2, 0, 3)
        R = _region_sums(P, k, oh, ow)  # [lag, C, C', k, k]: rectangles with top-left corner d
        for li, dj in enumerate(lags):
            if di == 0 and dj < 0:
                continue  # negative lags are transposes of positive ones
            i_idx = torch.arange(0, k - di, device=x.device)[:, None]  # offsets d with d + e inside the patch
            j_idx = torch.arange(max(0, -dj), k - max(dj, 0), device=x.device)[None, :]
            block = R[li][:, :, i_idx, j_idx].permute(2, 3, 0, 1)  # [ni, nj, C, C']
            s2[:, i_idx, j_idx, :, i_idx + di, j_idx + dj] = block
            s2[:, i_idx + di, j_idx + dj, :, i_idx, j_idx] = block.transpose(-1, -2)
    d = C * k * k
    return s1, s2.reshape(d, d)


class PatchMomentAccumulator:
    """Stationary k x k patch moments (SPEC 2) over images ``[B, C, H, W]``.

    The patch vector at position p is the ``C*k*k`` values (C, then row, then
    column) of the window whose top-left corner is p, over every position where
    the window fits. Patches are never unfolded (see :func:`patch_sums`); uint8
    images give exact integer sums, float images float64 sums around a
    per-channel shift. Works on any device.
    """

    def __init__(self, channels: int, patch_size: int, *, device=None, backend: Optional[str] = None):
        if int(patch_size) != patch_size or patch_size < 1 or patch_size % 2 == 0:
            raise ValueError(f"patch_size must be a positive odd integer, got {patch_size!r}")
        if int(channels) != channels or channels < 1:
            raise ValueError(f"channels must be a positive integer, got {channels!r}")
        self.k, self.channels = int(patch_size), int(channels)
        self.inner = MomentAccumulator((self.channels, self.k, self.k), device=device, backend=backend)

    def update(self, images) -> "PatchMomentAccumulator":
        """Accumulate every k x k patch of ``images``: uint8 or float ``[B, C, H, W]``."""
        images = as_tensor("images", images)
        if images.dim() != 4 or images.shape[1] != self.channels:
            raise ValueError(f"images must be [B, {self.channels}, H, W], got shape {tuple(images.shape)}")
        if images.dtype not in IMAGE_DTYPES:
            raise TypeError(f"images must be uint8 or float, got {images.dtype}")
        H, W, k = images.shape[2], images.shape[3], self.k
        if H < k or W < k:
            raise ValueError(f"images of size {H}x{W} are smaller than the {k}x{k} patch")
        check_pixels("images", images)
        if images.shape[0] == 0:
            return self
        acc = self.inner
        device = acc.device or images.device
        images = images.to(device)
        count = images.shape[0] * (H - k + 1) * (W - k + 1)
        if images.dtype == torch.uint8 and acc.mode in (None, "int"):
            if acc.mode is None:
                acc._alloc(device, "int")
            for b in range(0, images.shape[0], 256):  # 256 images: exact float32 products
                s1, s2 = patch_sums(images[b : b + 256], k)
                acc._s1 += s1.to(torch.int64)
                acc._s2 += s2.to(torch.int64)
        else:
            y = to_unit(images, torch.float64)
            if acc.mode is None:
                acc._alloc(device, "float")
                # a per-channel shift keeps the sums small: patches are stationary
                acc._ref = y.mean((0, 2, 3)).repeat_interleave(k * k)
            elif acc.mode == "int":
                acc._to_float_mode()
            shift = acc._ref.reshape(self.channels, k * k)[:, 0].reshape(1, -1, 1, 1)
            z = y - shift
            s1, s2 = patch_sums(z, k)
            # the accumulator's shift is per entry; fold any mismatch (after a merge) in exactly
            delta = (shift.reshape(-1).repeat_interleave(k * k) - acc._ref)
            acc._s1 += s1 + count * delta
            acc._s2 += s2 + torch.outer(s1, delta) + torch.outer(delta, s1) + count * torch.outer(delta, delta)
        acc.count += count
        return self

    def merge(self, other: "PatchMomentAccumulator") -> "PatchMomentAccumulator":
        if not isinstance(other, PatchMomentAccumulator) or (other.k, other.channels) != (self.k, self.channels):
            raise ValueError("can only merge patch accumulators with the same channels and patch size")
        self.inner.merge(other.inner)
        return self

    def all_reduce(self, group=None) -> "PatchMomentAccumulator":
        """Merge across the ranks of ``group`` (see :meth:`MomentAccumulator.all_reduce`)."""
        self.inner.all_reduce(group)
        return self

    def result(self) -> Moments:
        m = self.inner.result()
        m.kind = "patch"
        m.image_shape = (self.channels, self.k, self.k)
        return m


def estimate_patch_moments(data, patch_size: int, batch_size: int = 256, device=None, backend: Optional[str] = None, progress: bool = False) -> Moments:
    """Stationary patch moments: mean float64 ``[C*k*k]``, cov float64 ``[C*k*k, C*k*k]``;
    ``count`` is the number of patches."""
    acc = None
    for batch in _batches(data, batch_size, progress, "patch moments"):
        if batch.dim() != 4:
            raise ValueError(f"patch moments need images [N, C, H, W], got batches of shape {tuple(batch.shape)}")
        if acc is None:
            acc = PatchMomentAccumulator(batch.shape[1], patch_size, device=device or batch.device, backend=backend)
        acc.update(batch)
    if acc is None:
        raise ValueError("data is an empty dataset: no images to estimate patch moments from")
    return acc.result()
