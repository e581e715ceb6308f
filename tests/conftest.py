import pytest
import torch

import analytic_diffusion as ad


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
