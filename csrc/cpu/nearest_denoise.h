// CPU kernel of the "nearest_denoise" op (docs/algorithms.md §6): out = y_{k*}, k* = argmin_k ||x - a y_k||^2.
//
// Plain C++ (no pybind11, no libtorch), like locality_denoise.h: module.cpp binds it and
// releases the GIL around it.
#pragma once

#include <cstdint>

namespace analytic_diffusion {

// The nearest training image of every query, with the optimal denoiser's float64
// direct-difference distances (locality_denoise.cpp's full_distances_kernel). Ties go to the
// lowest index, like torch.argmin, whatever the thread count: the training set is cut into
// contiguous units of whole 8-image blocks, each unit keeps its first minimum, and the units
// are reduced in index order with a strict comparison. An image's distance depends only on
// its values, so duplicate images tie exactly.
// Outputs (any may be 0 = not wanted):
//   out   [B, n] contiguous, float64 if out_is_double else float32: y_{k*} in [-1, 1]
//         (uint8 as u / 127.5 - 1 correctly rounded in the output's precision)
//   index [B] int64: k*
//   dist  [B] float64: ||x_b - a y_{k*}||^2
void nearest_denoise_run(
    uintptr_t x_ptr,      // queries [B, n], float32 or float64, element (b, j) at b*xs0 + j*xs1
    int64_t B,            // queries, >= 1
    int64_t n,            // pixels per image, >= 1
    int64_t xs0,          // x row stride in elements (>= 0)
    int64_t xs1,          // x column stride in elements (>= 0)
    bool x_is_double,     // x dtype: float64 (true) or float32
    uintptr_t train_ptr,  // training images [N, n], element (k, j) at k*ts0 + j*ts1
    int64_t N,            // training images, >= 1
    int64_t ts0,          // train row stride in elements (>= 0)
    int64_t ts1,          // train column stride in elements (>= 0)
    int train_kind,       // 0: uint8 (u / 127.5 - 1), 1: float32, 2: float64 (in [-1, 1])
    double a,             // sqrt(alpha_bar), > 0
    uintptr_t out_ptr,    // see above
    bool out_is_double,
    uintptr_t index_ptr,  // see above
    uintptr_t dist_ptr,   // see above
    bool force_portable   // true: plain C++ distances even where the AVX-512 ones run
);

}  // namespace analytic_diffusion
