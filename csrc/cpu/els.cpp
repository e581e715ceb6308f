// CPU kernel of "els_denoise" (docs/algorithms.md §10, docs/algorithms.md §10).
//
// Structure (convolution by shifts). Write u' for a candidate centre in a training image y
// and p for a query pixel; d(p, u') = ||Q_p(x)||^2 - 2a <Q_p(x), Q_u'(y)> + a^2 ||Q_u'(y)||^2
// with X the padded (circular or zero) query and Y the zero-padded training image. The norms
// are box sums computed once per query / per training image. For a fixed shift
// delta = u' - p the inner product is a P x P box sum of the product image
// E_delta[v] = sum_c X[c, v - delta] * Y[c, v], and the pixels that have u' = p + delta among
// their candidates form a rectangle (docs/algorithms.md §10's rule: circular: every p, u' interior; zeros:
// per axis delta = 0 for every row, delta != 0 for interior p and interior p + delta). So per
// (query, training image, shift) the kernel
//   1. fills E over the rectangle grown by P//2 (C multiply-adds per value; the rows live in a
//      ring of P + 1 rows),
//   2. sums columns of P rows by a sliding window (fused with 1.) and rows of P columns:
//      for P = 3, 5, 7 by a sliding window inside the fold, else directly (P <= 9) or by
//      doubling,
//   3. folds every distance into the online-softmax state of its pixel.
// That is O(C + P + update) per (pixel, candidate) instead of the C*P*P of a GEMM or conv2d.
//
// Precision (the expanded form cancels when x is close to a*y): everything is float64. Each
// of the three terms is a sum of at most C*P*P products bounded by m = max(|x|, 1)^2, so
// |each term| <= C*P^2*m and the computed distance has absolute error below
// (C*P^2 + 2P + 4 + H + W) * 2^-53 * 4*C*P^2*m: summation depth times the largest partial
// sum, where the sliding windows add 2 roundings per step of a partial sum below
// C*P*(P+1)*m, at most H row steps and W column steps (H + W units of 2^-53 * 4*C*P^2*m). The
// logit error is that times 1/(2*s2*tau): for 32x32x3, P = 5, |x| <= 1.1 and t >= 0
// (s2 >= 1e-4, the smallest of the schedule), (75 + 14 + 64) * 1.1e-16 * 363 / 2e-4 = 3.1e-8
// logits, i.e. a relative weight error < 4e-8; at t = 20 (s2 = 2.4e-3) 2.6e-9. The published
// code does the same expansion in float32 (2^-24 instead of 2^-53): about 0.4 logits at
// t = 20. tests/test_els.py checks the CPU backend against the direct-difference float64
// reference at t = 0, 10, 20, 300, 900 and P = 3 to 11.
//
// Softmax: exact online softmax per query pixel (its own state, never shared across the
// batch), one exponential per (pixel, candidate): a degree-9 minimax polynomial after
// reduction by ln 2 (relative error < 2e-14, so a relative output error of the same order).
// Lazy reference: each lane keeps a reference logit mx, set to the running max whenever a
// logit exceeds mx by more than kElsLazyLogit (then l and acc are rescaled), otherwise left
// alone; terms are exp(logit - mx) <= e^30, exact float64 sums (no overflow: l <= n * 1.1e13).
// So mx is always a counted logit, at most the running max and at least the max minus 30,
// and most updates need no rescale and no select. A vector of candidates that are all more
// than kElsSkipLogit below their lanes' references skips its exponentials: each skipped
// term is < e^-50 of a counted one, so the result's relative error from skipping is below
// 2 * N * (H-P+1) * (W-P+1) * e^-50 (2e-14 for N = 50000 32x32 images).
//
// Lanes: eight training images at a time, one per float64 lane (GCC/Clang vector
// extensions: a zmm with AVX-512, two ymm with AVX2). Every loop above runs on whole vectors
// (the query value is broadcast, the eight images' values are interleaved), and each lane
// keeps its own softmax state per pixel. A work item is kK = 2 octets (16 images): per
// pixel the two candidate vectors share one state load and store and one reference check
// (the update's memory traffic and branch work are halved), and the query value is
// broadcast once for both; lane j of a thread sees the images j, j+8, ... of that thread's
// work items. A padded lane (image >= N) gets logit -inf (weight 0) through its norm term.
//
// Threads: OpenMP over work items (dynamic); the per-(thread, lane) states of each pixel
// merge exactly at the end, so the result does not depend on the split beyond rounding.
#include "els.h"

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "../common/convert.h"
#include "../common/cpu_runtime.h"
#include "../common/macros.h"

namespace analytic_diffusion {
namespace {

using cpu_runtime::aligned_array;

constexpr int kL = 8;  // training images per vector (float64 lanes)
constexpr int kK = 2;  // octets per work item: one state load/store per pixel for kK candidate vectors
typedef double v8d __attribute__((vector_size(64)));
typedef int64_t v8l __attribute__((vector_size(64)));

AD_FORCEINLINE v8d splat(double v) { return v8d{v, v, v, v, v, v, v, v}; }
AD_FORCEINLINE v8d load(const double* p) {
    v8d r;
    std::memcpy(&r, p, sizeof r);
    return r;
}
AD_FORCEINLINE void store(double* p, v8d v) { std::memcpy(p, &v, sizeof v); }

// Whether any lane of a is above b (any_above) / at least b (any_at_least): one compare into a
// mask register with AVX-512.
AD_FORCEINLINE bool any_above(v8d a, v8d b) {
#if defined(__AVX512F__)
    return _mm512_cmp_pd_mask(reinterpret_cast<__m512d>(a), reinterpret_cast<__m512d>(b), _CMP_GT_OQ) != 0;
#else
    const v8l m = a > b;
    int64_t r = 0;
    for (int j = 0; j < kL; ++j) r |= m[j];
    return r != 0;
#endif
}
AD_FORCEINLINE bool any_at_least(v8d a, v8d b) {
#if defined(__AVX512F__)
    return _mm512_cmp_pd_mask(reinterpret_cast<__m512d>(a), reinterpret_cast<__m512d>(b), _CMP_GE_OQ) != 0;
#else
    const v8l m = a >= b;
    int64_t r = 0;
    for (int j = 0; j < kL; ++j) r |= m[j];
    return r != 0;
#endif
}

// e^x for x <= kElsLazyLogit + 1 (x = -inf gives 0), relative error < 2e-14 on [-708, 31]:
// n = round(x / ln2) and r = x - n ln2 (one FMA; |r| <= ln2/2), a degree-9 minimax
// polynomial for e^r on [-ln2/2, ln2/2] (relative error 1.4e-14; the float64 reduction adds
// < 1e-15 for |n| <= 45), times 2^n. Below -708 the result is 0 (a term < e^-708 of its lane's
// reference, see kElsSkipLogit for why that is harmless). Lane-wise arithmetic only.
constexpr double kExpPoly[10] = {1.0000000000000129,     0.9999999999998926,     0.49999999999457545,
                                 0.1666666666782791,     0.04166666703268125,    0.008333333002616072,
                                 0.0013888802794601496,  0.0001984159653698895,  2.488402642276661e-05,
                                 2.7482168460640888e-06};
AD_FORCEINLINE v8d exp_lazy(v8d x) {
    const v8d lo = splat(-708.0);
#if defined(__AVX512F__)
    const __mmask8 keep = _mm512_cmp_pd_mask(reinterpret_cast<__m512d>(x), reinterpret_cast<__m512d>(lo), _CMP_GE_OQ);
    // -inf -> -708 (a masked max: GCC 12's plain _mm512_max_pd trips -Wmaybe-uninitialized)
    x = reinterpret_cast<v8d>(_mm512_mask_max_pd(reinterpret_cast<__m512d>(x), 0xFF, reinterpret_cast<__m512d>(x),
                                                 reinterpret_cast<__m512d>(lo)));
#else
    const v8l tiny = x < lo;  // also -inf
    x = tiny ? lo : x;
#endif
    const v8d shifter = splat(6755399441055744.0);  // 1.5 * 2^52: adding it rounds to an integer
    const v8d t = x * splat(1.4426950408889634) + shifter;
    const v8d n = t - shifter;
    const v8d r = x - n * splat(0.69314718055994531);
    v8d p = splat(kExpPoly[9]);
    for (int i = 8; i >= 0; --i) p = p * r + splat(kExpPoly[i]);
#if defined(__AVX512F__)
    return reinterpret_cast<v8d>(  // p * 2^n, 0 below -708
        _mm512_maskz_scalef_pd(keep, reinterpret_cast<__m512d>(p), reinterpret_cast<__m512d>(n)));
#else
    // the low bits of t hold n (-1022 <= n <= 45, two's complement): 2^n = (n + 1023) << 52
    v8l tb;
    std::memcpy(&tb, &t, sizeof tb);
    const v8l bits = ((tb - 0x4338000000000000LL) + 1023) << 52;
    v8d sc;
    std::memcpy(&sc, &bits, sizeof sc);
    return tiny ? splat(0.0) : p * sc;
#endif
}

AD_FORCEINLINE v8d vmax(v8d a, v8d b) { return a > b ? a : b; }

struct Shift {
    int64_t dr, dc;    // delta = u' - p
    int64_t ur0, ur1;  // candidate centre rows [ur0, ur1) (image coordinates)
    int64_t uc0, uc1;  // candidate centre columns
};

// Per axis of length n: (delta, first u', end u') of every shift with a non-empty range.
std::vector<std::array<int64_t, 3>> axis_shifts(int64_t n, int64_t P, bool circular) {
    const int64_t h = P / 2, lo = h, hi = n - h;  // interior [lo, hi)
    std::vector<std::array<int64_t, 3>> out;
    if (circular) {
        for (int64_t d = 0; d < n; ++d) out.push_back({d, lo, hi});
        return out;
    }
    out.push_back({0, 0, n});  // delta = 0: every row (edge rows have only themselves)
    for (int64_t d = -(hi - lo) + 1; d < hi - lo; ++d) {
        if (d == 0) continue;  // interior p and interior p + d
        const int64_t a = std::max(lo, lo + d), b = std::min(hi, hi + d);
        if (a < b) out.push_back({d, a, b});
    }
    return out;
}

struct Geometry {
    int64_t C, H, W, P, h;
    bool circular;
    int64_t XH, XW, xoff_r, xoff_c;  // X buffer (circular: tiled 2H x 2W, zeros: padded by h)
    int64_t YH, YW;                  // padded training image H + 2h, W + 2h
};

// Per-thread scratch of one work item (kK octets). Position-major: the kK octets (and for Y8
// the C channels) of one position are adjacent, so one pointer with compile-time offsets
// reaches all of them.
struct Scratch {
    double* Y8;  // [YH, YW][kK][C][8] the octets, zero-padded, interleaved
    double* ny;  // [H, W][kK][8] -scale * a^2 * ||Q_u'(y)||^2 (-inf in padded lanes)
    double* E;   // [P + 1 rows (ring), YW][kK][8] product rows
    double* V;   // [YW][kK][8] column sums of P rows
    double* D;   // [W][kK][8] inner products of one row of candidates (P > 7)
    double* S0;  // [YW][8] doubling scratch (P > kElsDirectP)
    double* S1;  // [YW][8]
};

// Inner products D[u] = sum_{j < P} V[u + j], u < UC, of one octet (V and D with a stride of
// vs doubles between positions): directly (P - 1 adds) up to kElsDirectP, else by doubling:
// S_2w[u] = S_w[u] + S_w[u + w], and D the S_w of P's binary digits (log2(P) + popcount(P) - 1
// adds).
constexpr int64_t kElsDirectP = 9;
void box_row(const double* V, int64_t vs, int64_t EC, int64_t UC, int64_t P, double* D, double* S0, double* S1) {
    if (P <= kElsDirectP) {
        for (int64_t u = 0; u < UC; ++u) {
            v8d acc = load(V + u * vs);
            for (int64_t j = 1; j < P; ++j) acc += load(V + (u + j) * vs);
            store(D + u * vs, acc);
        }
        return;
    }
    const double* Sw = V;     // S_1
    int64_t sw = vs;          // its stride
    int64_t w = 1, len = EC;  // S_w is defined on [0, len), len = EC - w + 1
    int64_t off = 0;          // D = sum of S_w[u + off] over P's set bits w, low to high
    bool first = true;
    double* bufs[2] = {S0, S1};
    int which = 0;
    for (int64_t rem = P;;) {
        if (rem & 1) {
            if (first) {
                for (int64_t u = 0; u < UC; ++u) store(D + u * vs, load(Sw + (u + off) * sw));
                first = false;
            } else {
                for (int64_t u = 0; u < UC; ++u) store(D + u * vs, load(D + u * vs) + load(Sw + (u + off) * sw));
            }
            off += w;
        }
        rem >>= 1;
        if (rem == 0) break;
        double* Sn = bufs[which];
        which ^= 1;
        const int64_t nlen = len - w;
        for (int64_t u = 0; u < nlen; ++u) store(Sn + u * kL, load(Sw + u * sw) + load(Sw + (u + w) * sw));
        Sw = Sn;
        sw = kL;
        len = nlen;
        w *= 2;
    }
}

// One (query, kK octets of training images, shift): distances of every pair
// (p, u' = p + delta) and their online-softmax updates. X: the query [XH, XW][C]; nx:
// -scale * ||Q_p(x)||^2 per pixel [H, W]; st: per pixel [mx(8), l(8), acc(C x 8)], shared by
// the kK octets (lane j accumulates image j of every octet).
//
// The update is lazy (docs/algorithms.md §10.3): mx is a reference logit per lane, not always
// the running max; terms are added as exp(logit - mx) <= e^kElsLazyLogit, and the state is
// rescaled to a new reference only when a logit exceeds it by more than kElsLazyLogit. So a
// pixel's kK candidate vectors cost one state load/store, kK exponentials and no select.
template <int kC, int kK, int kP>
void run_shift(const Geometry& g, int64_t Crt, const Shift& s, const double* X, const double* nx, double cross,
               const Scratch& w, double* st) {
    const int64_t C = kC > 0 ? kC : Crt;
    const int64_t H = g.H, W = g.W, P = kP > 0 ? kP : g.P, h = g.h, R = P + 1;
    const int64_t UR = s.ur1 - s.ur0, UC = s.uc1 - s.uc0;
    const int64_t EC = UC + 2 * h;
    const int64_t er0 = s.ur0 - h, ec0 = s.uc0 - h;  // E's first row/column (image coords)
    const int64_t YP = kK * C * kL, KP = kK * kL;  // doubles per position: Y8; ny, E, V, D
    const int64_t SP = (2 + C) * kL;               // state doubles per pixel
    const v8d vcross = splat(cross), vskip = splat(-kElsSkipLogit), vlazy = splat(kElsLazyLogit);
    // locals, not w's fields: store() is a memcpy, which may alias w as far as the compiler knows
    const double* const Y8 = w.Y8;
    const double* const ny = w.ny;
    double* const E = w.E;
    double* const V = w.V;
    double* const D = w.D;
    // E row i (ring slot i mod R): sum_c X[c, v - delta] * Y[c, v] for v = (er0 + i, ec0 + j);
    // the query value is broadcast once for the kK octets. slide: also move V down one row,
    // V <- (V + row i) - row i - P (the ring slot that row i does not overwrite)
    auto fill_row = [&](int64_t i, bool slide) {
        const double* xr = X + ((er0 + i - s.dr + g.xoff_r) * g.XW + (ec0 - s.dc + g.xoff_c)) * C;
        const double* yr = Y8 + ((er0 + i + h) * g.YW + (ec0 + h)) * YP;
        double* er = E + (i % R) * EC * KP;
        const double* eo = E + ((i + 1) % R) * EC * KP;
        for (int64_t j = 0; j < EC; ++j) {
            v8d xc[kC > 0 ? kC : 1];
            if constexpr (kC > 0)
                for (int c = 0; c < kC; ++c) xc[c] = splat(xr[j * kC + c]);
            for (int k = 0; k < kK; ++k) {
                const double* y = yr + j * YP + k * C * kL;
                v8d e;
                if constexpr (kC > 0) {
                    e = xc[0] * load(y);
                    for (int c = 1; c < kC; ++c) e += xc[c] * load(y + c * kL);
                } else {
                    e = splat(xr[j * C]) * load(y);
                    for (int64_t c = 1; c < C; ++c) e += splat(xr[j * C + c]) * load(y + c * kL);
                }
                store(er + (j * kK + k) * kL, e);
                if (slide) {
                    double* v = V + (j * kK + k) * kL;
                    store(v, (load(v) + e) - load(eo + (j * kK + k) * kL));
                }
            }
        }
    };
    for (int64_t i = 0; i < P; ++i) fill_row(i, false);
    // V: column sums of the first P rows
    for (int64_t j = 0; j < EC * kK; ++j) {
        v8d acc = load(E + j * kL);
        for (int64_t i = 1; i < P; ++i) acc += load(E + (i * EC * kK + j) * kL);
        store(V + j * kL, acc);
    }
    for (int64_t r = 0; r < UR; ++r) {
        if (r > 0) fill_row(r + P - 1, true);  // row r + P - 1 in, row r - 1 out
        if constexpr (kP == 0)
            for (int k = 0; k < kK; ++k) box_row(V + k * kL, KP, EC, UC, P, D + k * kL, w.S0, w.S1);
        // fold into the pixels p = u' - delta (mod H, W for circular)
        const int64_t ur = s.ur0 + r;
        int64_t pr = ur - s.dr;
        if (g.circular && pr < 0) pr += H;
        const double* yc = Y8 + ((ur + h) * g.YW + (s.uc0 + h)) * YP;  // candidate centres
        const double* nyr = ny + (ur * W + s.uc0) * KP;
        int64_t pc = s.uc0 - s.dc;
        if (g.circular && pc < 0) pc += W;
        v8d dk[kK];  // kP > 0: D[u] of each octet, sliding along the row
        if constexpr (kP > 0)
            for (int k = 0; k < kK; ++k) {
                dk[k] = load(V + k * kL);
                for (int j = 1; j < kP; ++j) dk[k] += load(V + (j * kK + k) * kL);
            }
        // logit = -scale * (||Q_p(x)||^2 - 2a <Q_p(x), q> + a^2 ||q||^2) of candidate u' = (ur, uc0 + u)
        // for its pixel p, each octet; called for u = 0, 1, 2, ... in order (sliding D)
        auto logits = [&](int64_t u, int64_t p, v8d* lg) {
            const v8d vnx = splat(nx[p]);
            for (int k = 0; k < kK; ++k) {
                if constexpr (kP > 0)  // slide the row's box sum: D <- (D + V[u + P - 1]) - V[u - 1]
                    if (u > 0)
                        dk[k] = (dk[k] + load(V + ((u + kP - 1) * kK + k) * kL)) - load(V + ((u - 1) * kK + k) * kL);
                const v8d d = kP > 0 ? dk[k] : load(D + (u * kK + k) * kL);  // <Q_p(x), Q_u'(y)>
                lg[k] = d * vcross + (load(nyr + (u * kK + k) * kL) + vnx);
            }
        };
        auto top_of = [](const v8d* lg) {
            v8d top = lg[0];
            for (int k = 1; k < kK; ++k) top = vmax(top, lg[k]);
            return top;
        };
        // new reference for the lanes of one pixel: the running max; l and acc rescaled
        auto rescale = [&](double* sp, v8d top, v8d m) {
            const v8d mn = vmax(m, top);
            const v8d f = exp_lazy(m - mn);
            for (int64_t q = 1; q < 2 + C; ++q) store(sp + q * kL, load(sp + q * kL) * f);
            store(sp, mn);
            return mn;
        };
        auto add_terms = [&](double* sp, const v8d* e, int64_t u) {
            v8d le = e[0];
            for (int k = 1; k < kK; ++k) le += e[k];
            store(sp + kL, load(sp + kL) + le);
            for (int64_t c = 0; c < C; ++c) {
                v8d acc = load(sp + (2 + c) * kL);
                for (int k = 0; k < kK; ++k) acc += e[k] * load(yc + u * YP + (k * C + c) * kL);
                store(sp + (2 + c) * kL, acc);
            }
        };
        auto next_pixel = [&]() {
            const int64_t p = pr * W + pc;
            if (++pc == W && g.circular) pc = 0;
            return p;
        };
        // two pixels at a time: their 2 * kK exponentials are independent chains in one block
        int64_t u = 0;
        for (; u + 1 < UC; u += 2) {
            const int64_t p0 = next_pixel(), p1 = next_pixel();
            double* sp0 = st + p0 * SP;
            double* sp1 = st + p1 * SP;
            v8d lg0[kK], lg1[kK];
            logits(u, p0, lg0);
            logits(u + 1, p1, lg1);
            const v8d top0 = top_of(lg0), top1 = top_of(lg1);
            v8d m0 = load(sp0), m1 = load(sp1);
            const v8d gap0 = top0 - m0, gap1 = top1 - m1;
            const bool hi0 = any_above(gap0, vlazy), hi1 = any_above(gap1, vlazy);
            if (__builtin_expect(hi0 || hi1, 0)) {
                if (hi0) m0 = rescale(sp0, top0, m0);
                if (hi1) m1 = rescale(sp1, top1, m1);
            } else if (!any_at_least(gap0, vskip) && !any_at_least(gap1, vskip)) {
                continue;  // every term < e^-50 of its lane's reference term
            }
            // (a pixel whose terms are all that small still adds them when its neighbour does not:
            // exact terms, just not skipped)
            v8d e0[kK], e1[kK];
            for (int k = 0; k < kK; ++k) {
                e0[k] = exp_lazy(lg0[k] - m0);
                e1[k] = exp_lazy(lg1[k] - m1);
            }
            add_terms(sp0, e0, u);
            add_terms(sp1, e1, u + 1);
        }
        if (u < UC) {
            const int64_t p = next_pixel();
            double* sp = st + p * SP;
            v8d lg[kK];
            logits(u, p, lg);
            const v8d top = top_of(lg);
            v8d m = load(sp);
            const v8d gap = top - m;
            if (any_above(gap, vlazy))
                m = rescale(sp, top, m);
            else if (!any_at_least(gap, vskip))
                continue;
            v8d e[kK];
            for (int k = 0; k < kK; ++k) e[k] = exp_lazy(lg[k] - m);
            add_terms(sp, e, u);
        }
    }
}

template <typename T>
AD_FORCEINLINE double unit_value(T v) {
    return static_cast<double>(v);
}
template <>
AD_FORCEINLINE double unit_value<uint8_t>(uint8_t v) {
    return dequantize_u8_value<double>(v);
}

// Training images [k0, k0 + 8) (those < N) as octet k of the zero-padded interleaved buffer
// Y8 [H + 2h, W + 2h][kK][C][8] (zeroed by the caller); missing lanes stay zero (their logits
// get -inf).
template <typename T>
void load_octet(const Geometry& g, const T* train, int64_t N, int64_t k0, int64_t k, int64_t ts0, int64_t ts1,
                int64_t ts2, int64_t ts3, double* Y8) {
    const int64_t YP = kK * g.C * kL;
    for (int64_t j = 0; j < kL && k0 + j < N; ++j) {
        const T* src = train + (k0 + j) * ts0;
        for (int64_t c = 0; c < g.C; ++c)
            for (int64_t r = 0; r < g.H; ++r) {
                const T* sr = src + c * ts1 + r * ts2;
                double* d = Y8 + ((r + g.h) * g.YW + g.h) * YP + (k * g.C + c) * kL + j;
                for (int64_t q = 0; q < g.W; ++q) d[q * YP] = unit_value<T>(sr[q * ts3]);
            }
    }
}

template <typename T, int kC>
void els_run_typed(const double* x, int64_t B, const Geometry& g, const T* train, int64_t N,
                   int64_t ts0, int64_t ts1, int64_t ts2, int64_t ts3, double a, double scale,
                   double* mx_out, double* l_out, double* acc_out) {
    const int64_t C = g.C, H = g.H, W = g.W, HW = H * W;
    // X per query [XH, XW][C]: circular: tiled twice per axis, X[i, j, c] = x[c, i mod H, j mod W];
    // zeros: padded by h.
    const int64_t XS = C * g.XH * g.XW;
    auto X = aligned_array<double>(B * XS);
    std::fill(X.get(), X.get() + B * XS, 0.0);
    for (int64_t b = 0; b < B; ++b)
        for (int64_t c = 0; c < C; ++c)
            for (int64_t i = 0; i < g.XH; ++i)
                for (int64_t j = 0; j < g.XW; ++j) {
                    int64_t r = i, q = j;
                    if (g.circular) {
                        r %= H;
                        q %= W;
                    } else {
                        r -= g.h;
                        q -= g.h;
                        if (r < 0 || r >= H || q < 0 || q >= W) continue;
                    }
                    X[b * XS + (i * g.XW + j) * C + c] = x[((b * C + c) * H + r) * W + q];
                }
    // nx[b, p] = -scale * ||Q_p(x_b)||^2 (circular or zero-padded patch)
    auto nx = aligned_array<double>(B * HW);
    for (int64_t b = 0; b < B; ++b)
        for (int64_t r = 0; r < H; ++r)
            for (int64_t q = 0; q < W; ++q) {
                double acc = 0.0;
                for (int64_t i = 0; i < g.P; ++i)
                    for (int64_t j = 0; j < g.P; ++j) {
                        int64_t rr = r + i - g.h, qq = q + j - g.h;
                        if (g.circular) {
                            rr = ((rr % H) + H) % H;
                            qq = ((qq % W) + W) % W;
                        } else if (rr < 0 || rr >= H || qq < 0 || qq >= W) {
                            continue;
                        }
                        for (int64_t c = 0; c < C; ++c) {
                            const double v = x[((b * C + c) * H + rr) * W + qq];
                            acc += v * v;
                        }
                    }
                nx[b * HW + r * W + q] = -scale * acc;
            }
    std::vector<Shift> shifts;
    for (const auto& rs : axis_shifts(H, g.P, g.circular))
        for (const auto& cs : axis_shifts(W, g.P, g.circular))
            shifts.push_back({rs[0], cs[0], rs[1], rs[2], cs[1], cs[2]});

    const int64_t octets = (N + kL - 1) / kL;
    const int64_t groups = (octets + kK - 1) / kK;  // work items: kK octets each
    const int nth = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(cpu_runtime::team_size(), groups)));
    const int64_t SP = (2 + C) * kL;  // per pixel: mx, l, acc[C], 8 lanes each
    const int64_t SS = B * HW * SP;   // per thread
    auto state = aligned_array<double>(int64_t(nth) * SS);
    const int64_t YS = g.YH * g.YW * kK * C * kL, NYS = HW * kK * kL, ERS = (g.P + 1) * g.YW * kK * kL,
                  VS = g.YW * kK * kL, DS = g.W * kK * kL;
    const int64_t TS = YS + NYS + ERS + VS + DS + 2 * g.YW * kL;
    auto scratch = aligned_array<double>(int64_t(nth) * TS);
    // mx starts at a finite -1e300 (not -inf): a first logit is then > mx + kElsLazyLogit and
    // sets the reference; -1e300 - mx never gives NaN
    for (int t = 0; t < nth; ++t)
        for (int64_t q = 0; q < B * HW; ++q) {
            double* sp = state.get() + t * SS + q * SP;
            std::fill(sp, sp + kL, -1e300);
            std::fill(sp + kL, sp + SP, 0.0);
        }
#if defined(_OPENMP)
#pragma omp parallel for num_threads(nth) schedule(dynamic, 1)
#endif
    for (int64_t o = 0; o < groups; ++o) {
        const int tid = cpu_runtime::thread_index();
        double* st = state.get() + tid * SS;
        Scratch w;
        w.Y8 = scratch.get() + tid * TS;
        w.ny = w.Y8 + YS;
        w.E = w.ny + NYS;
        w.V = w.E + ERS;
        w.D = w.V + VS;
        w.S0 = w.D + DS;
        w.S1 = w.S0 + g.YW * kL;
        const double nyscale = -scale * a * a;
        std::fill(w.Y8, w.Y8 + YS, 0.0);
        const int64_t YP = kK * C * kL;
        for (int k = 0; k < kK; ++k) {
            const int64_t k0 = (o * kK + k) * kL;  // first image of this octet
            load_octet<T>(g, train, N, k0, k, ts0, ts1, ts2, ts3, w.Y8);
            // ny[u', k, lane] = -scale * a^2 * ||Q_u'(y)||^2 (zero-padded patch) for every centre
            // u'; -inf in a padded lane (image k0 + lane >= N), whose logits are then -inf
            for (int64_t r = 0; r < H; ++r)
                for (int64_t q = 0; q < W; ++q) {
                    v8d acc = splat(0.0);
                    for (int64_t i = 0; i < g.P; ++i)
                        for (int64_t j = 0; j < g.P; ++j)
                            for (int64_t c = 0; c < C; ++c) {
                                const v8d v = load(w.Y8 + ((r + i) * g.YW + q + j) * YP + (k * C + c) * kL);
                                acc += v * v;
                            }
                    v8d v = acc * splat(nyscale);
                    for (int j = 0; j < kL; ++j)
                        if (k0 + j >= N) v[j] = -std::numeric_limits<double>::infinity();
                    store(w.ny + ((r * W + q) * kK + k) * kL, v);
                }
        }
        for (int64_t b = 0; b < B; ++b)
            for (const Shift& s : shifts) {
                const double* xb = X.get() + b * XS;
                const double* nxb = nx.get() + b * HW;
                double* stb = st + b * HW * SP;
                const double cross = 2.0 * a * scale;
                switch (g.P) {  // small patches: compile-time P, inner products summed in the fold
                    case 3: run_shift<kC, kK, 3>(g, C, s, xb, nxb, cross, w, stb); break;
                    case 5: run_shift<kC, kK, 5>(g, C, s, xb, nxb, cross, w, stb); break;
                    case 7: run_shift<kC, kK, 7>(g, C, s, xb, nxb, cross, w, stb); break;
                    default: run_shift<kC, kK, 0>(g, C, s, xb, nxb, cross, w, stb); break;
                }
            }
    }
    // exact merge of the per-(thread, lane) states
    for (int64_t b = 0; b < B; ++b)
        for (int64_t p = 0; p < HW; ++p) {
            double M = -std::numeric_limits<double>::infinity();
            for (int t = 0; t < nth; ++t) {
                const double* sp = state.get() + t * SS + (b * HW + p) * SP;
                for (int j = 0; j < kL; ++j)
                    if (sp[kL + j] > 0.0) M = std::max(M, sp[j]);
            }
            double L = 0.0;
            for (int64_t c = 0; c < C; ++c) acc_out[(b * C + c) * HW + p] = 0.0;
            for (int t = 0; t < nth; ++t) {
                const double* sp = state.get() + t * SS + (b * HW + p) * SP;
                for (int j = 0; j < kL; ++j) {
                    if (!(sp[kL + j] > 0.0)) continue;  // a lane that saw no image
                    const double f = std::exp(sp[j] - M);
                    L += f * sp[kL + j];
                    for (int64_t c = 0; c < C; ++c) acc_out[(b * C + c) * HW + p] += f * sp[(2 + c) * kL + j];
                }
            }
            mx_out[b * HW + p] = M;
            l_out[b * HW + p] = L;
        }
}

template <typename T>
void els_dispatch_c(const double* x, int64_t B, const Geometry& g, const T* train, int64_t N,
                    int64_t ts0, int64_t ts1, int64_t ts2, int64_t ts3, double a, double scale,
                    double* mx, double* l, double* acc) {
    if (g.C == 3)
        els_run_typed<T, 3>(x, B, g, train, N, ts0, ts1, ts2, ts3, a, scale, mx, l, acc);
    else if (g.C == 1)
        els_run_typed<T, 1>(x, B, g, train, N, ts0, ts1, ts2, ts3, a, scale, mx, l, acc);
    else
        els_run_typed<T, 0>(x, B, g, train, N, ts0, ts1, ts2, ts3, a, scale, mx, l, acc);
}

}  // namespace

void els_denoise_run(uintptr_t x_ptr, int64_t B, int64_t C, int64_t H, int64_t W,
                     uintptr_t train_ptr, int64_t N, int64_t ts0, int64_t ts1, int64_t ts2,
                     int64_t ts3, int train_kind, int64_t P, bool circular, double a,
                     double scale, uintptr_t mx_ptr, uintptr_t l_ptr, uintptr_t acc_ptr) {
    if (B < 1 || C < 1 || H < 1 || W < 1 || N < 1) throw std::invalid_argument("els_denoise_run: empty input");
    if (P < 1 || P % 2 == 0) throw std::invalid_argument("els_denoise_run: P must be odd and >= 1");
    if (circular && (P > H || P > W))
        throw std::invalid_argument("els_denoise_run: circular needs P <= min(H, W)");
    if (ts0 < 0 || ts1 < 0 || ts2 < 0 || ts3 < 0) throw std::invalid_argument("els_denoise_run: negative stride");
    if (!x_ptr || !train_ptr || !mx_ptr || !l_ptr || !acc_ptr)
        throw std::invalid_argument("els_denoise_run: null pointer");
    if (!(scale > 0.0) || !std::isfinite(scale) || !std::isfinite(a))
        throw std::invalid_argument("els_denoise_run: bad a or scale");
    Geometry g;
    g.C = C;
    g.H = H;
    g.W = W;
    g.P = P;
    g.h = P / 2;
    g.circular = circular;
    g.XH = circular ? 2 * H : H + 2 * g.h;
    g.XW = circular ? 2 * W : W + 2 * g.h;
    g.xoff_r = circular ? H : g.h;
    g.xoff_c = circular ? W : g.h;
    g.YH = H + 2 * g.h;
    g.YW = W + 2 * g.h;
    const auto* x = reinterpret_cast<const double*>(x_ptr);
    auto* mx = reinterpret_cast<double*>(mx_ptr);
    auto* l = reinterpret_cast<double*>(l_ptr);
    auto* acc = reinterpret_cast<double*>(acc_ptr);
    switch (train_kind) {
        case 0:
            els_dispatch_c(x, B, g, reinterpret_cast<const uint8_t*>(train_ptr), N, ts0, ts1, ts2, ts3, a, scale, mx, l, acc);
            break;
        case 1:
            els_dispatch_c(x, B, g, reinterpret_cast<const float*>(train_ptr), N, ts0, ts1, ts2, ts3, a, scale, mx, l, acc);
            break;
        case 2:
            els_dispatch_c(x, B, g, reinterpret_cast<const double*>(train_ptr), N, ts0, ts1, ts2, ts3, a, scale, mx, l, acc);
            break;
        default:
            throw std::invalid_argument("els_denoise_run: train_kind must be 0 (uint8), 1 (float32) or 2 (float64)");
    }
}

}  // namespace analytic_diffusion
