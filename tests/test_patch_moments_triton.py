"""Triton backend of the patch_moments op (python/analytic_diffusion/ops/patch_moments/triton.py)
against the torch reference backend and unfold + float64: uint8 sums bit-identical (int64),
float sums to float64 rounding, the streaming contract through the accumulators (order,
batch size, merge with other backends, the backend recorded), and the stationary lag sums.

Where each part runs:
  * everywhere: the launch-shape arithmetic and the refusal of CPU tensors without the
    interpreter;
  * under TRITON_INTERPRET=1 (the CI's Triton step): the kernel itself on small shapes;
  * a CUDA machine: the same kernel compiled, at a larger shape (skipped elsewhere).
"""
from __future__ import annotations

import importlib.util
import os

import pytest
import torch

import analytic_diffusion as ad
from analytic_diffusion import registry
from analytic_diffusion.ops.patch_moments import reference as pm_ref
from analytic_diffusion.ops.patch_moments import triton as pm_tri

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
HAS_TRITON = importlib.util.find_spec("triton") is not None
HAS_CUDA = torch.cuda.is_available()
needs_interpreter = pytest.mark.triton_interpret  # collected only with TRITON_INTERPRET=1 (tests/conftest.py)
needs_cuda_triton = pytest.mark.skipif(not (HAS_CUDA and HAS_TRITON and not INTERPRET), reason="needs a CUDA device and Triton")


def _u8(shape, seed):
    return torch.randint(0, 256, shape, generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def _unfold_sums(x, k):
    C = x.shape[1]
    P = x.unfold(2, k, 1).unfold(3, k, 1).permute(0, 2, 3, 1, 4, 5).reshape(-1, C * k * k).double()
    return P.sum(0), P.T @ P


def _lag_products(x, n_di, Lj):
    """int64 ``P[di, dj + Lj, c, c', r, w] = sum_b x[b, c, r, w] x[b, c', r + di, w + dj]`` (0 where
    the partner is outside the image, and for di = 0, dj < 0): the kernels' per-pixel output."""
    B, C, H, W = x.shape
    z = x.long()
    P = torch.zeros(n_di, 2 * Lj + 1, C, C, H, W, dtype=torch.int64)
    for di in range(min(n_di, H)):
        for dj in range(0 if di == 0 else -Lj, min(Lj, W - 1) + 1):
            if -dj >= W:
                continue
            a = z[:, :, : H - di, max(0, -dj) : W - max(0, dj)]
            b = z[:, :, di:, max(0, dj) : W - max(0, -dj)]
            P[di, dj + Lj, :, :, : H - di, max(0, -dj) : W - max(0, dj)] = torch.einsum("bchw,bdhw->cdhw", a, b)
    return P


# --------------------------------------------------------------------------- no Triton execution
def test_gpu_launch_shapes():
    bb, products, warps = pm_tri.PATCH_GPU_CONFIG
    for C in (1, 2, 3, 4, 8):
        bp = pm_tri.gpu_pixels(C)
        assert 32 <= bp <= 512 and bp & (bp - 1) == 0
        blk = pm_tri._blocks(torch.device("cuda"), 256, C, 64 * 64, None)
        assert (blk["BB"], blk["BP"], blk["num_warps"]) == (bb, bp, warps)
    with pytest.raises(ValueError, match="BP"):
        pm_tri._blocks(torch.device("cpu"), 4, 3, 64, dict(BP=24))


@pytest.mark.skipif(INTERPRET, reason="the interpreter registers Triton for CPU tensors")
def test_triton_backend_not_offered_for_cpu_tensors():
    assert "triton" in registry.registered_backends("patch_moments")
    assert "triton" not in ad.available_backends("patch_moments", "cpu")
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        pm_tri.patch_sums(_u8((2, 1, 5, 5), 0), 3)


@pytest.mark.parametrize("H,W,k", [(1, 1, 1), (5, 7, 1), (5, 7, 3), (7, 5, 5), (9, 11, 9)])
def test_corner_sums_match_an_integral_image(H, W, k):
    # the rectangle sums patch_sums takes from the lag products (window starts along columns,
    # then rows) against a 2-D integral image: exact for int64, float64 to rounding
    oh, ow = H - k + 1, W - k + 1
    P = torch.randint(-(10**12), 10**12, (3, 2, H, W), generator=torch.Generator().manual_seed(H * W), dtype=torch.int64)
    I = torch.nn.functional.pad(P.cumsum(-2).cumsum(-1), (1, 0, 1, 0))
    want = I[..., oh : oh + k, ow : ow + k] - I[..., :k, ow : ow + k] - I[..., oh : oh + k, :k] + I[..., :k, :k]
    got = pm_tri._corner_sums(P, k, oh, ow)
    assert got.dtype == torch.int64 and torch.equal(got, want)
    brute = torch.stack([torch.stack([P[..., i : i + oh, j : j + ow].sum((-2, -1)) for j in range(k)], -1) for i in range(k)], -2)
    assert torch.equal(got, brute)
    Pf = P.double() / 1e12
    assert (pm_tri._corner_sums(Pf, k, oh, ow) - brute.double() / 1e12).abs().max() < 1e-12


# --------------------------------------------------------------------------- Triton, interpreted on CPU
@needs_interpreter
@pytest.mark.parametrize("k,C,blocks", [(1, 3, None), (3, 3, dict(BB=2, BP=16)), (5, 1, None), (5, 2, dict(BB=4, BP=32))])
def test_interp_uint8_patch_sums_bit_identical(k, C, blocks):
    # real crops (C = 3) or random images, odd sizes (7 x 9 ... 9 x 11), several pixel
    # blocks and batch tiles with small blocks
    x = ad.data.natural_crops(6, size=11, seed=k)[:, :, :7, 2:] if C == 3 else _u8((5, C, 9, 11), k)
    s1, s2 = pm_tri.patch_sums(x, k, blocks=blocks)
    r1, r2 = pm_ref.BACKEND.patch_sums(x, k)
    u1, u2 = _unfold_sums(x, k)
    assert s1.dtype == s2.dtype == torch.int64
    assert torch.equal(s1, r1) and torch.equal(s2, r2)
    assert torch.equal(s2.double(), u2) and torch.equal(s1.double(), u1)


@needs_interpreter
def test_interp_uint8_worst_case_strided_and_int32_flushes(monkeypatch):
    # all-255 images (largest products), channels-last strides, and int32 partial sums
    # flushed to int64 every 4 images (the path that keeps 16384-image blocks from wrapping)
    monkeypatch.setattr(pm_tri, "_U8_BLOCK_IMAGES", 4)
    x = torch.full((11, 2, 6, 7), 255, dtype=torch.uint8).contiguous(memory_format=torch.channels_last)
    assert not x.is_contiguous()
    s1, s2 = pm_tri.patch_sums(x, 3, blocks=dict(BB=2))
    n = 11 * 4 * 5
    assert torch.equal(s1, torch.full((18,), 255 * n, dtype=torch.int64))
    assert torch.equal(s2, torch.full((18, 18), 255 * 255 * n, dtype=torch.int64))
    y = _u8((11, 2, 6, 7), 3).contiguous(memory_format=torch.channels_last)
    assert torch.equal(pm_tri.patch_sums(y, 3, blocks=dict(BB=2))[1], pm_ref.BACKEND.patch_sums(y, 3)[1])


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
def test_interp_float_patch_sums_with_shift(dtype):
    x = ((_u8((4, 3, 8, 9), 7).double() - 127.5) / 127.5).to(dtype)
    shift = torch.tensor([0.1, -0.2, 0.05], dtype=torch.float64)
    x_before = x.clone()
    s1, s2 = pm_tri.patch_sums(x, 3, shift)
    r1, r2 = pm_ref.BACKEND.patch_sums(x, 3, shift)
    assert s1.dtype == s2.dtype == torch.float64 and torch.equal(x, x_before)
    assert (s1 - r1).abs().max() < 1e-12 * r1.abs().max() and (s2 - r2).abs().max() < 1e-12 * r2.abs().max()
    assert torch.allclose(s2, s2.T, rtol=0, atol=0)  # symmetric by construction
    with pytest.raises(ValueError, match="shift must be None"):
        pm_tri.patch_sums(_u8((2, 3, 5, 5), 1), 3, shift)
    with pytest.raises(ValueError, match="shift must be float64"):
        pm_tri.patch_sums(x, 3, shift[:2])


@needs_interpreter
def test_interp_lag_sums_and_stationary_direct():
    x = _u8((5, 2, 6, 7), 2)
    A, S1 = pm_tri.lag_sums(x, 5, 6)  # every lag of a 6 x 7 image
    RA, RS = pm_ref.lag_sums(x, 5, 6)
    assert A.dtype == torch.int64 and torch.equal(A, RA) and torch.equal(S1, RS)
    assert not A[0, :6].any()  # di = 0, dj < 0: left 0 (the contract)
    z = (x.double() - 127.5) / 127.5
    shift = torch.tensor([0.3, -0.1], dtype=torch.float64)
    A, S1 = pm_tri.lag_sums(z, 2, 3, shift)
    RA, RS = pm_ref.lag_sums(z, 2, 3, shift)
    assert (A - RA).abs().max() < 1e-12 * RA.abs().max() and (S1 - RS).abs().max() < 1e-12
    want = ad.estimate_stationary_moments(x, patch_size=3, method="direct", backend="reference", batch_size=2)
    got = ad.estimate_stationary_moments(x, patch_size=3, method="direct", backend="triton", batch_size=5)
    assert torch.equal(got.cov, want.cov) and torch.equal(got.mean, want.mean) and got.extra["backend"] == "triton"


@needs_interpreter
def test_interp_accumulator_contract():
    # the public streaming op: bit-identical to the reference in any order and batch size,
    # the backend recorded truthfully, exact merges with another backend's state
    crops = ad.data.natural_crops(12, size=9, seed=3)
    want = ad.estimate_patch_moments(crops, 3, batch_size=12, backend="reference")
    perm = torch.randperm(12, generator=torch.Generator().manual_seed(0))
    got = ad.estimate_patch_moments(crops[perm], 3, batch_size=5, backend="triton")
    assert torch.equal(got.cov, want.cov) and torch.equal(got.mean, want.mean) and got.count == want.count
    assert got.extra["backend"] == "triton" and got.extra["exact"]
    a = ad.PatchMomentAccumulator(3, 3, backend="triton").update(crops[:7])
    b = ad.PatchMomentAccumulator(3, 3, backend="reference").update(crops[7:])
    m = a.merge(b).result()
    assert torch.equal(m.cov, want.cov) and m.extra["backend"] == "reference,triton"
    f = ad.estimate_patch_moments((crops.double() - 127.5) / 127.5, 3, batch_size=5, backend="triton")
    assert (f.cov - want.cov).abs().max() < 1e-12 and f.extra["backend"] == "triton" and not f.extra["exact"]


# --------------------------------------------------------------------------- the tensor-core kernel (uint8)
def test_mma_tiling_and_choice():
    # 64x64x3, k = 15: 21 columns per 64-row tile, 4 column tiles, offsets -1..1: 10 tile pairs
    # of 64 x 64 int8 products for 29 * 64 - 210 band columns of 9 channel pairs
    assert pm_tri.mma_tiling(3, 64, 14, 64) == (21, 4, 1)
    assert pm_tri.mma_tiling(1, 64, 14, 64) == (64, 1, 1)
    assert pm_tri.mma_tiling(5, 13, 4, 32) == (6, 3, 1) and pm_tri.mma_tiling(40, 64, 3, 32)[0] == 0
    eff = pm_tri.mma_efficiency(256, 3, 64, 14, 64, 64)
    assert eff == pytest.approx(9 * (29 * 64 - 14 * 15) / (10 * 64 * 64))
    assert pm_tri.mma_efficiency(100, 3, 64, 14, 64, 64) == pytest.approx(eff * 100 / 128)
    cuda = torch.device("cuda")  # a device object only: nothing runs
    assert pm_tri.use_mma((256, 3, 64, 64), cuda, True, 14)
    assert pm_tri._mma_blocks(cuda, (256, 3, 64, 64), 14) == pm_tri.PATCH_MMA_GPU_CONFIG
    # C = 1, 32 x 32, k = 9: 32-row tiles (26% useful) instead of one 64-row tile (6.5%)
    assert pm_tri._mma_blocks(cuda, (256, 1, 32, 32), 4) == pm_tri.PATCH_MMA_GPU_SMALL
    assert pm_tri.use_mma((256, 1, 32, 32), cuda, True, 4)
    assert not pm_tri.use_mma((256, 3, 64, 64), cuda, False, 14)  # float: never on tensor cores
    assert not pm_tri.use_mma((1, 3, 64, 64), cuda, True, 14)  # one image in a K tile of 64
    assert not pm_tri.use_mma((256, 3, 64, 64), cuda, True, 0)  # k = 1: the band is one diagonal
    assert not pm_tri.use_mma((256, 3, 64, 64), cuda, True, 14, dict(mma=False))
    assert not pm_tri.use_mma((256, 80, 64, 64), cuda, True, 14)  # channels do not fit a tile
    assert pm_tri.use_mma((1, 3, 8, 8), cuda, True, 0, dict(mma=True))
    with pytest.raises(ValueError, match="do not fit"):
        pm_tri.use_mma((256, 80, 64, 64), cuda, True, 14, dict(mma=True))
    with pytest.raises(ValueError, match="BM"):
        pm_tri.use_mma((256, 3, 64, 64), cuda, True, 14, dict(BM=48))
    with pytest.raises(ValueError, match="BK"):
        pm_tri.use_mma((256, 3, 64, 64), cuda, True, 14, dict(BK=16))


@needs_interpreter
@pytest.mark.parametrize("case", ["C1 random 7x11 k5", "C3 crops 11x13 k3"])
def test_interp_mma_patch_sums_bit_identical(case):
    # a batch that is not a multiple of the 32-image K tile; C = 1: one 32-column tile holds
    # the whole row; C = 3 real crops: 21 columns per 64-row tile (one row of padding)
    if case.startswith("C1"):
        x, k, blocks = _u8((37, 1, 7, 11), 5), 5, dict(mma=True, BM=32, BK=32)
    else:
        x, k, blocks = ad.data.natural_crops(40, size=13, seed=2)[:, :, 1:12], 3, dict(mma=True, BM=64, BK=32)
    x_before = x.clone()
    s1, s2 = pm_tri.patch_sums(x, k, blocks=blocks)
    r1, r2 = pm_ref.BACKEND.patch_sums(x, k)
    u1, u2 = _unfold_sums(x, k)
    assert s1.dtype == s2.dtype == torch.int64 and torch.equal(x, x_before)
    assert torch.equal(s1, r1) and torch.equal(s2, r2)
    assert torch.equal(s2.double(), u2) and torch.equal(s1.double(), u1)


@needs_interpreter
def test_interp_mma_lag_products_every_element_written():
    # The raw lag-product images against a direct int64 torch transcription, element by
    # element, written into a poisoned buffer: several column tiles (BM = 16, C = 2: 8 columns
    # per tile, 3 tiles for W = 17) with offsets up to +-2 (Lj = 9), tiles outside the image,
    # di = 0 (dj < 0 left 0) and rows past the bottom; channels-last strides; a run of 255s
    # (largest products); 40 images: one full K tile of 32 and a partial one.
    x = _u8((40, 2, 4, 17), 11)
    x[:30, :, 1:3, 5:16] = 255
    x = x.contiguous(memory_format=torch.channels_last)
    assert not x.is_contiguous()
    U = x.sum(0, dtype=torch.int64)
    n_di, Lj = 2, 9
    poison = torch.full((n_di * (2 * Lj + 1) * 2 * 2 * 4 * 17,), -(1 << 62), dtype=torch.int64)
    got = pm_tri._launch_mma(x, U, 0, n_di, Lj, dict(BM=16, BK=32), out=poison)
    assert got.data_ptr() == poison.data_ptr() and torch.equal(got, _lag_products(x, n_di, Lj))
    assert not got[0, :Lj].any() and not got[1, :, :, :, 3].any()  # di = 0, dj < 0; the last row at di = 1


@needs_interpreter
def test_interp_mma_batch_split(monkeypatch):
    # batches above _MMA_MAX_IMAGES (int32 bound) go in several launches whose int64 products
    # are added: 7 images in launches of at most 3, into a poisoned buffer
    monkeypatch.setattr(pm_tri, "_MMA_MAX_IMAGES", 3)
    x = _u8((7, 2, 2, 5), 12)
    poison = torch.full((2 * 5 * 2 * 2 * 2 * 5,), -(1 << 62), dtype=torch.int64)
    got = pm_tri._launch_mma(x, x.sum(0, dtype=torch.int64), 0, 2, 2, dict(BM=32, BK=32), out=poison)
    assert torch.equal(got, _lag_products(x, 2, 2))
    empty = pm_tri._launch_mma(x[:0], x[:0].sum(0, dtype=torch.int64), 0, 2, 2, dict(BM=32, BK=32), out=poison.fill_(-1))
    assert not empty.any()


@needs_interpreter
def test_interp_mma_lag_sums():
    # lag_sums through the tensor-core kernel (per-pixel products summed per lag): every lag
    # of a 5 x 6 image, bit-identical to the torch loop
    x = _u8((9, 2, 5, 6), 4)
    A, S1 = pm_tri.lag_sums(x, 4, 5, blocks=dict(mma=True, BM=32, BK=32))
    RA, RS = pm_ref.lag_sums(x, 4, 5)
    assert A.dtype == torch.int64 and torch.equal(A, RA) and torch.equal(S1, RS)
    assert not A[0, :5].any()
    one = _u8((1, 1, 1, 1), 5)  # one image, one pixel: arguments Triton specializes to 1
    assert torch.equal(pm_tri.patch_sums(one, 1, blocks=dict(mma=True))[1], one.long().reshape(1, 1) ** 2)


# --------------------------------------------------------------------------- a CUDA machine
@needs_cuda_triton
def test_cuda_patch_sums_bit_identical():
    x = ad.data.natural_crops(300, size=32, seed=1)
    s1, s2 = pm_tri.patch_sums(x.cuda(), 9)
    r1, r2 = pm_ref.BACKEND.patch_sums(x, 9)
    assert torch.equal(s1.cpu(), r1) and torch.equal(s2.cpu(), r2)
    A, _ = pm_tri.lag_sums(x.cuda(), 31, 31)
    assert torch.equal(A.cpu(), pm_ref.lag_sums(x, 31, 31)[0])
    for mma in (True, False):  # both kernels, forced
        s1, s2 = pm_tri.patch_sums(x.cuda(), 9, blocks=dict(mma=mma))
        assert torch.equal(s1.cpu(), r1) and torch.equal(s2.cpu(), r2)
