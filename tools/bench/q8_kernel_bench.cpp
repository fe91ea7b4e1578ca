// Micro benchmark of the int8 decode kernels (KernelSet::dot_q8, cpu_kernels.h) alone: one
// thread, a 4096-row weight at the 270M's widths (k = 640 for Q8_0 / Q5_0 / Q4_0, 2048 for
// Q4_K / Q6_K, 1024 for Q5_K), called on 64-row ranges as the fast backend's matmul does, for
// each kernel table this CPU runs. Prints int8 GMAC/s (rows x k x tokens / time), the best of
// several repetitions, per table, dtype and token count (1..4: the one-row kernel; from
// kQ8TileMinTokens: the row x token tiles).
//
// Not part of the CMake build (a measuring tool, not a test); build it against a Release library:
//   g++ -O2 -std=c++20 -Isrc -Iinclude tools/bench/q8_kernel_bench.cpp build/srv/libgemma3.a \
//       -lfmt -pthread -o /tmp/q8_kernel_bench
//   /tmp/q8_kernel_bench [tokens,... [table [dtype]]]   (default: 1,8,32, every table and dtype)
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

#include "backend/cpu/cpu_kernels.h"
#include "core/dtype.h"
#include "core/quant.h"

using namespace gemma3;

namespace {

double best_seconds(int reps, const auto& fn) {
  double best = 1e30;
  for (int i = 0; i < reps; ++i) {
    const auto t0 = std::chrono::steady_clock::now();
    fn();
    best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  }
  return best;
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<int> token_counts = {1, 8, 32};
  if (argc > 1) {
    token_counts.clear();
    for (char* s = argv[1]; *s;) {
      token_counts.push_back(static_cast<int>(std::strtol(s, &s, 10)));
      if (*s == ',') ++s;
    }
  }
  constexpr int64_t kRows = 4096, kRange = 64;
  const struct {
    DType t;
    int64_t k;
  } shapes[] = {{DType::kQ8_0, 640},  {DType::kQ5_0, 640},  {DType::kQ4_0, 640},
                {DType::kQ4_K, 2048}, {DType::kQ6_K, 2048}, {DType::kQ5_K, 1024}};
  std::mt19937 rng(1);
  std::normal_distribution<float> nd;
  const std::string only_table = argc > 2 ? argv[2] : "", only_dtype = argc > 3 ? argv[3] : "";
  for (const char* table : {"avx2", "avx512"}) {
    if (!only_table.empty() && only_table != table) continue;
    const cpu::KernelSet* ks = cpu::select_kernels(table);
    if (!ks) {
      std::printf("%s: cannot run on this CPU\n", table);
      continue;
    }
    for (const auto& s : shapes) {
      const cpu::DotQ8Fn fn = ks->dot_q8[static_cast<int>(s.t)];
      if (!fn || (!only_dtype.empty() && only_dtype != dtype_name(s.t))) continue;
      const int64_t rb = static_cast<int64_t>(*row_bytes(s.t, s.k));
      std::vector<float> row(s.k);
      std::vector<uint8_t> w(kRows * rb);
      for (int64_t r = 0; r < kRows; ++r) {
        for (float& v : row) v = nd(rng);
        quantize_row(s.t, row.data(), w.data() + r * rb, s.k);
      }
      for (int nt : token_counts) {
        const int64_t nb = s.k / 32;
        std::vector<cpu::Q8Block> q(nt * nb);
        std::vector<const cpu::Q8Block*> acts(nt);
        for (int t = 0; t < nt; ++t) {
          for (float& v : row) v = nd(rng);
          ks->quantize_q8(row.data(), s.k, q.data() + t * nb);
          acts[t] = q.data() + t * nb;
        }
        std::vector<float> out(nt * kRows);
        const int reps = std::max(5, 400 / nt);
        const double sec = best_seconds(reps, [&] {
          for (int64_t r0 = 0; r0 < kRows; r0 += kRange)
            fn(s.k, w.data() + r0 * rb, rb, kRange, acts.data(), nt, out.data() + r0, kRows);
        });
        std::printf("%-7s %-5s k %5lld tokens %3d: %6.1f GMAC/s\n", table, dtype_name(s.t),
                    static_cast<long long>(s.k), nt, kRows * s.k * nt / sec * 1e-9);
      }
    }
  }
  return 0;
}
