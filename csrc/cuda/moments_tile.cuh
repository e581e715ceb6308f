// Geometry and per-thread index maps of the uint8 SYRK kernel in moments.cu.
//
// Everything here is host+device and free of CUDA types, so that
// tests/u8_syrk_emulator.cpp can replay a whole thread block on the CPU with exactly
// these functions (staging loads, byte transposes, swizzled shared-memory offsets,
// ldmatrix row addresses, accumulator coordinates) against an independent model of
// the PTX ldmatrix/mma semantics. The kernel itself only adds the two warp-collective
// instructions (ldmatrix.x4, mma.m16n8k32) and the barriers around these helpers.
//
// Layout of one operand stage in shared memory ("k-major packed"): 128 rows, one per
// pixel of the tile, each holding kBK = 64 consecutive images' bytes of that pixel,
// already shifted to int8 (s = u - 128). A row is four 16-byte chunks (k 0-15, 16-31,
// 32-47, 48-63); chunk c of row r is stored at chunk position c ^ ((r >> 1) & 3).
//   * ldmatrix reads, per 8-lane phase, one chunk of 8 consecutive rows R..R+7
//     (R % 8 == 0): rows of one parity land in different chunk positions and the two
//     parities in different halves of the 128-byte bank window -> conflict-free.
//   * the staging stores (16 B per lane, see store_unit) cover, per 8-lane phase,
//     4 chunks x 2 rows of different parity -> conflict-free as well.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "../common/macros.h"

// Unrolling matters on the device only; the host pass (and the CPU emulator) would warn
// about an unknown pragma.
#if defined(__CUDA_ARCH__)
#define AD_U8SYRK_UNROLL _Pragma("unroll")
#else
#define AD_U8SYRK_UNROLL
#endif

namespace analytic_diffusion {
namespace u8syrk {

constexpr int kTile = 128;     // pixels per output-tile side (both operands)
constexpr int kBK = 64;        // images (the summed k axis) per shared-memory stage
constexpr int kThreads = 128;  // 4 warps in a 2 x 2 grid, each owning 64 x 64 outputs
constexpr int kWarpTile = 64;
constexpr int kStageBytes = kTile * kBK;  // one operand, one stage: 8 KiB

// int32 accumulation bound. With s = u - 128 in [-128, 127] every product s_i*s_j lies
// in [-128*127, 128*128] = [-16256, 16384], so a sum of K products is within
// [-16256 K, 16384 K]; 16384 K <= 2^31 - 1 holds for K <= 131071. A block's int32
// accumulators therefore never cover more than kMaxKBlock images before they are
// flushed into the int64 sums; the default leaves a factor-two margin.
constexpr int64_t kMaxKBlock = 131071;
constexpr int64_t kDefaultKBlock = 65536;

// uint8 -> int8 shift applied to four packed bytes: u ^ 0x80 == u - 128 in two's
// complement (0 -> -128, 128 -> 0, 255 -> 127). Padding bytes are staged as u = 128,
// i.e. s = 0, so padded images and pixels add nothing to sum s_i s_j.
constexpr uint32_t kShift4 = 0x80808080u;
constexpr uint32_t kPad4 = 0x80808080u;  // four "u = 128" bytes

// Byte offset of 16-byte chunk `chunk` (0..3, k = 16*chunk .. 16*chunk+15) of row `row`
// (pixel within the tile, 0..127) inside one operand stage buffer.
AD_HOST_DEVICE AD_FORCEINLINE int smem_offset(int row, int chunk) {
    return row * kBK + ((chunk ^ ((row >> 1) & 3)) << 4);
}

// __byte_perm(x, y, s): result byte i is byte (s >> 4i) & 7 of the 8-byte value {y, x}
// (x = bytes 0-3). The host version exists for the emulator only.
AD_HOST_DEVICE AD_FORCEINLINE uint32_t byte_perm(uint32_t x, uint32_t y, uint32_t s) {
#if defined(__CUDA_ARCH__)
    return __byte_perm(x, y, s);
#else
    const uint64_t v = (uint64_t(y) << 32) | x;
    uint32_t r = 0;
    for (int i = 0; i < 4; ++i) r |= uint32_t((v >> (8 * ((s >> (4 * i)) & 7))) & 0xFFu) << (8 * i);
    return r;
#endif
}

// 4x4 byte transpose: w[r] holds pixels 0..3 of image r; out[c] holds images 0..3 of
// pixel c (image r in byte r, i.e. k ascending with address, as ldmatrix/mma expect).
AD_HOST_DEVICE AD_FORCEINLINE void transpose4x4(uint32_t w0, uint32_t w1, uint32_t w2, uint32_t w3,
                                                uint32_t (&out)[4]) {
    const uint32_t lo01 = byte_perm(w0, w1, 0x5140);  // w0.b0 w1.b0 w0.b1 w1.b1
    const uint32_t hi01 = byte_perm(w0, w1, 0x7362);  // w0.b2 w1.b2 w0.b3 w1.b3
    const uint32_t lo23 = byte_perm(w2, w3, 0x5140);
    const uint32_t hi23 = byte_perm(w2, w3, 0x7362);
    out[0] = byte_perm(lo01, lo23, 0x5410);  // w0.b0 w1.b0 w2.b0 w3.b0
    out[1] = byte_perm(lo01, lo23, 0x7632);  // w0.b1 w1.b1 w2.b1 w3.b1
    out[2] = byte_perm(hi01, hi23, 0x5410);
    out[3] = byte_perm(hi01, hi23, 0x7632);
}

// Which part of a stage thread `tid` stages: pixel quad pq (pixels 4pq..4pq+3 of the
// tile) of the 16-image unit kunit (images 16*kunit .. +15 of the stage). Lanes
// 4q..4q+3 share a pixel quad, so one 32-bit global load instruction of a warp reads 8
// quads (32 contiguous bytes, one sector) from each of 4 image rows.
struct LoadSlot {
    int pq;     // 0..31
    int kunit;  // 0..3
};

AD_HOST_DEVICE AD_FORCEINLINE LoadSlot load_slot(int tid) {
    const int lane = tid & 31, warp = tid >> 5;
    return LoadSlot{(lane >> 2) + 8 * warp, lane & 3};
}

template <typename T>
AD_HOST_DEVICE AD_FORCEINLINE T load_ro(const T* p) {
#if defined(__CUDA_ARCH__)
    return __ldg(p);  // read-only path: x is never written during the update
#else
    return *p;
#endif
}

// Reads the 16 x 4 bytes of one staging unit into w[r] = pixels p..p+3 of image k+r,
// with u = 128 padding outside [0, kend) x [0, n).
//   x: [B, n] uint8 addressed as x[k*s0 + p*s1]
//   kVec: s1 == 1 and every 4-pixel group is 4-byte aligned (x and s0 multiples of 4),
//         so an in-range quad is one 32-bit load.
template <bool kVec>
AD_HOST_DEVICE AD_FORCEINLINE void load_unit(uint32_t (&w)[16], const uint8_t* x, int64_t s0,
                                             int64_t s1, int64_t k, int64_t kend, int64_t p,
                                             int64_t n) {
AD_U8SYRK_UNROLL
    for (int r = 0; r < 16; ++r) {
        uint32_t v = kPad4;
        if (k + r < kend) {
            const uint8_t* row = x + (k + r) * s0;
            if (kVec && p + 3 < n) {
                v = load_ro(reinterpret_cast<const uint32_t*>(row + p));
            } else {
                v = 0;
AD_U8SYRK_UNROLL
                for (int c = 0; c < 4; ++c) {
                    const uint32_t b = (p + c < n) ? uint32_t(load_ro(row + (p + c) * s1)) : 0x80u;
                    v |= b << (8 * c);
                }
            }
        }
        w[r] = v;
    }
}

// Transposes a staged unit to pixel-major, shifts it to int8 and writes the four
// 16-byte pieces (one per pixel: images 16*kunit .. +15) into a stage buffer.
// Odd pixel quads write their pixels in the order 1,0,3,2: each 8-lane store phase
// then holds rows of both parities and hits 8 distinct 16-byte bank groups.
AD_HOST_DEVICE AD_FORCEINLINE void store_unit(uint8_t* buf, const uint32_t (&w)[16], LoadSlot slot) {
    uint32_t t[4][4];  // t[q][c]: images 4q..4q+3 of the unit, pixel c
AD_U8SYRK_UNROLL
    for (int q = 0; q < 4; ++q) transpose4x4(w[4 * q], w[4 * q + 1], w[4 * q + 2], w[4 * q + 3], t[q]);
    const bool odd = (slot.pq & 1) != 0;
AD_U8SYRK_UNROLL
    for (int c = 0; c < 4; ++c) {
        // selects between two compile-time indices: the array stays in registers
        const uint32_t v0 = (odd ? t[0][c ^ 1] : t[0][c]) ^ kShift4;
        const uint32_t v1 = (odd ? t[1][c ^ 1] : t[1][c]) ^ kShift4;
        const uint32_t v2 = (odd ? t[2][c ^ 1] : t[2][c]) ^ kShift4;
        const uint32_t v3 = (odd ? t[3][c ^ 1] : t[3][c]) ^ kShift4;
        const int row = 4 * slot.pq + (odd ? (c ^ 1) : c);
        uint8_t* dst = buf + smem_offset(row, slot.kunit);
#if defined(__CUDA_ARCH__)
        *reinterpret_cast<uint4*>(dst) = make_uint4(v0, v1, v2, v3);
#else
        const uint32_t v[4] = {v0, v1, v2, v3};
        std::memcpy(dst, v, 16);
#endif
    }
}

// ldmatrix.x4 row addresses. Lane L supplies the address of row (L & 7) of matrix L >> 3;
// after the load, register j of lane L holds bytes 4*(L%4)..+3 of row L/4 of matrix j.
//
// A fragments of mma.m16n8k32 (row-major 16 x 32 int8, k contiguous; g = L/4, t = L%4):
//   a0 = A[g][4t..4t+3], a1 = A[g+8][4t..], a2 = A[g][16+4t..], a3 = A[g+8][16+4t..]
// so matrix j covers tile rows m0 + 8*(j & 1) .. +7 and k bytes 16*(j >> 1) .. +15 of the
// k32 slice ks (stage chunk 2*ks + (j >> 1)).
AD_HOST_DEVICE AD_FORCEINLINE int a_ldsm_offset(int m0, int ks, int lane) {
    const int j = lane >> 3, r = lane & 7;
    return smem_offset(m0 + r + 8 * (j & 1), 2 * ks + (j >> 1));
}

// B fragments (k x n "col" = stored n-major, k contiguous): b0 = B[4t..4t+3][g],
// b1 = B[16+4t..][g]. One x4 serves two n8 tiles: matrices 0, 1 are b0, b1 of n-tile
// rows n0..n0+7, matrices 2, 3 are b0, b1 of rows n0+8..n0+15.
AD_HOST_DEVICE AD_FORCEINLINE int b_ldsm_offset(int n0, int ks, int lane) {
    const int j = lane >> 3, r = lane & 7;
    return smem_offset(n0 + r + 8 * (j >> 1), 2 * ks + (j & 1));
}

// Accumulator register v (0..3) of lane L holds C[g + 8*(v >> 1)][2t + (v & 1)].
AD_HOST_DEVICE AD_FORCEINLINE int c_row(int lane, int v) { return (lane >> 2) + 8 * (v >> 1); }
AD_HOST_DEVICE AD_FORCEINLINE int c_col(int lane, int v) { return 2 * (lane & 3) + (v & 1); }

// Lower-triangle tile t (row-major over ti >= tj) -> (ti, tj).
AD_HOST_DEVICE AD_FORCEINLINE void tile_coords(int64_t t, int64_t& ti, int64_t& tj) {
    int64_t i = static_cast<int64_t>((sqrt(8.0 * double(t) + 1.0) - 1.0) * 0.5);
    // the float estimate can be one off for large t; the integer test settles it
    while (i > 0 && i * (i + 1) / 2 > t) --i;
    while ((i + 1) * (i + 2) / 2 <= t) ++i;
    ti = i;
    tj = t - i * (i + 1) / 2;
}

// sum_k u_i u_j from the shifted sum. With u = s + 128:
//   sum_k u_i u_j = sum_k (s_i + 128)(s_j + 128)
//                 = S_ss + 128 sum s_i + 128 sum s_j + 128^2 B
// and sum_k s_i = U_i - 128 B (U_i = sum_k u_i, this batch's column sum), so
//                 = S_ss + 128 (U_i + U_j) - 2 * 128^2 B + 128^2 B
//                 = S_ss + 128 (U_i + U_j) - 128^2 B.
// Check with B = 1, u_i = u_j = 0: S_ss = 16384, U = 0 -> 16384 - 16384 = 0. With
// u_i = 255, u_j = 0: S_ss = 127 * -128 = -16256, 128 * 255 = 32640 -> -16256 + 32640
// - 16384 = 0. With u_i = u_j = 255: 16129 + 65280 - 16384 = 65025 = 255^2.
// Only one K-split adds the correction (it is per batch, not per K block).
AD_HOST_DEVICE AD_FORCEINLINE int64_t unshift(int64_t s_ss, int64_t colsum_i, int64_t colsum_j,
                                              int64_t batch) {
    return s_ss + 128 * (colsum_i + colsum_j) - 16384 * batch;
}

// K ranges of one launch: k_chunk images per range (a multiple of kBK, never above the
// int32 bound k_block / kMaxKBlock) and `splits` ranges covering [0, B). Ranges are made
// shorter than the bound only when the tile grid alone would leave SMs idle (fewer
// than two blocks per SM), and then not below 4096 images, so that each range's
// 128 x 128 int64 atomic flush stays small next to its 4096 * 128^2 multiply-adds.
struct KPlan {
    int64_t k_chunk;
    int64_t splits;
};

inline KPlan plan_k(int64_t B, int64_t tiles, int sms, int64_t k_block) {
    int64_t kmax = k_block > 0 ? k_block : kDefaultKBlock;
    kmax = kmax / kBK * kBK;
    if (kmax < kBK) kmax = kBK;
    int64_t splits = (B + kmax - 1) / kmax;
    const int64_t want = 2 * int64_t(sms);
    if (tiles * splits < want) {
        int64_t more = (want + tiles - 1) / tiles;
        const int64_t cap = B / 4096 > 1 ? B / 4096 : 1;
        if (more > cap) more = cap;
        if (more > splits) splits = more;
    }
    int64_t k_chunk = ((B + splits - 1) / splits + kBK - 1) / kBK * kBK;
    if (k_chunk > kmax) k_chunk = kmax;
    return KPlan{k_chunk, (B + k_chunk - 1) / k_chunk};
}

}  // namespace u8syrk
}  // namespace analytic_diffusion
