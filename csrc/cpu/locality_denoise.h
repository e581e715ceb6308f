// CPU kernels of the "locality_denoise" and "optimal_denoise" ops (docs/algorithms.md §5 and §6).
//
// Plain C++ (no pybind11, no libtorch), like moments.h: module.cpp binds these, owns the
// Python objects and releases the GIL around the kernel.
#pragma once

#include <cstdint>
#include <vector>

namespace analytic_diffusion {

// Images per lane block: one zmm of float64. The plan's term encoding (byte offsets into a
// buffer of 8-double rows) depends on it, so plans are only valid for kernels built with it.
constexpr int64_t kLdLanes = 8;

// A per-mask work plan, built once per mask and reused for every call with that mask.
//
// Groups: output pixels with identical windows (mask columns) share one distance per
// (query, training image), so distances are computed per group, not per pixel.
//
// Distances: the pixels are cut into segments of S consecutive indices. Per segment the
// kernel fills L = [e_0 .. e_{S-1} | P_0 .. P_S | -P_0 .. -P_S], rows of kLdLanes doubles
// (e: squared differences, P: their prefix sums), and every term is a plain add of one row:
// a run [p, q) of window pixels is P_q + (-P)_p whatever its length, a lone pixel e_p. A
// group's distance is either computed directly (parent -1) or as its parent's distance plus
// the runs it adds minus the runs it drops (a dropped run is (-P)_q + P_p): parents come
// from a minimum spanning tree over the groups plus a virtual empty root. Groups are
// listed parent-before-child in resolve_order, so d[g] = delta[g] + d[parent[g]] resolves in
// one pass over it.
//
// Softmax state is kept per "slot": slots are the pixels sorted by group (group_pixels), so
// a group's pixels are the contiguous slots [group_offsets[g], group_offsets[g+1]).
// Groups [0, singletons) have one pixel each; the kernel updates them eight at a time.
//
// Packets: the adds of one (segment, group) are cut into packets of kLdPacket row offsets
// (padded with P_0, a zero row), so the kernel's inner loop has no data-dependent branch.
// Packet i of segment s (i in [seg_packet_off[s], seg_packet_off[s+1])) holds byte offsets
// packet_rows[i*kLdPacket ...] into L and its group packet_group[i] & kLdGroupMask; bit
// kLdFirstBit marks the group's first packet of the pass (store instead of add).
struct LocalityPlan {
    int64_t n = 0;     // pixels per image
    int64_t S = 0;     // segment length (pixels)
    int64_t nseg = 0;  // ceil(n / S)
    int64_t G = 0;     // groups (distinct windows)
    bool tree = false; // whether any group has a parent
    bool full = false; // one group whose window is every pixel (the optimal denoiser)

    int64_t singletons = 0;  // groups [0, singletons) have exactly one pixel

    std::vector<int32_t> group_of_pixel;   // [n]
    std::vector<int32_t> group_offsets;    // [G + 1] into group_pixels (slots)
    std::vector<int32_t> group_pixels;     // [n] pixel of each slot, ascending within a group
    std::vector<int32_t> parent;           // [G] -1: computed directly
    std::vector<int32_t> resolve_order;    // groups with a parent, each after its parent
    std::vector<uint32_t> seg_packet_off;  // [nseg + 1]
    std::vector<uint16_t> packet_rows;     // [num packets * kLdPacket] byte offsets into L
    std::vector<uint32_t> packet_group;    // [num packets]

    // statistics, per (query, training image)
    int64_t area = 0;            // sum of window sizes over all pixels: the dense method's adds
    int64_t lookups = 0;         // row adds this plan does, padding excluded
    int64_t padded_lookups = 0;  // row adds including packet padding
    int64_t direct_lookups = 0;  // lookups with every group computed directly (no tree)
    int64_t max_depth = 0;       // longest parent chain
    int64_t max_window = 0;      // largest window (pixels)
    double build_seconds = 0.0;
};

constexpr int64_t kLdPacket = 8;
constexpr uint32_t kLdFirstBit = 31;
constexpr uint32_t kLdGroupMask = (1u << kLdFirstBit) - 1u;

// Builds the plan of a bool mask: column m (mask[j, m] over j) is the window of output pixel
// m. `segment` = 0 picks the default (168: L of a segment fills 32 KiB, inside L1d);
// use_tree = false computes every group directly (no spanning tree).
LocalityPlan locality_plan_build(
    uintptr_t mask_ptr,  // address of mask[0, 0]: bool/uint8 [n, n], element (j, m) at j*s0 + m*s1
    int64_t n,           // pixels per image, >= 1
    int64_t s0,          // mask row stride in elements
    int64_t s1,          // mask column stride in elements
    int64_t segment,     // segment length S, 0 = default; at most 340 (16-bit offsets)
    bool use_tree        // build the spanning tree (false: every group direct)
);

// The plan of the all-ones mask: one group, every pixel (the optimal denoiser, docs/algorithms.md §6).
LocalityPlan locality_plan_full(int64_t n, int64_t segment);

// Softmax-weighted denoising with a plan (docs/algorithms.md §5; §6 with the full plan). Logits and the
// softmax state are float64 whatever the input dtypes; distances are float64 too, except
// where allow_fixed permits and the error bound below holds: then each squared difference,
// less a per-pixel shift every image shares (min over y in [-1, 1], invisible to the
// softmax), is rounded to a multiple of 1/f with f the largest scale for which no window sum
// reaches 2^32, and windows are summed exactly in uint32 lanes, 16 images per vector (twice
// the float64 rate). The logit error this allows is about sqrt(max window / 12) * scale / f,
// used only when <= kLdFixedMaxLogitError (output error then measured below 1e-5 relative:
// meant for float32 queries, not for float64 ones or for states, whose max would be shifted).
// Returns whether the fixed-point path ran.
//
// chunk = 0: exact mode, one online softmax over all N images. chunk > 0: WSSM, the mean
// of per-chunk softmax means over consecutive chunks of `chunk` images.
// Outputs (any may be 0 = not wanted; state outputs only in exact mode):
//   out   [B, n] contiguous, float64 if out_is_double else float32: the denoised images
//   mx, l [B, G] float64: per (query, group) running max of the logits and sum of
//         exp(logit - mx) (every pixel of a group shares them)
//   acc   [B, n] float64: sum of exp(logit - mx) * y per (query, pixel), pixel order
constexpr double kLdFixedMaxLogitError = 3e-4;

bool locality_denoise_run(
    const LocalityPlan& plan,
    uintptr_t x_ptr,        // queries [B, n], float32 or float64, element (b, j) at b*xs0 + j*xs1
    int64_t B,              // queries, >= 1
    int64_t xs0,            // x row stride in elements
    int64_t xs1,            // x column stride in elements
    bool x_is_double,       // x dtype: float64 (true) or float32
    uintptr_t train_ptr,    // training images [N, n], element (k, j) at k*ts0 + j*ts1
    int64_t N,              // training images, >= 1
    int64_t ts0,            // train row stride in elements
    int64_t ts1,            // train column stride in elements
    int train_kind,         // 0: uint8 (u / 127.5 - 1), 1: float32, 2: float64 (in [-1, 1])
    double a,               // sqrt(alpha_bar)
    double scale,           // 1 / (2 (1 - alpha_bar) temperature): logit = -d * scale
    int64_t chunk,          // 0: exact softmax; > 0: WSSM chunk size
    uintptr_t out_ptr,      // see above
    bool out_is_double,
    uintptr_t mx_ptr,       // see above
    uintptr_t l_ptr,
    uintptr_t acc_ptr,
    bool allow_fixed,       // permit fixed-point distances (see above)
    bool force_portable     // true: plain C++ kernel even where the AVX-512 one runs
);

// The optimal denoiser (argmin = false) or nearest (argmin = true) over a per-query subset of
// the training set (docs/algorithms.md §14: the survivors of certified pruning): query b sees
// images index[offsets[b] .. offsets[b+1]) (int64, ascending, at least one), in that order,
// with the distances and online softmax of locality_denoise_run's all-ones plan (bit-identical
// distances; the same order of images as an unpruned run). Parallel over queries.
// Outputs (0 = not wanted): out [B, n] (float64 if out_is_double else float32); softmax: mx, l
// [B] float64 and acc [B, n] float64 (the state); argmin: arg [B] int64 (lowest index on ties)
// and l [B] its float64 distance.
void full_pruned_run(const LocalityPlan& plan, uintptr_t x_ptr, int64_t B, int64_t xs0, int64_t xs1,
                     bool x_is_double, uintptr_t train_ptr, int64_t N, int64_t ts0, int64_t ts1,
                     int train_kind, double a, double scale, uintptr_t offsets_ptr, uintptr_t index_ptr,
                     bool argmin, uintptr_t out_ptr, bool out_is_double, uintptr_t mx_ptr, uintptr_t l_ptr,
                     uintptr_t acc_ptr, uintptr_t arg_ptr, bool force_portable);

// True when locality_denoise_run uses the AVX-512 kernel (compiled in and supported here).
bool locality_has_avx512();

// ---- Shared with nearest_denoise.cpp: the optimal denoiser's whole-image distances.

// d[q] = ||xb - a y_q||^2 for the eight images of a block, float64 direct differences; the
// function process_block_full uses, so nearest and optimal see bit-identical distances.
using FullDistancesFn = void (*)(
    const double* xb,  // [n] one query, float64, contiguous
    const double* Ys,  // [8][n] the block's images in [-1, 1], float64, image-major
    int64_t n,         // pixels per image
    double a,          // sqrt(alpha_bar)
    double* d          // [8] out: distances (lanes past the block's images: of the zero rows)
);

// The AVX-512 variant where it runs (and !force_portable), else the plain C++ one.
FullDistancesFn full_distances_kernel(bool force_portable);

// Training images [k0, k0 + nvalid) -> Ys [8][n] float64 in [-1, 1] (uint8 through `lut`,
// u / 127.5 - 1 exactly as dequantize_u8_value<double>), rows past nvalid zero.
void fill_block_rows(
    double* Ys,          // [8][n] out, contiguous
    uintptr_t train_ptr, // training images [N, n], element (k, j) at k*ts0 + j*ts1
    int train_kind,      // 0: uint8, 1: float32, 2: float64
    int64_t k0,          // first image of the block
    int nvalid,          // images in the block, 1..8
    int64_t n,           // pixels per image
    int64_t ts0,         // train row stride in elements
    int64_t ts1,         // train column stride in elements
    const double* lut    // [256] uint8 -> float64 table (read only for train_kind 0)
);

}  // namespace analytic_diffusion
