// CPU kernel of "nearest_denoise" (docs/algorithms.md §6): the optimal denoiser's distances with an argmin
// in place of the softmax.
//
// Work: B * N * n fused multiply-adds, like optimal_denoise's distances (which this shares,
// bit for bit: full_distances_kernel in locality_denoise.cpp), and no weighted sums. Per
// thread, per block of 8 training images: convert the block to float64 once (Ys [8][n],
// uint8 through a table of the exact values of docs/algorithms.md §1.1), then the distances of every query to it.
// The training set is split into contiguous units of whole blocks (a few per thread, dynamic
// schedule: a preempted thread does not hold up the others); each unit keeps per query its
// first minimum, and the units are reduced in index order with a strict `<`, so the lowest
// index wins every tie whatever the thread count or schedule.

#include "nearest_denoise.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>
#include <stdexcept>
#include <vector>

#include "../common/convert.h"
#include "../common/cpu_runtime.h"
#include "locality_denoise.h"

namespace analytic_diffusion {
namespace {

using cpu_runtime::aligned_array;
using cpu_runtime::FreeDeleter;
using cpu_runtime::team_size;
using cpu_runtime::thread_index;

using cpu_runtime::ceil_div;

// Units per thread: enough that a thread the OS preempts (the machine is often shared) leaves
// work to the others, few enough that the per-unit state stays negligible.
constexpr int64_t kUnitsPerThread = 4;

// y_k as the output dtype: uint8 goes through the conversion of docs/algorithms.md §1.1 in that precision (what
// the reference's to_unit(train[k], x.dtype) computes), floats are converted by rounding.
template <typename O>
void write_row(O* out,               // [n] out: image k in [-1, 1], float32 or float64
               uintptr_t train_ptr,  // training images [N, n], element (k, j) at k*ts0 + j*ts1
               int train_kind,       // 0: uint8, 1: float32, 2: float64
               int64_t k,            // the image to copy, 0 <= k < N
               int64_t n,            // pixels per image
               int64_t ts0,          // train row stride in elements
               int64_t ts1           // train column stride in elements
) {
    if (train_kind == 0) {
        const auto* r = reinterpret_cast<const uint8_t*>(train_ptr) + k * ts0;
        for (int64_t j = 0; j < n; ++j) out[j] = dequantize_u8_value<O>(r[j * ts1]);
    } else if (train_kind == 1) {
        const auto* r = reinterpret_cast<const float*>(train_ptr) + k * ts0;
        for (int64_t j = 0; j < n; ++j) out[j] = static_cast<O>(r[j * ts1]);
    } else {
        const auto* r = reinterpret_cast<const double*>(train_ptr) + k * ts0;
        for (int64_t j = 0; j < n; ++j) out[j] = static_cast<O>(r[j * ts1]);
    }
}

}  // namespace

void nearest_denoise_run(uintptr_t x_ptr, int64_t B, int64_t n, int64_t xs0, int64_t xs1,
                         bool x_is_double, uintptr_t train_ptr, int64_t N, int64_t ts0,
                         int64_t ts1, int train_kind, double a, uintptr_t out_ptr,
                         bool out_is_double, uintptr_t index_ptr, uintptr_t dist_ptr,
                         bool force_portable) {
    if (B < 1 || N < 1 || n < 1)
        throw std::invalid_argument("nearest_denoise_run: need B >= 1, N >= 1 and n >= 1");
    if (x_ptr == 0 || train_ptr == 0) throw std::invalid_argument("nearest_denoise_run: null input");
    if (xs0 < 0 || xs1 < 0 || ts0 < 0 || ts1 < 0)
        throw std::invalid_argument("nearest_denoise_run: negative stride");
    if (train_kind < 0 || train_kind > 2) throw std::invalid_argument("nearest_denoise_run: bad train_kind");
    if (!(a > 0.0) || !std::isfinite(a))
        throw std::invalid_argument("nearest_denoise_run: a must be positive and finite");

    const FullDistancesFn distances = full_distances_kernel(force_portable);
    constexpr int64_t kB = kLdLanes;  // images per block

    // queries as contiguous float64 (small: B * n)
    auto xd = aligned_array<double>(B * n);
    for (int64_t b = 0; b < B; ++b)
        for (int64_t j = 0; j < n; ++j)
            xd[b * n + j] = x_is_double ? reinterpret_cast<const double*>(x_ptr)[b * xs0 + j * xs1]
                                        : static_cast<double>(reinterpret_cast<const float*>(x_ptr)[b * xs0 + j * xs1]);
    double lut[256];
    for (int u = 0; u < 256; ++u) lut[u] = dequantize_u8_value<double>(static_cast<uint8_t>(u));

    const int nt = team_size();
    const int64_t nblk = ceil_div(N, kB);
    const int64_t nunits = std::min<int64_t>(nblk, kUnitsPerThread * nt);
    // per unit and query: its first minimum (distance, index)
    std::vector<double> ubest(static_cast<size_t>(nunits * B), std::numeric_limits<double>::infinity());
    std::vector<int64_t> uarg(static_cast<size_t>(nunits * B), -1);
    // per thread: Ys [8][n] and the block's distances [8] (allocated here, not in the region,
    // so an allocation failure throws in the calling thread)
    const int64_t scratch_len = kB * n + kB;
    std::vector<std::unique_ptr<double[], FreeDeleter>> scratch;
    const int team = static_cast<int>(std::min<int64_t>(nt, nunits));
    for (int t = 0; t < team; ++t) scratch.push_back(aligned_array<double>(scratch_len));

#if defined(_OPENMP)
#pragma omp parallel for schedule(dynamic, 1) num_threads(team) if (team > 1)
#endif
    for (int64_t u = 0; u < nunits; ++u) {
        double* Ys = scratch[thread_index()].get();
        double* d = Ys + kB * n;
        double* best = ubest.data() + u * B;
        int64_t* arg = uarg.data() + u * B;
        const int64_t lo = (nblk * u / nunits) * kB;
        const int64_t hi = std::min(N, (nblk * (u + 1) / nunits) * kB);
        for (int64_t k0 = lo; k0 < hi; k0 += kB) {
            const int nvalid = static_cast<int>(std::min<int64_t>(kB, hi - k0));
            fill_block_rows(Ys, train_ptr, train_kind, k0, nvalid, n, ts0, ts1, lut);
            for (int64_t b = 0; b < B; ++b) {
                distances(xd.get() + b * n, Ys, n, a, d);
                for (int q = 0; q < nvalid; ++q) {
                    // strict: the earlier image keeps a tie; the first image always seeds the
                    // unit's state (so the index is valid even for non-finite distances)
                    if (d[q] < best[b] || arg[b] < 0) {
                        best[b] = d[q];
                        arg[b] = k0 + q;
                    }
                }
            }
        }
    }

    auto* out_d = reinterpret_cast<double*>(out_ptr);
    auto* out_f = reinterpret_cast<float*>(out_ptr);
    auto* index_out = reinterpret_cast<int64_t*>(index_ptr);
    auto* dist_out = reinterpret_cast<double*>(dist_ptr);
    for (int64_t b = 0; b < B; ++b) {
        // units in index order, strict comparison: the lowest index wins ties
        double bd = ubest[b];
        int64_t bk = uarg[b];
        for (int64_t u = 1; u < nunits; ++u) {
            if (ubest[u * B + b] < bd) {
                bd = ubest[u * B + b];
                bk = uarg[u * B + b];
            }
        }
        if (index_out) index_out[b] = bk;
        if (dist_out) dist_out[b] = bd;
        if (out_ptr) {
            if (out_is_double)
                write_row(out_d + b * n, train_ptr, train_kind, bk, n, ts0, ts1);
            else
                write_row(out_f + b * n, train_ptr, train_kind, bk, n, ts0, ts1);
        }
    }
}

}  // namespace analytic_diffusion
