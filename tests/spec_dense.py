"""Plain dense float64 transcriptions of docs/algorithms.md, shared by the tests (slow, literal, obviously right)."""
import math

import torch


def dense_locality(x, train_f, M, ab, tau=1.0):
    """docs/algorithms.md §5 transcribed literally: the full [B, N, n] softmax, float64."""
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
    """docs/algorithms.md §9's dense mask from a [C, C, k, k] window, by loops over every pixel:
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


def _patch(img, r, c, P, circular):
    """docs/algorithms.md §10's Q_p: the [C, P, P] patch of img [C, H, W] centred at (r, c), by loops;
    outside the image: wrapped (circular) or zero."""
    C, H, W = img.shape
    h = P // 2
    out = torch.zeros(C, P, P, dtype=torch.float64)
    for i in range(P):
        for j in range(P):
            rr, cc = r + i - h, c + j - h
            if circular:
                out[:, i, j] = img[:, rr % H, cc % W]
            elif 0 <= rr < H and 0 <= cc < W:
                out[:, i, j] = img[:, rr, cc]
    return out


def dense_els(x, train_f, P, ab, padding="circular", tau=1.0):
    """docs/algorithms.md §10 (ELS, bbELS) transcribed literally, float64: per query pixel, the list of its
    candidate (image, centre) pairs, the softmax over all of them, the weighted centres."""
    a, s2 = math.sqrt(ab), 1.0 - ab
    B, C, H, W = x.shape
    N = train_f.shape[0]
    h = P // 2
    circular = padding == "circular"

    def centres(r, n):  # candidate centre rows (or columns) of position r on an axis of length n
        interior = list(range(h, n - h))
        if circular or h <= r <= n - 1 - h:
            return interior
        return [r]  # within P//2 of an edge (zero padding): only the same row

    cache = {}  # each candidate patch is extracted once

    def candidate(k, rr, cc):  # candidates are zero-padded
        if (k, rr, cc) not in cache:
            cache[k, rr, cc] = _patch(train_f[k], rr, cc, P, False)
        return cache[k, rr, cc]

    out = torch.zeros(B, C, H, W, dtype=torch.float64)
    for b in range(B):
        for r in range(H):
            for c in range(W):
                q = _patch(x[b].double(), r, c, P, circular)
                logits, vals = [], []
                for k in range(N):
                    for rr in centres(r, H):
                        for cc in centres(c, W):
                            cand = candidate(k, rr, cc)
                            logits.append(-((q - a * cand) ** 2).sum() / (2 * s2 * tau))
                            vals.append(train_f[k, :, rr, cc])
                w = torch.softmax(torch.stack(logits), 0)
                out[b, :, r, c] = (w[:, None] * torch.stack(vals)).sum(0)
    return out


def dense_ls(x, train_f, P, ab, tau=1.0):
    """docs/algorithms.md §10 (LS) transcribed literally: per pixel, softmax over the N images of the
    zero-padded patch distance at the same position; all channels share the weights."""
    a, s2 = math.sqrt(ab), 1.0 - ab
    B, C, H, W = x.shape
    out = torch.zeros(B, C, H, W, dtype=torch.float64)
    for b in range(B):
        for r in range(H):
            for c in range(W):
                q = _patch(x[b].double(), r, c, P, False)
                logits = torch.stack(
                    [-((q - a * _patch(train_f[k], r, c, P, False)) ** 2).sum() / (2 * s2 * tau) for k in range(train_f.shape[0])]
                )
                w = torch.softmax(logits, 0)
                out[b, :, r, c] = (w[:, None] * train_f[:, :, r, c]).sum(0)
    return out
