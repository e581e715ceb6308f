"""The CPU backend of nearest_denoise (csrc/cpu/nearest_denoise.cpp): against a float64
argmin on random and real data at every noise level, every training dtype, odd sizes, any
strides, ties (duplicate images -> the lowest index, whatever the thread count), both
distance kernels, and outputs poisoned with NaN so that an unwritten element fails."""
import math

import pytest
import torch

import analytic_diffusion as ad
from analytic_diffusion import _ext, registry
from analytic_diffusion.ops.nearest import cpu as nearest_cpu

from spec_dense import noisy_queries, unit

pytestmark = pytest.mark.skipif(not nearest_cpu.available(), reason="_C built without the nearest kernel")

C = _ext.cpu_module()
KIND = {torch.uint8: 0, torch.float32: 1, torch.float64: 2}


def dense_nearest(x, train, ab):
    """docs/algorithms.md §6 literally, float64: (index [B] (torch.argmin: the first minimum), distances [B, N])."""
    d = ((x.double()[:, None, :] - math.sqrt(ab) * unit(train)[None]) ** 2).sum(-1)
    return d.argmin(1), d


def raw(x, train, ab, *, force_portable=False, out_dtype=None):
    """The kernel without the Python glue, every output poisoned first: (out, index, dist)."""
    B, n = x.shape
    out_dtype = x.dtype if out_dtype is None else out_dtype
    out = torch.full((B, n), float("nan"), dtype=out_dtype)
    index = torch.full((B,), -7, dtype=torch.int64)
    dist = torch.full((B,), float("nan"), dtype=torch.float64)
    C.nearest_denoise_run(
        x.data_ptr(), B, n, x.stride(0), x.stride(1), x.dtype == torch.float64,
        train.data_ptr(), train.shape[0], train.stride(0), train.stride(1), KIND[train.dtype],
        math.sqrt(ab), out.data_ptr(), out_dtype == torch.float64, index.data_ptr(), dist.data_ptr(),
        force_portable,
    )
    return out, index, dist


def check(x, train, ab, **kw):
    """Runs the raw kernel and checks everything against the dense float64 argmin."""
    out, index, dist = raw(x, train, ab, **kw)
    k, d = dense_nearest(x, train, ab)
    assert torch.isfinite(out).all() and torch.isfinite(dist).all()
    assert torch.equal(index, k)
    assert torch.equal(out, unit(train)[k].to(out.dtype) if train.dtype != torch.uint8 else ref_rows(train, k, out.dtype))
    assert torch.allclose(dist, d.gather(1, k[:, None])[:, 0], rtol=1e-12, atol=1e-20)
    return index


def ref_rows(train_u8, k, dtype):
    """uint8 rows as the reference converts them (in the output's precision)."""
    return (train_u8[k].to(dtype) - 127.5) / 127.5


def random_train(N, n, dtype, g):
    if dtype == torch.uint8:
        return torch.randint(0, 256, (N, n), generator=g, dtype=torch.uint8)
    return (torch.rand(N, n, generator=g, dtype=torch.float64) * 2 - 1).to(dtype)


# ------------------------------------------------------------------------------ accuracy


@pytest.mark.parametrize("n, N, B", [(1, 1, 1), (1, 40, 3), (7, 9, 2), (33, 8, 5), (70, 17, 1), (300, 129, 4)])
@pytest.mark.parametrize("tdtype", [torch.uint8, torch.float32, torch.float64])
@pytest.mark.parametrize("xdtype", [torch.float32, torch.float64])
def test_random_data_matches_float64_argmin(n, N, B, tdtype, xdtype):
    g = torch.Generator().manual_seed(n * 1000 + N)
    train = random_train(N, n, tdtype, g)
    for ab in (0.02, 0.5, 0.9999):
        x = torch.randn(B, n, generator=g, dtype=torch.float64).to(xdtype)
        check(x, train, ab)


@pytest.mark.parametrize("t", [999, 900, 500, 100, 10, 0])
def test_real_crops_match_float64_reference(crops, t):
    """Noised held-out crops against 200 training crops, uint8 and float training sets, down
    to t = 0 (alpha_bar 0.9999: distances nearly equal to the clean ones)."""
    ab = ad.alpha_bar_at(t)
    train = crops[:200].reshape(200, -1)
    x = noisy_queries(crops[200:208], ab, seed=t).reshape(8, -1)
    for tr in (train, unit(train).float(), unit(train)):
        for xx in (x, x.float()):
            check(xx, tr, ab)
            out = ad.ops.nearest_denoise(xx, tr, ab, backend="cpu")
            ref = ad.ops.nearest_denoise_reference(xx.double(), tr, ab).to(xx.dtype)
            assert torch.equal(out, ref)


def test_noised_training_images_find_themselves(crops):
    train = crops[:200]
    ab = ad.alpha_bar_at(10)
    idx = torch.tensor([0, 7, 199, 63])
    x = noisy_queries(train[idx], ab, seed=3).float()
    out = ad.ops.nearest_denoise(x, train, ab, backend="cpu")
    assert torch.equal(out, ((train[idx].float() - 127.5) / 127.5))


def test_four_dimensional_inputs_and_half_training_data(crops):
    train = crops[:64]
    ab = ad.alpha_bar_at(300)
    x = noisy_queries(crops[200:203], ab).float()  # [3, 3, 16, 16]
    out = ad.ops.nearest_denoise(x, train, ab, backend="cpu")
    assert out.shape == x.shape and out.dtype == x.dtype
    assert torch.equal(out, ad.ops.nearest_denoise_reference(x.reshape(3, -1).double(), train.reshape(64, -1), ab).float().reshape(x.shape))
    half = unit(train).half()  # exact in float32: converted by the glue
    out_h = ad.ops.nearest_denoise(x, half, ab, backend="cpu")
    ref_h = ad.ops.nearest_denoise_reference(x.reshape(3, -1).double(), half.reshape(64, -1).float(), ab).float()
    assert torch.equal(out_h.reshape(3, -1), ref_h)


def test_output_dtype_differs_from_train_dtype():
    """float64 images into a float32 output are rounded; uint8 into either precision is the
    correctly rounded value of docs/algorithms.md §1.1 in that precision."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 50, generator=g, dtype=torch.float64)
    for tr in (random_train(20, 50, torch.float64, g), random_train(20, 50, torch.uint8, g)):
        for out_dtype in (torch.float32, torch.float64):
            check(x, tr, 0.3, out_dtype=out_dtype)


# ------------------------------------------------------------------------------ strides


def test_non_contiguous_inputs_give_identical_results(crops):
    ab = ad.alpha_bar_at(200)
    train = crops[:150].reshape(150, -1)
    n = train.shape[1]
    x = noisy_queries(crops[200:205], ab).reshape(5, -1)
    base = check(x, train, ab)
    # train with a column stride (transposed storage) and a row stride (every other image)
    t_cols = train.t().contiguous().t()
    assert t_cols.stride() == (1, 150)
    assert torch.equal(check(x, t_cols, ab), base)
    wide = torch.zeros(300, n, dtype=torch.uint8)
    wide[::2] = train
    assert torch.equal(check(x, wide[::2], ab), base)
    # queries with a column stride, and strided float training data
    x_view = torch.zeros(5, 3 * n, dtype=torch.float64)[:, ::3]
    x_view.copy_(x)
    assert x_view.stride() == (3 * n, 3)
    assert torch.equal(check(x_view, train, ab), base)
    tf = unit(train).float().t().contiguous().t()
    assert torch.equal(check(x_view.float(), tf, ab), check(x.float(), unit(train).float(), ab))
    # the public op on a channels-last batch (reshaped by the op) and a broadcast query
    x4 = x.reshape(5, 3, 16, 16).contiguous(memory_format=torch.channels_last)
    out = ad.ops.nearest_denoise(x4, crops[:150].contiguous(memory_format=torch.channels_last), ab, backend="cpu")
    assert torch.equal(out.reshape(5, -1), ref_rows(train, base, torch.float64))
    xb = x[:1].expand(4, n)  # stride 0 between queries
    assert xb.stride(0) == 0
    assert torch.equal(check(xb, train, ab), base[:1].expand(4))


# ------------------------------------------------------------------------------ ties


def test_duplicate_images_tie_to_the_lowest_index():
    """Exact copies of the nearest image placed across blocks of 8 and across the units of
    the parallel split: the first copy wins, with one thread or two, with either kernel."""
    g = torch.Generator().manual_seed(4)
    N, n = 1000, 48
    train = torch.randint(0, 256, (N, n), generator=g, dtype=torch.uint8)
    target = train[900].clone()
    for k in (905, 37, 512, 38, 999):  # within one block, across blocks and units
        train[k] = target
    x = (math.sqrt(0.8) * unit(target) + 0.01 * torch.randn(n, generator=g, dtype=torch.float64))[None].repeat(3, 1)
    x[1] = math.sqrt(0.8) * unit(target)  # d = 0 up to the rounding of a * y, for every copy
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            for portable in (False, True):
                _, index, dist = raw(x, train, 0.8, force_portable=portable)
                assert index.tolist() == [37, 37, 37]
                assert dist[1].item() < 1e-28
            assert torch.equal(check(x, train, 0.8), torch.tensor([37, 37, 37]))
    finally:
        torch.set_num_threads(before)


def test_identical_training_set_picks_index_zero():
    train = torch.full((70, 5), 200, dtype=torch.uint8)
    x = torch.randn(4, 5, dtype=torch.float64)
    _, index, _ = raw(x, train, 0.5)
    assert index.tolist() == [0, 0, 0, 0]


def test_result_independent_of_thread_count(crops):
    ab = ad.alpha_bar_at(700)
    train = crops[:240].reshape(240, -1)
    x = noisy_queries(crops[:16], ab, seed=9).reshape(16, -1)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = raw(x, train, ab)
        torch.set_num_threads(2)
        two = raw(x, train, ab)
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(a, b) for a, b in zip(one, two))


# ------------------------------------------------------------------------------ kernels


def test_portable_distances_match_avx512(crops):
    train = crops[:100].reshape(100, -1)
    for t in (900, 100, 0):
        ab = ad.alpha_bar_at(t)
        x = noisy_queries(crops[200:204], ab, seed=t).reshape(4, -1)
        o1, i1, d1 = raw(x, train, ab)
        o2, i2, d2 = raw(x, train, ab, force_portable=True)
        assert torch.equal(i1, i2) and torch.equal(o1, o2)
        assert torch.allclose(d1, d2, rtol=1e-13, atol=0)


def test_distances_are_the_optimal_denoisers(crops):
    """Shared distances: as the temperature goes to 0 the optimal denoiser's softmax picks
    the nearest image, and its state's max logit is -d(nearest) / (2 s2 tau)."""
    ab = ad.alpha_bar_at(400)
    train = crops[:100].reshape(100, -1)
    x = noisy_queries(crops[200:203], ab).reshape(3, -1)
    _, _, dist = raw(x, train, ab)
    st = ad.ops.optimal_denoise(x, train, ab, backend="cpu", return_state=True)
    assert torch.equal(st.mx[:, 0], dist * -(1.0 / (2.0 * (1.0 - ab) * 1.0)))


def test_kernel_rejects_bad_arguments():
    x = torch.zeros(2, 4, dtype=torch.float64)
    tr = torch.zeros(3, 4, dtype=torch.uint8)
    common = (x.data_ptr(), 2, 4, 4, 1, True, tr.data_ptr(), 3, 4, 1)
    with pytest.raises(ValueError, match="train_kind"):
        C.nearest_denoise_run(*common, 5, 0.5, 0, True, 0, 0)
    with pytest.raises(ValueError, match="positive"):
        C.nearest_denoise_run(*common, 0, 0.0, 0, True, 0, 0)
    with pytest.raises(ValueError, match="B >= 1"):
        C.nearest_denoise_run(x.data_ptr(), 0, 4, 4, 1, True, tr.data_ptr(), 3, 4, 1, 0, 0.5, 0, True, 0, 0)


# ------------------------------------------------------------------------------ wiring


def test_registered_first_for_cpu_and_used_by_the_denoiser(crops):
    assert registry.available_backends("nearest_denoise", "cpu")[0] == "cpu"
    den = ad.NearestDenoiser(crops[:100])
    x = noisy_queries(crops[200:202], ad.alpha_bar_at(50)).float()
    out = den(x, 50)
    ref = ad.ops.nearest_denoise(x, crops[:100], ad.alpha_bar_at(50), backend="reference")
    assert torch.equal(out, ref)


def test_return_state_matches_the_reference(crops):
    ab = ad.alpha_bar_at(100)
    train = crops[:120]
    x = noisy_queries(crops[200:204], ab, seed=2)
    for xx in (x, x.float()):
        c = ad.ops.nearest_denoise(xx, train, ab, backend="cpu", return_state=True)
        r = ad.ops.nearest_denoise(xx.double(), train, ab, backend="reference", return_state=True)
        assert isinstance(c, ad.ops.NearestState)
        assert c.dist.dtype == torch.float64 and c.index.dtype == torch.int64 and c.image.dtype == xx.dtype
        assert torch.equal(c.index, r.index)
        assert torch.equal(c.image, r.image.to(xx.dtype))
        assert torch.allclose(c.dist, r.dist, rtol=1e-12)
        assert torch.equal(c.result().reshape(xx.shape), ad.ops.nearest_denoise(xx, train, ab, backend="cpu"))
