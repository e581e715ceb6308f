"""Sources of images - arrays, tensors, .npy/.npz files, folders, map-style and iterable
datasets, DataLoaders - and the public loaders on top of them: :func:`iter_batches`,
:func:`load_images`, :func:`image_shape` (see the package
docstring for what each source accepts)."""
from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Iterable, Iterator, List, Optional, Tuple

import numpy as np
import torch

from .._validate import check_pixels
from .items import (
    IMAGE_EXTENSIONS,
    _array_batch,
    _array_batch_shape,
    _check_int,
    _check_limit,
    _item_image,
    _loader_batch,
    _numpy_dtype,
    _PathNotFoundError,
    _shape_str,
    _stack_items,
    _tensor_batch,
)


# --------------------------------------------------------------------------- #
# sources
# --------------------------------------------------------------------------- #
class _Source:
    """A resolved ``source``: ``total`` images (None if unknown) and raw batches."""

    total: Optional[int] = None
    exact_total = False  # True when ``total`` is guaranteed (safe to preallocate)
    limit: Optional[int] = None
    seekable = False  # True when batches() can start at any image without reading the ones before

    def batches(self, batch_size: int, start: int = 0) -> Iterator[torch.Tensor]:
        raise NotImplementedError

    def whole(self) -> Optional[torch.Tensor]:
        """The full (limited) dataset when it is already in memory, else None."""
        return None


class _InMemory(_Source):
    exact_total = True
    seekable = True

    def __init__(self, data: torch.Tensor, what: str, limit: Optional[int]):
        self.data = data if limit is None else data[:limit]
        self.total = int(self.data.shape[0])
        if self.total == 0 or self.data[0].numel() == 0:
            raise ValueError(f"{what} is empty: shape {_shape_str(data.shape)}")

    def batches(self, batch_size, start=0):
        for i in range(start, self.total, batch_size):
            yield self.data[i : i + batch_size]

    def whole(self):
        return self.data


class _NpyFile(_Source):
    exact_total = True
    seekable = True

    def __init__(self, path: Path, limit: Optional[int]):
        self.path = path
        self.what = f"source (.npy file {str(path)!r})"
        try:
            mm = np.load(path, mmap_mode="r", allow_pickle=False)
        except ValueError as e:
            # Object arrays, and files that are not .npy at all, would need pickle.
            raise ValueError(
                f"{self.what} cannot be read without pickle (object dtype, or not a .npy file); refused: {e}"
            ) from None
        _numpy_dtype(mm[:0], self.what)
        self.shape = _array_batch_shape(mm.shape, self.what)
        self.mm = mm if limit is None else mm[:limit]
        self.total = int(self.mm.shape[0])
        if self.total == 0 or int(np.prod(self.shape)) == 0:
            raise ValueError(f"{self.what} is empty: shape {_shape_str(mm.shape)}")

    def batches(self, batch_size, start=0):
        for i in range(start, self.total, batch_size):
            # np.array copies the slice out of the memory map into RAM.
            yield _array_batch(np.array(self.mm[i : i + batch_size]), self.what)

    def whole(self):
        return _array_batch(np.array(self.mm), self.what)


def _npz_array(path: Path) -> np.ndarray:
    what = f"source (.npz file {str(path)!r})"
    try:
        with np.load(path, allow_pickle=False) as z:
            keys = list(z.files)
            if "images" in keys:
                key = "images"
            elif len(keys) == 1:
                key = keys[0]
            elif not keys:
                raise ValueError(f"{what} contains no arrays")
            else:
                raise ValueError(f"{what} holds several arrays {keys} and none is named 'images'")
            return z[key]
    except ValueError as e:
        if "pickle" in str(e) or "Object arrays" in str(e):
            raise ValueError(
                f"{what} cannot be read without pickle (object array, or not a .npz file); refused: {e}"
            ) from None
        raise
    except (OSError, EOFError) as e:
        raise ValueError(f"{what} is not a readable .npz file: {e}") from None


def _list_image_files(folder: Path) -> List[Path]:
    files = [
        p
        for p in folder.rglob("*")
        if p.suffix.lower() in IMAGE_EXTENSIONS
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)
        and p.is_file()
    ]
    return sorted(files, key=lambda p: p.relative_to(folder).as_posix())


class _Folder(_Source):
    exact_total = True
    seekable = True

    def __init__(self, folder: Path, limit: Optional[int]):
        from PIL import Image, UnidentifiedImageError

        self.what = f"source (folder {str(folder)!r})"
        files = _list_image_files(folder)
        if not files:
            raise ValueError(f"{self.what} contains no images ({', '.join(IMAGE_EXTENSIONS)}), searched recursively")
        if limit is not None:
            files = files[:limit]
        # Header-only pass (Pillow opens lazily): fixes the channel count and
        # fails on a size mismatch before any pixel is decoded.
        size0, all_gray = None, True
        for f in files:
            try:
                with Image.open(f) as im:
                    size, mode = im.size, im.mode
            except (UnidentifiedImageError, OSError) as e:
                raise ValueError(f"{self.what}: cannot read image {str(f)!r}: {e}") from None
            if size0 is None:
                size0 = size
            elif size != size0:
                raise ValueError(
                    f"{self.what}: all images must share one size, but {str(files[0])!r} is "
                    f"{size0[0]}x{size0[1]} (WxH) and {str(f)!r} is {size[0]}x{size[1]}"
                )
            all_gray = all_gray and mode == "L"
        self.files = files
        self.mode = "L" if all_gray else "RGB"
        self.total = len(files)

    def batches(self, batch_size, start=0):
        from PIL import Image

        for i in range(start, self.total, batch_size):
            arrs = []
            for f in self.files[i : i + batch_size]:
                with Image.open(f) as im:
                    arrs.append(np.asarray(im.convert(self.mode)))
            a = np.stack(arrs)
            a = a[:, None] if a.ndim == 3 else a.transpose(0, 3, 1, 2)
            yield torch.from_numpy(np.ascontiguousarray(a))


class _MapDataset(_Source):
    exact_total = True
    seekable = True

    def __init__(self, ds, limit: Optional[int]):
        self.ds = ds
        self.what = f"source ({type(ds).__name__})"
        n = len(ds)
        self.total = n if limit is None else min(n, limit)
        if self.total == 0:
            raise ValueError(f"{self.what} is empty (len 0)")

    def batches(self, batch_size, start=0):
        for i in range(start, self.total, batch_size):
            j = min(i + batch_size, self.total)
            items = [_item_image(self.ds[k], f"{self.what} item {k}") for k in range(i, j)]
            yield _stack_items(items, i, self.what)


class _IterDataset(_Source):
    def __init__(self, ds, limit: Optional[int]):
        self.ds = ds
        self.limit = limit
        self.what = f"source ({type(ds).__name__})"
        try:
            self.total = len(ds) if limit is None else min(len(ds), limit)
        except TypeError:
            self.total = limit

    def batches(self, batch_size, start=0):
        buf: List[torch.Tensor] = []
        start = 0
        for k, item in enumerate(self.ds):
            if self.limit is not None and k >= self.limit:
                break
            buf.append(_item_image(item, f"{self.what} item {k}"))
            if len(buf) == batch_size:
                yield _stack_items(buf, start, self.what)
                start += len(buf)
                buf = []
        if buf:
            yield _stack_items(buf, start, self.what)


class _Loader(_Source):
    def __init__(self, loader, limit: Optional[int]):
        self.loader = loader
        self.what = f"source ({type(loader).__name__})"
        total = None
        try:
            # Only for the progress bar: exact for the standard batch sampler.
            if loader.batch_size is not None and not loader.drop_last:
                total = len(loader.sampler)
        except (TypeError, AttributeError):
            total = None
        if limit is not None:
            total = limit if total is None else min(total, limit)
        self.total = total

    def batches(self, batch_size, start=0):
        for k, batch in enumerate(self.loader):
            yield _loader_batch(batch, f"{self.what} batch {k}")


def _resolve(source, limit: Optional[int]) -> _Source:
    from torch.utils.data import DataLoader, Dataset, IterableDataset

    if isinstance(source, torch.Tensor):
        return _InMemory(_tensor_batch(source, "source"), "source", limit)
    if isinstance(source, np.ndarray):
        # Slice before converting: a channels-last array is copied by the transpose.
        a = source if limit is None or source.ndim == 0 else source[:limit]
        return _InMemory(_array_batch(a, "source"), "source", None)
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.exists():
            raise _PathNotFoundError(2, "source path does not exist", str(path))
        if path.is_dir():
            return _Folder(path, limit)
        suffix = path.suffix.lower()
        if suffix == ".npy":
            return _NpyFile(path, limit)
        if suffix == ".npz":
            what = f"source (.npz file {str(path)!r})"
            a = _npz_array(path)
            if limit is not None:
                a = a[:limit]
            if a.ndim == 0 or a.shape[0] == 0:
                raise ValueError(f"{what} is empty: shape {_shape_str(a.shape)}")
            return _InMemory(_array_batch(a, what), what, None)
        raise ValueError(
            f"source path {str(path)!r} is neither a folder nor a .npy/.npz file "
            f"(a folder of {', '.join(IMAGE_EXTENSIONS)} images is accepted)"
        )
    if isinstance(source, DataLoader):
        return _Loader(source, limit)
    if isinstance(source, IterableDataset):
        return _IterDataset(source, limit)
    if isinstance(source, Dataset) or (
        hasattr(source, "__len__")
        and hasattr(source, "__getitem__")
        and not isinstance(source, (Mapping, bytes, bytearray))
    ):
        return _MapDataset(source, limit)
    raise TypeError(
        f"source must be a torch.Tensor, numpy array, path to a folder/.npy/.npz, "
        f"torch Dataset or DataLoader; got {type(source).__name__}"
    )


# --------------------------------------------------------------------------- #
# public loaders
# --------------------------------------------------------------------------- #
def _check_finite(b: torch.Tensor, what: str) -> None:
    """Float images finite and in [-1, 1] (up to rounding): a float file of 0..255 pixels
    is refused here, naming the fix, instead of giving saturated samples later."""
    if b.is_floating_point() and not bool(torch.isfinite(b).all()):
        bad = int((~torch.isfinite(b)).sum())
        raise ValueError(f"{what} contains {bad} NaN/Inf value(s); float images must be finite, in [-1, 1]")
    check_pixels(what, b)


def _checked(src: _Source, batch_size: int, start: int = 0) -> Iterator[torch.Tensor]:
    """Raw batches -> validated batches (dtype, one image shape, finite), limit applied,
    beginning at image ``start`` (unseekable sources read and drop the images before it)."""
    limit = src.limit
    shape0 = dtype0 = None
    seen = min(start, src.total) if src.seekable else 0
    drop = 0 if src.seekable else start
    for k, b in enumerate(src.batches(batch_size, start if src.seekable else 0)):
        if drop:
            took = min(drop, b.shape[0])
            b, drop, seen = b[took:], drop - took, seen + took
        if limit is not None and seen + b.shape[0] > limit:
            b = b[: limit - seen]
        if b.shape[0] == 0:
            continue
        if b[0].numel() == 0:
            raise ValueError(f"source batch {k} holds empty images: shape {_shape_str(b.shape)}")
        if shape0 is None:
            shape0, dtype0 = tuple(b.shape[1:]), b.dtype
        elif tuple(b.shape[1:]) != shape0:
            raise ValueError(
                f"source yields mixed image shapes: images 0..{seen - 1} are {_shape_str(shape0)} "
                f"but batch {k} (images {seen}..{seen + b.shape[0] - 1}) is {_shape_str(b.shape[1:])}"
            )
        elif b.dtype != dtype0:
            raise TypeError(
                f"source yields mixed dtypes: images 0..{seen - 1} are {dtype0} "
                f"but batch {k} (images {seen}..{seen + b.shape[0] - 1}) is {b.dtype}"
            )
        _check_finite(b, f"source batch {k} (images {seen}..{seen + b.shape[0] - 1})")
        seen += b.shape[0]
        yield b
        if limit is not None and seen >= limit:
            return
    if seen == 0:
        raise ValueError("source is empty: it yielded no images")
    if seen < start:
        raise ValueError(f"source holds only {seen} images, fewer than start={start} (is it the data the run began with?)")


def _rechunk(batches: Iterable[torch.Tensor], batch_size: int) -> Iterator[torch.Tensor]:
    """Exactly ``batch_size`` images per batch (the last may be shorter)."""
    buf: List[torch.Tensor] = []
    have = 0
    for b in batches:
        if not buf and b.shape[0] == batch_size:
            yield b  # the common case: no copy
            continue
        while b.shape[0]:
            take = min(batch_size - have, b.shape[0])
            buf.append(b[:take])
            have += take
            b = b[take:]
            if have == batch_size:
                yield buf[0] if len(buf) == 1 else torch.cat(buf)
                buf, have = [], 0
    if buf:
        yield buf[0] if len(buf) == 1 else torch.cat(buf)


def _open(source, limit) -> _Source:
    limit = _check_limit(limit)
    src = _resolve(source, limit)
    src.limit = limit
    return src


def iter_batches(
    source,
    batch_size: int = 256,
    *,
    limit: Optional[int] = None,
    start: int = 0,
    progress: bool = False,
    desc: Optional[str] = None,
) -> Iterator[torch.Tensor]:
    """Stream a dataset in batches without materialising it.

    Args:
        source: any source listed in the module docstring. Folders, Datasets,
            DataLoaders and .npy files (memory-mapped) are read lazily, one
            batch at a time; tensors, arrays and .npz files are in memory.
        batch_size: int >= 1. Every batch has exactly ``batch_size`` images
            except the last; a DataLoader's own batches are re-chunked to this
            size (passed through without a copy when they already match).
        limit: only the first ``limit`` images (int >= 1), or all.
        start: skip the first ``start`` images (int >= 0), e.g. to resume a run.
            Arrays, files, folders and map-style Datasets seek there without
            reading them; DataLoaders and iterable datasets read and drop them.
        progress: show a tqdm bar (unit "img"; total when known).
        desc: label of the progress bar.

    Yields:
        ``[b, C, H, W]`` tensors (``[b, n]`` for 2-D sources), uint8 or float
        (float16/32/64, assumed in [-1, 1]), all with one image shape and
        dtype. Batches of in-memory sources are views of ``source``; do not
        write into them.

    Raises:
        TypeError / ValueError naming ``source`` (or the batch/item at fault)
        for unsupported types, dtypes, shapes, NaN/Inf or empty data;
        FileNotFoundError (also a ValueError) for a missing path. Errors about
        the source itself are raised at the call, before iteration starts.
    """
    batch_size = _check_int("batch_size", batch_size, 1)
    start = _check_int("start", start, 0)
    src = _open(source, limit)
    return _iter(src, batch_size, progress, desc, start)


def _iter(src: _Source, batch_size: int, progress: bool, desc: Optional[str], start: int = 0) -> Iterator[torch.Tensor]:
    from tqdm.auto import tqdm

    bar = tqdm(total=src.total, initial=min(start, src.total or start), unit="img", desc=desc, disable=not progress)
    try:
        for b in _rechunk(_checked(src, batch_size, start), batch_size):
            bar.update(b.shape[0])
            yield b
    finally:
        bar.close()


def load_images(source, *, limit: Optional[int] = None, progress: bool = False) -> torch.Tensor:
    """Materialise a whole dataset as one tensor.

    Args:
        source: any source listed in the module docstring.
        limit: only the first ``limit`` images (int >= 1), or all.
        progress: show a tqdm bar (unit "img") while reading streamed sources.

    Returns:
        ``[N, C, H, W]`` (``[N, n]`` for 2-D sources). uint8 stays uint8;
        float16/32/64 keep their dtype and are assumed to be in [-1, 1] (use
        :func:`to_unit_range` to get floats). For tensor/array sources the
        result may share memory with ``source``.

    Raises:
        as :func:`iter_batches`.
    """
    src = _open(source, limit)
    whole = src.whole()
    if whole is not None:
        # Already in memory: validate in chunks of ~4M values so the NaN check's
        # temporary masks stay small.
        per_image = max(1, whole[0].numel())
        for _ in _checked(src, max(1, (1 << 22) // per_image)):
            pass
        return whole
    if src.exact_total:
        out: Optional[torch.Tensor] = None
        n = 0
        for b in _iter(src, 256, progress, None):
            if out is None:
                out = torch.empty((src.total,) + tuple(b.shape[1:]), dtype=b.dtype)
            out[n : n + b.shape[0]] = b
            n += b.shape[0]
        return out[:n]
    pieces = list(_iter(src, 256, progress, None))
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces)


def image_shape(source) -> Tuple[int, ...]:
    """Per-image shape ``(C, H, W)`` (or ``(n,)``) that ``source`` yields.

    Cheap for tensors, arrays and .npy files (no data read); reads one item /
    batch of a Dataset or DataLoader; scans file headers of a folder.
    """
    src = _open(source, None)
    if isinstance(src, _InMemory):
        return tuple(src.data.shape[1:])
    if isinstance(src, _NpyFile):
        return src.shape
    gen = _checked(src, 1)
    try:
        return tuple(next(gen).shape[1:])
    finally:
        gen.close()
