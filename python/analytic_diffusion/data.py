"""Datasets: small built-in image sets, and loaders for the user's own data.

Conventions (SPEC.md section 1): images are ``[N, C, H, W]``. uint8 images are
kept as uint8 (4x smaller than float32; ``u`` stands for ``u / 127.5 - 1``).
Float images are kept in their own dtype and **must already be in [-1, 1]**:
nothing here can tell a [-1, 1] dataset from a [0, 1] one (e.g. torchvision's
``ToTensor()`` output), so rescale such data yourself (``x * 2 - 1``).

Built-in data (no network needed, everything ships inside scikit-image):

- :func:`natural_crops` - uint8 ``[n, 3, size, size]`` random crops of
  downscaled colour photographs.
- :func:`faces` - uint8 ``[100, 1, 25, 25]`` faces from the LFW subset.

Loaders for any dataset (CIFAR-10, CelebA, a folder of PNGs, ...):

- :func:`load_images` - materialise a whole dataset as one tensor.
- :func:`iter_batches` - stream the same sources batch by batch.
- :func:`image_shape` - the per-image shape a source yields.
- :func:`to_unit_range` - uint8 -> float in [-1, 1]; float passes through.

Accepted sources (``source`` argument):

- ``torch.Tensor``: ``[N, C, H, W]`` or ``[N, n]`` as is; ``[N, H, W]`` is
  read as grayscale ``[N, 1, H, W]``. Tensors are always channels-first.
- ``numpy.ndarray``: ``[N, C, H, W]``, ``[N, n]``, ``[N, H, W]`` (grayscale),
  or channels-last ``[N, H, W, C]``. Heuristic: a 4-D array is channels-last
  when its last dim is 1, 3 or 4 and its second dim is not; otherwise it is
  channels-first. (So a ``[N, 4, 4, 3]`` array is read as 4-channel 4x3
  images; transpose such rare arrays yourself.)
- a path to a ``.npy`` file (memory-mapped when streaming), or a ``.npz`` file
  (the array named ``images``, else its only array). Both are read with
  ``allow_pickle=False``: object arrays are refused, never unpickled.
- a path to a folder: every ``.png/.jpg/.jpeg/.bmp/.webp`` file below it
  (recursive, sorted by relative path, names starting with "." skipped),
  loaded with Pillow. 8-bit grayscale ('L') when every file is 'L', else
  everything is converted to RGB. All files must share one size.
- a ``torch.utils.data.Dataset`` (or any object with ``__len__`` and
  integer ``__getitem__``, e.g. a list; or an ``IterableDataset``): items
  are images or tuples/lists whose first element is the image (or dicts with
  an ``image``/``img``/``pixel_values`` key). An image item may be a PIL
  image, a ``[C, H, W]``/``[H, W]``/``[n]`` tensor, or a numpy array (3-D
  arrays are channels-last when the last dim is 1, 3 or 4 and the first is
  not).
- a ``torch.utils.data.DataLoader``: its batches, or the first element of
  each batch when it is a tuple/list (``(images, labels)``).

Accepted dtypes: uint8, float16, float32, float64 (bool and integer types
other than uint8 are refused). Float data must be finite (checked batch by
batch). Nothing here writes into the caller's data; results may share memory
with an in-memory ``source`` (tensor or array) when no conversion is needed.
"""
from __future__ import annotations

import functools
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Iterable, Iterator, List, Optional, Tuple, Union

import numpy as np
import torch

from ._validate import check_pixels

__all__ = [
    "PHOTOS",
    "IMAGE_EXTENSIONS",
    "natural_crops",
    "faces",
    "load_images",
    "iter_batches",
    "image_shape",
    "to_unit_range",
]

#: scikit-image photographs used by :func:`natural_crops` (all bundled, RGB).
PHOTOS: Tuple[str, ...] = (
    "astronaut",
    "coffee",
    "chelsea",
    "rocket",
    "hubble_deep_field",
    "immunohistochemistry",
    "retina",
)

#: File extensions (lower case) loaded from a folder source.
IMAGE_EXTENSIONS: Tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".webp")

_TORCH_DTYPES = (torch.uint8, torch.float16, torch.float32, torch.float64)
_NUMPY_DTYPES = tuple(np.dtype(d) for d in (np.uint8, np.float16, np.float32, np.float64))
_DICT_IMAGE_KEYS = ("image", "img", "pixel_values")

# Downscale factors for natural_crops: the photo's short side is resized to
# size * factor. At 2x-8x below camera resolution a small crop sees objects and
# textures at the scale a 32x32 dataset does, instead of smooth sensor blur.
_SCALE_FACTORS = tuple(2.0 ** (1.0 + 2.0 * k / 6.0) for k in range(7))  # 2 .. 8
# A crop whose pixel std is below this (uint8 levels) is redrawn: retina's black
# border and hubble's empty sky would otherwise give perfectly flat crops.
_MIN_CROP_STD = 2.0
_MAX_CROP_ROUNDS = 64


class _PathNotFoundError(FileNotFoundError, ValueError):
    """A missing path: a FileNotFoundError that ``except ValueError`` also catches."""


# --------------------------------------------------------------------------- #
# small argument checks
# --------------------------------------------------------------------------- #
def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int >= {minimum}, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value}")
    return int(value)


def _check_limit(limit) -> Optional[int]:
    return None if limit is None else _check_int("limit", limit, 1)


def _shape_str(shape) -> str:
    return "[" + ", ".join(str(int(s)) for s in shape) + "]"


# --------------------------------------------------------------------------- #
# built-in data
# --------------------------------------------------------------------------- #
@functools.lru_cache(maxsize=None)
def _photo(name: str) -> np.ndarray:
    import skimage.data

    img = np.asarray(getattr(skimage.data, name)())
    if img.ndim != 3 or img.shape[2] not in (3, 4) or img.dtype != np.uint8:
        raise RuntimeError(f"skimage.data.{name}() is not an 8-bit colour photo: {img.shape} {img.dtype}")
    img = np.ascontiguousarray(img[:, :, :3])
    img.flags.writeable = False  # shared by the cache: callers only ever read crops
    return img


def _short_side(name: str) -> int:
    return min(_photo(name).shape[:2])


def _levels(name: str, size: int) -> Tuple[int, ...]:
    """Short-side lengths the photo is resized to for crops of ``size``."""
    short = _short_side(name)
    # Never upscale: a photo too small for a factor is used at full resolution.
    return tuple(sorted({min(short, max(size, round(size * f))) for f in _SCALE_FACTORS}))


@functools.lru_cache(maxsize=128)
def _resized(name: str, short: int) -> np.ndarray:
    from PIL import Image

    img = _photo(name)
    h, w = img.shape[:2]
    if short == min(h, w):
        return img
    s = short / min(h, w)
    new_w, new_h = max(short, round(w * s)), max(short, round(h * s))
    # LANCZOS is antialiased when shrinking; reducing_gap first box-reduces by an
    # integer factor, which is ~2x faster and indistinguishable at gap 3.
    out = np.asarray(
        Image.fromarray(img).resize((new_w, new_h), Image.Resampling.LANCZOS, reducing_gap=3.0)
    ).copy()
    out.flags.writeable = False
    return out


def _max_crop_size() -> int:
    return min(_short_side(n) for n in PHOTOS)


def natural_crops(n: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    """Random crops of the colour photographs bundled with scikit-image.

    Each crop picks a photo uniformly from :data:`PHOTOS`, a downscale level
    uniformly from 7 geometric steps that resize the photo's short side to
    2x .. 8x ``size`` (antialiased, never upscaled), a uniform position, and a
    horizontal flip with probability 1/2. Nearly flat crops (pixel std below
    2 grey levels, e.g. retina's black border) are redrawn.

    Args:
        n: number of crops, int >= 1.
        size: side of the square crops, 2 <= size <= 300 (the short side of
            the smallest photo, chelsea).
        seed: int >= 0; the same (n, size, seed) always gives the same crops.
            Each crop uses its own row of random numbers, so
            ``natural_crops(k, size, seed)`` is a prefix of
            ``natural_crops(n, size, seed)`` for k < n unless a flat crop had
            to be redrawn among the first k (rare: ~0.02% of crops at size 32).

    Returns:
        uint8 tensor ``[n, 3, size, size]`` (a fresh tensor each call).
    """
    n = _check_int("n", n, 1)
    size = _check_int("size", size, 2)
    seed = _check_int("seed", seed, 0)
    max_size = _max_crop_size()
    if size > max_size:
        raise ValueError(
            f"size must be <= {max_size} (the short side of the smallest bundled photo), got {size}"
        )
    levels = [_levels(name, size) for name in PHOTOS]
    rng = np.random.default_rng(seed)
    out = np.empty((n, size, size, 3), dtype=np.uint8)
    filled = 0
    for attempt in range(_MAX_CROP_ROUNDS):
        need = n - filled
        # One row per crop (photo, level, y, x, flip): row i does not depend on n.
        u = rng.random((need, 5))
        cand = out[filled:]
        for i in range(need):
            p = int(u[i, 0] * len(PHOTOS))
            lv = levels[p]
            img = _resized(PHOTOS[p], lv[int(u[i, 1] * len(lv))])
            h, w = img.shape[:2]
            y = int(u[i, 2] * (h - size + 1))
            x = int(u[i, 3] * (w - size + 1))
            crop = img[y : y + size, x : x + size]
            cand[i] = crop[:, ::-1] if u[i, 4] < 0.5 else crop
        if attempt == _MAX_CROP_ROUNDS - 1:
            break  # keep whatever is left rather than loop forever
        keep = cand.reshape(need, -1).std(axis=1) >= _MIN_CROP_STD
        k = int(keep.sum())
        if k < need:
            # Compact the accepted crops to the front; the rest get redrawn.
            cand[:k] = cand[keep]
        filled += k
        if filled == n:
            break
    return torch.from_numpy(np.ascontiguousarray(out.transpose(0, 3, 1, 2)))


@functools.lru_cache(maxsize=1)
def _faces_u8() -> np.ndarray:
    import skimage.data

    x = np.asarray(skimage.data.lfw_subset(), dtype=np.float64)
    if x.shape != (200, 25, 25):
        raise RuntimeError(f"skimage.data.lfw_subset() has shape {x.shape}, expected (200, 25, 25)")
    # lfw_subset is float64 in [0, 1] (rescaled crops, so not exact multiples of
    # 1/255); images 0..99 are faces, 100..199 background patches (non-faces).
    u = np.rint(np.clip(x[:100], 0.0, 1.0) * 255.0).astype(np.uint8)
    u.flags.writeable = False
    return u


def faces() -> torch.Tensor:
    """The 100 face images of scikit-image's LFW subset (``skimage.data.lfw_subset``).

    Returns:
        uint8 tensor ``[100, 1, 25, 25]``: ``round(v * 255)`` of the float64
        [0, 1] originals (round half to even). A fresh tensor each call.
    """
    return torch.from_numpy(_faces_u8()[:, None].copy())


# --------------------------------------------------------------------------- #
# normalising one batch / one item
# --------------------------------------------------------------------------- #
def _check_torch_dtype(t: torch.Tensor, what: str) -> None:
    if t.dtype not in _TORCH_DTYPES:
        raise TypeError(
            f"{what} has dtype {t.dtype}; expected uint8 or float16/float32/float64 "
            f"(convert integer labels/masks yourself; float data must be in [-1, 1])"
        )


def _numpy_dtype(a: np.ndarray, what: str) -> np.ndarray:
    if a.dtype.hasobject:
        raise TypeError(f"{what} has dtype object; expected uint8 or float16/float32/float64")
    if not a.dtype.isnative:
        a = a.astype(a.dtype.newbyteorder("="))  # torch cannot wrap big-endian buffers
    if a.dtype not in _NUMPY_DTYPES:
        raise TypeError(f"{what} has dtype {a.dtype}; expected uint8 or float16/float32/float64")
    return a


def _is_channels_last(shape: Tuple[int, ...]) -> bool:
    """For ``[..., A, B, C]``: channels-last when C in {1, 3, 4} and A is not."""
    return shape[-1] in (1, 3, 4) and shape[-3] not in (1, 3, 4)


def _numpy_to_tensor(a: np.ndarray) -> torch.Tensor:
    a = np.ascontiguousarray(a)
    if not a.flags.writeable:
        a = a.copy()  # torch warns on (and may not honour) read-only buffers
    return torch.from_numpy(a)


def _array_batch(a: np.ndarray, what: str) -> torch.Tensor:
    """numpy ``[N, C, H, W]`` / ``[N, H, W, C]`` / ``[N, H, W]`` / ``[N, n]`` -> tensor."""
    a = _numpy_dtype(a, what)
    if a.ndim == 4:
        if _is_channels_last(a.shape):
            a = a.transpose(0, 3, 1, 2)
    elif a.ndim == 3:
        a = a[:, None]
    elif a.ndim != 2:
        raise ValueError(
            f"{what} must be 2-D [N, n], 3-D [N, H, W] or 4-D [N, C, H, W] / [N, H, W, C], "
            f"got shape {_shape_str(a.shape)}"
        )
    return _numpy_to_tensor(a)


def _array_batch_shape(shape: Tuple[int, ...], what: str) -> Tuple[int, ...]:
    """The per-image shape :func:`_array_batch` would give, without reading data."""
    if len(shape) == 4:
        return (shape[3], shape[1], shape[2]) if _is_channels_last(shape) else tuple(shape[1:])
    if len(shape) == 3:
        return (1,) + tuple(shape[1:])
    if len(shape) == 2:
        return tuple(shape[1:])
    raise ValueError(
        f"{what} must be 2-D [N, n], 3-D [N, H, W] or 4-D [N, C, H, W] / [N, H, W, C], "
        f"got shape {_shape_str(shape)}"
    )


def _tensor_batch(t: torch.Tensor, what: str) -> torch.Tensor:
    """tensor ``[N, C, H, W]`` / ``[N, n]`` as is; ``[N, H, W]`` -> ``[N, 1, H, W]``."""
    _check_torch_dtype(t, what)
    t = t.detach()
    if t.dim() == 3:
        return t.unsqueeze(1)
    if t.dim() not in (2, 4):
        raise ValueError(
            f"{what} must be 2-D [N, n], 3-D [N, H, W] or 4-D [N, C, H, W], got shape {_shape_str(t.shape)}"
        )
    return t


def _pil_to_array(img) -> np.ndarray:
    if img.mode not in ("L", "RGB"):
        img = img.convert("RGB")
    a = np.asarray(img)
    return a[None] if a.ndim == 2 else a.transpose(2, 0, 1)


def _unwrap(obj, what: str):
    """The image inside a ``(image, label, ...)`` tuple/list or an ``{"image": ...}`` dict."""
    if isinstance(obj, (tuple, list)):
        if len(obj) == 0:
            raise ValueError(f"{what} is an empty {type(obj).__name__}; expected an image or (image, label)")
        return obj[0]
    if isinstance(obj, Mapping):
        for key in _DICT_IMAGE_KEYS:
            if key in obj:
                return obj[key]
        raise ValueError(f"{what} is a dict without any of the keys {list(_DICT_IMAGE_KEYS)}; got keys {list(obj)}")
    return obj


def _item_image(item, what: str) -> torch.Tensor:
    """One dataset item -> ``[C, H, W]`` (or ``[n]``) tensor."""
    from PIL import Image

    img = _unwrap(item, what)
    if isinstance(img, Image.Image):
        return _numpy_to_tensor(_pil_to_array(img))
    if isinstance(img, torch.Tensor):
        _check_torch_dtype(img, what)
        img = img.detach()
        if img.dim() == 2:
            return img.unsqueeze(0)
        if img.dim() not in (1, 3):
            raise ValueError(f"{what} must be [C, H, W], [H, W] or [n], got shape {_shape_str(img.shape)}")
        return img
    if isinstance(img, np.ndarray):
        img = _numpy_dtype(img, what)
        if img.ndim == 2:
            img = img[None]
        elif img.ndim == 3:
            if _is_channels_last(img.shape):
                img = img.transpose(2, 0, 1)
        elif img.ndim != 1:
            raise ValueError(
                f"{what} must be [C, H, W], [H, W, C], [H, W] or [n], got shape {_shape_str(img.shape)}"
            )
        return _numpy_to_tensor(img)
    raise TypeError(
        f"{what} is a {type(img).__name__}; expected a PIL image, torch.Tensor or numpy array "
        f"(or a tuple/list whose first element is one)"
    )


def _stack_items(images: List[torch.Tensor], first_index: int, what: str) -> torch.Tensor:
    ref = images[0]
    for j, im in enumerate(images[1:], 1):
        if im.shape != ref.shape:
            raise ValueError(
                f"{what} images differ in shape: item {first_index} is {_shape_str(ref.shape)} "
                f"but item {first_index + j} is {_shape_str(im.shape)}"
            )
        if im.dtype != ref.dtype:
            raise TypeError(
                f"{what} images differ in dtype: item {first_index} is {ref.dtype} "
                f"but item {first_index + j} is {im.dtype}"
            )
    return torch.stack(images)


def _loader_batch(batch, what: str) -> torch.Tensor:
    """One DataLoader batch -> ``[b, C, H, W]`` / ``[b, n]`` tensor.

    A tuple/list batch is ``(images, labels, ...)`` (what the default collate
    gives) when its first element is a tensor/array; otherwise (PIL images,
    tuples, dicts from a custom ``collate_fn``) it is a list of per-image items.
    """
    from PIL import Image

    if isinstance(batch, Mapping):
        batch = _unwrap(batch, what)
    elif isinstance(batch, (tuple, list)):
        if len(batch) and isinstance(batch[0], (Image.Image, tuple, list, Mapping)):
            items = [_item_image(x, f"{what} element {j}") for j, x in enumerate(batch)]
            return _stack_items(items, 0, what)
        batch = _unwrap(batch, what)
    if isinstance(batch, torch.Tensor):
        return _tensor_batch(batch, what)
    if isinstance(batch, np.ndarray):
        return _array_batch(batch, what)
    raise TypeError(f"{what} is a {type(batch).__name__}; expected a tensor, array, or (images, labels) tuple")


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


def to_unit_range(
    x: Union[torch.Tensor, np.ndarray], dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """uint8 images -> float ``u / 127.5 - 1`` in [-1, 1]; float images pass through.

    Args:
        x: uint8 or float16/32/64 tensor (or numpy array) of any shape.
            Float input is assumed to be in [-1, 1] already and is only cast.
        dtype: floating result dtype (default torch.float32).

    Returns:
        A tensor of ``dtype``; a new tensor for uint8 input. Float input of
        the same dtype is returned as is (never modified). uint8 values are
        correctly rounded in ``dtype`` (computed as ``(u - 127.5) / 127.5``,
        whose subtraction is exact).
    """
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    if isinstance(x, np.ndarray):
        x = _numpy_to_tensor(_numpy_dtype(x, "x"))
    elif not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor or numpy array, got {type(x).__name__}")
    _check_torch_dtype(x, "x")
    if x.dtype == torch.uint8:
        return x.to(dtype).sub_(127.5).div_(127.5)
    return x.to(dtype)
