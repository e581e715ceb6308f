// CPU kernel of the "windowed_locality_denoise" op (docs/algorithms.md §9 with docs/algorithms.md §5): the locality
// denoiser whose window is one translation-invariant [C, C, k, k] pattern cut at the
// image border. Nothing n x n is ever formed.
//
// Plain C++ (no pybind11, no libtorch), like locality_denoise.h: module.cpp binds it and
// releases the GIL around the kernel.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace analytic_diffusion {

// Training images per softmax chunk: every (query, image, pixel) logit costs one exp, plus
// one rescaling exp per (query, pixel) per chunk, i.e. (K + 1) / K exps per logit.
constexpr int64_t kWlChunk = 8;

// What the plan chose for one call (for tests, benchmarks and the docs).
struct WindowedStats {
    bool transposed = false;      // rows and columns swapped (column runs became row runs)
    bool avx512 = false;          // the AVX-512 copy of the kernel ran
    bool box = false;             // the full-box path ran (every window entry set: distances and softmax row by row)
    int64_t groups = 0;           // distinct output-channel windows (channels sharing one distance)
    int64_t terms = 0;            // plane loads per output pixel, summed over the groups
    int64_t area = 0;             // window size summed over the output channels (the dense method's adds)
    int64_t planes = 0;           // per (query, image) planes: squared differences, channel sums, prefix sums
    int64_t integral_planes = 0;  // of which 2-D integral images
    int64_t units = 0;            // parallel work units (query range x training block), merged in order
    double cost = 0.0;            // the plan's estimated vector operations per 8 pixels
    int64_t softmax_vectors = 0;  // (query, image, group, 8 pixels) softmax updates considered
    int64_t skipped_vectors = 0;  // of which skipped: every lane's logit below the reference - skip_logit
    int64_t warm_images = 0;      // (query, image) pairs run once more to start the running max (0: off)
    // time spent (summed over threads) in the main pass's phases: image loading (uint8 ->
    // float64, and the lane-block copies where the plan uses them), distances (squared
    // differences, planes, window sums) and softmax updates
    double load_seconds = 0.0, distance_seconds = 0.0, softmax_seconds = 0.0;
    std::string plan;             // human-readable plan, one line per group
};

// d[b, k, c, p] = sum_{c', o : W[c, c', o], p + o inside} (x[b, c', p + o] - a y[k, c', p + o])^2,
// logits -d * scale, softmax over the N training images per (b, c, p), out = sum_k w y[k, c, p].
//
// Strides are in elements; every index is (b or k, c, h, w). All float maths in float64.
// chunk = 0: exact online softmax over all N; chunk > 0: WSSM, the mean of per-chunk softmax
// means over consecutive chunks of `chunk` images (out = sum of means / (nchunks + 1e-8)).
// Outputs (0 = not wanted; states only in exact mode), each contiguous [B, C*H*W]:
//   out          float64 if out_is_double else float32
//   mx, l, acc   float64: running max of the logits, sum of exp(logit - mx), and
//                sum of exp(logit - mx) * y per (query, pixel)
// `options`: bit 0 forbids the transposed orientation, bit 1 forbids 2-D integral images,
// bit 2 forbids box-minus-holes decompositions, bit 3 forces the transposed orientation
// (tests use them to run every code path); 0 = let the planner choose.
// Certified pruning (docs/algorithms.md §14.6): an (image, 8 pixels, group) softmax update
// is skipped when every lane's logit is below the running max minus `skip_logit` (> 0; the
// caller passes 64 ln 2 + ln N, so all skipped weights together are below 2^-64 of the
// largest; 690 skips only weights that underflow). `warm_start` (exact mode only): before the
// main pass each query's running max starts at the exact logits of a few training images
// chosen by a cheap subsampled distance (per 16 x 16 region and over the whole image), so
// that the bound bites from the first image on; the maximum stays a computed logit.
WindowedStats windowed_locality_run(
    uintptr_t x_ptr,       // queries x [B, C, H, W], float32 or float64
    int64_t B, int64_t C, int64_t H, int64_t W,  // sizes, all >= 1
    int64_t xs0, int64_t xs1, int64_t xs2, int64_t xs3,  // x strides
    bool x_is_double,      // x dtype: float64 (true) or float32
    uintptr_t train_ptr,   // training images [N, C, H, W]: uint8 (u / 127.5 - 1) or float in [-1, 1]
    int64_t N,             // training images, >= 1
    int64_t ts0, int64_t ts1, int64_t ts2, int64_t ts3,  // train strides
    int train_kind,        // 0: uint8, 1: float32, 2: float64
    uintptr_t window_ptr,  // window [C, C, k, k] bool/uint8 (output channel, input channel, row, column)
    int64_t k,             // window size, odd, <= 2 * max(H, W) - 1
    int64_t ws0, int64_t ws1, int64_t ws2, int64_t ws3,  // window strides
    double a,              // sqrt(alpha_bar)
    double scale,          // 1 / (2 (1 - alpha_bar) temperature): logit = -d * scale
    int64_t chunk,         // 0: exact; > 0: WSSM chunk size
    uintptr_t out_ptr,     // [B, C*H*W] denoised images, or 0
    bool out_is_double,    // out dtype: float64 (true) or float32
    uintptr_t mx_ptr,      // [B, C*H*W] float64 or 0
    uintptr_t l_ptr,       // [B, C*H*W] float64 or 0
    uintptr_t acc_ptr,     // [B, C*H*W] float64 or 0
    int64_t options,       // planner restrictions, see above (0 = free choice)
    bool force_portable,   // true: the plain C++ copy even where AVX-512 runs
    double skip_logit,     // > 0: pruning margin in logits (see above)
    bool warm_start        // start the running max from candidate images (exact mode)
);

// The plan alone (no images needed) for inspection: same window arguments as above, plus
// the image size. `scale` and `emax` (a bound on the squared differences) decide which
// prefix-sum planes are precise enough.
WindowedStats windowed_locality_plan(
    uintptr_t window_ptr, int64_t C, int64_t k,
    int64_t ws0, int64_t ws1, int64_t ws2, int64_t ws3,  // window [C, C, k, k] and its strides
    int64_t H, int64_t W,  // image size
    double scale, double emax, int64_t options);

bool windowed_locality_has_avx512();

}  // namespace analytic_diffusion
