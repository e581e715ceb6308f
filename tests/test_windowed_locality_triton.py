"""Triton backend of windowed_locality_denoise (python/analytic_diffusion/ops/windowed_locality/triton.py)
against the dense float64 transcription of docs/algorithms.md 9 (the dense mask built from the window by
loops, then docs/algorithms.md §5 literally) and the float64 reference op.

Where each part runs:
  * everywhere: the window's run tables (checked by replaying the kernel's prefix-sum and
    run-boundary arithmetic in float64 with torch) and the refusal of CPU tensors without
    the interpreter;
  * under TRITON_INTERPRET=1 (the CI's Triton step: ``TRITON_INTERPRET=1 python -m pytest
    tests/test_*triton*.py``): the kernel itself on tiny shapes, every mode; these tests
    skip cleanly without the interpreter;
  * a CUDA machine: the same kernel compiled, at a larger shape (skipped elsewhere).
Accuracy is ||out - ref|| / ||ref|| against float64; the target is 1e-4 at every DDIM step,
including t = 10 and 0 (the interpreter evaluates fp32 like the GPU but without fused
multiply-adds and with an exact exp, so compiled results can differ slightly).
"""
from __future__ import annotations

import importlib.util
import os

import pytest
import torch

import analytic_diffusion as ad
from analytic_diffusion import registry
from analytic_diffusion.ops import SoftmaxState, merge_states
from analytic_diffusion.ops.windowed_locality import triton as wtri
from analytic_diffusion.ops.windowed_locality import window_distances, windowed_locality_denoise_reference as REF
from spec_dense import dense_locality, dense_window_mask, noisy_queries, unit

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
HAS_TRITON = importlib.util.find_spec("triton") is not None
HAS_CUDA = torch.cuda.is_available()
TRI = wtri.windowed_locality_denoise_triton
TOL = 1e-4
STEPS = ad.ddim_timesteps(10) + [10]  # 900 .. 0 and the sharp t = 10

needs_interpreter = pytest.mark.triton_interpret  # collected only with TRITON_INTERPRET=1 (tests/conftest.py)
needs_cuda_triton = pytest.mark.skipif(not (HAS_CUDA and HAS_TRITON and not INTERPRET), reason="needs a CUDA device and Triton")


def rel(out, ref) -> float:
    out, ref = out.double().cpu().reshape(ref.shape), ref.double().cpu()
    return float((out - ref).norm() / ref.norm())


def random_window(C, k, density, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.rand(C, C, k, k, generator=g) < density
    w[torch.arange(C), torch.arange(C), k // 2, k // 2] = True
    return w


_CROPS = {}


def crops(size, count, seed=5):
    if (size, count, seed) not in _CROPS:
        _CROPS[size, count, seed] = ad.data.natural_crops(count, size=size, seed=seed)
    return _CROPS[size, count, seed]


_WIENER = {}


def wiener_windows(size=8, k=5):
    """Windows as the denoiser makes them: thresholded windowed Wiener kernels from patch
    moments of other crops (large at high noise, small at low noise)."""
    if (size, k) not in _WIENER:
        _WIENER[size, k] = ad.WindowedWiener(ad.ops.estimate_patch_moments(crops(size, 300, seed=1), k))
    return _WIENER[size, k]


# --------------------------------------------------------------------------- no Triton execution
def replay(x, y, window, a, tabs):
    """The kernel's arithmetic in float64 with torch: per row (c', di) of output channel c's
    window, the row prefix P of E on rows h + di (zero outside), and sign * P[w + b] per
    boundary (P[< 0] = 0, P[>= W] = P[W - 1])."""
    B, C, H, W = x.shape
    E = (x[:, None] - a * y[None]) ** 2  # [B, K, C, H, W]
    d = torch.zeros(B, y.shape[0], C, H, W, dtype=torch.float64)
    for c in range(C):
        for ci, di, q0, nq in tabs.rows[c, : tabs.counts[c]].tolist():
            for h in range(H):
                if not 0 <= h + di < H:
                    continue
                P = torch.cumsum(E[:, :, ci, h + di], -1)
                for q in range(q0, q0 + nq):
                    idx = torch.arange(W) + int(tabs.offs[q])
                    g = P[..., idx.clamp(0, W - 1)] * (idx >= 0)
                    d[:, :, c, h] += float(tabs.sgns[q]) * g
    return d


@pytest.mark.parametrize("C,H,W,k,density", [(3, 7, 9, 5, 0.5), (1, 5, 6, 11, 0.4), (2, 4, 4, 7, 1.0), (3, 6, 5, 3, 0.7)])
def test_run_tables_replay_the_window_sums(C, H, W, k, density):
    win = random_window(C, k, density, seed=C * 10 + k)
    win[0, -1, 0] = False  # a row with a hole, rows without entries
    g = torch.Generator().manual_seed(k)
    x = torch.randn(2, C, H, W, generator=g, dtype=torch.float64)
    y = torch.rand(3, C, H, W, generator=g, dtype=torch.float64) * 2 - 1
    tabs = wtri._RunTables(win, H, W)
    assert tabs.offs.dtype == torch.int32 and tabs.sgns.dtype == torch.float32
    rx, ry, rd, q0, nq, cnt = tabs.on(torch.device("cpu"), 1000, 10)[:6]
    assert rx.dtype == torch.int32 and ry.dtype == torch.int64 and rx.shape == (C, tabs.ld) and cnt.shape == (C,)
    ci, di = tabs.rows[..., 0], tabs.rows[..., 1]
    assert torch.equal(ry, ci * 1000 + di * 10) and torch.equal(rx.long(), ci * H * W + di * W)
    assert bool((tabs.sgns.abs() == 1).all()) and tabs.boundaries % 2 == 0
    want = window_distances(x, y, win, 0.7)
    assert torch.allclose(replay(x, y, win, 0.7, tabs), want, rtol=1e-12, atol=1e-12)


def test_run_tables_are_cached_by_content():
    win = random_window(3, 5, 0.5, seed=3)
    t1 = wtri._tables(win, 8, 8)
    assert wtri._tables(win.clone(), 8, 8) is t1
    win2 = win.clone()
    win2[2, 1, 4, 4] = not bool(win2[2, 1, 4, 4])
    assert wtri._tables(win2, 8, 8) is not t1
    assert wtri._tables(win, 9, 8) is not t1  # the image size prunes rows


def test_whole_image_windows_are_recognised():
    full = torch.ones(2, 2, 13, 13, dtype=torch.bool)
    assert wtri._whole_image(full, 5, 7) and wtri._whole_image(full, 7, 7)
    assert not wtri._whole_image(full, 8, 7)  # offsets up to 6 do not reach across 8 rows
    w = full.clone()
    w[1, 0, 6 + 4, 6 - 6] = False  # offset (4, -6): needed for 5 x 7 images
    assert not wtri._whole_image(w, 5, 7)
    w = full.clone()
    w[1, 0, 12, 0] = False  # offset (6, -6): outside every 5 x 7 image, irrelevant
    assert wtri._whole_image(w, 5, 7)


def test_gpu_configs_cover_every_width():
    widths = sorted(c[0] for c in wtri._WLOC_GPU_CONFIGS)
    assert widths == [16, 32, 64, 128, 256] and widths[-1] == wtri._WLOC_MAX_WIDTH
    for twp, bb, bk, th, warps, stages, maxnreg in wtri._WLOC_GPU_CONFIGS:
        assert bb * bk * th * twp == 2048 and warps in (4, 8)  # the register budget the configs were compiled for
        assert maxnreg in (128, 192)  # set: the default ptxas register target spilled
    blk = wtri._blocks(torch.device("cuda"), 128, 1000, 64, 64, None)
    assert (blk["TWP"], blk["BB"], blk["maxnreg"]) == (64, 4, 128)


@pytest.mark.skipif(INTERPRET, reason="the interpreter registers Triton for CPU tensors")
def test_triton_backend_not_offered_for_cpu_tensors():
    assert "triton" in registry.registered_backends("windowed_locality_denoise")
    assert "triton" not in ad.available_backends("windowed_locality_denoise", "cpu")
    x = torch.zeros(1, 1, 4, 4)
    train = torch.zeros(2, 1, 4, 4, dtype=torch.uint8)
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        TRI(x, train, torch.ones(1, 1, 3, 3, dtype=torch.bool), 0.5)


# --------------------------------------------------------------------------- Triton, interpreted on CPU
@needs_interpreter
def test_interp_registered_for_cpu():
    assert "triton" in ad.available_backends("windowed_locality_denoise", "cpu")
    b = registry.select("windowed_locality_denoise", "cpu", "triton")
    assert b.priority == 15 and "cuda" in b.devices


@needs_interpreter
@pytest.mark.parametrize("t", STEPS)
def test_interp_real_crops_every_ddim_step(t):
    # real crops, noisy held-out queries, the denoiser's own windows; vs the dense transcription
    pool = crops(8, 64)
    train, held = pool[:60], pool[60:63]
    ab = ad.alpha_bar_at(t)
    win = wiener_windows().mask(ab, 0.02)
    x = noisy_queries(held, ab, seed=t)
    want = dense_locality(x.reshape(3, -1), unit(train).reshape(60, -1), dense_window_mask(win, 8, 8), ab)
    out = TRI(x.float(), train, win, ab)
    assert out.shape == x.shape and out.dtype == torch.float32 and torch.isfinite(out).all()
    assert rel(out, want) < TOL, (t, rel(out, want))


@needs_interpreter
@pytest.mark.parametrize("t,blocks,splits", [(10, dict(BK=16, BB=4, TH=4), 2), (0, None, None)])
def test_interp_odd_sizes_float_train_noncontiguous_tiles_and_splits(t, blocks, splits):
    # 3 x 7 x 9, float32 train, non-contiguous x and train, several training tiles and splits
    pool = crops(16, 40)[:, :, 3:10, 2:11]
    train_u8, held = pool[:37], pool[37:]
    train = unit(train_u8).float().permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)
    assert not train.is_contiguous()
    ab = ad.alpha_bar_at(t)
    win = random_window(3, 5, 0.5, seed=t) if blocks is None else random_window(3, 3, 0.5, seed=t)
    x = noisy_queries(held, ab, seed=t).float().transpose(2, 3).contiguous().transpose(2, 3)
    assert not x.is_contiguous()
    want = dense_locality(x.double().reshape(3, -1), unit(train_u8).reshape(37, -1), dense_window_mask(win, 7, 9), ab)
    out = TRI(x, train, win, ab, splits=splits, blocks=blocks)
    assert out.shape == x.shape and torch.isfinite(out).all()  # every pixel written (outputs start as NaN)
    assert rel(out, want) < TOL, rel(out, want)


@needs_interpreter
def test_interp_one_channel_and_windows_past_the_border():
    # C = 1, H != W, k = 2*max(H, W) - 1 (most of every window outside the image); the full
    # window at that size is the optimal denoiser (and runs the single-window kernels)
    pool = crops(8, 33)[:, :1, :5, :7]
    train, held = pool[:31], pool[31:]
    ab = ad.alpha_bar_at(200)
    x = noisy_queries(held, ab, seed=2).float()
    for win in (random_window(1, 13, 0.3, seed=4), torch.ones(1, 1, 13, 13, dtype=torch.bool)):
        want = dense_locality(x.double().reshape(2, -1), unit(train).reshape(31, -1), dense_window_mask(win, 5, 7), ab)
        assert rel(TRI(x, train, win, ab), want) < TOL
    opt = ad.ops.optimal_denoise(x.double(), train, ab, backend="reference")
    assert rel(TRI(x, train, torch.ones(1, 1, 13, 13, dtype=torch.bool), ab), opt) < TOL
    st = TRI(x, train, torch.ones(1, 1, 13, 13, dtype=torch.bool), ab, return_state=True)
    assert st.mx.shape == (2, 35) and rel(st.result(), opt.reshape(2, -1)) < TOL


@needs_interpreter
@pytest.mark.parametrize("chunk,splits", [(16, 1), (7, 3)])
def test_interp_wssm_chunks(chunk, splits):
    pool = crops(8, 42)
    train, held = pool[:26], pool[40:]
    ab = ad.alpha_bar_at(300)
    win = random_window(3, 3, 0.6, seed=chunk)
    x = noisy_queries(held, ab, seed=chunk).float()
    want = REF(x.double(), train, win, ab, 1.0, "wssm", chunk)
    out = TRI(x, train, win, ab, 1.0, "wssm", chunk, splits=splits, blocks=dict(BK=16))
    assert torch.isfinite(out).all() and rel(out, want) < TOL, rel(out, want)
    assert rel(out, REF(x.double(), train, win, ab)) > 10 * rel(out, want)  # really per-chunk means


@needs_interpreter
@pytest.mark.parametrize("t,splits", [(100, 1), (0, 2)])
def test_interp_state_merges_with_reference(t, splits):
    pool = crops(8, 45)
    train, held = pool[:43], pool[43:]
    ab = ad.alpha_bar_at(t)
    win = wiener_windows().mask(ab, 0.02)
    x = noisy_queries(held, ab, seed=t).float()
    st = TRI(x, train[:20], win, ab, return_state=True, splits=splits, blocks=dict(BK=16))
    assert isinstance(st, SoftmaxState) and all(f.dtype == torch.float64 and f.shape == (2, 192) for f in st)
    assert all(torch.isfinite(f).all() for f in st)
    other = REF(x.double(), train[20:], win, ab, return_state=True)
    merged = merge_states(st, other).result()
    assert rel(merged, REF(x.double(), train, win, ab).reshape(2, -1)) < TOL
    ref_st = REF(x.double(), train[:20], win, ab, return_state=True)  # the shift was added back
    assert torch.allclose(st.mx, ref_st.mx, rtol=1e-4, atol=1e-4 * float(ref_st.mx.abs().max()))


@needs_interpreter
def test_interp_public_op_dispatch_and_float64_fallback():
    pool = crops(8, 22)
    train, held = pool[:20], pool[20:]
    ab = ad.alpha_bar_at(400)
    win = random_window(3, 3, 0.5, seed=1)
    win[1] = False  # an empty window: uniform weights for that channel's pixels
    x = noisy_queries(held, ab, seed=1)
    got = ad.ops.windowed_locality_denoise(x.float(), train, win, ab, temperature=0.5, backend="triton")
    assert got.dtype == torch.float32 and rel(got, REF(x, train, win, ab, 0.5)) < TOL
    # float64 queries run the float64 reference (documented fallback)
    got64 = ad.ops.windowed_locality_denoise(x, train, win, ab, backend="triton")
    assert got64.dtype == torch.float64 and rel(got64, REF(x, train, win, ab)) < 1e-12


# --------------------------------------------------------------------------- a CUDA machine
@needs_cuda_triton
@pytest.mark.parametrize("t", STEPS)
def test_cuda_real_crops_every_ddim_step(t):
    pool = crops(32, 410)
    train, held = pool[:400], pool[400:404]
    ab = ad.alpha_bar_at(t)
    win = wiener_windows(32, 9).mask(ab, 0.02)
    x = noisy_queries(held, ab, seed=t)
    want = REF(x, train, win, ab)
    out = TRI(x.float().cuda(), train.cuda(), win.cuda(), ab)
    assert torch.isfinite(out).all() and rel(out, want) < 1e-3  # compiled: FMA and ex2.approx (margin)
    st = TRI(x.float().cuda(), train.cuda(), win.cuda(), ab, return_state=True, splits=3)
    assert rel(st.result(), want.reshape(4, -1)) < 1e-3
