"""The compiled CPU backend of windowed_locality_denoise against the dense float64
transcription of docs/algorithms.md 9 (dense mask from the window, then docs/algorithms.md §5) on real crops, at every
DDIM step and below, for every planner route and both kernel copies."""
import math

import pytest
import torch

import analytic_diffusion as ad
from analytic_diffusion.ops import merge_states, windowed_locality_denoise
from analytic_diffusion.ops.windowed_locality import cpu as wl_cpu
from spec_dense import dense_locality, dense_window_mask, noisy_queries, unit

pytestmark = pytest.mark.skipif(not wl_cpu.available(), reason="compiled _C without the windowed kernel")

STEPS = sorted(set(ad.ddim_timesteps(10)) | {20, 10, 1}, reverse=True)  # 900 .. 0 and the sharp end
# planner options: 0 free, 1 never transpose, 2 no integral images, 4 no box-minus-holes, 8 transpose
OPTIONS = (0, 1, 2, 4, 8, 6)


def rel(out, ref):
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def random_window(C, k, density, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.rand(C, C, k, k, generator=g) < density
    w[torch.arange(C), torch.arange(C), k // 2, k // 2] = True
    return w


def holey_window(C, k, seed):
    """Mostly full with holes, one empty row and one empty column per channel pair."""
    g = torch.Generator().manual_seed(seed)
    w = torch.rand(C, C, k, k, generator=g) < 0.85
    w[:, :, 1, :] = False
    w[:, :, :, k - 2] = False
    return w


@pytest.fixture(scope="module")
def crops():
    c = ad.data.natural_crops(90, size=8, seed=5)  # real images: uint8 [90, 3, 8, 8]
    return c[:80], c[80:]


_MASKS: dict = {}


def dense(x, train, window):
    """docs/algorithms.md §9 transcribed: the dense [n, n] mask built by loops (cached per window), then docs/algorithms.md §5."""
    B, C, H, W = x.shape
    key = (window.numpy().tobytes(), tuple(window.shape), H, W)
    if key not in _MASKS:
        _MASKS[key] = dense_window_mask(window, H, W)
    M = _MASKS[key]
    return lambda ab: dense_locality(x.double().reshape(B, -1), unit(train).reshape(train.shape[0], -1), M, ab).reshape(x.shape)


@pytest.mark.parametrize("t", STEPS)
def test_every_step_every_route_matches_dense_transcription(crops, t):
    train, held = crops
    ab = ad.alpha_bar_at(t)
    x = noisy_queries(held[:3], ab, seed=t)
    for window in (random_window(3, 5, 0.5, seed=t), holey_window(3, 7, seed=t), torch.ones(3, 3, 9, 9, dtype=torch.bool)):
        want = dense(x, train, window)(ab)
        for opt in OPTIONS:
            got = wl_cpu.windowed_locality_denoise_cpu(x, train, window, ab, options=opt)
            assert got.dtype == torch.float64 and torch.isfinite(got).all()
            assert rel(got, want) < 1e-10, (t, opt)
        port = wl_cpu.windowed_locality_denoise_cpu(x, train, window, ab, force_portable=True)
        assert rel(port, want) < 1e-10
        # float32 queries: compared with the transcription of the same float32 values
        want32 = dense(x.float(), train, window)(ab)
        got32 = windowed_locality_denoise(x.float(), train, window, ab, backend="cpu")
        assert got32.dtype == torch.float32 and rel(got32, want32) < 1e-6


def test_windowed_wiener_windows_on_real_crops(crops):
    """The benchmark's windows (windowed Wiener filter of k = 9 patch moments), every step."""
    train, held = crops
    m = ad.estimate_patch_moments(ad.data.natural_crops(300, size=16, seed=1), 9)
    ww = ad.WindowedWiener(m)
    for t in STEPS:
        ab = ad.alpha_bar_at(t)
        window = ww.mask(ab, 0.02)
        x = noisy_queries(held[:4], ab, seed=t + 1)
        for dt in (torch.float64, torch.float32):
            xq = x.to(dt)
            got = windowed_locality_denoise(xq, train, window, ab, backend="cpu")
            assert rel(got, dense(xq, train, window)(ab)) < (1e-10 if dt == torch.float64 else 1e-6), (t, dt)


@pytest.mark.parametrize("shape", [(3, 7, 9), (1, 7, 9), (1, 5, 5), (2, 9, 4)])
def test_odd_sizes_one_channel_and_windows_up_to_2h_minus_1(shape):
    C, H, W = shape
    g = torch.Generator().manual_seed(C * 100 + H * 10 + W)
    train = torch.randint(0, 256, (37, C, H, W), dtype=torch.uint8, generator=g)
    held = torch.randint(0, 256, (3, C, H, W), dtype=torch.uint8, generator=g)
    kmax = 2 * max(H, W) - 1
    for t in (900, 300, 20, 0):
        ab = ad.alpha_bar_at(t)
        x = noisy_queries(held, ab, seed=t)
        for k in sorted({1, 3, kmax // 2 | 1, kmax}):
            for window in (random_window(C, k, 0.4, seed=k), torch.ones(C, C, k, k, dtype=torch.bool), holey_window(C, k, seed=k) if k >= 5 else None):
                if window is None:
                    continue
                want = dense(x, train, window)(ab)
                for opt in (0, 8, 2):
                    got = wl_cpu.windowed_locality_denoise_cpu(x, train, window, ab, options=opt)
                    assert rel(got, want) < 1e-10, (shape, t, k, opt)


@pytest.mark.parametrize("shape", [(2, 6, 64), (1, 4, 128), (2, 64, 5)])
def test_rows_of_64_pixels_lane_block_layout(shape):
    """Rows of a multiple of 64 pixels in the kernel's orientation (as is, or transposed for
    the 64 x 5 images) take the lane-block layout (aligned plane reads, lane-shifted halos,
    transposed sums); windows up to k = 15 fit its halo, k = 17 falls back. Both kernel copies."""
    C, H, W = shape
    g = torch.Generator().manual_seed(C * 1000 + H * 10 + W)
    train = torch.randint(0, 256, (29, C, H, W), dtype=torch.uint8, generator=g)
    held = torch.randint(0, 256, (2, C, H, W), dtype=torch.uint8, generator=g)
    for t in (300, 0):
        ab = ad.alpha_bar_at(t)
        x = noisy_queries(held, ab, seed=t)
        for k, window in ((9, holey_window(C, 9, seed=9)), (15, random_window(C, 15, 0.5, seed=15)), (17, random_window(C, 17, 0.5, seed=17))):
            want = dense(x, train, window)(ab)
            for opt in (0, 8):
                for portable in (False, True):
                    got = wl_cpu.windowed_locality_denoise_cpu(x, train, window, ab, options=opt, force_portable=portable)
                    assert rel(got, want) < 1e-10, (shape, t, k, opt, portable)


def test_integral_image_route_and_large_windows():
    # 16x16 images, full 31x31 window at high noise: the plan reads a 2-D integral image
    crops = ad.data.natural_crops(50, size=16, seed=3)
    train, held = crops[:45], crops[45:]
    ab = ad.alpha_bar_at(700)
    x = noisy_queries(held[:2], ab, seed=7)
    window = torch.ones(3, 3, 31, 31, dtype=torch.bool)
    window[0, 1, 3:9, 4:20] = False  # a hole: box minus holes
    stats = {}
    got = wl_cpu.windowed_locality_denoise_cpu(x, train, window, ab, stats=stats)
    assert stats["integral_planes"] >= 1 and stats["terms"] < 40, stats
    want = windowed_locality_denoise(x, train, window, ab, backend="reference")
    assert rel(got, want) < 1e-10
    # at t = 0 the logit scale forbids the integral image (and the plan still is exact)
    ab0 = ad.alpha_bar_at(0)
    x0 = noisy_queries(held[:2], ab0, seed=8)
    plan = wl_cpu.windowed_plan(window, (3, 16, 16), ab0)
    assert plan["integral_planes"] == 0
    got0 = wl_cpu.windowed_locality_denoise_cpu(x0, train, window, ab0)
    assert rel(got0, windowed_locality_denoise(x0, train, window, ab0, backend="reference")) < 1e-10


def test_train_dtypes_and_non_contiguous_inputs(crops):
    train, held = crops
    ab = ad.alpha_bar_at(100)
    window = holey_window(3, 5, seed=4)
    x = noisy_queries(held[:4], ab, seed=2)
    want = dense(x, train, window)(ab)
    for tr in (train, unit(train), unit(train).float()):
        assert rel(windowed_locality_denoise(x, tr, window, ab, backend="cpu"), want) < 1e-7
    # non-contiguous: channels-last queries, every other training image, a transposed window view
    xs = x.contiguous(memory_format=torch.channels_last)
    tr2 = torch.stack([train, train], 1)[:, 0]  # stride 2 images in N
    assert not tr2.is_contiguous() and torch.equal(tr2, train)
    wt = window.transpose(2, 3).contiguous().transpose(2, 3)  # same values, transposed strides
    assert rel(windowed_locality_denoise(xs, tr2, wt, ab, backend="cpu"), want) < 1e-10
    xt = x.transpose(2, 3).contiguous().transpose(2, 3)
    assert rel(windowed_locality_denoise(xt, train, window, ab, backend="cpu"), want) < 1e-10


def test_states_merge_wssm_and_thread_count_independence(crops):
    train, held = crops
    ab = ad.alpha_bar_at(50)
    window = random_window(3, 5, 0.6, seed=11)
    x = noisy_queries(held[:5], ab, seed=4)
    full = windowed_locality_denoise(x, train, window, ab, backend="cpu")
    s1 = windowed_locality_denoise(x, train[:29], window, ab, backend="cpu", return_state=True)
    s2 = windowed_locality_denoise(x, train[29:], window, ab, backend="cpu", return_state=True)
    assert s1.mx.dtype == torch.float64 and s1.acc.shape == (5, 192)
    ref_state = windowed_locality_denoise(x, train[:29], window, ab, backend="reference", return_state=True)
    assert rel(s1.result(), ref_state.result()) < 1e-10
    assert rel(merge_states(s2, s1).result(), full.reshape(5, -1)) < 1e-12
    for cs in (16, 7, 80):
        want = windowed_locality_denoise(x, train, window, ab, softmax="wssm", chunk_size=cs, backend="reference")
        got = windowed_locality_denoise(x, train, window, ab, softmax="wssm", chunk_size=cs, backend="cpu")
        assert rel(got, want) < 1e-10, cs
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = windowed_locality_denoise(x, train, window, ab, backend="cpu")
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, full)  # fixed training blocks, merged in order: bit-identical


def test_empty_windows_and_selection():
    g = torch.Generator().manual_seed(1)
    train = torch.randint(0, 256, (20, 2, 6, 6), dtype=torch.uint8, generator=g)
    x = torch.randn(2, 2, 6, 6, generator=g, dtype=torch.float64) * 0.5
    window = torch.zeros(2, 2, 3, 3, dtype=torch.bool)  # every distance 0: the training mean
    got = windowed_locality_denoise(x, train, window, 0.5, backend="cpu")
    assert rel(got, unit(train).mean(0, keepdim=True).expand_as(got)) < 1e-12
    window[1, 0, 1, 1] = True  # channel 0 empty, channel 1 sees channel 0 only
    want = dense(x, train, window)(0.5)
    assert rel(windowed_locality_denoise(x, train, window, 0.5, backend="cpu"), want) < 1e-10
    assert ad.registry.select("windowed_locality_denoise", "cpu").name == "cpu"


def test_many_channels_and_the_64_channel_limit_of_window_reads(crops):
    """Any number of channels; a window may read input channels 0..63 (its channel sets are
    64-bit masks): channels above are outputs only, and a read above is a clear error."""
    train, held = crops
    ab = ad.alpha_bar_at(300)
    C = 70
    x = noisy_queries(held[:2], ab, seed=3)
    xs = x.repeat(1, C // 3 + 1, 1, 1)[:, :C]  # 70 channels: copies of the 3 colours
    ts = train[:20].repeat(1, C // 3 + 1, 1, 1)[:, :C]
    w = torch.zeros(C, C, 3, 3, dtype=torch.bool)
    w[:, :3] = True  # every output channel reads the first three input channels
    got = windowed_locality_denoise(xs, ts, w, ab, backend="cpu")
    want = windowed_locality_denoise(xs, ts, w, ab, backend="reference")
    assert rel(got, want) < 1e-6
    w[:, 66] = True
    with pytest.raises(ValueError, match="input channels 0..63"):
        windowed_locality_denoise(xs, ts, w, ab, backend="cpu")


@pytest.mark.parametrize("k", [3, 9, 15])
def test_full_box_path(crops, k):
    """Every window entry set (the high-noise steps, LS): distances and softmax row by row from a
    sliding column sum (box_row), both kernel copies, against the dense transcription; k = 15 is
    wider than the 8 x 8 images. The path is reported and not taken with a hole or a warm start."""
    train, held = crops
    window = torch.ones(3, 3, k, k, dtype=torch.bool)
    for t in (900, 500, 100, 0):
        ab = ad.alpha_bar_at(t)
        x = noisy_queries(held[:3], ab, seed=t + k)
        want = dense(x, train, window)(ab)
        for port in (False, True):
            st: dict = {}
            got = wl_cpu.windowed_locality_denoise_cpu(x, train, window, ab, warm_start=False, force_portable=port, stats=st)
            assert rel(got, want) < 1e-10, (k, t, port)
            # the box path needs the plan's 2-D integral image (its precision test): at t = 0 the
            # plan reads pixels directly instead
            assert st["box"] == (st["integral_planes"] == 1 and st["terms"] == 4), (k, t, st["plan"])
        if t == 900 and k >= 9:  # (for k = 3 the planner prefers column runs to the integral image)
            assert st["box"]
    holey = window.clone()
    holey[0, 1, k // 2, 0] = False
    ab = ad.alpha_bar_at(900)
    st = {}
    x = noisy_queries(held[:3], ab, seed=k)
    got = wl_cpu.windowed_locality_denoise_cpu(x, train, holey, ab, stats=st)
    assert not st["box"] and rel(got, dense(x, train, holey)(ab)) < 1e-10
    wl_cpu.windowed_locality_denoise_cpu(x, train, window, ab, warm_start=True, stats=st)
    assert not st["box"]
