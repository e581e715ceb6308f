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
