"""The ``moments`` op: streaming, mergeable dataset mean and covariance (docs/algorithms.md §2).

uint8 data is accumulated as exact integer sums (``sum u`` and ``sum u u^T``), so
the result is independent of batch size, order and sharding. Float data is
accumulated in float64 around a shift (the first batch's mean), so
``E[xx^T] - mean mean^T`` never cancels catastrophically.

All moments are reported in the [-1, 1] value convention (uint8 ``u`` maps to
``u / 127.5 - 1``).
"""
from __future__ import annotations

import os
from typing import Optional, Union

import torch

from .. import streaming
from .accumulator import MomentAccumulator
from .stats import CONVENTION, FORMAT, Moments

__all__ = ["CONVENTION", "FORMAT", "MomentAccumulator", "Moments", "estimate_moments"]


def estimate_moments(
    data,
    *,
    batch_size: int = 256,
    device=None,
    backend: Optional[str] = None,
    progress: bool = False,
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
    batches = streaming.batches(source, int(batch_size), progress, "moments", start)
    dev = None if device is None else torch.device(device)
    since = 0
    for batch in streaming.prefetch(batches, dev) if dev is not None else batches:
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


# The backends register where they are defined; importing them here makes them visible.
from . import reference as _reference_backend  # noqa: E402,F401
from . import cpu as _cpu_backend  # noqa: E402,F401
from . import cuda as _cuda_backend  # noqa: E402,F401
from . import triton as _triton_backend  # noqa: E402,F401
