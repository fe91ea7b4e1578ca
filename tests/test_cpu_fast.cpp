// The fast CPU backend's own pieces, for every kernel table this CPU can run: the int8 decode
// kernels' rounding and quantizer, the dequantizers and the GEMM tile on their own, batch
// invariance, the worker pool, kernel-name errors. Its ops against the reference backend (every
// weight and cache type, decode and GEMM token counts, attention masks) are the Cpu rows of the
// backend conformance suite, test_backend_ops.cpp.
#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "backend/backend.h"
#include "backend/cpu/cpu_backend.h"
#include "backend/cpu/cpu_kernels.h"
#include "backend/cpu/cpu_pool.h"
#include "backend_test_util.h"
#include "core/quant.h"
#include "test_util.h"

namespace gemma3 {
namespace {

std::vector<std::string> fast_kernel_names() {
  std::vector<std::string> names = {"portable"};
  for (const char* isa : {"avx2", "avx512"})
    if (cpu::select_kernels(isa)) names.push_back(isa);
  return names;
}

std::unique_ptr<Backend> fast(const std::string& kernels, int threads = 2) {
  auto b = make_cpu_fast_backend(threads, kernels);
  EXPECT_TRUE(b.ok()) << kernels;
  return std::move(b.value());
}

using testutil::q8_rounding_bound;
using testutil::randn;
using testutil::TestWeight;

// The int8 kernels' rounding is the activations' alone: on typical (Gaussian) inputs a dot's
// error is far below the worst case (~sqrt(k / 32) smaller; at k = 640: checked < 1 / 4 of it
// summed over rows, so a kernel that rounds more, e.g. weights too, would fail).
TEST(CpuFast, Int8DecodeErrorIsTypicallySmall) {
  for (const std::string& kn : fast_kernel_names()) {
    const cpu::KernelSet* ks = cpu::select_kernels(kn.c_str());
    for (DType t : {DType::kQ8_0, DType::kQ5_0, DType::kQ4_K, DType::kQ6_K}) {
      if (!ks->dot_q8[static_cast<int>(t)]) continue;
      SCOPED_TRACE(kn + " " + dtype_name(t));
      const int64_t rows = 64, k = 1024;
      const TestWeight w(t, rows, k, 900 + static_cast<int>(t));
      auto x = randn(k, 901);
      auto fb = fast(kn);
      auto fw = fb->upload(w.view).value();
      // 1 token: the one-row kernel; 8 and 33: the row x token tiles (33 > kGemmMinTokens)
      for (int n : {1, 8, 33}) {
        SCOPED_TRACE(n);
        const auto xs = randn(static_cast<size_t>(n) * k, 901 + n);
        std::vector<float> got(static_cast<size_t>(n) * rows);
        fb->matmul(n == 1 ? x.data() : xs.data(), n, *fw, got.data());
        double err = 0, bound = 0;
        for (int tok = 0; tok < n; ++tok) {
          const float* xt = (n == 1 ? x.data() : xs.data()) + tok * k;
          for (int64_t r = 0; r < rows; ++r) {
            const float* wrow = w.dense.data() + r * k;
            double want = 0;
            for (int64_t i = 0; i < k; ++i) want += static_cast<double>(wrow[i]) * xt[i];
            err += std::fabs(got[tok * rows + r] - want);
            bound += q8_rounding_bound(t, w.row(r), wrow, xt, k);
          }
        }
        EXPECT_LT(err, bound / 4);
        EXPECT_GT(err, 0.0);  // activations really are rounded (not the fp32 path)
      }
    }
  }
}

// The int8 row x token tiles (kernels_avx2.cpp q8tiles, from kQ8TileMinTokens tokens; on the
// avx512 table two blocks per register, so odd block counts leave half a register) against
// the one-row kernel (one call per token), for every type with an int8 kernel: both sum the
// same exact int32 block products times the same fp32 scales, only in another order over
// blocks (the tiles sum per 64-block segment), so they agree to fp32 summation rounding:
// |diff| <= 2 nb eps sum_b |s_b d_b dot_b| <= ~1e-5 of sum |w x| at these widths (nb <= 73,
// plus the activations' rounding, which only moves x by <= d/2 per element: below 1% of it).
// Row counts with every tail of a 4-row tile, one and two segments, token counts around the
// 2-token tiles and kQ8TileMinTokens (below it both sides are the one-row kernel).
TEST(CpuFast, Int8TilesMatchTheOneRowKernel) {
  for (const std::string& kn : fast_kernel_names()) {
    const cpu::KernelSet* ks = cpu::select_kernels(kn.c_str());
    for (DType t : {DType::kQ4_0, DType::kQ5_0, DType::kQ8_0, DType::kQ4_K, DType::kQ5_K, DType::kQ6_K}) {
      const cpu::DotQ8Fn fn = ks->dot_q8[static_cast<int>(t)];
      if (!fn) continue;
      const bool kq = dtype_info(t).block_elems == 256;
      for (int64_t k : {kq ? int64_t{256} : int64_t{96}, kq ? int64_t{2304} : int64_t{2336}}) {
        const int rows = 7;
        const TestWeight w(t, rows, k, 950 + static_cast<int>(t));
        const int64_t rb = static_cast<int64_t>(*row_bytes(t, k));
        for (int nt : {2, 3, 5, 8, 16, 17, 33, 64}) {
          SCOPED_TRACE(kn + " " + dtype_name(t) + " k " + std::to_string(k) + " nt " + std::to_string(nt));
          const auto x = randn(static_cast<size_t>(nt) * k, 951 + nt);
          std::vector<cpu::Q8Block> q(static_cast<size_t>(nt) * (k / 32));
          std::vector<const cpu::Q8Block*> acts(nt);
          for (int i = 0; i < nt; ++i) {
            ks->quantize_q8(x.data() + i * k, k, q.data() + i * (k / 32));
            acts[i] = q.data() + i * (k / 32);
          }
          // rows [1, 7) in one call: the 4-row tile and a 2-row tail, the output strided
          const int64_t ldo = rows + 3;
          std::vector<float> tiled(static_cast<size_t>(nt) * ldo, -1.0f), one(nt * rows);
          fn(k, w.bytes.data() + rb, rb, rows - 1, acts.data(), nt, tiled.data() + 1, ldo);
          for (int i = 0; i < nt; ++i)
            fn(k, w.bytes.data(), rb, rows, acts.data() + i, 1, one.data() + i * rows, rows);
          for (int i = 0; i < nt; ++i) {
            EXPECT_EQ(tiled[i * ldo], -1.0f);  // nothing written outside the rows asked for
            for (int r = rows + 1; r < ldo; ++r) EXPECT_EQ(tiled[i * ldo + r], -1.0f);
            for (int r = 1; r < rows; ++r) {
              double mag = 0;
              for (int64_t e = 0; e < k; ++e) mag += std::fabs(w.dense[r * k + e] * x[i * k + e]);
              EXPECT_NEAR(tiled[i * ldo + r], one[i * rows + r], 1e-5 * mag + 1e-6)
                  << "row " << r << " token " << i;
            }
          }
        }
      }
    }
  }
}

// quantize_q8 against its definition.
TEST(CpuFast, QuantizeQ8MatchesDefinition) {
  for (const std::string& kn : fast_kernel_names()) {
    const cpu::KernelSet* ks = cpu::select_kernels(kn.c_str());
    if (!ks->quantize_q8) continue;
    auto x = randn(256, 902, 3.0f);
    std::fill(x.begin() + 64, x.begin() + 96, 0.0f);  // an all-zero block: d = 0, q = 0
    x[5] = 1e-30f;
    std::vector<cpu::Q8Block> q(256 / 32);
    ks->quantize_q8(x.data(), 256, q.data());
    for (int b = 0; b < 8; ++b) {
      float amax = 0, sum = 0;
      for (int i = 0; i < 32; ++i) amax = std::max(amax, std::fabs(x[32 * b + i])), sum += x[32 * b + i];
      ASSERT_FLOAT_EQ(q[b].d, amax / 127.0f) << kn << " block " << b;
      ASSERT_NEAR(q[b].sum, sum, 1e-5f * 32 * amax) << kn << " block " << b;
      for (int i = 0; i < 32; ++i) {
        const float xi = x[32 * b + i];
        ASSERT_LE(std::abs(static_cast<int>(q[b].q[i])), 127);
        ASSERT_LE(std::fabs(xi - q[b].d * q[b].q[i]), q[b].d * 0.5001f + 1e-30f)
            << kn << " b " << b << " i " << i;
      }
    }
  }
}

// Each kernel table's dequantizers equal the reference dequantizer (the GEMM's weight panels).
TEST(CpuFast, DequantMatchesReference) {
  for (const std::string& k : fast_kernel_names()) {
    const cpu::KernelSet* ks = cpu::select_kernels(k.c_str());
    ASSERT_NE(ks, nullptr);
    for (int d = 0; d < cpu::kNumDTypes; ++d) {
      if (!ks->dequant[d]) continue;
      const DType t = static_cast<DType>(d);
      const int64_t cols = dtype_info(t).block_elems > 1 ? 3 * 256 : 203;
      const TestWeight w(t, 1, cols, 40 + d);
      std::vector<float> want(cols), got(cols, -1.0f);
      dequantize_row(t, w.bytes.data(), want.data(), cols);  // without F8E4M3's row scale
      ks->dequant[d](w.bytes.data(), cols, got.data());
      for (int64_t i = 0; i < cols; ++i)
        ASSERT_NEAR(got[i], want[i], 1e-6f * std::fabs(want[i])) << k << " " << dtype_name(t) << " at " << i;
    }
  }
}

// The GEMM tile kernel on its own: panels of every height up to kGemmPanel, token tails,
// strides wider than k (as for F32 weights used in place).
TEST(CpuFast, GemmTileMatchesPlainDots) {
  for (const std::string& k : fast_kernel_names()) {
    const cpu::KernelSet* ks = cpu::select_kernels(k.c_str());
    ASSERT_NE(ks->gemm_f32, nullptr);
    for (int64_t cols : {8, 77, 640}) {
      const int64_t ldw = cols + 3, ldx = cols + 5, ldo = 37;
      auto w = randn(static_cast<size_t>(cpu::kGemmPanel) * ldw, 50),
           x = randn(static_cast<size_t>(13) * ldx, 51);
      std::vector<float> scratch(static_cast<size_t>(cpu::kGemmPanel) * cols);
      for (int nr : {1, 5, cpu::kGemmPanel})
        for (int nt : {1, 6, 13}) {
          std::vector<float> out(static_cast<size_t>(nt) * ldo, -3.0f);
          ks->gemm_f32(w.data(), ldw, nr, x.data(), ldx, nt, cols, out.data(), ldo, scratch.data());
          for (int t = 0; t < nt; ++t)
            for (int r = 0; r < ldo; ++r) {
              if (r >= nr) {
                ASSERT_EQ(out[t * ldo + r], -3.0f) << "wrote past nr";
                continue;
              }
              double want = 0, mag = 0;
              for (int64_t i = 0; i < cols; ++i) {
                want += static_cast<double>(w[r * ldw + i]) * x[t * ldx + i];
                mag += std::fabs(w[r * ldw + i] * x[t * ldx + i]);
              }
              ASSERT_NEAR(out[t * ldo + r], want, 1e-5 * mag + 1e-6)
                  << k << " cols " << cols << " nr " << nr << " nt " << nt << " r " << r << " t " << t;
            }
        }
    }
  }
}

// BackendOptions::batch_invariant: a query's attention output is the same bits in a call of 64
// queries and in a call of its own, where a 300-key window crosses the blocked attention's
// 256-key chunks at different offsets unless chunks are aligned to absolute positions, and its
// matmul row the same bits at 1, 5 and 40 rows; for each kernel set (a Q8_0 weight: int8
// activations by default).
TEST(CpuFast, BatchInvariantRowsDoNotDependOnTheCall) {
  for (const std::string& kernels : fast_kernel_names()) {
    SCOPED_TRACE(kernels);
    auto b = make_cpu_fast_backend(2, kernels, /*batch_invariant=*/true);
    ASSERT_TRUE(b.ok());
    Backend& fb = **b;
    const int n_heads = 2, n_kv = 1, hd = 32, capacity = 700, pos0 = 400, n = 64, window = 300;
    std::vector<float> kc(static_cast<size_t>(capacity) * hd), vc(kc.size());
    KvLayer cache{kc.data(), vc.data(), capacity, DType::kF32};
    const auto k = randn(static_cast<size_t>(pos0 + n) * hd, 31), v = randn(k.size(), 32);
    fb.kv_write(k.data(), v.data(), pos0 + n, 0, hd, cache);
    const auto q = randn(static_cast<size_t>(n) * n_heads * hd, 33);
    AttentionParams p;
    p.n_tokens = n;
    p.pos0 = pos0;
    p.n_heads = n_heads;
    p.n_kv_heads = n_kv;
    p.head_dim = hd;
    p.scale = 0.17f;
    p.window = window;
    std::vector<float> block(q.size()), single(q.size());
    fb.attention(q.data(), cache, p, block.data());
    for (int t = 0; t < n; ++t) {
      AttentionParams one = p;
      one.n_tokens = 1;
      one.pos0 = pos0 + t;
      fb.attention(q.data() + t * n_heads * hd, cache, one, single.data() + t * n_heads * hd);
    }
    EXPECT_TRUE(block == single) << "attention rows differ between one call and one call per query";

    const int rows = 48, cols = 256;
    const auto wf = randn(static_cast<size_t>(rows) * cols, 34);
    std::vector<uint8_t> wq(static_cast<size_t>(rows) * (cols / 32) * 34);
    for (int r = 0; r < rows; ++r)
      quantize_row(DType::kQ8_0, wf.data() + r * cols, wq.data() + r * (cols / 32) * 34, cols);
    TensorView tv{"w", DType::kQ8_0, {rows, cols}, wq.data(), wq.size(), {}};
    auto w = fb.upload(tv);
    ASSERT_TRUE(w.ok());
    const auto x = randn(static_cast<size_t>(40) * cols, 35);
    std::vector<float> all(static_cast<size_t>(40) * rows), part(all.size());
    fb.matmul(x.data(), 40, **w, all.data());
    for (int t0 = 0; t0 < 40; t0 += t0 < 5 ? 1 : 5)
      fb.matmul(x.data() + t0 * cols, t0 < 5 ? 1 : 5, **w, part.data() + t0 * rows);
    EXPECT_TRUE(all == part) << "matmul rows differ between 40, 5 and 1 rows per call";
  }
}

TEST(CpuFast, PoolRunsEveryTaskOnce) {
  for (int threads : {1, 2, 3}) {
    cpu::CpuPool pool(threads);
    for (int64_t n : {0, 1, 2, 5, 1000}) {
      std::vector<std::atomic<int>> hits(n);
      for (int rep = 0; rep < 50; ++rep) pool.run(n, [&](int64_t t, int) { hits[t].fetch_add(1); });
      for (int64_t i = 0; i < n; ++i) ASSERT_EQ(hits[i].load(), 50) << threads << " " << n << " " << i;
    }
    int64_t covered = 0;
    std::atomic<int64_t> sum{0};
    pool.run_ranges(1001, 64, [&](int64_t b, int64_t e, int) { sum.fetch_add(e - b); });
    covered = sum.load();
    EXPECT_EQ(covered, 1001);
  }
}

TEST(CpuFast, UnknownKernelNameIsAnError) {
  auto b = make_cpu_fast_backend(1, "sse9");
  EXPECT_FALSE(b.ok());
  EXPECT_NE(b.status().message().find("sse9"), std::string::npos);
}

}  // namespace
}  // namespace gemma3
