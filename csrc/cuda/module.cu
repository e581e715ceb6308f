// analytic_diffusion._C_cuda: CUDA kernels.
//
// Like _C, no libtorch: the caller passes device addresses, sizes, element strides and
// the cudaStream_t as Python ints, so the module is independent of the torch build.
// The CUDA runtime is linked statically so that importing this module needs no
// libcudart on the machine; every entry point checks for a usable device first and
// raises RuntimeError instead of launching into a missing driver.

#include <cuda_runtime.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <stdexcept>
#include <string>

#include "../common/convert.h"
#include "../common/macros.h"
#include "moments.h"

namespace py = pybind11;

namespace analytic_diffusion {
namespace {

void throw_cuda(cudaError_t err, const char* what) {
    // Reset the (non-sticky) last-error state so a later, unrelated check does not
    // report this failure a second time.
    (void)cudaGetLastError();
    throw std::runtime_error(std::string("analytic_diffusion._C_cuda: ") + what + ": " +
                             cudaGetErrorName(err) + " (" + cudaGetErrorString(err) + ")");
}

#define AD_CUDA_CHECK(expr, what)                            \
    do {                                                     \
        cudaError_t ad_err_ = (expr);                        \
        if (ad_err_ != cudaSuccess) throw_cuda(ad_err_, what); \
    } while (0)

// Raises when there is no driver or no device: cudart would otherwise fail later inside
// a launch with a less helpful message.
void require_device() {
    int count = 0;
    cudaError_t err = cudaGetDeviceCount(&count);
    if (err != cudaSuccess) throw_cuda(err, "no usable CUDA device (cudaGetDeviceCount)");
    if (count == 0)
        throw std::runtime_error("analytic_diffusion._C_cuda: no CUDA device is visible");
}

// A host pointer reaching a kernel faults asynchronously and poisons the CUDA context for
// the whole process (torch included), so reject it up front.
void require_device_accessible(uintptr_t ptr, const char* name) {
    cudaPointerAttributes attr{};
    AD_CUDA_CHECK(cudaPointerGetAttributes(&attr, reinterpret_cast<const void*>(ptr)),
                  "cudaPointerGetAttributes");
    if (attr.type == cudaMemoryTypeUnregistered)
        throw std::invalid_argument(std::string("dequantize_u8: ") + name +
                                    " is not device-accessible memory");
}

template <typename T>
__global__ void dequantize_u8_kernel(
    const uint8_t* __restrict__ src,  // [rows, cols] uint8, addressed via (s0, s1)
    T* __restrict__ dst,              // [rows, cols] contiguous output, row-major
    int64_t rows,                     // number of rows
    int64_t cols,                     // elements per row
    int64_t s0,                       // src row stride in elements (>= 0)
    int64_t s1                        // src column stride in elements (>= 0)
) {
    // x runs along columns so consecutive threads write consecutive outputs (coalesced);
    // both axes are grid-strided because gridDim.y is capped at 65535.
    const int64_t c0 = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
    const int64_t cstep = int64_t(gridDim.x) * blockDim.x;
    for (int64_t r = blockIdx.y; r < rows; r += gridDim.y) {
        const uint8_t* in = src + r * s0;
        T* out = dst + r * cols;
        for (int64_t c = c0; c < cols; c += cstep) out[c] = dequantize_u8_value<T>(in[c * s1]);
    }
}

void dequantize_u8(
    uintptr_t src_ptr,    // device address of src[0, 0]: uint8
    uintptr_t dst_ptr,    // device address of dst: [rows, cols] contiguous float32/float64
    int64_t rows,         // number of rows
    int64_t cols,         // number of columns
    int64_t src_stride0,  // src row stride in elements (any value >= 0, 0 = broadcast)
    int64_t src_stride1,  // src column stride in elements (any value >= 0)
    bool dst_is_double,   // true: dst is float64, false: float32
    uintptr_t stream      // cudaStream_t handle to launch on (0 = legacy default stream);
                          // must belong to the current device, as do src and dst
) {
    if (rows < 0 || cols < 0) throw std::invalid_argument("dequantize_u8: negative size");
    if (src_stride0 < 0 || src_stride1 < 0)
        throw std::invalid_argument("dequantize_u8: negative stride");
    require_device();
    if (rows == 0 || cols == 0) return;
    if (src_ptr == 0 || dst_ptr == 0)
        throw std::invalid_argument("dequantize_u8: null pointer");
    require_device_accessible(src_ptr, "src");
    require_device_accessible(dst_ptr, "dst");

    constexpr int kThreads = 256;
    const int64_t col_blocks = (cols + kThreads - 1) / kThreads;
    const dim3 grid(static_cast<unsigned>(std::min<int64_t>(col_blocks, 1 << 16)),
                    static_cast<unsigned>(std::min<int64_t>(rows, 65535)));
    const auto* src = reinterpret_cast<const uint8_t*>(src_ptr);
    auto s = reinterpret_cast<cudaStream_t>(stream);
    {
        // Launching is asynchronous and touches no Python state.
        py::gil_scoped_release nogil;
        if (dst_is_double) {
            dequantize_u8_kernel<double><<<grid, kThreads, 0, s>>>(
                src, reinterpret_cast<double*>(dst_ptr), rows, cols, src_stride0, src_stride1);
        } else {
            dequantize_u8_kernel<float><<<grid, kThreads, 0, s>>>(
                src, reinterpret_cast<float*>(dst_ptr), rows, cols, src_stride0, src_stride1);
        }
    }
    AD_CUDA_CHECK(cudaGetLastError(), "dequantize_u8 kernel launch");
}

py::dict build_info() {
    py::dict info;
    info["module"] = "analytic_diffusion._C_cuda";
#if defined(AD_COMPILER_ID)
    info["host_compiler"] = std::string(AD_COMPILER_ID) + " " + AD_COMPILER_VERSION;
#endif
#if defined(AD_CUDA_COMPILER_VERSION)
    info["compiler"] = std::string("NVIDIA ") + AD_CUDA_COMPILER_VERSION;
#endif
#if defined(AD_BUILD_TYPE)
    info["build_type"] = AD_BUILD_TYPE;
    info["flags"] = AD_CUDA_FLAGS;
#endif
#if defined(AD_CUDA_ARCHITECTURES)
    info["architectures"] = AD_CUDA_ARCHITECTURES;  // CMAKE_CUDA_ARCHITECTURES, e.g. "80-real,...,90-virtual"
#endif
#if defined(AD_CUDA_ARCHITECTURES_DEFAULT)
    info["architectures_default"] = bool(AD_CUDA_ARCHITECTURES_DEFAULT);  // not overridden by the user
#endif
#if defined(__CUDA_ARCH_LIST__)
    // every architecture nvcc compiled for (machine code or PTX), e.g. [80, 86, 89, 90]
    {
        py::list archs;
        for (int a : {__CUDA_ARCH_LIST__}) archs.append(a / 10);
        info["compiled_architectures"] = archs;
    }
#endif
    // CUDART_VERSION is major*1000 + minor*10, e.g. 13000 for 13.0.
    info["cuda_version"] = std::to_string(CUDART_VERSION / 1000) + "." +
                           std::to_string((CUDART_VERSION % 1000) / 10);
    info["nvcc_version"] = std::to_string(__CUDACC_VER_MAJOR__) + "." +
                           std::to_string(__CUDACC_VER_MINOR__) + "." +
                           std::to_string(__CUDACC_VER_BUILD__);
    info["runtime_linkage"] = "static";

    // Runtime facts, queried without ever failing: build_info must work on GPU-less hosts.
    int driver = 0;
    if (cudaDriverGetVersion(&driver) == cudaSuccess && driver > 0) {
        info["driver_version"] =
            std::to_string(driver / 1000) + "." + std::to_string((driver % 1000) / 10);
    } else {
        info["driver_version"] = py::none();
    }
    int count = 0;
    cudaError_t err = cudaGetDeviceCount(&count);
    if (err != cudaSuccess) {
        (void)cudaGetLastError();
        count = 0;
        info["device_error"] = std::string(cudaGetErrorName(err)) + ": " + cudaGetErrorString(err);
    } else {
        info["device_error"] = py::none();
    }
    info["device_count"] = count;
    return info;
}

}  // namespace
}  // namespace analytic_diffusion

PYBIND11_MODULE(_C_cuda, m) {
    m.doc() = "analytic_diffusion CUDA kernels (raw-pointer API; use analytic_diffusion._ext)";
    m.def("build_info", &analytic_diffusion::build_info,
          "CUDA version, architectures and flags this module was built with, plus the "
          "visible device count (0 with device_error set when none is usable).");
    m.def("dequantize_u8", &analytic_diffusion::dequantize_u8, py::arg("src_ptr"),
          py::arg("dst_ptr"), py::arg("rows"), py::arg("cols"), py::arg("src_stride0"),
          py::arg("src_stride1"), py::arg("dst_is_double"), py::arg("stream") = 0,
          "dst[r*cols + c] = src[r*s0 + c*s1] / 127.5 - 1 on `stream` (asynchronous).");
    m.def(
        "u8_syrk_update",
        [](uintptr_t x_ptr, int64_t B, int64_t n, int64_t stride0, int64_t stride1,
           uintptr_t s1_ptr, uintptr_t s2_ptr, uintptr_t ws_ptr, uintptr_t stream,
           int64_t k_block, bool use_mma) {
            // launches only: no Python state is touched while the GIL is released
            py::gil_scoped_release nogil;
            analytic_diffusion::u8_syrk_update(x_ptr, B, n, stride0, stride1, s1_ptr, s2_ptr,
                                               ws_ptr, stream, k_block, use_mma);
        },
        py::arg("x_ptr"), py::arg("B"), py::arg("n"), py::arg("stride0"), py::arg("stride1"),
        py::arg("s1_ptr"), py::arg("s2_ptr"), py::arg("ws_ptr"), py::arg("stream") = 0,
        py::arg("k_block") = 0, py::arg("use_mma") = true,
        "Exact uint8 moment sums of a batch x [B, n]: s1 [n] += column sums, lower triangle "
        "of s2 [n, n] += x^T x (int64, in place, asynchronous on `stream`). ws: int64 [n] "
        "scratch. use_mma=False runs the plain int64 cross-check kernel.");
}
