// CPU kernels of the "moments" op (docs/algorithms.md §2): streaming lower-triangle SYRK updates.
//
// Plain C++ (no pybind11, no libtorch) so a standalone harness can link moments.cpp
// directly; module.cpp binds these and releases the GIL around them.
#pragma once

#include <cstdint>

namespace analytic_diffusion {

// Largest number of images summed in one int32 accumulator before the flush to int64.
// Each int32 lane adds products s * u with s = u' - 128 in [-128, 127] and u in [0, 255],
// so |s * u| <= 128 * 255 = 32640, and 65536 * 32640 = 2139095040 < 2^31 - 1: neither the
// total nor any partial sum over a chunk can wrap.
constexpr int64_t kU8MaxChunkRows = 65536;

// s1 += column sums of x; lower triangle (j <= i) of s2 += x^T x, exactly, for uint8 x.
// Bitwise independent of how the images are split into calls or ordered.
void u8_syrk_update(
    uintptr_t x_ptr,      // address of x[0, 0]: uint8 [B, n], element (k, c) at k*stride0 + c*stride1
    int64_t B,            // images in this batch (rows of x), >= 0
    int64_t n,            // values per image (columns of x), >= 0
    int64_t stride0,      // x row stride in elements (any value, 0 = broadcast)
    int64_t stride1,      // x column stride in elements (any value)
    uintptr_t s1_ptr,     // int64 [n], contiguous: running column sums
    uintptr_t s2_ptr,     // int64 [n, n], row-major contiguous: running sums, only j <= i touched
    bool force_portable,  // true: plain C++ micro-kernel even when the VNNI one was compiled
    int64_t chunk_rows    // images per int32 accumulation chunk; 0 = default, at most kU8MaxChunkRows
);

// z = x - ref in float64; s1 += column sums of z; lower triangle of s2 += z^T z.
void f64_syrk_update(
    uintptr_t x_ptr,    // address of x[0, 0]: float32 or float64 [B, n], strides in elements
    int64_t B,          // rows of x, >= 0
    int64_t n,          // columns of x, >= 0
    int64_t stride0,    // x row stride in elements
    int64_t stride1,    // x column stride in elements
    bool x_is_double,   // true: x is float64, false: float32
    uintptr_t ref_ptr,  // float64 [n], contiguous: the shift subtracted from every row
    uintptr_t s1_ptr,   // float64 [n], contiguous: running sums of z
    uintptr_t s2_ptr,   // float64 [n, n], row-major contiguous: only j <= i touched
    bool force_portable // true: plain C++ micro-kernel even where the AVX-512 one runs
);

// Mean and unbiased covariance, in [-1, 1] units, from exact uint8 sums over N images,
// bit-identical to MomentAccumulator.result() (same operations, same order), both halves
// of cov written.
void u8_moments_finalize(
    int64_t N,            // images summed, >= 2
    int64_t n,            // values per image
    uintptr_t s1_ptr,     // int64 [n]: sum of u
    uintptr_t s2_ptr,     // int64 [n, n] row-major: sum of u u^T, only j <= i read
    uintptr_t mean_ptr,   // float64 [n] out
    uintptr_t cov_ptr     // float64 [n, n] row-major out
);

// True when u8_syrk_update runs the AVX-512 VNNI micro-kernel (compiled in and supported by
// this CPU) unless force_portable; false means every call runs the portable micro-kernel.
bool u8_syrk_has_vnni();

}  // namespace analytic_diffusion
