"""PSPC-square (Niedoba et al.; docs/algorithms.md §13): the patch-set posterior composite
with square windows, as a :class:`Denoiser`."""
from __future__ import annotations

from typing import Dict, Mapping, Optional, Union

import torch

from .._validate import check_chunk_size, check_positive
from ..ops.patch_posterior import check_patch_size
from ..presets import published
from ..schedule import default_alphas_cumprod, timestep_to_int
from .base import TrainSetDenoiser


def edm_sigmas(n_steps: int, sigma_min: float, sigma_max: float, rho: float) -> torch.Tensor:
    """The EDM grid of the published code (pspc/utils.py ``edm_t_schedule``), float64,
    descending: ``(s_max^(1/rho) + i/(n-1) * (s_min^(1/rho) - s_max^(1/rho)))^rho``."""
    i = torch.arange(n_steps, dtype=torch.float64)
    return (sigma_max ** (1 / rho) + i / (n_steps - 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho


def pspc_schedule(name: str = "cifar10", alphas_cumprod: Optional[torch.Tensor] = None) -> Dict[int, int]:
    """A published PSPC-square patch-size schedule mapped to this library's timesteps:
    ``{t: P}`` for every t of the schedule. Each t takes the P of the EDM grid point whose
    sigma is nearest (``|sigma_grid - sigma_t|``, as the published ``patch_size_schedule``)
    to ``sigma_t = sqrt((1 - ab_t) / ab_t)`` (x_t / a = y + sigma_t * eps)."""
    if name not in published.PSPC_SQUARE:
        raise ValueError(f"patch_size preset must be one of {sorted(published.PSPC_SQUARE)}, got {name!r}")
    cfg = published.PSPC_SQUARE[name]
    g = cfg["edm_grid"]
    grid = edm_sigmas(g["n_steps"], g["sigma_min"], g["sigma_max"], g["rho"])
    sizes = cfg["patch_sizes"]
    ab = (default_alphas_cumprod() if alphas_cumprod is None else alphas_cumprod).double()
    sigma = torch.sqrt((1 - ab) / ab)
    nearest = (grid[None, :] - sigma[:, None]).abs().argmin(1)
    return {t: int(sizes[int(i)]) for t, i in enumerate(nearest)}


class PSPCSquareDenoiser(TrainSetDenoiser):
    """PSPC-square (docs/algorithms.md §13): for every P x P window position (no padding) the
    exact posterior mean of the query's patch over the N training patches at the same
    position; each pixel the average of the means of the windows covering it.

    ``train``: uint8 or float ``[N, C, H, W]``. ``patch_size``: an int P (every step), a
    mapping ``{timestep: P}`` (a timestep that is not a key takes the P of the nearest key),
    or a preset name (``"cifar10"``: the published 18-step EDM schedule, 32 down to 3, mapped
    to timesteps by nearest sigma, :func:`pspc_schedule`). Preset sizes larger than the
    image are clamped to ``min(H, W)`` (one window: the optimal denoiser); explicit sizes
    must fit. ``backend``: ``"boxsum"`` (default: all windows at once from integral images,
    float64) or ``"reference"`` (one window at a time). The published code also augments the
    training set with horizontal flips (``--xflip True``): pass
    ``torch.cat([train, train.flip(-1)])`` to match it.
    """

    name = "pspc_square"

    def __init__(
        self,
        train,
        patch_size: Union[int, Mapping[int, int], str],
        *,
        temperature: float = 1.0,
        chunk_size: int = 256,
        backend: Optional[str] = None,
        alphas_cumprod=None,
    ):
        super().__init__(train, backend=backend, alphas_cumprod=alphas_cumprod)
        if self.train.dim() != 4:
            raise ValueError(f"train must be [N, C, H, W] images for PSPC-square windows, got shape {tuple(self.train.shape)}")
        self.temperature = check_positive("temperature", temperature)
        self.chunk_size = check_chunk_size(chunk_size)
        H, W = self.train.shape[2], self.train.shape[3]
        T = self.alphas_cumprod.shape[0]
        if isinstance(patch_size, str):
            sched = pspc_schedule(patch_size, self.alphas_cumprod)
            self._schedule = {t: min(P, H, W) for t, P in sched.items()}
        elif isinstance(patch_size, Mapping):
            if not patch_size:
                raise ValueError("patch_size mapping is empty: give {timestep: P} entries")
            sched = {}
            for t, P in patch_size.items():
                tt = timestep_to_int(t, T)
                sched[tt] = check_patch_size(P, H, W, f"patch_size[{t}]")
            self._schedule = sched
        else:
            self._schedule = {None: check_patch_size(patch_size, H, W)}
        self.patch_size = patch_size

    def patch_size_at(self, t) -> int:
        """The window size P used at timestep ``t``."""
        if None in self._schedule:
            return self._schedule[None]
        t = timestep_to_int(t, self.alphas_cumprod.shape[0])
        if t in self._schedule:
            return self._schedule[t]
        key = min(self._schedule, key=lambda k: (abs(k - t), k))
        return self._schedule[key]

    def denoise(self, x, t, alpha_bar):
        train = self._train_for(x)
        shape = x.shape
        x4 = x.reshape(x.shape[0], *train.shape[1:])
        out = self._impl("patch_posterior_denoise", x)(x4, train, self.patch_size_at(t), alpha_bar, self.temperature, self.chunk_size)
        return out.reshape(shape)
