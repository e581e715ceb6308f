"""Streaming drivers shared by the moments ops: batches from any source, and GPU prefetch."""
from __future__ import annotations

from typing import Iterable, Iterator

import torch


def batches(data, batch_size: int, progress: bool, desc: str, start: int = 0) -> Iterable[torch.Tensor]:
    from .. import data as _data

    return _data.iter_batches(data, batch_size, start=start, progress=progress, desc=desc)


def prefetch(batches: Iterable[torch.Tensor], device: torch.device) -> Iterator[torch.Tensor]:
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
