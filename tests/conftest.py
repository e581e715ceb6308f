import importlib.util
import os

import pytest
import torch

import analytic_diffusion as ad
from analytic_diffusion import registry

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def pytest_collection_modifyitems(config, items):
    """Tests marked ``triton_interpret`` run the Triton kernels in Triton's CPU interpreter.
    Triton reads TRITON_INTERPRET when a kernel is first built and the package registers the
    interpreter's CPU device at import, both before a test runs, so they need a process
    started with TRITON_INTERPRET=1: `.ci/run`'s interpreter step,
    ``TRITON_INTERPRET=1 python -m pytest -m triton_interpret tests``. Anywhere else they
    are deselected (counted as such in the summary), not skipped one by one."""
    if INTERPRET:
        if importlib.util.find_spec("triton") is None:
            skip = pytest.mark.skip(reason="triton is not installed")
            for item in items:
                if item.get_closest_marker("triton_interpret"):
                    item.add_marker(skip)
        return
    keep, drop = [], []
    for item in items:
        (drop if item.get_closest_marker("triton_interpret") else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


@pytest.fixture
def restore_registry():
    """Snapshot of the backend registry (registry._REGISTRY), restored after the test:
    for tests that register fake backends or ops."""
    saved = {op: dict(table) for op, table in registry._REGISTRY.items()}
    yield registry
    registry._REGISTRY.clear()
    registry._REGISTRY.update(saved)


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
