// Exact uint8 covariance sums on the GPU (docs/algorithms.md §2): s1 += sum u, and the lower
// triangle of s2 += sum u u^T, both int64, bit-identical to the CPU and reference
// backends whatever the batch order or size.
//
// The n x n product runs on int8 tensor cores (mma.sync.m16n8k32.s32.s8.s8.s32, sm_80+):
// bytes are shifted to s = u - 128 so they fit int8, the tensor cores sum s_i s_j in
// int32, and unshift() in moments_tile.cuh restores sum u_i u_j from this batch's column
// sums. Each thread block owns one 128 x 128 lower-triangle tile and one K range of at
// most kMaxKBlock images (the int32 bound), and flushes its int32 accumulators into the
// int64 sums with 64-bit atomic adds: several K ranges of a tile may run concurrently,
// and integer addition is exact in any order, so the result stays deterministic.
//
// Data path of a block, per 64-image stage (double-buffered, one barrier per stage):
//   global (uint8, image-major) --32-bit loads--> registers --4x4 byte transpose, ^0x80-->
//   shared memory (pixel-major int8, swizzled) --ldmatrix.x4--> mma fragments.
// The transpose is needed because mma's int8 operands must be k-contiguous (row.col
// only) while images arrive pixel-contiguous; ldmatrix cannot transpose 8-bit data
// before sm_100. All index maps live in moments_tile.cuh and are replayed on the CPU by
// tests/u8_syrk_emulator.cpp.

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "moments.h"
#include "moments_tile.cuh"

namespace analytic_diffusion {
namespace {

using namespace u8syrk;

[[noreturn]] void throw_cuda(cudaError_t err, const char* what) {
    (void)cudaGetLastError();  // clear the non-sticky error so later checks start clean
    throw std::runtime_error(std::string("analytic_diffusion._C_cuda: u8_syrk_update: ") + what +
                             ": " + cudaGetErrorName(err) + " (" + cudaGetErrorString(err) + ")");
}

void check(cudaError_t err, const char* what) {
    if (err != cudaSuccess) throw_cuda(err, what);
}

// A host or foreign-device pointer reaching a kernel faults asynchronously and poisons
// the whole CUDA context (torch's included), so it is refused before any launch.
void require_on_device(uintptr_t ptr, const char* name, int device) {
    if (ptr == 0) throw std::invalid_argument(std::string("u8_syrk_update: ") + name + " is a null pointer");
    cudaPointerAttributes attr{};
    check(cudaPointerGetAttributes(&attr, reinterpret_cast<const void*>(ptr)), "cudaPointerGetAttributes");
    if (attr.type == cudaMemoryTypeUnregistered || attr.type == cudaMemoryTypeHost)
        throw std::invalid_argument(std::string("u8_syrk_update: ") + name +
                                    " is host memory; pass a CUDA tensor");
    if (attr.type == cudaMemoryTypeDevice && attr.device != device)
        throw std::invalid_argument(std::string("u8_syrk_update: ") + name + " lives on device " +
                                    std::to_string(attr.device) + " but the current device is " +
                                    std::to_string(device));
}

// ---------------------------------------------------------------- tensor-core kernel
__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], const uint8_t* p) {
    const auto addr = static_cast<uint32_t>(__cvta_generic_to_shared(p));
    // "memory": the barrier before it orders the staging stores; keep the compiler from
    // hoisting this read above it
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr)
                 : "memory");
}

// d = a * b + d on int8 tensor cores; s32 accumulation wraps, never saturates, and the
// K-block bound keeps it from wrapping.
__device__ __forceinline__ void mma_s8(int (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 "
        "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// One warp's share of one stage: its 64 x 64 outputs over 64 images (two k32 slices).
// acc[mt][nt] is the m16 x n8 tile at rows 16*mt, columns 8*nt of the warp tile. B
// fragments are fetched one x4 (two n8 tiles) at a time: holding all eight would
// push the kernel past 255 registers.
__device__ __forceinline__ void compute_stage(const uint8_t* sa, const uint8_t* sb, int warp_m,
                                              int warp_n, int lane, int (&acc)[4][8][4]) {
#pragma unroll
    for (int ks = 0; ks < kBK / 32; ++ks) {
        uint32_t a[4][4];
#pragma unroll
        for (int mt = 0; mt < 4; ++mt) ldsm_x4(a[mt], sa + a_ldsm_offset(kWarpTile * warp_m + 16 * mt, ks, lane));
#pragma unroll
        for (int np = 0; np < 4; ++np) {
            uint32_t b[4];  // b0, b1 of n-tile 2*np, then b0, b1 of n-tile 2*np + 1
            ldsm_x4(b, sb + b_ldsm_offset(kWarpTile * warp_n + 16 * np, ks, lane));
#pragma unroll
            for (int mt = 0; mt < 4; ++mt) {
                mma_s8(acc[mt][2 * np], a[mt], b[0], b[1]);
                mma_s8(acc[mt][2 * np + 1], a[mt], b[2], b[3]);
            }
        }
    }
}

// grid: x = lower-triangle tile (tile_coords), y = K range (split0 + blockIdx.y);
// block: kThreads. kVec: see load_unit.
template <bool kVec>
__global__ void __launch_bounds__(kThreads, 2) u8_syrk_mma_kernel(
    const uint8_t* __restrict__ x,       // [B, n] uint8, element strides (s0, s1)
    int64_t B,                           // images in the batch
    int64_t n,                           // pixels per image
    int64_t s0,                          // x row stride (elements)
    int64_t s1,                          // x column stride (elements)
    int64_t k_chunk,                     // images per K range: multiple of kBK, <= kMaxKBlock
    int64_t split0,                      // K range of blockIdx.y == 0 (launches of > 65535 ranges)
    const int64_t* __restrict__ colsum,  // [n] this batch's column sums sum_k x[k, i]
    int64_t* __restrict__ s2             // [n, n] row-major int64, lower triangle updated
) {
    __shared__ __align__(16) uint8_t smem[2][2][kStageBytes];  // [buffer][A rows, B rows]

    int64_t ti, tj;
    tile_coords(blockIdx.x, ti, tj);
    const int64_t pa = ti * kTile, pb = tj * kTile;  // first pixel of the A / B operand tile
    const int64_t split = split0 + blockIdx.y;
    const int64_t kbeg = split * k_chunk;
    const int64_t kend = min(B, kbeg + k_chunk);
    const int nstages = static_cast<int>((kend - kbeg + kBK - 1) / kBK);

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int warp_m = warp >> 1, warp_n = warp & 1;
    // in a diagonal tile the warp with rows 0-63 and columns 64-127 sees only j > i
    const bool active = !(ti == tj && warp_m < warp_n);
    const LoadSlot slot = load_slot(tid);

    int acc[4][8][4];
#pragma unroll
    for (int mt = 0; mt < 4; ++mt)
#pragma unroll
        for (int nt = 0; nt < 8; ++nt)
#pragma unroll
            for (int v = 0; v < 4; ++v) acc[mt][nt][v] = 0;

    uint32_t wa[16], wb[16];
    const int64_t krow = kbeg + 16 * slot.kunit;  // this thread's first image in stage 0
    load_unit<kVec>(wa, x, s0, s1, krow, kend, pa + 4 * slot.pq, n);
    load_unit<kVec>(wb, x, s0, s1, krow, kend, pb + 4 * slot.pq, n);
    store_unit(smem[0][0], wa, slot);
    store_unit(smem[0][1], wb, slot);
    __syncthreads();

    for (int s = 0; s < nstages; ++s) {
        const int buf = s & 1;
        const bool more = s + 1 < nstages;
        // Vector path: issue the next stage's global loads before this stage's math, so
        // they overlap it. Byte path (strided or misaligned rows): load after the math;
        // its per-byte address arithmetic held across compute_stage would push the
        // kernel past 255 registers and spill (found by benchmarks/gpu_static_check.py).
        const int64_t knext = krow + int64_t(s + 1) * kBK;
        if (kVec && more) {
            load_unit<kVec>(wa, x, s0, s1, knext, kend, pa + 4 * slot.pq, n);
            load_unit<kVec>(wb, x, s0, s1, knext, kend, pb + 4 * slot.pq, n);
        }
        if (active) compute_stage(smem[buf][0], smem[buf][1], warp_m, warp_n, lane, acc);
        if (more) {
            if (!kVec) {
                load_unit<kVec>(wa, x, s0, s1, knext, kend, pa + 4 * slot.pq, n);
                load_unit<kVec>(wb, x, s0, s1, knext, kend, pb + 4 * slot.pq, n);
            }
            // buffer buf ^ 1 was last read in iteration s - 1, before the barrier below it
            store_unit(smem[buf ^ 1][0], wa, slot);
            store_unit(smem[buf ^ 1][1], wb, slot);
        }
        __syncthreads();
    }

    // flush: int32 block sums -> int64 (exact; atomics because K ranges of one tile may
    // run concurrently)
    const bool first = split == 0;
    const int64_t row0 = pa + kWarpTile * warp_m, col0 = pb + kWarpTile * warp_n;
#pragma unroll
    for (int mt = 0; mt < 4; ++mt)
#pragma unroll
        for (int nt = 0; nt < 8; ++nt)
#pragma unroll
            for (int v = 0; v < 4; ++v) {
                const int64_t i = row0 + 16 * mt + c_row(lane, v);
                const int64_t j = col0 + 8 * nt + c_col(lane, v);
                if (i < n && j <= i) {
                    int64_t val = acc[mt][nt][v];
                    if (first) val = unshift(val, colsum[i], colsum[j], B);
                    atomicAdd(reinterpret_cast<unsigned long long*>(s2 + i * n + j),
                              static_cast<unsigned long long>(val));  // two's complement: signed add
                }
            }
}

// colsum[i] and s1[i] both += sum of x[k, i] over this block's rows (both pre-zeroed or
// accumulating). grid: x = pixel blocks, y = row blocks of `rows` images.
__global__ void u8_colsum_kernel(
    const uint8_t* __restrict__ x,  // [B, n] uint8, element strides (s0, s1)
    int64_t B, int64_t n, int64_t s0, int64_t s1,
    int64_t rows,                   // images per blockIdx.y; rows * 255 < 2^32
    int64_t* __restrict__ colsum,   // [n] int64 (may be null: then only s1 is updated)
    int64_t* __restrict__ s1_out    // [n] int64
) {
    const int64_t p = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
    if (p >= n) return;
    const int64_t k0 = int64_t(blockIdx.y) * rows, k1 = min(B, k0 + rows);
    const uint8_t* col = x + p * s1;
    uint32_t sum = 0;
#pragma unroll 8
    for (int64_t k = k0; k < k1; ++k) sum += __ldg(col + k * s0);
    if (colsum) atomicAdd(reinterpret_cast<unsigned long long*>(colsum + p), (unsigned long long)sum);
    atomicAdd(reinterpret_cast<unsigned long long*>(s1_out + p), (unsigned long long)sum);
}

// ---------------------------------------------------------------- fallback (cross-check)
// One thread per (i, j), j <= i: direct int64 sum of u_i u_j, no shift, no tiling, no
// tensor cores. Slow (B n^2 / 2 scalar multiply-adds) and meant for tests only.
__global__ void u8_syrk_simple_kernel(
    const uint8_t* __restrict__ x,  // [B, n] uint8, element strides (s0, s1)
    int64_t B, int64_t n, int64_t s0, int64_t s1,
    int64_t* __restrict__ s2        // [n, n] row-major int64
) {
    const int64_t j = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
    const int64_t i = int64_t(blockIdx.y) * blockDim.y + threadIdx.y;
    if (i >= n || j > i) return;
    int64_t acc = 0;
    for (int64_t k = 0; k < B; ++k) acc += int64_t(x[k * s0 + i * s1]) * int64_t(x[k * s0 + j * s1]);
    s2[i * n + j] += acc;
}

}  // namespace

void u8_syrk_update(uintptr_t x_ptr, int64_t B, int64_t n, int64_t stride0, int64_t stride1,
                    uintptr_t s1_ptr, uintptr_t s2_ptr, uintptr_t ws_ptr, uintptr_t stream,
                    int64_t k_block, bool use_mma) {
    if (B < 0 || n < 0) throw std::invalid_argument("u8_syrk_update: negative size");
    if (stride0 < 0 || stride1 < 0) throw std::invalid_argument("u8_syrk_update: negative stride");
    if (k_block < 0 || k_block > kMaxKBlock)
        throw std::invalid_argument("u8_syrk_update: k_block must be 0 (default) or 1.." +
                                    std::to_string(kMaxKBlock) + " (int32 accumulation bound), got " +
                                    std::to_string(k_block));
    int count = 0;
    check(cudaGetDeviceCount(&count), "no usable CUDA device (cudaGetDeviceCount)");
    if (count == 0) throw std::runtime_error("analytic_diffusion._C_cuda: no CUDA device is visible");
    if (B == 0 || n == 0) return;
    int device = 0;
    check(cudaGetDevice(&device), "cudaGetDevice");
    require_on_device(x_ptr, "x", device);
    require_on_device(s1_ptr, "s1", device);
    require_on_device(s2_ptr, "s2", device);
    if (use_mma) require_on_device(ws_ptr, "ws", device);

    const auto* x = reinterpret_cast<const uint8_t*>(x_ptr);
    auto* s1 = reinterpret_cast<int64_t*>(s1_ptr);
    auto* s2 = reinterpret_cast<int64_t*>(s2_ptr);
    auto st = reinterpret_cast<cudaStream_t>(stream);

    if (!use_mma) {
        const int64_t rows = 1 << 20;  // 2^20 * 255 < 2^32
        const dim3 cgrid(static_cast<unsigned>((n + 255) / 256), static_cast<unsigned>((B + rows - 1) / rows));
        u8_colsum_kernel<<<cgrid, 256, 0, st>>>(x, B, n, stride0, stride1, rows, nullptr, s1);
        check(cudaGetLastError(), "colsum kernel launch");
        const int64_t nb = (n + 15) / 16;
        if (nb > 65535) throw std::invalid_argument("u8_syrk_update: n too large for the fallback kernel");
        u8_syrk_simple_kernel<<<dim3(static_cast<unsigned>(nb), static_cast<unsigned>(nb)), dim3(16, 16), 0, st>>>(
            x, B, n, stride0, stride1, s2);
        check(cudaGetLastError(), "fallback syrk kernel launch");
        return;
    }

    int sms = 0;
    check(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device), "cudaDeviceGetAttribute");
    const int64_t nt = (n + kTile - 1) / kTile;
    const int64_t tiles = nt * (nt + 1) / 2;
    if (tiles > 0x7fffffffLL) throw std::invalid_argument("u8_syrk_update: n too large");
    const KPlan plan = plan_k(B, tiles, sms, k_block);
    const int64_t k_chunk = plan.k_chunk, splits = plan.splits;

    // ---- this batch's column sums (for unshift) and s1
    auto* ws = reinterpret_cast<int64_t*>(ws_ptr);
    check(cudaMemsetAsync(ws, 0, size_t(n) * sizeof(int64_t), st), "cudaMemsetAsync");
    {
        const int64_t rows = std::max<int64_t>(1024, (B + 65534) / 65535);
        const dim3 cgrid(static_cast<unsigned>((n + 255) / 256), static_cast<unsigned>((B + rows - 1) / rows));
        u8_colsum_kernel<<<cgrid, 256, 0, st>>>(x, B, n, stride0, stride1, rows, ws, s1);
        check(cudaGetLastError(), "colsum kernel launch");
    }

    const bool vec = stride1 == 1 && x_ptr % 4 == 0 && stride0 % 4 == 0;
    for (int64_t split0 = 0; split0 < splits; split0 += 65535) {
        const dim3 grid(static_cast<unsigned>(tiles), static_cast<unsigned>(std::min<int64_t>(65535, splits - split0)));
        if (vec)
            u8_syrk_mma_kernel<true><<<grid, kThreads, 0, st>>>(x, B, n, stride0, stride1, k_chunk, split0, ws, s2);
        else
            u8_syrk_mma_kernel<false><<<grid, kThreads, 0, st>>>(x, B, n, stride0, stride1, k_chunk, split0, ws, s2);
        check(cudaGetLastError(), "tensor-core syrk kernel launch");
    }
}

}  // namespace analytic_diffusion
