"""Built-in image sets, bundled with scikit-image (no network needed): random crops of
its colour photographs and the faces of its LFW subset. uint8, ``[N, C, H, W]``."""
from __future__ import annotations

import functools
from typing import Tuple

import numpy as np
import torch

from .items import _check_int

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


# Downscale factors for natural_crops: the photo's short side is resized to
# size * factor. At 2x-8x below camera resolution a small crop sees objects and
# textures at the scale a 32x32 dataset does, instead of smooth sensor blur.
_SCALE_FACTORS = tuple(2.0 ** (1.0 + 2.0 * k / 6.0) for k in range(7))  # 2 .. 8
# A crop whose pixel std is below this (uint8 levels) is redrawn: retina's black
# border and hubble's empty sky would otherwise give perfectly flat crops.
_MIN_CROP_STD = 2.0
_MAX_CROP_ROUNDS = 64


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
