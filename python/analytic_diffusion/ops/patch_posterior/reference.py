"""Reference implementation of ``patch_posterior_denoise`` (PSPC-square, docs/algorithms.md §13):
pure PyTorch, float64-capable, literal.

For every P x P window position (top-left ``(i, j)`` in ``[0, H-P] x [0, W-P]``, no padding)
the posterior mean of the query's patch over the N training patches at the same position is
the optimal denoiser (§6) of the cropped vectors, computed here with the exact online softmax
of :func:`~analytic_diffusion.ops.optimal_denoise_reference` (chunked over N); each pixel's
output is the average of the means of the windows covering it. One window at a time, like
the published code (plai-group/pspc, ``PSPCDenoiser.forward``), but in the compute dtype and
with the exact softmax: slow, obviously right.

Backend signature (inputs validated by the public op): ``x`` float32/float64 ``[B, C, H, W]``;
``train`` uint8 or float in [-1, 1] ``[N, C, H, W]``; ``patch_size`` int in
``[1, min(H, W)]``; ``alpha_bar`` in (0, 1). Returns x's shape and dtype.
"""
from __future__ import annotations

import torch

from ..._validate import compute_dtype
from ..locality.reference import optimal_denoise_reference


def patch_posterior_denoise_reference(
    x: torch.Tensor,
    train: torch.Tensor,
    patch_size: int,
    alpha_bar: float,
    temperature: float = 1.0,
    chunk_size: int = 256,
) -> torch.Tensor:
    """§13: ``out[p] = mean over windows w covering p of E[y|_w | x|_w]``."""
    dt = compute_dtype(x)
    B, C, H, W = x.shape
    N = train.shape[0]
    P = int(patch_size)
    composite = torch.zeros(B, C, H, W, dtype=dt, device=x.device)
    count = torch.zeros(H, W, dtype=dt, device=x.device)
    for i in range(H - P + 1):
        for j in range(W - P + 1):
            xp = x[:, :, i : i + P, j : j + P].reshape(B, -1)
            yp = train[:, :, i : i + P, j : j + P].reshape(N, -1)
            mean = optimal_denoise_reference(xp, yp, alpha_bar, temperature, chunk_size)
            composite[:, :, i : i + P, j : j + P] += mean.to(dt).reshape(B, C, P, P)
            count[i : i + P, j : j + P] += 1
    return (composite / count).to(x.dtype)
