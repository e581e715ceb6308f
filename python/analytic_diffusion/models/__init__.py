"""Small trained networks to compare the analytical denoisers with (pure PyTorch).

Used by the analysis and the command line (``analytic-diffusion reproduce``), never by the
ops, filters or denoisers. :mod:`.unet`: :class:`SmallUNet` (epsilon prediction),
:func:`train_unet`, :func:`save_unet` / :func:`load_unet` (safetensors, no pickles).
"""
from __future__ import annotations

from .unet import SmallUNet, load_unet, save_unet, timestep_embedding, train_unet

__all__ = ["SmallUNet", "load_unet", "save_unet", "timestep_embedding", "train_unet"]
