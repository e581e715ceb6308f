// CPU kernels of "locality_denoise" and "optimal_denoise" (docs/algorithms.md §5, §6): exact, fused,
// structure-aware.
//
// Cost model. The dense method does B*N*sum_m |window_m| multiply-adds per step. Here:
//   * pixels with identical windows form one group and share one distance;
//   * a window is a set of runs of consecutive pixel indices; with prefix sums P of the
//     squared differences over a segment of S pixels, a run costs 2 row adds (P[q], -P[p])
//     whatever its length and a lone pixel 1 (e[p]);
//   * a group may instead start from its parent's distance and add/drop the runs in which
//     the two windows differ (minimum spanning tree over groups, Hamming weights, kept
//     only where it saves adds);
//   * the adds go in fixed packets of 8 (branch-free inner loop, padded with a zero row).
// The plan (see locality_denoise.h) records all of that once per mask. On natural 32x32
// crops the windows of the middle DDIM steps are irregular (half their pixels are lone or
// in short runs), so this is ~2x fewer adds than the dense method there, and 100-3000x
// fewer at the high-noise steps (one group) and at t = 0 (tiny windows).
//
// Precision. float64 by default: squared differences are taken directly (x - a*y)^2, never
// expanded; a lookup P[q] - P[p] loses at most |P| * 2^-53 with |P| bounded by one segment's
// sum, so distances are good to ~1e-13 relative even at t = 0, where the logit scale is
// ~5000 (a float32 chain is not: 1e-7 relative error there is a logit error of 1e-3).
// For float32 queries, when the error bound allows (see locality_denoise.h), distances are
// instead exact uint32 sums of squares rounded to ~20 bits: 16 images per vector, twice the
// rate, output error measured <= 3e-6 relative on the benchmark's steps t >= 100.
//
// Layout per thread, per block of 8 training images (one zmm of float64 per pixel; the
// fixed-point path takes 16 images, one zmm of uint32):
//   Yt [n][8]        the images, transposed and converted (read uint8 directly)
//   Ys [8][n]        the same image-major, pixels in slot order (grouped)
//   L  [3S + 2][8]   e, P and -P of one segment: 32 KiB for S = 168, so lookups hit L1
//   dtot [G][8]      distances (relative to the parent until resolved)
// and the softmax state [B][G] (max, sum: shared by a group's pixels) plus [B][n] sums, in
// slot order: a group's pixels are contiguous, so its sums update with vector FMAs, and
// eight one-pixel groups update together (transposed, no horizontal reductions).
// Work units (fixed slices of each chunk's images, each with its own state) run under a
// dynamic schedule and merge exactly (docs/algorithms.md §5.3 rule) in unit order at the chunk's end.

#include "locality_denoise.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <new>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <vector>

#if defined(__x86_64__) || defined(__i386__) || defined(_M_X64)
#include <immintrin.h>
#endif

#include "../common/convert.h"
#include "../common/macros.h"

// Same dispatch scheme as moments.cpp: with GCC/Clang on x86 the AVX-512 kernel is always
// compiled (target region) and chosen from CPUID at run time.
#if (defined(__GNUC__) || defined(__clang__)) && (defined(__x86_64__) || defined(__i386__))
#define AD_LD_DISPATCH 1
#else
#define AD_LD_DISPATCH 0
#endif

#include "../common/cpu_runtime.h"

namespace analytic_diffusion {
namespace {

using cpu_runtime::aligned_array;
using cpu_runtime::FreeDeleter;
using cpu_runtime::team_size;
using cpu_runtime::thread_index;

using cpu_runtime::ceil_div;

// L of a segment is (3S + 2) rows of 64 B: 168 -> 32.4 KiB, leaving L1d room for the
// packet stream and the distances.
constexpr int64_t kDefaultSegment = 168;
// exp(x) for x below this is taken as 0 (see v_exp_nonpos): e^-690 ~ 3e-300 keeps every
// weight, and weight * |y| products, normal.
constexpr double kExpFloor = -690.0;
constexpr int64_t kMaxSegment = 340;  // byte offsets into L (3S + 2 rows of 64 B) fit 16 bits

bool cpu_has_avx512() {
#if AD_LD_DISPATCH
    static const bool yes = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq");
    return yes;
#else
    return false;
#endif
}

// ======================================================================== plan building
// Bit j of word j/64 of a window's bitset is pixel j.
using Bits = std::vector<uint64_t>;

// Runs of a bitset restricted to segments: calls f(p, q, seg) for every maximal run [p, q)
// of set bits that does not cross a multiple of S (a run that does is cut there).
template <typename F>
void for_each_run(const uint64_t* w, int64_t n, int64_t S, F&& f) {
    int64_t j = 0;
    while (j < n) {
        const uint64_t word = w[j >> 6] >> (j & 63);
        if (word == 0) {  // no set bit left in this word
            j = (j | 63) + 1;
            continue;
        }
        j += __builtin_ctzll(word);
        if (j >= n) break;
        // first clear bit after j (bits past n are clear)
        int64_t q = j;
        while (q < n) {
            const uint64_t clear = ~w[q >> 6] >> (q & 63);
            if (clear == 0) {
                q = (q | 63) + 1;
                continue;
            }
            q += __builtin_ctzll(clear);
            break;
        }
        const int64_t end = std::min({q, n, (j / S + 1) * S});
        f(j, end, j / S);
        j = end;
    }
}

// Row adds for the runs of a set (cut at segment boundaries): an added lone pixel is one
// (e_p), any other run two (P_q and -P_p); dropped runs always take two.
int64_t lookups_of(const uint64_t* w, int64_t n, int64_t S, bool dropped) {
    int64_t c = 0;
    for_each_run(w, n, S, [&](int64_t p, int64_t q, int64_t) { c += (!dropped && q - p == 1) ? 1 : 2; });
    return c;
}

int64_t popcount_words(const uint64_t* w, int64_t W) {
    int64_t c = 0;
    for (int64_t i = 0; i < W; ++i) c += __builtin_popcountll(w[i]);
    return c;
}

int64_t hamming(const uint64_t* a, const uint64_t* b, int64_t W) {
    int64_t c = 0;
    for (int64_t i = 0; i < W; ++i) c += __builtin_popcountll(a[i] ^ b[i]);
    return c;
}

// Prim's algorithm over the groups plus a virtual empty root, Hamming distance as weight
// (edge to the root: the window size). Hamming is a proxy for the lookup cost that costs
// one popcount per word; the final choice between parent and direct uses true lookups.
// Returns the visiting order (parent before child) and each group's parent (-1: root).
void prim(const std::vector<uint64_t>& bits, int64_t G, int64_t W,
          std::vector<int32_t>& order, std::vector<int32_t>& par) {
    std::vector<int64_t> best(static_cast<size_t>(G));
    std::vector<uint8_t> done(static_cast<size_t>(G), 0);
    par.assign(static_cast<size_t>(G), -1);
    order.clear();
    order.reserve(static_cast<size_t>(G));
    for (int64_t g = 0; g < G; ++g) best[g] = popcount_words(&bits[g * W], W);
    for (int64_t it = 0; it < G; ++it) {
        int64_t u = -1;
        for (int64_t g = 0; g < G; ++g)
            if (!done[g] && (u < 0 || best[g] < best[u])) u = g;
        done[u] = 1;
        order.push_back(static_cast<int32_t>(u));
        const uint64_t* bu = &bits[u * W];
        // Single-threaded on purpose: G parallel regions of microseconds each stall for a
        // scheduler time slice apiece when other processes hold the cores (measured: 25 s
        // instead of 0.2 s for G = 3072 on a busy 2-core machine).
        for (int64_t g = 0; g < G; ++g) {
            if (done[g]) continue;
            const int64_t h = hamming(bu, &bits[g * W], W);
            if (h < best[g]) {
                best[g] = h;
                par[g] = static_cast<int32_t>(u);
            }
        }
    }
}

// Fills the plan's packets from the group bitsets (already in plan order) and parents.
void emit_packets(LocalityPlan& P, const std::vector<uint64_t>& bits, int64_t W) {
    const int64_t G = P.G, S = P.S, n = P.n, nseg = P.nseg;
    constexpr uint32_t kRow = kLdLanes * sizeof(double);
    const uint32_t e_row = 0, p_row = static_cast<uint32_t>(S), q_row = static_cast<uint32_t>(2 * S + 1);
    const uint16_t zero = static_cast<uint16_t>(p_row * kRow);  // P_0 = 0
    // per segment: (group, row offsets) of every group with adds there, in group order
    std::vector<std::vector<std::pair<int32_t, std::vector<uint16_t>>>> seg(static_cast<size_t>(nseg));
    Bits add(static_cast<size_t>(W)), sub(static_cast<size_t>(W));
    std::vector<std::vector<uint16_t>> rows(static_cast<size_t>(nseg));
    P.lookups = 0;
    for (int64_t g = 0; g < G; ++g) {
        const uint64_t* bg = &bits[g * W];
        if (P.parent[g] < 0) {
            std::copy(bg, bg + W, add.begin());
            std::fill(sub.begin(), sub.end(), 0);
        } else {
            const uint64_t* bp = &bits[static_cast<int64_t>(P.parent[g]) * W];
            for (int64_t i = 0; i < W; ++i) {
                add[i] = bg[i] & ~bp[i];
                sub[i] = bp[i] & ~bg[i];
            }
        }
        for (auto& r : rows) r.clear();
        auto row = [&](int64_t s, uint32_t base, int64_t i) {
            rows[s].push_back(static_cast<uint16_t>((base + static_cast<uint32_t>(i)) * kRow));
        };
        for_each_run(add.data(), n, S, [&](int64_t p, int64_t q, int64_t s) {
            p -= s * S;
            q -= s * S;
            if (q - p == 1) {
                row(s, e_row, p);
            } else {
                row(s, p_row, q);
                row(s, q_row, p);
            }
        });
        for_each_run(sub.data(), n, S, [&](int64_t p, int64_t q, int64_t s) {
            p -= s * S;
            q -= s * S;
            row(s, q_row, q);
            row(s, p_row, p);
        });
        bool any = false;
        for (int64_t s = 0; s < nseg; ++s) {
            if (rows[s].empty()) continue;
            any = true;
            P.lookups += static_cast<int64_t>(rows[s].size());
            seg[s].emplace_back(static_cast<int32_t>(g), rows[s]);
        }
        if (!any) seg[0].emplace_back(static_cast<int32_t>(g), std::vector<uint16_t>{});  // empty window: d = 0
    }
    // Packets, round-robin over batches of consecutive entries: consecutive packets then
    // rarely update the same group, whose read-add-write would chain their latencies.
    constexpr size_t kBatch = 8;
    P.seg_packet_off.assign(static_cast<size_t>(nseg + 1), 0);
    P.packet_rows.clear();
    P.packet_group.clear();
    std::vector<uint8_t> seen(static_cast<size_t>(G), 0);
    for (int64_t s = 0; s < nseg; ++s) {
        P.seg_packet_off[s] = static_cast<uint32_t>(P.packet_group.size());
        auto& ents = seg[s];
        for (size_t e0 = 0; e0 < ents.size(); e0 += kBatch) {
            const size_t e1 = std::min(ents.size(), e0 + kBatch);
            for (size_t k = 0;; ++k) {
                bool emitted = false;
                for (size_t e = e0; e < e1; ++e) {
                    const auto& r = ents[e].second;
                    const size_t np = std::max<size_t>(1, (r.size() + kLdPacket - 1) / kLdPacket);
                    if (k >= np) continue;
                    emitted = true;
                    for (int64_t i = 0; i < kLdPacket; ++i) {
                        const size_t at = k * kLdPacket + static_cast<size_t>(i);
                        P.packet_rows.push_back(at < r.size() ? r[at] : zero);
                    }
                    const int32_t g = ents[e].first;
                    P.packet_group.push_back(static_cast<uint32_t>(g) | (seen[g] ? 0u : 1u << kLdFirstBit));
                    seen[g] = 1;
                }
                if (!emitted) break;
            }
        }
        if (P.packet_group.size() > UINT32_MAX) throw std::length_error("locality plan: too many packets");
    }
    P.seg_packet_off[nseg] = static_cast<uint32_t>(P.packet_group.size());
    P.padded_lookups = static_cast<int64_t>(P.packet_rows.size());
}

// Groups the columns, orders them, picks parents and emits terms.
void finish_plan(LocalityPlan& P, const std::vector<uint64_t>& colbits, bool use_tree) {
    const int64_t n = P.n, W = ceil_div(n, 64);
    // group identical columns, numbered by first pixel
    std::unordered_map<uint64_t, std::vector<int32_t>> buckets;
    std::vector<int32_t> first_pixel;
    P.group_of_pixel.assign(static_cast<size_t>(n), -1);
    for (int64_t m = 0; m < n; ++m) {
        const uint64_t* c = &colbits[m * W];
        uint64_t h = 1469598103934665603ull;
        for (int64_t i = 0; i < W; ++i) h = (h ^ c[i]) * 1099511628211ull ^ (h >> 29);
        auto& cand = buckets[h];
        int32_t found = -1;
        for (int32_t g : cand)
            if (std::equal(c, c + W, &colbits[static_cast<int64_t>(first_pixel[g]) * W])) {
                found = g;
                break;
            }
        if (found < 0) {
            found = static_cast<int32_t>(first_pixel.size());
            first_pixel.push_back(static_cast<int32_t>(m));
            cand.push_back(found);
        }
        P.group_of_pixel[m] = found;
    }
    const int64_t G = static_cast<int64_t>(first_pixel.size());
    P.G = G;
    std::vector<uint64_t> gbits(static_cast<size_t>(G * W));
    for (int64_t g = 0; g < G; ++g)
        std::copy(&colbits[static_cast<int64_t>(first_pixel[g]) * W],
                  &colbits[static_cast<int64_t>(first_pixel[g]) * W] + W, &gbits[g * W]);
    // order and parents
    std::vector<int32_t> order, par;
    // Prim costs G^2 * W word operations; past ~2^33 (n ~ 10^4) it would take seconds, so
    // such plans compute every group directly.
    if (use_tree && G > 1 && static_cast<double>(G) * G * W < 8.6e9) {
        prim(gbits, G, W, order, par);
    } else {
        order.resize(static_cast<size_t>(G));
        for (int64_t g = 0; g < G; ++g) order[g] = static_cast<int32_t>(g);
        par.assign(static_cast<size_t>(G), -1);
    }
    // keep a parent only where it saves lookups
    P.direct_lookups = 0;
    Bits tmp(static_cast<size_t>(W));
    for (int64_t g = 0; g < G; ++g) {
        const int64_t direct = lookups_of(&gbits[g * W], n, P.S, false);
        P.direct_lookups += direct;
        if (par[g] < 0) continue;
        const uint64_t* a = &gbits[g * W];
        const uint64_t* b = &gbits[static_cast<int64_t>(par[g]) * W];
        for (int64_t k = 0; k < W; ++k) tmp[k] = a[k] & ~b[k];
        int64_t via = lookups_of(tmp.data(), n, P.S, false);
        for (int64_t k = 0; k < W; ++k) tmp[k] = b[k] & ~a[k];
        via += lookups_of(tmp.data(), n, P.S, true);
        if (via >= direct) par[g] = -1;
    }
    // Number the one-pixel groups first, by pixel, then the others in visiting order: the
    // softmax stage takes eight consecutive one-pixel groups at a time, and the tree needs
    // no particular numbering (resolve_order carries the parent-first order).
    std::vector<int64_t> gsize(static_cast<size_t>(G), 0);
    for (int64_t m = 0; m < n; ++m) gsize[P.group_of_pixel[m]] += 1;
    std::vector<int32_t> rank(static_cast<size_t>(G), -1);
    int32_t next = 0;
    for (int64_t m = 0; m < n; ++m) {
        const int32_t g = P.group_of_pixel[m];
        if (gsize[g] == 1) rank[g] = next++;
    }
    P.singletons = next;
    for (int64_t i = 0; i < G; ++i)
        if (rank[order[i]] < 0) rank[order[i]] = next++;
    std::vector<uint64_t> bits(static_cast<size_t>(G * W));
    P.parent.assign(static_cast<size_t>(G), -1);
    for (int64_t g = 0; g < G; ++g) {
        std::copy(&gbits[g * W], &gbits[g * W] + W, &bits[static_cast<int64_t>(rank[g]) * W]);
        if (par[g] >= 0) P.parent[rank[g]] = rank[par[g]];
    }
    P.resolve_order.clear();
    P.tree = false;
    std::vector<int64_t> depth(static_cast<size_t>(G), 0);
    P.max_depth = 0;
    for (int64_t i = 0; i < G; ++i) {
        const int32_t g = rank[order[i]];
        if (P.parent[g] < 0) continue;
        P.tree = true;
        P.resolve_order.push_back(g);
        depth[g] = depth[P.parent[g]] + 1;
        P.max_depth = std::max(P.max_depth, depth[g]);
    }
    // slots: pixels sorted by group, ascending within a group
    P.group_offsets.assign(static_cast<size_t>(G + 1), 0);
    for (int64_t m = 0; m < n; ++m) {
        const int32_t gi = rank[P.group_of_pixel[m]];
        P.group_of_pixel[m] = gi;
        P.group_offsets[gi + 1] += 1;
    }
    for (int64_t i = 0; i < G; ++i) P.group_offsets[i + 1] += P.group_offsets[i];
    P.group_pixels.assign(static_cast<size_t>(n), 0);
    std::vector<int32_t> fill(P.group_offsets.begin(), P.group_offsets.end() - 1);
    for (int64_t m = 0; m < n; ++m) P.group_pixels[fill[P.group_of_pixel[m]]++] = static_cast<int32_t>(m);
    P.area = 0;
    for (int64_t i = 0; i < G; ++i)
        P.area += popcount_words(&bits[i * W], W) * (P.group_offsets[i + 1] - P.group_offsets[i]);
    P.full = G == 1 && P.area == n * n;
    P.max_window = 0;
    for (int64_t i = 0; i < G; ++i) P.max_window = std::max(P.max_window, popcount_words(&bits[i * W], W));
    emit_packets(P, bits, W);
}

int64_t check_segment(int64_t segment) {
    const int64_t S = segment == 0 ? kDefaultSegment : segment;
    if (S < 1 || S > kMaxSegment)
        throw std::invalid_argument("locality plan: segment must be in [1, 340] (0 = default)");
    return S;
}

}  // namespace

LocalityPlan locality_plan_build(uintptr_t mask_ptr, int64_t n, int64_t s0, int64_t s1,
                                 int64_t segment, bool use_tree) {
    const auto t0 = std::chrono::steady_clock::now();
    if (n < 1) throw std::invalid_argument("locality_plan_build: n must be >= 1");
    if (n > (int64_t(1) << 30)) throw std::invalid_argument("locality_plan_build: n too large");
    if (mask_ptr == 0) throw std::invalid_argument("locality_plan_build: null mask");
    LocalityPlan P;
    P.n = n;
    P.S = check_segment(segment);
    P.nseg = ceil_div(n, P.S);
    const int64_t W = ceil_div(n, 64);
    const auto* mask = reinterpret_cast<const uint8_t*>(mask_ptr);
    std::vector<uint64_t> colbits(static_cast<size_t>(n * W), 0);
    // Row j of the mask sets bit j in every column's bitset; rows are read in order.
    for (int64_t j = 0; j < n; ++j) {
        const uint8_t* row = mask + j * s0;
        const uint64_t bit = uint64_t(1) << (j & 63);
        uint64_t* dst = colbits.data() + (j >> 6);
        for (int64_t m = 0; m < n; ++m)
            if (row[m * s1]) dst[m * W] |= bit;
    }
    finish_plan(P, colbits, use_tree);
    P.build_seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    return P;
}

LocalityPlan locality_plan_full(int64_t n, int64_t segment) {
    const auto t0 = std::chrono::steady_clock::now();
    if (n < 1) throw std::invalid_argument("locality_plan_full: n must be >= 1");
    LocalityPlan P;
    P.n = n;
    P.S = check_segment(segment);
    P.nseg = ceil_div(n, P.S);
    const int64_t W = ceil_div(n, 64);
    std::vector<uint64_t> colbits(static_cast<size_t>(n * W), 0);
    for (int64_t m = 0; m < n; ++m)
        for (int64_t j = 0; j < n; ++j) colbits[m * W + (j >> 6)] |= uint64_t(1) << (j & 63);
    finish_plan(P, colbits, false);
    P.build_seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    return P;
}

// ======================================================================== kernels
namespace {

#if AD_LD_DISPATCH
AD_AVX512_REGION_BEGIN
#define LD_NS ld_avx512
#define LD_SIMD 1
#include "locality_kernel.inc"
#undef LD_SIMD
#undef LD_NS
AD_AVX512_REGION_END
#endif

#define LD_NS ld_portable
#define LD_SIMD 0
#include "locality_kernel.inc"
#undef LD_SIMD
#undef LD_NS

using BlockFn = void (*)(const LocalityPlan&, const double*, int64_t, const double*, const double*,
                         int, double, double, double*, double*, double*, double*, double*);
using BlockU32Fn = void (*)(const LocalityPlan&, const double*, int64_t, const double*, const double*,
                            const float*, const double*, int, double, double, uint32_t*, uint32_t*,
                            double*, double*, double*, double*);

// Training images [k0, k0 + nvalid) -> Yt [n][8] (pixel-major, for the distances) and
// Ys [8][n] (image-major in slot order, for the weighted sums), float64, zero in the padding
// lanes. uint8 goes through a table of the exact values of docs/algorithms.md §1.1.
template <typename T, typename F>
void fill_tile_as(double* Yt, double* Ys, const int32_t* slot_pixel, const T* base, int64_t k0,
                  int nvalid, int64_t n, int64_t ts0, int64_t ts1, F&& conv) {
    const T* rows[kLdLanes];
    for (int q = 0; q < nvalid; ++q) rows[q] = base + (k0 + q) * ts0;
    if (nvalid < kLdLanes) std::fill(Ys + nvalid * n, Ys + kLdLanes * n, 0.0);
    if (Yt == nullptr) {  // one-group plan: slots are the pixels in order, no transposed tile
        for (int q = 0; q < nvalid; ++q)
            for (int64_t j = 0; j < n; ++j) Ys[q * n + j] = conv(rows[q][j * ts1]);
        return;
    }
    if (nvalid < kLdLanes) std::fill(Yt, Yt + n * kLdLanes, 0.0);
    for (int64_t j = 0; j < n; ++j)
        for (int q = 0; q < nvalid; ++q) Yt[j * kLdLanes + q] = conv(rows[q][j * ts1]);
    for (int q = 0; q < nvalid; ++q)
        for (int64_t i = 0; i < n; ++i) Ys[q * n + i] = Yt[static_cast<int64_t>(slot_pixel[i]) * kLdLanes + q];
}

// The fixed-point path's tile: 16 images, Yt [n][16] float32 (y to ~6e-8, far below the
// rounding of the fixed-point squares), Ys [16][n] float64 in slot order.
template <typename T, typename F>
void fill_tile16_as(float* Yt, double* Ys, const int32_t* slot_pixel, const T* base, int64_t k0,
                    int nvalid, int64_t n, int64_t ts0, int64_t ts1, F&& conv) {
    constexpr int kU = 2 * kLdLanes;
    const T* rows[kU];
    for (int q = 0; q < nvalid; ++q) rows[q] = base + (k0 + q) * ts0;
    if (nvalid < kU) {
        std::fill(Ys + nvalid * n, Ys + kU * n, 0.0);
        std::fill(Yt, Yt + n * kU, 0.0f);
    }
    for (int q = 0; q < nvalid; ++q)
        for (int64_t j = 0; j < n; ++j) Yt[j * kU + q] = static_cast<float>(conv(rows[q][j * ts1]));
    for (int q = 0; q < nvalid; ++q)
        for (int64_t i = 0; i < n; ++i) Ys[q * n + i] = conv(rows[q][static_cast<int64_t>(slot_pixel[i]) * ts1]);
}

void fill_tile16(float* Yt, double* Ys, const int32_t* slot_pixel, uintptr_t train_ptr, int kind,
                 int64_t k0, int nvalid, int64_t n, int64_t ts0, int64_t ts1, const double* lut) {
    if (kind == 0)
        fill_tile16_as(Yt, Ys, slot_pixel, reinterpret_cast<const uint8_t*>(train_ptr), k0, nvalid, n,
                       ts0, ts1, [lut](uint8_t u) { return lut[u]; });
    else if (kind == 1)
        fill_tile16_as(Yt, Ys, slot_pixel, reinterpret_cast<const float*>(train_ptr), k0, nvalid, n,
                       ts0, ts1, [](float v) { return static_cast<double>(v); });
    else
        fill_tile16_as(Yt, Ys, slot_pixel, reinterpret_cast<const double*>(train_ptr), k0, nvalid, n,
                       ts0, ts1, [](double v) { return v; });
}

void fill_tile(double* Yt, double* Ys, const int32_t* slot_pixel, uintptr_t train_ptr, int kind,
               int64_t k0, int nvalid, int64_t n, int64_t ts0, int64_t ts1, const double* lut) {
    if (kind == 0)
        fill_tile_as(Yt, Ys, slot_pixel, reinterpret_cast<const uint8_t*>(train_ptr), k0, nvalid, n,
                     ts0, ts1, [lut](uint8_t u) { return lut[u]; });
    else if (kind == 1)
        fill_tile_as(Yt, Ys, slot_pixel, reinterpret_cast<const float*>(train_ptr), k0, nvalid, n,
                     ts0, ts1, [](float v) { return static_cast<double>(v); });
    else
        fill_tile_as(Yt, Ys, slot_pixel, reinterpret_cast<const double*>(train_ptr), k0, nvalid, n,
                     ts0, ts1, [](double v) { return v; });
}

}  // namespace

bool locality_has_avx512() { return cpu_has_avx512(); }

FullDistancesFn full_distances_kernel(bool force_portable) {
#if AD_LD_DISPATCH
    if (!force_portable && cpu_has_avx512()) return ld_avx512::full_distances8;
#endif
    (void)force_portable;
    return ld_portable::full_distances8;
}

void fill_block_rows(double* Ys, uintptr_t train_ptr, int train_kind, int64_t k0, int nvalid,
                     int64_t n, int64_t ts0, int64_t ts1, const double* lut) {
    fill_tile(nullptr, Ys, nullptr, train_ptr, train_kind, k0, nvalid, n, ts0, ts1, lut);
}

bool locality_denoise_run(const LocalityPlan& plan, uintptr_t x_ptr, int64_t B, int64_t xs0,
                          int64_t xs1, bool x_is_double, uintptr_t train_ptr, int64_t N,
                          int64_t ts0, int64_t ts1, int train_kind, double a, double scale,
                          int64_t chunk, uintptr_t out_ptr, bool out_is_double, uintptr_t mx_ptr,
                          uintptr_t l_ptr, uintptr_t acc_ptr, bool allow_fixed, bool force_portable) {
    const int64_t n = plan.n, G = plan.G, S = plan.S;
    if (B < 1 || N < 1) throw std::invalid_argument("locality_denoise_run: need B >= 1 and N >= 1");
    if (x_ptr == 0 || train_ptr == 0) throw std::invalid_argument("locality_denoise_run: null input");
    if (train_kind < 0 || train_kind > 2) throw std::invalid_argument("locality_denoise_run: bad train_kind");
    if (chunk < 0) throw std::invalid_argument("locality_denoise_run: chunk must be >= 0");
    if (chunk > 0 && (mx_ptr || l_ptr || acc_ptr))
        throw std::invalid_argument("locality_denoise_run: states exist only in exact mode (chunk = 0)");
    if (!(a > 0.0) || !(scale > 0.0) || !std::isfinite(scale))
        throw std::invalid_argument("locality_denoise_run: a and scale must be positive and finite");

    BlockFn block = plan.full ? ld_portable::process_block_full : ld_portable::process_block;
    BlockU32Fn block_u32 = ld_portable::process_block_u32;
#if AD_LD_DISPATCH
    if (!force_portable && cpu_has_avx512()) {
        block = plan.full ? ld_avx512::process_block_full : ld_avx512::process_block;
        block_u32 = ld_avx512::process_block_u32;
    }
#endif

    // queries as contiguous float64 (small: B * n)
    auto xd = aligned_array<double>(B * n);
    for (int64_t b = 0; b < B; ++b)
        for (int64_t j = 0; j < n; ++j)
            xd[b * n + j] = x_is_double ? reinterpret_cast<const double*>(x_ptr)[b * xs0 + j * xs1]
                                        : static_cast<double>(reinterpret_cast<const float*>(x_ptr)[b * xs0 + j * xs1]);
    double lut[256];
    for (int u = 0; u < 256; ++u) lut[u] = dequantize_u8_value<double>(static_cast<uint8_t>(u));

    // Fixed point: shift base = min over y in [-1, 1] of (x - a y)^2, so the shifted squares
    // lie in [0, 4a max(|x|, a)]; f maps the largest onto (2^32 - 1) / n, so that no window
    // sum of n of them wraps. The one-group plan has its own cheaper float64 path.
    std::unique_ptr<double[], FreeDeleter> base, fq;
    bool fixed = false;
    if (allow_fixed && !plan.full && n <= (int64_t(1) << 16)) {
        base = aligned_array<double>(B * n);
        fq = aligned_array<double>(B);
        const double qmax = std::floor(4294967295.0 / static_cast<double>(n));
        double fmin = std::numeric_limits<double>::infinity();
        for (int64_t b = 0; b < B; ++b) {
            double top = a * a;
            for (int64_t j = 0; j < n; ++j) {
                const double ax = std::fabs(xd[b * n + j]);
                base[b * n + j] = ax > a ? (ax - a) * (ax - a) : 0.0;
                top = std::max(top, ax);
            }
            // 1e-12 relative headroom: the rounded (x - a y)^2 - base may exceed 4 a top by ulps
            fq[b] = qmax / (4.0 * a * std::max(top, a) * (1.0 + 1e-12));
            fmin = std::min(fmin, fq[b]);
        }
        const double est = std::sqrt(static_cast<double>(plan.max_window) / 12.0) * scale / fmin;
        fixed = std::isfinite(est) && est <= kLdFixedMaxLogitError;
    }
    const int64_t lanes = fixed ? 2 * kLdLanes : kLdLanes;

    const int64_t cs = chunk == 0 ? N : chunk;
    const int64_t nchunks = ceil_div(N, cs);
    const int nt = team_size();

    // Work units: each chunk's blocks are split into contiguous units with their own softmax
    // state, run in any order by any thread (dynamic schedule: a thread the OS preempts does
    // not hold up the others) and merged in unit order, so the result depends neither on
    // the thread count (up to kUnits threads) nor on the schedule. WSSM chunks go in waves
    // of at most `umax` units.
    constexpr int64_t kUnits = 16;
    constexpr double kStateBudget = 512.0 * (1 << 20);  // bytes of unit states
    const int64_t state_len = B * (2 * G + n);
    const int64_t fit = static_cast<int64_t>(kStateBudget / (8.0 * static_cast<double>(state_len)));
    const int64_t umax = std::max<int64_t>(nt, std::min<int64_t>(kUnits, fit));
    const int64_t wave_chunks = std::min<int64_t>(nchunks, umax);
    const int64_t per_chunk = std::max<int64_t>(1, umax / wave_chunks);

    // per thread: Yt (float64 [n][8], or float32 [n][16] = the same bytes), Ys [lanes][n],
    // L (rows of 64 B), distances [G][8] float64, and for fixed point [G][16] uint32
    const int64_t scratch_len = n * kLdLanes + lanes * n + (3 * S + 2) * kLdLanes + G * kLdLanes +
                                (fixed ? G * kLdLanes : 0);
    std::vector<std::unique_ptr<double[], FreeDeleter>> state, scratch;
    for (int64_t u = 0; u < umax; ++u) state.push_back(aligned_array<double>(state_len));
    for (int t = 0; t < nt; ++t) scratch.push_back(aligned_array<double>(scratch_len));
    std::unique_ptr<double[], FreeDeleter> num;
    if (chunk > 0) {
        num = aligned_array<double>(B * n);
        std::fill(num.get(), num.get() + B * n, 0.0);
    }
    const int32_t* goff = plan.group_offsets.data();
    const int32_t* gpix = plan.group_pixels.data();
    auto* out_d = reinterpret_cast<double*>(out_ptr);
    auto* out_f = reinterpret_cast<float*>(out_ptr);
    auto* mx_out = reinterpret_cast<double*>(mx_ptr);
    auto* l_out = reinterpret_cast<double*>(l_ptr);
    auto* acc_out = reinterpret_cast<double*>(acc_ptr);
    std::vector<int64_t> unit_lo, unit_hi, chunk_unit0;

    for (int64_t w0 = 0; w0 < nchunks; w0 += wave_chunks) {
        const int64_t w1 = std::min(nchunks, w0 + wave_chunks);
        // units of this wave: images [unit_lo, unit_hi), chunk by chunk (chunk_unit0)
        unit_lo.clear();
        unit_hi.clear();
        chunk_unit0.clear();
        for (int64_t c = w0; c < w1; ++c) {
            const int64_t c0 = c * cs, c1 = std::min(N, c0 + cs);
            const int64_t nblk = ceil_div(c1 - c0, lanes);
            const int64_t nu = std::min(nblk, per_chunk);
            chunk_unit0.push_back(static_cast<int64_t>(unit_lo.size()));
            for (int64_t u = 0; u < nu; ++u) {
                unit_lo.push_back(c0 + (nblk * u / nu) * lanes);
                unit_hi.push_back(std::min(c1, c0 + (nblk * (u + 1) / nu) * lanes));
            }
        }
        chunk_unit0.push_back(static_cast<int64_t>(unit_lo.size()));
        const int64_t nunits = static_cast<int64_t>(unit_lo.size());
        const int team = static_cast<int>(std::min<int64_t>(nt, nunits));
#if defined(_OPENMP)
#pragma omp parallel num_threads(team) if (team > 1)
#endif
        {
            double* Yt = scratch[thread_index()].get();
            double* Ys = Yt + n * kLdLanes;
            double* L = Ys + lanes * n;
            double* dtot = L + (3 * S + 2) * kLdLanes;
            auto* dq = reinterpret_cast<uint32_t*>(dtot + G * kLdLanes);
#if defined(_OPENMP)
#pragma omp for schedule(dynamic, 1)
#endif
            for (int64_t u = 0; u < nunits; ++u) {
                double* mx = state[u].get();
                double* l = mx + B * G;
                double* acc = l + B * G;
                std::fill(mx, mx + B * G, -std::numeric_limits<double>::infinity());
                std::fill(l, l + B * G, 0.0);
                std::fill(acc, acc + B * n, 0.0);
                for (int64_t k0 = unit_lo[u]; k0 < unit_hi[u]; k0 += lanes) {
                    const int nvalid = static_cast<int>(std::min<int64_t>(lanes, unit_hi[u] - k0));
                    if (fixed) {
                        auto* Yf = reinterpret_cast<float*>(Yt);
                        fill_tile16(Yf, Ys, gpix, train_ptr, train_kind, k0, nvalid, n, ts0, ts1, lut);
                        block_u32(plan, xd.get(), B, base.get(), fq.get(), Yf, Ys, nvalid, a, scale,
                                  reinterpret_cast<uint32_t*>(L), dq, dtot, mx, l, acc);
                    } else {
                        fill_tile(plan.full ? nullptr : Yt, Ys, gpix, train_ptr, train_kind, k0, nvalid, n, ts0, ts1, lut);
                        block(plan, xd.get(), B, Yt, Ys, nvalid, a, scale, L, dtot, mx, l, acc);
                    }
                }
            }
            // docs/algorithms.md §5.3 merge of the units of each chunk, per (query, group); WSSM adds the
            // chunks' softmax means in chunk order
#if defined(_OPENMP)
#pragma omp for schedule(static)
#endif
            for (int64_t bg = 0; bg < B * G; ++bg) {
                const int64_t b = bg / G, g = bg % G;
                double corr[kUnits];
                std::unique_ptr<double[]> corr_heap;
                double* cf = corr;
                if (umax > kUnits) {
                    corr_heap.reset(new double[umax]);
                    cf = corr_heap.get();
                }
                for (int64_t ci = 0; ci < w1 - w0; ++ci) {
                    const int64_t u0 = chunk_unit0[ci], u1 = chunk_unit0[ci + 1];
                    double M = -std::numeric_limits<double>::infinity();
                    for (int64_t u = u0; u < u1; ++u) M = std::max(M, state[u][bg]);
                    double Ls = 0.0;
                    for (int64_t u = u0; u < u1; ++u) {
                        const double dm = state[u][bg] - M;
                        cf[u - u0] = dm >= kExpFloor ? std::exp(dm) : 0.0;
                        Ls += state[u][B * G + bg] * cf[u - u0];
                    }
                    if (mx_out) mx_out[bg] = M;
                    if (l_out) l_out[bg] = Ls;
                    for (int32_t i = goff[g]; i < goff[g + 1]; ++i) {
                        const int64_t m = gpix[i];
                        double A = 0.0;
                        for (int64_t u = u0; u < u1; ++u) A += state[u][2 * B * G + b * n + i] * cf[u - u0];
                        if (chunk > 0) {
                            num[b * n + m] += A / Ls;
                        } else {
                            if (acc_out) acc_out[b * n + m] = A;
                            if (out_ptr) {
                                if (out_is_double)
                                    out_d[b * n + m] = A / Ls;
                                else
                                    out_f[b * n + m] = static_cast<float>(A / Ls);
                            }
                        }
                    }
                }
            }
        }
    }
    if (chunk > 0 && out_ptr) {
        // every chunk's softmax weights sum to 1, so the official denominator is the count
        const double den = static_cast<double>(nchunks) + 1e-8;
        for (int64_t i = 0; i < B * n; ++i) {
            if (out_is_double)
                out_d[i] = num[i] / den;
            else
                out_f[i] = static_cast<float>(num[i] / den);
        }
    }
    return fixed;
}

}  // namespace analytic_diffusion

// ======================================================================== pruned runs
namespace analytic_diffusion {
namespace {

// Training image k -> dst [n] float64 in [-1, 1] (uint8 through the exact table).
void gather_row(double* dst, uintptr_t train_ptr, int kind, int64_t k, int64_t n, int64_t ts0, int64_t ts1,
                const double* lut) {
    if (kind == 0) {
        const uint8_t* r = reinterpret_cast<const uint8_t*>(train_ptr) + k * ts0;
        for (int64_t j = 0; j < n; ++j) dst[j] = lut[r[j * ts1]];
    } else if (kind == 1) {
        const float* r = reinterpret_cast<const float*>(train_ptr) + k * ts0;
        for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<double>(r[j * ts1]);
    } else {
        const double* r = reinterpret_cast<const double*>(train_ptr) + k * ts0;
        for (int64_t j = 0; j < n; ++j) dst[j] = r[j * ts1];
    }
}


#if AD_LD_DISPATCH
AD_AVX512_REGION_BEGIN
// eight uint8 pixels -> their grey levels as float64 (exact)
static AD_FORCEINLINE __m512d u8x8_grey(const uint8_t* p) {
    return _mm512_cvtepi32_pd(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}

// u8x8_exact / convert_u8_row_exact: the exact vector conversion of uint8 pixels. It replaces the
// scalar table lookup in the pruned runs, where the conversion costs more than the distance; used
// only where it reproduces the table for all 256 values (row_converter_ok).
#include "../common/u8_exact_avx512.h"

// The distances of Q queries to one uint8 image read in place, out[q] = ||xs[q] - a y||^2: per
// query the operations (and order) of ld_avx512::full_distances8 on the converted row, so the
// distances are the unpruned run's, bit for bit (the state's max logit stays exact). Each
// 32-pixel slice of the image is converted once (in registers) for all Q queries: a pruned run
// visits each surviving image for ~3 queries at t = 300, and the exact conversion costs more than
// the distance itself. No converted row is written anywhere (staging converted rows, 24 KB each
// at 32x32x3, ran out of L2 bandwidth). Q <= 4 keeps the 4Q accumulators in registers.
// Only where row_converter_ok.
template <int Q>
void distances_u8_multi(const double* const* xs, const uint8_t* y, int64_t n, double a, const double* lut,
                        double* out) {
    const __m512d va = _mm512_set1_pd(a);
    __m512d s[Q][4];
#pragma GCC unroll 4
    for (int q = 0; q < Q; ++q) s[q][0] = s[q][1] = s[q][2] = s[q][3] = _mm512_setzero_pd();
    int64_t j = 0;
    for (; j + 32 <= n; j += 32) {
        const __m512d y0 = u8x8_exact(y + j), y1 = u8x8_exact(y + j + 8), y2 = u8x8_exact(y + j + 16),
                      y3 = u8x8_exact(y + j + 24);
#pragma GCC unroll 4
        for (int q = 0; q < Q; ++q) {
            const double* xb = xs[q];
            const __m512d d0 = _mm512_fnmadd_pd(va, y0, _mm512_loadu_pd(xb + j));
            const __m512d d1 = _mm512_fnmadd_pd(va, y1, _mm512_loadu_pd(xb + j + 8));
            const __m512d d2 = _mm512_fnmadd_pd(va, y2, _mm512_loadu_pd(xb + j + 16));
            const __m512d d3 = _mm512_fnmadd_pd(va, y3, _mm512_loadu_pd(xb + j + 24));
            s[q][0] = _mm512_fmadd_pd(d0, d0, s[q][0]);
            s[q][1] = _mm512_fmadd_pd(d1, d1, s[q][1]);
            s[q][2] = _mm512_fmadd_pd(d2, d2, s[q][2]);
            s[q][3] = _mm512_fmadd_pd(d3, d3, s[q][3]);
        }
    }
    for (int q = 0; q < Q; ++q) {
        const double* xb = xs[q];
        double t = _mm512_reduce_add_pd(_mm512_add_pd(_mm512_add_pd(s[q][0], s[q][1]), _mm512_add_pd(s[q][2], s[q][3])));
        for (int64_t jj = j; jj < n; ++jj) {
            const double e = xb[jj] - a * lut[y[jj]];
            t += e * e;
        }
        out[q] = t;
    }
}

// distances_u8_multi for any number of queries, four at a time
void distances_u8_queries(const double* const* xs, int m, const uint8_t* y, int64_t n, double a, const double* lut,
                          double* out) {
    int g = 0;
    for (; g + 4 <= m; g += 4) distances_u8_multi<4>(xs + g, y, n, a, lut, out + g);
    switch (m - g) {
        case 3: distances_u8_multi<3>(xs + g, y, n, a, lut, out + g); break;
        case 2: distances_u8_multi<2>(xs + g, y, n, a, lut, out + g); break;
        case 1: distances_u8_multi<1>(xs + g, y, n, a, lut, out + g); break;
        default: break;
    }
}

// The online-softmax update of one query with the distances d of a block of nvalid uint8
// images (ld_avx512::update_group's rule), the weighted sums kept in grey levels:
// accu[m] = sum_k p_k u_k[m], so that acc = accu / 127.5 - l (sum_k p_k y_k) needs no
// conversion of the images, only u -> float64 (exact).
void softmax_update_u8(const double* d, const uint8_t* const* rows, int nvalid, int64_t n, double scale,
                       double& mx, double& l, double* accu) {
    __m512d lg = _mm512_mul_pd(_mm512_loadu_pd(d), _mm512_set1_pd(-scale));
    if (nvalid < kLdLanes) lg = ld_avx512::v_pad_neg_inf(lg, nvalid);
    const double bm = _mm512_reduce_max_pd(lg);
    if (bm > mx) {  // a new maximum: rescale the sums (exp(-inf) = 0 at the start)
        const double corr = mx - bm >= kExpFloor ? std::exp(mx - bm) : 0.0;
        l *= corr;
        ld_avx512::range_scale(accu, 0, n, corr);
        mx = bm;
    }
    const __m512d p = ld_avx512::v_exp_nonpos(_mm512_sub_pd(lg, _mm512_set1_pd(mx)));
    l += _mm512_reduce_add_pd(p);
    alignas(64) double pq[kLdLanes];
    _mm512_store_pd(pq, p);
    const __m512d b0 = _mm512_set1_pd(pq[0]), b1 = _mm512_set1_pd(pq[1]), b2 = _mm512_set1_pd(pq[2]),
                  b3 = _mm512_set1_pd(pq[3]), b4 = _mm512_set1_pd(pq[4]), b5 = _mm512_set1_pd(pq[5]),
                  b6 = _mm512_set1_pd(pq[6]), b7 = _mm512_set1_pd(pq[7]);
    const uint8_t *u0 = rows[0], *u1 = rows[1], *u2 = rows[2], *u3 = rows[3], *u4 = rows[4], *u5 = rows[5],
                  *u6 = rows[6], *u7 = rows[7];
    int64_t m = 0;
    for (; m + 8 <= n; m += 8) {
        __m512d s0 = _mm512_mul_pd(b0, u8x8_grey(u0 + m));
        __m512d s1 = _mm512_mul_pd(b1, u8x8_grey(u1 + m));
        s0 = _mm512_fmadd_pd(b2, u8x8_grey(u2 + m), s0);
        s1 = _mm512_fmadd_pd(b3, u8x8_grey(u3 + m), s1);
        s0 = _mm512_fmadd_pd(b4, u8x8_grey(u4 + m), s0);
        s1 = _mm512_fmadd_pd(b5, u8x8_grey(u5 + m), s1);
        s0 = _mm512_fmadd_pd(b6, u8x8_grey(u6 + m), s0);
        s1 = _mm512_fmadd_pd(b7, u8x8_grey(u7 + m), s1);
        _mm512_storeu_pd(accu + m, _mm512_add_pd(_mm512_loadu_pd(accu + m), _mm512_add_pd(s0, s1)));
    }
    for (; m < n; ++m)
        accu[m] += pq[0] * u0[m] + pq[1] * u1[m] + pq[2] * u2[m] + pq[3] * u3[m] + pq[4] * u4[m] + pq[5] * u5[m] +
                   pq[6] * u6[m] + pq[7] * u7[m];
}
AD_AVX512_REGION_END
#endif

#if AD_LD_DISPATCH
// Whether u8x8_exact gives the table's value for every byte (checked once: the pruned runs'
// distances must be the unpruned kernel's bit for bit).
bool row_converter_ok(const double* lut) {
    static const bool ok = cpu_has_avx512() && u8_rows_match_table(lut);
    return ok;
}
#endif

// gather_row with the vector conversion of uint8 rows where it is exact (see above)
void gather_row_fast(double* dst, uintptr_t train_ptr, int kind, int64_t k, int64_t n, int64_t ts0, int64_t ts1,
                     const double* lut, bool fast_u8) {
#if AD_LD_DISPATCH
    if (fast_u8 && kind == 0 && ts1 == 1) {
        convert_u8_row_exact(dst, reinterpret_cast<const uint8_t*>(train_ptr) + k * ts0, n, lut);
        return;
    }
#else
    (void)fast_u8;
#endif
    gather_row(dst, train_ptr, kind, k, n, ts0, ts1, lut);
}

}  // namespace

void full_pruned_run(const LocalityPlan& plan, uintptr_t x_ptr, int64_t B, int64_t xs0, int64_t xs1,
                     bool x_is_double, uintptr_t train_ptr, int64_t N, int64_t ts0, int64_t ts1,
                     int train_kind, double a, double scale, uintptr_t offsets_ptr, uintptr_t index_ptr,
                     bool argmin, uintptr_t out_ptr, bool out_is_double, uintptr_t mx_ptr, uintptr_t l_ptr,
                     uintptr_t acc_ptr, uintptr_t arg_ptr, bool force_portable) {
    const int64_t n = plan.n;
    if (!plan.full) throw std::invalid_argument("full_pruned_run: needs the all-ones plan (locality_plan_full)");
    if (B < 1 || N < 1) throw std::invalid_argument("full_pruned_run: need B >= 1 and N >= 1");
    if (x_ptr == 0 || train_ptr == 0 || offsets_ptr == 0 || index_ptr == 0)
        throw std::invalid_argument("full_pruned_run: null input");
    if (train_kind < 0 || train_kind > 2) throw std::invalid_argument("full_pruned_run: bad train_kind");
    if (!(a > 0.0) || !(scale > 0.0) || !std::isfinite(scale))
        throw std::invalid_argument("full_pruned_run: a and scale must be positive and finite");
    const auto* off = reinterpret_cast<const int64_t*>(offsets_ptr);
    const auto* idx = reinterpret_cast<const int64_t*>(index_ptr);
    for (int64_t b = 0; b < B; ++b) {
        if (off[b + 1] <= off[b]) throw std::invalid_argument("full_pruned_run: every query needs >= 1 image");
    }
    for (int64_t b = 0; b < B; ++b)
        for (int64_t i = off[b]; i < off[b + 1]; ++i)
            if (idx[i] < 0 || idx[i] >= N || (i > off[b] && idx[i] <= idx[i - 1]))
                throw std::invalid_argument("full_pruned_run: indices must be ascending within [0, N) per query");
    BlockFn block = ld_portable::process_block_full;
    FullDistancesFn dist8 = ld_portable::full_distances8;
#if AD_LD_DISPATCH
    if (!force_portable && cpu_has_avx512()) {
        block = ld_avx512::process_block_full;
        dist8 = ld_avx512::full_distances8;
    }
#endif
    double lut[256];
    for (int u = 0; u < 256; ++u) lut[u] = dequantize_u8_value<double>(static_cast<uint8_t>(u));
#if AD_LD_DISPATCH
    const bool fast_u8 = !force_portable && row_converter_ok(lut);
#else
    const bool fast_u8 = false;
#endif
    const int nt = team_size();
    std::vector<std::unique_ptr<double[], FreeDeleter>> scratch;
    // per thread: Ys [8][n], the query [n], acc [n], distances [8]
    for (int t = 0; t < nt; ++t) scratch.push_back(aligned_array<double>(kLdLanes * n + 2 * n + kLdLanes));
    auto* out_d = reinterpret_cast<double*>(out_ptr);
    auto* out_f = reinterpret_cast<float*>(out_ptr);
    auto* mx_out = reinterpret_cast<double*>(mx_ptr);
    auto* l_out = reinterpret_cast<double*>(l_ptr);
    auto* acc_out = reinterpret_cast<double*>(acc_ptr);
    auto* arg_out = reinterpret_cast<int64_t*>(arg_ptr);
    // a few survivors (low noise, nearest): one thread; a parallel region costs more than the
    // work below ~2^20 pixel visits on a busy machine
    // uint8 images read in place (the common case): phase 1 computes every surviving pair's
    // distance image by image, so that each image is converted once for all the queries that keep
    // it (the survivor lists inverted into per-image query lists); phase 2 runs each query's online
    // softmax over its images in ascending order, as the unpruned run does.
#if AD_LD_DISPATCH
    const bool use_inv = fast_u8 && train_kind == 0 && ts1 == 1 && !argmin;
#else
    const bool use_inv = false;
#endif
    std::vector<double> dist_all;           // [off[B]] the distance of each survivor, CSR order
    std::vector<int64_t> img_start;         // [N + 1] image k's pairs: inv_*[img_start[k] .. img_start[k + 1])
    std::vector<int64_t> inv_pos;           // [off[B]] a pair's CSR position
    std::vector<int64_t> img_list;          // the distinct surviving images
    std::unique_ptr<double[], FreeDeleter> xall;  // [B][n] the queries, float64
    if (use_inv) {
        xall = aligned_array<double>(B * n);
        for (int64_t b = 0; b < B; ++b)
            for (int64_t j = 0; j < n; ++j)
                xall[b * n + j] = x_is_double
                                      ? reinterpret_cast<const double*>(x_ptr)[b * xs0 + j * xs1]
                                      : static_cast<double>(reinterpret_cast<const float*>(x_ptr)[b * xs0 + j * xs1]);
        img_start.assign(N + 1, 0);
        for (int64_t i = 0; i < off[B]; ++i) ++img_start[idx[i] + 1];
        for (int64_t k = 0; k < N; ++k) {
            if (img_start[k + 1] > 0) img_list.push_back(k);
            img_start[k + 1] += img_start[k];
        }
        std::vector<int64_t> cur(img_start.begin(), img_start.end() - 1);
        inv_pos.resize(off[B]);
        for (int64_t i = 0; i < off[B]; ++i) inv_pos[cur[idx[i]]++] = i;
        dist_all.resize(off[B]);
    }
    // the query of CSR position i: off is ascending, so a binary search (phase 1 only)
    auto query_of = [off, B](int64_t i) {
        return static_cast<int64_t>(std::upper_bound(off, off + B + 1, i) - off) - 1;
    };
    (void)query_of;
    const int team = off[B] * n < (int64_t(1) << 20) ? 1 : static_cast<int>(std::min<int64_t>(nt, B));
#if defined(_OPENMP)
#pragma omp parallel num_threads(team) if (team > 1)
#endif
    {
        double* Ys = scratch[thread_index()].get();
        double* xb = Ys + kLdLanes * n;
        double* acc = xb + n;
        double* d = acc + n;
#if AD_LD_DISPATCH
        if (use_inv) {
            const auto* base = reinterpret_cast<const uint8_t*>(train_ptr);
            const int64_t nimg = static_cast<int64_t>(img_list.size());
#if defined(_OPENMP)
#pragma omp for schedule(dynamic, 16)
#endif
            for (int64_t u = 0; u < nimg; ++u) {
                const int64_t k = img_list[u];
                for (int64_t p = img_start[k]; p < img_start[k + 1]; p += 4) {
                    const int m = static_cast<int>(std::min<int64_t>(4, img_start[k + 1] - p));
                    const double* xs[4];
                    double out[4];
                    for (int q = 0; q < m; ++q) xs[q] = xall.get() + query_of(inv_pos[p + q]) * n;
                    distances_u8_queries(xs, m, base + k * ts0, n, a, lut, out);
                    for (int q = 0; q < m; ++q) dist_all[inv_pos[p + q]] = out[q];
                }
            }
        }
#endif
#if defined(_OPENMP)
#pragma omp for schedule(dynamic, 1)
#endif
        for (int64_t b = 0; b < B; ++b) {
            for (int64_t j = 0; j < n; ++j)
                xb[j] = x_is_double ? reinterpret_cast<const double*>(x_ptr)[b * xs0 + j * xs1]
                                    : static_cast<double>(reinterpret_cast<const float*>(x_ptr)[b * xs0 + j * xs1]);
            double mx = -std::numeric_limits<double>::infinity(), l = 0.0;
            double best = std::numeric_limits<double>::infinity();
            int64_t barg = -1;
            std::fill(acc, acc + n, 0.0);
#if AD_LD_DISPATCH
            if (use_inv) {
                // distances from phase 1; the softmax visits the images in ascending order, as before
                const auto* base = reinterpret_cast<const uint8_t*>(train_ptr);
                for (int64_t i0 = off[b]; i0 < off[b + 1]; i0 += kLdLanes) {
                    const int nvalid = static_cast<int>(std::min<int64_t>(kLdLanes, off[b + 1] - i0));
                    const uint8_t* rows[kLdLanes];
                    // padding lanes repeat the last image: weight exactly 0 (logit -inf)
                    for (int q = 0; q < kLdLanes; ++q) {
                        rows[q] = base + idx[i0 + std::min(q, nvalid - 1)] * ts0;
                        d[q] = dist_all[i0 + std::min(q, nvalid - 1)];
                    }
                    softmax_update_u8(d, rows, nvalid, n, scale, mx, l, acc);
                }
                for (int64_t j = 0; j < n; ++j) acc[j] = acc[j] / 127.5 - l;  // grey levels -> sum_k p_k y_k
            } else
#endif
            for (int64_t i0 = off[b]; i0 < off[b + 1]; i0 += kLdLanes) {
                const int nvalid = static_cast<int>(std::min<int64_t>(kLdLanes, off[b + 1] - i0));
                // gather the block's images (ascending indices: the same order as the unpruned run)
                for (int q = 0; q < nvalid; ++q)
                    gather_row_fast(Ys + q * n, train_ptr, train_kind, idx[i0 + q], n, ts0, ts1, lut, fast_u8);
                if (nvalid < kLdLanes) std::fill(Ys + nvalid * n, Ys + kLdLanes * n, 0.0);
                if (argmin) {
                    dist8(xb, Ys, n, a, d);
                    for (int q = 0; q < nvalid; ++q)
                        if (d[q] < best) {  // strict: the lowest index keeps a tie
                            best = d[q];
                            barg = idx[i0 + q];
                        }
                } else {
                    block(plan, xb, 1, nullptr, Ys, nvalid, a, scale, nullptr, d, &mx, &l, acc);
                }
            }
            if (argmin) {
                if (arg_out) arg_out[b] = barg;
                if (l_out) l_out[b] = best;
                if (out_ptr) {
                    gather_row(Ys, train_ptr, train_kind, barg, n, ts0, ts1, lut);
                    for (int64_t j = 0; j < n; ++j) {
                        if (out_is_double) out_d[b * n + j] = Ys[j];
                        else out_f[b * n + j] = static_cast<float>(Ys[j]);
                    }
                }
                continue;
            }
            if (mx_out) mx_out[b] = mx;
            if (l_out) l_out[b] = l;
            for (int64_t j = 0; j < n; ++j) {
                if (acc_out) acc_out[b * n + j] = acc[j];
                if (out_ptr) {
                    if (out_is_double) out_d[b * n + j] = acc[j] / l;
                    else out_f[b * n + j] = static_cast<float>(acc[j] / l);
                }
            }
        }
    }
}

}  // namespace analytic_diffusion
