"""locality_denoise (docs/algorithms.md §5), optimal and nearest (docs/algorithms.md §6): every backend against the
float64 transcription of docs/algorithms.md, on random data and real crops, at several noise levels."""
import math

import pytest
import torch

import analytic_diffusion as ad
from analytic_diffusion.ops import merge_states

from spec_dense import dense_locality, noisy_queries, unit

TIMESTEPS = [999, 500, 100, 10]  # down to the low-noise end where the softmax is sharp
BACKENDS = ad.available_backends("locality_denoise", "cpu")


def ab_of(t):
    return ad.alpha_bar_at(t)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("t", TIMESTEPS)
def test_matches_spec_on_real_crops(backend, t, crops, crop_filter):
    train, held_out = crops[:200], crops[200:206]
    ab = ab_of(t)
    x = noisy_queries(held_out, ab, seed=t).reshape(6, -1)
    M = ad.locality_mask(crop_filter, ab, threshold=0.02)
    out = ad.ops.locality_denoise(x, train, M, ab, backend=backend, chunk_size=64)
    ref = dense_locality(x, unit(train).reshape(200, -1), M, ab)
    assert out.dtype == torch.float64 and out.shape == x.shape
    assert torch.isfinite(out).all()
    assert (out - ref).abs().max().item() < 1e-10


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("t", [900, 300, 20])
def test_matches_spec_on_random_data_float32(backend, t):
    g = torch.Generator().manual_seed(t)
    N, C, H, W = 37, 2, 5, 3  # odd sizes
    n = C * H * W
    train = torch.rand(N, C, H, W, generator=g, dtype=torch.float64) * 2 - 1
    x = torch.randn(4, C, H, W, generator=g, dtype=torch.float64)
    M = torch.rand(n, n, generator=g) < 0.4
    M |= torch.eye(n, dtype=torch.bool)
    ab = ab_of(t)
    ref = dense_locality(x.reshape(4, -1), train.reshape(N, -1), M, ab).reshape(x.shape)
    out64 = ad.ops.locality_denoise(x, train, M, ab, backend=backend, chunk_size=8)
    assert (out64 - ref).abs().max().item() < 1e-10
    out32 = ad.ops.locality_denoise(x.float(), train.float(), M, ab, backend=backend)
    assert out32.dtype == torch.float32 and out32.shape == x.shape
    assert (out32.double() - ref).abs().max().item() < 1e-4


@pytest.mark.parametrize("backend", BACKENDS)
def test_exact_mode_invariant_to_chunking_and_order(backend, crops, crop_filter):
    train = crops[:150]
    ab = ab_of(50)
    x = noisy_queries(crops[200:203], ab).reshape(3, -1)
    M = ad.locality_mask(crop_filter, ab)
    base = ad.ops.locality_denoise(x, train, M, ab, backend=backend, chunk_size=150)
    perm = torch.randperm(150, generator=torch.Generator().manual_seed(0))
    for cs in (1, 7, 64, 1000):
        out = ad.ops.locality_denoise(x, train[perm], M, ab, chunk_size=cs, backend=backend)
        assert (out - base).abs().max().item() < 1e-12


@pytest.mark.parametrize("backend", BACKENDS)
def test_wssm_is_mean_of_chunk_softmaxes(backend):
    g = torch.Generator().manual_seed(3)
    N, n = 23, 12
    train = torch.randint(0, 256, (N, n), generator=g, dtype=torch.uint8)
    x = torch.randn(3, n, generator=g, dtype=torch.float64)
    M = torch.rand(n, n, generator=g) < 0.5
    ab, cs = 0.3, 10
    y = unit(train)
    num = torch.zeros(3, n, dtype=torch.float64)
    den = torch.zeros(3, n, dtype=torch.float64)
    for k0 in range(0, N, cs):  # chunks of 10, 10, 3
        yc = y[k0 : k0 + cs]
        d = torch.einsum("bkj,jm->bkm", (x[:, None] - math.sqrt(ab) * yc) ** 2, M.double())
        w = torch.softmax(-d / (2 * (1 - ab)), dim=1)
        num += torch.einsum("bkm,km->bm", w, yc)
        den += w.sum(1)
    expect = num / (den + 1e-8)
    out = ad.ops.locality_denoise(x, train, M, ab, softmax="wssm", chunk_size=cs, backend=backend)
    assert (out - expect).abs().max().item() < 1e-12
    # and it genuinely differs from the exact softmax (the reason the exact mode exists)
    exact = ad.ops.locality_denoise(x, train, M, ab, backend=backend)
    assert (out - exact).abs().max().item() > 1e-3


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_ones_mask_is_optimal_denoiser(backend, crops):
    train = crops[:100]
    n = train[0].numel()
    for t in (900, 100, 10):
        ab = ab_of(t)
        x = noisy_queries(crops[200:204], ab, seed=t)
        loc = ad.ops.locality_denoise(x, train, torch.ones(n, n, dtype=torch.bool), ab, backend=backend)
        opt = ad.ops.optimal_denoise(x, train, ab)
        assert (loc - opt).abs().max().item() < 1e-10


@pytest.mark.parametrize("backend", BACKENDS)
def test_sharded_states_merge_to_one_pass(backend, crops, crop_filter):
    train = crops[:120]
    ab = ab_of(30)
    x = noisy_queries(crops[200:204], ab).reshape(4, -1)
    M = ad.locality_mask(crop_filter, ab)
    full = ad.ops.locality_denoise(x, train, M, ab, backend=backend)
    states = [ad.ops.locality_denoise(x, s, M, ab, return_state=True, backend=backend) for s in (train[:50], train[50:51], train[51:])]
    assert states[0].mx.shape == (4, x.shape[1])
    merged = merge_states(*states).result()
    assert (merged - full).abs().max().item() < 1e-12
    opt_states = [ad.ops.optimal_denoise(x, s, ab, return_state=True) for s in (train[:70], train[70:])]
    assert (merge_states(*opt_states).result() - ad.ops.optimal_denoise(x, train, ab)).abs().max().item() < 1e-12


def test_real_valued_mask_threshold_zero(crops, crop_filter):
    ab = ab_of(200)
    Mt = ad.locality_mask(crop_filter, ab, threshold=0.0)
    assert Mt.dtype == torch.float64
    x = noisy_queries(crops[200:202], ab).reshape(2, -1)
    train = crops[:60]
    out = ad.ops.locality_denoise(x, train, Mt, ab)
    ref = dense_locality(x, unit(train).reshape(60, -1), Mt, ab)
    assert (out - ref).abs().max().item() < 1e-10


@pytest.mark.parametrize("backend", BACKENDS)
def test_uint8_and_float_training_sets_agree_and_non_contiguous(backend, crops, crop_filter):
    ab = ab_of(100)
    train_u8 = crops[:80]
    train_f = (train_u8.double() / 127.5 - 1).permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)  # channels-last view
    assert not train_f.is_contiguous()
    x = noisy_queries(crops[200:203], ab).transpose(2, 3).contiguous().transpose(2, 3)
    assert not x.is_contiguous()
    M = ad.locality_mask(crop_filter, ab)
    a = ad.ops.locality_denoise(x, train_u8, M, ab, backend=backend)
    b = ad.ops.locality_denoise(x, train_f, M, ab, backend=backend)
    assert (a - b).abs().max().item() < 1e-12
    x_strided = torch.zeros(6, *x.shape[1:], dtype=x.dtype)[::2]
    x_strided.copy_(x)
    assert not x_strided.is_contiguous()
    c = ad.ops.locality_denoise(x_strided, train_u8, M, ab, backend=backend)
    assert (a - c).abs().max().item() == 0


def test_inputs_not_modified(crops, crop_filter):
    ab = ab_of(100)
    x = noisy_queries(crops[200:202], ab)
    train, M = crops[:40].clone(), ad.locality_mask(crop_filter, ab)
    x0, t0, M0 = x.clone(), train.clone(), M.clone()
    ad.ops.locality_denoise(x, train, M, ab)
    ad.ops.optimal_denoise(x, train, ab)
    ad.ops.nearest_denoise(x, train, ab)
    assert torch.equal(x, x0) and torch.equal(train, t0) and torch.equal(M, M0)


def test_optimal_and_nearest_match_spec(crops):
    train = crops[:90]
    y = unit(train).reshape(90, -1)
    for t in (800, 50, 5):
        ab = ab_of(t)
        x = noisy_queries(crops[200:205], ab, seed=t).reshape(5, -1)
        d = ((x[:, None] - math.sqrt(ab) * y) ** 2).sum(-1)
        w = torch.softmax(-d / (2 * (1 - ab)), dim=1)
        assert (ad.ops.optimal_denoise(x, train, ab, chunk_size=13) - w @ y).abs().max().item() < 1e-10
        assert torch.equal(ad.ops.nearest_denoise(x, train, ab, chunk_size=13), y[d.argmin(1)])


def test_temperature_flattens_softmax(crops):
    train = crops[:50]
    ab = ab_of(50)
    x = noisy_queries(crops[200:201], ab)
    sharp = ad.ops.optimal_denoise(x, train, ab, temperature=1.0)
    flat = ad.ops.optimal_denoise(x, train, ab, temperature=1e9)
    assert (flat - unit(train).mean(0, keepdim=True)).abs().max().item() < 1e-3
    assert (sharp - flat).abs().max().item() > 0.1


@pytest.mark.parametrize(
    "kwargs, err, match",
    [
        (dict(x=torch.zeros(2, 12, dtype=torch.int32)), TypeError, "x must be float32 or float64"),
        (dict(x=torch.zeros(2, 3, 12)), ValueError, r"x must be \[B, n\]"),
        (dict(x=torch.full((2, 12), float("nan"))), ValueError, "x contains"),
        (dict(train=torch.zeros(0, 12, dtype=torch.uint8)), ValueError, "empty dataset"),
        (dict(train=torch.zeros(5, 13, dtype=torch.uint8)), ValueError, "train images have 13 values"),
        (dict(train=torch.zeros(5, 12, dtype=torch.int16)), TypeError, "train must be uint8"),
        (dict(mask=torch.ones(12, 11, dtype=torch.bool)), ValueError, r"mask must be \[n, n\]"),
        (dict(mask=torch.ones(12, 12, dtype=torch.int64)), TypeError, "mask must be bool"),
        (dict(alpha_bar=1.0), ValueError, "alpha_bar must be in"),
        (dict(alpha_bar=-0.1), ValueError, "alpha_bar must be in"),
        (dict(temperature=0.0), ValueError, "temperature must be"),
        (dict(softmax="topk"), ValueError, "softmax must be one of"),
        (dict(chunk_size=0), ValueError, "chunk_size must be"),
        (dict(backend="nonexistent"), ValueError, "has no backend 'nonexistent'"),
        (dict(softmax="wssm", return_state=True), ValueError, "return_state=True needs"),
    ],
)
def test_bad_inputs_raise_clear_errors(kwargs, err, match):
    args = dict(x=torch.zeros(2, 12), train=torch.zeros(5, 12, dtype=torch.uint8), mask=torch.ones(12, 12, dtype=torch.bool), alpha_bar=0.5)
    args.update(kwargs)
    with pytest.raises(err, match=match):
        ad.ops.locality_denoise(**args)


def test_image_shape_mismatch_is_reported():
    with pytest.raises(ValueError, match="image shape"):
        ad.ops.optimal_denoise(torch.zeros(1, 3, 4, 2), torch.zeros(3, 3, 2, 4, dtype=torch.uint8), 0.5)
