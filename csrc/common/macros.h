// Portability macros shared by the CPU (g++/clang) and CUDA (nvcc) translation units.
#pragma once

// Functions that hold per-element maths are compiled for both host and device so the
// CPU and CUDA backends share one definition and therefore round identically.
#if defined(__CUDACC__)
#define AD_HOST_DEVICE __host__ __device__
#else
#define AD_HOST_DEVICE
#endif

// Force inlining of tiny per-element helpers: they sit in the innermost loops, where a
// call would block vectorisation on the CPU.
#if defined(__CUDACC__)
#define AD_FORCEINLINE __forceinline__
#elif defined(_MSC_VER)
#define AD_FORCEINLINE __forceinline
#else
#define AD_FORCEINLINE inline __attribute__((always_inline))
#endif

// Two-level stringification so that macro arguments (e.g. compile definitions from
// CMake) are expanded before being turned into string literals.
#define AD_STRINGIFY_(x) #x
#define AD_STRINGIFY(x) AD_STRINGIFY_(x)

// A region of code compiled for AVX-512 (F + DQ) whatever the build flags, its kernels chosen
// from CPUID at run time: AD_AVX512_REGION_BEGIN before them, AD_AVX512_REGION_END after, in
// the same source file (clang refuses an attribute push left open at the end of a header).
// GCC 12's own AVX-512 headers trip -Wmaybe-uninitialized inside such a region (the
// _mm512_undefined_* of the reduce/extract intrinsics, GCC bug 105593); nothing of ours is
// uninitialised, so the region silences it.
#if defined(__clang__)
#define AD_AVX512_REGION_BEGIN \
    _Pragma("clang attribute push(__attribute__((target(\"avx512f,avx512dq\"))), apply_to = function)")
#define AD_AVX512_REGION_END _Pragma("clang attribute pop")
#else
#define AD_AVX512_REGION_BEGIN                                                                    \
    _Pragma("GCC push_options") _Pragma("GCC target(\"avx512f,avx512dq\")") _Pragma("GCC diagnostic push") \
        _Pragma("GCC diagnostic ignored \"-Wmaybe-uninitialized\"")
#define AD_AVX512_REGION_END _Pragma("GCC diagnostic pop") _Pragma("GCC pop_options")
#endif
