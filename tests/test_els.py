"""Kamb & Ganguli local score machines (docs/algorithms.md §10, docs/algorithms.md §10): els_denoise (ELS,
bbELS) and the LS / ELS denoisers against dense float64 transcriptions of docs/algorithms.md 10
(tests/spec_dense.py: per pixel, the explicit list of candidate patches, by loops) on real
crops, at DDIM steps down to t = 0; patch-size schedules and their mapping."""

import pytest
import torch

import analytic_diffusion as ad
from analytic_diffusion.denoisers.schedules import KAMB_GANGULI_SCHEDULES, PatchSchedule, nearest_step
from analytic_diffusion.ops import els_denoise, merge_states
from spec_dense import dense_els, dense_ls, noisy_queries, unit

STEPS = [900, 500, 100, 20, 10, 0]  # down to the sharp low-noise end
BACKENDS = ad.available_backends("els_denoise", "cpu")
TOL = {"reference": 1e-8}  # compiled backends: 1e-6 (the target)


def rel(out, ref):
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


@pytest.fixture(scope="module")
def crops():
    c = ad.data.natural_crops(10, size=9, seed=7)  # real images: uint8 [10, 3, 9, 9]
    return c[:8], c[8:]


def test_backends_registered():
    assert "reference" in BACKENDS
    if ad.build_info()["cpu"]["available"]:
        assert "cpu" in BACKENDS


@pytest.mark.parametrize("t", STEPS)
def test_els_circular_square_matches_dense(crops, t):
    train, held = crops[0][:6, :, :8, :8], crops[1][:, :, :8, :8]
    ab = ad.alpha_bar_at(t)
    x = noisy_queries(held, ab, seed=t)
    want = dense_els(x, unit(train), 3, ab, "circular")
    for backend in BACKENDS:
        got = els_denoise(x, train, 3, ab, padding="circular", backend=backend)
        assert got.shape == x.shape and got.dtype == torch.float64
        assert rel(got, want) < TOL.get(backend, 1e-6), backend


@pytest.mark.parametrize("t", STEPS)
def test_bbels_odd_shape_matches_dense(crops, t):
    # 7 x 9 (H != W), P = 5: corners, both kinds of edges and an interior of 3 x 5
    train, held = crops[0][:6, :, :7, :], crops[1][:, :, :7, :]
    ab = ad.alpha_bar_at(t)
    x = noisy_queries(held, ab, seed=t + 1)
    want = dense_els(x, unit(train), 5, ab, "zeros")
    for backend in BACKENDS:
        got = els_denoise(x, train, 5, ab, padding="zeros", backend=backend)
        assert rel(got, want) < TOL.get(backend, 1e-6), backend


@pytest.mark.parametrize("t", [500, 10])
def test_circular_odd_shape_and_temperature(crops, t):
    train, held = crops[0][:5, :, :7, :], crops[1][:1, :, :7, :]
    ab = ad.alpha_bar_at(t)
    x = noisy_queries(held, ab, seed=3)
    want = dense_els(x, unit(train), 5, ab, "circular", tau=0.7)
    for backend in BACKENDS:
        assert rel(els_denoise(x, train, 5, ab, padding="circular", temperature=0.7, backend=backend), want) < TOL.get(backend, 1e-6)


@pytest.mark.parametrize("P", [7, 9, 13])
def test_bbels_with_p_at_least_h_is_ls(crops, P):
    train, held = crops[0][:6, :, :7, :7], crops[1][:1, :, :7, :7]
    ab = ad.alpha_bar_at(200)
    x = noisy_queries(held, ab, seed=P)
    want = dense_ls(x, unit(train), P, ab)
    assert rel(dense_els(x, unit(train), P, ab, "zeros"), want) < 1e-12  # the two transcriptions agree
    for backend in BACKENDS:
        assert rel(els_denoise(x, train, P, ab, padding="zeros", backend=backend), want) < TOL.get(backend, 1e-6)
    ls = ad.LSDenoiser(train, P)(x, 200)
    assert rel(ls, want) < 1e-8
    if P == 13:  # 2H - 1: larger sizes see nothing more and are cut there by the denoisers
        assert rel(ad.LSDenoiser(train, 21)(x, 200), want) < 1e-8
        assert rel(ad.ELSDenoiser(train, 21, padding="zeros")(x, 200), want) < 1e-8


@pytest.mark.parametrize("t", [700, 100, 10, 0])
def test_ls_denoiser_matches_dense(crops, t):
    train, held = crops[0][:6, :, :7, :], crops[1][:, :, :7, :]
    ab = ad.alpha_bar_at(t)
    x = noisy_queries(held, ab, seed=t)
    want = dense_ls(x, unit(train), 3, ab)
    den = ad.LSDenoiser(train, 3)
    assert rel(den(x, t), want) < 1e-8
    assert rel(den(x.float(), t), want) < 1e-5  # float32 queries
    assert den(x.reshape(2, -1), t).shape == (2, 3 * 7 * 9)


@pytest.mark.skipif("cpu" not in BACKENDS, reason="compiled CPU backend not built")
@pytest.mark.parametrize("padding", ["circular", "zeros"])
@pytest.mark.parametrize("t", [0, 10, 20, 300, 900])
def test_cpu_matches_reference_at_low_noise(padding, t):
    """The CPU kernel expands ||Q - a q||^2 in float64 (bound in csrc/cpu/els.cpp): at t <= 20
    with queries that are noisy copies of held-out images (the sharp regime) it must still
    agree with the direct-difference reference far below the 1e-6 target; at t = 900 (the flat
    end: every candidate counts) too. 17 images: three octets of lanes, the last one with a
    single image, in two work items of two octets (the second one's other octet all padding)."""
    c = ad.data.natural_crops(19, size=12, seed=11)
    train, held = c[:17], c[17:]
    ab = ad.alpha_bar_at(t)
    x = noisy_queries(held, ab, seed=t)
    ref = els_denoise(x, train, 5, ab, padding=padding, backend="reference")
    assert rel(els_denoise(x, train, 5, ab, padding=padding, backend="cpu"), ref) < 1e-9
    # near-copies of training images: the best candidate is (almost) the query itself
    x2 = noisy_queries(train[:2], ab, seed=t + 1)
    ref2 = els_denoise(x2, train, 5, ab, padding=padding, backend="reference")
    assert rel(els_denoise(x2, train, 5, ab, padding=padding, backend="cpu"), ref2) < 1e-9


@pytest.mark.skipif("cpu" not in BACKENDS, reason="compiled CPU backend not built")
@pytest.mark.parametrize("P", [3, 7, 9, 11])
@pytest.mark.parametrize("t", [900, 100, 0])
def test_cpu_patch_sizes_match_reference(P, t):
    """Every code path of the kernel's inner-product sums (compile-time P = 3, 5, 7 summed in
    the fold; P = 9 direct, P = 11 by doubling) on the flat and the sharp ends, circular."""
    c = ad.data.natural_crops(12, size=12, seed=5)
    train, held = c[:10], c[10:]
    ab = ad.alpha_bar_at(t)
    x = noisy_queries(held, ab, seed=P + t)
    ref = els_denoise(x, train, P, ab, padding="circular", backend="reference")
    got = els_denoise(x, train, P, ab, padding="circular", backend="cpu")
    assert torch.isfinite(got).all() and rel(got, ref) < 1e-9


@pytest.mark.parametrize("backend", BACKENDS)
def test_uint8_float_and_strided_train(crops, backend):
    train, held = crops[0][:, :, :8, :8], crops[1][:, :, :8, :8]
    ab = ad.alpha_bar_at(300)
    x = noisy_queries(held, ab, seed=1)
    want = els_denoise(x, train, 3, ab, padding="zeros", backend=backend)
    tf = unit(train)
    assert rel(els_denoise(x, tf, 3, ab, padding="zeros", backend=backend), want) < 1e-12
    assert rel(els_denoise(x, tf.float(), 3, ab, padding="zeros", backend=backend), want) < 1e-6
    cl = train.contiguous(memory_format=torch.channels_last)  # strided [N, C, H, W]
    assert rel(els_denoise(x, cl, 3, ab, padding="zeros", backend=backend), want) < 1e-12
    half = tf.half()
    assert rel(els_denoise(x, half, 3, ab, padding="zeros", backend=backend), els_denoise(x, half.double(), 3, ab, padding="zeros", backend=backend)) < 1e-12
    assert els_denoise(x.float(), train, 3, ab, padding="zeros", backend=backend).dtype == torch.float32


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("padding", ["circular", "zeros"])
def test_states_merge_across_shards_and_batch_independence(crops, backend, padding):
    train, held = crops[0][:, :, :8, :8], crops[1][:, :, :8, :8]
    ab = ad.alpha_bar_at(10)
    x = noisy_queries(held, ab, seed=2)
    full = els_denoise(x, train, 3, ab, padding=padding, backend=backend)
    s1 = els_denoise(x, train[:3], 3, ab, padding=padding, backend=backend, return_state=True)
    s2 = els_denoise(x, train[3:], 3, ab, padding=padding, backend=backend, return_state=True)
    assert s1.mx.dtype == torch.float64 and s1.mx.shape == (2, 3 * 64)
    assert rel(merge_states(s1, s2).result().reshape(x.shape), full) < 1e-12
    # the max is per query: a batch mixing a far-away query with a sharp one changes neither
    # (the published code shares the max across the batch and underflows to NaN here)
    far = torch.full_like(x[:1], 3.0)
    both = els_denoise(torch.cat([x[:1], far]), train, 3, ab, padding=padding, backend=backend)
    assert torch.isfinite(both).all()
    assert rel(both[:1], full[:1]) < 1e-12
    assert rel(both[1:], els_denoise(far, train, 3, ab, padding=padding, backend=backend)) < 1e-12


def test_reference_chunking_does_not_change_the_result(crops):
    train, held = crops[0], crops[1]
    ab = ad.alpha_bar_at(100)
    x = noisy_queries(held, ab, seed=4)
    a = els_denoise(x, train, 3, ab, padding="zeros", chunk_size=1, backend="reference")
    b = els_denoise(x, train, 3, ab, padding="zeros", chunk_size=64, backend="reference")
    assert rel(a, b) < 1e-13


def test_bad_inputs_name_the_argument(crops):
    train, held = crops[0][:, :, :8, :8], crops[1][:, :, :8, :8]
    x = unit(held)
    with pytest.raises(ValueError, match="padding"):
        els_denoise(x, train, 3, 0.5, padding="reflect")
    with pytest.raises(ValueError, match="patch_size"):
        els_denoise(x, train, 4, 0.5)
    with pytest.raises(ValueError, match="patch_size"):
        els_denoise(x, train, 9, 0.5, padding="circular")  # no fully-inside patch
    with pytest.raises(TypeError, match="patch_size"):
        els_denoise(x, train, 3.0, 0.5)
    with pytest.raises(ValueError, match="alpha_bar"):
        els_denoise(x, train, 3, 1.0)
    with pytest.raises(ValueError, match="temperature"):
        els_denoise(x, train, 3, 0.5, temperature=0)
    with pytest.raises(ValueError, match="x must be images"):
        els_denoise(x.reshape(2, -1), train, 3, 0.5)
    with pytest.raises(ValueError, match="train"):
        els_denoise(x, train[:, :, :7], 3, 0.5)
    with pytest.raises(ValueError, match="preset"):
        ad.ELSDenoiser(train, "cifar-11")
    with pytest.raises(ValueError, match="padding"):
        ad.ELSDenoiser(train, 3, padding="same")
    with pytest.raises(ValueError, match="patch_size"):
        ad.ELSDenoiser(train, 9)  # circular, 8x8 images
    with pytest.raises(ValueError, match=r"patch_size\[100\]"):
        ad.LSDenoiser(train, {100: 4})
    with pytest.raises(TypeError, match="patch_size"):
        ad.LSDenoiser(train, [3, 5])
    with pytest.raises(ValueError, match="empty"):
        ad.ELSDenoiser(train, {})


def test_denoisers_in_the_sampler(crops):
    train = crops[0][:, :, :8, :8]
    for den in (ad.LSDenoiser(train, 3), ad.ELSDenoiser(train, 3), ad.ELSDenoiser(train, "cifar10-unet", padding="zeros")):
        out = ad.sample(den, 2, (3, 8, 8), steps=4, seed=1)
        assert out.shape == (2, 3, 8, 8) and torch.isfinite(out).all()
    assert ad.ELSDenoiser(train, 3, padding="zeros").name == "bbels"


# ---------------------------------------------------------------- schedules


def test_published_tables():
    assert len(KAMB_GANGULI_SCHEDULES) == 10
    for name, entry in KAMB_GANGULI_SCHEDULES.items():
        assert len(entry["scales"]) == 20 and all(P % 2 == 1 for P in entry["scales"]), name
        assert entry["padding"] in ("zeros", "circular")
    assert KAMB_GANGULI_SCHEDULES["cifar10-unet"]["scales"][-1] == 25
    assert KAMB_GANGULI_SCHEDULES["mnist-resnet-circular"]["scales"][13] == 11


def test_schedule_mapping_by_nearest_log_snr():
    # by hand: log-SNR of the published steps i = 1..19 is -2 log tan(pi i / 40.32):
    # 5.100, 3.702, ..., -2.181 (i = 16), -2.762 (i = 17), -3.545, -4.802 (i = 19); this
    # library's (float32 linear schedule): t=0: 9.210, t=100: 2.144, t=200: 0.647,
    # t=300: -0.430, t=400: -1.427, t=500: -2.473, t=600: -3.641, t>=700: < -4.9
    want_steps = {0: 1, 10: 1, 20: 1, 100: 4, 200: 8, 300: 11, 400: 14, 500: 17, 600: 18, 700: 19, 900: 19, 999: 19}
    for t, i in want_steps.items():
        assert nearest_step(ad.alpha_bar_at(t)) == i, t
    s = PatchSchedule("cifar10-unet")
    assert s.table(ad.ddim_timesteps(10)) == {900: 25, 800: 25, 700: 25, 600: 17, 500: 15, 400: 11, 300: 7, 200: 7, 100: 5, 0: 3}
    assert PatchSchedule("CIFAR10_UNet")(500) == 15  # names are case- and underscore-insensitive
    m = PatchSchedule({900: 15, 500: 9, 0: 3})
    assert (m(900), m(500), m(0)) == (15, 9, 3)
    assert m(450) == 9 and m(950) == 15 and m(30) == 3  # nearest key by log-SNR
    assert PatchSchedule(7)(123) == 7


def test_calibrate_recovers_the_patch_size_of_an_els_model(crops):
    train = crops[0][:, :, :8, :8]
    model = ad.ELSDenoiser(train, 5, padding="zeros")  # a "network" that is bbELS with P = 5
    table, info = ad.calibrate_patch_sizes(model, train, patch_sizes=(3, 5, 7), padding="zeros", steps=3, samples=2,
                                           return_details=True)
    assert table == {666: 5, 333: 5, 0: 5}
    assert info["cosines"][333].shape == (2, 3)
    den = ad.ELSDenoiser(train, table, padding="zeros")
    assert den.patch_size(333) == 5
