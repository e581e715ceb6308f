// CPU kernel of "windowed_locality_denoise" (docs/algorithms.md §9 with docs/algorithms.md §5): exact, fused, no n x n object.
//
// With one translation-invariant window the masked distance is a convolution of the
// squared-difference image with the window:
//   d[b, k, c, p] = sum_{c', o : W[c, c', o], p + o inside} E[c', p + o],  E = (x_b - a y_k)^2.
// Per (query, training image) the kernel computes E (float64, direct differences, never the
// expanded form), a few prefix-sum planes of it, and then every output pixel's distance as a
// short signed sum of plane values read at fixed offsets (the "terms"), vectorised along
// image rows. The plan, built per call from the [C, C, k, k] window (microseconds), decides:
//   * groups: output channels with identical windows share one distance and one softmax
//     weight per (query, image, pixel) (at high noise every channel has the same window);
//   * per (group, input channel): column runs of the window on the vertical prefix sums V
//     (two terms per run whatever its length; a lone pixel reads E once), or a box minus
//     holes: the bounding box of the window over a set of input channels, read from their
//     channel sum - as 2-D integral image (4 terms) or as column runs - minus the runs of
//     the holes; the cheapest choice over all sets of input channels wins;
//   * orientation: the same with rows and columns swapped (row runs), when cheaper; the
//     image is then read transposed through its strides, nothing is copied;
//   * precision: a prefix-sum plane is used only where its rounding (relative to its
//     largest value, bounded from the queries) stays far below the logit scale; otherwise
//     the plan falls back to direct reads of E (exact to rounding whatever the noise level).
// Border cut: planes are zero-padded left and right, V and I are read at row indices
// clamped to [0, H] (constant outside the image) and E terms outside the image are skipped.
//
// Softmax: per (query, group, pixel) float64 online softmax over chunks of kWlChunk images
// against a lazy reference logit (moved, with one rescaling exp, only when a logit exceeds it by
// more than kWlLazy; the true running max is kept beside it): one exp per logit. Work units are
// (query range, training block) with their own state, run under a dynamic OpenMP schedule
// and merged exactly (docs/algorithms.md §5.3 rule) in block order, so the result depends neither on the
// thread count nor on the schedule. WSSM blocks are whole WSSM chunks.
//
// Certified pruning (docs/algorithms.md §14.6): an image's update of 8 pixels of a group is
// skipped when all 8 logits lie more than skip_logit (64 ln 2 + ln N from the caller) below the
// reference (a computed logit, so at most the final max); in exact mode the running max may start from the exact logits of a few
// candidate images (warm start), so that the test bites from the first image on.

#include "windowed_locality.h"

#include <algorithm>
#include <array>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <map>
#include <set>
#include <memory>
#include <sstream>
#include <stdexcept>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#if defined(__x86_64__) || defined(__i386__) || defined(_M_X64)
#include <immintrin.h>
#endif

#include "../common/convert.h"
#include "../common/cpu_runtime.h"
#include "../common/macros.h"

#if (defined(__GNUC__) || defined(__clang__)) && (defined(__x86_64__) || defined(__i386__))
#define AD_WL_DISPATCH 1
#else
#define AD_WL_DISPATCH 0
#endif

namespace analytic_diffusion {
namespace {

using cpu_runtime::aligned_array;
using cpu_runtime::FreeDeleter;
using cpu_runtime::team_size;
using cpu_runtime::thread_index;

constexpr double kWlExpFloor = -690.0;  // exp below this is taken as 0 (see v_exp_nonpos)
// The softmax reference moves only when a logit exceeds it by more than this: weights up to
// e^30 (1e13; sums of up to 2^53 of them stay finite and exact to rounding).
constexpr double kWlLazy = 30.0;
// A chunk update of 8 pixels runs as straight-line code (every image's exp, no branch per image)
// when at least this many of its kWlChunk images have a lane the pruning bound does not cover;
// the weights of the others are then added rather than skipped. The loop over the live images
// costs branch mispredictions: with every image required live, pruning cost 4-8% at t = 400..200
// (64x64x3, N = 2000), where many chunks have one or two dead images and little is skipped.
constexpr int kWlStraightMin = 5;
// A prefix-sum plane is used only where sqrt(#adds) * max|plane| * 2^-53 * scale (an
// estimate of the logit error its rounding causes) stays below this.
constexpr double kWlMaxLogitError = 1e-8;

using cpu_runtime::ceil_div;
inline int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }

bool cpu_has_avx512() {
#if AD_WL_DISPATCH
    static const bool yes = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq");
    return yes;
#else
    return false;
#endif
}

// ======================================================================== plan

// Planes of one (query, image): rows of Ws doubles (a ring of k + 1 rows per plane in the kernel), pixel (h, w) at column Lp + w,
// zero outside what the kernel writes. For a set of input channels (a "chain"):
//   S   sum over the set of (x - a y)^2 (rows 0..H-1)
//   V   vertical prefix: V[h] = sum_{h' < h} S[h'] (rows 0..H)
//   I   2-D integral: I[h][j] = sum_{j' <= j} V[h][j'] (rows 0..H)
// computed in one pass over the rows per chain; only what some term reads is stored.
enum { kWlPlaneS = 0, kWlPlaneV = 1, kWlPlaneI = 2 };

struct WlChain {
    int32_t ch_off, ch_count;  // channels at chain_channels[ch_off ..]
    int32_t s_id, v_id, i_id;  // plane slots, -1 when not stored
};

// coef * plane[row][col + w] with row = h + dy, clamped to [0, H] (V, I) or skipped
// outside [0, H) (S).
struct WlTerm {
    int32_t plane;
    int32_t dy;
    int32_t col;
    int32_t clamp;
    double coef;
};

struct WlPlan {
    int64_t C = 0, H = 0, W = 0;  // in the kernel's orientation
    int64_t k = 0, r = 0;
    int64_t Wv = 0;               // W rounded up to 8: rows of outputs, images and states
    int64_t Lp = 0, Ws = 0;       // planes: left padding (multiple of 8, > r) and row stride
    bool transposed = false;
    int64_t G = 0;
    int64_t nplanes = 0;
    // The kernel's ring: R = k + 1 rows of Ws doubles per plane (plane row rho at slot rho % R),
    // then one zero row (ring_len doubles in all).
    int64_t ring_rows = 0, ring_len = 0;
    // Lane-block layout (blk): the kernel's copies of the query and the training image hold
    // each row of Wv = 8 m pixels as m vectors, vector p lane q = column q m + p; a plane row
    // in the ring is m + HL + r vectors (HL = r + 1 left, positions -HL .. m + r - 1, the ones
    // outside [0, m) lane-shifted copies). A term's read at column offset dx is then the
    // aligned vector at position p + dx (no load splits a cache line); the sums are
    // transposed back to pixel order when stored (one 8 x 8 transpose per 64 outputs).
    bool blk = false;
    int64_t HL = 0;
    int64_t tmp_off = 0;  // blk: a scratch row of Wv doubles in the ring buffer
    // Term reads per output row, precomputed: output row h of group g sums
    // term_coef[t] * ring[row_offs[row_list[h] * nterms + t] + w] over t in [term_off[g],
    // term_off[g + 1]). Rows differ only by ring slot (h % R) away from the borders, so few
    // distinct lists exist; an S read outside the image points at the zero row.
    std::vector<int32_t> row_list;  // [H]
    std::vector<int32_t> row_offs;  // [lists][terms]
    std::vector<double> term_coef;  // [terms]
    std::vector<WlChain> chains;
    std::vector<int32_t> chain_channels;
    std::vector<WlTerm> terms;
    std::vector<int64_t> term_off;       // [G + 1]
    std::vector<int32_t> group_channels;  // output channels of each group
    std::vector<int32_t> group_off;       // [G + 1]
    std::vector<int32_t> group_of_channel;  // [C]
    int64_t integral_planes = 0;
    double cost = 0.0;
    int64_t area = 0;
    std::string desc;
};

using Pattern = std::vector<uint8_t>;  // k * k bits, row-major (row offset i - r, column offset j - r)

// A term before planes are numbered: plane (kind, channel mask).
struct CTerm {
    int kind;  // kWlPlaneS, kWlPlaneV, kWlPlaneI
    uint64_t mask;
    int32_t dy, col;
    bool clamp;
    double coef;
};

class Planner {
  public:
    Planner(int64_t C, int64_t H, int64_t W, int64_t k, double scale, double emax, bool allow_box,
            bool allow_integral)
        : C_(C), H_(H), W_(W), k_(k), r_(k / 2), allow_box_(allow_box) {
        Wv_ = round_up(W, 8);
        Lp_ = round_up(r_ + 1, 8);
        Ws_ = round_up(Lp_ + Wv_ + r_, 8);
        // precision of prefix-sum planes (see kWlMaxLogitError), for the worst channel set
        const double u = std::ldexp(1.0, -53);
        const double vmax = static_cast<double>(H) * emax * static_cast<double>(C);
        // V: a read carries the rounding of up to H adds (~sqrt(H) ulp of max|V|), a window up
        // to 2k reads; I: each of its 4 reads also carries a row prefix (~sqrt(W) ulp of max|I|)
        allow_v_ = std::sqrt(static_cast<double>(H) * 2.0 * static_cast<double>(k)) * vmax * u * scale <= kWlMaxLogitError;
        allow_i_ = allow_integral && allow_v_ &&
                   2.0 * std::sqrt(static_cast<double>(H + W)) * vmax * static_cast<double>(W) * u * scale <= kWlMaxLogitError;
    }

    int64_t Wv() const { return Wv_; }
    int64_t Ws() const { return Ws_; }
    int64_t Lp() const { return Lp_; }

    // Appends the column runs of pattern q (bits of channel c) with sign s.
    void runs(const uint8_t* q, int c, double s, std::vector<CTerm>& out) const {
        const uint64_t m = uint64_t(1) << c;
        for (int64_t j = 0; j < k_; ++j) {
            const int32_t col = static_cast<int32_t>(Lp_ + j - r_);
            int64_t i = 0;
            while (i < k_) {
                if (!q[i * k_ + j]) {
                    ++i;
                    continue;
                }
                int64_t i1 = i;
                while (i1 + 1 < k_ && q[(i1 + 1) * k_ + j]) ++i1;
                if (i1 == i || !allow_v_) {
                    for (int64_t t = i; t <= i1; ++t)
                        out.push_back({kWlPlaneS, m, static_cast<int32_t>(t - r_), col, false, s});
                } else {
                    out.push_back({kWlPlaneV, m, static_cast<int32_t>(i1 + 1 - r_), col, true, s});
                    out.push_back({kWlPlaneV, m, static_cast<int32_t>(i - r_), col, true, -s});
                }
                i = i1 + 1;
            }
        }
    }

    // Cost of the planes a term list needs that do not exist yet, in vector operations per
    // 8 pixels: a chain costs 3 per channel (two loads, a difference, a square-add), each
    // stored plane 1 more, V 2 and I 8 plus its padding.
    double new_plane_cost(const std::vector<CTerm>& ts) const {
        std::vector<std::pair<int, uint64_t>> seen;
        std::vector<uint64_t> chains;
        double cost = 0.0;
        auto chain = [&](uint64_t mask) {
            if (chain_masks_.count(mask) || std::find(chains.begin(), chains.end(), mask) != chains.end()) return;
            chains.push_back(mask);
            cost += 3.0 * __builtin_popcountll(mask);
        };
        auto add = [&](int kind, uint64_t mask, auto&& self) -> void {
            const auto key = std::make_pair(kind, mask);
            if (have_.count(key) || std::find(seen.begin(), seen.end(), key) != seen.end()) return;
            seen.push_back(key);
            chain(mask);
            if (kind == kWlPlaneS) {
                cost += 1.0;
            } else if (kind == kWlPlaneV) {
                cost += 2.0;
            } else {
                cost += 8.0 + static_cast<double>(Ws_ - Lp_ - Wv_) / static_cast<double>(Wv_);
                self(kWlPlaneV, mask, self);
            }
        };
        for (const CTerm& t : ts) add(t.kind, t.mask, add);
        return cost;
    }

    // Best term list for one group (patterns of every input channel).
    std::vector<CTerm> plan_group(const std::vector<Pattern>& pat, std::string& how) {
        const int64_t kk = k_ * k_;
        std::vector<CTerm> best;
        double best_cost = std::numeric_limits<double>::infinity();
        std::vector<int> nonempty;
        for (int c = 0; c < C_; ++c)
            if (std::any_of(pat[c].begin(), pat[c].end(), [](uint8_t v) { return v != 0; })) nonempty.push_back(c);
        // channel sets are 64-bit masks: any number of channels, but only the first 64 may be
        // read by a window (a shift by >= 64 would silently alias channel c - 64)
        if (!nonempty.empty() && nonempty.back() >= 64)
            throw std::invalid_argument("windowed_locality: a window may read input channels 0..63 only, got input channel " +
                                        std::to_string(nonempty.back()));
        const int ne = static_cast<int>(nonempty.size());
        // subsets of the non-empty input channels that take the box-minus-holes route
        std::vector<uint64_t> subsets{0};
        if (allow_box_ && ne > 0 && ne <= 62) {
            if (ne <= 6) {
                for (uint64_t s = 1; s < (uint64_t(1) << ne); ++s) subsets.push_back(s);
            } else {
                for (int i = 0; i < ne; ++i) subsets.push_back(uint64_t(1) << i);
                subsets.push_back((uint64_t(1) << ne) - 1);
            }
        }
        Pattern hole(static_cast<size_t>(kk));
        for (uint64_t s : subsets) {
            uint64_t mask = 0;
            int64_t i0 = k_, i1 = -1, j0 = k_, j1 = -1;
            for (int i = 0; i < ne; ++i) {
                if (!((s >> i) & 1)) continue;
                const int c = nonempty[i];
                mask |= uint64_t(1) << c;
                for (int64_t p = 0; p < kk; ++p)
                    if (pat[c][p]) {
                        i0 = std::min(i0, p / k_);
                        i1 = std::max(i1, p / k_);
                        j0 = std::min(j0, p % k_);
                        j1 = std::max(j1, p % k_);
                    }
            }
            std::vector<CTerm> base;
            for (int i = 0; i < ne; ++i) {
                const int c = nonempty[i];
                if ((s >> i) & 1) {
                    for (int64_t p = 0; p < kk; ++p) {
                        const int64_t pi = p / k_, pj = p % k_;
                        hole[p] = (pi >= i0 && pi <= i1 && pj >= j0 && pj <= j1 && !pat[c][p]) ? 1 : 0;
                    }
                    runs(hole.data(), c, -1.0, base);
                } else {
                    runs(pat[c].data(), c, 1.0, base);
                }
            }
            // the box over the channel set: as column runs of V, or 4 reads of the integral image
            std::vector<std::vector<CTerm>> cands;
            if (s == 0) {
                cands.push_back(base);
            } else {
                const int32_t dy0 = static_cast<int32_t>(i0 - r_), dy1 = static_cast<int32_t>(i1 - r_);
                const int32_t c0 = static_cast<int32_t>(Lp_ + j0 - r_), c1 = static_cast<int32_t>(Lp_ + j1 - r_);
                if (allow_v_) {
                    std::vector<CTerm> t = base;
                    for (int32_t col = c0; col <= c1; ++col) {
                        t.push_back({kWlPlaneV, mask, dy1 + 1, col, true, 1.0});
                        t.push_back({kWlPlaneV, mask, dy0, col, true, -1.0});
                    }
                    cands.push_back(std::move(t));
                } else {
                    std::vector<CTerm> t = base;
                    for (int32_t dy = dy0; dy <= dy1; ++dy)
                        for (int32_t col = c0; col <= c1; ++col) t.push_back({kWlPlaneS, mask, dy, col, false, 1.0});
                    cands.push_back(std::move(t));
                }
                if (allow_i_) {
                    std::vector<CTerm> t = base;
                    t.push_back({kWlPlaneI, mask, dy1 + 1, c1, true, 1.0});
                    t.push_back({kWlPlaneI, mask, dy1 + 1, c0 - 1, true, -1.0});
                    t.push_back({kWlPlaneI, mask, dy0, c1, true, -1.0});
                    t.push_back({kWlPlaneI, mask, dy0, c0 - 1, true, 1.0});
                    cands.push_back(std::move(t));
                }
            }
            for (auto& t : cands) {
                merge(t);
                const double cost = static_cast<double>(t.size()) + new_plane_cost(t);
                if (cost < best_cost) {
                    best_cost = cost;
                    best = std::move(t);
                    std::ostringstream os;
                    os << "box over channels {";
                    bool first = true;
                    for (int c = 0; c < C_ && c < 64; ++c)
                        if ((mask >> c) & 1) {
                            os << (first ? "" : ",") << c;
                            first = false;
                        }
                    os << "}";
                    how = s == 0 ? std::string("column runs") : os.str();
                }
            }
        }
        return best;
    }

    // Sums the coefficients of identical reads and drops the zeros.
    static void merge(std::vector<CTerm>& t) {
        std::sort(t.begin(), t.end(), [](const CTerm& a, const CTerm& b) {
            return std::tie(a.kind, a.mask, a.dy, a.col, a.clamp) < std::tie(b.kind, b.mask, b.dy, b.col, b.clamp);
        });
        std::vector<CTerm> out;
        for (const CTerm& x : t) {
            if (!out.empty()) {
                CTerm& y = out.back();
                if (y.kind == x.kind && y.mask == x.mask && y.dy == x.dy && y.col == x.col && y.clamp == x.clamp) {
                    y.coef += x.coef;
                    continue;
                }
            }
            out.push_back(x);
        }
        t.clear();
        for (const CTerm& x : out)
            if (x.coef != 0.0) t.push_back(x);
    }

    // Plane slot of (kind, mask), created (with what it needs) on first use.
    int32_t ensure(int kind, uint64_t mask) {
        const auto key = std::make_pair(kind, mask);
        auto it = have_.find(key);
        if (it != have_.end()) return it->second;
        if (kind == kWlPlaneI) ensure(kWlPlaneV, mask);
        chain_masks_.insert(mask);
        const int32_t id = nplanes_++;
        have_[key] = id;
        if (kind == kWlPlaneI) integral_ += 1;
        return id;
    }

    // The chains (one per channel set with a stored plane), and the total plane cost.
    double finish(WlPlan& P) const {
        double cost = 0.0;
        P.nplanes = nplanes_;
        P.integral_planes = integral_;
        for (uint64_t mask : chain_masks_) {
            WlChain ch{static_cast<int32_t>(P.chain_channels.size()), 0, -1, -1, -1};
            for (int c = 0; c < C_ && c < 64; ++c)  // masks are 64-bit: see plan_group
                if ((mask >> c) & 1) {
                    P.chain_channels.push_back(c);
                    ch.ch_count += 1;
                }
            auto id = [&](int kind) {
                auto it = have_.find(std::make_pair(kind, mask));
                return it == have_.end() ? -1 : it->second;
            };
            ch.s_id = id(kWlPlaneS);
            ch.v_id = id(kWlPlaneV);
            ch.i_id = id(kWlPlaneI);
            cost += 3.0 * ch.ch_count + (ch.s_id >= 0 ? 1.0 : 0.0) + (ch.v_id >= 0 ? 2.0 : 0.0) +
                    (ch.i_id >= 0 ? 8.0 + static_cast<double>(Ws_ - Lp_ - Wv_) / static_cast<double>(Wv_) : 0.0);
            P.chains.push_back(ch);
        }
        return cost;
    }

  private:
    int64_t C_, H_, W_, k_, r_;
    int64_t Wv_ = 0, Lp_ = 0, Ws_ = 0;
    bool allow_box_, allow_v_ = true, allow_i_ = true;
    std::map<std::pair<int, uint64_t>, int32_t> have_;
    std::set<uint64_t> chain_masks_;
    int32_t nplanes_ = 0;
    int64_t integral_ = 0;
};

// window [C][C][k][k] -> patterns per (output, input) channel, transposed if asked
std::vector<std::vector<Pattern>> read_window(uintptr_t window_ptr, int64_t C, int64_t k, int64_t ws0,
                                              int64_t ws1, int64_t ws2, int64_t ws3, bool transposed) {
    const auto* w = reinterpret_cast<const uint8_t*>(window_ptr);
    std::vector<std::vector<Pattern>> pat(static_cast<size_t>(C), std::vector<Pattern>(static_cast<size_t>(C), Pattern(static_cast<size_t>(k * k))));
    for (int64_t c = 0; c < C; ++c)
        for (int64_t ci = 0; ci < C; ++ci)
            for (int64_t i = 0; i < k; ++i)
                for (int64_t j = 0; j < k; ++j) {
                    const uint8_t v = w[c * ws0 + ci * ws1 + i * ws2 + j * ws3] != 0;
                    if (transposed) pat[c][ci][j * k + i] = v;
                    else pat[c][ci][i * k + j] = v;
                }
    return pat;
}

// The ring layout and the per-row term offsets (see WlPlan::row_offs).
void build_row_lists(WlPlan& P) {
    const int64_t m = P.Wv / 8;
    // the lane-block layout pays (halo copies, a transpose per group and 64 outputs) where most
    // reads would be misaligned and there are many per group (measured, 64x64x3, k = 9: 6-9%
    // less distance time at 78-105 terms in 3 groups, 2% more at 36 terms)
    int64_t misaligned = 0;
    for (const WlTerm& t : P.terms) misaligned += (t.col - P.Lp) % 8 != 0;
    P.blk = P.Wv % 64 == 0 && m >= P.r + 1 && 3 * misaligned >= 2 * static_cast<int64_t>(P.terms.size()) &&
            misaligned >= 16 * P.G;
    if (P.blk) {
        P.HL = P.r + 1;
        P.Ws = (m + P.HL + P.r) * 8;
    }
    const int64_t H = P.H, R = P.k + 1, RS = R * P.Ws, T = static_cast<int64_t>(P.terms.size());
    P.ring_rows = R;
    const int64_t zero_row = std::max<int64_t>(1, P.nplanes) * RS;
    P.tmp_off = zero_row + P.Ws;
    P.ring_len = P.tmp_off + (P.blk ? P.Wv : 0);
    auto col_of = [&](const WlTerm& t) -> int64_t { return P.blk ? (P.HL + t.col - P.Lp) * 8 : t.col; };
    if (P.ring_len > std::numeric_limits<int32_t>::max())
        throw std::invalid_argument("windowed_locality: image too wide for the kernel's ring");
    for (const WlTerm& t : P.terms) P.term_coef.push_back(t.coef);
    std::map<std::vector<int32_t>, int32_t> seen;
    std::vector<int32_t> offs(static_cast<size_t>(T));
    for (int64_t h = 0; h < H; ++h) {
        for (int64_t i = 0; i < T; ++i) {
            const WlTerm& t = P.terms[i];
            int64_t row = h + t.dy, off;
            if (t.clamp) {
                row = row < 0 ? 0 : (row > H ? H : row);
                off = t.plane * RS + (row % R) * P.Ws + col_of(t);
            } else if (row < 0 || row >= H) {
                off = zero_row + col_of(t);  // reads zeros (cols stay inside the row: Lp > r)
            } else {
                off = t.plane * RS + (row % R) * P.Ws + col_of(t);
            }
            offs[i] = static_cast<int32_t>(off);
        }
        auto it = seen.find(offs);
        if (it == seen.end()) {
            it = seen.emplace(offs, static_cast<int32_t>(seen.size())).first;
            P.row_offs.insert(P.row_offs.end(), offs.begin(), offs.end());
        }
        P.row_list.push_back(it->second);
    }
}

WlPlan build_plan(const std::vector<std::vector<Pattern>>& pat, int64_t C, int64_t H, int64_t W, int64_t k,
                  bool transposed, double scale, double emax, int64_t options) {
    WlPlan P;
    P.C = C;
    P.H = H;
    P.W = W;
    P.k = k;
    P.r = k / 2;
    P.transposed = transposed;
    Planner pl(C, H, W, k, scale, emax, (options & 4) == 0, (options & 2) == 0);
    P.Wv = pl.Wv();
    P.Lp = pl.Lp();
    P.Ws = pl.Ws();
    // groups: output channels with identical windows, numbered by first channel
    P.group_of_channel.assign(static_cast<size_t>(C), -1);
    std::vector<int32_t> first;
    for (int64_t c = 0; c < C; ++c) {
        for (size_t g = 0; g < first.size(); ++g)
            if (pat[c] == pat[first[g]]) {
                P.group_of_channel[c] = static_cast<int32_t>(g);
                break;
            }
        if (P.group_of_channel[c] < 0) {
            P.group_of_channel[c] = static_cast<int32_t>(first.size());
            first.push_back(static_cast<int32_t>(c));
        }
    }
    P.G = static_cast<int64_t>(first.size());
    P.group_off.assign(1, 0);
    for (int64_t g = 0; g < P.G; ++g) {
        for (int64_t c = 0; c < C; ++c)
            if (P.group_of_channel[c] == g) P.group_channels.push_back(static_cast<int32_t>(c));
        P.group_off.push_back(static_cast<int32_t>(P.group_channels.size()));
    }
    std::ostringstream desc;
    desc << (transposed ? "transposed (row runs)" : "as is (column runs)") << ", " << P.G << " group(s)";
    P.term_off.assign(1, 0);
    int64_t nterms = 0;
    for (int64_t g = 0; g < P.G; ++g) {
        std::string how;
        const std::vector<CTerm> ts = pl.plan_group(pat[first[g]], how);
        for (const CTerm& t : ts) P.terms.push_back({pl.ensure(t.kind, t.mask), t.dy, t.col, t.clamp ? 1 : 0, t.coef});
        P.term_off.push_back(static_cast<int64_t>(P.terms.size()));
        nterms += static_cast<int64_t>(ts.size());
        desc << "; group " << g << " (channels";
        for (int32_t i = P.group_off[g]; i < P.group_off[g + 1]; ++i) desc << " " << P.group_channels[i];
        desc << "): " << ts.size() << " terms, " << how;
    }
    int64_t area = 0;
    for (int64_t c = 0; c < C; ++c)
        for (int64_t ci = 0; ci < C; ++ci) area += std::count(pat[c][ci].begin(), pat[c][ci].end(), uint8_t(1));
    P.area = area;
    const double rows = static_cast<double>(H) * static_cast<double>(P.Wv) / 8.0;
    P.cost = rows * (pl.finish(P) + static_cast<double>(nterms) + 25.0 * static_cast<double>(P.G) + 2.0 * static_cast<double>(C));
    P.desc = desc.str();
    build_row_lists(P);
    return P;
}

WlPlan choose_plan(uintptr_t window_ptr, int64_t C, int64_t k, int64_t ws0, int64_t ws1, int64_t ws2,
                   int64_t ws3, int64_t H, int64_t W, double scale, double emax, int64_t options) {
    const bool force_t = (options & 8) != 0, no_t = (options & 1) != 0;
    WlPlan best;
    bool have = false;
    for (int t = 0; t < 2; ++t) {
        const bool tr = t == 1;
        if ((tr && no_t) || (!tr && force_t)) continue;
        auto pat = read_window(window_ptr, C, k, ws0, ws1, ws2, ws3, tr);
        WlPlan P = tr ? build_plan(pat, C, W, H, k, true, scale, emax, options)
                      : build_plan(pat, C, H, W, k, false, scale, emax, options);
        if (!have || P.cost < best.cost) {
            best = std::move(P);
            have = true;
        }
    }
    return best;
}

WindowedStats stats_of(const WlPlan& P) {
    WindowedStats s;
    s.transposed = P.transposed;
    s.groups = P.G;
    s.terms = static_cast<int64_t>(P.terms.size());
    s.area = P.area;
    s.planes = P.nplanes;
    s.integral_planes = P.integral_planes;
    s.cost = P.cost;
    s.plan = P.desc;
    return s;
}

// ======================================================================== kernels

#if AD_WL_DISPATCH
AD_AVX512_REGION_BEGIN
#define WL_NS wl_avx512
#define WL_SIMD 1
#include "windowed_kernel.inc"
#undef WL_SIMD
#undef WL_NS
AD_AVX512_REGION_END
#endif

#define WL_NS wl_portable
#define WL_SIMD 0
#include "windowed_kernel.inc"
#undef WL_SIMD
#undef WL_NS

using FusedFn = void (*)(const WlPlan&, const double*, const double*, double, double*, double*);
using BoxRowFn = void (*)(const double*, const double*, double, const int32_t*, int64_t, int64_t, int64_t, int64_t, int64_t,
                          int64_t, double*, double*, double*, int64_t, double*);
using SoftmaxRowFn = int64_t (*)(const WlPlan&, const double*, const double*, int64_t, int, double, double, double*, double*,
                                 double*, double*);
using SoftmaxFn = int64_t (*)(const WlPlan&, const double*, const double*, int, double, double, double*, double*, double*, double*);
using MaxFn = void (*)(const WlPlan&, const double*, double, double*);
using MergeFn = void (*)(const WlPlan&, const double* const*, int64_t, int64_t, double*, double*, double*, double*);

// images [k0, k0 + kn) -> y [kn][C][H][Wv] float64 (zero past W), in the kernel's orientation
template <typename T, typename F>
void load_images_as(const T* base, int64_t k0, int kn, const WlPlan& P, int64_t s0, int64_t s1,
                    int64_t sh, int64_t sw, double* y, F&& conv) {
    const int64_t C = P.C, H = P.H, W = P.W, Wv = P.Wv;
    for (int j = 0; j < kn; ++j)
        for (int64_t c = 0; c < C; ++c)
            for (int64_t h = 0; h < H; ++h) {
                const T* src = base + (k0 + j) * s0 + c * s1 + h * sh;
                double* dst = y + ((j * C + c) * H + h) * Wv;
                for (int64_t w = 0; w < W; ++w) dst[w] = conv(src[w * sw]);
                for (int64_t w = W; w < Wv; ++w) dst[w] = 0.0;
            }
}

// Whether the AVX-512 row conversion gives the table's value for every byte (checked once).
bool u8_rows_exact(const double* lut) {
#if AD_WL_DISPATCH
    static const bool ok = cpu_has_avx512() && wl_avx512::u8_rows_match_table(lut);
    return ok;
#else
    (void)lut;
    return false;
#endif
}

// rows of Wv = 8 m pixels -> lane-block layout (WlPlan::blk): dst[p * 8 + q] = src[q * m + p]
void to_lane_blocks(const double* src, int64_t rows, int64_t Wv, double* dst) {
    const int64_t m = Wv / 8;
    for (int64_t i = 0; i < rows; ++i, src += Wv, dst += Wv)
        for (int64_t p = 0; p < m; ++p)
            for (int64_t q = 0; q < 8; ++q) dst[p * 8 + q] = src[q * m + p];
}

}  // namespace

bool windowed_locality_has_avx512() { return cpu_has_avx512(); }

WindowedStats windowed_locality_plan(uintptr_t window_ptr, int64_t C, int64_t k, int64_t ws0, int64_t ws1,
                                     int64_t ws2, int64_t ws3, int64_t H, int64_t W, double scale, double emax,
                                     int64_t options) {
    if (window_ptr == 0 || C < 1 || k < 1 || k % 2 == 0 || H < 1 || W < 1)
        throw std::invalid_argument("windowed_locality_plan: bad window or image size");
    return stats_of(choose_plan(window_ptr, C, k, ws0, ws1, ws2, ws3, H, W, scale, emax, options));
}

WindowedStats windowed_locality_run(uintptr_t x_ptr, int64_t B, int64_t C, int64_t H0, int64_t W0, int64_t xs0,
                                    int64_t xs1, int64_t xs2, int64_t xs3, bool x_is_double, uintptr_t train_ptr,
                                    int64_t N, int64_t ts0, int64_t ts1, int64_t ts2, int64_t ts3, int train_kind,
                                    uintptr_t window_ptr, int64_t k, int64_t ws0, int64_t ws1, int64_t ws2,
                                    int64_t ws3, double a, double scale, int64_t chunk, uintptr_t out_ptr,
                                    bool out_is_double, uintptr_t mx_ptr, uintptr_t l_ptr, uintptr_t acc_ptr,
                                    int64_t options, bool force_portable, double skip_logit, bool warm_start) {
    if (B < 1 || N < 1 || C < 1 || H0 < 1 || W0 < 1)
        throw std::invalid_argument("windowed_locality_run: need B, N, C, H, W >= 1");
    if (x_ptr == 0 || train_ptr == 0 || window_ptr == 0) throw std::invalid_argument("windowed_locality_run: null input");
    if (train_kind < 0 || train_kind > 2) throw std::invalid_argument("windowed_locality_run: bad train_kind");
    if (k < 1 || k % 2 == 0 || k > 2 * std::max(H0, W0) - 1)
        throw std::invalid_argument("windowed_locality_run: k must be odd and at most 2 * max(H, W) - 1");
    if (chunk < 0) throw std::invalid_argument("windowed_locality_run: chunk must be >= 0");
    if (chunk > 0 && (mx_ptr || l_ptr || acc_ptr))
        throw std::invalid_argument("windowed_locality_run: states exist only in exact mode (chunk = 0)");
    if (!(a > 0.0) || !(scale > 0.0) || !std::isfinite(scale))
        throw std::invalid_argument("windowed_locality_run: a and scale must be positive and finite");
    if (!(skip_logit > 0.0)) throw std::invalid_argument("windowed_locality_run: skip_logit must be > 0");

    // bound on the squared differences (train is in [-1, 1]): picks the precise-enough planes
    double xmax = 0.0;
    for (int64_t b = 0; b < B; ++b)
        for (int64_t c = 0; c < C; ++c)
            for (int64_t h = 0; h < H0; ++h)
                for (int64_t w = 0; w < W0; ++w) {
                    const int64_t off = b * xs0 + c * xs1 + h * xs2 + w * xs3;
                    const double v = x_is_double ? reinterpret_cast<const double*>(x_ptr)[off]
                                                 : static_cast<double>(reinterpret_cast<const float*>(x_ptr)[off]);
                    xmax = std::max(xmax, std::fabs(v));
                }
    if (!std::isfinite(xmax)) throw std::invalid_argument("windowed_locality_run: x is not finite");
    const double emax = (xmax + a) * (xmax + a);
    const WlPlan P = choose_plan(window_ptr, C, k, ws0, ws1, ws2, ws3, H0, W0, scale, emax, options);
    WindowedStats stats = stats_of(P);
    const bool tr = P.transposed;
    const int64_t H = P.H, W = P.W, Wv = P.Wv, HW = H * Wv, G = P.G, n = C * H0 * W0;
    // strides in the kernel's orientation
    const int64_t xsh = tr ? xs3 : xs2, xsw = tr ? xs2 : xs3;
    const int64_t tsh = tr ? ts3 : ts2, tsw = tr ? ts2 : ts3;

    FusedFn fused_fn = wl_portable::compute_fused;
    SoftmaxFn softmax_fn = wl_portable::softmax_chunk;
    MergeFn merge_fn = wl_portable::merge_blocks;
    MaxFn max_fn = wl_portable::max_logits;
    BoxRowFn box_fn = wl_portable::box_row;
    SoftmaxRowFn softmax_row_fn = wl_portable::softmax_row;
#if AD_WL_DISPATCH
    if (!force_portable && cpu_has_avx512()) {
        fused_fn = wl_avx512::compute_fused;
        softmax_fn = wl_avx512::softmax_chunk;
        merge_fn = wl_avx512::merge_blocks;
        max_fn = wl_avx512::max_logits;
        box_fn = wl_avx512::box_row;
        softmax_row_fn = wl_avx512::softmax_row;
        stats.avx512 = true;
    }
#endif

    // queries as float64 [B][C][H][Wv], zero past W
    auto xq = aligned_array<double>(B * C * HW);
    for (int64_t b = 0; b < B; ++b)
        for (int64_t c = 0; c < C; ++c)
            for (int64_t h = 0; h < H; ++h)
                for (int64_t w = 0; w < Wv; ++w) {
                    double v = 0.0;
                    if (w < W) {
                        const int64_t off = b * xs0 + c * xs1 + h * xsh + w * xsw;
                        v = x_is_double ? reinterpret_cast<const double*>(x_ptr)[off]
                                        : static_cast<double>(reinterpret_cast<const float*>(x_ptr)[off]);
                    }
                    xq[((b * C + c) * H + h) * Wv + w] = v;
                }
    double lut[256];
    for (int u = 0; u < 256; ++u) lut[u] = dequantize_u8_value<double>(static_cast<uint8_t>(u));
    // f(base, conv): the training set as its element type and that type's conversion to
    // float64 (uint8 through the exact table)
    auto with_train = [&](auto&& f) {
        if (train_kind == 0)
            f(reinterpret_cast<const uint8_t*>(train_ptr), [&lut](uint8_t u) { return lut[u]; });
        else if (train_kind == 1)
            f(reinterpret_cast<const float*>(train_ptr), [](float v) { return static_cast<double>(v); });
        else
            f(reinterpret_cast<const double*>(train_ptr), [](double v) { return v; });
    };
    // contiguous uint8 rows: converted 8 pixels at a time (the scalar table lookup cost ~10% of a call)
    const bool fast_u8 = train_kind == 0 && tsw == 1 && !force_portable && u8_rows_exact(lut);
    auto load_images = [&](int64_t k0, int kn, double* y) {
#if AD_WL_DISPATCH
        if (fast_u8) {
            const auto* base = reinterpret_cast<const uint8_t*>(train_ptr);
            for (int j = 0; j < kn; ++j)
                for (int64_t c = 0; c < C; ++c)
                    for (int64_t h = 0; h < H; ++h) {
                        double* dst = y + ((j * C + c) * H + h) * Wv;
                        wl_avx512::convert_u8_row_exact(dst, base + (k0 + j) * ts0 + c * ts1 + h * tsh, W, lut);
                        std::fill(dst + W, dst + Wv, 0.0);
                    }
            return;
        }
#endif
        with_train([&](auto base, auto conv) { load_images_as(base, k0, kn, P, ts0, ts1, tsh, tsw, y, conv); });
    };
    // images [k0, k0 + kn) into y, and into yd as compute_fused reads them (the same buffer
    // unless the plan uses the lane-block layout)
    auto load_chunk = [&](int64_t k0, int kn, double* y, double* yd) {
        load_images(k0, kn, y);
        if (P.blk) to_lane_blocks(y, kn * C * H, Wv, yd);
    };
    // what compute_fused reads: the lane-block copies (WlPlan::blk) or the images themselves
    auto xq_blk = aligned_array<double>(P.blk ? B * C * HW : 1);
    if (P.blk) to_lane_blocks(xq.get(), B * C * H, Wv, xq_blk.get());
    const double* xd = P.blk ? xq_blk.get() : xq.get();
    const bool wssm = chunk > 0;

    // Warm start (exact mode): per query, the training images nearest in a subsampled
    // distance (every 8th row and column) over each 16 x 16 region and over the whole image.
    // Only a heuristic choice: what the kernel uses is their exact logits, computed below with
    // the same code as the main pass. Ties go to the lower index, so the choice (and the
    // result) does not depend on the thread count.
    const bool warm = warm_start && !wssm && N > 1;
    std::vector<std::vector<int64_t>> cand(static_cast<size_t>(B));
    if (warm) {
        constexpr int64_t kStep = 8, kRegion = 16;
        const int64_t nrw = ceil_div(W, kRegion), nr = ceil_div(H, kRegion) * nrw;
        std::vector<int64_t> soff, sreg;  // sampled (c, h, w): offset in a training image, region
        std::vector<int64_t> xoff;        // and in xq (per query)
        for (int64_t c = 0; c < C; ++c)
            for (int64_t h = std::min<int64_t>(kStep / 2, H - 1); h < H; h += kStep)
                for (int64_t w = std::min<int64_t>(kStep / 2, W - 1); w < W; w += kStep) {
                    soff.push_back(c * ts1 + h * tsh + w * tsw);
                    xoff.push_back((c * H + h) * Wv + w);
                    sreg.push_back((h / kRegion) * nrw + w / kRegion);
                }
        const int64_t ns = static_cast<int64_t>(soff.size()), nb = nr + 2;  // regions, then the 2 best overall
        using Best = std::pair<double, int64_t>;
        const Best none{std::numeric_limits<double>::infinity(), N};
        const int nt0 = team_size();
        std::vector<std::vector<Best>> best(static_cast<size_t>(nt0), std::vector<Best>(static_cast<size_t>(B * nb), none));
        auto sample = [&](int64_t kimg, double* ys) {
            with_train([&](auto base, auto conv) {
                const auto* src = base + kimg * ts0;
                for (int64_t i = 0; i < ns; ++i) ys[i] = conv(src[soff[i]]);
            });
        };
        const double swork = static_cast<double>(B) * static_cast<double>(N) * static_cast<double>(ns);
        const int steam = swork < 4.0e6 ? 1 : nt0;
#if defined(_OPENMP)
#pragma omp parallel num_threads(steam) if (steam > 1)
#endif
        {
            std::vector<double> ys(static_cast<size_t>(ns)), xs(static_cast<size_t>(B * ns)), rs(static_cast<size_t>(nr));
            for (int64_t b = 0; b < B; ++b)
                for (int64_t i = 0; i < ns; ++i) xs[b * ns + i] = xq[b * C * HW + xoff[i]];
            std::vector<Best>& bt = best[thread_index()];
#if defined(_OPENMP)
#pragma omp for schedule(static)
#endif
            for (int64_t kimg = 0; kimg < N; ++kimg) {
                sample(kimg, ys.data());
                for (int64_t b = 0; b < B; ++b) {
                    std::fill(rs.begin(), rs.end(), 0.0);
                    const double* xb = xs.data() + b * ns;
                    for (int64_t i = 0; i < ns; ++i) {
                        const double e = xb[i] - a * ys[i];
                        rs[sreg[i]] += e * e;
                    }
                    Best* bb = bt.data() + b * nb;
                    double tot = 0.0;
                    for (int64_t r = 0; r < nr; ++r) {
                        tot += rs[r];
                        const Best v{rs[r], kimg};
                        if (v < bb[r]) bb[r] = v;
                    }
                    const Best v{tot, kimg};
                    if (v < bb[nr + 1]) {
                        if (v < bb[nr]) {
                            bb[nr + 1] = bb[nr];
                            bb[nr] = v;
                        } else {
                            bb[nr + 1] = v;
                        }
                    }
                }
            }
        }
        for (int64_t b = 0; b < B; ++b) {
            std::vector<Best> m(best[0].begin() + b * nb, best[0].begin() + (b + 1) * nb);
            std::vector<Best> tops;
            for (size_t t = 0; t < best.size(); ++t) {
                for (int64_t r = 0; r < nr; ++r) m[r] = std::min(m[r], best[t][b * nb + r]);
                tops.push_back(best[t][b * nb + nr]);
                tops.push_back(best[t][b * nb + nr + 1]);
            }
            std::sort(tops.begin(), tops.end());
            std::vector<int64_t>& cb = cand[b];
            for (int64_t r = 0; r < nr; ++r) cb.push_back(m[r].second);
            for (size_t t = 0; t < tops.size() && t < 2; ++t) cb.push_back(tops[t].second);
            cb.erase(std::remove_if(cb.begin(), cb.end(), [N](int64_t v) { return v >= N; }), cb.end());
            std::sort(cb.begin(), cb.end());
            cb.erase(std::unique(cb.begin(), cb.end()), cb.end());
            stats.warm_images += static_cast<int64_t>(cb.size());
        }
    }

    // Training blocks: exact mode splits the kWlChunk-image chunks into nblk contiguous blocks;
    // WSSM groups whole WSSM chunks. nblk depends only on N, B and the state budget, never on the
    // thread count, so neither does the result.
    const int64_t seg = wssm ? chunk : N;               // softmax segment (WSSM chunk, or everything)
    const int64_t nseg = ceil_div(N, seg);
    const int64_t nitems = wssm ? nseg : ceil_div(N, kWlChunk);  // what blocks are made of
    // state per query: reference logits [G][HW], l [G][HW], acc [C][HW], the WSSM sum [C][HW],
    // the running maxima [G][HW] (softmax_group)
    const int64_t mt_off = (2 * G + C + (wssm ? C : 0)) * HW;
    const int64_t per_b = mt_off + G * HW;  // doubles of state per query
    constexpr int64_t kMaxBlocks = 16;
    constexpr double kStateBudget = 1024.0 * (1 << 20);
    // As few blocks as keep up to kTargetUnits threads busy (units are query ranges x blocks), and
    // blocks of at least kMinBlockItems items: each block costs a state reset and a merge per
    // query (a few images' work) and its state is memory the call touches (16 blocks of 8 queries
    // at 64x64x3 were 25-50 MB per call, a third of the time at N = 400).
    constexpr int64_t kMinBlockItems = 8, kTargetUnits = 32;
    int64_t nblk = std::min<int64_t>(kMaxBlocks, std::max<int64_t>(2, ceil_div(kTargetUnits, B)));
    nblk = std::max<int64_t>(1, std::min<int64_t>(nblk, nitems / kMinBlockItems));
    while (nblk > 1 && 8.0 * static_cast<double>(nblk * B * per_b) > kStateBudget) --nblk;
    const int nt = team_size();
    // queries per unit: all of them when there are enough blocks to keep every thread busy
    int64_t bq = B;
    if (nblk < 2 * nt) bq = std::max<int64_t>(1, B * nblk / (2 * nt));
    const int64_t nbg = ceil_div(B, bq);
    const int64_t nunits = nbg * nblk;
    stats.units = nunits;
    std::vector<std::unique_ptr<double[], FreeDeleter>> state;
    for (int64_t u = 0; u < nunits; ++u) state.push_back(aligned_array<double>(std::min(bq, B - (u / nblk) * bq) * per_b));
    const int64_t ring_len = P.ring_len;
    // The full-box path (box_row: every window entry set, one group, the plan's 2-D integral image
    // admitted): distances and softmax row by row, no planes and no chunk of distances.
    // Not with the warm start, whose maxima come from the plane path (their rounding differs, and
    // the running maxima must stay logits this pass computes).
    const bool box = G == 1 && P.area == C * C * P.k * P.k && P.integral_planes == 1 && P.terms.size() == 4 && !P.blk && !warm;
    stats.box = box;
    const int64_t box_len = box ? kWlChunk * ((P.k + 1) * Wv + P.Ws + Wv) + P.Ws : 0;
    const int64_t scratch_len = ring_len + kWlChunk * G * HW + kWlChunk * C * HW * (P.blk ? 2 : 1) + box_len;
    // Small calls run on one thread: on a busy machine waking an OpenMP team can cost a
    // scheduler time slice (tens of ms), far more than the work itself.
    const double work = static_cast<double>(B) * static_cast<double>(N) * static_cast<double>(C * HW);
    const int team = work < 4.0e6 ? 1 : static_cast<int>(std::min<int64_t>(nt, nunits));
    std::vector<std::unique_ptr<double[], FreeDeleter>> scratch;
    for (int t = 0; t < team; ++t) scratch.push_back(aligned_array<double>(scratch_len));
    const double ninf = -std::numeric_limits<double>::infinity();
    // per query the warm-start maxima [B][G][HW] (exact mode with warm start only)
    auto m0 = aligned_array<double>(warm ? B * G * HW : 1);
    if (warm) std::fill(m0.get(), m0.get() + B * G * HW, ninf);
    std::vector<int64_t> skipped_t(static_cast<size_t>(team), 0);
    std::vector<std::array<double, 3>> phase_t(static_cast<size_t>(team), std::array<double, 3>{0.0, 0.0, 0.0});
    using Clock = std::chrono::steady_clock;
    auto seconds = [](Clock::time_point u, Clock::time_point v) { return std::chrono::duration<double>(v - u).count(); };

    // Merge the blocks of each query in block order and write the outputs in the caller's
    // layout ([B, C*H0*W0], pixel (c, h0, w0) at c*H0*W0 + h0*W0 + w0).
    auto* out_d = reinterpret_cast<double*>(out_ptr);
    auto* out_f = reinterpret_cast<float*>(out_ptr);
    auto* mx_out = reinterpret_cast<double*>(mx_ptr);
    auto* l_out = reinterpret_cast<double*>(l_ptr);
    auto* acc_out = reinterpret_cast<double*>(acc_ptr);
    const double den = static_cast<double>(nseg) + 1e-8;  // every chunk's weights sum to 1
    const int64_t merge_len = (2 * G + C) * HW + 8 * nblk;
    std::vector<std::unique_ptr<double[], FreeDeleter>> mscratch;
    for (int t = 0; t < team; ++t) mscratch.push_back(aligned_array<double>(merge_len));
#if defined(_OPENMP)
#pragma omp parallel num_threads(team) if (team > 1)
#endif
    {
        double* planes = scratch[thread_index()].get();
        double* dbuf = planes + ring_len;
        double* ybuf = dbuf + kWlChunk * G * HW;
        double* yd = P.blk ? ybuf + kWlChunk * C * HW : ybuf;  // the images as compute_fused reads them
        std::fill(planes, planes + ring_len, 0.0);  // padding stays zero
        // box path, per image of the chunk: e ring [k + 1][Wv], column sums [Ws] (zero padding),
        // distance row [Wv]; one prefix row [Ws]
        double* bring = ybuf + kWlChunk * C * HW * (P.blk ? 2 : 1);
        double* bcs = bring + kWlChunk * (P.k + 1) * Wv;
        double* brow = bcs + kWlChunk * P.Ws;
        double* bpre = brow + kWlChunk * Wv;
        if (box) std::fill(bcs, bcs + kWlChunk * P.Ws, 0.0);
        if (warm) {
#if defined(_OPENMP)
#pragma omp for schedule(dynamic, 1)
#endif
            for (int64_t b = 0; b < B; ++b) {
                const double* xb = xd + b * C * HW;
                for (int64_t kimg : cand[b]) {
                    load_chunk(kimg, 1, ybuf, yd);
                    fused_fn(P, xb, yd, a, planes, dbuf);
                    max_fn(P, dbuf, scale, m0.get() + b * G * HW);
                }
            }
        }  // (implicit barrier: every m0 is complete before the main pass)
        int64_t& nskip = skipped_t[thread_index()];
        double* ph = phase_t[thread_index()].data();  // load, distances, softmax (seconds)
#if defined(_OPENMP)
#pragma omp for schedule(dynamic, 1)
#endif
        for (int64_t u = 0; u < nunits; ++u) {
            const int64_t bg = u / nblk, blk = u % nblk;
            const int64_t b0 = bg * bq, b1 = std::min(B, b0 + bq);
            const int64_t i0 = nitems * blk / nblk, i1 = nitems * (blk + 1) / nblk;
            const int64_t k0 = wssm ? i0 * seg : i0 * kWlChunk;
            const int64_t k1 = std::min(N, wssm ? i1 * seg : i1 * kWlChunk);
            double* st = state[u].get();
            auto mx_of = [&](int64_t b) { return st + (b - b0) * per_b; };
            auto reset = [&]() {
                for (int64_t b = b0; b < b1; ++b) {
                    double* s = mx_of(b);
                    for (double* m : {s, s + mt_off}) {
                        if (warm) std::copy(m0.get() + b * G * HW, m0.get() + (b + 1) * G * HW, m);
                        else std::fill(m, m + G * HW, ninf);
                    }
                    std::fill(s + G * HW, s + (2 * G + C) * HW, 0.0);
                }
            };
            reset();
            if (wssm)
                for (int64_t b = b0; b < b1; ++b) std::fill(mx_of(b) + (2 * G + C) * HW, mx_of(b) + mt_off, 0.0);
            for (int64_t s0 = k0; s0 < k1; s0 += seg) {  // one segment (WSSM chunk) at a time
                const int64_t s1 = std::min(k1, s0 + seg);
                for (int64_t c0 = s0; c0 < s1; c0 += kWlChunk) {
                    const int kn = static_cast<int>(std::min<int64_t>(kWlChunk, s1 - c0));
                    auto t0 = Clock::now();
                    load_chunk(c0, kn, ybuf, yd);
                    auto t1 = Clock::now();
                    ph[0] += seconds(t0, t1);
                    for (int64_t b = b0; b < b1; ++b) {
                        const double* xb = xd + b * C * HW;
                        double* s = mx_of(b);
                        if (box) {  // distances and softmax row by row (counted as distances)
                            for (int64_t h = 0; h < H; ++h) {
                                // the single group's channels are every channel, 0 .. C - 1
                                for (int j = 0; j < kn; ++j)
                                    box_fn(xb, ybuf + j * C * HW, a, P.group_channels.data(), C, H, Wv, P.r, P.Lp, P.Ws,
                                           bring + j * (P.k + 1) * Wv, bcs + j * P.Ws, bpre, h, brow + j * Wv);
                                nskip += softmax_row_fn(P, brow, ybuf, h, kn, scale, skip_logit, s, s + G * HW,
                                                        s + 2 * G * HW, s + mt_off);
                            }
                            t0 = Clock::now();
                            ph[1] += seconds(t1, t0);
                        } else {
                            for (int j = 0; j < kn; ++j) fused_fn(P, xb, yd + j * C * HW, a, planes, dbuf + j * G * HW);
                            const auto t2 = Clock::now();
                            nskip += softmax_fn(P, dbuf, ybuf, kn, scale, skip_logit, s, s + G * HW, s + 2 * G * HW, s + mt_off);
                            t0 = Clock::now();
                            ph[1] += seconds(t1, t2);
                            ph[2] += seconds(t2, t0);
                        }
                        t1 = t0;
                    }
                }
                if (wssm) {  // this chunk's softmax mean joins the sum, then a fresh state
                    for (int64_t b = b0; b < b1; ++b) {
                        double* s = mx_of(b);
                        double* num = s + (2 * G + C) * HW;
                        for (int64_t c = 0; c < C; ++c) {
                            const double* lg = s + (G + P.group_of_channel[c]) * HW;
                            const double* ac = s + (2 * G + c) * HW;
                            for (int64_t i = 0; i < HW; ++i) num[c * HW + i] += ac[i] / lg[i];
                        }
                    }
                    reset();
                }
            }
        }
        // docs/algorithms.md §5.3 merge of each query's blocks, in block order (after the implicit barrier)
        {
        double* M = mscratch[thread_index()].get();
        double* L = M + G * HW;
        double* A = L + G * HW;
        double* f = A + C * HW;
        std::vector<const double*> st(static_cast<size_t>(nblk));
#if defined(_OPENMP)
#pragma omp for schedule(static)
#endif
        for (int64_t b = 0; b < B; ++b) {
            const int64_t bg = b / bq;
            for (int64_t blk = 0; blk < nblk; ++blk) st[blk] = state[bg * nblk + blk].get() + (b - bg * bq) * per_b;
            if (wssm) {
                for (int64_t i = 0; i < C * HW; ++i) {
                    double num = 0.0;
                    for (int64_t blk = 0; blk < nblk; ++blk) num += st[blk][(2 * G + C) * HW + i];
                    A[i] = num / den;
                }
            } else {
                merge_fn(P, st.data(), nblk, mt_off, M, L, A, f);
            }
            for (int64_t c = 0; c < C; ++c) {
                const int64_t g = P.group_of_channel[c];
                for (int64_t h = 0; h < H; ++h)
                    for (int64_t w = 0; w < W; ++w) {
                        const int64_t i = h * Wv + w;
                        const int64_t o = b * n + c * H0 * W0 + (tr ? w * W0 + h : h * W0 + w);
                        const double res = wssm ? A[c * HW + i] : A[c * HW + i] / L[g * HW + i];
                        if (!wssm) {
                            if (mx_out) mx_out[o] = M[g * HW + i];
                            if (l_out) l_out[o] = L[g * HW + i];
                            if (acc_out) acc_out[o] = A[c * HW + i];
                        }
                        if (out_ptr) {
                            if (out_is_double) out_d[o] = res;
                            else out_f[o] = static_cast<float>(res);
                        }
                    }
            }
        }
            }
    }
    for (int64_t v : skipped_t) stats.skipped_vectors += v;
    for (const auto& v : phase_t) {
        stats.load_seconds += v[0];
        stats.distance_seconds += v[1];
        stats.softmax_seconds += v[2];
    }
    stats.softmax_vectors = B * N * G * (HW / 8);
    return stats;
}

}  // namespace analytic_diffusion
