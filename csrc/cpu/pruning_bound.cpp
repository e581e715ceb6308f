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


// ---------------------------------------------------------------------------- AMX-INT8
// Sapphire Rapids and later: one tdpbusd multiplies a 16 x 64 tile of uint8 images (rows
// read in place, stride ts0) by a 64 x 16 tile of int8 query bytes (packed once per call in the
// VNNI layout) into 16 x 16 int32 sums: 16 times the work of a vpdpbusd, which makes the bound
// a pass at memory speed. Needs the OS to grant the tile state (Linux arch_prctl); used only
// when CPUID, XCR0 and the grant all say yes.
// The AMX intrinsics and their target attributes exist from GCC 11 / Clang 12 on: older
// compilers build the VNNI / portable paths only.
#if AD_X86_DISPATCH && defined(__linux__) && \
    ((defined(__clang__) && __clang_major__ >= 12) || (!defined(__clang__) && defined(__GNUC__) && __GNUC__ >= 11))
#define AD_PB_AMX 1
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>
constexpr int kAmxRows = 16;    // images per tile
constexpr int kAmxK = 64;       // bytes of K per tile row
constexpr int kAmxMaxTiles = 4; // C tiles (16 query rows each): R <= 64

bool amx_usable() {
    static const bool ok = [] {
        unsigned a, b, c, d;
        if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
        if (!((d >> 24) & 1u) || !((d >> 25) & 1u)) return false;  // AMX-TILE, AMX-INT8
        if (!__get_cpuid_count(1, 0, &a, &b, &c, &d) || !((c >> 27) & 1u)) return false;  // OSXSAVE
        unsigned lo, hi;
        __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
        if (((lo >> 17) & 3u) != 3u) return false;  // XTILECFG, XTILEDATA enabled
        // ARCH_REQ_XCOMP_PERM (0x1023) for XFEATURE_XTILEDATA (18)
        return syscall(SYS_arch_prctl, 0x1023, 18) == 0;
    }();
    return ok;
}

struct alignas(64) TileConfig {
    uint8_t palette = 1, start_row = 0, reserved[14] = {};
    uint16_t colsb[16] = {};
    uint8_t rows[16] = {};
};

__attribute__((target("amx-tile"))) void amx_config(int ctiles) {
    TileConfig cfg;
    for (int t = 0; t < ctiles; ++t) {  // tiles 0..3: C (16 images x 16 int32)
        cfg.rows[t] = kAmxRows;
        cfg.colsb[t] = 64;
    }
    cfg.rows[4] = kAmxRows;  // A: 16 images x 64 bytes
    cfg.colsb[4] = kAmxK;
    cfg.rows[5] = kAmxK / 4;  // B: 16 rows of (16 queries x 4 bytes)
    cfg.colsb[5] = 64;
    _tile_loadconfig(&cfg);
}

__attribute__((target("amx-tile"))) void amx_release() { _tile_release(); }

// C[i][r] (int32, row stride 16) = sum over the first ksteps * 64 pixels of image i times
// query row 16 t + r, for the ctiles tiles t; Bp packed by pack_amx.
__attribute__((target("amx-tile,amx-int8"))) void amx_dots(const uint8_t* A, int64_t ts0, const int8_t* Bp,
                                                          int64_t ksteps, int ctiles, int32_t* C) {
    _tile_zero(0);  // an unconfigured tile (t >= ctiles) must not be touched: #UD
    if (ctiles > 1) _tile_zero(1);
    if (ctiles > 2) _tile_zero(2);
    if (ctiles > 3) _tile_zero(3);
    for (int64_t s = 0; s < ksteps; ++s) {
        _tile_loadd(4, A + s * kAmxK, ts0);
        const int8_t* b = Bp + s * ctiles * 1024;
        _tile_loadd(5, b, 64);
        _tile_dpbusd(0, 4, 5);
        if (ctiles > 1) {
            _tile_loadd(5, b + 1024, 64);
            _tile_dpbusd(1, 4, 5);
        }
        if (ctiles > 2) {
            _tile_loadd(5, b + 2048, 64);
            _tile_dpbusd(2, 4, 5);
        }
        if (ctiles > 3) {
            _tile_loadd(5, b + 3072, 64);
            _tile_dpbusd(3, 4, 5);
        }
    }
    _tile_stored(0, C, 4 * 16 * kAmxMaxTiles);
    if (ctiles > 1) _tile_stored(1, C + 16, 4 * 16 * kAmxMaxTiles);
    if (ctiles > 2) _tile_stored(2, C + 32, 4 * 16 * kAmxMaxTiles);
    if (ctiles > 3) _tile_stored(3, C + 48, 4 * 16 * kAmxMaxTiles);
}

// q [R, n] int8 -> Bp [kstep][tile][16 k-rows][16 queries][4 bytes] (rows >= R are zero)
std::vector<int8_t> pack_amx(const int8_t* q, int64_t R, int64_t n, int64_t ksteps, int ctiles) {
    std::vector<int8_t> Bp(static_cast<size_t>(ksteps) * ctiles * 1024, 0);
    for (int64_t s = 0; s < ksteps; ++s)
        for (int t = 0; t < ctiles; ++t)
            for (int kr = 0; kr < 16; ++kr)
                for (int qi = 0; qi < 16; ++qi) {
                    const int64_t r = 16 * t + qi;
                    if (r >= R) continue;
                    for (int by = 0; by < 4; ++by)
                        Bp[((s * ctiles + t) * 16 + kr) * 64 + qi * 4 + by] = q[r * n + s * kAmxK + kr * 4 + by];
                }
    return Bp;
}
#else
#define AD_PB_AMX 0
#endif

using DotsFn = void (*)(const int8_t*, int64_t, const uint8_t* const*, int64_t*);

struct Cand {
    double est;
    int64_t k;
};

}  // namespace

bool prune_bound_has_amx() {
#if AD_PB_AMX
    return amx_usable();
#else
    return false;
#endif
}

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
    // Work units: AMX blocks of 16 images where the CPU has AMX-INT8 (over the first
    // ksteps * 64 pixels; the rest of a row is added per pair), then blocks of 4 images.
    int64_t n16 = 0, ksteps = 0;
    int ctiles = 0;
#if AD_PB_AMX
    std::vector<int8_t> Bp;
    if (!force_portable && R <= 16 * kAmxMaxTiles && n <= kChunk && n >= kAmxK && amx_usable()) {
        n16 = N / kAmxRows;
        ksteps = n / kAmxK;
        ctiles = static_cast<int>((R + 15) / 16);
        Bp = pack_amx(q, R, n, ksteps, ctiles);
    }
#endif
    const int64_t kmain = ksteps * 64;
    const int64_t rest0 = n16 * 16;
    const int64_t nunits = n16 + (N - rest0 + kImg - 1) / kImg;
    // With AMX, one thread below 2^33 multiply-adds (N = 20,000 32x32x3 images against 32
    // query rows is 2^31): the pass runs at memory speed, where a second thread gains well under
    // 2x, while the join of a parallel region waited 60-70 ms for a descheduled second thread in
    // most calls on a busy 2-core machine (results/pruning_notes.md). Without AMX the pass is
    // compute-bound: one thread only below ~2^22.
    const double macs = static_cast<double>(N) * static_cast<double>(n) * static_cast<double>(R);
    const int team = macs < (n16 > 0 ? 8.6e9 : 4.2e6) ? 1 : nt;
#if defined(_OPENMP)
#pragma omp parallel num_threads(team) if (team > 1)
#endif
    {
        const int t = thread_index();
        Cand* mycand = cand.data() + static_cast<size_t>(t) * B * C;
        double* myumin = umin.data() + static_cast<size_t>(t) * B;
        std::vector<int64_t> D(static_cast<size_t>(R) * 16);  // [R][W] for a block of W images
        std::vector<int32_t> Ct(16 * 16 * 4);
        bool configured = false;
#if defined(_OPENMP)
#pragma omp for schedule(static)
#endif
        for (int64_t unit = 0; unit < nunits; ++unit) {
            int64_t k0;
            int nvalid, W;
            if (unit < n16) {
                k0 = unit * 16;
                nvalid = W = 16;
#if AD_PB_AMX
                if (!configured) {
                    amx_config(ctiles);
                    configured = true;
                }
                amx_dots(train + k0 * ts0, ts0, Bp.data(), ksteps, ctiles, Ct.data());
                for (int64_t r = 0; r < R; ++r)
                    for (int i = 0; i < 16; ++i) {
                        int64_t v = Ct[i * 64 + r];
                        const int8_t* qr = q + r * n;
                        const uint8_t* ui = train + (k0 + i) * ts0;
                        for (int64_t j = kmain; j < n; ++j) v += static_cast<int32_t>(qr[j]) * static_cast<int32_t>(ui[j]);
                        D[r * 16 + i] = v;
                    }
#endif
            } else {
                k0 = rest0 + (unit - n16) * kImg;
                nvalid = static_cast<int>(std::min<int64_t>(kImg, N - k0));
                W = kImg;
                const uint8_t* rows[kImg];
                // a short last block repeats its last image (computed, never used)
                for (int i = 0; i < kImg; ++i) rows[i] = train + (k0 + std::min(i, nvalid - 1)) * ts0;
                std::fill(D.begin(), D.begin() + R * kImg, 0);
                for (int64_t r0 = 0; r0 < R; r0 += kRow) dots(q + r0 * n, n, rows, D.data() + r0 * kImg);
            }
            // the bounds of the block's images for every query: loops over the images, which
            // the compiler vectorises (everything per image is contiguous in i)
            double est[16];
            for (int64_t b = 0; b < B; ++b) {
                const double* qp = qpar + b * P;
                const double x2 = qp[0], xn = qp[1], rn = qp[2], rmax = qp[3];
                for (int i = 0; i < W; ++i) est[i] = 0.0;
                for (int64_t l = 0; l < levels; ++l) {  // D - 127.5 Q is exact (integers and halves below 2^53)
                    const int64_t* Dl = D.data() + (l * B + b) * W;
                    const double sl = qp[4 + l], hq = 127.5 * qp[4 + levels + l];
                    for (int i = 0; i < W; ++i) est[i] += sl * (static_cast<double>(Dl[i]) - hq);
                }
                const double* y2k = y2 + k0;
                const double* ynk = yn + k0;
                const double* ucnk = ucn + k0;
                const double* uc1k = uc1 + k0;
                double* Lb = L + b * N + k0;
                double emin = std::numeric_limits<double>::infinity(), umn = emin;
                for (int i = 0; i < nvalid; ++i) {
                    const double e = x2 - two_a * inv * est[i] + a2 * y2k[i];
                    const double sq = xn + a * ynk[i];
                    const double r = two_a * inv * std::min(rn * ucnk[i], rmax * uc1k[i]) * infl + rnd * sq * sq;
                    Lb[i] = e - r;
                    est[i] = e;
                    emin = std::min(emin, e);
                    umn = std::min(umn, e + r);
                }
                myumin[b] = std::min(myumin[b], umn);
                Cand* cb = mycand + b * C;
                if (emin < cb[C - 1].est) {  // rare: insertion into the sorted candidates
                    for (int i = 0; i < nvalid; ++i) {
                        if (!(est[i] < cb[C - 1].est)) continue;
                        int64_t p = C - 1;
                        while (p > 0 && cb[p - 1].est > est[i]) {
                            cb[p] = cb[p - 1];
                            --p;
                        }
                        cb[p] = Cand{est[i], k0 + i};
                    }
                }
            }
        }
#if AD_PB_AMX
        if (configured) amx_release();
#endif
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
    // survivors, ascending per query: one serial sweep (B*N compares, well under a
    // millisecond at B*N = 320,000; another parallel region costs more than that on a busy machine)
    off[0] = 0;
    int64_t p = 0;
    for (int64_t b = 0; b < B; ++b) {
        const double thr = U[b] + margin;
        const double* Lb = L + b * N;
        for (int64_t k = 0; k < N; ++k) {
            idx[p] = k;
            p += Lb[k] <= thr;  // branch-free: most images are dropped
        }
        off[b + 1] = p;
    }
    return off[B];
}

}  // namespace analytic_diffusion
