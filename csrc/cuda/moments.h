// Entry points of csrc/cuda/moments.cu, bound in module.cu. Plain C++ (no pybind11, no
// CUDA types), so the kernels' translation unit stays independent of the bindings.
#pragma once

#include <cstdint>

namespace analytic_diffusion {

// Exact uint8 moment sums of one batch, added in place (the "moments" backend contract):
//   s1[i]       += sum_k x[k, i]
//   s2[i*n + j] += sum_k x[k, i] * x[k, j]      for j <= i (entries above the diagonal
//                                               are not touched)
// Asynchronous on `stream`; throws std::invalid_argument for bad arguments and
// std::runtime_error for CUDA errors (launch failures are checked, execution errors
// surface at the caller's next synchronisation).
void u8_syrk_update(
    uintptr_t x_ptr,    // device address of x[0, 0]: uint8 [B, n], element strides below
    int64_t B,          // images in the batch (rows of x), >= 0
    int64_t n,          // values per image (columns of x), >= 0
    int64_t stride0,    // x row stride in elements, >= 0 (0 = one image repeated)
    int64_t stride1,    // x column stride in elements, >= 0
    uintptr_t s1_ptr,   // device address: int64 [n], contiguous
    uintptr_t s2_ptr,   // device address: int64 [n, n], contiguous row-major
    uintptr_t ws_ptr,   // device address: int64 [n] scratch (this batch's column sums),
                        // overwritten; unused (may be 0) when use_mma is false
    uintptr_t stream,   // cudaStream_t to launch on (0 = legacy default stream); x, s1,
                        // s2 and ws must live on the current device
    int64_t k_block,    // most images one int32 accumulator covers before it is flushed
                        // to int64: 0 = default (65536); else 1..131071, rounded down to a
                        // multiple of 64 (at least 64). Small values exist to test the flush.
    bool use_mma        // true: int8 tensor-core kernel; false: plain int64 loops (slow,
                        // obviously exact; the tests' cross-check)
);

}  // namespace analytic_diffusion
