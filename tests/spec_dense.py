"""Plain dense float64 transcriptions of SPEC, shared by the tests (slow, literal, obviously right)."""
import math

import torch


def dense_locality(x, train_f, M, ab, tau=1.0):
    """SPEC 5 transcribed literally: the full [B, N, n] softmax, float64."""
    a, s2 = math.sqrt(ab), 1.0 - ab
    diff2 = (x[:, None, :] - a * train_f[None]) ** 2  # [B, N, n]
    d = torch.einsum("bkj,jm->bkm", diff2, M.double())
    w = torch.softmax(-d / (2 * s2 * tau), dim=1)
    return torch.einsum("bkm,km->bm", w, train_f)


def unit(u):
    return (u.double() - 127.5) / 127.5 if u.dtype == torch.uint8 else u.double()


def noisy_queries(clean_u8, ab, seed=0, dtype=torch.float64):
    """x_t = a*x0 + sqrt(1-ab)*eps from held-out clean images (the sharp-softmax regime at low noise)."""
    g = torch.Generator().manual_seed(seed)
    x0 = unit(clean_u8)
    eps = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    return (math.sqrt(ab) * x0 + math.sqrt(1 - ab) * eps).to(dtype)
