"""The streaming driver shared by ``estimate_patch_moments`` and ``estimate_stationary_moments``:
batches from any source, ``num_workers``, GPU prefetch, checkpoint/resume (the design of
``estimate_moments``, for accumulators that count images in ``.images``)."""
from __future__ import annotations

import os
from typing import Callable, Optional

import torch

from .. import streaming


def check_stream_args(batch_size, checkpoint_every, num_workers) -> None:
    if isinstance(batch_size, bool) or int(batch_size) != batch_size or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if isinstance(checkpoint_every, bool) or int(checkpoint_every) != checkpoint_every or checkpoint_every < 1:
        raise ValueError(f"checkpoint_every must be a positive integer, got {checkpoint_every!r}")
    if isinstance(num_workers, bool) or int(num_workers) != num_workers or num_workers < 0:
        raise ValueError(f"num_workers must be an integer >= 0, got {num_workers!r}")


def drive(
    data,
    make: Callable[[torch.Tensor, Optional[torch.device]], object],
    load: Callable[[str], object],
    *,
    batch_size: int,
    device,
    progress: bool,
    num_workers: int,
    checkpoint,
    checkpoint_every: int,
    desc: str,
):
    """Stream ``data`` into an accumulator made by ``make(first_batch, device)`` (or resumed
    with ``load(checkpoint)``); returns it. The accumulator has ``update``, ``save`` and
    ``images`` (images accumulated so far, the resume position)."""
    check_stream_args(batch_size, checkpoint_every, num_workers)
    acc = None
    if checkpoint is not None and os.path.exists(checkpoint):
        acc = load(os.fspath(checkpoint))
    start = acc.images if acc is not None else 0
    source = data
    if num_workers and isinstance(data, torch.utils.data.Dataset) and not isinstance(data, torch.utils.data.IterableDataset):
        # Resume by index so the workers never read the images the checkpoint holds.
        if start:
            data = torch.utils.data.Subset(data, range(min(start, len(data)), len(data)))
            if len(data) == 0:
                return acc
        source = torch.utils.data.DataLoader(data, batch_size=int(batch_size), num_workers=int(num_workers), pin_memory=torch.cuda.is_available())
        start = 0
    batches = streaming.batches(source, int(batch_size), progress, desc, start)
    dev = None if device is None else torch.device(device)
    since = 0
    for batch in streaming.prefetch(batches, dev) if dev is not None else batches:
        if batch.dim() != 4:
            raise ValueError(f"{desc} need images [N, C, H, W], got batches of shape {tuple(batch.shape)}")
        if acc is None:
            acc = make(batch, dev)
        acc.update(batch)
        since += 1
        if checkpoint is not None and since >= checkpoint_every:
            acc.save(checkpoint)
            since = 0
    if acc is None or acc.images == 0:
        raise ValueError(f"data is an empty dataset: no images to estimate {desc} from")
    if checkpoint is not None:
        acc.save(checkpoint)
    return acc
