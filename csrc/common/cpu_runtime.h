// CPU runtime pieces shared by the compiled kernels: OpenMP team size with a fork guard,
// thread index, and 64-byte aligned scratch buffers.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <new>

#if defined(_OPENMP)
#include <omp.h>
#if defined(__unix__) || defined(__APPLE__)
#include <pthread.h>
#define AD_FORK_GUARD 1
#endif
#endif

namespace analytic_diffusion {
namespace cpu_runtime {

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// GNU libgomp is not fork-safe: a child forked after the parent ran a parallel region
// (here or in any other user of this libgomp copy) hangs in its first parallel region of
// more than one thread. torch.multiprocessing with start_method="fork" and DataLoader
// workers do exactly that, so a forked child runs the kernels on one thread (as torch's
// DataLoader workers do anyway). One flag and one handler for the whole module (inline
// variables are defined once across translation units).
inline std::atomic<bool> g_forked{false};
#if defined(AD_FORK_GUARD)
inline void on_fork_child() { g_forked.store(true, std::memory_order_relaxed); }
// registered when the module is loaded, i.e. before any fork that could matter
inline const int g_fork_handler = pthread_atfork(nullptr, nullptr, on_fork_child);
#endif

// torch.set_num_threads sets this thread's OpenMP ICV, so the kernels follow it.
inline int team_size() {
#if defined(_OPENMP)
    return g_forked.load(std::memory_order_relaxed) ? 1 : omp_get_max_threads();
#else
    return 1;
#endif
}

// Per-thread scratch is allocated before each parallel region and indexed by this: an
// allocation failure then throws in the calling thread instead of inside the region,
// where an exception would terminate the process.
inline int thread_index() {
#if defined(_OPENMP)
    return omp_get_thread_num();
#else
    return 0;
#endif
}

struct FreeDeleter {
    void operator()(void* p) const { std::free(p); }
};

// 64-byte aligned so rows line up with cache lines and zmm loads never split one.
template <typename T>
std::unique_ptr<T[], FreeDeleter> aligned_array(int64_t count) {
    size_t bytes = static_cast<size_t>(std::max<int64_t>(count, 1)) * sizeof(T);
    bytes = (bytes + 63) / 64 * 64;  // aligned_alloc wants a multiple of the alignment
    void* p = std::aligned_alloc(64, bytes);
    if (p == nullptr) throw std::bad_alloc();
    return std::unique_ptr<T[], FreeDeleter>(static_cast<T*>(p));
}

}  // namespace cpu_runtime
}  // namespace analytic_diffusion
