"""The result of a moments estimate, and its file format (safetensors: never pickle)."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Optional, Sequence, Tuple, Union

import torch

FORMAT = "analytic-diffusion-moments/1"
CONVENTION = "[-1,1]"  # uint8 u maps to u/127.5 - 1
U8_SCALE = 127.5


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
        meta = {
            "format": FORMAT,
            "count": str(int(self.count)),
            "image_shape": json.dumps(list(self.image_shape) if self.image_shape else None),
            "convention": CONVENTION,
            "kind": self.kind,
            "extra": json.dumps(self.extra),
        }
        save_safetensors({"mean": self.mean, "cov": self.cov}, path, meta)

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


def save_safetensors(tensors: dict, path, meta: dict) -> None:
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
