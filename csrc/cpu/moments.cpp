// CPU "moments" kernels: lower-triangle SYRK updates for streaming covariance (docs/algorithms.md §2).
//
// uint8 path (exact). sum_k u_ki u_kj is computed with int8 dot products: with
// s = u - 128 (u ^ 0x80 reinterpreted as int8), u_i u_j = s_i u_j + 128 u_j, so
//     sum_k u_ki u_kj = sum_k s_ki u_kj + 128 * colsum_j,
// which maps onto AVX-512 VNNI vpdpbusd (unsigned bytes x signed bytes, four at a time,
// into int32 lanes). Every sum is an integer, so the result is bitwise independent of
// batch size, order, tiling and thread count.
//
// Data flow per call, for each chunk of at most kU8MaxChunkRows images:
//   1. pack: four consecutive images are interleaved per column ("k4" layout: bytes
//      u[4g..4g+3, c] adjacent), into two panel sets: U (unsigned, panels of kNR columns,
//      the vector operand) and S (signed, panels of kMR rows, the broadcast operand).
//      Packing also yields the chunk's column sums, and reads any input strides.
//   2. compute: OpenMP over square tiles of the lower triangle of s2; each tile sums the
//      whole chunk into a per-thread int32 tile buffer (cache blocked over k), then
//      flushes it once into the int64 s2 with the 128 * colsum_j correction.
// The int32 bound (kU8MaxChunkRows) is in moments.h.
//
// float path: the same tiling with float64 panels of z = x - ref and an AVX-512 FMA
// micro-kernel; float64 accumulators, flushed into s2 once per chunk.

#include "moments.h"

#include <algorithm>
#include <climits>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <new>
#include <stdexcept>
#include <vector>

#include "../common/cpu_isa.h"  // AD_HAVE_VNNI, AD_TARGET_VNNI, ... and run-time CPUID checks
#include "../common/cpu_runtime.h"

#include <atomic>

namespace analytic_diffusion {
namespace {

using cpu_runtime::aligned_array;
using cpu_runtime::FreeDeleter;
using cpu_runtime::team_size;
using cpu_runtime::thread_index;

using cpu_runtime::ceil_div;

// Square tiles of the lower triangle, largest work first: a tile on the diagonal does about
// half the work of one below it, so handing those out last (dynamic schedule) keeps the
// threads' finishing times close.
std::vector<std::pair<int64_t, int64_t>> lower_tiles(int64_t n, int64_t tile) {
    const int64_t nt = ceil_div(n, tile);
    std::vector<std::pair<int64_t, int64_t>> tiles;
    tiles.reserve(static_cast<size_t>(nt * (nt + 1) / 2));
    for (int64_t I = 0; I < nt; ++I)
        for (int64_t J = 0; J < I; ++J) tiles.emplace_back(I, J);
    for (int64_t I = nt - 1; I >= 0; --I) tiles.emplace_back(I, I);
    return tiles;
}

// =================================================================== uint8 path
// Micro-tile: kMR rows i (broadcast, signed) x kNR columns j (two zmm of 16 int32 lanes).
// 24 int32 accumulators + 2 operand registers fit the 32 zmm registers; per group of four
// images the kernel issues 2 vector loads and 12 broadcast loads for 24 vpdpbusd.
constexpr int64_t kMR = 12;
constexpr int64_t kNR = 32;
// Thread tile: a multiple of lcm(kMR, kNR) = 96. Its int32 buffer (384^2 * 4 = 576 KiB)
// and the packed S panels of one k block (384 * 512 = 192 KiB) stay in L2 (2 MiB per core
// on the development machine). Larger tiles also make the int64 flush read longer
// contiguous row segments of s2, which matters when small batches make it memory bound.
constexpr int64_t kTile = 384;
// Images per cache block: one U micro-panel (kKc * kNR = 16 KiB) stays in L1 next to the
// streamed S micro-panel (6 KiB) while the kernel walks down the tile's micro-rows.
constexpr int64_t kKc = 512;
constexpr int64_t kKcG = kKc / 4;  // in groups of four images
// Cap on packed bytes per chunk (U + S): bounds the temporary memory for huge batches.
constexpr int64_t kPackBudget = int64_t(64) << 20;

// A micro-kernel adds sum_g S[g] . U[g] over kg groups into C (int32, kMR x kNR, row
// stride ldc); accumulate = false stores instead (first k block of a chunk).
using U8Kernel = void (*)(const uint8_t* S,  // [kg][kMR][4] int8 bits (u ^ 0x80)
                          const uint8_t* U,  // [kg][kNR][4] uint8
                          int64_t kg,        // groups of four images
                          int32_t* C,        // [kMR, kNR] block of the tile buffer
                          int64_t ldc,       // C row stride in elements
                          bool accumulate);

inline int32_t load_i32(const uint8_t* p) {
    int32_t v;
    std::memcpy(&v, p, 4);  // memcpy: no alignment or aliasing assumption
    return v;
}

// Reference-quality micro-kernel for CPUs without VNNI (and the cross-check for it).
void u8_kernel_portable(const uint8_t* S, const uint8_t* U, int64_t kg, int32_t* C,
                        int64_t ldc, bool accumulate) {
    int32_t acc[kMR][kNR] = {};
    for (int64_t g = 0; g < kg; ++g) {
        const int8_t* s = reinterpret_cast<const int8_t*>(S + g * kMR * 4);
        const uint8_t* u = U + g * kNR * 4;
        for (int64_t r = 0; r < kMR; ++r) {
            const int32_t a0 = s[4 * r], a1 = s[4 * r + 1], a2 = s[4 * r + 2], a3 = s[4 * r + 3];
            for (int64_t t = 0; t < kNR; ++t)
                acc[r][t] += a0 * u[4 * t] + a1 * u[4 * t + 1] + a2 * u[4 * t + 2] + a3 * u[4 * t + 3];
        }
    }
    for (int64_t r = 0; r < kMR; ++r)
        for (int64_t t = 0; t < kNR; ++t)
            C[r * ldc + t] = accumulate ? C[r * ldc + t] + acc[r][t] : acc[r][t];
}

#if AD_HAVE_VNNI
// Accumulators are named variables, not an array: with an array GCC sometimes keeps
// copies in memory or shuffles registers inside the loop, which halves the throughput.
AD_TARGET_VNNI void u8_kernel_vnni(const uint8_t* S, const uint8_t* U, int64_t kg, int32_t* C,
                                   int64_t ldc, bool accumulate) {
#define AD_U8_ROW(F) F(0) F(1) F(2) F(3) F(4) F(5) F(6) F(7) F(8) F(9) F(10) F(11)
#define AD_U8_DECL(r) __m512i c##r##a = _mm512_setzero_si512(), c##r##b = _mm512_setzero_si512();
    AD_U8_ROW(AD_U8_DECL)
    for (int64_t g = 0; g < kg; ++g) {
        const __m512i u0 = _mm512_load_si512(U + g * kNR * 4);
        const __m512i u1 = _mm512_load_si512(U + g * kNR * 4 + 64);
        const uint8_t* s = S + g * kMR * 4;
#define AD_U8_STEP(r)                                                  \
    {                                                                  \
        const __m512i a = _mm512_set1_epi32(load_i32(s + 4 * (r)));    \
        c##r##a = _mm512_dpbusd_epi32(c##r##a, u0, a);                 \
        c##r##b = _mm512_dpbusd_epi32(c##r##b, u1, a);                 \
    }
        AD_U8_ROW(AD_U8_STEP)
    }
#define AD_U8_STORE(r)                                                           \
    {                                                                            \
        int32_t* row = C + (r) * ldc;                                            \
        if (accumulate) {                                                        \
            c##r##a = _mm512_add_epi32(c##r##a, _mm512_loadu_si512(row));        \
            c##r##b = _mm512_add_epi32(c##r##b, _mm512_loadu_si512(row + 16));   \
        }                                                                        \
        _mm512_storeu_si512(row, c##r##a);                                       \
        _mm512_storeu_si512(row + 16, c##r##b);                                  \
    }
    AD_U8_ROW(AD_U8_STORE)
#undef AD_U8_STORE
#undef AD_U8_STEP
#undef AD_U8_DECL
#undef AD_U8_ROW
}
#endif

// Four image rows -> k4-interleaved bytes: W[4c + q] = r_q[c] for c < n.
void interleave4(const uint8_t* r0, const uint8_t* r1, const uint8_t* r2, const uint8_t* r3,
                 int64_t n, uint8_t* W) {
    int64_t c = 0;
#if defined(__SSE2__)
    for (; c + 16 <= n; c += 16) {
        const __m128i a = _mm_loadu_si128(reinterpret_cast<const __m128i*>(r0 + c));
        const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(r1 + c));
        const __m128i e = _mm_loadu_si128(reinterpret_cast<const __m128i*>(r2 + c));
        const __m128i d = _mm_loadu_si128(reinterpret_cast<const __m128i*>(r3 + c));
        const __m128i ab_lo = _mm_unpacklo_epi8(a, b), ab_hi = _mm_unpackhi_epi8(a, b);
        const __m128i ed_lo = _mm_unpacklo_epi8(e, d), ed_hi = _mm_unpackhi_epi8(e, d);
        __m128i* out = reinterpret_cast<__m128i*>(W + 4 * c);
        _mm_storeu_si128(out + 0, _mm_unpacklo_epi16(ab_lo, ed_lo));
        _mm_storeu_si128(out + 1, _mm_unpackhi_epi16(ab_lo, ed_lo));
        _mm_storeu_si128(out + 2, _mm_unpacklo_epi16(ab_hi, ed_hi));
        _mm_storeu_si128(out + 3, _mm_unpackhi_epi16(ab_hi, ed_hi));
    }
#endif
    for (; c < n; ++c) {
        W[4 * c] = r0[c];
        W[4 * c + 1] = r1[c];
        W[4 * c + 2] = r2[c];
        W[4 * c + 3] = r3[c];
    }
}

struct U8Chunk {
    int64_t G = 0;    // groups of four images (the last one zero-padded)
    int64_t nUp = 0;  // U panels: ceil(n / kNR)
    int64_t nSp = 0;  // S panels: ceil(n / kMR)
    uint8_t* U = nullptr;  // [nUp][G][kNR][4]
    uint8_t* S = nullptr;  // [nSp][G][kMR][4]
};

// Packs images [0, rows) of x (already offset to the chunk) into P and writes the chunk's
// column sums to colsum. Padding (columns >= n, images >= rows) is zero in U, so it adds
// nothing; padded S rows/columns only feed outputs that are never flushed.
void u8_pack(const uint8_t* x,  // chunk start: uint8 [rows, n] via (s0, s1)
             int64_t rows, int64_t n, int64_t s0, int64_t s1,
             const U8Chunk& P,
             int64_t* colsum  // [n] out: sum over the chunk's images
) {
    const int64_t width = std::max(P.nUp * kNR, P.nSp * kMR);  // padded columns
    const int nt = (P.G * n >= (int64_t(1) << 16)) ? team_size() : 1;
    std::fill(colsum, colsum + n, int64_t(0));
    // per thread: interleaved group (zero beyond n), gathered rows for strided input, and
    // int32 column sums (enough: at most kU8MaxChunkRows * 255 < 2^24 per column)
    const int64_t gath_len = s1 == 1 ? 0 : 4 * n;
    auto W_all = aligned_array<uint8_t>(nt * 4 * width);
    auto gath_all = aligned_array<uint8_t>(nt * gath_len);
    auto cs_all = aligned_array<int32_t>(nt * n);
    auto zero = aligned_array<uint8_t>(n);  // stands in for the images past the chunk's end
    std::memset(W_all.get(), 0, static_cast<size_t>(nt * 4 * width));
    std::memset(cs_all.get(), 0, static_cast<size_t>(nt * n) * sizeof(int32_t));
    std::memset(zero.get(), 0, static_cast<size_t>(n));
#if defined(_OPENMP)
#pragma omp parallel num_threads(nt) if (nt > 1)
#endif
    {
        const int tid = thread_index();
        uint8_t* W = W_all.get() + tid * 4 * width;
        uint8_t* gath = gath_all.get() + tid * gath_len;
        int32_t* cs = cs_all.get() + tid * n;
#if defined(_OPENMP)
#pragma omp for schedule(static)
#endif
        for (int64_t g = 0; g < P.G; ++g) {
            const uint8_t* r[4];
            for (int q = 0; q < 4; ++q) {
                const int64_t k = 4 * g + q;
                if (k >= rows) {
                    r[q] = zero.get();
                } else if (s1 == 1) {
                    r[q] = x + k * s0;
                } else {
                    uint8_t* dst = gath + q * n;
                    const uint8_t* src = x + k * s0;
                    for (int64_t c = 0; c < n; ++c) dst[c] = src[c * s1];
                    r[q] = dst;
                }
            }
            for (int64_t c = 0; c < n; ++c)
                cs[c] += int32_t(r[0][c]) + int32_t(r[1][c]) + int32_t(r[2][c]) + int32_t(r[3][c]);
            interleave4(r[0], r[1], r[2], r[3], n, W);
            for (int64_t p = 0; p < P.nUp; ++p)
                std::memcpy(P.U + (p * P.G + g) * kNR * 4, W + p * kNR * 4, kNR * 4);
            for (int64_t p = 0; p < P.nSp; ++p) {
                const uint8_t* src = W + p * kMR * 4;
                uint8_t* dst = P.S + (p * P.G + g) * kMR * 4;
                for (int64_t b = 0; b < kMR * 4; ++b) dst[b] = src[b] ^ 0x80u;
            }
        }
    }
    for (int t = 0; t < nt; ++t)
        for (int64_t c = 0; c < n; ++c) colsum[c] += cs_all[t * n + c];
}

// One thread tile: rows [I*kTile, ...) x columns [J*kTile, ...) of s2, over the whole chunk;
// the int32 sums stay in buf until one flush into the int64 s2 at the end.
void u8_tile(const U8Chunk& P, int64_t I, int64_t J, int64_t n, U8Kernel kernel,
             int32_t* buf,          // [kTile, kTile] per-thread scratch
             const int64_t* colsum,  // [n] the chunk's column sums
             int64_t* s2            // [n, n] accumulator
) {
    const int64_t i_lo = I * kTile, j_lo = J * kTile;
    const int64_t i_hi = std::min(n, i_lo + kTile), j_hi = std::min(n, j_lo + kTile);
    for (int64_t kb = 0; kb < P.G; kb += kKcG) {
        const int64_t kg = std::min(kKcG, P.G - kb);
        for (int64_t j0 = j_lo; j0 < j_hi; j0 += kNR) {
            const uint8_t* U = P.U + ((j0 / kNR) * P.G + kb) * kNR * 4;
            for (int64_t i0 = i_lo; i0 < i_hi; i0 += kMR) {
                if (j0 > i0 + kMR - 1) continue;  // wholly above the diagonal
                const uint8_t* S = P.S + ((i0 / kMR) * P.G + kb) * kMR * 4;
                kernel(S, U, kg, buf + (i0 - i_lo) * kTile + (j0 - j_lo), kTile, kb > 0);
            }
        }
    }
    // Only j <= i is flushed: the skipped micro-tiles above the diagonal hold garbage.
    for (int64_t i = i_lo; i < i_hi; ++i) {
        const int64_t j_end = std::min(j_hi, i + 1);
        const int32_t* b = buf + (i - i_lo) * kTile;
        int64_t* row = s2 + i * n + j_lo;
        const int64_t* cs = colsum + j_lo;
#if defined(_OPENMP)
#pragma omp simd
#endif
        for (int64_t j = 0; j < j_end - j_lo; ++j) row[j] += int64_t(b[j]) + 128 * cs[j];
    }
}

}  // namespace

bool u8_syrk_has_vnni() { return cpu_isa::has_vnni(); }

void u8_syrk_update(uintptr_t x_ptr, int64_t B, int64_t n, int64_t stride0, int64_t stride1,
                    uintptr_t s1_ptr, uintptr_t s2_ptr, bool force_portable,
                    int64_t chunk_rows) {
    if (B < 0 || n < 0) throw std::invalid_argument("u8_syrk_update: negative size");
    if (chunk_rows < 0 || chunk_rows > kU8MaxChunkRows)
        throw std::invalid_argument("u8_syrk_update: chunk_rows must be in [0, 65536]");
    if (B == 0 || n == 0) return;
    if (x_ptr == 0 || s1_ptr == 0 || s2_ptr == 0)
        throw std::invalid_argument("u8_syrk_update: null pointer");
    const auto* x = reinterpret_cast<const uint8_t*>(x_ptr);
    auto* s1 = reinterpret_cast<int64_t*>(s1_ptr);
    auto* s2 = reinterpret_cast<int64_t*>(s2_ptr);

    U8Kernel kernel = u8_kernel_portable;
#if AD_HAVE_VNNI
    if (!force_portable && cpu_isa::has_vnni()) kernel = u8_kernel_vnni;
#endif

    U8Chunk P;
    P.nUp = ceil_div(n, kNR);
    P.nSp = ceil_div(n, kMR);
    if (chunk_rows == 0) {
        // as many images as the packing budget allows, in whole cache blocks
        const int64_t per_image = P.nUp * kNR + P.nSp * kMR;
        chunk_rows = std::max(kKc, kPackBudget / per_image / kKc * kKc);
        chunk_rows = std::min(chunk_rows, kU8MaxChunkRows);
    }
    const int64_t max_rows = std::min(B, chunk_rows);
    const int64_t max_G = ceil_div(max_rows, 4);
    auto U = aligned_array<uint8_t>(P.nUp * max_G * kNR * 4);
    auto S = aligned_array<uint8_t>(P.nSp * max_G * kMR * 4);
    std::vector<int64_t> colsum(static_cast<size_t>(n));
    const auto tiles = lower_tiles(n, kTile);
    const int64_t ntiles = static_cast<int64_t>(tiles.size());
    const int nt = ntiles > 1 ? team_size() : 1;
    auto bufs = aligned_array<int32_t>(nt * kTile * kTile);  // one int32 tile per thread

    for (int64_t k0 = 0; k0 < B; k0 += chunk_rows) {
        const int64_t rows = std::min(chunk_rows, B - k0);
        P.G = ceil_div(rows, 4);
        P.U = U.get();
        P.S = S.get();
        u8_pack(x + k0 * stride0, rows, n, stride0, stride1, P, colsum.data());
        for (int64_t c = 0; c < n; ++c) s1[c] += colsum[c];
#if defined(_OPENMP)
#pragma omp parallel num_threads(nt) if (nt > 1)
#endif
        {
            int32_t* buf = bufs.get() + thread_index() * kTile * kTile;
#if defined(_OPENMP)
#pragma omp for schedule(dynamic, 1)
#endif
            for (int64_t t = 0; t < ntiles; ++t)
                u8_tile(P, tiles[t].first, tiles[t].second, n, kernel, buf, colsum.data(), s2);
        }
    }
}

// =================================================================== float64 path
namespace {

// Micro-tile: kFMR rows (broadcast) x kFNR columns (two zmm of 8 doubles): 24 accumulators.
constexpr int64_t kFMR = 12;
constexpr int64_t kFNR = 16;
// Thread tile: a multiple of lcm(kFMR, kFNR) = 48; its float64 buffer is 288 KiB (L2).
constexpr int64_t kFTile = 192;
// Images per cache block: one B micro-panel (128 * 16 * 8 = 16 KiB) plus the streamed A
// micro-panel (12 KiB) fit L1 together.
constexpr int64_t kFKc = 128;
constexpr int64_t kFPackBudget = int64_t(128) << 20;

// C (kFMR x kFNR block, row stride ldc) = or += sum_k A[k] (x) Bp[k].
using F64Kernel = void (*)(const double* A,   // [kc][kFMR] broadcast operand
                           const double* Bp,  // [kc][kFNR] vector operand, 64-byte aligned
                           int64_t kc,        // images in this cache block
                           double* C,         // [kFMR, kFNR] block of the tile buffer
                           int64_t ldc,       // C row stride in elements
                           bool accumulate);  // false: store (first k block of a chunk)

void f64_kernel_portable(const double* A, const double* Bp, int64_t kc, double* C, int64_t ldc,
                         bool accumulate) {
    double acc[kFMR][kFNR] = {};
    for (int64_t k = 0; k < kc; ++k)
        for (int64_t r = 0; r < kFMR; ++r)
            for (int64_t t = 0; t < kFNR; ++t) acc[r][t] += A[k * kFMR + r] * Bp[k * kFNR + t];
    for (int64_t r = 0; r < kFMR; ++r)
        for (int64_t t = 0; t < kFNR; ++t)
            C[r * ldc + t] = accumulate ? C[r * ldc + t] + acc[r][t] : acc[r][t];
}

#if AD_HAVE_AVX512F
// Named accumulators for the same reason as u8_kernel_vnni.
AD_TARGET_AVX512 void f64_kernel_avx512(const double* A, const double* Bp, int64_t kc, double* C,
                                        int64_t ldc, bool accumulate) {
#define AD_F64_ROW(F) F(0) F(1) F(2) F(3) F(4) F(5) F(6) F(7) F(8) F(9) F(10) F(11)
#define AD_F64_DECL(r) __m512d c##r##a = _mm512_setzero_pd(), c##r##b = _mm512_setzero_pd();
    AD_F64_ROW(AD_F64_DECL)
    for (int64_t k = 0; k < kc; ++k) {
        const __m512d b0 = _mm512_load_pd(Bp + k * kFNR);
        const __m512d b1 = _mm512_load_pd(Bp + k * kFNR + 8);
        const double* a = A + k * kFMR;
#define AD_F64_STEP(r)                                      \
    {                                                       \
        const __m512d ar = _mm512_set1_pd(a[r]);            \
        c##r##a = _mm512_fmadd_pd(ar, b0, c##r##a);         \
        c##r##b = _mm512_fmadd_pd(ar, b1, c##r##b);         \
    }
        AD_F64_ROW(AD_F64_STEP)
    }
#define AD_F64_STORE(r)                                                   \
    {                                                                     \
        double* row = C + (r) * ldc;                                      \
        if (accumulate) {                                                 \
            c##r##a = _mm512_add_pd(c##r##a, _mm512_loadu_pd(row));       \
            c##r##b = _mm512_add_pd(c##r##b, _mm512_loadu_pd(row + 8));   \
        }                                                                 \
        _mm512_storeu_pd(row, c##r##a);                                   \
        _mm512_storeu_pd(row + 8, c##r##b);                               \
    }
    AD_F64_ROW(AD_F64_STORE)
#undef AD_F64_STORE
#undef AD_F64_STEP
#undef AD_F64_DECL
#undef AD_F64_ROW
}
#endif

struct F64Chunk {
    int64_t K = 0;    // images in the chunk
    int64_t nBp = 0;  // ceil(n / kFNR)
    int64_t nAp = 0;  // ceil(n / kFMR)
    double* Bp = nullptr;  // [nBp][K][kFNR]
    double* A = nullptr;   // [nAp][K][kFMR]
};

// Packs z = x - ref for images [0, rows) into P's panels (zero past n) and writes the
// chunk's column sums of z.
template <typename T>
void f64_pack(const T* x,          // chunk start: float32/float64 [rows, n] via (s0, s1)
              int64_t rows, int64_t n, int64_t s0, int64_t s1,
              const double* ref,   // [n] shift
              const F64Chunk& P,   // panels sized for at least `rows` images
              double* colsum       // [n] out
) {
    const int64_t width = std::max(P.nBp * kFNR, P.nAp * kFMR);
    const int nt = (rows * n >= (int64_t(1) << 15)) ? team_size() : 1;
    auto z_all = aligned_array<double>(nt * width);  // one shifted row per thread, 0 past n
    std::fill(z_all.get(), z_all.get() + nt * width, 0.0);
    // Column sums run in a fixed order (image by image) whatever the thread count.
#if defined(_OPENMP)
#pragma omp parallel num_threads(nt) if (nt > 1)
#endif
    {
        double* z = z_all.get() + thread_index() * width;
#if defined(_OPENMP)
#pragma omp for schedule(static)
#endif
        for (int64_t k = 0; k < rows; ++k) {
            const T* src = x + k * s0;
            if (s1 == 1) {
                for (int64_t c = 0; c < n; ++c) z[c] = double(src[c]) - ref[c];
            } else {
                for (int64_t c = 0; c < n; ++c) z[c] = double(src[c * s1]) - ref[c];
            }
            for (int64_t p = 0; p < P.nBp; ++p)
                std::memcpy(P.Bp + (p * P.K + k) * kFNR, z + p * kFNR, kFNR * sizeof(double));
            for (int64_t p = 0; p < P.nAp; ++p)
                std::memcpy(P.A + (p * P.K + k) * kFMR, z + p * kFMR, kFMR * sizeof(double));
        }
#if defined(_OPENMP)
#pragma omp for schedule(static)
#endif
        for (int64_t p = 0; p < P.nBp; ++p) {
            const int64_t c_hi = std::min(kFNR, n - p * kFNR);
            for (int64_t c = 0; c < c_hi; ++c) colsum[p * kFNR + c] = 0.0;
            for (int64_t k = 0; k < rows; ++k) {
                const double* zk = P.Bp + (p * P.K + k) * kFNR;
                for (int64_t c = 0; c < c_hi; ++c) colsum[p * kFNR + c] += zk[c];
            }
        }
    }
}

// One thread tile of the lower triangle over the whole chunk, then one flush into s2.
void f64_tile(const F64Chunk& P, int64_t I, int64_t J, int64_t n, F64Kernel kernel,
              double* buf,  // [kFTile, kFTile] per-thread scratch
              double* s2    // [n, n] accumulator, only j <= i written
) {
    const int64_t i_lo = I * kFTile, j_lo = J * kFTile;
    const int64_t i_hi = std::min(n, i_lo + kFTile), j_hi = std::min(n, j_lo + kFTile);
    for (int64_t kb = 0; kb < P.K; kb += kFKc) {
        const int64_t kc = std::min(kFKc, P.K - kb);
        for (int64_t j0 = j_lo; j0 < j_hi; j0 += kFNR) {
            const double* Bp = P.Bp + ((j0 / kFNR) * P.K + kb) * kFNR;
            for (int64_t i0 = i_lo; i0 < i_hi; i0 += kFMR) {
                if (j0 > i0 + kFMR - 1) continue;
                const double* A = P.A + ((i0 / kFMR) * P.K + kb) * kFMR;
                kernel(A, Bp, kc, buf + (i0 - i_lo) * kFTile + (j0 - j_lo), kFTile, kb > 0);
            }
        }
    }
    for (int64_t i = i_lo; i < i_hi; ++i) {
        const int64_t j_end = std::min(j_hi, i + 1);
        const double* b = buf + (i - i_lo) * kFTile;
        double* row = s2 + i * n + j_lo;
        for (int64_t j = 0; j < j_end - j_lo; ++j) row[j] += b[j];
    }
}

}  // namespace

void f64_syrk_update(uintptr_t x_ptr, int64_t B, int64_t n, int64_t stride0, int64_t stride1,
                     bool x_is_double, uintptr_t ref_ptr, uintptr_t s1_ptr, uintptr_t s2_ptr,
                     bool force_portable) {
    if (B < 0 || n < 0) throw std::invalid_argument("f64_syrk_update: negative size");
    if (B == 0 || n == 0) return;
    if (x_ptr == 0 || ref_ptr == 0 || s1_ptr == 0 || s2_ptr == 0)
        throw std::invalid_argument("f64_syrk_update: null pointer");
    const auto* ref = reinterpret_cast<const double*>(ref_ptr);
    auto* s1 = reinterpret_cast<double*>(s1_ptr);
    auto* s2 = reinterpret_cast<double*>(s2_ptr);
    F64Kernel kernel = f64_kernel_portable;
#if AD_HAVE_AVX512F
    if (!force_portable && cpu_isa::has_avx512f()) kernel = f64_kernel_avx512;
#endif
    F64Chunk P;
    P.nBp = ceil_div(n, kFNR);
    P.nAp = ceil_div(n, kFMR);
    const int64_t per_image = (P.nBp * kFNR + P.nAp * kFMR) * int64_t(sizeof(double));
    const int64_t chunk_rows = std::max(kFKc, kFPackBudget / per_image / kFKc * kFKc);
    const int64_t max_rows = std::min(B, chunk_rows);
    auto Bp = aligned_array<double>(P.nBp * max_rows * kFNR);
    auto A = aligned_array<double>(P.nAp * max_rows * kFMR);
    std::vector<double> colsum(static_cast<size_t>(n));
    const auto tiles = lower_tiles(n, kFTile);
    const int64_t ntiles = static_cast<int64_t>(tiles.size());
    const int nt = ntiles > 1 ? team_size() : 1;
    auto bufs = aligned_array<double>(nt * kFTile * kFTile);  // one tile per thread
    for (int64_t k0 = 0; k0 < B; k0 += chunk_rows) {
        P.K = std::min(chunk_rows, B - k0);
        P.Bp = Bp.get();
        P.A = A.get();
        if (x_is_double)
            f64_pack(reinterpret_cast<const double*>(x_ptr) + k0 * stride0, P.K, n, stride0,
                     stride1, ref, P, colsum.data());
        else
            f64_pack(reinterpret_cast<const float*>(x_ptr) + k0 * stride0, P.K, n, stride0,
                     stride1, ref, P, colsum.data());
        for (int64_t c = 0; c < n; ++c) s1[c] += colsum[c];
#if defined(_OPENMP)
#pragma omp parallel num_threads(nt) if (nt > 1)
#endif
        {
            double* buf = bufs.get() + thread_index() * kFTile * kFTile;
#if defined(_OPENMP)
#pragma omp for schedule(dynamic, 1)
#endif
            for (int64_t t = 0; t < ntiles; ++t)
                f64_tile(P, tiles[t].first, tiles[t].second, n, kernel, buf, s2);
        }
    }
}

// =================================================================== uint8 finalisation
// The same IEEE operations, in the same order, as MomentAccumulator.result() on exact
// integer sums (moments.py), so the two agree bit for bit; fused into one blocked pass
// because the torch version makes about ten passes over n x n arrays (two of them
// transposed) and costs more than the SYRK itself for n in the thousands.
void u8_moments_finalize(int64_t N, int64_t n, uintptr_t s1_ptr, uintptr_t s2_ptr,
                         uintptr_t mean_ptr, uintptr_t cov_ptr) {
    if (N < 2 || n < 0) throw std::invalid_argument("u8_moments_finalize: need N >= 2, n >= 0");
    if (n == 0) return;
    if (s1_ptr == 0 || s2_ptr == 0 || mean_ptr == 0 || cov_ptr == 0)
        throw std::invalid_argument("u8_moments_finalize: null pointer");
    const auto* s1 = reinterpret_cast<const int64_t*>(s1_ptr);
    const auto* s2 = reinterpret_cast<const int64_t*>(s2_ptr);
    auto* mean = reinterpret_cast<double*>(mean_ptr);
    auto* cov = reinterpret_cast<double*>(cov_ptr);
    const double Nd = static_cast<double>(N), Nm1 = static_cast<double>(N - 1);
    const double scale = 127.5, scale2 = 127.5 * 127.5;  // both exact in binary64
    // N * s2 - s1 s1^T is an exact int64 while N^2 * 255^2 < 2^63 (the Python test)
    const bool exact = N <= int64_t(3037000499) && N * N <= INT64_MAX / (255 * 255);
    for (int64_t c = 0; c < n; ++c) mean[c] = (static_cast<double>(s1[c]) / Nd - scale) / scale;
    constexpr int64_t kB = 64;  // square blocks: the mirrored writes stay within a few pages
    const int64_t nb = ceil_div(n, kB);
    [[maybe_unused]] const int nt = nb > 1 ? team_size() : 1;
#if defined(_OPENMP)
#pragma omp parallel for schedule(dynamic, 1) num_threads(nt) if (nt > 1)
#endif
    for (int64_t I = 0; I < nb; ++I) {
        for (int64_t J = 0; J <= I; ++J) {
            const int64_t i_hi = std::min(n, (I + 1) * kB), j_hi = std::min(n, (J + 1) * kB);
            for (int64_t i = I * kB; i < i_hi; ++i) {
                const int64_t j_end = std::min(j_hi, i + 1);
                for (int64_t j = J * kB; j < j_end; ++j) {
                    double m2;
                    if (exact) {
                        m2 = static_cast<double>(N * s2[i * n + j] - s1[i] * s1[j]) / Nd;
                    } else {
                        const double p = static_cast<double>(s1[i]) * static_cast<double>(s1[j]);
                        m2 = static_cast<double>(s2[i * n + j]) - p / Nd;
                    }
                    const double v = m2 / scale2 / Nm1;
                    cov[i * n + j] = v;
                    cov[j * n + i] = v;
                }
            }
        }
    }
}

}  // namespace analytic_diffusion
