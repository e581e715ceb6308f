// Certified pruning bound for uint8 training sets (docs/algorithms.md §14.1, "integer bound"):
// lower bounds L[b, k] <= ||x_b - a y_k||^2 from exact integer dot products of the uint8 images
// with int8-quantised queries, an upper bound U[b] on each query's smallest distance, and the
// survivors L[b, k] <= U[b] + margin as CSR lists (ascending per query).
//
// Plain C++ (no pybind11, no libtorch), like locality_denoise.h: module.cpp binds it and
// releases the GIL around it.
#pragma once

#include <cstdint>

namespace analytic_diffusion {

// Query b is x_b = sum_l s[b, l] q[l*B + b, :] + r_b exactly (ops/pruning.py quantises it), with
// q int8 and r_b the last level's residual. Training image k is y_k = (u_k - 127.5) / 127.5.
// Per pair the kernel computes D_l = sum_j q[l*B + b, j] u_k[j] exactly (int32 lanes, VNNI
// vpdpbusd where the CPU has it), then
//   est = x2_b - 2a/127.5 sum_l s_l (D_l - 127.5 Q_l) + a^2 y2_k
//   err = 2a/127.5 min(rn_b ucn_k, rmax_b uc1_k) (1 + 2^-40) + 2 (4n + 64) 2^-53 (xn_b + a yn_k)^2
//   L   = est - err,   U = min(min_k (est + err), min_c (fl(d_c) + (4n + 64) 2^-53 (xn_b + a yn_c)^2))
// over the `candidates` images c with the smallest est (fl(d_c) float64 direct differences).
// Returns the number of survivors (sum over queries).
int64_t prune_bound_u8(
    uintptr_t q_ptr,        // int8 [R, n] contiguous, R = levels * B rounded up to a multiple of 4 (zero rows)
    int64_t B,              // queries, >= 1
    int64_t levels,         // quantisation levels, >= 1
    int64_t n,              // pixels per image, >= 1
    uintptr_t x_ptr,        // float64 [B, n] contiguous: the queries (candidates' exact distances)
    uintptr_t qpar_ptr,     // float64 [B, 4 + 2 levels]: x2, xn, rn, rmax, s_0..s_{L-1}, Q_0..Q_{L-1}
    uintptr_t train_ptr,    // uint8 [N, n], row k at k * ts0, pixels contiguous
    int64_t N,              // training images, >= 1
    int64_t ts0,            // row stride in bytes (>= n)
    uintptr_t y2_ptr,       // float64 [N]: ||y_k||^2
    uintptr_t yn_ptr,       // float64 [N]: ||y_k|| (rounded up)
    uintptr_t ucn_ptr,      // float64 [N]: ||u_k - 127.5||_2 (rounded up)
    uintptr_t uc1_ptr,      // float64 [N]: ||u_k - 127.5||_1 (exact)
    double a,               // sqrt(alpha_bar) > 0
    double margin,          // >= 0: kept when L <= U + margin
    int64_t candidates,     // >= 1
    uintptr_t lower_ptr,    // float64 [B, N] out: L
    uintptr_t upper_ptr,    // float64 [B] out: U (0 = not wanted)
    uintptr_t offsets_ptr,  // int64 [B + 1] out
    uintptr_t index_ptr,    // int64 [B * N] out: the first offsets[B] entries are written
    bool force_portable);   // plain C++ dot products instead of AMX / VNNI

// Whether prune_bound_u8 uses the AVX-512 VNNI dot products on this CPU.
bool prune_bound_has_vnni();
// Whether it uses AMX-INT8 tiles (CPUID, XCR0 and the Linux tile-state grant).
bool prune_bound_has_amx();

}  // namespace analytic_diffusion
