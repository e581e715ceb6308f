"""The CPU backend of locality_denoise / optimal_denoise (csrc/cpu/locality_denoise.cpp):
against the float64 reference on random and real data, the plan's structure, its cache,
both kernels (AVX-512 and portable), the fixed-point path and thread-count invariance."""
import math

import numpy as np
import pytest
import torch

import analytic_diffusion as ad
from analytic_diffusion import _ext
from analytic_diffusion.ops.locality import cpu as _cpu
from analytic_diffusion.ops import locality_denoise_reference, merge_states, optimal_denoise_reference

from spec_dense import noisy_queries, unit

pytestmark = pytest.mark.skipif(not _cpu.available(), reason="_C built without the locality kernels")

C = _ext.cpu_module()


def rel(out, ref):
    ref = ref.double()
    return float((out.double() - ref).norm() / ref.norm())


def loc(x, train, M, ab, **kw):
    return ad.ops.locality_denoise(x, train, M, ab, backend="cpu", **kw)


def raw_run(plan, x, train, ab, *, chunk=0, allow_fixed=False, force_portable=False):
    """The kernel without the Python glue: (out, whether fixed point ran)."""
    B, n = x.shape
    out = torch.full((B, n), float("nan"), dtype=x.dtype)
    kind = {torch.uint8: 0, torch.float32: 1, torch.float64: 2}[train.dtype]
    fixed = C.locality_denoise_run(
        plan, x.data_ptr(), B, x.stride(0), x.stride(1), x.dtype == torch.float64,
        train.data_ptr(), train.shape[0], train.stride(0), train.stride(1), kind,
        math.sqrt(ab), 1 / (2 * (1 - ab)), chunk, out.data_ptr(), x.dtype == torch.float64, 0, 0, 0,
        allow_fixed, force_portable,
    )
    return out, fixed


@pytest.fixture(scope="module")
def real(crops, crop_filter):
    """200 uint8 training crops (16x16x3), 6 held-out ones, and masks per timestep."""
    masks = {t: ad.locality_mask(crop_filter, ad.alpha_bar_at(t), threshold=0.02) for t in (900, 500, 100, 10, 0)}
    return crops[:200], crops[200:206], masks


# ------------------------------------------------------------------------------ plans


def reconstruct_windows(plan):
    """Every group's window rebuilt from the plan's row adds and tree: [G, n] ints."""
    d = plan.decode_lookups()
    G, n, S = plan.num_groups, plan.n, plan.segment
    D = np.zeros((G, n + 1), dtype=np.int64)
    g, s, kind, idx = d["group"], d["segment"], d["kind"], d["index"]
    lo = s * S
    e, p, q = kind == 0, kind == 1, kind == 2
    np.add.at(D, (g[e], lo[e] + idx[e]), 1)  # e_i: pixel i
    np.add.at(D, (g[e], lo[e] + idx[e] + 1), -1)
    np.add.at(D, (g[p], lo[p]), 1)  # P_i: pixels [0, i) of the segment
    np.add.at(D, (g[p], lo[p] + idx[p]), -1)
    np.add.at(D, (g[q], lo[q]), -1)  # -P_i
    np.add.at(D, (g[q], lo[q] + idx[q]), 1)
    win = np.cumsum(D[:, :n], axis=1)
    parent = plan.parent
    for gg in plan.resolve_order:
        win[gg] += win[parent[gg]]
    return win


def mask_cases():
    g = torch.Generator().manual_seed(5)
    n = 70
    rnd = torch.rand(n, n, generator=g) < 0.4
    same = (torch.rand(n, 1, generator=g) < 0.5).expand(n, n).contiguous()  # identical columns
    sparse = torch.eye(n, dtype=torch.bool)
    sparse[3, 5] = True
    empty_col = rnd.clone()
    empty_col[:, 7] = False
    # banded windows: neighbours differ by a few pixels, so the tree is used
    i = torch.arange(n)
    band = (i[:, None] - i[None, :]).abs() <= 9
    return {"random": rnd, "identical": same, "sparse": sparse, "empty_column": empty_col, "band": band,
            "full": torch.ones(n, n, dtype=torch.bool)}


@pytest.mark.parametrize("case", list(mask_cases()))
@pytest.mark.parametrize("segment", [0, 16])
def test_plan_rebuilds_every_window(case, segment):
    M = mask_cases()[case]
    plan = _cpu.locality_plan(M, segment=segment)
    n = M.shape[0]
    win = reconstruct_windows(plan)
    gop = plan.group_of_pixel
    assert np.array_equal(win[gop].T, M.numpy().astype(np.int64))  # column m = window of pixel m
    # slots: the pixels of a group are contiguous and ascending; one-pixel groups come first
    off, pix = plan.group_offsets, plan.group_pixels
    assert sorted(pix.tolist()) == list(range(n))
    for g in range(plan.num_groups):
        assert np.all(gop[pix[off[g]:off[g + 1]]] == g) and np.all(np.diff(pix[off[g]:off[g + 1]]) > 0)
    assert np.all(np.diff(off)[: plan.singletons] == 1)
    # the tree is parent-first and only used where it saves lookups
    order = plan.resolve_order.tolist()
    pos = {g: i for i, g in enumerate(order)}
    assert len(pos) == len(order)
    assert set(order) == {g for g in range(plan.num_groups) if plan.parent[g] >= 0}
    for g in order:  # a parent that has a parent itself is resolved first
        assert pos.get(plan.parent[g], -1) < pos[g]
    assert plan.lookups <= plan.direct_lookups + (1 if case == "empty_column" else 0) * 8
    assert plan.padded_lookups % 8 == 0 and plan.padded_lookups >= plan.lookups
    assert plan.area == int(M.sum())
    assert (plan.num_groups == 1) == (case in ("identical", "full"))
    assert plan.full == (case == "full")
    if case == "band":
        assert plan.tree and plan.lookups < plan.direct_lookups


def test_plan_cache_by_content():
    M = mask_cases()["random"]
    p1 = _cpu.locality_plan(M)
    assert _cpu.locality_plan(M) is p1  # same tensor
    assert _cpu.locality_plan(M.clone()) is p1  # same content
    assert _cpu.locality_plan(M.double()) is p1  # a 0/1 float mask is the same binary mask
    assert _cpu.locality_plan(M.t().contiguous().t()) is p1  # strides do not matter
    M2 = M.clone()
    _cpu.locality_plan(M2)
    M2[0, 0] = ~M2[0, 0]  # in place: the version counter moves, the plan must change
    assert _cpu.locality_plan(M2) is not p1
    assert _cpu.locality_plan(torch.rand(5, 5, dtype=torch.float64)) is None  # real weights: no plan
    with torch.inference_mode():  # no version counter: found by content
        M3 = M.clone()
    assert _cpu.locality_plan(M3) is p1 and _cpu.locality_plan(M3) is p1


def test_registered_first_for_cpu_with_prepare():
    assert ad.available_backends("locality_denoise", "cpu")[0] == "cpu"
    assert ad.available_backends("optimal_denoise", "cpu")[0] == "cpu"
    b = ad.registry.select("locality_denoise", "cpu")
    M = mask_cases()["band"]
    _cpu.clear_plan_cache()
    b.prepare(M)
    assert len(_cpu._plans) == 1
    assert _cpu.locality_plan(M.clone()) is _cpu.locality_plan(M)


# ------------------------------------------------------------------ against the reference


@pytest.mark.parametrize("t", [900, 500, 100, 10, 0])
def test_real_crops_match_float64_reference(real, t):
    train, held, masks = real
    ab = ad.alpha_bar_at(t)
    M = masks[t]
    x = noisy_queries(held, ab, seed=t).reshape(6, -1)
    ref = locality_denoise_reference(x, train.reshape(200, -1), M, ab)
    out64 = loc(x, train, M, ab)
    assert out64.dtype == torch.float64 and torch.isfinite(out64).all()
    assert (out64 - ref).abs().max().item() < 1e-10
    out32 = loc(x.float(), train, M, ab)
    assert out32.dtype == torch.float32 and torch.isfinite(out32).all()
    assert rel(out32, ref) < 2e-5  # the bound is 1e-4


@pytest.mark.parametrize("t", [500, 100])
def test_fixed_point_path_runs_for_float32_and_is_accurate(real, t):
    train, held, masks = real
    ab = ad.alpha_bar_at(t)
    plan = _cpu.locality_plan(masks[t])
    x = noisy_queries(held, ab, seed=t).reshape(6, -1)
    tr = train.reshape(200, -1)
    ref = locality_denoise_reference(x, tr, masks[t], ab)
    out, fixed = raw_run(plan, x.float(), tr, ab, allow_fixed=True)
    assert fixed and rel(out, ref) < 2e-5
    out_p, fixed_p = raw_run(plan, x.float(), tr, ab, allow_fixed=True, force_portable=True)
    assert fixed_p and (out_p.double() - out.double()).abs().max().item() < 1e-6
    assert not raw_run(plan, x.float(), tr, ab)[1]  # not without permission (float64, states)
    # sharp softmax (t = 0): the error bound rules fixed point out
    assert not raw_run(_cpu.locality_plan(masks[0]), x.float(), tr, ad.alpha_bar_at(0), allow_fixed=True)[1]


def test_wssm_with_chunks_that_do_not_divide_n(real):
    train, held, masks = real
    t = 100
    ab = ad.alpha_bar_at(t)
    tr = train[:150]
    x = noisy_queries(held[:3], ab, seed=1).reshape(3, -1)
    for cs in (1, 7, 64, 149, 1000):
        ref = locality_denoise_reference(x, tr.reshape(150, -1), masks[t], ab, softmax="wssm", chunk_size=cs)
        out = loc(x, tr, masks[t], ab, softmax="wssm", chunk_size=cs)
        assert (out - ref).abs().max().item() < 1e-10, cs
        if cs in (7, 64):
            assert rel(loc(x.float(), tr, masks[t], ab, softmax="wssm", chunk_size=cs), ref) < 2e-5


def test_training_set_dtypes_agree(real):
    train, held, masks = real
    ab = ad.alpha_bar_at(100)
    x = noisy_queries(held[:2], ab).reshape(2, -1)
    y = unit(train).reshape(200, -1)
    ref = locality_denoise_reference(x, train.reshape(200, -1), masks[100], ab)
    for tr in (train, y, y.float(), y.half()):
        out = loc(x, tr, masks[100], ab)
        # float32/float16 images are rounded versions of y: compare with the reference on them
        exact = tr.dtype in (torch.uint8, torch.float64)
        ref_t = ref if exact else locality_denoise_reference(x, tr.double().reshape(200, -1), masks[100], ab)
        assert (out - ref_t).abs().max().item() < 1e-10, tr.dtype


def test_states_merge_with_reference_states(real):
    train, held, masks = real
    ab = ad.alpha_bar_at(100)
    M = masks[100]
    x = noisy_queries(held[:4], ab).reshape(4, -1)
    tr = train.reshape(200, -1)
    full = locality_denoise_reference(x, tr, M, ab)
    a = loc(x, tr[:83], M, ab, return_state=True)
    b = locality_denoise_reference(x, tr[83:], M, ab, return_state=True)
    assert a.mx.shape == a.l.shape == a.acc.shape == (4, x.shape[1])
    assert a.mx.dtype == torch.float64
    ref_a = locality_denoise_reference(x, tr[:83], M, ab, return_state=True)
    assert (a.mx - ref_a.mx).abs().max().item() < 1e-9  # the same definition of the running max
    for states in ((a, b), (b, a)):
        assert (merge_states(*states).result() - full).abs().max().item() < 1e-10
    a32 = loc(x.float(), tr[:83], M, ab, return_state=True)
    assert a32.mx.dtype == a32.l.dtype == a32.acc.dtype == torch.float64  # float64 whatever the query dtype
    assert rel(merge_states(a32, b).result(), full) < 2e-5
    o = ad.ops.optimal_denoise(x, tr[:50], ab, backend="cpu", return_state=True)
    assert o.mx.shape == o.l.shape == (4, 1) and o.acc.shape == (4, x.shape[1])
    ob = optimal_denoise_reference(x, tr[50:], ab, return_state=True)
    assert (merge_states(o, ob).result() - optimal_denoise_reference(x, tr, ab)).abs().max().item() < 1e-10


@pytest.mark.parametrize("n, N, B", [(13, 1, 1), (13, 17, 3), (1, 9, 2), (70, 33, 1), (70, 8, 5)])
@pytest.mark.parametrize("case", ["random", "sparse", "band", "empty_column"])
def test_odd_sizes_random_data(n, N, B, case):
    g = torch.Generator().manual_seed(n * 100 + N)
    M = mask_cases()[case][:n, :n].contiguous()
    train = torch.randint(0, 256, (N, n), generator=g, dtype=torch.uint8)
    x = torch.randn(B, n, generator=g, dtype=torch.float64)
    for ab in (0.05, 0.9, 0.999):
        ref = locality_denoise_reference(x, train, M, ab)
        assert (loc(x, train, M, ab) - ref).abs().max().item() < 1e-10
        assert rel(loc(x.float(), train, M, ab), ref) < 2e-5
        refw = locality_denoise_reference(x, train, M, ab, softmax="wssm", chunk_size=5)
        assert (loc(x, train, M, ab, softmax="wssm", chunk_size=5) - refw).abs().max().item() < 1e-10


def test_non_contiguous_inputs_give_identical_results(real):
    train, held, masks = real
    ab = ad.alpha_bar_at(100)
    M = masks[100]
    x = noisy_queries(held[:3], ab).reshape(3, -1)
    tr = train.reshape(200, -1)
    base64, base32 = loc(x, tr, M, ab), loc(x.float(), tr, M, ab)
    x_strided = torch.zeros(6, x.shape[1], dtype=torch.float64)[::2]
    x_strided.copy_(x)
    x_t = x.t().contiguous().t()
    tr_strided = torch.zeros(400, tr.shape[1], dtype=torch.uint8)[::2]
    tr_strided.copy_(tr)
    tr_t = tr.t().contiguous().t()
    for xx in (x_strided, x_t):
        for tt in (tr_strided, tr_t):
            assert not xx.is_contiguous() and not tt.is_contiguous()
            assert torch.equal(loc(xx, tt, M, ab), base64)
            assert torch.equal(loc(xx.float(), tt, M, ab), base32)
    assert torch.equal(loc(x, tr, M.t().contiguous().t(), ab), base64)  # mask strides


def test_real_valued_and_binary_float_masks(real, crop_filter):
    train, held, masks = real
    ab = ad.alpha_bar_at(200)
    Mt = ad.locality_mask(crop_filter, ab, threshold=0.0)
    x = noisy_queries(held[:2], ab).reshape(2, -1)
    tr = train[:60].reshape(60, -1)
    ref = locality_denoise_reference(x, tr, Mt, ab)
    out = loc(x, tr, Mt, ab)
    assert (out - ref).abs().max().item() < 1e-10
    assert loc(x.float(), tr, Mt, ab).dtype == torch.float32
    st = loc(x, tr, Mt, ab, return_state=True)
    assert (st.result() - ref).abs().max().item() < 1e-10
    M = masks[100]
    assert torch.equal(loc(x, tr, M.double(), ab), loc(x, tr, M, ab))


def test_single_group_masks(real):
    train, held, _ = real
    n = train[0].numel()
    tr = train[:100].reshape(100, -1)
    g = torch.Generator().manual_seed(0)
    col = torch.rand(n, 1, generator=g) < 0.3
    same = col.expand(n, n).contiguous()
    assert _cpu.locality_plan(same).num_groups == 1 and not _cpu.locality_plan(same).full
    for t in (900, 100, 10):
        ab = ad.alpha_bar_at(t)
        x = noisy_queries(held[:3], ab, seed=t).reshape(3, -1)
        ref = locality_denoise_reference(x, tr, same, ab)
        assert (loc(x, tr, same, ab) - ref).abs().max().item() < 1e-10
        ones = torch.ones(n, n, dtype=torch.bool)
        opt = ad.ops.optimal_denoise(x, tr, ab, backend="cpu")
        assert (opt - optimal_denoise_reference(x, tr, ab)).abs().max().item() < 1e-10
        assert (loc(x, tr, ones, ab) - opt).abs().max().item() < 1e-12
        assert rel(ad.ops.optimal_denoise(x.float(), tr, ab, backend="cpu"), opt) < 1e-6


def test_empty_window_averages_the_training_set():
    g = torch.Generator().manual_seed(2)
    n, N = 12, 9
    M = torch.rand(n, n, generator=g) < 0.5
    M[:, 4] = False  # pixel 4 sees nothing: every image has distance 0
    train = torch.randint(0, 256, (N, n), generator=g, dtype=torch.uint8)
    x = torch.randn(2, n, generator=g, dtype=torch.float64)
    out = loc(x, train, M, 0.7)
    assert torch.allclose(out[:, 4], unit(train)[:, 4].mean().expand(2), atol=1e-14)


def test_portable_kernel_matches_avx512(real):
    train, held, masks = real
    tr = train[:50].reshape(50, -1)
    for t in (900, 100, 0):
        ab = ad.alpha_bar_at(t)
        plan = _cpu.locality_plan(masks[t])
        x = noisy_queries(held[:2], ab, seed=t).reshape(2, -1)
        a, _ = raw_run(plan, x, tr, ab)
        b, _ = raw_run(plan, x, tr, ab, force_portable=True)
        assert (a - b).abs().max().item() < 1e-12
        w1, _ = raw_run(plan, x, tr, ab, chunk=9)
        w2, _ = raw_run(plan, x, tr, ab, chunk=9, force_portable=True)
        assert (w1 - w2).abs().max().item() < 1e-12


def test_result_independent_of_thread_count(real):
    train, held, masks = real
    ab = ad.alpha_bar_at(500)
    x = noisy_queries(held[:2], ab).reshape(2, -1)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = [loc(x, train, masks[500], ab), loc(x.float(), train, masks[500], ab)]
        torch.set_num_threads(2)
        two = [loc(x, train, masks[500], ab), loc(x.float(), train, masks[500], ab)]
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(a, b) for a, b in zip(one, two))


def test_locality_denoiser_uses_the_cpu_backend(crops, crop_moments):
    den = ad.LocalityDenoiser(crops[:100], moments=crop_moments)
    ts = [500, 100]
    _cpu.clear_plan_cache()
    den.prepare(ts)
    assert len(_cpu._plans) == 2  # one plan per mask, built ahead of sampling
    ab = ad.alpha_bar_at(100)
    x = noisy_queries(crops[200:202], ab).float()
    out = den(x, 100)
    ref = locality_denoise_reference(x.reshape(2, -1).double(), crops[:100].reshape(100, -1), den.mask(100), ab)
    assert rel(out.reshape(2, -1), ref) < 2e-5
    assert len(_cpu._plans) == 2  # the call reused the prepared plan
