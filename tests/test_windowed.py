"""The windowed Wiener filter (k x k windows from patch moments) against an explicit
per-pixel MMSE loop, autograd, the full Wiener filter (docs/algorithms.md §3) and docs/algorithms.md §4's masks."""
import math

import pytest
import torch

import analytic_diffusion as ad
from analytic_diffusion.filters import mask_from_wiener_matrix


def smooth_images(N, C, H, W, seed=0):
    """float64 [N, C, H, W] in about [-1, 1] with spatial and cross-channel correlation."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(N, C, H + 2, W + 2, generator=g, dtype=torch.float64)
    blur = torch.ones(C, C, 3, 3, dtype=torch.float64) / (9 * C) + torch.eye(C, dtype=torch.float64)[:, :, None, None] * 0.05
    return (torch.nn.functional.conv2d(z, blur) * 0.8 + 0.1).clamp(-1, 1)


@pytest.fixture(scope="module")
def small_patch_moments():
    return ad.estimate_patch_moments(smooth_images(200, 2, 10, 9), 5)  # 6000 patches, d = 50: full rank


def loop_estimate(pm, x, ab):
    """docs/algorithms.md §9.1's MMSE linear estimate, pixel by pixel, from the part of the window inside the image:
    x0[c] = mu_cc + a S[cc, O] (ab S_OO + s2 I)^-1 (x_O - a mu_O), float64, no convolution."""
    C, k = pm.image_shape[0], pm.image_shape[1]
    r = k // 2
    a, s2 = math.sqrt(ab), 1.0 - ab
    S, mu = pm.cov, pm.mean
    B, _, H, W = x.shape
    out = torch.empty(B, C, H, W, dtype=torch.float64)
    for h in range(H):
        for w in range(W):
            idx, vals = [], []
            for c in range(C):
                for i in range(k):
                    for j in range(k):
                        hh, ww = h + i - r, w + j - r
                        if 0 <= hh < H and 0 <= ww < W:
                            idx.append(c * k * k + i * k + j)
                            vals.append(x[:, c, hh, ww])
            O = torch.tensor(idx)
            xo = torch.stack(vals, 1)  # [B, |O|]
            cov_x = ab * S[O][:, O] + s2 * torch.eye(len(idx), dtype=torch.float64)
            for c in range(C):
                cc = c * k * k + r * k + r
                w_o = torch.linalg.solve(cov_x, a * S[O, cc])
                out[:, c, h, w] = mu[cc] + (xo - a * mu[O]) @ w_o
    return out


@pytest.mark.parametrize("hw", [(6, 5), (4, 7), (12, 3)])  # windows cut on every side; H or W < k
@pytest.mark.parametrize("t", [700, 100])
def test_conv_equals_per_pixel_loop(small_patch_moments, hw, t):
    ab = ad.alpha_bar_at(t)
    x = smooth_images(3, 2, *hw, seed=5) * math.sqrt(ab) + torch.randn(3, 2, *hw, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * math.sqrt(1 - ab)
    x_before = x.clone()
    out = ad.WindowedWiener(small_patch_moments).apply(x, ab)
    ref = loop_estimate(small_patch_moments, x, ab)
    assert out.dtype == torch.float64 and out.shape == x.shape
    assert (out - ref).abs().max().item() < 1e-10
    assert torch.equal(x, x_before)
    out32 = ad.WindowedWiener(small_patch_moments).apply(x.float(), ab)
    assert out32.dtype == torch.float32 and (out32.double() - ref).abs().max().item() < 1e-5


def test_sensitivity_and_matrix_are_the_jacobian(small_patch_moments):
    shape = (2, 6, 7)
    f = ad.WindowedWiener(small_patch_moments, image_shape=shape)
    ab = ad.alpha_bar_at(300)
    x = torch.randn(1, *shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    J = torch.autograd.functional.jacobian(lambda v: f.apply(v.reshape(1, *shape), ab).reshape(-1), x.reshape(-1))
    pixels = [0, 6, 20, 41, 42 + 3 * 7 + 3, 83]  # corners of both channels, an edge, the interior
    S = f.sensitivity(ab, pixels)
    assert S.shape == (len(pixels), *shape) and S.dtype == torch.float64
    assert (S.reshape(len(pixels), -1) - J[pixels]).abs().max().item() < 1e-12
    A = f.matrix(ab)
    assert A.shape == (84, 84) and (A / math.sqrt(ab) - J).abs().max().item() < 1e-12
    # the interior pixel's field is the kernel placed at the pixel, zero outside the window
    K = f.kernel(ab)[0]
    assert torch.equal(S[4, :, 1:6, 1:6], K[1]) and S[4].abs().sum().item() == pytest.approx(K[1].abs().sum().item())
    den = ad.WindowedWienerDenoiser(small_patch_moments, image_shape=shape)
    assert torch.equal(den.sensitivity(300, pixels), S)
    with pytest.raises(ValueError, match="pixels"):
        f.sensitivity(ab, [84])


@pytest.fixture(scope="module")
def crops16():
    """The same 3000 crops as conftest's crop_moments (full moments) feed the patch moments."""
    return ad.data.natural_crops(3000, size=16, seed=2)


def pooled_r2(pred, target):
    # one r2 over the whole batch: at mid noise the full Wiener output is nearly flat within
    # an image (its per-image r2 denominator is ~0), while it varies between images
    return float(ad.r2(pred.reshape(1, -1), target.reshape(1, -1)))


def test_agreement_with_full_wiener_improves_with_k(crops16, crop_filter):
    held = (ad.data.natural_crops(32, size=16, seed=11).double() - 127.5) / 127.5
    eps = torch.randn(held.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ks, ts = (3, 5, 7, 9), (500, 300, 100)
    interior = slice(4, 12)  # every window of k <= 9 fits around these pixels
    r2_in = {t: [] for t in ts}
    r2_all = {}
    for k in ks:
        f = ad.WindowedWiener(ad.estimate_patch_moments(crops16, k))
        for t in ts:
            ab = ad.alpha_bar_at(t)
            x = math.sqrt(ab) * held + math.sqrt(1 - ab) * eps
            ref, out = crop_filter.apply(x, ab), f.apply(x, ab)
            r2_in[t].append(pooled_r2(out[..., interior, interior], ref[..., interior, interior]))
            r2_all[k, t] = pooled_r2(out, ref)
    for t in ts:
        assert all(b > a for a, b in zip(r2_in[t], r2_in[t][1:])), (t, r2_in[t])
    # measured: t=300 0.987, t=100 0.997 (interior); 0.981 and 0.9965 over the whole image
    assert r2_in[300][-1] > 0.98 and r2_in[100][-1] > 0.995
    assert r2_all[9, 300] > 0.97 and r2_all[9, 100] > 0.99  # the cut border windows stay close
    assert r2_in[500][-1] > 0.85  # long-range correlations at high noise: the window's limit


def test_any_resolution_and_stationarity():
    pm = ad.estimate_patch_moments(ad.data.natural_crops(400, size=8, seed=3), 5)
    f = ad.WindowedWiener(pm)
    ab = ad.alpha_bar_at(200)
    big = (ad.data.natural_crops(2, size=40, seed=4)[..., :24].double() - 127.5) / 127.5  # 40 x 24
    x = math.sqrt(ab) * big + math.sqrt(1 - ab) * torch.randn(big.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    out = f.apply(x, ab)
    assert out.shape == (2, 3, 40, 24) and torch.isfinite(out).all()
    # an interior pixel's estimate depends only on its 5x5 window, wherever it sits
    for h, w in [(2, 2), (20, 11), (37, 21)]:
        crop = x[:, :, h - 2 : h + 3, w - 2 : w + 3]
        assert (f.apply(crop, ab)[:, :, 2, 2] - out[:, :, h, w]).abs().max().item() < 1e-12
    den = ad.WindowedWienerDenoiser(pm)
    s = ad.sample(den, 2, (3, 40, 24), steps=3, seed=0)
    assert s.shape == (2, 3, 40, 24) and torch.isfinite(s).all()
    assert torch.equal(den(x, 200), out)


def test_mask_pattern_dense_mask_and_density(small_patch_moments):
    shape = (2, 7, 6)
    n = 84
    f = ad.WindowedWiener(small_patch_moments, image_shape=shape)
    sizes = []
    for t in (900, 300, 50, 0):
        ab = ad.alpha_bar_at(t)
        P = f.mask(ab, 0.05)
        assert P.shape == (2, 2, 5, 5) and P.dtype == torch.bool
        assert P[0, 0, 2, 2] and P[1, 1, 2, 2]  # a pixel is in its own window
        sizes.append(int(P.sum()))
        Mt = f.mask(ab, 0)
        assert Mt.dtype == torch.float64 and Mt[0, 0, 2, 2] == pytest.approx(1.0) and Mt[1, 1, 2, 2] == pytest.approx(1.0)
        assert torch.equal(P, Mt.abs() >= 0.05 * Mt.abs().max())
        D = f.dense_mask(ab, 0.05)
        assert D.shape == (n, n) and D.dtype == torch.bool
        assert f.mask_density(ab, 0.05) == pytest.approx(D.double().mean().item(), abs=1e-15)
        cols = [0, 5, 3 * 6 + 2, 42 + 4 * 6 + 5, 83]
        W = f.window(ab, 0.05, cols)
        assert torch.equal(W.reshape(len(cols), n).T, D[:, cols])
        # interior output pixel (channel 1, h=3, w=2): the pattern placed at it
        m = 42 + 3 * 6 + 2
        assert torch.equal(D[:, m].reshape(shape)[:, 1:6, 0:5], P[1])
        assert int(D[:, m].sum()) == int(P[1].sum())
        # corner pixel (channel 0, 0, 0): the pattern clipped to the image
        assert torch.equal(D[:, 0].reshape(shape)[:, 0:3, 0:3], P[0][:, 2:, 2:]) and int(D[:, 0].sum()) == int(P[0][:, 2:, 2:].sum())
        Dw = f.dense_mask(ab, 0)
        assert Dw.dtype == torch.float64 and torch.equal(Dw != 0, f.dense_mask(ab, 1e-300))
    assert sizes[-1] < sizes[0]  # locality emerges as the noise falls


def test_windows_match_spec4_masks_at_low_noise(crops16, crop_filter):
    f = ad.WindowedWiener(ad.estimate_patch_moments(crops16, 9), image_shape=(3, 16, 16))
    ab = ad.alpha_bar_at(0)
    full = crop_filter.mask(ab, 0.02)
    cols = [c * 256 + h * 16 + w for c in range(3) for h in range(6, 10) for w in range(6, 10)]
    a, b = full[:, cols], f.window(ab, 0.02, cols).reshape(len(cols), -1).T
    iou = (a & b).sum().item() / (a | b).sum().item()
    assert iou > 0.75, iou  # measured 0.85; the full covariance from 3000 images is the noisier one


def test_locality_denoiser_with_patch_moments_takes_the_windowed_path():
    train = ad.data.natural_crops(120, size=6, seed=8)
    pm = ad.estimate_patch_moments(train, 3)
    den = ad.LocalityDenoiser(train, moments=pm, threshold=0.05)
    assert den.windowed and isinstance(den.filter, ad.WindowedWiener)
    ab = ad.alpha_bar_at(100)
    W = den.mask(100)  # the window itself, [C, C, k, k]: nothing n x n
    assert W.shape == (3, 3, 3, 3) and torch.equal(W, ad.WindowedWiener(pm).mask(ab, 0.05))
    x = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(0))
    dense = ad.WindowedWiener(pm, (3, 6, 6)).dense_mask(ab, 0.05)  # the same windows placed densely
    ref = ad.ops.locality_denoise(x.double(), train, dense, ab, backend="reference")
    assert ((den(x.double(), 100) - ref).abs().max()) < 1e-12
    info = den.window_info(100)
    assert info["patch_size"] == 3 and 0 <= info["radius"] <= 1 and isinstance(info["touches_edge"], bool)
    s = ad.sample(den, 2, (3, 6, 6), steps=2)
    assert s.shape == (2, 3, 6, 6) and torch.isfinite(s).all()
    with pytest.raises(ValueError, match="channels"):
        ad.LocalityDenoiser(train[:, :1], moments=pm)
    with pytest.raises(ValueError, match="threshold must be > 0"):
        ad.LocalityDenoiser(train, moments=pm, threshold=0.0)


def test_windowed_path_takes_a_larger_patch_where_the_window_reaches_the_edge():
    train = ad.data.natural_crops(200, size=8, seed=8)
    small, large = ad.estimate_patch_moments(train, 3), ad.estimate_patch_moments(train, 7)
    den = ad.LocalityDenoiser(train, moments=[large, small], threshold=0.02)  # any order
    steps = ad.ddim_timesteps(10)
    infos = [den.window_info(t) for t in steps]
    for t, info in zip(steps, infos):
        alone = ad.WindowedWiener(small).mask(ad.alpha_bar_at(t), 0.02)
        reaches = bool(alone[:, :, 0].any() or alone[:, :, -1].any() or alone[:, :, :, 0].any() or alone[:, :, :, -1].any())
        assert info["patch_size"] == (7 if reaches else 3), (t, info)
        assert den.mask(t).shape[-1] == info["patch_size"]
    assert infos[0]["patch_size"] == 7  # high noise: the 3x3 statistics are too small
    radii = [i["radius"] for i in infos]
    assert radii[0] >= radii[-1]  # windows shrink as the noise falls
    with pytest.raises(ValueError, match="different patch sizes"):
        ad.LocalityDenoiser(train, moments=[small, small])
    with pytest.raises(ValueError, match="window_info is for the windowed path"):
        ad.LocalityDenoiser(train[:20]).window_info(100)


def test_bad_inputs_are_clear_errors(small_patch_moments, crop_moments):
    with pytest.raises(ValueError, match="patch_moments.*kind 'full'"):
        ad.WindowedWiener(crop_moments)
    with pytest.raises(TypeError, match="patch_moments"):
        ad.WindowedWiener(small_patch_moments.cov)
    f = ad.WindowedWiener(small_patch_moments)
    with pytest.raises(ValueError, match="channels"):
        f.apply(torch.zeros(1, 3, 5, 5), 0.5)
    with pytest.raises(ValueError, match="image_shape"):
        f.apply(torch.zeros(1, 50), 0.5)  # flat input needs an image shape
    with pytest.raises(ValueError, match="image_shape"):
        f.sensitivity(0.5, [0])
    with pytest.raises(ValueError, match="channels"):
        ad.WindowedWiener(small_patch_moments, image_shape=(3, 5, 5))
    with pytest.raises(ValueError, match="alpha_bar"):
        f.apply(torch.zeros(1, 2, 5, 5), 1.0)
    with pytest.raises(ValueError, match="cuts"):
        f.kernel(0.5, (3, 0, 0, 0))
    mean_before, cov_before = small_patch_moments.mean.clone(), small_patch_moments.cov.clone()
    f.apply(torch.zeros(1, 2, 5, 5), 0.5)
    assert torch.equal(small_patch_moments.mean, mean_before) and torch.equal(small_patch_moments.cov, cov_before)


def test_window_of_a_pixel_is_the_dense_mask_column_on_both_paths():
    train = ad.data.natural_crops(200, size=8, seed=8)
    pm = ad.estimate_patch_moments(train, 5)
    den = ad.LocalityDenoiser(train, moments=pm)
    dense = ad.WindowedWiener(pm, (3, 8, 8)).dense_mask(ad.alpha_bar_at(100), 0.02)
    for m in (0, 7, 37, 100, 191):  # corners, edges, interior, every channel
        assert torch.equal(den.window_of(100, m), dense[:, m].reshape(3, 8, 8)), m
    full = ad.LocalityDenoiser(train[:50])
    assert torch.equal(full.window_of(100, 37), full.mask(100)[:, 37].reshape(3, 8, 8))
    with pytest.raises(ValueError, match="pixel"):
        den.window_of(100, 192)
