import math

import pytest
import torch

import analytic_diffusion as ad


def dense_locality(x, train_f, M, ab, tau=1.0):
    """SPEC 5 transcribed literally: the full [B, N, n] softmax, float64."""
    a, s2 = math.sqrt(ab), 1.0 - ab
    diff2 = (x[:, None, :] - a * train_f[None]) ** 2  # [B, N, n]
    d = torch.einsum("bkj,jm->bkm", diff2, M.double())
    w = torch.softmax(-d / (2 * s2 * tau), dim=1)
    return torch.einsum("bkm,km->bm", w, train_f)


def unit(u):
    return u.double() / 127.5 - 1.0 if u.dtype == torch.uint8 else u.double()


@pytest.fixture(scope="session")
def crops():
    """Real natural-image data: 16x16 colour crops, uint8 [240, 3, 16, 16]."""
    return ad.data.natural_crops(240, size=16, seed=1)


@pytest.fixture(scope="session")
def crop_moments():
    """Moments of 3000 other crops: enough images for a full-rank covariance, so masks
    are local at low noise and global at high noise, as on real datasets."""
    return ad.estimate_moments(ad.data.natural_crops(3000, size=16, seed=2))


@pytest.fixture(scope="session")
def crop_filter(crop_moments):
    return ad.WienerFilter(crop_moments)


def noisy_queries(clean_u8, ab, seed=0, dtype=torch.float64):
    """x_t = a*x0 + sqrt(1-ab)*eps from held-out clean images (the sharp-softmax regime at low noise)."""
    g = torch.Generator().manual_seed(seed)
    x0 = unit(clean_u8)
    eps = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    return (math.sqrt(ab) * x0 + math.sqrt(1 - ab) * eps).to(dtype)
