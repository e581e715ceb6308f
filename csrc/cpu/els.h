// CPU kernel of the "els_denoise" op: the equivariant local score machine of Kamb & Ganguli,
// circular (ELS) or zero-padded (bbELS, LS for P >= H, W) (docs/algorithms.md §10, docs/algorithms.md §10).
//
// Plain C++ (no pybind11, no libtorch): module.cpp binds it, owns the Python objects and
// releases the GIL around the kernel.
#pragma once

#include <cstdint>

namespace analytic_diffusion {

// Writes the exact float64 online-softmax state of every query pixel over all its candidate
// patches in all N training images: mx [B, H, W] (a reference logit: a counted logit at most
// the max and within kElsLazyLogit of it, see els.cpp), l [B, H, W]
// (sum of exp(logit - mx)) and acc [B, C, H, W] (sum of exp(logit - mx) * centre pixel);
// the denoised image is acc / l. Every output element is written.
void els_denoise_run(
    uintptr_t x_ptr,      // float64 [B, C, H, W], contiguous
    int64_t B,            // queries, >= 1
    int64_t C,            // channels, >= 1
    int64_t H,            // image height, >= 1
    int64_t W,            // image width, >= 1
    uintptr_t train_ptr,  // training images [N, C, H, W], element (k, c, r, s) at
                          // k*ts0 + c*ts1 + r*ts2 + s*ts3
    int64_t N,            // training images, >= 1
    int64_t ts0, int64_t ts1, int64_t ts2, int64_t ts3,  // train strides in elements (>= 0)
    int train_kind,       // 0: uint8 (u -> (u - 127.5) / 127.5), 1: float32, 2: float64
    int64_t P,            // patch size, odd >= 1 (circular: P <= min(H, W))
    bool circular,        // true: ELS (x wraps around), false: bbELS (zero padding)
    double a,             // sqrt(alpha_bar)
    double scale,         // 1 / (2 * (1 - alpha_bar) * temperature): logit = -d * scale
    uintptr_t mx_ptr,     // float64 [B, H, W] out
    uintptr_t l_ptr,      // float64 [B, H, W] out
    uintptr_t acc_ptr     // float64 [B, C, H, W] out
);

// A candidate whose logit is more than this below its lane's reference (a counted logit) contributes
// less than exp(-50) = 1.9e-22 of that counted term: the kernel skips its exponential when a
// whole vector of candidates is that far below (see els.cpp for the bound on the result).
constexpr double kElsSkipLogit = 50.0;

// The kernel's state keeps a reference logit per lane within this of the lane's running max
// (never above it): terms are exp(logit - reference) <= e^30 = 1.1e13, far from overflow for
// any N, and the state is rescaled only when a logit exceeds the reference by more than this.
constexpr double kElsLazyLogit = 30.0;

}  // namespace analytic_diffusion
