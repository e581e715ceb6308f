"""Plain dense float64 transcriptions of SPEC, shared by the tests (slow, literal, obviously right)."""
import math

import torch


def dense_locality(x, train_f, M, ab, tau=1.0):
    """SPEC 5 transcribed literally: the full [B, N, n] softmax, float64."""
    a, s2 = math.sqrt(ab), 1.0 - ab
    diff2 = (x[:, None, :] - a * train_f[None]) ** 2  # [B, N, n]
    d = torch.einsum("bkj,jm->bkm", diff2, M.double())
    w = torch.softmax(-d / (2 * s2 * tau), dim=1)
    return torch.einsum("bkm,km->bm", w, train_f)


def unit(u):
    return (u.double() - 127.5) / 127.5 if u.dtype == torch.uint8 else u.double()


def noisy_queries(clean_u8, ab, seed=0, dtype=torch.float64):
    """x_t = a*x0 + sqrt(1-ab)*eps from held-out clean images (the sharp-softmax regime at low noise)."""
    g = torch.Generator().manual_seed(seed)
    x0 = unit(clean_u8)
    eps = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    return (math.sqrt(ab) * x0 + math.sqrt(1 - ab) * eps).to(dtype)


def dense_window_mask(window, H, W):
    """SPEC 9's dense mask from a [C, C, k, k] window, by loops over every pixel:
    M[(c', p + o), (c, p)] = window[c, c', o] for in-image p + o (column = output pixel)."""
    C, k = window.shape[0], window.shape[-1]
    r = k // 2
    n = C * H * W
    M = torch.zeros(n, n, dtype=torch.float64)
    for c in range(C):
        for h in range(H):
            for w in range(W):
                m = c * H * W + h * W + w
                for ci in range(C):
                    for i in range(k):
                        for j in range(k):
                            hh, ww = h + i - r, w + j - r
                            if window[c, ci, i, j] and 0 <= hh < H and 0 <= ww < W:
                                M[ci * H * W + hh * W + ww, m] = 1.0
    return M
