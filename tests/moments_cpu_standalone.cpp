// Standalone check of csrc/cpu/moments.cpp built WITHOUT -march=native and without OpenMP,
// as a generic (redistributable) build would be: the run-time ISA dispatch, the portable
// micro-kernels, the scalar packing tails and the single-threaded paths. Built and run by
// tests/test_moments_cpu.py with the host C++ compiler; prints "all standalone checks
// passed" on success. uint8 sums are compared exactly with a direct int64 computation.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <random>
#include <vector>

#include "../csrc/cpu/moments.h"

using namespace analytic_diffusion;

namespace {

int failures = 0;

void check_u8(int64_t B, int64_t n, int64_t s0, int64_t s1, bool portable, int64_t chunk,
              uint32_t seed) {
    // x is addressed as x[k*s0 + c*s1]; allocate what the largest index needs
    const int64_t span = (B - 1) * s0 + (n - 1) * s1 + 1;
    std::vector<uint8_t> x(static_cast<size_t>(span));
    std::mt19937 rng(seed);
    for (auto& v : x) v = static_cast<uint8_t>(rng() & 255);
    if (B > 2)
        for (int64_t c = 0; c < n; ++c) x[c * s1] = 0, x[s0 + c * s1] = 255;
    std::vector<int64_t> S1(n, 3), S2(n * n, 5);  // nonzero start: updates must add
    u8_syrk_update(reinterpret_cast<uintptr_t>(x.data()), B, n, s0, s1,
                   reinterpret_cast<uintptr_t>(S1.data()), reinterpret_cast<uintptr_t>(S2.data()),
                   portable, chunk);
    for (int64_t i = 0; i < n; ++i) {
        int64_t e = 3;
        for (int64_t k = 0; k < B; ++k) e += x[k * s0 + i * s1];
        if (S1[i] != e) ++failures;
        for (int64_t j = 0; j < n; ++j) {
            int64_t f = 5;
            if (j <= i)
                for (int64_t k = 0; k < B; ++k)
                    f += int64_t(x[k * s0 + i * s1]) * x[k * s0 + j * s1];
            if (S2[i * n + j] != f) {
                if (failures < 10)
                    std::printf("FAIL u8 B=%lld n=%lld s=(%lld,%lld) portable=%d chunk=%lld (%lld,%lld)\n",
                                (long long)B, (long long)n, (long long)s0, (long long)s1, int(portable),
                                (long long)chunk, (long long)i, (long long)j);
                ++failures;
            }
        }
    }
}

void check_f64(int64_t B, int64_t n, int64_t s1, bool is_double, bool portable, uint32_t seed) {
    std::mt19937 rng(seed);
    std::uniform_real_distribution<double> U(-1.0, 1.0);
    const int64_t s0 = n * s1 + 1;
    std::vector<double> xd(static_cast<size_t>(B * s0));
    std::vector<float> xf(xd.size());
    for (size_t t = 0; t < xd.size(); ++t) xf[t] = static_cast<float>(U(rng)), xd[t] = xf[t];
    std::vector<double> ref(n), S1(n, 0.0), S2(n * n, 0.0);
    for (auto& r : ref) r = 0.5 * U(rng);
    const uintptr_t xp = is_double ? reinterpret_cast<uintptr_t>(xd.data()) : reinterpret_cast<uintptr_t>(xf.data());
    f64_syrk_update(xp, B, n, s0, s1, is_double, reinterpret_cast<uintptr_t>(ref.data()),
                    reinterpret_cast<uintptr_t>(S1.data()), reinterpret_cast<uintptr_t>(S2.data()),
                    portable);
    double worst = 0.0;
    for (int64_t i = 0; i < n; ++i) {
        double e = 0.0;
        for (int64_t k = 0; k < B; ++k) e += xd[k * s0 + i * s1] - ref[i];
        worst = std::max(worst, std::fabs(S1[i] - e) / B);
        for (int64_t j = 0; j <= i; ++j) {
            double f = 0.0;
            for (int64_t k = 0; k < B; ++k)
                f += (xd[k * s0 + i * s1] - ref[i]) * (xd[k * s0 + j * s1] - ref[j]);
            worst = std::max(worst, std::fabs(S2[i * n + j] - f) / B);
        }
        for (int64_t j = i + 1; j < n; ++j)
            if (S2[i * n + j] != 0.0) ++failures;  // nothing above the diagonal is written
    }
    if (!(worst < 1e-13)) {
        std::printf("FAIL f64 B=%lld n=%lld portable=%d: error %g\n", (long long)B, (long long)n,
                    int(portable), worst);
        ++failures;
    }
}

}  // namespace

int main() {
    std::printf("vnni: %d\n", int(u8_syrk_has_vnni()));
    uint32_t seed = 1;
    for (bool portable : {false, true}) {
        for (int64_t n : {1, 7, 16, 33, 65, 200})
            for (int64_t B : {1, 3, 6, 130}) check_u8(B, n, n, 1, portable, 0, seed++);
        check_u8(77, 45, 1, 77, portable, 0, seed++);    // column-major
        check_u8(50, 40, 0, 1, portable, 0, seed++);     // one broadcast row
        check_u8(301, 70, 140, 2, portable, 64, seed++); // strided, several chunks
        check_u8(1030, 20, 20, 1, portable, 1, seed++);  // one image per chunk
        for (int64_t n : {1, 13, 50, 200})
            for (int64_t B : {1, 5, 300}) {
                check_f64(B, n, 1, true, portable, seed++);
                check_f64(B, n, 3, false, portable, seed++);
            }
    }
    if (failures) {
        std::printf("%d failures\n", failures);
        return 1;
    }
    std::printf("all standalone checks passed\n");
    return 0;
}
