"""Normalising what a source yields - one array, tensor, PIL image, dataset item or
DataLoader batch - to a channels-first tensor, with the dtype and layout checks that
name what is wrong. Shared by every source in :mod:`.sources`."""
from __future__ import annotations

from collections.abc import Mapping
from typing import List, Optional, Tuple

import numpy as np
import torch

#: File extensions (lower case) loaded from a folder source.
IMAGE_EXTENSIONS: Tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".webp")

_TORCH_DTYPES = (torch.uint8, torch.float16, torch.float32, torch.float64)
_NUMPY_DTYPES = tuple(np.dtype(d) for d in (np.uint8, np.float16, np.float32, np.float64))
_DICT_IMAGE_KEYS = ("image", "img", "pixel_values")


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
