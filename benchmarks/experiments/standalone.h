// What the standalone CPU experiments (line_split.cc, winner_codes.cc) share:
// the shape, a direction's strided view of one image, and the interleaved
// timer. Header-only, so each still builds with one g++ line.
#pragma once

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <functional>
#include <string>
#include <utility>
#include <vector>

namespace standalone {

// (8, 64, 64, 64) float32: a pixel's 64 channels are 256 bytes.
constexpr int64_t H = 64, W = 64, C = 64, B = 8, kImage = H * W * C;

struct View {
  int64_t start, row, col;  // a direction's strided view of one image
};
inline View view(int row_step, int col_step) {
  return View{
      (row_step < 0 ? (H - 1) * W * C : 0) + (col_step < 0 ? (W - 1) * C : 0),
      row_step * W * C, col_step * C};
}

using Cases = std::vector<std::pair<std::string, std::function<void()>>>;

// Times every case interleaved with the others, `rounds` rounds, and prints
// each one's minimum and its ratio to the first case's. `sink`: the memory
// the cases write, kept live.
inline void run_interleaved(const Cases& cases, int rounds, const void* sink) {
  std::vector<double> best(cases.size(), 1e9);
  for (int round = 0; round < rounds; ++round) {
    for (size_t c = 0; c < cases.size(); ++c) {
      const auto t0 = std::chrono::steady_clock::now();
      cases[c].second();
      asm volatile("" : : "r"(sink) : "memory");
      const auto t1 = std::chrono::steady_clock::now();
      best[c] = std::min(
          best[c], std::chrono::duration<double, std::milli>(t1 - t0).count());
    }
  }
  for (size_t c = 0; c < cases.size(); ++c) {
    std::printf("%-40s %7.3f ms %5.2fx single pool\n", cases[c].first.c_str(),
                best[c], best[c] / best[0]);
  }
}

}  // namespace standalone
