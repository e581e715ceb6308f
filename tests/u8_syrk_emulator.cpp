// CPU replay of the tensor-core uint8 SYRK kernel (csrc/cuda/moments.cu), for machines
// without a GPU. Built and run by tests/test_moments_gpu.py with the host C++ compiler.
//
// It drives the kernel's own index maps (moments_tile.cuh: staging loads, byte
// transposes, swizzled shared-memory offsets, ldmatrix row addresses, accumulator
// coordinates, unshift, K-range plan) through an independent model of the two
// warp-collective PTX instructions, written from the PTX ISA text:
//   ldmatrix.sync.aligned.m8n8.x4.shared.b16: lanes 8j..8j+7 give the row addresses of
//     matrix j; register j of lane L receives 16-bit elements 2*(L%4), 2*(L%4)+1 (bytes
//     4*(L%4)..+3) of row L/4 of matrix j.
//   mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 (g = L>>2, t = L%4):
//     A a_i, i = 0..15 (register i/4, byte i%4): row g for i in [0,4) u [8,12), else g+8;
//       col 4t + (i & 3), + 16 for i >= 8
//     B b_i, i = 0..7 (register i/4, byte i%4): row (k) 4t + (i & 3), + 16 for i >= 4;
//       col g
//     C/D c_i, i = 0..3: row g, + 8 for i >= 2; col 2t + (i & 1); s32 wraps modulo 2^32
// and compares every updated entry with a direct int64 sum. It also checks that each
// lower-triangle entry is written exactly once per K range and nothing above it.
// What it cannot check: that the hardware matches this reading of the ISA, barriers and
// races, atomics, and the compiled code itself.
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>

#include "../csrc/cuda/moments_tile.cuh"

using namespace analytic_diffusion::u8syrk;

namespace {

int failures = 0;

#define EXPECT(cond, ...)                                  \
    do {                                                   \
        if (!(cond)) {                                     \
            if (failures < 20) {                           \
                std::printf("FAIL %s:%d: ", __FILE__, __LINE__); \
                std::printf(__VA_ARGS__);                  \
                std::printf("\n");                         \
            }                                              \
            ++failures;                                    \
        }                                                  \
    } while (0)

void ldmatrix_x4(const uint8_t* smem, const int (&addr)[32], uint32_t (&out)[32][4]) {
    for (int L = 0; L < 32; ++L)
        for (int j = 0; j < 4; ++j) {
            const int a = addr[8 * j + (L >> 2)];
            EXPECT(a % 16 == 0 && a >= 0 && a + 16 <= kStageBytes, "ldmatrix row address %d", a);
            std::memcpy(&out[L][j], smem + a + 4 * (L & 3), 4);
        }
}

void mma_m16n8k32(const uint32_t (&a)[32][4], const uint32_t (&b)[32][2], int32_t (&c)[32][4]) {
    int A[16][32], Bm[32][8];
    int64_t C[16][8];
    int seenA[16][32] = {}, seenB[32][8] = {}, seenC[16][8] = {};
    for (int L = 0; L < 32; ++L) {
        const int g = L >> 2, t = L & 3;
        for (int i = 0; i < 16; ++i) {
            const int row = (i < 4 || (i >= 8 && i < 12)) ? g : g + 8;
            const int col = 4 * t + (i & 3) + (i >= 8 ? 16 : 0);
            A[row][col] = int8_t((a[L][i / 4] >> (8 * (i % 4))) & 0xFF);
            ++seenA[row][col];
        }
        for (int i = 0; i < 8; ++i) {
            const int row = 4 * t + (i & 3) + (i >= 4 ? 16 : 0);
            Bm[row][g] = int8_t((b[L][i / 4] >> (8 * (i % 4))) & 0xFF);
            ++seenB[row][g];
        }
        for (int i = 0; i < 4; ++i) {
            const int row = g + (i >= 2 ? 8 : 0), col = 2 * t + (i & 1);
            C[row][col] = c[L][i];
            ++seenC[row][col];
        }
    }
    for (int r = 0; r < 16; ++r)
        for (int k = 0; k < 32; ++k) EXPECT(seenA[r][k] == 1, "A[%d][%d] covered %d times", r, k, seenA[r][k]);
    for (int k = 0; k < 32; ++k)
        for (int col = 0; col < 8; ++col) EXPECT(seenB[k][col] == 1, "B coverage");
    for (int r = 0; r < 16; ++r)
        for (int col = 0; col < 8; ++col) {
            EXPECT(seenC[r][col] == 1, "C coverage");
            for (int k = 0; k < 32; ++k) C[r][col] += int64_t(A[r][k]) * Bm[k][col];
        }
    for (int L = 0; L < 32; ++L) {
        const int g = L >> 2, t = L & 3;
        for (int i = 0; i < 4; ++i)
            c[L][i] = int32_t(uint32_t(uint64_t(C[g + (i >= 2 ? 8 : 0)][2 * t + (i & 1)])));  // wraps like s32
    }
}

struct Case {
    const char* name;
    int64_t B, n, s0, s1;
    int64_t offset;  // byte offset of x[0, 0] inside the buffer (alignment of the vector path)
    int64_t k_block;
    int sms;
    int fill;  // 0 random, 1 all zero (largest |s|), 2 all 255
};

// One thread block (tile t, K range `split`), as u8_syrk_mma_kernel runs it.
template <bool kVec>
void run_block(const uint8_t* x, const Case& cs, int64_t k_chunk, int64_t t, int64_t split,
               const std::vector<int64_t>& colsum, std::vector<int64_t>& s2, std::vector<int>& writes) {
    const int64_t B = cs.B, n = cs.n;
    int64_t ti, tj;
    tile_coords(t, ti, tj);
    const int64_t pa = ti * kTile, pb = tj * kTile;
    const int64_t kbeg = split * k_chunk, kend = std::min(B, kbeg + k_chunk);
    const int nstages = int((kend - kbeg + kBK - 1) / kBK);
    std::vector<uint8_t> sa(kStageBytes), sb(kStageBytes);
    static int32_t acc[4][32][4][8][4];
    std::memset(acc, 0, sizeof(acc));
    for (int s = 0; s < nstages; ++s) {
        std::memset(sa.data(), 0xEE, kStageBytes);  // poison: every byte must be staged
        std::memset(sb.data(), 0xEE, kStageBytes);
        std::vector<int> hits(kStageBytes, 0);
        for (int tid = 0; tid < kThreads; ++tid) {
            const LoadSlot slot = load_slot(tid);
            uint32_t w[16];
            const int64_t k = kbeg + 16 * slot.kunit + int64_t(s) * kBK;
            load_unit<kVec>(w, x, cs.s0, cs.s1, k, kend, pa + 4 * slot.pq, n);
            store_unit(sa.data(), w, slot);
            load_unit<kVec>(w, x, cs.s0, cs.s1, k, kend, pb + 4 * slot.pq, n);
            store_unit(sb.data(), w, slot);
            for (int c = 0; c < 4; ++c) {
                const int off = smem_offset(4 * slot.pq + c, slot.kunit);
                for (int q = 0; q < 16; ++q) ++hits[off + q];
            }
        }
        for (int i = 0; i < kStageBytes; ++i) EXPECT(hits[i] == 1, "smem byte %d staged %d times", i, hits[i]);
        // the staged bytes are s = u - 128 of the right (pixel, image), 0 outside
        for (int row = 0; row < kTile; ++row)
            for (int kk = 0; kk < kBK; ++kk) {
                const int64_t k = kbeg + int64_t(s) * kBK + kk;
                const int off = smem_offset(row, kk / 16) + kk % 16;
                const int64_t pA = pa + row, pB = pb + row;
                const int wantA = (k < kend && pA < n) ? int(x[k * cs.s0 + pA * cs.s1]) - 128 : 0;
                const int wantB = (k < kend && pB < n) ? int(x[k * cs.s0 + pB * cs.s1]) - 128 : 0;
                EXPECT(int8_t(sa[off]) == wantA, "staged A row %d k %d: %d != %d", row, kk, int8_t(sa[off]), wantA);
                EXPECT(int8_t(sb[off]) == wantB, "staged B row %d k %d", row, kk);
            }
        for (int warp = 0; warp < 4; ++warp) {
            const int warp_m = warp >> 1, warp_n = warp & 1;
            if (ti == tj && warp_m < warp_n) continue;
            for (int ks = 0; ks < kBK / 32; ++ks) {
                uint32_t a[4][32][4];
                for (int mt = 0; mt < 4; ++mt) {
                    int addr[32];
                    for (int L = 0; L < 32; ++L) addr[L] = a_ldsm_offset(kWarpTile * warp_m + 16 * mt, ks, L);
                    ldmatrix_x4(sa.data(), addr, a[mt]);
                }
                for (int np = 0; np < 4; ++np) {
                    int addr[32];
                    for (int L = 0; L < 32; ++L) addr[L] = b_ldsm_offset(kWarpTile * warp_n + 16 * np, ks, L);
                    uint32_t r[32][4];
                    ldmatrix_x4(sb.data(), addr, r);
                    uint32_t b0[32][2], b1[32][2];
                    for (int L = 0; L < 32; ++L) {
                        b0[L][0] = r[L][0];
                        b0[L][1] = r[L][1];
                        b1[L][0] = r[L][2];
                        b1[L][1] = r[L][3];
                    }
                    for (int mt = 0; mt < 4; ++mt) {
                        int32_t c[32][4];
                        for (int h = 0; h < 2; ++h) {
                            for (int L = 0; L < 32; ++L) std::memcpy(c[L], acc[warp][L][mt][2 * np + h], 16);
                            mma_m16n8k32(a[mt], h ? b1 : b0, c);
                            for (int L = 0; L < 32; ++L) std::memcpy(acc[warp][L][mt][2 * np + h], c[L], 16);
                        }
                    }
                }
            }
        }
    }
    for (int warp = 0; warp < 4; ++warp) {
        const int warp_m = warp >> 1, warp_n = warp & 1;
        const int64_t row0 = pa + kWarpTile * warp_m, col0 = pb + kWarpTile * warp_n;
        for (int L = 0; L < 32; ++L)
            for (int mt = 0; mt < 4; ++mt)
                for (int nt = 0; nt < 8; ++nt)
                    for (int v = 0; v < 4; ++v) {
                        const int64_t i = row0 + 16 * mt + c_row(L, v);
                        const int64_t j = col0 + 8 * nt + c_col(L, v);
                        if (i < n && j <= i) {
                            int64_t val = acc[warp][L][mt][nt][v];
                            if (split == 0) val = unshift(val, colsum[i], colsum[j], B);
                            s2[i * n + j] += val;
                            ++writes[i * n + j];
                        }
                    }
    }
}

void run_case(const Case& cs) {
    const int before = failures;
    std::mt19937 rng(1234);
    const int64_t span = (cs.B - 1) * cs.s0 + (cs.n - 1) * cs.s1 + 1;
    std::vector<uint8_t> buf(size_t(span + cs.offset + 16));
    for (auto& b : buf) b = cs.fill == 1 ? 0 : cs.fill == 2 ? 255 : uint8_t(rng() & 0xFF);
    const uint8_t* x = buf.data() + cs.offset;
    const int64_t n = cs.n, B = cs.B;

    std::vector<int64_t> colsum(n, 0), s2(n * n, 0), ref(n * n, 0);
    for (int64_t i = 0; i < n; ++i)
        for (int64_t k = 0; k < B; ++k) colsum[i] += x[k * cs.s0 + i * cs.s1];
    for (int64_t i = 0; i < n; ++i)
        for (int64_t j = 0; j <= i; ++j)
            for (int64_t k = 0; k < B; ++k) ref[i * n + j] += int64_t(x[k * cs.s0 + i * cs.s1]) * x[k * cs.s0 + j * cs.s1];

    const int64_t nt = (n + kTile - 1) / kTile, tiles = nt * (nt + 1) / 2;
    const KPlan plan = plan_k(B, tiles, cs.sms, cs.k_block);
    const int64_t kmax = cs.k_block > 0 ? cs.k_block : kDefaultKBlock;
    EXPECT(plan.k_chunk % kBK == 0 && plan.k_chunk <= kMaxKBlock, "k_chunk %lld", (long long)plan.k_chunk);
    EXPECT(plan.k_chunk <= std::max<int64_t>(kBK, kmax), "k_chunk above the requested block");
    EXPECT(plan.splits * plan.k_chunk >= B && (plan.splits - 1) * plan.k_chunk < B, "K ranges do not tile [0, B)");

    const bool vec = cs.s1 == 1 && (reinterpret_cast<uintptr_t>(x) % 4 == 0) && cs.s0 % 4 == 0;
    std::vector<int> writes(n * n, 0);
    for (int64_t t = 0; t < tiles; ++t)
        for (int64_t split = 0; split < plan.splits; ++split) {
            if (vec)
                run_block<true>(x, cs, plan.k_chunk, t, split, colsum, s2, writes);
            else
                run_block<false>(x, cs, plan.k_chunk, t, split, colsum, s2, writes);
        }
    for (int64_t i = 0; i < n; ++i)
        for (int64_t j = 0; j < n; ++j) {
            if (j <= i) {
                EXPECT(writes[i * n + j] == plan.splits, "entry (%lld, %lld) written %d times",
                       (long long)i, (long long)j, writes[i * n + j]);
                EXPECT(s2[i * n + j] == ref[i * n + j], "s2[%lld, %lld] = %lld, want %lld", (long long)i,
                       (long long)j, (long long)s2[i * n + j], (long long)ref[i * n + j]);
            } else {
                EXPECT(writes[i * n + j] == 0, "above-diagonal entry (%lld, %lld) written", (long long)i, (long long)j);
            }
        }
    std::printf("%-40s B=%-7lld n=%-4lld vec=%d k_chunk=%-6lld splits=%-4lld %s\n", cs.name, (long long)B,
                (long long)n, int(vec), (long long)plan.k_chunk, (long long)plan.splits,
                failures == before ? "ok" : "FAILED");
}

}  // namespace

int main() {
    // tile map: every lower-triangle tile exactly once, in row-major order
    {
        int64_t t = 0;
        for (int64_t i = 0; i < 3000; ++i)
            for (int64_t j = 0; j <= i; ++j, ++t) {
                int64_t a, b;
                tile_coords(t, a, b);
                EXPECT(a == i && b == j, "tile %lld -> (%lld, %lld), want (%lld, %lld)", (long long)t,
                       (long long)a, (long long)b, (long long)i, (long long)j);
            }
        for (int64_t i : {46340LL, 65535LL, 65536LL}) {  // near the int32 grid limit
            int64_t a, b;
            tile_coords(i * (i + 1) / 2 + i, a, b);
            EXPECT(a == i && b == i, "large tile index");
        }
    }
    // unshift identity on every pair of byte values, one image
    for (int ui = 0; ui < 256; ++ui)
        for (int uj = 0; uj < 256; ++uj)
            EXPECT(unshift(int64_t(ui - 128) * (uj - 128), ui, uj, 1) == int64_t(ui) * uj, "unshift %d %d", ui, uj);

    const Case cases[] = {
        // name                                   B     n    s0   s1  off  k_block sms fill
        {"single image, n=5", 1, 5, 5, 1, 0, 0, 132, 0},
        {"odd shape n=33 B=37", 37, 33, 33, 1, 0, 0, 132, 0},
        {"n=70 B=130 (stages + tail)", 130, 70, 70, 1, 0, 0, 132, 0},
        {"vector path n=132 (4 tiles)", 150, 132, 132, 1, 0, 0, 132, 0},
        {"vector rows, ragged quad n=130", 70, 130, 132, 1, 0, 0, 132, 0},
        {"misaligned base -> byte path", 70, 132, 132, 1, 1, 0, 132, 0},
        {"transposed (column-major) x", 45, 40, 1, 45, 0, 0, 132, 0},
        {"broadcast rows (stride0 = 0)", 20, 9, 0, 1, 0, 0, 132, 0},
        {"K split by k_block=64, 3 tiles", 200, 136, 136, 1, 0, 64, 132, 0},
        {"K split by k_block=100 (-> 64)", 140, 20, 20, 1, 0, 100, 132, 0},
        {"K split for occupancy (8192 imgs)", 8192, 8, 8, 1, 0, 0, 132, 0},
        {"all zero: largest |s|, 2 ranges", 8000, 6, 6, 1, 0, 4096, 1, 1},
        {"all 255", 300, 12, 12, 1, 0, 0, 132, 2},
    };
    for (const Case& c : cases) run_case(c);

    // K plan at scale (no replay): the int32 bound holds for any B and k_block
    for (int64_t B : {1LL, 63LL, 64LL, 65LL, 131071LL, 131072LL, 131200LL, 1000000LL, 50000000LL})
        for (int64_t kb : {0LL, 1LL, 64LL, 100LL, 65536LL, 131071LL})
            for (int64_t tiles : {1LL, 21LL, 4656LL}) {
                const KPlan p = plan_k(B, tiles, 132, kb);
                EXPECT(p.k_chunk % kBK == 0 && p.k_chunk <= kMaxKBlock && p.k_chunk >= kBK, "plan chunk");
                EXPECT(p.splits * p.k_chunk >= B && (p.splits - 1) * p.k_chunk < B, "plan cover");
            }
    if (failures) {
        std::printf("%d check(s) failed\n", failures);
        return 1;
    }
    std::printf("all emulator checks passed\n");
    return 0;
}
