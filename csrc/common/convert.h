// Element conversions shared by every backend (see docs/algorithms.md §1).
#pragma once

#include <cstdint>

#include "macros.h"

namespace analytic_diffusion {

// uint8 pixel -> [-1, 1] float, the docs/algorithms.md §1.1 mapping u / 127.5 - 1, computed as
// (u - 127.5) / 127.5: the subtraction is exact (a half-integer), so the single
// division gives the correctly rounded result in either precision. The Python side
// (_validate.to_unit) uses the same formula, so every backend sees identical inputs;
// u / 127.5 - 1 would round twice and differ in the last bit for half the values.
// On the device, explicit round-to-nearest intrinsics stop nvcc from contracting or
// approximating (e.g. under --use_fast_math), which would break the CPU/GPU identity.
template <typename T>
AD_HOST_DEVICE AD_FORCEINLINE T dequantize_u8_value(uint8_t u);

template <>
AD_HOST_DEVICE AD_FORCEINLINE float dequantize_u8_value<float>(uint8_t u) {
#if defined(__CUDA_ARCH__)
    return __fdiv_rn(__fsub_rn(static_cast<float>(u), 127.5f), 127.5f);
#else
    return (static_cast<float>(u) - 127.5f) / 127.5f;
#endif
}

template <>
AD_HOST_DEVICE AD_FORCEINLINE double dequantize_u8_value<double>(uint8_t u) {
#if defined(__CUDA_ARCH__)
    return __ddiv_rn(__dsub_rn(static_cast<double>(u), 127.5), 127.5);
#else
    return (static_cast<double>(u) - 127.5) / 127.5;
#endif
}

}  // namespace analytic_diffusion
