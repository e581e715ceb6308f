"""Datasets: small built-in image sets, and loaders for the user's own data.

Conventions (docs/algorithms.md §1): images are ``[N, C, H, W]``. uint8 images are
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
- :func:`to_uint8` - float in [-1, 1] -> uint8 (the inverse; clipped, rounded).
- :func:`preprocess` - a subset, grayscale, a resize (what the published codes do).
- :func:`torchvision_dataset` - a torchvision dataset already on disk (``download=False``).

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

Modules: ``bundled`` (the built-in sets), ``sources`` (one class per kind of
source, and the loaders), ``items`` (one batch or item to a tensor, with the dtype
and layout checks), ``convert`` (uint8 <-> [-1, 1]), ``transforms`` (preprocess, torchvision datasets).
"""
from __future__ import annotations

from .bundled import PHOTOS, faces, natural_crops
from .items import IMAGE_EXTENSIONS
from .convert import to_uint8, to_unit_range
from .sources import image_shape, iter_batches, load_images
from .transforms import TORCHVISION_NAMES, preprocess, torchvision_dataset

__all__ = [
    "PHOTOS",
    "IMAGE_EXTENSIONS",
    "natural_crops",
    "faces",
    "load_images",
    "iter_batches",
    "image_shape",
    "to_unit_range",
    "to_uint8",
    "preprocess",
    "torchvision_dataset",
    "TORCHVISION_NAMES",
]
