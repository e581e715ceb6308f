"""Certified pruning in the CPU windowed locality kernel (docs/algorithms.md §14.6): an
(image, 8 pixels, group) softmax update is skipped only when every logit is more than
64 ln 2 + ln N below the running maximum. Adversarial cases: ties (duplicated training
images), queries equal to training images, t <= 10 and t >= 900, uint8 / float32 / float64
training data, states, WSSM, and a margin that is too small (which must show)."""
import math

import pytest
import torch

import analytic_diffusion as ad
from analytic_diffusion import _ext
from analytic_diffusion.ops import merge_states, windowed_locality_denoise
from analytic_diffusion.ops.pruning import softmax_margin
from analytic_diffusion.ops.windowed_locality import cpu as wl_cpu
from spec_dense import dense_locality, dense_window_mask, noisy_queries, unit

pytestmark = pytest.mark.skipif(not wl_cpu.available(), reason="compiled _C without the windowed kernel")


def rel(out, ref):
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


@pytest.fixture(scope="module")
def crops():
    c = ad.data.natural_crops(140, size=8, seed=11)  # real images: uint8 [140, 3, 8, 8]
    return c[:128], c[128:]


def holey(C, k, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.rand(C, C, k, k, generator=g) < 0.8
    w[torch.arange(C), torch.arange(C), k // 2, k // 2] = True
    return w


def both(x, train, window, ab, **kw):
    st = {}
    pruned = wl_cpu.windowed_locality_denoise_cpu(x, train, window, ab, stats=st, **kw)
    plain = wl_cpu.windowed_locality_denoise_cpu(x, train, window, ab, prune=False, **kw)
    return pruned, plain, st


def dense(x, train, window, ab):
    B, C, H, W = x.shape
    M = dense_window_mask(window, H, W)
    return dense_locality(x.double().reshape(B, -1), unit(train).reshape(train.shape[0], -1), M, ab).reshape(x.shape)


@pytest.mark.parametrize("t", [999, 900, 300, 100, 10, 1, 0])
def test_pruned_equals_unpruned_and_dense_transcription(crops, t):
    train, held = crops
    ab = ad.alpha_bar_at(t)
    x = noisy_queries(held[:4], ab, seed=t)
    for window in (holey(3, 5, seed=t), torch.ones(3, 3, 7, 7, dtype=torch.bool)):
        pruned, plain, st = both(x, train, window, ab)
        assert torch.isfinite(pruned).all()
        assert rel(pruned, plain) < 1e-12, t
        assert rel(pruned, dense(x, train, window, ab)) < 1e-10, t
        assert st["skip_logit"] == pytest.approx(64 * math.log(2) + math.log(len(train)))
        assert (st["warm_images"] > 0) == (ab >= 0.3)  # warm start by default where the softmax is sharp
        # forced warm start at every noise level: still the unpruned result
        warm = wl_cpu.windowed_locality_denoise_cpu(x, train, window, ab, warm_start=True, stats=st)
        assert st["warm_images"] > 0 and rel(warm, plain) < 1e-12, t
        if t <= 10:  # the sharp end: the bound really skips (an assertion that can fail)
            assert st["skipped_fraction"] > 0.5, st
        if t >= 900:  # flat softmax: nothing is 45 logits below the best
            assert st["skipped_fraction"] < 0.01, st


def test_ties_duplicates_and_queries_equal_to_training_images(crops):
    train, held = crops
    # every image four times, in blocks (exact ties in every logit), plus the held-out ones
    dup = torch.cat([train[:40]] * 4 + [held], 0)
    window = holey(3, 5, seed=3)
    for t in (0, 1, 10, 200, 900):
        ab = ad.alpha_bar_at(t)
        a = math.sqrt(ab)
        # queries: a*y_k exactly (distance 0 to the image and to its copies), y_k itself, a noisy one
        x = torch.stack([a * unit(dup[5]), unit(dup[77]), noisy_queries(held[:1], ab, seed=1)[0].double()])
        for tr in (dup, unit(dup), unit(dup).float()):
            pruned, plain, st = both(x, tr, window, ab)
            assert rel(pruned, plain) < 1e-12, (t, tr.dtype)
            assert rel(pruned, dense(x, tr, window, ab)) < 1e-10, (t, tr.dtype)
        if t <= 10:
            assert st["skipped_fraction"] > 0.5, (t, st)
        if t == 0:  # the softmax sits on the four copies of the image (up to dark pixels that other images match)
            assert rel(pruned[0], unit(dup[5])) < 1e-6


def test_float32_queries_and_float_training_sets(crops):
    train, held = crops
    window = holey(3, 7, seed=5)
    for t in (900, 100, 10):
        ab = ad.alpha_bar_at(t)
        x = noisy_queries(held[:5], ab, seed=t + 3).float()
        for tr in (train, unit(train).float()):
            pruned, plain, _ = both(x, tr, window, ab)
            assert pruned.dtype == torch.float32
            assert rel(pruned, plain) < 1e-7  # float32 output rounding only
            assert rel(pruned, dense(x, tr, window, ab)) < 1e-6


def test_states_keep_the_max_and_merge(crops):
    train, held = crops
    window = holey(3, 5, seed=9)
    ab = ad.alpha_bar_at(20)
    x = noisy_queries(held[:3], ab, seed=4)
    sp = wl_cpu.windowed_locality_denoise_cpu(x, train, window, ab, return_state=True)
    su = wl_cpu.windowed_locality_denoise_cpu(x, train, window, ab, return_state=True, prune=False)
    assert torch.equal(sp.mx, su.mx)  # the maximum is a computed logit: never skipped, never invented
    # l and acc: the skipped weights (< 2^-64 of l) plus the kernel's exp polynomial (< 1e-11
    # relative), which rescales differently when the running max starts at the warm-start value
    assert ((sp.l - su.l).abs() / su.l).max().item() < 1e-10
    assert ((sp.acc - su.acc).abs() / su.l).max().item() < 1e-10
    assert rel(sp.result(), su.result()) < 1e-12
    # shards pruned separately still merge (each shard's skipped weights < 2^-64 of its own l)
    s1 = wl_cpu.windowed_locality_denoise_cpu(x, train[:50], window, ab, return_state=True)
    s2 = wl_cpu.windowed_locality_denoise_cpu(x, train[50:], window, ab, return_state=True)
    assert rel(merge_states(s1, s2).result(), su.result()) < 1e-12


def test_wssm_pruned_matches_reference(crops):
    train, held = crops
    window = holey(3, 5, seed=2)
    for t in (10, 300):
        ab = ad.alpha_bar_at(t)
        x = noisy_queries(held[:3], ab, seed=t)
        for cs in (16, 50):
            want = windowed_locality_denoise(x, train, window, ab, softmax="wssm", chunk_size=cs, backend="reference")
            got = windowed_locality_denoise(x, train, window, ab, softmax="wssm", chunk_size=cs, backend="cpu")
            assert rel(got, want) < 1e-10, (t, cs)


def _raw(x, train, window, ab, skip):
    """The compiled kernel with an explicit logit margin (exact mode, warm start on)."""
    B, C, H, W = x.shape
    a, s2 = ad.schedule.noise_level(ab)
    out = torch.full((B, C * H * W), float("nan"), dtype=torch.float64)
    w8 = window.to(torch.bool).view(torch.uint8)
    _ext.require_cpu(("windowed_locality_run",), "windowed locality").windowed_locality_run(
        x.data_ptr(), B, C, H, W, *x.stride(), True, train.data_ptr(), train.shape[0], *train.stride(), _ext.TRAIN_KIND[train.dtype],
        w8.data_ptr(), w8.shape[-1], *w8.stride(), a, 1.0 / (2.0 * s2), 0, out.data_ptr(), True, 0, 0, 0, 0, False, skip, True,
    )
    return out.reshape(x.shape)


def test_a_margin_too_small_shows_and_the_certified_one_does_not(crops):
    """The tests above could not see a wrong bound if nothing near the margin mattered: with a
    margin of 3 logits the result moves by far more than 1e-12, with 64 ln 2 + ln N it does not."""
    train, held = crops
    window = holey(3, 5, seed=7)
    ab = ad.alpha_bar_at(200)
    x = noisy_queries(held[:4], ab, seed=2)
    plain = wl_cpu.windowed_locality_denoise_cpu(x, train, window, ab, prune=False)
    margin = softmax_margin(len(train), ab, 1.0) / (2 * (1 - ab))
    assert margin == pytest.approx(64 * math.log(2) + math.log(len(train)))
    assert rel(_raw(x, train, window, ab, margin), plain) < 1e-12
    assert rel(_raw(x, train, window, ab, 3.0), plain) > 1e-6
    with pytest.raises(ValueError, match="skip_logit"):
        _raw(x, train, window, ab, 0.0)


def test_thread_count_independence_with_pruning(crops):
    train, held = crops
    window = holey(3, 5, seed=13)
    ab = ad.alpha_bar_at(10)
    x = noisy_queries(held[:6], ab, seed=5)
    full = wl_cpu.windowed_locality_denoise_cpu(x, train, window, ab)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = wl_cpu.windowed_locality_denoise_cpu(x, train, window, ab)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, full)
    assert wl_cpu.last_stats()["skipped_fraction"] > 0.5
