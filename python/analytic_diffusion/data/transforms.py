"""What the published codes do to their datasets before use: a subset, grayscale, a resize;
and torchvision datasets already on disk (``download=False``).

- :func:`preprocess` - subset -> grayscale -> resize of an image tensor ``[N, C, H, W]``.
- :func:`torchvision_dataset` - ``torchvision.datasets.<Name>(root, download=False)``, a
  source for :func:`~analytic_diffusion.data.load_images`.
"""
from __future__ import annotations

import numbers
import os
from pathlib import Path
from typing import Optional, Sequence, Tuple, Union

import torch

__all__ = ["TORCHVISION_NAMES", "preprocess", "torchvision_dataset"]

# this library's dataset keys -> torchvision.datasets class names
TORCHVISION_NAMES = {
    "cifar10": "CIFAR10",
    "cifar100": "CIFAR100",
    "mnist": "MNIST",
    "fashion_mnist": "FashionMNIST",
    "kmnist": "KMNIST",
    "svhn": "SVHN",
    "celeba": "CelebA",
    "stl10": "STL10",
}
_MODES = ("bilinear", "bicubic", "area", "nearest")


def _size(size) -> Optional[Tuple[int, int]]:
    if size is None:
        return None
    if isinstance(size, bool):
        raise TypeError("size must be an int or (H, W), got bool")
    if isinstance(size, numbers.Integral):
        size = (int(size), int(size))
    try:
        hw = tuple(size)
    except TypeError:
        raise TypeError(f"size must be an int or (H, W), got {type(size).__name__}") from None
    if len(hw) != 2 or any(isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1 for v in hw):
        raise ValueError(f"size must be a positive int or (H, W) of positive ints, got {size!r}")
    return int(hw[0]), int(hw[1])


def preprocess(
    images: torch.Tensor,
    *,
    size: Union[None, int, Sequence[int]] = None,
    grayscale: bool = False,
    subset: Optional[int] = None,
    seed: Optional[int] = None,
    mode: str = "bilinear",
) -> torch.Tensor:
    """A subset of the images, converted to grayscale, resized: in that order.

    Args:
        images: uint8 or float (in [-1, 1]) ``[N, C, H, W]``, C = 1 or 3 (any source
            :func:`~analytic_diffusion.data.load_images` takes is loaded first). Not modified.
        size: the output resolution, an int (square) or ``(H, W)``; None keeps it.
            Resampling: ``torch.nn.functional.interpolate`` in float64 with ``mode``
            (``"bilinear"`` default or ``"bicubic"``, antialiased when shrinking, as
            torchvision's ``Resize``; ``"area"``; ``"nearest"``), then rounded
            back to uint8 for uint8 input (bicubic overshoot clipped to [0, 255] / [-1, 1]).
        grayscale: RGB -> one channel with ITU-R 601 luma weights (0.299, 0.587, 0.114);
            for uint8 bit for bit what Pillow's ``convert("L")`` gives. One channel stays.
        subset: keep ``subset`` images (int >= 1, at most N): the first ones (the order of
            the source, which the WSSM chunks depend on), or with ``seed`` a seeded random
            choice kept in the source's order.
        mode: resampling mode, see ``size``.

    Returns:
        ``[n, C', H', W']`` with the input's dtype; the input itself when nothing changes.
    """
    if not isinstance(images, torch.Tensor):
        from .sources import load_images

        images = load_images(images)
    if images.dim() != 4:
        raise ValueError(f"images must be [N, C, H, W], got shape {tuple(images.shape)}")
    if images.dtype != torch.uint8 and not images.is_floating_point():
        raise TypeError(f"images must be uint8 or float, got {images.dtype}")
    hw = _size(size)
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
    if not isinstance(grayscale, bool):
        raise TypeError(f"grayscale must be a bool, got {type(grayscale).__name__}")
    out = images
    if subset is not None:
        if isinstance(subset, bool) or not isinstance(subset, numbers.Integral) or subset < 1:
            raise ValueError(f"subset must be a positive int, got {subset!r}")
        if subset > images.shape[0]:
            raise ValueError(f"subset={subset} exceeds the {images.shape[0]} images")
        if seed is None:
            out = out[: int(subset)]
        else:
            pick = torch.randperm(images.shape[0], generator=torch.Generator().manual_seed(int(seed)))[: int(subset)]
            out = out[pick.sort().values]
    elif seed is not None:
        raise ValueError("seed chooses a random subset: give subset= as well")
    if grayscale and out.shape[1] != 1:
        if out.shape[1] != 3:
            raise ValueError(f"grayscale needs RGB (3) or 1 channel images, got {out.shape[1]} channels")
        if out.dtype == torch.uint8:
            # Pillow's L = (R*19595 + G*38470 + B*7471 + 0x8000) >> 16 (ITU-R 601, fixed point)
            w = out.to(torch.int32)
            out = ((w[:, 0] * 19595 + w[:, 1] * 38470 + w[:, 2] * 7471 + 0x8000) >> 16).to(torch.uint8)[:, None]
        else:
            wts = torch.tensor([0.299, 0.587, 0.114], dtype=torch.float64, device=out.device)
            out = (out.to(torch.float64) * wts[:, None, None]).sum(1, keepdim=True).to(images.dtype)
    if hw is not None and tuple(out.shape[2:]) != hw:
        f = out.to(torch.float64)
        kw = {} if mode in ("area", "nearest") else {"align_corners": False, "antialias": hw[0] < f.shape[2] or hw[1] < f.shape[3]}
        if mode == "nearest":
            r = torch.nn.functional.interpolate(f, size=hw, mode="nearest-exact")
        else:
            r = torch.nn.functional.interpolate(f, size=hw, mode=mode, **kw)
        if out.dtype == torch.uint8:
            out = r.round().clamp(0, 255).to(torch.uint8)
        else:
            out = r.clamp(-1.0, 1.0).to(out.dtype)
    return out


def torchvision_dataset(name: str, root: Union[str, os.PathLike], *, train: bool = True, split: Optional[str] = None):
    """``torchvision.datasets.<Name>(root, ..., download=False)``: a dataset already on disk, as
    a source for :func:`~analytic_diffusion.data.load_images` (items ``(PIL image, label)``).

    Args:
        name: a key of :data:`TORCHVISION_NAMES` (``"cifar10"``, ``"mnist"``,
            ``"fashion_mnist"``, ``"celeba"``, ...; ``"CIFAR-10"`` spellings accepted) or a
            ``torchvision.datasets`` class name.
        root: the folder the dataset was downloaded to (what ``root=`` was then).
        train: the training split (``train=True``) or the test split, for the datasets
            that take ``train=``; ``split``: for those that take ``split=`` (CelebA, SVHN,
            STL10), e.g. ``"train"``, ``"test"``, ``"valid"`` (default ``"train"`` / ``"test"``
            from ``train``).

    Nothing is downloaded. Note that torchvision's CIFAR readers unpickle their own files
    (this library never unpickles anything itself): use only copies you downloaded.
    Raises ImportError (torchvision missing), FileNotFoundError (not under ``root``).
    """
    try:
        import torchvision.datasets as tvd
    except ImportError as e:
        raise ImportError(f"torchvision_dataset needs torchvision (pip install torchvision): {e}") from None
    if not isinstance(name, str) or not name:
        raise TypeError(f"name must be a dataset name such as 'cifar10', got {name!r}")
    key = name.strip().lower().replace("-", "_")
    key = {"cifar_10": "cifar10", "cifar_100": "cifar100", "fashionmnist": "fashion_mnist"}.get(key, key)
    cls_name = TORCHVISION_NAMES.get(key, name)
    cls = getattr(tvd, cls_name, None)
    if cls is None or not isinstance(cls, type):
        raise ValueError(f"unknown torchvision dataset {name!r}; known: {', '.join(sorted(TORCHVISION_NAMES))} or a torchvision.datasets class name")
    path = Path(root)
    if not path.is_dir():
        raise FileNotFoundError(2, f"root of the torchvision dataset {cls_name} is not a folder", str(path))
    import inspect

    try:
        params = inspect.signature(cls.__init__).parameters
    except (TypeError, ValueError):
        params = {}
    kw = {"download": False}
    if "split" in params:
        kw["split"] = split if split is not None else ("train" if train else "test")
    elif split is not None:
        raise ValueError(f"torchvision's {cls_name} takes train=, not split=")
    elif "train" in params:
        kw["train"] = bool(train)
    try:
        return cls(str(path), **kw)
    except RuntimeError as e:  # torchvision: "Dataset not found or corrupted. You can use download=True ..."
        raise FileNotFoundError(2, f"torchvision's {cls_name} is not under {str(path)!r} (nothing is downloaded here; "
                                f"download it once with torchvision, download=True): {e}", str(path)) from None
