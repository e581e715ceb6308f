// analytic_diffusion._C: CPU kernels.
//
// No libtorch here on purpose: the module only sees raw addresses (Python ints), sizes
// and element strides, so it builds against nothing but pybind11 and works with any
// torch version. The Python side (_ext.py) owns validation and allocation.

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#if defined(_OPENMP)
#include <omp.h>
#endif

#include "../common/convert.h"
#include "../common/macros.h"
#include "els.h"
#include "locality_denoise.h"
#include "moments.h"
#include "nearest_denoise.h"
#include "patch_moments.h"
#include "pruning_bound.h"
#include "windowed_locality.h"

namespace py = pybind11;

namespace analytic_diffusion {
namespace {

// Below this many elements, waking the OpenMP team costs more than the loop itself.
constexpr int64_t kParallelMinElements = int64_t(1) << 16;

template <typename T>
void dequantize_u8_rows(
    const uint8_t* src,  // [rows, cols] uint8 image data, addressed via (s0, s1)
    T* dst,              // [rows, cols] contiguous output, row-major
    int64_t rows,        // number of rows (e.g. images, or images*channels)
    int64_t cols,        // elements per row
    int64_t s0,          // src stride between rows, in elements (>= 0)
    int64_t s1           // src stride between columns, in elements (>= 0)
) {
#if defined(_OPENMP)
#pragma omp parallel for schedule(static) if (rows * cols >= kParallelMinElements && rows > 1)
#endif
    for (int64_t r = 0; r < rows; ++r) {
        const uint8_t* in = src + r * s0;
        T* out = dst + r * cols;
        if (s1 == 1) {
            // Separate unit-stride loop: the common contiguous case then vectorises.
#if defined(_OPENMP)
#pragma omp simd
#endif
            for (int64_t c = 0; c < cols; ++c) out[c] = dequantize_u8_value<T>(in[c]);
        } else {
            for (int64_t c = 0; c < cols; ++c) out[c] = dequantize_u8_value<T>(in[c * s1]);
        }
    }
}

void dequantize_u8(
    uintptr_t src_ptr,  // address of src[0, 0]: uint8, host memory
    uintptr_t dst_ptr,  // address of dst: [rows, cols] contiguous float32 or float64
    int64_t rows,       // number of rows
    int64_t cols,       // number of columns
    int64_t src_stride0,  // src row stride in elements (any value >= 0, 0 = broadcast)
    int64_t src_stride1,  // src column stride in elements (any value >= 0)
    bool dst_is_double    // true: dst is float64, false: float32
) {
    if (rows < 0 || cols < 0) throw std::invalid_argument("dequantize_u8: negative size");
    if (src_stride0 < 0 || src_stride1 < 0)
        throw std::invalid_argument("dequantize_u8: negative stride");
    if (rows == 0 || cols == 0) return;
    if (src_ptr == 0 || dst_ptr == 0)
        throw std::invalid_argument("dequantize_u8: null pointer");
    const auto* src = reinterpret_cast<const uint8_t*>(src_ptr);
    // The loop touches no Python objects, so let other Python threads run meanwhile.
    py::gil_scoped_release nogil;
    if (dst_is_double) {
        dequantize_u8_rows(src, reinterpret_cast<double*>(dst_ptr), rows, cols, src_stride0,
                           src_stride1);
    } else {
        dequantize_u8_rows(src, reinterpret_cast<float*>(dst_ptr), rows, cols, src_stride0,
                           src_stride1);
    }
}

// Instruction set the compiler was allowed to target; reflects -march=native (AD_NATIVE)
// at build time, not what the running CPU could do.
const char* simd_level() {
#if defined(__AVX512F__)
    return "avx512f";
#elif defined(__AVX2__)
    return "avx2";
#elif defined(__SSE4_2__)
    return "sse4.2";
#elif defined(__ARM_NEON) || defined(__ARM_NEON__)
    return "neon";
#else
    return "none";
#endif
}

py::dict build_info() {
    py::dict info;
    info["module"] = "analytic_diffusion._C";
#if defined(AD_COMPILER_ID)
    info["compiler"] = std::string(AD_COMPILER_ID) + " " + AD_COMPILER_VERSION;
    info["compiler_id"] = AD_COMPILER_ID;
    info["compiler_version"] = AD_COMPILER_VERSION;
#endif
#if defined(AD_BUILD_TYPE)
    info["build_type"] = AD_BUILD_TYPE;
    info["flags"] = AD_CXX_FLAGS;
    info["target_flags"] = AD_TARGET_FLAGS;
#endif
#if defined(AD_NATIVE) && AD_NATIVE
    info["native"] = true;
#else
    info["native"] = false;
#endif
    info["simd"] = simd_level();
    info["vnni"] = u8_syrk_has_vnni();  // moments: the int8 dot-product micro-kernel runs here
#if defined(_OPENMP)
    info["openmp"] = true;
    info["openmp_version"] = static_cast<int>(_OPENMP);
    info["max_threads"] = omp_get_max_threads();
#else
    info["openmp"] = false;
    info["max_threads"] = 1;
#endif
    info["cplusplus"] = static_cast<long>(__cplusplus);
    return info;
}

template <typename T>
py::array_t<T> to_numpy(const std::vector<T>& v) {
    return py::array_t<T>(static_cast<py::ssize_t>(v.size()), v.data());  // a copy
}

// Every row add of a plan's packets, decoded, for tests and inspection: per add its
// segment, group, kind (0: e_i, 1: P_i, 2: -P_i) and index i within the segment.
py::dict decode_lookups(const LocalityPlan& P) {
    std::vector<int32_t> seg, grp, kind, index;
    constexpr uint32_t kRow = kLdLanes * sizeof(double);
    const int64_t S = P.S;
    for (int64_t s = 0; s < P.nseg; ++s) {
        for (uint32_t k = P.seg_packet_off[s]; k < P.seg_packet_off[s + 1]; ++k) {
            for (int64_t i = 0; i < kLdPacket; ++i) {
                const int64_t row = P.packet_rows[k * kLdPacket + i] / kRow;
                seg.push_back(static_cast<int32_t>(s));
                grp.push_back(static_cast<int32_t>(P.packet_group[k] & kLdGroupMask));
                if (row < S) {
                    kind.push_back(0);
                    index.push_back(static_cast<int32_t>(row));
                } else if (row <= 2 * S) {
                    kind.push_back(1);
                    index.push_back(static_cast<int32_t>(row - S));
                } else {
                    kind.push_back(2);
                    index.push_back(static_cast<int32_t>(row - 2 * S - 1));
                }
            }
        }
    }
    py::dict d;
    d["segment"] = to_numpy(seg);
    d["group"] = to_numpy(grp);
    d["kind"] = to_numpy(kind);
    d["index"] = to_numpy(index);
    return d;
}

py::dict windowed_stats_dict(const WindowedStats& s) {
    py::dict d;
    d["transposed"] = s.transposed;
    d["avx512"] = s.avx512;
    d["box"] = s.box;
    d["groups"] = s.groups;
    d["terms"] = s.terms;
    d["area"] = s.area;
    d["planes"] = s.planes;
    d["integral_planes"] = s.integral_planes;
    d["units"] = s.units;
    d["cost"] = s.cost;
    d["plan"] = s.plan;
    d["softmax_vectors"] = s.softmax_vectors;
    d["skipped_vectors"] = s.skipped_vectors;
    d["warm_images"] = s.warm_images;
    d["load_seconds"] = s.load_seconds;
    d["distance_seconds"] = s.distance_seconds;
    d["softmax_seconds"] = s.softmax_seconds;
    return d;
}

// Binding of windowed_locality_run: the kernel runs without the GIL, the stats dict is built
// with it.
py::dict windowed_locality_run_py(
    uintptr_t x_ptr,        // queries x [B, C, H, W], float32 or float64
    int64_t B, int64_t C, int64_t H, int64_t W,          // sizes
    int64_t xs0, int64_t xs1, int64_t xs2, int64_t xs3,  // x strides (elements)
    bool x_is_double,       // x dtype float64 (true) or float32
    uintptr_t train_ptr,    // training images [N, C, H, W]
    int64_t N,              // number of training images
    int64_t ts0, int64_t ts1, int64_t ts2, int64_t ts3,  // train strides (elements)
    int train_kind,         // 0 uint8, 1 float32, 2 float64
    uintptr_t window_ptr,   // window [C, C, k, k] bool
    int64_t k,              // window size (odd)
    int64_t ws0, int64_t ws1, int64_t ws2, int64_t ws3,  // window strides (elements)
    double a,               // sqrt(alpha_bar)
    double scale,           // 1 / (2 (1 - alpha_bar) temperature)
    int64_t chunk,          // 0 exact, > 0 WSSM chunk size
    uintptr_t out_ptr,      // [B, C*H*W] out (float32/float64) or 0
    bool out_is_double,     // out dtype
    uintptr_t mx_ptr,       // [B, C*H*W] float64 state or 0
    uintptr_t l_ptr,        // [B, C*H*W] float64 state or 0
    uintptr_t acc_ptr,      // [B, C*H*W] float64 state or 0
    int64_t options,        // planner restrictions (0 = free)
    bool force_portable,    // plain C++ copy even with AVX-512
    double skip_logit,      // pruning margin in logits (690: only underflowing weights)
    bool warm_start         // start the running max from candidate images (exact mode)
) {
    WindowedStats s;
    {
        py::gil_scoped_release nogil;
        s = windowed_locality_run(x_ptr, B, C, H, W, xs0, xs1, xs2, xs3, x_is_double, train_ptr, N, ts0, ts1,
                                  ts2, ts3, train_kind, window_ptr, k, ws0, ws1, ws2, ws3, a, scale, chunk,
                                  out_ptr, out_is_double, mx_ptr, l_ptr, acc_ptr, options, force_portable,
                                  skip_logit, warm_start);
    }
    return windowed_stats_dict(s);
}

py::dict windowed_locality_plan_py(
    uintptr_t window_ptr,   // window [C, C, k, k] bool
    int64_t C,              // channels
    int64_t k,              // window size (odd)
    int64_t ws0, int64_t ws1, int64_t ws2, int64_t ws3,  // window strides (elements)
    int64_t H, int64_t W,   // image size
    double scale,           // logit scale 1 / (2 (1 - alpha_bar) temperature)
    double emax,            // bound on the squared differences, (max|x| + sqrt(alpha_bar))^2
    int64_t options         // planner restrictions (0 = free)
) {
    return windowed_stats_dict(windowed_locality_plan(window_ptr, C, k, ws0, ws1, ws2, ws3, H, W, scale, emax, options));
}

}  // namespace
}  // namespace analytic_diffusion

PYBIND11_MODULE(_C, m) {
    m.doc() = "analytic_diffusion CPU kernels (raw-pointer API; use analytic_diffusion._ext)";
    m.def("build_info", &analytic_diffusion::build_info,
          "Compiler, flags, OpenMP and SIMD level this module was built with.");
    m.def("dequantize_u8", &analytic_diffusion::dequantize_u8, py::arg("src_ptr"),
          py::arg("dst_ptr"), py::arg("rows"), py::arg("cols"), py::arg("src_stride0"),
          py::arg("src_stride1"), py::arg("dst_is_double"),
          "dst[r*cols + c] = src[r*s0 + c*s1] / 127.5 - 1 for a [rows, cols] uint8 view.");
    // moments (moments.cpp): the kernels touch no Python objects, so the GIL is released.
    m.def("u8_syrk_update", &analytic_diffusion::u8_syrk_update, py::arg("x_ptr"), py::arg("B"),
          py::arg("n"), py::arg("stride0"), py::arg("stride1"), py::arg("s1_ptr"),
          py::arg("s2_ptr"), py::arg("force_portable") = false, py::arg("chunk_rows") = 0,
          py::call_guard<py::gil_scoped_release>(),
          "s1 += column sums, lower triangle of s2 += x^T x for uint8 x [B, n] (int64 sums, "
          "exact). chunk_rows: images per int32 accumulation (0 = default, <= 65536).");
    m.def("f64_syrk_update", &analytic_diffusion::f64_syrk_update, py::arg("x_ptr"), py::arg("B"),
          py::arg("n"), py::arg("stride0"), py::arg("stride1"), py::arg("x_is_double"),
          py::arg("ref_ptr"), py::arg("s1_ptr"), py::arg("s2_ptr"),
          py::arg("force_portable") = false, py::call_guard<py::gil_scoped_release>(),
          "z = x - ref in float64; s1 += column sums of z, lower triangle of s2 += z^T z.");
    m.def("u8_moments_finalize", &analytic_diffusion::u8_moments_finalize, py::arg("N"),
          py::arg("n"), py::arg("s1_ptr"), py::arg("s2_ptr"), py::arg("mean_ptr"),
          py::arg("cov_ptr"), py::call_guard<py::gil_scoped_release>(),
          "mean and unbiased cov ([-1, 1] units) from exact uint8 sums, bit-identical to "
          "MomentAccumulator.result(), in one pass.");
    // patch_moments (patch_moments.cpp): lag-product rectangle sums, GIL released.
    m.def("lag_rect_sums", &analytic_diffusion::lag_rect_sums, py::arg("x_ptr"), py::arg("dtype"),
          py::arg("B"), py::arg("C"), py::arg("H"), py::arg("W"), py::arg("stride0"), py::arg("stride1"),
          py::arg("stride2"), py::arg("stride3"), py::arg("shift_ptr"), py::arg("Li"), py::arg("Lj"),
          py::arg("nh"), py::arg("nw"), py::arg("oh"), py::arg("ow"), py::arg("T_ptr"), py::arg("S1_ptr"),
          py::arg("force_portable") = false, py::arg("block_images") = 0,
          py::call_guard<py::gil_scoped_release>(),
          "x [B, C, H, W] (dtype 0 uint8, 1 float32, 2 float64; strides in elements); "
          "T [Li+1][2Lj+1][C][C][nh][nw] += rectangle sums of the lag products z[c, q] z[c', q + e] "
          "(int64 exact for uint8, else float64 of z = x - shift[c]); S1 [C][H][W] += per-pixel sums.");
    m.def("lag_sums_has_vnni", &analytic_diffusion::lag_sums_has_vnni,
          "Whether uint8 lag sums run the AVX-512 VNNI micro-kernel on this CPU.");
    m.attr("LAG_MAX_BLOCK_IMAGES") = analytic_diffusion::kLagMaxBlockImages;
    // locality_denoise / optimal_denoise (locality_denoise.cpp)
    using analytic_diffusion::LocalityPlan;
    py::class_<LocalityPlan>(m, "LocalityPlan",
                             "Per-mask work plan of the CPU locality kernel (groups of identical "
                             "windows, spanning tree, run terms per segment). Opaque to the kernel "
                             "caller; the attributes are for statistics and tests.")
        .def_readonly("n", &LocalityPlan::n)
        .def_readonly("segment", &LocalityPlan::S)
        .def_readonly("num_segments", &LocalityPlan::nseg)
        .def_readonly("num_groups", &LocalityPlan::G)
        .def_readonly("tree", &LocalityPlan::tree)
        .def_readonly("singletons", &LocalityPlan::singletons, "groups [0, singletons) have one pixel")
        .def_readonly("area", &LocalityPlan::area, "sum of window sizes: adds per (query, image) of the dense method")
        .def_readonly("lookups", &LocalityPlan::lookups, "lookups per (query, image) of this plan")
        .def_readonly("padded_lookups", &LocalityPlan::padded_lookups, "lookups including packet padding")
        .def_property_readonly("num_packets", [](const LocalityPlan& p) { return p.packet_group.size(); })
        .def_readonly("direct_lookups", &LocalityPlan::direct_lookups, "lookups without the spanning tree")
        .def_readonly("max_depth", &LocalityPlan::max_depth)
        .def_readonly("max_window", &LocalityPlan::max_window)
        .def_readonly("full", &LocalityPlan::full)
        .def_readonly("build_seconds", &LocalityPlan::build_seconds)
        .def_property_readonly("group_of_pixel", [](const LocalityPlan& p) { return analytic_diffusion::to_numpy(p.group_of_pixel); })
        .def_property_readonly("group_offsets", [](const LocalityPlan& p) { return analytic_diffusion::to_numpy(p.group_offsets); })
        .def_property_readonly("group_pixels", [](const LocalityPlan& p) { return analytic_diffusion::to_numpy(p.group_pixels); })
        .def_property_readonly("parent", [](const LocalityPlan& p) { return analytic_diffusion::to_numpy(p.parent); })
        .def_property_readonly("resolve_order", [](const LocalityPlan& p) { return analytic_diffusion::to_numpy(p.resolve_order); })
        .def_property_readonly("nbytes", [](const LocalityPlan& p) {
            return static_cast<int64_t>(4 * (p.group_of_pixel.size() + p.group_offsets.size() + p.group_pixels.size() +
                                             p.parent.size() + p.resolve_order.size() +
                                             p.seg_packet_off.size() + p.packet_group.size()) +
                                        2 * p.packet_rows.size());
        })
        .def("decode_lookups", &analytic_diffusion::decode_lookups,
             "dict of int32 arrays segment, group, kind (0: e, 1: P, 2: -P), index: every row add");
    m.def("locality_plan_build", &analytic_diffusion::locality_plan_build, py::arg("mask_ptr"),
          py::arg("n"), py::arg("stride0"), py::arg("stride1"), py::arg("segment") = 0,
          py::arg("use_tree") = true, py::call_guard<py::gil_scoped_release>(),
          "Plan of a bool [n, n] mask (column m = window of pixel m), read through raw strides.");
    m.def("locality_plan_full", &analytic_diffusion::locality_plan_full, py::arg("n"),
          py::arg("segment") = 0, py::call_guard<py::gil_scoped_release>(),
          "Plan of the all-ones mask (one group): the optimal denoiser.");
    m.def("locality_denoise_run", &analytic_diffusion::locality_denoise_run, py::arg("plan"),
          py::arg("x_ptr"), py::arg("B"), py::arg("x_stride0"), py::arg("x_stride1"),
          py::arg("x_is_double"), py::arg("train_ptr"), py::arg("N"), py::arg("train_stride0"),
          py::arg("train_stride1"), py::arg("train_kind"), py::arg("a"), py::arg("scale"),
          py::arg("chunk"), py::arg("out_ptr"), py::arg("out_is_double"), py::arg("mx_ptr"),
          py::arg("l_ptr"), py::arg("acc_ptr"), py::arg("allow_fixed") = false,
          py::arg("force_portable") = false, py::call_guard<py::gil_scoped_release>(),
          "Softmax-weighted denoising with a plan: exact (chunk = 0) or WSSM (chunk > 0); "
          "writes out [B, n] and/or the float64 state mx, l [B, G], acc [B, n]. Returns "
          "whether fixed-point distances were used (allow_fixed and within the error bound).");
    m.def("full_pruned_run", &analytic_diffusion::full_pruned_run, py::arg("plan"), py::arg("x_ptr"),
          py::arg("B"), py::arg("x_stride0"), py::arg("x_stride1"), py::arg("x_is_double"),
          py::arg("train_ptr"), py::arg("N"), py::arg("train_stride0"), py::arg("train_stride1"),
          py::arg("train_kind"), py::arg("a"), py::arg("scale"), py::arg("offsets_ptr"),
          py::arg("index_ptr"), py::arg("argmin"), py::arg("out_ptr"), py::arg("out_is_double"),
          py::arg("mx_ptr"), py::arg("l_ptr"), py::arg("acc_ptr"), py::arg("arg_ptr"),
          py::arg("force_portable") = false, py::call_guard<py::gil_scoped_release>(),
          "Optimal (softmax) or nearest (argmin) over each query's subset of the training set "
          "(offsets [B + 1], ascending indices, int64): the survivors of certified pruning.");
    m.def("prune_bound_u8", &analytic_diffusion::prune_bound_u8, py::arg("q_ptr"), py::arg("B"), py::arg("levels"),
          py::arg("n"), py::arg("x_ptr"), py::arg("qpar_ptr"), py::arg("train_ptr"), py::arg("N"),
          py::arg("train_stride0"), py::arg("y2_ptr"), py::arg("yn_ptr"), py::arg("ucn_ptr"), py::arg("uc1_ptr"),
          py::arg("a"), py::arg("margin"), py::arg("candidates"), py::arg("lower_ptr"), py::arg("upper_ptr"),
          py::arg("offsets_ptr"), py::arg("index_ptr"), py::arg("force_portable") = false,
          py::call_guard<py::gil_scoped_release>(),
          "Certified pruning of a uint8 training set (docs/algorithms.md §14.1, integer bound): lower bounds "
          "from exact int8 x uint8 dot products, the upper bound on each query's smallest distance, and the "
          "survivors (CSR, ascending) whose lower bound is <= U + margin. Returns their number.");
    m.def("prune_bound_has_vnni", &analytic_diffusion::prune_bound_has_vnni,
          "Whether prune_bound_u8 uses AVX-512 VNNI on this CPU.");
    m.def("prune_bound_has_amx", &analytic_diffusion::prune_bound_has_amx,
          "Whether prune_bound_u8 uses AMX-INT8 tiles on this CPU (and the OS granted them).");
    m.attr("LOCALITY_FIXED_MAX_LOGIT_ERROR") = analytic_diffusion::kLdFixedMaxLogitError;
    m.def("locality_has_avx512", &analytic_diffusion::locality_has_avx512,
          "Whether locality_denoise_run uses the AVX-512 kernel on this CPU.");
    // nearest_denoise (nearest_denoise.cpp): the optimal denoiser's distances, an argmin
    m.def("nearest_denoise_run", &analytic_diffusion::nearest_denoise_run, py::arg("x_ptr"),
          py::arg("B"), py::arg("n"), py::arg("x_stride0"), py::arg("x_stride1"),
          py::arg("x_is_double"), py::arg("train_ptr"), py::arg("N"), py::arg("train_stride0"),
          py::arg("train_stride1"), py::arg("train_kind"), py::arg("a"), py::arg("out_ptr"),
          py::arg("out_is_double"), py::arg("index_ptr"), py::arg("dist_ptr"),
          py::arg("force_portable") = false, py::call_guard<py::gil_scoped_release>(),
          "Nearest training image of each query x [B, n] (float32/float64) among train [N, n] "
          "(uint8/float32/float64), float64 distances ||x - a y||^2, lowest index on ties: "
          "writes out [B, n] (float32/float64), index [B] int64 and/or dist [B] float64 "
          "(a zero address skips an output).");
    m.def("els_denoise_run", &analytic_diffusion::els_denoise_run,
          // x: float64 [B, C, H, W] contiguous; train [N, C, H, W] with element strides
          // (ts0..ts3), kind 0 uint8 / 1 float32 / 2 float64; outputs float64 contiguous
          // mx, l [B, H, W] and acc [B, C, H, W] (the exact online-softmax state per pixel).
          py::arg("x_ptr"), py::arg("B"), py::arg("C"), py::arg("H"), py::arg("W"),
          py::arg("train_ptr"), py::arg("N"), py::arg("ts0"), py::arg("ts1"), py::arg("ts2"),
          py::arg("ts3"), py::arg("train_kind"), py::arg("P"), py::arg("circular"), py::arg("a"),
          py::arg("scale"), py::arg("mx_ptr"), py::arg("l_ptr"), py::arg("acc_ptr"),
          py::call_guard<py::gil_scoped_release>(),
          "ELS / bbELS machine (docs/algorithms.md §10): writes the float64 softmax state per query pixel "
          "over every candidate patch of every training image; the result is acc / l.");
    m.attr("ELS_SKIP_LOGIT") = analytic_diffusion::kElsSkipLogit;
    // windowed_locality_denoise (windowed_locality.cpp)
    m.def("windowed_locality_run", &analytic_diffusion::windowed_locality_run_py, py::arg("x_ptr"), py::arg("B"),
          py::arg("C"), py::arg("H"), py::arg("W"), py::arg("xs0"), py::arg("xs1"), py::arg("xs2"), py::arg("xs3"),
          py::arg("x_is_double"), py::arg("train_ptr"), py::arg("N"), py::arg("ts0"), py::arg("ts1"),
          py::arg("ts2"), py::arg("ts3"), py::arg("train_kind"), py::arg("window_ptr"), py::arg("k"),
          py::arg("ws0"), py::arg("ws1"), py::arg("ws2"), py::arg("ws3"), py::arg("a"), py::arg("scale"),
          py::arg("chunk"), py::arg("out_ptr"), py::arg("out_is_double"), py::arg("mx_ptr"), py::arg("l_ptr"),
          py::arg("acc_ptr"), py::arg("options") = 0, py::arg("force_portable") = false,
          py::arg("skip_logit") = 690.0, py::arg("warm_start") = false,
          "Windowed locality denoising (docs/algorithms.md §9): exact (chunk = 0) or WSSM; writes out and/or the "
          "float64 state [B, C*H*W]; returns the plan's statistics as a dict.");
    m.def("windowed_locality_plan", &analytic_diffusion::windowed_locality_plan_py, py::arg("window_ptr"),
          py::arg("C"), py::arg("k"), py::arg("ws0"), py::arg("ws1"), py::arg("ws2"), py::arg("ws3"), py::arg("H"),
          py::arg("W"), py::arg("scale"), py::arg("emax"), py::arg("options") = 0,
          "The windowed kernel's plan for a window and image size, as a dict (no images needed).");
    m.def("windowed_locality_has_avx512", &analytic_diffusion::windowed_locality_has_avx512,
          "Whether windowed_locality_run uses the AVX-512 kernel on this CPU.");
    m.def("u8_syrk_has_vnni", &analytic_diffusion::u8_syrk_has_vnni,
          "Whether uint8 updates run the AVX-512 VNNI micro-kernel (compiled in and "
          "supported by this CPU).");
}
