"""Triton backend of locality_denoise and optimal_denoise (python/analytic_diffusion/ops/locality/triton.py)
against the float64 reference (docs/algorithms.md §5, §6).

Where each part runs:
  * everywhere: the host-side planning (per-mask block lists, content keys, the cache,
    training-set splits, the k-independent shift) and backend selection;
  * Triton's CPU interpreter: every kernel path on tiny shapes (n = 48 or 192, N not a
    multiple of any block): the tests marked ``triton_interpret``, collected only in a
    process started with TRITON_INTERPRET=1 (`.ci/run`'s interpreter step,
    ``TRITON_INTERPRET=1 python -m pytest -m triton_interpret tests``), because Triton
    reads the variable when a kernel is first built and the package registers the
    interpreter's CPU device at import, both before this module runs;
  * a CUDA machine: the same cases at larger shapes, compiled for the GPU, with the
    autotuned launch shapes.
Accuracy is measured as ||out - ref|| / ||ref|| against float64; the target is 1e-3 at
every DDIM timestep (the fp16 tensor-core distances carry ~5e-4 relative rounding per
term; the default precision policy and the shift keep the result well inside).
"""
from __future__ import annotations

import importlib.util
import math
import os

import pytest
import torch

import analytic_diffusion as ad
from analytic_diffusion import registry as _registry
from analytic_diffusion.ops.locality import triton as _triton
from analytic_diffusion.ops.locality.plan_cache import mask_key
from analytic_diffusion.ops import SoftmaxState, merge_states

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
HAS_TRITON = importlib.util.find_spec("triton") is not None
HAS_CUDA = torch.cuda.is_available()
REF_L = ad.ops.locality_denoise_reference
REF_O = ad.ops.optimal_denoise_reference
TRI_L = _triton.locality_denoise_triton
TRI_O = _triton.optimal_denoise_triton

interp = pytest.mark.triton_interpret  # collected only with TRITON_INTERPRET=1 (tests/conftest.py)
needs_cuda_triton = pytest.mark.skipif(not (HAS_CUDA and HAS_TRITON and not INTERPRET), reason="needs a CUDA device and Triton (not interpreted)")

GPU_BLOCKS = dict(BB=8, BK=16, BM=64)  # fixed launch shape: one compile per variant, no autotuning
TOL = 1e-3  # the target: relative error (norm) vs float64 at every timestep
TIMESTEPS = [900, 500, 100, 10, 0]


# --------------------------------------------------------------------------- helpers
def rel(out, ref) -> float:
    out, ref = out.double().cpu(), ref.double().cpu()
    return float((out - ref).norm() / ref.norm())


def unit(u: torch.Tensor) -> torch.Tensor:
    return (u.double() - 127.5) / 127.5 if u.dtype == torch.uint8 else u.double()


def random_case(B, N, n, seed, u8=True, density=0.3, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    train = torch.randint(0, 256, (N, n), generator=g, dtype=torch.uint8)
    if not u8:
        train = (torch.rand(N, n, generator=g, dtype=torch.float64) * 2 - 1).float()
    x = torch.randn(B, n, generator=g)
    M = (torch.rand(n, n, generator=g) < density) | torch.eye(n, dtype=torch.bool)
    return x.to(device), train.to(device), M.to(device)


def noisy(clean_u8: torch.Tensor, ab: float, seed: int) -> torch.Tensor:
    """float64 x_t = a x0 + sqrt(1 - ab) eps from held-out clean images (flattened)."""
    g = torch.Generator().manual_seed(seed)
    x0 = unit(clean_u8).reshape(clean_u8.shape[0], -1)
    return math.sqrt(ab) * x0 + math.sqrt(1 - ab) * torch.randn(x0.shape, generator=g, dtype=torch.float64)


_POOL: dict = {}
_POOL_SIZE = {8: 80, 32: 1100}  # the last 10 images are the held-out queries


def crops_case(size: int, N: int, B: int):
    """Natural crops: uint8 train [N, n], held-out clean images [B, 3, size, size], and the
    Wiener filter of other crops (for the masks)."""
    if size not in _POOL:
        pool = ad.data.natural_crops(_POOL_SIZE[size], size=size, seed=0)
        # never the interpreted Triton moments backend (slow): the exact CPU or reference one
        backend = next(b for b in ad.available_backends("moments", "cpu") if b != "triton")
        filt = ad.WienerFilter(ad.estimate_moments(ad.data.natural_crops({8: 400, 32: 5000}[size], size=size, seed=1), backend=backend))
        _POOL[size] = (pool, filt)
    pool, filt = _POOL[size]
    assert N <= pool.shape[0] - 10 and B <= 10
    return pool[:N].reshape(N, -1), pool[-10:][:B], filt


def block_diagonal_mask(n: int, bj: int, bm: int) -> torch.Tensor:
    """Windows that leave whole (BJ x BM) mask blocks empty, a few empty windows too."""
    i = torch.arange(n)
    M = (i[:, None] // bj) == (i[None, :] // bm)  # block-diagonal bands
    M[:, 5] = False  # an empty window: the softmax is uniform there
    M[3, n - 1] = True  # one stray entry in an otherwise empty block
    return M


# --------------------------------------------------------------------------- no Triton execution
def test_mask_plan_block_lists_are_the_nonzero_blocks():
    n, bj, bm = 70, 16, 32
    M = block_diagonal_mask(n, bj, bm)
    plan = _triton._MaskPlan(M, bj, (bm, 16))
    assert not plan.single
    assert plan.mask16.dtype == torch.float16 and plan.mask16.shape[0] % 32 == 0
    assert torch.equal(plan.mask16[:n, :n].bool(), M) and not plan.mask16[n:].any() and not plan.mask16[:, n:].any()
    for width in (bm, 16):
        blocks, counts, density = plan.tables[width]
        nm, nj = -(-n // width), plan.mask16.shape[0] // bj
        assert counts.shape == (nm,)
        for m in range(nm):
            cols = M[:, m * width : (m + 1) * width]
            want = [j for j in range(nj) if cols[j * bj : (j + 1) * bj].any()]
            assert blocks[m, : counts[m]].tolist() == want
        assert 0 < density < 0.7  # whole blocks are skipped
    same = torch.ones(n, n, dtype=torch.bool)
    same[7] = False
    p = _triton._MaskPlan(same, bj, (bm,))
    assert p.single and p.mask16 is None and torch.equal(p.w, same[:, 0].float())


def test_mask_key_is_content_and_cache_is_bounded():
    _triton._PLANS.clear()
    g = torch.Generator().manual_seed(0)
    M = torch.rand(33, 33, generator=g) < 0.5
    k1 = mask_key(M)
    assert mask_key(M.clone()) == k1  # same content, another tensor
    M2 = M.clone()
    M2[32, 32] = not M2[32, 32]
    assert mask_key(M2) != k1  # the last bit counts
    M2[32, 32] = not M2[32, 32]
    assert mask_key(M2) == k1  # in-place edits are seen (version counter)
    assert mask_key(M.double()) == k1  # a float 0/1 mask is the same pattern
    p = _triton._plan(M, 16, (16,))
    assert _triton._plan(M.clone(), 16, (16,)) is p
    for i in range(_triton._PLANS.max_entries + 3):
        _triton._plan(torch.rand(20, 20, generator=g) < 0.5, 16, (16,))
    assert len(_triton._PLANS) == _triton._PLANS.max_entries
    assert all(q is not p for q in _triton._PLANS.values())  # least recently used went first


def test_plan_of_an_inference_mode_mask():
    # Regression: the Triton plan cache read mask._version unguarded, and tensors made under
    # inference_mode have no version counter, so GPU sampling under inference_mode crashed.
    _triton._PLANS.clear()
    with torch.inference_mode():
        M = torch.rand(40, 40, generator=torch.Generator().manual_seed(1)) < 0.3
        p = _triton._plan(M, 16, (16,))
        assert _triton._plan(M, 16, (16,)) is p  # hashed again (no version), same content
        M[0, 0] = not bool(M[0, 0])
        assert _triton._plan(M, 16, (16,)) is not p  # an in-place edit is never missed
    assert len(_triton._PLANS) == 2


@pytest.mark.parametrize("N,unit_,splits", [(100, 16, 3), (100, 7, 4), (5, 16, 8), (1000, 256, 2), (64, 16, 4)])
def test_split_plan_covers_the_set_with_aligned_nonempty_splits(N, unit_, splits):
    S, L = _triton._split_plan(N, 10, torch.device("cpu"), unit_, splits)
    assert L % unit_ == 0 and 1 <= S <= splits
    assert (S - 1) * L < N <= S * L  # every split holds images; together they hold all


def test_shift_leaves_the_softmax_unchanged_and_shrinks_the_operands():
    train, held, filt = crops_case(8, 60, 3)
    ab = ad.alpha_bar_at(600)
    M = filt.mask(ab, 0.02).double()
    x = noisy(held, ab, 0).float()
    c = _triton._shift(x, train, ab)
    assert c.shape == x.shape and torch.isfinite(c).all()
    e = (x.double()[:, None, :] - math.sqrt(ab) * unit(train)) ** 2  # [B, N, n]
    shifted = e - c.double()[:, None, :]
    scale = 1 / (2 * (1 - ab))
    w = torch.softmax(-(e @ M) * scale, dim=1)
    w_shifted = torch.softmax(-(shifted @ M) * scale, dim=1)
    assert (w - w_shifted).abs().max() < 1e-12  # k-independent: the softmax cannot see it
    assert shifted.abs().mean() < 0.5 * e.abs().mean()  # what fp16 rounds is smaller


@pytest.mark.parametrize(
    "blocks,match",
    [
        (dict(BB=3), "power of two"),
        (dict(BM=48), "power of two"),
        (dict(BB=2, BK=4), "BB \\* BK must be at least 16"),  # the distance GEMM's rows
        (dict(BJ=8), "BJ must be at least 16"),
        (dict(BM=8), "BM must be at least 16"),
        (dict(num_warps=3), "num_warps"),
    ],
)
def test_blocks_that_cannot_compile_are_refused_on_every_device(blocks, match):
    """Checked before the device: the same ValueError without a GPU, in the interpreter and on one."""
    x, train, M = random_case(2, 10, 48, 0)
    with pytest.raises(ValueError, match=match):
        TRI_L(x, train, M, 0.5, blocks=blocks)


def test_autotune_configs_offered_per_gpu_generation(monkeypatch):
    """Launch shapes that spill registers on a GPU generation (benchmarks/gpu_static_check.py)
    are never offered to the autotuner there; every mode keeps at least one."""
    monkeypatch.delenv("ANALYTIC_DIFFUSION_TRITON_AUTOTUNE", raising=False)
    every = _triton._LOC_GPU_CONFIGS
    for wssm in (False, True):
        for split in (False, True):
            assert _triton._loc_gpu_configs(9, wssm, split) == every  # Hopper: none spills
            got = _triton._loc_gpu_configs(8, wssm, split)
            extra = _triton._LOC_GPU_SM8X_WSSM_SPLIT if wssm and split else []
            assert got and got == [c for c in every if c in got] + extra
            for cfg, below, w, sp in _triton._LOC_GPU_SPILLS:
                if 8 < below and w in (None, wssm) and sp in (None, split):
                    assert cfg not in got
    monkeypatch.setenv("ANALYTIC_DIFFUSION_TRITON_AUTOTUNE", "0")  # one config: the first offered
    assert _triton._loc_gpu_configs(9, True, True) == every[:1]
    assert _triton._loc_gpu_configs(8, True, True) == _triton._LOC_GPU_SM8X_WSSM_SPLIT[:1]


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_autotuner_prune_hook_keeps_the_offered_configs(monkeypatch):
    import triton

    monkeypatch.delenv("ANALYTIC_DIFFUSION_TRITON_AUTOTUNE", raising=False)
    every = _triton._LOC_GPU_CONFIGS + _triton._LOC_GPU_SM8X_WSSM_SPLIT
    configs = [triton.Config({"BB": bb, "BK": bk, "BM": bm}, num_warps=w, num_stages=st) for bb, bk, bm, w, st in every]
    for major in (8, 9):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, major=major: (major, 0))
        for wssm in (False, True):
            for split in (False, True):
                kept = _triton._loc_prune(configs, {"x_ptr": torch.zeros(1)}, WSSM=wssm, STATE=False, SPLIT=split, IS_U8=True)
                got = [(c.kwargs["BB"], c.kwargs["BK"], c.kwargs["BM"], c.num_warps, c.num_stages) for c in kept]
                assert got == _triton._loc_gpu_configs(major, wssm, split)


@pytest.mark.parametrize("blocks", [dict(BN=8), dict(BB=8), dict(BK=4), dict(BJ=24)])
def test_optimal_blocks_that_cannot_compile_are_refused(blocks):
    x, train, _ = random_case(2, 10, 48, 0)
    with pytest.raises(ValueError, match="blocks|at least 16"):
        TRI_O(x, train, 0.5, blocks=blocks)


@pytest.mark.skipif(INTERPRET, reason="the interpreter registers Triton for CPU tensors")
def test_triton_backend_not_offered_for_cpu_tensors():
    for op in ("locality_denoise", "optimal_denoise"):
        assert "triton" in _registry.registered_backends(op)
        assert "triton" not in ad.available_backends(op, "cpu")
    x, train, M = random_case(2, 10, 12, 0)
    with pytest.raises(ValueError, match="does not run on cpu"):
        ad.ops.locality_denoise(x, train, M, 0.5, backend="triton")
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        TRI_L(x, train, M, 0.5)


# --------------------------------------------------------------------------- shared checks
def check_random(device, B, N, n, u8, t, **kw):
    x, train, M = random_case(B, N, n, seed=B * 100 + N + t, u8=u8, device=device)
    ab = ad.alpha_bar_at(t)
    out = TRI_L(x, train, M, ab, **kw)
    assert out.dtype == torch.float32 and out.shape == (B, n) and out.device == x.device
    assert torch.isfinite(out).all()
    err = rel(out, REF_L(x.double(), train, M, ab))
    assert err < TOL, err
    return err


def check_crops(device, size, N, B, t, precision=None, tol=TOL, **kw):
    train, held, filt = crops_case(size, N, B)
    ab = ad.alpha_bar_at(t)
    M = filt.mask(ab, 0.02)
    x = noisy(held, ab, seed=t)
    ref = REF_L(x, train, M, ab)
    out = TRI_L(x.float().to(device), train.to(device), M.to(device), ab, precision=precision, **kw)
    assert torch.isfinite(out).all()
    err = rel(out, ref)
    assert err < tol, (t, precision, err)
    return err


def check_wssm(device, B, N, n, chunk, splits, u8=True, M=None, blocks=None):
    x, train, M0 = random_case(B, N, n, seed=chunk * 7 + N, u8=u8, device=device)
    M = M0 if M is None else M.to(device)
    ab = ad.alpha_bar_at(300)
    ref = REF_L(x.double(), train, M, ab, softmax="wssm", chunk_size=chunk)
    out = TRI_L(x, train, M, ab, softmax="wssm", chunk_size=chunk, splits=splits, blocks=blocks)
    assert torch.isfinite(out).all()
    assert rel(out, ref) < TOL, rel(out, ref)
    if chunk < N:  # genuinely the mean of chunk softmaxes, not the exact softmax
        assert rel(out, REF_L(x.double(), train, M, ab)) > 10 * rel(out, ref)


def check_state_merge(device, B, N, n, t, splits, M=None, crops=None, blocks=None):
    if crops is None:
        x, train, M0 = random_case(B, N, n, seed=t + 1, device=device)
        M = M0 if M is None else M.to(device)
    else:
        train, held, filt = crops
        ab = ad.alpha_bar_at(t)
        M = filt.mask(ab, 0.02).to(device)
        x = noisy(held, ab, seed=t).float().to(device)
        train = train.to(device)
        N, n = train.shape
    ab = ad.alpha_bar_at(t)
    half = N // 2 + 3
    st = TRI_L(x, train[:half], M, ab, return_state=True, splits=splits, blocks=blocks)
    assert isinstance(st, SoftmaxState) and all(f.shape == x.shape and torch.isfinite(f).all() for f in st)
    other = REF_L(x, train[half:], M, ab, return_state=True)  # float32 reference state
    merged = merge_states(st, other).result()
    ref = REF_L(x.double(), train, M, ab)
    assert rel(merged, ref) < TOL, rel(merged, ref)
    # the kernel's own max matches the reference's logit max (the shift was undone)
    ref_st = REF_L(x.double(), train[:half], M, ab, return_state=True)
    assert torch.allclose(st.mx.double(), ref_st.mx, rtol=1e-3, atol=1e-3 * (1 + ref_st.mx.abs().max().item()))


def check_optimal(device, B, N, n, t, u8=True, splits=None):
    x, train, _ = random_case(B, N, n, seed=t + 5, u8=u8, device=device)
    ab = ad.alpha_bar_at(t)
    ref = REF_O(x.double(), train, ab)
    out = TRI_O(x, train, ab, splits=splits)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert rel(out, ref) < 1e-5, rel(out, ref)  # fp32 direct differences: no fp16 anywhere
    half = N // 3
    st = TRI_O(x, train[:half], ab, return_state=True, splits=splits)
    assert st.mx.shape == (B, 1) and st.l.shape == (B, 1) and st.acc.shape == (B, n)
    merged = merge_states(st, REF_O(x, train[half:], ab, return_state=True)).result()
    assert rel(merged, ref) < 1e-5


# --------------------------------------------------------------------------- Triton, interpreted on CPU
@interp
def test_interp_registered_for_cpu():
    for op in ("locality_denoise", "optimal_denoise"):
        assert "triton" in ad.available_backends(op, "cpu")
        b = _registry.select(op, "cpu", "triton")
        assert b.priority == 15 and "cuda" in b.devices


@interp
@pytest.mark.parametrize("t", TIMESTEPS)
@pytest.mark.parametrize("B,N,u8", [(1, 37, True), (5, 53, False)])
def test_interp_random_data(t, B, N, u8):
    check_random("cpu", B, N, 48, u8, t)


@interp
@pytest.mark.slow
@pytest.mark.parametrize("t", TIMESTEPS)
def test_interp_real_crops_every_precision(t):
    """8x8 natural crops, queries = noisy held-out images; the three precision settings."""
    errs = {p: check_crops("cpu", 8, 61, 3, t, precision=p) for p in ("fp16", "fp16x2", None)}
    assert errs["fp16x2"] < 1e-5, errs  # hi + lo: ~22 significant bits per term


@interp
@pytest.mark.slow
def test_interp_block_skipping_and_empty_windows():
    n = 48
    M = block_diagonal_mask(n, 16, 16)
    blocks = dict(BJ=16, BM=16, BB=2, BK=16)
    plan = _triton._plan(M, 16, (16,))
    assert plan.density() < 0.6
    x, train, _ = random_case(3, 45, n, seed=3)
    for t in (500, 10):
        ab = ad.alpha_bar_at(t)
        out = TRI_L(x, train, M, ab, blocks=blocks)
        assert rel(out, REF_L(x.double(), train, M, ab)) < TOL
        # column 5 has an empty window: every image weighs the same there
        assert torch.allclose(out[:, 5].double(), unit(train)[:, 5].mean().expand(3), atol=1e-5)
    # real low-noise windows, small blocks: most blocks skipped
    check_crops("cpu", 8, 40, 2, 0, blocks=dict(BJ=16, BM=16))


@interp
@pytest.mark.parametrize("chunk,splits", [(10, 1), (16, 3), (7, 2), (100, 1)])
def test_interp_wssm_chunks_not_dividing_n(chunk, splits):
    check_wssm("cpu", 3, 53, 48, chunk, splits, u8=chunk != 7)


@interp
def test_interp_wssm_single_window():
    check_wssm("cpu", 2, 45, 48, 16, 2, M=torch.ones(48, 48, dtype=torch.bool))


@interp
@pytest.mark.parametrize("t,splits", [(500, 1), (10, 3)])
def test_interp_state_merges_with_reference(t, splits):
    check_state_merge("cpu", 3, 50, 48, t, splits)


@interp
def test_interp_state_merges_real_crops_and_single_window():
    check_state_merge("cpu", 2, 0, 0, 100, 2, crops=crops_case(8, 40, 2))
    check_state_merge("cpu", 2, 40, 48, 900, 2, M=torch.ones(48, 48, dtype=torch.bool))


@interp
def test_interp_single_window_dispatch():
    n = 48
    x, train, _ = random_case(3, 41, n, seed=9)
    W = torch.zeros(n, n, dtype=torch.bool)
    W[::3] = True  # every window = the same third of the pixels
    assert _triton._plan(W, 16, (16,)).single
    for t in (900, 10):
        ab = ad.alpha_bar_at(t)
        assert rel(TRI_L(x, train, W, ab), REF_L(x.double(), train, W, ab)) < 1e-5
        full = torch.ones(n, n, dtype=torch.bool)
        assert rel(TRI_L(x, train, full, ab), TRI_O(x, train, ab)) < 1e-6


@interp
@pytest.mark.parametrize("t", [900, 100, 0])
def test_interp_optimal(t):
    check_optimal("cpu", 3, 47, 48, t)
    check_optimal("cpu", 2, 39, 33, t, u8=False, splits=3)


@interp
def test_interp_single_window_logits_in_pieces(monkeypatch):
    """The single-window path holds at most max(B*n, budget) logits at a time; with a tiny
    budget it launches per piece of the training set and merges (exact) or sums (WSSM)."""
    monkeypatch.setattr(_triton, "_LOGITS_BUDGET", 1)
    x, train, _ = random_case(2, 70, 48, seed=23)
    full = torch.ones(48, 48, dtype=torch.bool)
    ab = ad.alpha_bar_at(100)
    assert rel(TRI_O(x, train, ab), REF_O(x.double(), train, ab)) < 1e-5
    st = TRI_O(x, train, ab, return_state=True)
    assert rel(st.result(), REF_O(x.double(), train, ab)) < 1e-5
    ref_w = REF_L(x.double(), train, full, ab, softmax="wssm", chunk_size=10)
    assert rel(TRI_L(x, train, full, ab, softmax="wssm", chunk_size=10), ref_w) < 1e-5


@interp
def test_interp_non_contiguous_inputs():
    n = 48
    x, train, M = random_case(4, 46, n, seed=11)
    ab = ad.alpha_bar_at(200)
    ref = REF_L(x.double(), train, M, ab)
    x_t = x.T.contiguous().T  # column-major
    train_wide = torch.zeros(46, 2 * n, dtype=torch.uint8)
    train_wide[:, ::2] = train  # element stride 2
    train_rows = torch.zeros(92, n, dtype=torch.uint8)
    train_rows[::2] = train  # row stride 2n
    train_f = unit(train).float().T.contiguous().T
    M_t = M.T.contiguous().T
    for xx, tt, mm in ((x_t, train, M), (x, train_wide[:, ::2], M), (x, train_rows[::2], M_t), (x_t, train_f, M)):
        assert not (xx.is_contiguous() and tt.is_contiguous() and mm.is_contiguous())
        assert rel(TRI_L(xx, tt, mm, ab), ref) < TOL
    assert rel(TRI_O(x_t, train_wide[:, ::2], ab), REF_O(x.double(), train, ab)) < 1e-5


@interp
@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float16, torch.float64])
def test_interp_float16_and_float64_training_sets(dtype):
    """Training sets of the other accepted dtypes, read in place by every kernel: the
    locality kernel (exact, state, WSSM), and the single-window pair (dist, wsum)."""
    x, train, M = random_case(3, 41, 48, seed=31, u8=False)
    train = train.to(dtype)
    ab = ad.alpha_bar_at(100)
    assert rel(TRI_L(x, train, M, ab), REF_L(x.double(), train, M, ab)) < TOL
    st = TRI_L(x, train, M, ab, return_state=True, splits=2)
    assert rel(st.result(), REF_L(x.double(), train, M, ab)) < TOL
    ref_w = REF_L(x.double(), train, M, ab, softmax="wssm", chunk_size=16)
    assert rel(TRI_L(x, train, M, ab, softmax="wssm", chunk_size=16), ref_w) < TOL
    assert rel(TRI_O(x, train, ab), REF_O(x.double(), train, ab)) < 1e-5
    full = torch.ones(48, 48, dtype=torch.bool)
    ref_f = REF_L(x.double(), train, full, ab, softmax="wssm", chunk_size=10)
    assert rel(TRI_L(x, train, full, ab, softmax="wssm", chunk_size=10), ref_f) < 1e-5


@interp
def test_interp_partial_tiles_leave_no_nan():
    # B = 5 with BB = 4, n = 48 with BM = 32: partial query and pixel tiles; outputs start
    # as NaN, so anything a program forgets to write would show
    x, train, M = random_case(5, 29, 48, seed=13)
    ab = ad.alpha_bar_at(300)
    ref = REF_L(x.double(), train, M, ab)
    out = TRI_L(x, train, M, ab, blocks=dict(BB=4, BK=16, BJ=16, BM=32))
    assert torch.isfinite(out).all() and rel(out, ref) < TOL
    st = TRI_L(x, train, M, ab, blocks=dict(BB=4, BK=16, BJ=16, BM=32), splits=2, return_state=True)
    assert all(torch.isfinite(f).all() for f in st)


@interp
def test_interp_public_ops_and_fallbacks():
    x, train, M = random_case(2, 30, 48, seed=17)
    x4 = x.reshape(2, 3, 4, 4)
    ab = ad.alpha_bar_at(400)
    out = ad.ops.locality_denoise(x4, train.reshape(30, 3, 4, 4), M, ab, backend="triton")
    assert out.shape == x4.shape and out.dtype == torch.float32
    assert rel(out.reshape(2, -1), REF_L(x.double(), train, M, ab)) < TOL
    o = ad.ops.optimal_denoise(x4, train, ab, backend="triton")
    assert o.shape == x4.shape and rel(o.reshape(2, -1), REF_O(x.double(), train, ab)) < 1e-5
    # float64 queries and real-valued masks run the reference implementation (documented)
    x64 = x.double()
    assert torch.equal(TRI_L(x64, train, M, ab), REF_L(x64, train, M, ab))
    Mf = M.double() * 0.5
    assert torch.equal(TRI_L(x, train, Mf, ab), REF_L(x, train, Mf, ab))
    assert torch.equal(TRI_O(x64, train, ab), REF_O(x64, train, ab))


@interp
def test_interp_locality_denoiser_prepare_builds_plans():
    train = ad.data.natural_crops(30, size=4, seed=3)
    den = ad.LocalityDenoiser(train, backend="triton")
    _triton._PLANS.clear()
    den.prepare([500, 0])
    assert len(_triton._PLANS) == 2
    x = torch.randn(2, 3, 4, 4)
    out = den(x, 500)
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert len(_triton._PLANS) == 2  # the prepared plan was used


# --------------------------------------------------------------------------- Triton on the GPU
@needs_cuda_triton
@pytest.mark.parametrize("t", TIMESTEPS)
@pytest.mark.parametrize("B,N,n,u8", [(1, 301, 192, True), (7, 517, 768, False), (33, 1000, 3072, True)])
def test_cuda_random_data(t, B, N, n, u8):
    check_random("cuda", B, N, n, u8, t, blocks=GPU_BLOCKS)


@needs_cuda_triton
@pytest.mark.parametrize("t", ad.ddim_timesteps(10))
def test_cuda_real_crops_every_ddim_step(t):
    """32x32 natural crops (n = 3072), N = 1000, B = 5: the CIFAR image shape, smaller N;
    the default (autotuned) launch path."""
    check_crops("cuda", 32, 1000, 5, t)
    check_crops("cuda", 32, 1000, 5, t, precision="fp16x2", tol=1e-5)


@needs_cuda_triton
@pytest.mark.parametrize("bm", [64, 128])
def test_cuda_fixed_launch_shapes_and_block_skipping(bm):
    check_crops("cuda", 32, 300, 3, 0, blocks=dict(BB=8, BK=16, BM=bm))
    n = 768
    M = block_diagonal_mask(n, 64, bm)
    x, train, _ = random_case(6, 333, n, seed=5, device="cuda")
    ab = ad.alpha_bar_at(100)
    out = TRI_L(x, train, M.cuda(), ab, blocks=dict(BB=4, BK=16, BM=bm))
    assert rel(out, REF_L(x.double(), train, M.cuda(), ab)) < TOL


@needs_cuda_triton
@pytest.mark.parametrize("chunk,splits", [(256, None), (100, 3), (37, 1)])
def test_cuda_wssm(chunk, splits):
    check_wssm("cuda", 9, 1001, 768, chunk, splits, blocks=GPU_BLOCKS)


@needs_cuda_triton
def test_cuda_state_merge_and_single_window():
    check_state_merge("cuda", 5, 600, 768, 100, None, blocks=GPU_BLOCKS)
    check_state_merge("cuda", 5, 600, 768, 10, 4, blocks=GPU_BLOCKS)
    check_state_merge("cuda", 3, 0, 0, 100, None, crops=crops_case(32, 400, 3), blocks=GPU_BLOCKS)
    check_state_merge("cuda", 3, 400, 768, 900, 3, M=torch.ones(768, 768, dtype=torch.bool))


@needs_cuda_triton
@pytest.mark.parametrize("t", [900, 100, 0])
def test_cuda_optimal(t):
    check_optimal("cuda", 17, 5003, 3072, t)
    check_optimal("cuda", 1, 999, 768, t, u8=False, splits=5)


@needs_cuda_triton
def test_cuda_non_contiguous_and_public_op():
    x, train, M = random_case(6, 400, 768, seed=21, device="cuda")
    ab = ad.alpha_bar_at(300)
    ref = REF_L(x.double(), train, M, ab)
    wide = torch.zeros(400, 1536, dtype=torch.uint8, device="cuda")
    wide[:, ::2] = train
    assert rel(TRI_L(x.T.contiguous().T, wide[:, ::2], M, ab, blocks=GPU_BLOCKS), ref) < TOL
    assert "triton" in ad.available_backends("locality_denoise", "cuda")
    out = ad.ops.locality_denoise(x, train, M, ab, backend="triton")  # autotuned launch
    assert rel(out, ref) < TOL
