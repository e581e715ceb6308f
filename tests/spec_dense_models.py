"""Plain dense float64 transcriptions of docs/algorithms.md 11-13 (slow, literal, obviously right), in the
style of spec_dense.py: full softmaxes, argsorts, one window at a time."""
import math

import torch
import torch.nn.functional as F

from spec_dense import dense_locality


def dense_optimal(x, train_f, ab, tau=1.0):
    """docs/algorithms.md §6: softmax_k(-||x - a y_k||^2 / (2 s2 tau)) over all N, float64. x [B, n], train_f [N, n]."""
    a, s2 = math.sqrt(ab), 1.0 - ab
    d = ((x[:, None, :] - a * train_f[None]) ** 2).sum(-1)
    return torch.softmax(-d / (2 * s2 * tau), dim=1) @ train_f


def dense_scfdm(x, train_f, ab, xi, s, k=None, tau=1.0):
    """docs/algorithms.md §11: (1/M) sum_m D_opt(x + s*xi_m), D_opt restricted to the k nearest training
    images of each smoothed point by ||x/a - y||. x [B, n], xi [M, B, n]."""
    a = math.sqrt(ab)
    outs = []
    for m in range(xi.shape[0]):
        xs = x + s * xi[m]
        rows = []
        for b in range(xs.shape[0]):
            if k is None or k >= train_f.shape[0]:
                sub = train_f
            else:
                order = torch.argsort(((xs[b] / a - train_f) ** 2).sum(-1), stable=True)
                sub = train_f[order[:k]]
            rows.append(dense_optimal(xs[b : b + 1], sub, ab, tau))
        outs.append(torch.cat(rows))
    return torch.stack(outs).mean(0)


def dense_golddiff_survivors(x, train_f, image_shape, ab, r, k_min, k_max, factor):
    """docs/algorithms.md §12's selection, given the random numbers r [B, N] whose m smallest form each pool:
    returns per query the sorted indices of the k_t survivors."""
    N = train_f.shape[0]
    a, s2 = math.sqrt(ab), 1.0 - ab
    lam = min(1.0, max(0.0, 1.0 - math.sqrt(s2)))
    m = min(N, max(k_max, round(k_max + (N - k_max) * lam)))
    k_t = max(k_min, round(k_max - (k_max - k_min) * lam))
    C, H, W = image_shape

    def A(v):  # average pooling by `factor`
        return F.avg_pool2d(v.reshape(-1, C, H, W), factor).reshape(v.shape[0], -1)

    out = []
    for b in range(x.shape[0]):
        pool = torch.argsort(r[b], stable=True)[:m]
        dc = ((A(x[b : b + 1]) - a * A(train_f[pool])) ** 2).sum(-1)
        coarse = pool[torch.argsort(dc, stable=True)[:k_max]]
        df = ((x[b] - a * train_f[coarse]) ** 2).sum(-1)
        out.append(torch.sort(coarse[torch.argsort(df, stable=True)[:k_t]]).values)
    return out, m, k_t


def dense_golddiff(x, train_f, image_shape, M, ab, r, k_min, k_max, factor, tau=1.0):
    """docs/algorithms.md §12: docs/algorithms.md §5 (exact softmax) over each query's survivors only."""
    keep, _, _ = dense_golddiff_survivors(x, train_f, image_shape, ab, r, k_min, k_max, factor)
    return torch.cat([dense_locality(x[b : b + 1], train_f[keep[b]], M, ab, tau) for b in range(x.shape[0])])


def dense_pspc_square(x, train_f, P, ab, tau=1.0):
    """docs/algorithms.md §13: for every P x P window (top-left in [0, H-P] x [0, W-P]) the posterior mean of the
    patch over the N training patches at the same position; each pixel the average of the
    means of the windows covering it. x [B, C, H, W], train_f [N, C, H, W], float64."""
    a, s2 = math.sqrt(ab), 1.0 - ab
    B, C, H, W = x.shape
    N = train_f.shape[0]
    total = torch.zeros_like(x)
    count = torch.zeros(H, W, dtype=torch.float64)
    for i in range(H - P + 1):
        for j in range(W - P + 1):
            xw = x[:, :, i : i + P, j : j + P].reshape(B, -1)
            yw = train_f[:, :, i : i + P, j : j + P].reshape(N, -1)
            d = ((xw[:, None, :] - a * yw[None]) ** 2).sum(-1)
            w = torch.softmax(-d / (2 * s2 * tau), dim=1)
            total[:, :, i : i + P, j : j + P] += (w @ yw).reshape(B, C, P, P)
            count[i : i + P, j : j + P] += 1
    return total / count
