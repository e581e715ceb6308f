// Run-time instruction-set dispatch shared by the CPU kernels (moments, patch_moments).
//
// With GCC/Clang on x86 the AVX-512 micro-kernels are always compiled, through a target
// attribute, and picked at run time from CPUID: a generic build (AD_NATIVE=OFF, e.g. a
// redistributable wheel) still runs VNNI where the CPU has it, and a -march=native build
// copied to an older CPU falls back instead of faulting. Other compilers get them only when
// the ISA is enabled globally.
#pragma once

#if defined(__x86_64__) || defined(__i386__) || defined(_M_X64)
#include <immintrin.h>
#endif

#if (defined(__GNUC__) || defined(__clang__)) && (defined(__x86_64__) || defined(__i386__))
#define AD_X86_DISPATCH 1
#define AD_TARGET_VNNI __attribute__((target("avx512f,avx512bw,avx512vnni")))
#define AD_TARGET_AVX512 __attribute__((target("avx512f")))
#define AD_HAVE_VNNI 1
#define AD_HAVE_AVX512F 1
#else
#define AD_X86_DISPATCH 0
#define AD_TARGET_VNNI
#define AD_TARGET_AVX512
#if defined(__AVX512VNNI__) && defined(__AVX512BW__) && defined(__AVX512F__)
#define AD_HAVE_VNNI 1
#else
#define AD_HAVE_VNNI 0
#endif
#if defined(__AVX512F__)
#define AD_HAVE_AVX512F 1
#else
#define AD_HAVE_AVX512F 0
#endif
#endif

namespace analytic_diffusion {
namespace cpu_isa {

// AVX-512 F + BW + VNNI usable here (libgcc/compiler-rt also check that the OS saves the zmm
// state, XCR0).
inline bool has_vnni() {
#if AD_X86_DISPATCH
    static const bool yes = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                            __builtin_cpu_supports("avx512vnni");
    return yes;
#else
    return AD_HAVE_VNNI != 0;
#endif
}

inline bool has_avx512f() {
#if AD_X86_DISPATCH
    static const bool yes = __builtin_cpu_supports("avx512f");
    return yes;
#else
    return AD_HAVE_AVX512F != 0;
#endif
}

}  // namespace cpu_isa
}  // namespace analytic_diffusion
