"""Certified pruning (docs/algorithms.md §14; ops/pruning.py) in the CPU backends of optimal_denoise and
nearest_denoise: the bound never drops an image that matters, pruning really skips images, and
the pruned results equal the unpruned kernel's (within 1e-12 relative) and the float64
reference, adversarially: duplicated training images, queries equal to (scaled) training
images, near-duplicates one grey level apart, t <= 10 and t >= 900, uint8 and float data,
non-contiguous inputs."""
from __future__ import annotations

import math

import pytest
import torch

import analytic_diffusion as ad
from analytic_diffusion.ops import merge_states, nearest_denoise_reference, optimal_denoise_reference, pruning
from analytic_diffusion.ops.locality import cpu as locality_cpu
from analytic_diffusion.ops.nearest import cpu as nearest_cpu

pytestmark = pytest.mark.skipif(not locality_cpu.available(), reason="compiled module _C not built")

N, B, SIZE = 600, 5, 8  # N above the backends' PRUNE_MIN_N


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def data(kind: str, seed: int = 0):
    """Natural crops with adversarial structure: images 1 and 2 duplicate image 0, image 4 is
    image 3 one grey level brighter in one pixel."""
    u = ad.data.natural_crops(N + B, size=SIZE, seed=seed).reshape(N + B, -1)
    u[1] = u[0]
    u[2] = u[0]
    u[4] = u[3]
    u[4, 7] = min(int(u[3, 7]) + 1, 255) if int(u[3, 7]) < 255 else 254
    train, held = u[:N], u[N:]
    if kind == "float32":
        train = (train.double() / 127.5 - 1).float()
    elif kind == "float64":
        train = train.double() / 127.5 - 1
    return train, held


def queries(held, t, train, exact_index=None, seed=0):
    ab = ad.alpha_bar_at(t)
    g = torch.Generator().manual_seed(seed + t)
    y0 = held.double() / 127.5 - 1
    x = math.sqrt(ab) * y0 + math.sqrt(1 - ab) * torch.randn(y0.shape, generator=g, dtype=torch.float64)
    if exact_index is not None:  # query 0 is exactly a * (a duplicated training image)
        y = train[exact_index].double()
        x[0] = math.sqrt(ab) * (y / 127.5 - 1 if train.dtype == torch.uint8 else y)
    return x, ab


@pytest.mark.parametrize("kind", ["uint8", "float32", "float64"])
@pytest.mark.parametrize("t", [0, 5, 10, 100, 300, 900, 999])
def test_survivors_contain_every_image_that_matters(kind, t):
    """The guarantee itself: every image with d_k <= min d + margin survives (float64 truth)."""
    train, held = data(kind)
    x, ab = queries(held, t, train, exact_index=0)
    margin = pruning.softmax_margin(N, ab, 1.0)
    offsets, index = pruning.survivors(x, train, ab, margin)
    a = math.sqrt(ab)
    y = train.double() / 127.5 - 1 if train.dtype == torch.uint8 else train.double()
    d = ((x[:, None, :] - a * y[None]) ** 2).sum(-1)
    for b in range(B):
        kept = set(index[offsets[b] : offsets[b + 1]].tolist())
        must = set(torch.nonzero(d[b] <= d[b].min() + margin).reshape(-1).tolist())
        assert must <= kept
        assert torch.all(index[offsets[b] + 1 : offsets[b + 1]] > index[offsets[b] : offsets[b + 1] - 1])  # ascending


@pytest.mark.parametrize("kind", ["uint8", "float32", "float64"])
@pytest.mark.parametrize("t", [0, 5, 10, 100, 300, 900])
@pytest.mark.parametrize("xdtype", [torch.float32, torch.float64])
def test_optimal_pruned_equals_unpruned(kind, t, xdtype):
    train, held = data(kind)
    x, ab = queries(held, t, train, exact_index=1)
    x = x.to(xdtype)
    full = locality_cpu.optimal_denoise_cpu(x, train, ab, prune=False)
    pruned = locality_cpu.optimal_denoise_cpu(x, train, ab)
    stats = pruning.last_stats()
    assert stats["pairs"] == B * N
    if t <= 100:  # sharp softmax: most images are provably irrelevant
        assert stats["skipped_fraction"] > 0.5
    assert not torch.isnan(pruned).any()
    assert pruned.dtype == xdtype
    assert rel(pruned, full) <= (1e-12 if xdtype == torch.float64 else 1e-7)
    ref = optimal_denoise_reference(x.double(), train, ab)
    assert rel(pruned, ref) <= (1e-10 if xdtype == torch.float64 else 1e-6)


@pytest.mark.parametrize("t", [0, 10, 200])
def test_optimal_pruned_state_is_mergeable(t):
    """States of two shards, each pruned on its own, merge to the unpruned whole (§5.3)."""
    train, held = data("uint8", seed=3)
    x, ab = queries(held, t, train, exact_index=2)
    whole = locality_cpu.optimal_denoise_cpu(x, train, ab, return_state=True, prune=False)
    s1 = locality_cpu.optimal_denoise_cpu(x, train[:300], ab, return_state=True)
    skipped1 = pruning.last_stats()["skipped"]
    s2 = locality_cpu.optimal_denoise_cpu(x, train[300:], ab, return_state=True)
    assert skipped1 + pruning.last_stats()["skipped"] > 0
    merged = merge_states(s1, s2)
    assert rel(merged.result(), whole.result()) < 1e-12
    # the max logit is an image that is always kept: identical
    assert torch.equal(torch.maximum(s1.mx, s2.mx), whole.mx)


@pytest.mark.parametrize("t", [0, 10])
def test_optimal_near_duplicates_keep_their_weight(t):
    """Query = a * image 3; image 4 differs by one grey level in one pixel: at t <= 10 its weight
    is a sizeable fraction, so it must survive, and the output is the unpruned one."""
    train, held = data("uint8")
    x, ab = queries(held, t, train)
    x[0] = math.sqrt(ab) * (train[3].double() / 127.5 - 1)
    full = locality_cpu.optimal_denoise_cpu(x, train, ab, prune=False)
    pruned = locality_cpu.optimal_denoise_cpu(x, train, ab)
    assert pruning.last_stats()["skipped_fraction"] > 0.9
    assert rel(pruned, full) < 1e-12
    assert not torch.equal(full[0], train[3].double() / 127.5 - 1)  # image 4 contributes


def test_optimal_pruned_non_contiguous_inputs_unchanged():
    train, held = data("uint8")
    x, ab = queries(held, 10, train)
    xt = x.t().contiguous().t()  # column-major [B, n]
    tr = torch.stack([train, train], 2).reshape(N, -1)[:, ::2]  # element stride 2
    assert torch.equal(tr, train)
    x_copy, tr_copy = xt.clone(), tr.clone()
    out = ad.ops.optimal_denoise(xt, tr, ab, backend="cpu")
    assert pruning.last_stats()["skipped"] > 0
    assert torch.equal(xt, x_copy) and torch.equal(tr, tr_copy)
    assert rel(out, optimal_denoise_reference(x, train, ab)) < 1e-10


def test_feature_cache_follows_in_place_writes():
    """The cached norms belong to the data: an in-place write recomputes them (else the bound
    would be wrong)."""
    train, held = data("float64")
    x, ab = queries(held, 0, train)
    ad.ops.optimal_denoise(x, train, ab, backend="cpu")
    train[:] = torch.flip(train, [0])  # same tensor, new content
    out = ad.ops.optimal_denoise(x, train, ab, backend="cpu")
    assert rel(out, optimal_denoise_reference(x, train, ab)) < 1e-10


@pytest.mark.parametrize("kind", ["uint8", "float32"])
@pytest.mark.parametrize("t", [0, 10, 300, 900])
def test_nearest_pruned_equals_unpruned(kind, t):
    train, held = data(kind)
    x, ab = queries(held, t, train, exact_index=2)  # a tie among images 0, 1, 2: index 0 must win
    full = nearest_cpu.nearest_denoise_cpu(x, train, ab, return_state=True, prune=False)
    pruned = nearest_cpu.nearest_denoise_cpu(x, train, ab, return_state=True)
    assert pruning.last_stats()["skipped_fraction"] > 0.5
    assert pruned.index[0].item() == 0
    assert torch.equal(pruned.index, full.index)
    assert torch.equal(pruned.dist, full.dist)  # the same compiled distances, bit for bit
    assert torch.equal(pruned.index, nearest_denoise_reference(x, train, ab, return_state=True).index)
    out = ad.ops.nearest_denoise(x, train, ab, backend="cpu")
    assert torch.equal(out, nearest_denoise_reference(x, train, ab))


def test_pruned_run_rejects_bad_subsets():
    train, held = data("uint8")
    x, ab = queries(held, 10, train)
    mod = locality_cpu._module()
    plan = locality_cpu.full_plan(x.shape[1])
    out = torch.empty_like(x)
    for offsets, index in [([0, 2, 2, 3, 4, 5], [0, 1, 2, 3, 4]),  # an empty query
                           ([0, 2, 3, 4, 5, 6], [1, 0, 2, 3, 4, 5]),  # not ascending
                           ([0, 1, 2, 3, 4, 5], [0, 1, 2, 3, N])]:  # out of range
        off, idx = torch.tensor(offsets), torch.tensor(index)
        with pytest.raises(ValueError, match="full_pruned_run"):
            mod.full_pruned_run(plan, x.data_ptr(), B, x.stride(0), x.stride(1), True, train.data_ptr(), N,
                                train.stride(0), train.stride(1), 0, 0.9, 1.0, off.data_ptr(), idx.data_ptr(),
                                False, out.data_ptr(), True, 0, 0, 0, 0)


def test_nearest_unscaled_pruned():
    """``scaled=False`` (alpha_bar taken as 1): the pruned backend agrees with the reference."""
    train, held = data("uint8")
    x, ab = queries(held, 300, train, exact_index=1)
    out = ad.ops.nearest_denoise(x, train, ab, backend="cpu", scaled=False)
    assert pruning.last_stats()["skipped"] > 0
    assert torch.equal(out, ad.ops.nearest_denoise(x, train, ab, backend="reference", scaled=False))


# ------------------------------------------------------------------ the integer bound (uint8 sets)
def _exact_d(x, train, a):
    y = train.double() / 127.5 - 1
    return ((x[:, None, :] - a * y[None]) ** 2).sum(-1)


def _int_bounds(x, train, ab, levels, portable):
    B_, N_ = x.shape[0], train.shape[0]
    L = torch.full((B_, N_), float("nan"), dtype=torch.float64)
    U = torch.full((B_,), float("nan"), dtype=torch.float64)
    tf = pruning.train_features(train)
    margin = pruning.softmax_margin(N_, ab, 1.0)
    offsets, index = pruning._survivors_u8(x.double(), train, tf, math.sqrt(ab), margin, levels,
                                           force_portable=portable, lower=L, upper=U)
    return L, U, offsets, index, margin


@pytest.mark.parametrize("levels", [1, 2])
@pytest.mark.parametrize("t", [0, 5, 10, 300, 900, 999])
def test_integer_bound_is_certified(levels, t):
    """L <= d for every pair and min d <= U, on an odd pixel count (vector and tile tails) and an
    image count that is no multiple of 16 or 4 (AMX blocks, then 4-image blocks, then a short
    one), with duplicated images and a query equal to a scaled training image; the accelerated
    path (AMX / VNNI where the CPU has them) gives the portable path's bounds bit for bit."""
    n_img = 607
    u = ad.data.natural_crops(n_img + 4, size=7, seed=3).reshape(n_img + 4, -1)  # n = 147
    u[1] = u[0]
    u[600] = u[0]
    train, held = u[:n_img], u[n_img:]
    x, ab = queries(held, t, train, exact_index=600)
    a = math.sqrt(ab)
    d = _exact_d(x, train, a)
    L, U, offsets, index, margin = _int_bounds(x, train, ab, levels, portable=False)
    Lp, Up, offp, idxp, _ = _int_bounds(x, train, ab, levels, portable=True)
    assert torch.equal(L, Lp) and torch.equal(U, Up) and torch.equal(offsets, offp) and torch.equal(index, idxp)
    assert torch.all(L <= d)
    dmin = d.min(1).values
    assert torch.all(U >= dmin) and torch.all(U <= dmin + 1e-6 * (1 + dmin))
    for b in range(x.shape[0]):
        kept = set(index[offsets[b] : offsets[b + 1]].tolist())
        assert set(torch.nonzero(d[b] <= dmin[b] + margin).reshape(-1).tolist()) <= kept
    assert {0, 1, 600} <= set(index[offsets[0] : offsets[1]].tolist())  # the query's own image and its duplicates
    if t <= 10:
        assert index.numel() < 0.5 * x.shape[0] * n_img  # and it prunes


@pytest.mark.parametrize("scale", [0.0, 1e-30, 1e3])
def test_integer_bound_extreme_queries(scale):
    """All-zero, tiny and huge queries (quantisation scales 1, 2^-100..., 2^4...): still a lower bound."""
    train, held = data("uint8")
    x = torch.randn(3, train.shape[1], generator=torch.Generator().manual_seed(1), dtype=torch.float64) * scale
    x[1] = x[1].abs()
    ab = ad.alpha_bar_at(100)
    L, U, offsets, index, _ = _int_bounds(x, train, ab, 2, portable=False)
    d = _exact_d(x, train, math.sqrt(ab))
    assert torch.all(L <= d) and torch.all(U >= d.min(1).values)
    assert torch.equal(L, _int_bounds(x, train, ab, 2, portable=True)[0])


def test_integer_bound_long_rows_do_not_wrap():
    """n > 65536 pixels of 255 against query bytes of 127: the int32 sums (2.3e9 > 2^31) must be
    flushed before they wrap."""
    n = 70001
    train = torch.full((5, n), 255, dtype=torch.uint8)
    train[2, : n // 2] = 0
    x = torch.full((1, n), 3.0, dtype=torch.float64)  # every byte of the first level is 127
    ab = 0.5
    for portable in (False, True):
        L, U, _, _, _ = _int_bounds(x, train, ab, 2, portable=portable)
        d = _exact_d(x, train, math.sqrt(ab))
        assert torch.all(L <= d) and torch.all(L >= d - 1e-6 * d)  # tight too: a wrapped sum is off by 2^32
        assert U.item() >= d.min().item()


def test_quantise_is_exact():
    """x = sum_l s_l q_l + r exactly, |q| <= 127, s_l powers of two, rn / rmax bound r."""
    x = torch.randn(4, 301, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * torch.tensor([[1e-3], [1.0], [7.0], [0.0]])
    for levels in (1, 2, 3):
        q, s, Q, rn, rmax = pruning.quantise(x, levels)
        q = q.reshape(levels, 4, -1).astype("float64")
        assert abs(q).max() <= 127
        rec = sum(s[:, l][:, None] * q[l] for l in range(levels))
        r = x.numpy() - rec
        assert (abs(r).max(1) <= rmax).all() and ((r**2).sum(1) ** 0.5 <= rn).all()
        assert (Q == q.sum(2).T).all()
        assert all(float(v).hex().startswith(("0x1.0000000000000p", "0x0.0p")) for v in s.reshape(-1))


@pytest.mark.parametrize("method", ["int8", "int8-portable", "gemm"])
@pytest.mark.parametrize("t", [0, 10, 300])
def test_optimal_and_nearest_pruned_every_bound_odd_sizes(monkeypatch, method, t):
    """Each bound for uint8 sets (integer, its portable twin, the float32 GEMM) behind the
    optimal and nearest backends, on 7x7x3 images (odd n) and N = 601: the pruned optimal equals
    the unpruned to 1e-12 with the state's max exact, the pruned nearest the unpruned bit for bit."""
    monkeypatch.setattr(pruning, "METHOD", method)
    u = ad.data.natural_crops(601 + 5, size=7, seed=4).reshape(606, -1)
    u[7] = u[3]
    train, held = u[:601], u[601:]
    x, ab = queries(held, t, train, exact_index=3)
    for xd in (torch.float32, torch.float64):
        xx = x.to(xd)
        full = locality_cpu.optimal_denoise_cpu(xx, train, ab, return_state=True, prune=False)
        st = locality_cpu.optimal_denoise_cpu(xx, train, ab, return_state=True)
        assert t > 10 or pruning.last_stats()["skipped_fraction"] > 0.5  # (7x7 crops: flat at t = 300)
        assert torch.equal(st.mx, full.mx)
        assert rel(st.result(), full.result()) < 1e-12
        out = locality_cpu.optimal_denoise_cpu(xx, train, ab)
        assert out.dtype == xd and rel(out, full.result()) < (1e-12 if xd == torch.float64 else 1e-6)
    nf = nearest_cpu.nearest_denoise_cpu(x, train, ab, return_state=True, prune=False)
    npr = nearest_cpu.nearest_denoise_cpu(x, train, ab, return_state=True)
    assert pruning.last_stats()["skipped_fraction"] > 0.5
    assert torch.equal(npr.index, nf.index) and torch.equal(npr.dist, nf.dist) and npr.index[0].item() == 3


@pytest.mark.parametrize("t", [300, 900])
def test_optimal_pruned_images_shared_by_many_queries_threads(t):
    """The pruned exact pass converts each surviving uint8 image once for every query that keeps
    it (docs/algorithms.md §14.3): 13 queries (groups of 4 and a remainder) sharing most images,
    enough survivors for the parallel path, one and two threads give the same state, with the
    unpruned run's max logit exactly and its result to 1e-12."""
    u = ad.data.natural_crops(N + 13, size=SIZE, seed=5).reshape(N + 13, -1)
    u[9] = u[2]
    train, held = u[:N], u[N:]
    x, ab = queries(held, t, train, exact_index=2)
    x[1] = x[0]  # two identical queries keep the same images
    full = locality_cpu.optimal_denoise_cpu(x, train, ab, return_state=True, prune=False)
    before = torch.get_num_threads()
    states = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            states.append(locality_cpu.optimal_denoise_cpu(x, train, ab, return_state=True))
    finally:
        torch.set_num_threads(before)
    assert pruning.last_stats()["pairs"] == 13 * N
    for st in states:
        assert torch.equal(st.mx, full.mx)
        assert rel(st.result(), full.result()) < 1e-12
    assert torch.equal(states[0].mx, states[1].mx) and torch.equal(states[0].l, states[1].l)
    assert torch.equal(states[0].acc, states[1].acc)
    assert torch.equal(states[0].result()[0], states[0].result()[1])
