"""The patch_moments op: compiled CPU lag sums against unfold + float64 and the torch reference
(uint8 bit-identical), the streaming contract (order, batch size, merge, resume, workers), bad
input, and the stationary all-offsets covariance against a direct loop over pixel pairs."""
from __future__ import annotations

import math

import pytest
import torch

import analytic_diffusion as ad
from analytic_diffusion import registry
from analytic_diffusion.ops.patch_moments import cpu as pm_cpu
from analytic_diffusion.ops.patch_moments import reference as pm_ref
from analytic_diffusion.ops.patch_moments import stationary as pm_stat

needs_cpu = pytest.mark.skipif(not pm_cpu.available(), reason="compiled _C without the patch-moments kernels")
BACKENDS = ["reference"] + (["cpu"] if pm_cpu.available() else [])


def _u8(shape, seed):
    return torch.randint(0, 256, shape, generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def _unfold_moments(x, k):
    """docs/algorithms.md §2 literally: every k x k patch materialised, float64 mean and unbiased covariance."""
    C = x.shape[1]
    P = x.unfold(2, k, 1).unfold(3, k, 1).permute(0, 2, 3, 1, 4, 5).reshape(-1, C * k * k)
    P = (P.double() - 127.5) / 127.5 if x.dtype == torch.uint8 else P.double()
    return P.mean(0), torch.cov(P.T), P.shape[0]


def _unfold_sums(x, k):
    C = x.shape[1]
    P = x.unfold(2, k, 1).unfold(3, k, 1).permute(0, 2, 3, 1, 4, 5).reshape(-1, C * k * k).double()
    return P.sum(0), P.T @ P


# ---------------------------------------------------------------- the compiled lag sums
@needs_cpu
@pytest.mark.parametrize("k", [1, 3, 5, 9])
@pytest.mark.parametrize("portable", [False, True])
def test_cpu_patch_sums_uint8_bit_identical(k, portable):
    x = _u8((7, 3, 13, 18), k)  # widths that are not a multiple of the 16-pixel vectors
    s1, s2 = pm_cpu.patch_sums(x, k, force_portable=portable)
    r1, r2 = pm_ref.BACKEND.patch_sums(x, k)
    u1, u2 = _unfold_sums(x, k)
    assert s1.dtype == s2.dtype == torch.int64
    assert torch.equal(s1, r1) and torch.equal(s2, r2)
    assert torch.equal(s2.double(), u2) and torch.equal(s1.double(), u1)  # exact: integers below 2^53


@needs_cpu
def test_cpu_blocks_and_strides_do_not_change_uint8_sums():
    x = _u8((11, 2, 9, 10), 1)
    T, S1 = pm_cpu.lag_rect_sums(x, 2, 2, 3, 3, 7, 8)
    for block in (4, 8):  # several int32 blocks per call
        T2, S2 = pm_cpu.lag_rect_sums(x, 2, 2, 3, 3, 7, 8, block_images=block)
        assert torch.equal(T, T2) and torch.equal(S1, S2)
    xt = x.permute(0, 1, 3, 2).contiguous().permute(0, 1, 3, 2)  # column-major images
    assert torch.equal(pm_cpu.lag_rect_sums(xt, 2, 2, 3, 3, 7, 8)[0], T)
    assert torch.equal(pm_cpu.lag_rect_sums(x.flip(0), 2, 2, 3, 3, 7, 8)[0], T)  # order


@needs_cpu
def test_cpu_uint8_worst_case_values_exact():
    # all 255 (largest products) and all 0 / 255 patterns: the int32 blocks and the u - 128 trick
    x = torch.full((40, 1, 6, 20), 255, dtype=torch.uint8)
    x[::3, :, ::2] = 0
    s1, s2 = pm_cpu.patch_sums(x, 5)
    u1, u2 = _unfold_sums(x, 5)
    assert torch.equal(s2.double(), u2) and torch.equal(s1.double(), u1)


@needs_cpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpu_patch_sums_float(dtype):
    x = (torch.rand(5, 2, 11, 12, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 2 - 1).to(dtype)
    shift = torch.tensor([0.1, -0.3], dtype=torch.float64)
    for portable in (False, True):
        s1, s2 = pm_cpu.patch_sums(x, 5, shift, force_portable=portable)
        u1, u2 = _unfold_sums(x.double() - shift.reshape(1, -1, 1, 1), 5)
        assert s2.dtype == torch.float64
        assert (s2 - u2).abs().max() <= 1e-12 * u2.abs().max() and (s1 - u1).abs().max() <= 1e-12 * u1.abs().max()


@needs_cpu
def test_cpu_sums_independent_of_thread_count():
    x = _u8((9, 3, 20, 20), 8)
    xf = (x.double() - 127.5) / 127.5
    shift = torch.zeros(3, dtype=torch.float64)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = pm_cpu.patch_sums(x, 5), pm_cpu.patch_sums(xf, 5, shift)
        torch.set_num_threads(max(2, old))
        many = pm_cpu.patch_sums(x, 5), pm_cpu.patch_sums(xf, 5, shift)
    finally:
        torch.set_num_threads(old)
    for a, b in zip(one, many):  # float64 too: every sum runs in a fixed order
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@needs_cpu
def test_cpu_lag_sums_match_reference():
    x = _u8((4, 2, 7, 9), 5)
    A, S1 = pm_cpu.lag_sums(x, 6, 8)
    R, R1 = pm_ref.lag_sums(x, 6, 8)
    assert torch.equal(A, R) and torch.equal(S1, R1)
    xf = (x.double() - 127.5) / 127.5
    shift = torch.tensor([0.2, -0.1], dtype=torch.float64)
    A, S1 = pm_cpu.lag_sums(xf, 3, 4, shift)
    R, R1 = pm_ref.lag_sums(xf, 3, 4, shift)
    assert (A - R).abs().max() < 1e-12 and (S1 - R1).abs().max() < 1e-12


# ---------------------------------------------------------------- the public op
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("k", [3, 7])
def test_patch_moments_on_natural_crops(backend, k):
    crops = ad.data.natural_crops(24, size=16, seed=1)
    mean, cov, count = _unfold_moments(crops, k)
    m = ad.estimate_patch_moments(crops, k, batch_size=10, backend=backend)
    assert m.kind == "patch" and m.image_shape == (3, k, k) and m.count == count
    assert m.extra["backend"] == backend and m.extra["images"] == 24 and m.extra["exact"]
    assert (m.mean - mean).abs().max() < 1e-14 and (m.cov - cov).abs().max() < 1e-14
    f = ad.estimate_patch_moments((crops.double() - 127.5) / 127.5, k, batch_size=7, backend=backend)
    assert not f.extra["exact"] and (f.cov - cov).abs().max() < 1e-13 and (f.mean - mean).abs().max() < 1e-14


@needs_cpu
def test_backends_bit_identical_and_independent_of_order_and_batch_size():
    x = _u8((30, 3, 12, 12), 7)
    ref = ad.estimate_patch_moments(x, 5, batch_size=30, backend="reference")
    perm = torch.randperm(30, generator=torch.Generator().manual_seed(0))
    for bs in (1, 4, 30):
        m = ad.estimate_patch_moments(x[perm], 5, batch_size=bs, backend="cpu")
        assert torch.equal(m.cov, ref.cov) and torch.equal(m.mean, ref.mean)


def test_default_backend_recorded(monkeypatch):
    x = _u8((4, 1, 8, 8), 2)
    m = ad.estimate_patch_moments(x, 3)
    assert m.extra["backend"] == ad.available_backends("patch_moments", "cpu")[0]
    monkeypatch.setenv(registry.ENV_VAR, "patch_moments=reference")
    assert ad.estimate_patch_moments(x, 3).extra["backend"] == "reference"


def test_merge_exact_and_mixed():
    x = _u8((9, 2, 10, 11), 4)
    a = ad.PatchMomentAccumulator(2, 3).update(x[:4])
    b = ad.PatchMomentAccumulator(2, 3, backend="reference").update(x[4:])
    whole = ad.PatchMomentAccumulator(2, 3).update(x).result()
    m = a.merge(b).result()
    assert torch.equal(m.cov, whole.cov) and m.extra["images"] == 9
    assert set(m.extra["backend"].split(",")) == set(["reference"] + [ad.available_backends("patch_moments", "cpu")[0]])
    f = ad.PatchMomentAccumulator(2, 3).update((x[:4].double() - 127.5) / 127.5)
    mixed = f.merge(ad.PatchMomentAccumulator(2, 3).update(x[4:])).result()
    assert (mixed.cov - whole.cov).abs().max() < 1e-14
    with pytest.raises(ValueError, match="same channels and patch size"):
        a.merge(ad.PatchMomentAccumulator(2, 5))
    with pytest.raises(TypeError):
        a.merge(ad.MomentAccumulator(18))


class _Flaky(torch.utils.data.Dataset):
    """Reads fail from index ``fail_at`` on: an interrupted run."""

    def __init__(self, data, fail_at=None):
        self.data, self.fail_at = data, fail_at

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        if self.fail_at is not None and i >= self.fail_at:
            raise RuntimeError("disk went away")
        return self.data[i]


@pytest.mark.parametrize("which", ["patch", "stationary"])
def test_interrupted_run_resumes_bit_identical(which, tmp_path):
    x = ad.data.natural_crops(40, size=12, seed=3)
    est = (lambda d, **kw: ad.estimate_patch_moments(d, 5, **kw)) if which == "patch" else (lambda d, **kw: ad.estimate_stationary_moments(d, 4, **kw))
    ckpt = tmp_path / "run.safetensors"
    full = est(x, batch_size=4)
    with pytest.raises(RuntimeError, match="disk went away"):
        est(_Flaky(x, fail_at=30), batch_size=4, checkpoint=ckpt, checkpoint_every=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.safetensors"]  # atomic: no temporary left
    resumed = est(_Flaky(x), batch_size=4, checkpoint=ckpt, checkpoint_every=2)
    assert torch.equal(resumed.cov, full.cov) and torch.equal(resumed.mean, full.mean)
    assert resumed.extra["images"] == 40
    again = est(_Flaky(x, fail_at=0), batch_size=4, checkpoint=ckpt)  # complete: reads nothing
    assert torch.equal(again.cov, full.cov)
    workers = est(_Flaky(x), batch_size=8, num_workers=2)
    assert torch.equal(workers.cov, full.cov)


def test_checkpoint_of_the_wrong_kind_is_refused(tmp_path):
    x = _u8((4, 1, 8, 8), 0)
    ad.estimate_moments(x, checkpoint=tmp_path / "full.safetensors")
    with pytest.raises(ValueError, match="not a patch-moments checkpoint"):
        ad.estimate_patch_moments(x, 3, checkpoint=tmp_path / "full.safetensors")
    ad.estimate_patch_moments(x, 3, checkpoint=tmp_path / "p3.safetensors")
    with pytest.raises(ValueError, match="patch size 3, not 5"):
        ad.estimate_patch_moments(x, 5, checkpoint=tmp_path / "p3.safetensors")


def test_bad_input():
    acc = ad.PatchMomentAccumulator(3, 5)
    with pytest.raises(ValueError, match="2 channels.*3-channel"):
        acc.update(torch.zeros(2, 2, 8, 8, dtype=torch.uint8))
    with pytest.raises(ValueError, match="patch_size must be a positive odd"):
        ad.PatchMomentAccumulator(3, 4)
    with pytest.raises(ValueError, match="patch_size must be a positive odd"):
        ad.estimate_patch_moments(torch.zeros(2, 1, 8, 8, dtype=torch.uint8), 0)
    with pytest.raises(ValueError, match="channels must be a positive"):
        ad.PatchMomentAccumulator(0, 3)
    with pytest.raises(ValueError, match="smaller than the 5x5 patch"):
        acc.update(torch.zeros(1, 3, 4, 8))
    bad = torch.zeros(2, 3, 8, 8)
    bad[1, 2, 3, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        acc.update(bad)
    with pytest.raises(ValueError, match="NaN"):
        ad.estimate_stationary_moments(bad)
    with pytest.raises(TypeError, match="uint8 or float"):
        acc.update(torch.zeros(2, 3, 8, 8, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"must be in \[-1, 1\]"):
        acc.update(torch.full((1, 3, 8, 8), 200.0))
    with pytest.raises(ValueError, match=r"must be in \[-1, 1\]"):
        ad.StationaryMomentAccumulator(3).update(torch.full((1, 3, 8, 8), 1.5))
    with pytest.raises(ValueError, match="empty"):
        ad.estimate_patch_moments(torch.zeros(0, 3, 8, 8, dtype=torch.uint8), 3)
    with pytest.raises(ValueError, match="empty"):
        ad.estimate_stationary_moments(torch.zeros(0, 3, 8, 8, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"\[B, C, H, W\]"):
        acc.update(torch.zeros(2, 75, dtype=torch.uint8))
    with pytest.raises(ValueError, match="no backend 'nope'"):
        ad.estimate_patch_moments(torch.zeros(2, 1, 8, 8, dtype=torch.uint8), 3, backend="nope")
    st = ad.StationaryMomentAccumulator(1).update(torch.zeros(1, 1, 6, 6, dtype=torch.uint8))
    with pytest.raises(ValueError, match="one size per accumulator"):
        st.update(torch.zeros(1, 1, 6, 7, dtype=torch.uint8))
    with pytest.raises(ValueError, match="estimator"):
        ad.estimate_stationary_moments(torch.zeros(2, 1, 6, 6, dtype=torch.uint8), estimator="unbiased")
    with pytest.raises(ValueError, match="max_lag=2"):
        ad.estimate_stationary_moments(torch.zeros(2, 1, 8, 8, dtype=torch.uint8), 2, patch_size=5)
    assert ad.estimate_stationary_moments(torch.zeros(2, 1, 8, 8, dtype=torch.uint8), 5).patch_size == 5
    x = _u8((3, 2, 8, 8), 1)
    before = x.clone()
    ad.estimate_patch_moments(x, 3)
    ad.estimate_stationary_moments(x)
    assert torch.equal(x, before)  # nothing the user passed is modified


# ---------------------------------------------------------------- stationary covariance
def _pairs_by_loops(y, est):
    """Cov_e[c, c'] for every lag by a direct loop over pixel pairs (the module docstring)."""
    N, C, H, W = y.shape
    m = y.mean((0, 2, 3))
    out = {}
    for di in range(-(H - 1), H):
        for dj in range(-(W - 1), W):
            a = y[:, :, max(0, -di) : H - max(0, di), max(0, -dj) : W - max(0, dj)] - m.reshape(1, -1, 1, 1)
            b = y[:, :, max(0, di) : H - max(0, -di), max(0, dj) : W - max(0, -dj)] - m.reshape(1, -1, 1, 1)
            S = torch.einsum("bchw,bdhw->cd", a, b)
            M = a.shape[0] * a.shape[2] * a.shape[3]
            out[di, dj] = (S / (M - 1) if M >= 2 else torch.zeros_like(S)) if est == "pairs" else S / (N * H * W - 1)
    return m, out


@pytest.mark.parametrize("estimator", ["pairs", "psd"])
@pytest.mark.parametrize("method", ["fft", "direct"])
def test_stationary_matches_pixel_pair_loop(estimator, method):
    x = _u8((4, 2, 5, 6), 11)
    y = (x.double() - 127.5) / 127.5
    mean, lags = _pairs_by_loops(y, estimator)
    k = 11  # 2 * max(H, W) - 1: every lag inside the image, and some outside
    m = ad.estimate_stationary_moments(x, patch_size=k, estimator=estimator, method=method, batch_size=3)
    assert m.kind == "patch" and m.image_shape == (2, k, k) and m.count == 4 * 5 * 6 and m.extra["exact"]
    assert m.extra["method"] == method
    cov = m.cov.reshape(2, k, k, 2, k, k)
    err = 0.0
    for i in range(k):
        for j in range(k):
            for i2 in range(k):
                for j2 in range(k):
                    di, dj = i2 - i, j2 - j
                    want = lags.get((di, dj), torch.zeros(2, 2, dtype=torch.float64))
                    err = max(err, float((cov[:, i, j, :, i2, j2] - want).abs().max()))
    assert err < 1e-15
    assert (m.mean.reshape(2, -1) - mean[:, None]).abs().max() < 1e-15
    if estimator == "psd":
        assert torch.linalg.eigvalsh(m.cov).min() > -1e-12  # the tapered estimator is PSD


def test_stationary_uint8_fft_exact_and_independent_of_batching():
    crops = ad.data.natural_crops(20, size=16, seed=5)
    acc = ad.StationaryMomentAccumulator(3, method="direct").update(crops)
    for bs in (1, 7, 20):
        perm = torch.randperm(20, generator=torch.Generator().manual_seed(bs))
        a = ad.StationaryMomentAccumulator(3, method="fft")
        for b in range(0, 20, bs):
            a.update(crops[perm[b : b + bs]])
        assert torch.equal(a._A, acc._A) and torch.equal(a._S1, acc._S1)  # bit-identical integer sums
        assert a.max_residual <= a.max_bound < 0.5
    m = acc.result(9)
    f = ad.estimate_stationary_moments((crops.double() - 127.5) / 127.5, patch_size=9)
    assert (f.cov - m.cov).abs().max() < 1e-13 and (f.mean - m.mean).abs().max() < 1e-15


def test_stationary_fft_bound_checked(monkeypatch):
    """Chunks whose bound is not below 0.5 never get rounded: they are split, and a single image
    over the limit goes through the exact direct sums."""
    x = _u8((6, 2, 8, 8), 9)
    ref = ad.StationaryMomentAccumulator(2, method="direct").update(x)
    l1 = x.double().sum((2, 3))
    l2 = x.double().square().sum((2, 3)).sqrt()
    one = pm_stat.fft_error_bound(l1[:1], l2[:1], 15 * 15)
    # a limit between one image's bound and two images': chunks of one image each
    monkeypatch.setattr(pm_stat, "ROUND_LIMIT", one * 1.5)
    a = ad.StationaryMomentAccumulator(2, method="fft").update(x)
    assert torch.equal(a._A, ref._A) and a.methods_used == {"fft"} and a.max_bound < one * 1.5
    # a limit below every image's bound: all direct, still exact
    monkeypatch.setattr(pm_stat, "ROUND_LIMIT", one * 1e-3)
    b = ad.StationaryMomentAccumulator(2, method="fft").update(x)
    assert torch.equal(b._A, ref._A) and b.methods_used == {"direct"}
    # the bound holds with a wide margin on real data
    monkeypatch.undo()
    c = ad.StationaryMomentAccumulator(3, method="fft")
    c.update(ad.data.natural_crops(64, size=32, seed=0))
    assert 0 < c.max_residual < c.max_bound / 100


def test_fft_error_bound_formula():
    l1 = torch.tensor([[3.0, 4.0], [1.0, 2.0]], dtype=torch.float64)
    l2 = torch.tensor([[1.0, 2.0], [5.0, 1.0]], dtype=torch.float64)
    pair = l1.T @ l2
    want = 2 * 2.0**-53 * (21 * math.log2(1024) + 2 + 3) * float(torch.maximum(pair, pair.T).max())
    assert pm_stat.fft_error_bound(l1, l2, 1024) == pytest.approx(want, rel=1e-15)


def test_stationary_merge_all_orders_and_kinds():
    x = _u8((8, 2, 7, 7), 2)
    y = (x.double() - 127.5) / 127.5
    whole = ad.StationaryMomentAccumulator(2).update(x)
    a = ad.StationaryMomentAccumulator(2).update(x[:3])
    b = ad.StationaryMomentAccumulator(2).update(x[3:])
    assert torch.equal(a.merge(b)._A, whole._A)
    f = ad.StationaryMomentAccumulator(2).update(y[:5])
    g = ad.StationaryMomentAccumulator(2).update(x[5:])
    r = f.merge(g).result(5)
    want = whole.result(5)
    assert (r.cov - want.cov).abs().max() < 1e-14 and (r.mean - want.mean).abs().max() < 1e-15
    # float after uint8 in one accumulator, and a merge into an empty one
    h = ad.StationaryMomentAccumulator(2).update(x[:2]).update(y[2:])
    assert (h.result(5).cov - want.cov).abs().max() < 1e-14
    e = ad.StationaryMomentAccumulator(2).merge(whole)
    assert torch.equal(e._A, whole._A)
    auto = ad.StationaryMomentAccumulator(2).update(x)  # small uint8 images: direct on the CPU backend
    assert torch.equal(auto._A, whole._A) and auto.methods_used == ({"direct"} if pm_cpu.available() else {"fft"})
    with pytest.raises(ValueError, match="different image sizes"):
        a.merge(ad.StationaryMomentAccumulator(2).update(x[:, :, :6]))


def test_stationary_feeds_windowed_wiener_beyond_the_image():
    crops = ad.data.natural_crops(16, size=8, seed=2)
    m = ad.estimate_stationary_moments(crops)  # k = 15: windows larger than the 8x8 image
    assert m.image_shape == (3, 15, 15) and m.extra["model"] == "stationary"
    f = ad.WindowedWiener(m, (3, 8, 8))
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    out = f.apply(x, 0.05)
    assert out.shape == x.shape and bool(torch.isfinite(out).all())
    # the centre row of the covariance holds every lag inside the image
    small = ad.estimate_stationary_moments(crops, 6, patch_size=7)
    c15 = m.cov.reshape(3, 15, 15, 3, 15, 15)[:, 7, 7][:, :, 4:11, 4:11]
    c7 = small.cov.reshape(3, 7, 7, 3, 7, 7)[:, 3, 3]
    assert (c15 - c7).abs().max() < 1e-15


# ---------------------------------------------------------------- several processes
def _dist_worker(rank, world, port, data, out_dir):
    import datetime
    import os

    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120))
    try:
        shard = data[rank::world]
        res = {}
        res["patch"] = ad.PatchMomentAccumulator(data.shape[1], 3).update(shard).all_reduce().result()
        res["stat_u8"] = ad.StationaryMomentAccumulator(data.shape[1]).update(shard).all_reduce().result(5)
        mixed = (shard.double() - 127.5) / 127.5 if rank == 1 else shard
        res["stat_mixed"] = ad.StationaryMomentAccumulator(data.shape[1]).update(mixed).all_reduce().result(5)
        res["stat_empty"] = ad.StationaryMomentAccumulator(data.shape[1]).update(shard[:0] if rank == 1 else shard).all_reduce().result(5)
        torch.save({k: (m.mean, m.cov, m.count, m.extra["images"]) for k, m in res.items()}, os.path.join(out_dir, f"r{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_all_reduce_two_ranks(tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    data = ad.data.natural_crops(12, size=8, seed=4)
    mp.spawn(_dist_worker, args=(2, port, data, str(tmp_path)), nprocs=2, join=True)
    one = {
        "patch": ad.estimate_patch_moments(data, 3),
        "stat_u8": ad.estimate_stationary_moments(data, patch_size=5),
        "stat_mixed": ad.estimate_stationary_moments(data, patch_size=5),
        "stat_empty": ad.estimate_stationary_moments(data[0::2], patch_size=5),
    }
    for rank in range(2):
        got = torch.load(tmp_path / f"r{rank}.pt")
        for key in ("patch", "stat_u8"):  # exact integer sums: bit-identical to one process
            mean, cov, count, images = got[key]
            assert torch.equal(cov, one[key].cov) and torch.equal(mean, one[key].mean) and count == one[key].count and images == 12
        for key in ("stat_mixed", "stat_empty"):
            mean, cov, count, _ = got[key]
            assert (cov - one[key].cov).abs().max() < 1e-14 and (mean - one[key].mean).abs().max() < 1e-15 and count == one[key].count


def test_stationary_result_too_large_is_a_clean_error():
    acc = ad.StationaryMomentAccumulator(3).update(torch.zeros(2, 3, 8, 8, dtype=torch.uint8))
    with pytest.raises(MemoryError, match="patch_size"):
        acc.result(2001)  # a 12 million square covariance
    mean, lags = acc.lag_covariance()  # the per-lag values are always small
    assert mean.shape == (3,) and lags.shape == (8, 15, 3, 3)


def test_patch_matrix_layouts_agree(monkeypatch):
    """The cached flat gather (small d) and the k^4 grid path (any d) build the same matrix."""
    from analytic_diffusion.ops.patch_moments import layout

    x = _u8((3, 2, 9, 9), 6)
    flat = pm_ref.BACKEND.patch_sums(x, 5) if not pm_cpu.available() else pm_cpu.patch_sums(x, 5)
    monkeypatch.setattr(layout, "_FLAT_INDEX_MAX_D", 0)
    grid = pm_ref.BACKEND.patch_sums(x, 5) if not pm_cpu.available() else pm_cpu.patch_sums(x, 5)
    assert torch.equal(flat[1], grid[1]) and torch.equal(flat[1], _unfold_sums(x, 5)[1].to(torch.int64))
