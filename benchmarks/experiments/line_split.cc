// Why a grouped pool of float32 quadrants costs more than one pool over the
// same array on a CPU: a standalone experiment (no JAX), the numbers are in
// docs/perf-log.md ("CPU, 2026-12-03: octants swept together; where the rest
// of the grouped gap is").
//
//   g++ -O3 -march=x86-64-v3 -ffp-contract=off -o /tmp/line_split
//       benchmarks/experiments/line_split.cc && taskset -c 1 /tmp/line_split
//
// (8, 64, 64, 64) float32: a pixel's 64 channels are 256 bytes, four cache
// lines, and a quadrant group of 16 channels is one of them. Every case is
// timed interleaved with the others, minimum of 60 rounds; ratios are to a
// single top_left pool over all 64 channels. The pool is the unguided
// forward (max with the kernels' tie and NaN rule), with the left
// neighbour's result kept in registers.
#include <cstdint>
#include <random>
#include <vector>

#include "standalone.h"

namespace {

typedef float V __attribute__((vector_size(32)));
inline V load(const float* p) {
  V v;
  __builtin_memcpy(&v, p, 32);
  return v;
}
inline void store(float* p, V v) { __builtin_memcpy(p, &v, 32); }
inline V take_max(V m, V v) {
  const V larger = v > m ? v : m;
  return v != v ? v : larger;
}

using standalone::B;
using standalone::C;
using standalone::H;
using standalone::kImage;
using standalone::View;
using standalone::view;
using standalone::W;

// K views of NV vectors (8 channels each) swept together, view pixel (i, j)
// of each in turn; view k's channels start at c0[k].
template <int K, int NV>
void sweep(const float* x, float* o, const View* v, const int64_t* c0) {
  for (int64_t i = 0; i < H; ++i) {
    const float* xp[K];
    float* op[K];
    V left[K][NV] = {};
    for (int k = 0; k < K; ++k) {
      const int64_t p = v[k].start + i * v[k].row + c0[k];
      xp[k] = x + p;
      op[k] = o + p;
    }
    for (int64_t j = 0; j < W; ++j) {
      for (int k = 0; k < K; ++k) {
        for (int u = 0; u < NV; ++u) {
          V m = load(xp[k] + 8 * u);
          if (j > 0) m = take_max(m, left[k][u]);
          if (i > 0) m = take_max(m, load(op[k] - v[k].row + 8 * u));
          store(op[k] + 8 * u, m);
          left[k][u] = m;
        }
        xp[k] += v[k].col;
        op[k] += v[k].col;
      }
    }
  }
}

}  // namespace

int main() {
  std::vector<float> x(B * kImage), o(B * kImage);
  std::mt19937 rng(0);
  std::uniform_int_distribution<int> d(-3, 3);
  for (float& v : x) v = static_cast<float>(d(rng));
  const View tl = view(1, 1), tr = view(1, -1), bl = view(-1, 1),
             br = view(-1, -1);
  const View quads[4] = {tl, tr, bl, br}, tls[4] = {tl, tl, tl, tl};
  const int64_t lines[4] = {0, 16, 32, 48};
  const float* xs = x.data();
  float* os = o.data();
  const standalone::Cases cases = {
      {"single top_left pool, 64 channels",
       [&] {
         for (int b = 0; b < B; ++b)
           sweep<1, 8>(xs + b * kImage, os + b * kImage, &tl, lines);
       }},
      {"copy",
       [&] {
         for (int64_t k = 0; k < B * kImage; ++k) os[k] = xs[k] * 1.f;
       }},
      {"copy of line 0 of every pixel",
       [&] {
         for (int64_t k = 0; k < B * kImage; k += C)
           for (int c = 0; c < 16; ++c) os[k + c] = xs[k + c] * 1.f;
       }},
      {"copy of lines 0-1 of every pixel",
       [&] {
         for (int64_t k = 0; k < B * kImage; k += C)
           for (int c = 0; c < 32; ++c) os[k + c] = xs[k + c] * 1.f;
       }},
      {"4 top_left groups, swept together",
       [&] {
         for (int b = 0; b < B; ++b)
           sweep<4, 2>(xs + b * kImage, os + b * kImage, tls, lines);
       }},
      {"4 top_left groups, two sweeps of two",
       [&] {
         for (int b = 0; b < B; ++b) {
           sweep<2, 2>(xs + b * kImage, os + b * kImage, tls, lines);
           sweep<2, 2>(xs + b * kImage, os + b * kImage, tls, lines + 2);
         }
       }},
      {"4 top_left groups, one by one",
       [&] {
         for (int b = 0; b < B; ++b)
           for (int k = 0; k < 4; ++k)
             sweep<1, 2>(xs + b * kImage, os + b * kImage, tls, lines + k);
       }},
      {"quadrants, swept together",
       [&] {
         for (int b = 0; b < B; ++b)
           sweep<4, 2>(xs + b * kImage, os + b * kImage, quads, lines);
       }},
      {"quadrants, tl+tr down then bl+br up",
       [&] {
         for (int b = 0; b < B; ++b) {
           sweep<2, 2>(xs + b * kImage, os + b * kImage, quads, lines);
           sweep<2, 2>(xs + b * kImage, os + b * kImage, quads + 2, lines + 2);
         }
       }},
      {"quadrants, one by one",
       [&] {
         for (int b = 0; b < B; ++b)
           for (int k = 0; k < 4; ++k)
             sweep<1, 2>(xs + b * kImage, os + b * kImage, quads + k,
                         lines + k);
       }},
  };
  standalone::run_interleaved(cases, 60, os);
}
