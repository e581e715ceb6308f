// CPU "patch_moments" kernels: lag-product rectangle sums (see patch_moments.h for the contract
// and docs/patch_moments.md for the maths).
//
// For one lag e = (di, dj) and channel pair (c, c') the product image
//     P(q) = sum_b z[b, c, q] z[b, c', q + e]
// serves every pair of patch offsets (d, d + e): their second-moment sum is the sum of P over
// the rectangle of positions q = p + d. So the work is one batch reduction per (lag, channel
// pair, pixel) instead of one per (pair of patch offsets, patch position).
//
// Data flow per block of images:
//   1. pack: per (channel, image row) a stripe of groups of images, pixels interleaved with the
//      images of a group: uint8 groups of four ("k4" bytes, the VNNI operand layout), float64
//      groups of one. Two copies: S (the pixel at q; uint8 unsigned) and U (the pixel at q + e;
//      uint8 stored signed as s = u - 128 = u ^ 0x80; columns padded with Lj zeros on each
//      side, so a column lag is a plain unaligned load, the signed memory operand of vpdpbusd,
//      and pixels outside the image contribute 0).
//      Packing also gives the block's per-pixel sums.
//   2. compute: OpenMP over units (c, c', di). Per image row r, the products of row r of S
//      with row r + di of U, for 16 (uint8) or 8 (float64) consecutive pixels and up to 16
//      column lags at once (one accumulator register per lag), are summed over the block's
//      images in registers (vpdpbusd: four images per instruction; FMA for float64) and added
//      into a small int32 / float64 row buffer. Each row of products is then reduced to its
//      nw column-window sums (int64 prefix sums), and after the last row the row-window sums
//      give the nh x nw rectangle sums, added into T.
//   uint8: u u' = u s' + 128 u (s' = u' - 128), so the exact product sum is the VNNI sum plus
//   128 times the sum of u over the rectangle's pixels whose partner q + e is inside the image
//   (an integral image of the block's per-pixel sums), added in int64.
//   The int32 bound per block is kLagMaxBlockImages (patch_moments.h).

#include "patch_moments.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <type_traits>
#include <vector>

#include "../common/cpu_isa.h"  // AD_HAVE_VNNI, AD_TARGET_VNNI, ... and run-time CPUID checks
#include "../common/cpu_runtime.h"

namespace analytic_diffusion {
namespace {

using cpu_runtime::aligned_array;
using cpu_runtime::team_size;
using cpu_runtime::thread_index;

using cpu_runtime::ceil_div;

using cpu_isa::has_avx512f;
using cpu_isa::has_vnni;

// Packed-element traits: uint8 (groups of four images, int32 row sums, int64 totals) and
// float64 (groups of one image, float64 throughout).
struct U8Tr {
    using Elem = uint8_t;
    using Acc = int32_t;
    using Sum = int64_t;
    static constexpr int64_t VL = 16;  // pixels per vector (16 int32 lanes)
    static constexpr int64_t GS = 4;   // images per group
    static constexpr int64_t GC = 32;  // groups per cache chunk (S 8 KiB + U ~12 KiB at W = 64)
};
struct F64Tr {
    using Elem = double;
    using Acc = double;
    using Sum = double;
    static constexpr int64_t VL = 8;
    static constexpr int64_t GS = 1;
    static constexpr int64_t GC = 16;
};

// A micro-kernel adds, for lag index d in [0, N) and pixel t in [0, VL):
//     out[d * ldo + t] += sum_{g < ng} sum_{q < GS} S[g*sS + t*GS + q] * U[g*sU + (d + t)*GS + q]
// (uint8: S unsigned bytes u, U signed bytes u ^ 0x80). Pointers are unaligned in general.
template <class Tr>
using LagKernel = void (*)(const typename Tr::Elem* S, const typename Tr::Elem* U, int64_t ng, int64_t sS,
                           int64_t sU, typename Tr::Acc* out, int64_t ldo);

template <int N>
void u8_kernel_portable(const uint8_t* S, const uint8_t* U, int64_t ng, int64_t sS, int64_t sU, int32_t* out,
                        int64_t ldo) {
    int32_t acc[N][16] = {};
    for (int64_t g = 0; g < ng; ++g) {
        const uint8_t* s = S + g * sS;
        const int8_t* u = reinterpret_cast<const int8_t*>(U + g * sU);
        for (int d = 0; d < N; ++d)
            for (int t = 0; t < 16; ++t)
                acc[d][t] += s[4 * t] * u[4 * (d + t)] + s[4 * t + 1] * u[4 * (d + t) + 1] +
                             s[4 * t + 2] * u[4 * (d + t) + 2] + s[4 * t + 3] * u[4 * (d + t) + 3];
    }
    for (int d = 0; d < N; ++d)
        for (int t = 0; t < 16; ++t) out[d * ldo + t] += acc[d][t];
}

template <int N>
void f64_kernel_portable(const double* S, const double* U, int64_t ng, int64_t sS, int64_t sU, double* out,
                         int64_t ldo) {
    double acc[N][8] = {};
    for (int64_t g = 0; g < ng; ++g) {
        const double* s = S + g * sS;
        const double* u = U + g * sU;
        for (int d = 0; d < N; ++d)
            for (int t = 0; t < 8; ++t) acc[d][t] += s[t] * u[d + t];
    }
    for (int d = 0; d < N; ++d)
        for (int t = 0; t < 8; ++t) out[d * ldo + t] += acc[d][t];
}

// Accumulators are named variables, not an array: with an array GCC copies registers around
// inside the loop (and spills one at N = 16), as moments.cpp notes for its kernels.
#define AD_PM_L16(F) F(0) F(1) F(2) F(3) F(4) F(5) F(6) F(7) F(8) F(9) F(10) F(11) F(12) F(13) F(14) F(15)
#define AD_PM_L8(F) F(0) F(1) F(2) F(3) F(4) F(5) F(6) F(7)
#define AD_PM_L4(F) F(0) F(1) F(2) F(3)
#define AD_PM_L2(F) F(0) F(1)
#define AD_PM_L1(F) F(0)

#if AD_HAVE_VNNI
// One load of S (unsigned) per group feeds N vpdpbusd whose signed operand is an unaligned load
// of U straight from memory (a column lag is a 4-byte shift): N <= 16 accumulators + 1 operand.
#define AD_PM_U8_DECL(d) __m512i a##d = _mm512_setzero_si512();
#if AD_X86_DISPATCH
// GCC 12 keeps renaming the accumulators of the intrinsic form (a register copy per
// vpdpbusd and a spill at N = 16, ~2x slower); the asm form accumulates in place.
#define AD_PM_U8_STEP(d)                                                                         \
    asm("vpdpbusd %[m], %[s], %[a]"                                                              \
        : [a] "+v"(a##d)                                                                         \
        : [s] "v"(s), [m] "m"(*reinterpret_cast<const __m512i_u*>(u + 4 * (d))));
#else
#define AD_PM_U8_STEP(d) a##d = _mm512_dpbusd_epi32(a##d, s, _mm512_loadu_si512(u + 4 * (d)));
#endif
#define AD_PM_U8_STORE(d) \
    _mm512_storeu_si512(out + (d) * ldo, _mm512_add_epi32(a##d, _mm512_loadu_si512(out + (d) * ldo)));
#define AD_PM_U8_KERNEL(N)                                                                                  \
    AD_TARGET_VNNI void u8_kernel_vnni_##N(const uint8_t* S, const uint8_t* U, int64_t ng, int64_t sS,   \
                                              int64_t sU, int32_t* out, int64_t ldo) {                      \
        AD_PM_L##N(AD_PM_U8_DECL) for (int64_t g = 0; g < ng; ++g) {                                        \
            const __m512i s = _mm512_loadu_si512(S + g * sS);                                               \
            const uint8_t* u = U + g * sU;                                                                  \
            AD_PM_L##N(AD_PM_U8_STEP)                                                                       \
        }                                                                                                   \
        AD_PM_L##N(AD_PM_U8_STORE)                                                                          \
    }
AD_PM_U8_KERNEL(16)
AD_PM_U8_KERNEL(8)
AD_PM_U8_KERNEL(4)
AD_PM_U8_KERNEL(2)
AD_PM_U8_KERNEL(1)
#endif

#if AD_HAVE_AVX512F
#define AD_PM_F64_DECL(d) __m512d a##d = _mm512_setzero_pd();
#if AD_X86_DISPATCH
#define AD_PM_F64_STEP(d)                                                                        \
    asm("vfmadd231pd %[m], %[s], %[a]"                                                           \
        : [a] "+v"(a##d)                                                                         \
        : [s] "v"(s), [m] "m"(*reinterpret_cast<const __m512d_u*>(u + (d))));
#else
#define AD_PM_F64_STEP(d) a##d = _mm512_fmadd_pd(_mm512_loadu_pd(u + (d)), s, a##d);
#endif
#define AD_PM_F64_STORE(d) _mm512_storeu_pd(out + (d) * ldo, _mm512_add_pd(a##d, _mm512_loadu_pd(out + (d) * ldo)));
#define AD_PM_F64_KERNEL(N)                                                                                  \
    AD_TARGET_AVX512 void f64_kernel_avx512_##N(const double* S, const double* U, int64_t ng, int64_t sS, \
                                                   int64_t sU, double* out, int64_t ldo) {                   \
        AD_PM_L##N(AD_PM_F64_DECL) for (int64_t g = 0; g < ng; ++g) {                                        \
            const __m512d s = _mm512_loadu_pd(S + g * sS);                                                   \
            const double* u = U + g * sU;                                                                    \
            AD_PM_L##N(AD_PM_F64_STEP)                                                                       \
        }                                                                                                    \
        AD_PM_L##N(AD_PM_F64_STORE)                                                                          \
    }
AD_PM_F64_KERNEL(16)
AD_PM_F64_KERNEL(8)
AD_PM_F64_KERNEL(4)
AD_PM_F64_KERNEL(2)
AD_PM_F64_KERNEL(1)
#endif

// Kernels for N = 16, 8, 4, 2, 1 lags: any lag count is a sum of these (no wasted lanes).
template <class Tr>
struct KernelSet {
    LagKernel<Tr> k[5];
};

KernelSet<U8Tr> u8_kernels(bool portable) {
#if AD_HAVE_VNNI
    if (!portable && has_vnni())
        return {{u8_kernel_vnni_16, u8_kernel_vnni_8, u8_kernel_vnni_4, u8_kernel_vnni_2, u8_kernel_vnni_1}};
#endif
    (void)portable;
    return {{u8_kernel_portable<16>, u8_kernel_portable<8>, u8_kernel_portable<4>, u8_kernel_portable<2>,
             u8_kernel_portable<1>}};
}

KernelSet<F64Tr> f64_kernels(bool portable) {
#if AD_HAVE_AVX512F
    if (!portable && has_avx512f())
        return {{f64_kernel_avx512_16, f64_kernel_avx512_8, f64_kernel_avx512_4, f64_kernel_avx512_2, f64_kernel_avx512_1}};
#endif
    (void)portable;
    return {{f64_kernel_portable<16>, f64_kernel_portable<8>, f64_kernel_portable<4>, f64_kernel_portable<2>,
             f64_kernel_portable<1>}};
}

struct Geometry {
    int64_t B, C, H, W, Li, Lj, nh, nw, oh, ow;
    int64_t Wq, Wp, PL;  // S row width (W rounded up to VL), U row width (Wq + 2 Lj), U left pad (Lj)
    int64_t nlag;        // 2 Lj + 1
};

// Packs images [b0, b0 + nb) into S and U (both zeroed by the caller) and adds their per-pixel
// sums into S1 (the output, over all blocks) and blk (this block only; uint8 correction).
template <class Tr, class XT>
void pack_block(const XT* x, int64_t b0, int64_t nb, const int64_t* st, const double* shift, const Geometry& g,
                int64_t G, typename Tr::Elem* S, typename Tr::Elem* U, typename Tr::Sum* S1, int64_t* blk) {
    using Elem = typename Tr::Elem;
    constexpr int64_t GS = Tr::GS;
    const int64_t rows = g.C * g.H;
    const int nt = (nb * rows * g.W >= (int64_t(1) << 15)) ? team_size() : 1;
#if defined(_OPENMP)
#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1)
#endif
    for (int64_t cr = 0; cr < rows; ++cr) {
        const int64_t c = cr / g.H, r = cr % g.H;
        Elem* Sr = S + cr * G * g.Wq * GS;
        Elem* Ur = U + cr * G * g.Wp * GS;
        typename Tr::Sum* s1 = S1 + cr * g.W;
        int64_t* bk = blk ? blk + cr * g.W : nullptr;
        for (int64_t b = 0; b < nb; ++b) {
            const int64_t grp = b / GS, q = b % GS;
            const XT* src = x + (b0 + b) * st[0] + c * st[1] + r * st[2];
            Elem* sd = Sr + grp * g.Wq * GS + q;
            Elem* ud = Ur + grp * g.Wp * GS + g.PL * GS + q;
            for (int64_t col = 0; col < g.W; ++col) {
                const XT v = src[col * st[3]];
                if constexpr (std::is_same<Elem, uint8_t>::value) {
                    ud[col * GS] = static_cast<uint8_t>(v ^ 0x80u);
                    sd[col * GS] = v;
                    s1[col] += v;
                    bk[col] += v;
                } else {
                    const double z = static_cast<double>(v) - shift[c];
                    ud[col * GS] = z;
                    sd[col * GS] = z;
                    s1[col] += z;
                }
            }
        }
    }
}

// Rectangle sum of the integral image I ([H+1][W+1]) over rows [r0, r1), columns [c0, c1),
// clipped to the image.
inline int64_t rect_sum(const int64_t* I, int64_t H, int64_t W, int64_t r0, int64_t r1, int64_t c0, int64_t c1) {
    r0 = std::clamp<int64_t>(r0, 0, H);
    r1 = std::clamp<int64_t>(r1, 0, H);
    c0 = std::clamp<int64_t>(c0, 0, W);
    c1 = std::clamp<int64_t>(c1, 0, W);
    if (r1 <= r0 || c1 <= c0) return 0;
    const int64_t W1 = W + 1;
    return I[r1 * W1 + c1] - I[r0 * W1 + c1] - I[r1 * W1 + c0] + I[r0 * W1 + c0];
}

template <class Tr>
void compute_block(const Geometry& g, int64_t G, const typename Tr::Elem* S, const typename Tr::Elem* U,
                   const int64_t* integral,  // uint8: [C][H+1][W+1] of the block's pixel sums; else null
                   const KernelSet<Tr>& ks, typename Tr::Sum* T) {
    using Acc = typename Tr::Acc;
    using Sum = typename Tr::Sum;
    constexpr int64_t VL = Tr::VL, GS = Tr::GS, GC = Tr::GC;
    // units (di, c, c'): more rows (small di) first, so the dynamic schedule ends evenly
    const int64_t nunits = (g.Li + 1) * g.C * g.C;
    const int nt = nunits > 1 ? team_size() : 1;
    const int64_t prow_len = g.nlag * g.Wq, v_len = g.nlag * g.H * g.nw;
    auto prow_all = aligned_array<Acc>(nt * prow_len);
    auto v_all = aligned_array<Sum>(nt * v_len);
    auto pre_all = aligned_array<Sum>(nt * (std::max(g.W, g.H) + 1));
    const int64_t sS = g.Wq * GS, sU = g.Wp * GS;
#if defined(_OPENMP)
#pragma omp parallel num_threads(nt) if (nt > 1)
#endif
    {
        const int tid = thread_index();
        Acc* prow = prow_all.get() + tid * prow_len;
        Sum* V = v_all.get() + tid * v_len;
        Sum* pre = pre_all.get() + tid * (std::max(g.W, g.H) + 1);
#if defined(_OPENMP)
#pragma omp for schedule(dynamic, 1)
#endif
        for (int64_t u = 0; u < nunits; ++u) {
            const int64_t di = u / (g.C * g.C), c = (u / g.C) % g.C, c2 = u % g.C;
            const int64_t dj_lo = di == 0 ? 0 : -g.Lj;
            const int64_t ndj = g.Lj - dj_lo + 1;
            std::fill(V, V + ndj * g.H * g.nw, Sum(0));
            for (int64_t r = 0; r + di < g.H; ++r) {
                std::fill(prow, prow + ndj * g.Wq, Acc(0));
                const typename Tr::Elem* Srow = S + (c * g.H + r) * G * sS;
                const typename Tr::Elem* Urow = U + (c2 * g.H + r + di) * G * sU;
                for (int64_t g0 = 0; g0 < G; g0 += GC) {
                    const int64_t ng = std::min(GC, G - g0);
                    for (int64_t q0 = 0; q0 < g.Wq; q0 += VL) {
                        const auto* Sp = Srow + g0 * sS + q0 * GS;
                        const auto* Up = Urow + g0 * sU + (g.PL + q0 + dj_lo) * GS;
                        int64_t d = 0;
                        for (int lvl = 0; lvl < 5; ++lvl) {
                            const int64_t n = int64_t(16) >> lvl;
                            for (; d + n <= ndj; d += n) ks.k[lvl](Sp, Up + d * GS, ng, sS, sU, prow + d * g.Wq + q0, g.Wq);
                        }
                    }
                }
                // row r of every lag's products -> its nw column-window sums, as the row total
                // (a vectorised reduction) minus the columns left and right of each window
                for (int64_t d = 0; d < ndj; ++d) {
                    const Acc* p = prow + d * g.Wq;
                    Sum total = 0;
#if defined(_OPENMP)
#pragma omp simd reduction(+ : total)
#endif
                    for (int64_t col = 0; col < g.W; ++col) total += Sum(p[col]);
                    Sum* v = V + (d * g.H + r) * g.nw;
                    Sum left = 0;
                    for (int64_t j = 0; j < g.nw; ++j) {
                        v[j] = total - left;  // minus sum_{col < j}
                        left += Sum(p[j]);
                    }
                    Sum right = 0;  // sum_{col >= j + ow}, from the last window down
                    for (int64_t col = g.nw - 1 + g.ow; col < g.W; ++col) right += Sum(p[col]);
                    for (int64_t j = g.nw - 1; j >= 0; --j) {
                        v[j] -= right;
                        if (j > 0) right += Sum(p[j - 1 + g.ow]);
                    }
                }
            }
            // rows -> rectangles, plus the uint8 correction, into T
            for (int64_t d = 0; d < ndj; ++d) {
                const int64_t dj = dj_lo + d;
                Sum* out = T + ((((di * g.nlag) + dj + g.Lj) * g.C + c) * g.C + c2) * g.nh * g.nw;
                for (int64_t j = 0; j < g.nw; ++j) {
                    pre[0] = 0;
                    for (int64_t r = 0; r < g.H; ++r) pre[r + 1] = pre[r] + V[(d * g.H + r) * g.nw + j];
                    for (int64_t i = 0; i < g.nh; ++i) {
                        Sum val = pre[i + g.oh] - pre[i];
                        if (integral != nullptr)
                            // + 128 u(q) over the q of the rectangle whose partner q + e is inside
                            val += 128 * rect_sum(integral + c * (g.H + 1) * (g.W + 1), g.H, g.W, i,
                                                  std::min(i + g.oh, g.H - di), std::max(j, -dj),
                                                  std::min(j + g.ow, g.W - dj));
                        out[i * g.nw + j] += val;
                    }
                }
            }
        }
    }
}

template <class Tr, class XT>
void run(const XT* x, const int64_t* st, const double* shift, const Geometry& g, const KernelSet<Tr>& ks,
         typename Tr::Sum* T, typename Tr::Sum* S1, int64_t block) {
    using Elem = typename Tr::Elem;
    constexpr int64_t GS = Tr::GS;
    const bool is_u8 = std::is_same<Elem, uint8_t>::value;
    if (block <= 0) {
        // bound the packed bytes of a block (S + U) to ~64 MiB
        const int64_t per_image = g.C * g.H * (g.Wq + g.Wp) * int64_t(sizeof(Elem));
        block = std::max<int64_t>(4 * GS, (int64_t(64) << 20) / std::max<int64_t>(per_image, 1));
        if (is_u8) block = std::min(block, kLagMaxBlockImages);
        block = block / GS * GS;
    }
    block = std::min(block, g.B);
    const int64_t maxG = ceil_div(block, GS);
    const int64_t s_len = g.C * g.H * maxG * g.Wq * GS, u_len = g.C * g.H * maxG * g.Wp * GS;
    auto S = aligned_array<Elem>(s_len);
    auto U = aligned_array<Elem>(u_len);
    std::vector<int64_t> blk(is_u8 ? g.C * g.H * g.W : 0);
    std::vector<int64_t> integral(is_u8 ? g.C * (g.H + 1) * (g.W + 1) : 0);
    for (int64_t b0 = 0; b0 < g.B; b0 += block) {
        const int64_t nb = std::min(block, g.B - b0);
        const int64_t G = ceil_div(nb, GS);
        std::memset(S.get(), 0, sizeof(Elem) * g.C * g.H * G * g.Wq * GS);
        std::memset(U.get(), 0, sizeof(Elem) * g.C * g.H * G * g.Wp * GS);
        if (is_u8) std::fill(blk.begin(), blk.end(), int64_t(0));
        pack_block<Tr, XT>(x, b0, nb, st, shift, g, G, S.get(), U.get(), S1, is_u8 ? blk.data() : nullptr);
        if (is_u8) {
            const int64_t W1 = g.W + 1;
            for (int64_t c = 0; c < g.C; ++c) {
                int64_t* I = integral.data() + c * (g.H + 1) * W1;
                std::fill(I, I + W1, int64_t(0));
                for (int64_t r = 0; r < g.H; ++r) {
                    int64_t run_sum = 0;
                    I[(r + 1) * W1] = 0;
                    for (int64_t col = 0; col < g.W; ++col) {
                        run_sum += blk[(c * g.H + r) * g.W + col];
                        I[(r + 1) * W1 + col + 1] = I[r * W1 + col + 1] + run_sum;
                    }
                }
            }
        }
        compute_block<Tr>(g, G, S.get(), U.get(), is_u8 ? integral.data() : nullptr, ks, T);
    }
}

}  // namespace

bool lag_sums_has_vnni() { return has_vnni(); }

void lag_rect_sums(uintptr_t x_ptr, int dtype, int64_t B, int64_t C, int64_t H, int64_t W, int64_t st0,
                   int64_t st1, int64_t st2, int64_t st3, uintptr_t shift_ptr, int64_t Li, int64_t Lj, int64_t nh,
                   int64_t nw, int64_t oh, int64_t ow, uintptr_t T_ptr, uintptr_t S1_ptr, bool force_portable,
                   int64_t block_images) {
    if (dtype != kLagU8 && dtype != kLagF32 && dtype != kLagF64) throw std::invalid_argument("lag_rect_sums: bad dtype");
    if (B < 0 || C < 1 || H < 1 || W < 1) throw std::invalid_argument("lag_rect_sums: bad sizes");
    if (Li < 0 || Li >= H || Lj < 0 || Lj >= W) throw std::invalid_argument("lag_rect_sums: lags must be in [0, H) x [0, W)");
    if (nh < 1 || nw < 1 || oh < 1 || ow < 1 || nh - 1 + oh > H || nw - 1 + ow > W)
        throw std::invalid_argument("lag_rect_sums: rectangles must lie inside the image");
    if (block_images < 0 || (dtype == kLagU8 && block_images > kLagMaxBlockImages))
        throw std::invalid_argument("lag_rect_sums: block_images must be in [0, 16384] for uint8");
    if (B == 0) return;
    if (x_ptr == 0 || T_ptr == 0 || S1_ptr == 0 || (dtype != kLagU8 && shift_ptr == 0))
        throw std::invalid_argument("lag_rect_sums: null pointer");
    const int64_t st[4] = {st0, st1, st2, st3};
    Geometry g{B, C, H, W, Li, Lj, nh, nw, oh, ow, 0, 0, Lj, 2 * Lj + 1};
    const auto* shift = reinterpret_cast<const double*>(shift_ptr);
    if (dtype == kLagU8) {
        g.Wq = ceil_div(W, U8Tr::VL) * U8Tr::VL;
        g.Wp = g.Wq + 2 * Lj;
        run<U8Tr, uint8_t>(reinterpret_cast<const uint8_t*>(x_ptr), st, shift, g, u8_kernels(force_portable),
                           reinterpret_cast<int64_t*>(T_ptr), reinterpret_cast<int64_t*>(S1_ptr), block_images);
    } else {
        g.Wq = ceil_div(W, F64Tr::VL) * F64Tr::VL;
        g.Wp = g.Wq + 2 * Lj;
        auto* T = reinterpret_cast<double*>(T_ptr);
        auto* S1 = reinterpret_cast<double*>(S1_ptr);
        if (dtype == kLagF64)
            run<F64Tr, double>(reinterpret_cast<const double*>(x_ptr), st, shift, g, f64_kernels(force_portable), T,
                               S1, block_images);
        else
            run<F64Tr, float>(reinterpret_cast<const float*>(x_ptr), st, shift, g, f64_kernels(force_portable), T,
                              S1, block_images);
    }
}

}  // namespace analytic_diffusion
