// Certified pruning bound for uint8 training sets: see pruning_bound.h and docs/algorithms.md
// §14.1 ("integer bound"). One pass over the training set reads each image once, 1 byte per
// pixel, and computes its exact integer dot products with every int8-quantised query row; the
// lower bounds, the candidates for the upper bound and the survivor lists follow without any
// [B, N] temporaries beyond L itself.
#include "pruning_bound.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <vector>

#include "../common/convert.h"
#include "../common/cpu_isa.h"
#include "../common/cpu_runtime.h"
#include "../common/macros.h"

namespace analytic_diffusion {
namespace {

using cpu_runtime::team_size;
using cpu_runtime::thread_index;

constexpr int kImg = 4;  // images per block
constexpr int kRow = 4;  // query rows per micro-kernel call
// int32 lanes: one vpdpbusd adds 4 products |q u| <= 127 * 255 per lane, and the 16 lanes are
// summed at the end of a chunk, so a chunk of c pixels stays below c * 32385 <= 2^31 - 1 for
// c <= 66311; 65536 leaves room.
constexpr int64_t kChunk = 65536;
constexpr double kU = 1.1102230246251565e-16;  // 2^-53

// D[r * kImg + i] += sum_j q_r[j] u_i[j] for the 4 query rows q (row stride n) and 4 images.
void dots_portable(const int8_t* q, int64_t n, const uint8_t* const* u, int64_t* D) {
    for (int64_t j0 = 0; j0 < n; j0 += kChunk) {
        const int64_t j1 = std::min(n, j0 + kChunk);
        for (int r = 0; r < kRow; ++r) {
            const int8_t* qr = q + r * n;
            for (int i = 0; i < kImg; ++i) {
                const uint8_t* ui = u[i];
                int32_t s = 0;
                for (int64_t j = j0; j < j1; ++j) s += static_cast<int32_t>(qr[j]) * static_cast<int32_t>(ui[j]);
                D[r * kImg + i] += s;
            }
        }
    }
}

#if AD_HAVE_VNNI
// Accumulators are named variables (see moments.cpp: arrays make GCC spill them).
AD_TARGET_VNNI void dots_vnni(const int8_t* q, int64_t n, const uint8_t* const* u, int64_t* D) {
    const int8_t* q0 = q;
    const int8_t* q1 = q + n;
    const int8_t* q2 = q + 2 * n;
    const int8_t* q3 = q + 3 * n;
    const uint8_t *u0p = u[0], *u1p = u[1], *u2p = u[2], *u3p = u[3];
    for (int64_t j0 = 0; j0 < n; j0 += kChunk) {
        const int64_t j1 = std::min(n, j0 + kChunk);
#define AD_PB_ROWS(F) F(0) F(1) F(2) F(3)
#define AD_PB_DECL(r)                                                                              \
    __m512i c##r##0 = _mm512_setzero_si512(), c##r##1 = _mm512_setzero_si512(),                    \
            c##r##2 = _mm512_setzero_si512(), c##r##3 = _mm512_setzero_si512();
        AD_PB_ROWS(AD_PB_DECL)
        for (int64_t j = j0; j < j1; j += 64) {
            // the tail loads zeros beyond n: zero products
            const __mmask64 m = (j1 - j >= 64) ? ~__mmask64(0) : ((__mmask64(1) << (j1 - j)) - 1);
            const __m512i v0 = _mm512_maskz_loadu_epi8(m, u0p + j);
            const __m512i v1 = _mm512_maskz_loadu_epi8(m, u1p + j);
            const __m512i v2 = _mm512_maskz_loadu_epi8(m, u2p + j);
            const __m512i v3 = _mm512_maskz_loadu_epi8(m, u3p + j);
#define AD_PB_STEP(r)                                                                              \
    {                                                                                              \
        const __m512i w = _mm512_maskz_loadu_epi8(m, q##r + j);                                    \
        c##r##0 = _mm512_dpbusd_epi32(c##r##0, v0, w);                                             \
        c##r##1 = _mm512_dpbusd_epi32(c##r##1, v1, w);                                             \
        c##r##2 = _mm512_dpbusd_epi32(c##r##2, v2, w);                                             \
        c##r##3 = _mm512_dpbusd_epi32(c##r##3, v3, w);                                             \
    }
            AD_PB_ROWS(AD_PB_STEP)
        }
#define AD_PB_STORE(r)                                                                             \
    D[(r) * kImg + 0] += _mm512_reduce_add_epi32(c##r##0);                                         \
    D[(r) * kImg + 1] += _mm512_reduce_add_epi32(c##r##1);                                         \
    D[(r) * kImg + 2] += _mm512_reduce_add_epi32(c##r##2);                                         \
    D[(r) * kImg + 3] += _mm512_reduce_add_epi32(c##r##3);
        AD_PB_ROWS(AD_PB_STORE)
#undef AD_PB_ROWS
#undef AD_PB_DECL
#undef AD_PB_STEP
#undef AD_PB_STORE
    }
}
#endif

using DotsFn = void (*)(const int8_t*, int64_t, const uint8_t* const*, int64_t*);

struct Cand {
    double est;
    int64_t k;
};

}  // namespace

bool prune_bound_has_vnni() {
#if AD_HAVE_VNNI
    return cpu_isa::has_vnni();
#else
    return false;
#endif
}

int64_t prune_bound_u8(uintptr_t q_ptr, int64_t B, int64_t levels, int64_t n, uintptr_t x_ptr, uintptr_t qpar_ptr,
                       uintptr_t train_ptr, int64_t N, int64_t ts0, uintptr_t y2_ptr, uintptr_t yn_ptr,
                       uintptr_t ucn_ptr, uintptr_t uc1_ptr, double a, double margin, int64_t candidates,
                       uintptr_t lower_ptr, uintptr_t upper_ptr, uintptr_t offsets_ptr, uintptr_t index_ptr,
                       bool force_portable) {
    if (B < 1 || N < 1 || n < 1 || levels < 1 || candidates < 1)
        throw std::invalid_argument("prune_bound_u8: need B, N, n, levels, candidates >= 1");
    if (ts0 < n) throw std::invalid_argument("prune_bound_u8: train_stride0 must be >= n");
    if (!q_ptr || !x_ptr || !qpar_ptr || !train_ptr || !y2_ptr || !yn_ptr || !ucn_ptr || !uc1_ptr || !lower_ptr ||
        !offsets_ptr || !index_ptr)
        throw std::invalid_argument("prune_bound_u8: null input");
    if (!(a > 0.0) || !std::isfinite(a) || !(margin >= 0.0) || !std::isfinite(margin))
        throw std::invalid_argument("prune_bound_u8: a must be positive and margin >= 0, both finite");
    const int64_t R = (levels * B + kRow - 1) / kRow * kRow;
    const auto* q = reinterpret_cast<const int8_t*>(q_ptr);
    const auto* x = reinterpret_cast<const double*>(x_ptr);
    const auto* qpar = reinterpret_cast<const double*>(qpar_ptr);
    const auto* train = reinterpret_cast<const uint8_t*>(train_ptr);
    const auto* y2 = reinterpret_cast<const double*>(y2_ptr);
    const auto* yn = reinterpret_cast<const double*>(yn_ptr);
    const auto* ucn = reinterpret_cast<const double*>(ucn_ptr);
    const auto* uc1 = reinterpret_cast<const double*>(uc1_ptr);
    auto* L = reinterpret_cast<double*>(lower_ptr);
    auto* Uout = reinterpret_cast<double*>(upper_ptr);
    auto* off = reinterpret_cast<int64_t*>(offsets_ptr);
    auto* idx = reinterpret_cast<int64_t*>(index_ptr);
    const int64_t P = 4 + 2 * levels;
    for (int64_t b = 0; b < B; ++b)
        for (int64_t p = 0; p < P; ++p)
            if (!std::isfinite(qpar[b * P + p])) throw std::invalid_argument("prune_bound_u8: non-finite query parameter");

    DotsFn dots = dots_portable;
#if AD_HAVE_VNNI
    if (!force_portable && cpu_isa::has_vnni()) dots = dots_vnni;
#else
    (void)force_portable;
#endif
    const int64_t C = std::min(candidates, N);
    const double inv = 1.0 / 127.5;
    const double two_a = 2.0 * a, a2 = a * a;
    const double rnd = 2.0 * (4.0 * static_cast<double>(n) + 64.0) * kU;  // twice the float64 rounding term
    const double infl = 1.0 + std::ldexp(1.0, -40);
    const int nt = team_size();
    // per thread: the C smallest estimates per query (sorted) and the smallest est + err
    std::vector<Cand> cand(static_cast<size_t>(nt) * B * C, Cand{std::numeric_limits<double>::infinity(), -1});
    std::vector<double> umin(static_cast<size_t>(nt) * B, std::numeric_limits<double>::infinity());
    const int64_t nblocks = (N + kImg - 1) / kImg;
#if defined(_OPENMP)
#pragma omp parallel num_threads(nt) if (nt > 1)
#endif
    {
        const int t = thread_index();
        Cand* mycand = cand.data() + static_cast<size_t>(t) * B * C;
        double* myumin = umin.data() + static_cast<size_t>(t) * B;
        std::vector<int64_t> D(static_cast<size_t>(R) * kImg);
#if defined(_OPENMP)
#pragma omp for schedule(static)
#endif
        for (int64_t blk = 0; blk < nblocks; ++blk) {
            const int64_t k0 = blk * kImg;
            const int nvalid = static_cast<int>(std::min<int64_t>(kImg, N - k0));
            const uint8_t* rows[kImg];
            // a short last block repeats its last image (computed, never used)
            for (int i = 0; i < kImg; ++i) rows[i] = train + (k0 + std::min(i, nvalid - 1)) * ts0;
            std::fill(D.begin(), D.end(), 0);
            for (int64_t r0 = 0; r0 < R; r0 += kRow) dots(q + r0 * n, n, rows, D.data() + r0 * kImg);
            for (int64_t b = 0; b < B; ++b) {
                const double* qp = qpar + b * P;
                const double x2 = qp[0], xn = qp[1], rn = qp[2], rmax = qp[3];
                for (int i = 0; i < nvalid; ++i) {
                    const int64_t k = k0 + i;
                    double cross = 0.0;
                    for (int64_t l = 0; l < levels; ++l)  // D - 127.5 Q is exact (integers and halves below 2^53)
                        cross += qp[4 + l] * (static_cast<double>(D[(l * B + b) * kImg + i]) - 127.5 * qp[4 + levels + l]);
                    const double est = x2 - two_a * inv * cross + a2 * y2[k];
                    const double s = xn + a * yn[k];
                    const double err = two_a * inv * std::min(rn * ucn[k], rmax * uc1[k]) * infl + rnd * s * s;
                    L[b * N + k] = est - err;
                    myumin[b] = std::min(myumin[b], est + err);
                    Cand* cb = mycand + b * C;
                    if (est < cb[C - 1].est) {  // insertion into the sorted candidates
                        int64_t p = C - 1;
                        while (p > 0 && cb[p - 1].est > est) {
                            cb[p] = cb[p - 1];
                            --p;
                        }
                        cb[p] = Cand{est, k};
                    }
                }
            }
        }
    }
    // U per query: exact float64 distances of the C best candidates over all threads
    double lut[256];
    for (int u = 0; u < 256; ++u) lut[u] = dequantize_u8_value<double>(static_cast<uint8_t>(u));
    std::vector<double> U(B);
    std::vector<Cand> all(static_cast<size_t>(nt) * C);
    for (int64_t b = 0; b < B; ++b) {
        double ub = std::numeric_limits<double>::infinity();
        for (int t = 0; t < nt; ++t) {
            ub = std::min(ub, umin[static_cast<size_t>(t) * B + b]);
            for (int64_t c = 0; c < C; ++c) all[t * C + c] = cand[(static_cast<size_t>(t) * B + b) * C + c];
        }
        std::sort(all.begin(), all.end(), [](const Cand& p, const Cand& r) { return p.est < r.est; });
        const double* xb = x + b * n;
        const double xn = qpar[b * P + 1];
        for (int64_t c = 0; c < C && all[c].k >= 0; ++c) {
            const uint8_t* y = train + all[c].k * ts0;
            double d = 0.0;
            for (int64_t j = 0; j < n; ++j) {
                const double e = xb[j] - a * lut[y[j]];
                d += e * e;
            }
            const double s = xn + a * yn[all[c].k];
            ub = std::min(ub, d + 0.5 * rnd * s * s);
        }
        U[b] = ub;
        if (Uout) Uout[b] = ub;
    }
    // survivors, ascending per query
    off[0] = 0;
    std::vector<int64_t> cnt(B, 0);
    const int team = static_cast<int>(std::min<int64_t>(nt, B));
#if defined(_OPENMP)
#pragma omp parallel for num_threads(team) if (team > 1) schedule(static)
#endif
    for (int64_t b = 0; b < B; ++b) {
        const double thr = U[b] + margin;
        const double* Lb = L + b * N;
        int64_t c = 0;
        for (int64_t k = 0; k < N; ++k) c += Lb[k] <= thr;
        cnt[b] = c;
    }
    for (int64_t b = 0; b < B; ++b) off[b + 1] = off[b] + cnt[b];
#if defined(_OPENMP)
#pragma omp parallel for num_threads(team) if (team > 1) schedule(static)
#endif
    for (int64_t b = 0; b < B; ++b) {
        const double thr = U[b] + margin;
        const double* Lb = L + b * N;
        int64_t p = off[b];
        for (int64_t k = 0; k < N; ++k)
            if (Lb[k] <= thr) idx[p++] = k;
    }
    return off[B];
}

}  // namespace analytic_diffusion
