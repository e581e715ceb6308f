"""The denoiser interface ``den(x_t, t) -> x0_hat`` and the training-set holder.

``x_t``: float32/float64 ``[B, C, H, W]`` (or ``[B, n]``); ``t``: an integer
timestep of the 1000-step linear schedule (int or 0-d tensor). The output has
x_t's shape and dtype.
"""
from __future__ import annotations

import copy
from typing import Dict, Optional

import torch

from .. import registry
from .._validate import check_queries, check_train
from ..ops import all_reduce_state
from ..schedule import alpha_bar_at, check_alphas_cumprod, timestep_to_int


def as_train(train) -> torch.Tensor:
    if not isinstance(train, torch.Tensor):
        from ..data import load_images

        train = load_images(train)
    return check_train(train)


class Denoiser:
    """Base class: validates ``x_t`` and ``t``, maps ``t`` to ``alpha_bar``."""

    name = "denoiser"

    def __init__(self, alphas_cumprod: Optional[torch.Tensor] = None):
        # default: the linear schedule; a given one must be 1-D, finite, in (0, 1], non-increasing
        self.alphas_cumprod = check_alphas_cumprod(alphas_cumprod)

    def alpha_bar(self, t) -> float:
        return alpha_bar_at(t, self.alphas_cumprod)

    def with_schedule(self, alphas_cumprod) -> "Denoiser":
        """This denoiser reading timesteps on another schedule ``alphas_cumprod`` (float
        ``[T]``): a shallow copy that shares the training data, filters and per-device
        copies, with its per-timestep caches (e.g. locality masks) fresh. The original is
        unchanged. ``DiffusersModelAdapter`` uses it to pass a scheduler's schedule on."""
        other = copy.copy(self)
        other.alphas_cumprod = check_alphas_cumprod(alphas_cumprod)
        other._reset_timestep_caches()
        return other

    def _reset_timestep_caches(self) -> None:
        """Forget anything cached per timestep (subclasses that cache by ``t`` override)."""

    def __call__(self, x_t, t) -> torch.Tensor:
        t = timestep_to_int(t, self.alphas_cumprod.shape[0])
        x = check_queries(x_t, "x_t")
        return self.denoise(x, t, self.alpha_bar(t))

    def denoise(self, x: torch.Tensor, t: int, alpha_bar: float) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError


class TrainSetDenoiser(Denoiser):
    """Holds a training set (validated once) and a copy per device it is used on."""

    def __init__(self, train, *, backend: Optional[str] = None, alphas_cumprod=None, process_group=None):
        super().__init__(alphas_cumprod)
        self.train = as_train(train)
        self.backend = backend
        self.process_group = process_group
        self._on_device: Dict[torch.device, torch.Tensor] = {self.train.device: self.train}

    @property
    def sharded(self) -> bool:
        """True when ``train`` is this rank's shard and results are merged across ranks."""
        return self.process_group is not None

    def _merged(self, state) -> torch.Tensor:
        # Each rank holds a shard of the training set: the softmax states of the shards
        # merge exactly (docs/algorithms.md §5.3), so every rank returns the full-dataset result.
        group = None if self.process_group is True else self.process_group
        return all_reduce_state(state, group).result()

    @property
    def image_shape(self):
        return tuple(self.train.shape[1:])

    def _train_for(self, x: torch.Tensor) -> torch.Tensor:
        if x[0].numel() != self.train[0].numel() or (x.dim() == 4 and self.train.dim() == 4 and x.shape[1:] != self.train.shape[1:]):
            raise ValueError(f"x_t has image shape {tuple(x.shape[1:])}, but the training images are {tuple(self.train.shape[1:])}")
        if x.device not in self._on_device:
            self._on_device[x.device] = self.train.to(x.device)
        return self._on_device[x.device]

    def _impl(self, op: str, x: torch.Tensor):
        return registry.select(op, x.device, self.backend).fn
