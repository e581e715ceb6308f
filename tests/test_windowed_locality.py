"""windowed_locality_denoise (docs/algorithms.md §9) against a dense float64 transcription:
the dense mask built from the window by loops, then docs/algorithms.md §5 literally."""
import math

import pytest
import torch

import analytic_diffusion as ad
from analytic_diffusion.ops import merge_states, windowed_locality_denoise, windowed_locality_denoise_reference
from spec_dense import dense_locality, dense_window_mask, noisy_queries, unit

STEPS = [900, 500, 200, 50, 20, 10, 0]  # down to the sharp low-noise end


def rel(out, ref):
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def random_window(C, k, density, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.rand(C, C, k, k, generator=g) < density
    w[torch.arange(C), torch.arange(C), k // 2, k // 2] = True  # every pixel sees itself
    return w


@pytest.fixture(scope="module")
def data():
    crops = ad.data.natural_crops(90, size=8, seed=5)  # real images: uint8 [90, 3, 8, 8]
    return crops[:80], crops[80:]


@pytest.mark.parametrize("t", STEPS)
def test_reference_matches_dense_transcription_on_real_crops(data, t):
    train, held = data
    ab = ad.alpha_bar_at(t)
    window = random_window(3, 5, 0.5, seed=t)
    x = noisy_queries(held[:3], ab, seed=t)
    M = dense_window_mask(window, 8, 8)
    want = dense_locality(x.reshape(3, -1), unit(train).reshape(80, -1), M, ab)
    got = windowed_locality_denoise(x, train, window, ab, backend="reference")
    assert got.shape == x.shape and got.dtype == torch.float64
    assert rel(got.reshape(3, -1), want) < 1e-10


def test_reference_border_cut_and_large_windows(data):
    # k = 2H - 1: every pixel reaches every other, and most of each window is outside the image
    train, held = data
    ab = ad.alpha_bar_at(300)
    x = noisy_queries(held[:2], ab, seed=1)
    for window in (torch.ones(3, 3, 15, 15, dtype=torch.bool), random_window(3, 15, 0.3, seed=2)):
        want = dense_locality(x.reshape(2, -1), unit(train).reshape(80, -1), dense_window_mask(window, 8, 8), ab)
        assert rel(windowed_locality_denoise(x, train, window, ab).reshape(2, -1), want) < 1e-10
    # the full window at k = 2H - 1 is the optimal denoiser
    full = torch.ones(3, 3, 15, 15, dtype=torch.bool)
    opt = ad.ops.optimal_denoise(x, train, ab, backend="reference")
    assert rel(windowed_locality_denoise(x, train, full, ab), opt) < 1e-10


def test_float_train_wssm_and_states(data):
    train, held = data
    ab = ad.alpha_bar_at(100)
    window = random_window(3, 3, 0.6, seed=9)
    x = noisy_queries(held[:4], ab, seed=3)
    trf = unit(train)
    a = windowed_locality_denoise(x, train, window, ab)
    assert rel(windowed_locality_denoise(x, trf, window, ab), a) < 1e-12
    # the state of two shards merges to the whole
    s1 = windowed_locality_denoise(x, train[:37], window, ab, return_state=True)
    s2 = windowed_locality_denoise(x, train[37:], window, ab, return_state=True)
    assert s1.mx.dtype == torch.float64 and s1.acc.shape == (4, 192)
    assert rel(merge_states(s2, s1).result(), a.reshape(4, -1)) < 1e-12
    # WSSM: the mean of per-chunk softmax means, like the dense reference op with the dense mask
    M = dense_window_mask(window, 8, 8)
    want = ad.ops.locality_denoise(x, train, M, ab, softmax="wssm", chunk_size=16, backend="reference")
    got = windowed_locality_denoise(x, train, window, ab, softmax="wssm", chunk_size=16)
    assert rel(got, want) < 1e-10


def test_bad_input_is_refused_with_the_argument_named(data):
    train, held = data
    x = noisy_queries(held[:1], 0.5).float()
    good = torch.ones(3, 3, 3, 3, dtype=torch.bool)
    with pytest.raises(TypeError, match="window must be a bool"):
        windowed_locality_denoise(x, train, good.float(), 0.5)
    with pytest.raises(ValueError, match=r"window must be \[C, C, k, k\]"):
        windowed_locality_denoise(x, train, torch.ones(3, 3, 3, dtype=torch.bool), 0.5)
    with pytest.raises(ValueError, match=r"window must be \[C, C, k, k\]"):
        windowed_locality_denoise(x, train, torch.ones(1, 3, 3, 3, dtype=torch.bool), 0.5)
    with pytest.raises(ValueError, match="odd size"):
        windowed_locality_denoise(x, train, torch.ones(3, 3, 4, 4, dtype=torch.bool), 0.5)
    with pytest.raises(ValueError, match="larger than"):
        windowed_locality_denoise(x, train, torch.ones(3, 3, 17, 17, dtype=torch.bool), 0.5)
    with pytest.raises(ValueError, match="x must be images"):
        windowed_locality_denoise(x.reshape(1, -1), train, good, 0.5)
    with pytest.raises(ValueError, match="train"):
        windowed_locality_denoise(x, train[:, :2], good, 0.5)
    with pytest.raises(ValueError, match="softmax"):
        windowed_locality_denoise(x, train, good, 0.5, softmax="fast")
    before = (x.clone(), train.clone(), good.clone())
    windowed_locality_denoise(x, train, good, 0.5)
    assert all(torch.equal(u, v) for u, v in zip(before, (x, train, good)))  # nothing modified


_MEMORY_SCRIPT = """
import resource, torch
import analytic_diffusion as ad
train = ad.data.natural_crops(200, size=128, seed=0)       # uint8 [200, 3, 128, 128]
pm = ad.estimate_patch_moments(train[:16], 9)               # stationary statistics, small n^0 object
den = ad.LocalityDenoiser(train, moments=pm)
x = torch.randn(4, 3, 128, 128, generator=torch.Generator().manual_seed(0))
out = den(x, 300)
assert out.shape == x.shape and bool(torch.isfinite(out).all())
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
"""


@pytest.mark.slow
def test_windowed_step_at_128px_stays_under_1gb():
    # The dense-mask path needed 12.8 GB here (the n x n bool mask alone is 2.4 GB): the
    # windowed path holds O(B*n + N*n) memory. Measured as the whole process's peak RSS.
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "-c", _MEMORY_SCRIPT], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    peak = int(res.stdout.strip().splitlines()[-1])
    assert peak < 1 << 30, f"peak resident memory {peak / 2**30:.2f} GiB"
