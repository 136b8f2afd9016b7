// What a merged grouping's backward would cost if the forward saved per-pixel
// winner codes instead of the members' pools: a standalone experiment (no
// JAX) written before the kernels did so (they have since 2026-12-04), the
// numbers are in docs/perf-log.md ("CPU, 2026-12-03 (evening): what winner
// codes would buy, modelled").
//
//   g++ -O3 -march=x86-64-v3 -ffp-contract=off -o /tmp/winner_codes
//       benchmarks/experiments/winner_codes.cc &&
//       taskset -c 1 /tmp/winner_codes
//
// (8, 64, 64, 64) float32, top_bottom: two groups of 32 channels (128 bytes,
// two cache lines of a 256-byte pixel), each the merge of two quadrant
// members that share a row order (top: rows down, columns either way;
// bottom: rows up). The unguided backward of each member is the kernels'
// reverse scan (cpu_kernels.h: backward_item): G starts as ct where the member
// won the merge, each pixel gives G to the winner of its forward max (x,
// n1 = the previous column, n2 = the previous row), the first member's G
// lives in dx, the second's in a scratch of two rows and is added to dx.
//
// * pools: what shipped then. A merge pass reads both members' pools and
//   writes a winner byte per element; each member's sweep reads x, its pool
//   at the two neighbours, ct, the winner bytes and dx.
// * codes: the forward would have saved, per member and element, one byte:
//   bits 0-1 which of x / n1 / n2 won its max (3: none, a NaN), bit 2
//   whether it won the merge. Each member's sweep reads ct, its byte and dx.
// * codes, members by row: the same, the group's two members a view row
//   each in turn (x's rows in the same order), so ct and dx of a row are in
//   cache for the second.
//
// Every case is timed interleaved with the others, minimum of 40 rounds;
// ratios are to a single top_left pool's backward over all 64 channels
// (pools, the algorithm shipped then). Values do not matter to the time (the
// loops are branch-free selects): x, pools and codes are random.
#include <cstdint>
#include <random>
#include <type_traits>
#include <vector>

#include "standalone.h"

namespace {

using standalone::B;
using standalone::C;
using standalone::H;
using standalone::kImage;
using standalone::View;
using standalone::view;
using standalone::W;

// What one member's sweep reads. G of view pixel (i, j): in dx (the first
// member, kInPlace: dx := G's share) or row i & 1 of scratch (dx += it).
struct Member {
  View v;
  int64_t c0;           // the group's first channel
  int me;               // the member's index in its group
  const float* x;       // image
  const float* pool;    // the member's pool (pools), image layout
  const uint8_t* win;   // the merge's winner (pools), image layout
  const uint8_t* code;  // the member's codes (codes), image layout
  const float* ct;
  float* dx;
  float* scratch;  // 2 * W * N
};

inline int32_t bits(float f) {
  int32_t i;
  __builtin_memcpy(&i, &f, 4);
  return i;
}
inline float from_bits(int32_t i) {
  float f;
  __builtin_memcpy(&f, &i, 4);
  return f;
}

// One pixel's channels; kIn1 / kIn2: whether n1 / n2 are inside.
template <int N, bool kCodes, bool kInPlace, bool kIn1, bool kIn2>
inline void pixel(const float* __restrict x, const float* __restrict o1,
                  const float* __restrict o2, const uint8_t* __restrict code,
                  float* __restrict G, float* __restrict G1,
                  float* __restrict G2, float* __restrict d) {
  if constexpr (kCodes) {
    // The byte widened to a lane of G's width, the selects as bit masks
    // (gcc does not if-convert byte compares beside float lanes).
    for (int k = 0; k < N; ++k) {
      const int32_t r = code[k] & 3;
      const int32_t g = bits(G[k]);
      if (kIn1) G1[k] += from_bits(g & -int32_t{r == 1});
      if (kIn2) G2[k] += from_bits(g & -int32_t{r == 2});
      const float share = from_bits(g & -int32_t{r == 0});
      if constexpr (kInPlace) {
        G[k] = share;  // G is dx
      } else {
        d[k] += share;
      }
    }
    return;
  }
  for (int k = 0; k < N; ++k) {
    const float xv = x[k];
    const float a = kIn1 ? o1[k] : xv, b = kIn2 ? o2[k] : xv;
    const bool self =
        (kIn1 | kIn2 | (xv == xv)) & (!kIn1 | (xv >= a)) & (!kIn2 | (xv >= b));
    const bool take1 = kIn1 & (a > xv) & (!kIn2 | (a >= b));
    const bool take2 = kIn2 & (b > xv) & (!kIn1 | (b > a));
    const float g = G[k];
    if (kIn1) G1[k] += take1 ? g : 0.f;
    if (kIn2) G2[k] += take2 ? g : 0.f;
    const float share = self ? g : 0.f;
    if constexpr (kInPlace) {
      G[k] = share;  // G is dx
    } else {
      d[k] += share;
    }
  }
}

template <int N, bool kCodes, bool kInPlace>
inline void member_row(const Member& m, int64_t i) {
  const View& v = m.v;
  const int64_t g_col = kInPlace ? v.col : N;
  auto G_row = [&](int64_t r) -> float* {
    return kInPlace ? m.dx + v.start + r * v.row + m.c0
                    : m.scratch + (r & 1) * W * N;
  };
  auto load_ct = [&](int64_t r, int64_t j) {
    float* __restrict G = G_row(r) + j * g_col;
    const int64_t q = v.start + r * v.row + j * v.col + m.c0;
    const float* __restrict c = m.ct + q;
    const uint8_t* __restrict w = kCodes ? m.code + q : m.win + q;
    const uint8_t me = static_cast<uint8_t>(m.me);
    for (int k = 0; k < N; ++k) {
      const int32_t won = kCodes ? (w[k] >> 2) & 1 : w[k] == me;
      G[k] = from_bits(bits(c[k]) & -won);
    }
  };
  if (i == H - 1)
    for (int64_t j = W - 1; j >= 0; --j) load_ct(i, j);
  if (i > 0) load_ct(i - 1, W - 1);
  float* Gi = G_row(i);
  float* Gu = i > 0 ? G_row(i - 1) : Gi;
  auto step = [&](auto in1, auto in2, int64_t j) {
    const int64_t p = v.start + i * v.row + j * v.col + m.c0;
    float* G = Gi + j * g_col;
    if (i > 0 && j > 0) load_ct(i - 1, j - 1);
    pixel<N, kCodes, kInPlace, decltype(in1)::value, decltype(in2)::value>(
        m.x + p, m.pool + p - v.col, m.pool + p - v.row, m.code + p, G,
        G - g_col, Gu + j * g_col, m.dx + p);
  };
  for (int64_t j = W - 1; j >= 1; --j) {
    if (i > 0) {
      step(std::true_type{}, std::true_type{}, j);
    } else {
      step(std::true_type{}, std::false_type{}, j);
    }
  }
  if (i > 0) {
    step(std::false_type{}, std::true_type{}, 0);
  } else {
    step(std::false_type{}, std::false_type{}, 0);
  }
}

// A merged group's winner bytes from its two pools (pools only).
template <int N>
void merge(const float* p0, const float* p1, uint8_t* win, int64_t c0) {
  for (int64_t q = 0; q < H * W; ++q) {
    for (int k = 0; k < N; ++k) {
      const float a = p0[q * C + c0 + k], b = p1[q * C + c0 + k];
      win[q * C + c0 + k] = (b > a) | (b != b);
    }
  }
}

}  // namespace

int main() {
  std::vector<float> x(B * kImage), ct(B * kImage), dx(B * kImage),
      pools(2 * B * kImage), scratch(2 * 2 * W * C);
  std::vector<uint8_t> win(B * kImage), codes(2 * B * kImage);
  std::mt19937 rng(0);
  std::uniform_int_distribution<int> d(-3, 3);
  for (float& v : x) v = static_cast<float>(d(rng));
  for (float& v : ct) v = static_cast<float>(d(rng));
  for (float& v : pools) v = static_cast<float>(d(rng));
  for (uint8_t& v : codes) v = static_cast<uint8_t>(rng() & 7);
  // The members: group 0 (channels 0-31) rows down, group 1 (32-63) up.
  const View tl = view(1, 1), tr = view(1, -1), bl = view(-1, 1),
             br = view(-1, -1);
  auto member = [&](int64_t b, View v, int64_t c0, int me) {
    Member m;
    m.v = v;
    m.c0 = c0;
    m.me = me;
    m.x = x.data() + b * kImage;
    m.pool = pools.data() + (2 * b + me) * kImage;
    m.win = win.data() + b * kImage;
    m.code = codes.data() + (2 * b + me) * kImage;
    m.ct = ct.data() + b * kImage;
    m.dx = dx.data() + b * kImage;
    m.scratch = scratch.data() + me * 2 * W * C;
    return m;
  };
  const View views[2][2] = {{tl, tr}, {bl, br}};
  auto top_bottom = [&](auto codes_flag, bool by_row) {
    constexpr bool kCodes = decltype(codes_flag)::value;
    for (int64_t b = 0; b < B; ++b) {
      for (int g = 0; g < 2; ++g) {
        const int64_t c0 = 32 * g;
        if (!kCodes) {
          merge<32>(pools.data() + 2 * b * kImage,
                    pools.data() + (2 * b + 1) * kImage,
                    win.data() + b * kImage, c0);
        }
        const Member m0 = member(b, views[g][0], c0, 0);
        const Member m1 = member(b, views[g][1], c0, 1);
        if (by_row) {
          for (int64_t i = H - 1; i >= 0; --i) {
            member_row<32, kCodes, true>(m0, i);
            member_row<32, kCodes, false>(m1, i);
          }
        } else {
          for (int64_t i = H - 1; i >= 0; --i)
            member_row<32, kCodes, true>(m0, i);
          for (int64_t i = H - 1; i >= 0; --i)
            member_row<32, kCodes, false>(m1, i);
        }
      }
    }
  };
  const standalone::Cases cases = {
      {"single top_left pool's backward, 64 ch",
       [&] {
         for (int64_t b = 0; b < B; ++b) {
           Member m = member(b, tl, 0, 0);
           m.pool = x.data() + b * kImage;  // its out: any array of x's size
           for (int64_t i = H - 1; i >= 0; --i)
             member_row<64, false, true>(m, i);
         }
       }},
      {"copy (read x, write dx)",
       [&] {
         for (int64_t k = 0; k < B * kImage; ++k) dx[k] = x[k] * 1.f;
       }},
      {"top_bottom, pools (shipped)",
       [&] { top_bottom(std::false_type{}, false); }},
      {"top_bottom, codes", [&] { top_bottom(std::true_type{}, false); }},
      {"top_bottom, codes, members by row",
       [&] { top_bottom(std::true_type{}, true); }},
      {"top_bottom, pools, members by row",
       [&] { top_bottom(std::false_type{}, true); }},
  };
  standalone::run_interleaved(cases, 40, dx.data());
}
