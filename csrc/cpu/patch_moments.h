// CPU kernels of the "patch_moments" op (docs/algorithms.md §2, patch moments; docs/patch_moments.md):
// lag-product rectangle sums, from which both the k x k patch sums and the stationary
// (all-offsets) lag sums are read off without unfolding a single patch.
//
// Plain C++ (no pybind11, no libtorch); module.cpp binds it and releases the GIL.
#pragma once

#include <cstdint>

namespace analytic_diffusion {

// Largest number of images whose int32 lag products are summed before the flush to int64.
// One int32 lane adds, per image, s * u with s = u(q) - 128 in [-128, 127] and u = u(q + e)
// in [0, 255]: |s * u| <= 128 * 255 = 32640, and 16384 * 32640 = 534773760 < 2^31 - 1, so
// no partial sum over a block can wrap (a 4x margin).
constexpr int64_t kLagMaxBlockImages = 16384;

// Element types of x.
constexpr int kLagU8 = 0;
constexpr int kLagF32 = 1;
constexpr int kLagF64 = 2;

// For every lag e = (di, dj), di in [0, Li], dj in [-Lj, Lj] (for di = 0 only dj >= 0 is
// computed; the rest are transposes and are left untouched), every channel pair (c, c') and
// every rectangle top-left corner (i, j), i in [0, nh), j in [0, nw), of an oh x ow rectangle:
//
//   T[di][dj + Lj][c][c'][i][j] += sum_b sum_{q in rect(i, j)} z[b, c, q] * z[b, c', q + e]
//
// where z[b, c', q + e] is 0 when q + e lies outside the image (the rectangle itself must lie
// inside: i + oh <= H, j + ow <= W), and z = x for uint8 x (sums exact, int64) or z = x - shift[c]
// in float64 for float x. Also S1[c][h][w] += sum_b z[b, c, h, w] (per-pixel sums).
//
// Patch sums of k x k windows: Li = Lj = k - 1, nh = nw = k, oh = H - k + 1, ow = W - k + 1.
// Stationary lag sums over the whole image: Li = H - 1, Lj = W - 1, nh = nw = 1, oh = H, ow = W.
// uint8 results are exact integers, independent of how the images are split into calls,
// of their order and of the thread count.
void lag_rect_sums(
    uintptr_t x_ptr,      // address of x[0, 0, 0, 0]: [B, C, H, W] of the given dtype
    int dtype,            // kLagU8, kLagF32 or kLagF64
    int64_t B, int64_t C, int64_t H, int64_t W,  // sizes, all >= 0 (C, H, W >= 1 if B > 0)
    int64_t st0, int64_t st1, int64_t st2, int64_t st3,  // x strides in elements (any values)
    uintptr_t shift_ptr,  // float64 [C] subtracted per channel from float x; ignored (may be 0) for uint8
    int64_t Li, int64_t Lj,  // largest row lag (>= 0, < H) and column lag (>= 0, < W)
    int64_t nh, int64_t nw,  // rectangle corners per axis, >= 1
    int64_t oh, int64_t ow,  // rectangle size, >= 1, with nh - 1 + oh <= H, nw - 1 + ow <= W
    uintptr_t T_ptr,      // int64 (uint8 x) or float64 [Li+1][2Lj+1][C][C][nh][nw], contiguous, accumulated
    uintptr_t S1_ptr,     // int64 (uint8 x) or float64 [C][H][W], contiguous, accumulated
    bool force_portable,  // true: plain C++ micro-kernels even where the AVX-512 ones run
    int64_t block_images  // images per packed block (0 = automatic; uint8: at most kLagMaxBlockImages)
);

// True when uint8 lag sums run the AVX-512 VNNI micro-kernel on this CPU.
bool lag_sums_has_vnni();

}  // namespace analytic_diffusion
