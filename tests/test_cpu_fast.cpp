// The fast CPU kernels against the reference backend (the oracle) on random inputs of awkward
// sizes: every weight dtype with a kernel, every kernel table this CPU can run, 1..67 tokens.
//
// The fast matmul computes in fp32 like the reference, in another summation order: the bound
// is 1e-5 of sum_i |w_i x_i|. Token counts cover the decode dot kernels (< 16) and the GEMM.
// Decode through an int8 kernel (dot_q8) also rounds the activations to int8: see
// q8_rounding_bound() for that bound.
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
#include "core/quant.h"
#include "test_util.h"

namespace gemma3 {
namespace {

std::vector<std::string> fast_kernel_names() {
  std::vector<std::string> names = {"portable"};
  if (cpu::select_kernels("avx2")) names.push_back("avx2");
  return names;
}

std::unique_ptr<Backend> fast(const std::string& kernels, int threads = 2) {
  auto b = make_cpu_fast_backend(threads, kernels);
  EXPECT_TRUE(b.ok()) << kernels;
  return std::move(b.value());
}
std::unique_ptr<Backend> ref(int threads = 2) { return std::move(make_cpu_ref_backend(threads).value()); }

using testutil::randn;

// A random [rows, cols] tensor of dtype t: random bytes (every bit pattern of the quants),
// with the fp16 scales overwritten by sane random values.
std::vector<uint8_t> random_weight(DType t, int64_t rows, int64_t cols, uint32_t seed) {
  const uint64_t bytes = row_bytes(t, cols).value() * rows;
  std::vector<uint8_t> w(bytes);
  std::mt19937 g(seed);
  std::uniform_int_distribution<int> byte(0, 255);
  std::uniform_real_distribution<float> scale(0.001f, 0.02f), val(-2.0f, 2.0f);
  auto put_f16 = [&](uint64_t off, float v) {
    const uint16_t h = f32_to_f16(v);
    std::memcpy(&w[off], &h, 2);
  };
  if (t == DType::kF32 || t == DType::kF16 || t == DType::kBF16) {
    for (int64_t i = 0; i < rows * cols; ++i) {
      const float v = val(g);
      if (t == DType::kF32) std::memcpy(&w[i * 4], &v, 4);
      if (t == DType::kF16) put_f16(i * 2, v);
      if (t == DType::kBF16) {
        const uint16_t b = f32_to_bf16(v);
        std::memcpy(&w[i * 2], &b, 2);
      }
    }
    return w;
  }
  for (auto& b : w) b = static_cast<uint8_t>(byte(g));
  const auto& info = dtype_info(t);
  for (uint64_t blk = 0; blk < bytes / info.block_bytes; ++blk) {
    const uint64_t o = blk * info.block_bytes;
    switch (t) {
      case DType::kQ4_K:
      case DType::kQ5_K:
        put_f16(o, scale(g));
        put_f16(o + 2, scale(g));
        break;
      case DType::kQ6_K: put_f16(o + 208, scale(g)); break;
      case DType::kQ4_1:
      case DType::kQ5_1:
        put_f16(o, scale(g) * 4);
        put_f16(o + 2, -scale(g) * 8);  // the block minimum
        break;
      default: put_f16(o, scale(g) * 4); break;
    }
  }
  return w;
}

struct MatmulCase {
  DType dtype;
  int64_t rows, cols;
};

std::string fmt_case(const std::string& kernels, const MatmulCase& c, int n) {
  return kernels + " " + dtype_name(c.dtype) + " [" + std::to_string(c.rows) + "x" + std::to_string(c.cols) +
         "] n=" + std::to_string(n);
}

// The int8 activation rounding of one dot, bounded. Block b of a token's row is stored as
// d_b q_i with d_b = max_b|x| / 127 and q_i = round(x_i / d_b), so x_i = d_b q_i + e_i with
// |e_i| <= d_b / 2. The kernel multiplies the weight quants' scaled values v_i = s q^w_i by
// d_b q_i (a format with a min, w_i = v_i - m_b, takes m_b * sum(x) from the exact fp32 sum), so
// |dot error| <= sum_b d_b / 2 * sum_{i in b} |v_i| = sum_b d_b / 2 * sum_{i in b} |w_i + m_b|.
// For random x this worst case is ~sqrt(32 k / 32) times the typical error; relative to
// sum |w x| it is ~1 / 254 (2^-8), the typical error ~2^-8 / sqrt(k): a real bug (wrong
// block, scale or sign) exceeds it. The 1.001 covers d_b and 1 / d_b rounding in fp32.
// m_b: the row dequantized with its quant bytes zeroed is -m_b at every element (Q4_K/Q5_K).
double q8_rounding_bound(DType t, const uint8_t* row, const float* w, const float* x, int64_t k) {
  std::vector<float> off(k, 0.0f);
  if (t == DType::kQ4_K || t == DType::kQ5_K) {
    const int64_t bb = dtype_info(t).block_bytes;
    std::vector<uint8_t> zeroed(row, row + k / 256 * bb);
    for (int64_t sb = 0; sb < k / 256; ++sb)
      std::memset(&zeroed[sb * bb + 16], 0, bb - 16);  // after d, dmin, scales[12]: qh, qs
    dequantize_row(t, zeroed.data(), off.data(), k);
  }
  double bound = 0;
  for (int64_t b = 0; b < k / 32; ++b) {
    double amax = 0, wsum = 0;
    for (int64_t i = 32 * b; i < 32 * b + 32; ++i) {
      amax = std::max(amax, static_cast<double>(std::fabs(x[i])));
      wsum += std::fabs(static_cast<double>(w[i]) - off[i]);
    }
    bound += amax / 127.0 / 2.0 * wsum;
  }
  return 1.001 * bound;
}

void check_matmul(const std::string& kernels, const MatmulCase& c, int n, uint32_t seed) {
  SCOPED_TRACE(fmt_case(kernels, c, n));
  auto wbytes = random_weight(c.dtype, c.rows, c.cols, seed);
  TensorView view{"w", c.dtype, {c.rows, c.cols}, wbytes.data(), wbytes.size(), {}};
  auto x = randn(static_cast<size_t>(n) * c.cols, seed + 1);
  auto rb = ref(), fb = fast(kernels);
  auto rw = rb->upload(view).value();
  auto fw = fb->upload(view).value();
  std::vector<float> want(static_cast<size_t>(n) * c.rows), got(want.size(), -1.0f);
  rb->matmul(x.data(), n, *rw, want.data());
  fb->matmul(x.data(), n, *fw, got.data());

  const bool int8 =
      n < cpu::kGemmMinTokens && cpu::select_kernels(kernels.c_str())->dot_q8[static_cast<int>(c.dtype)];
  std::vector<float> wrow(c.cols);
  for (int64_t o = 0; o < c.rows; ++o) {
    const uint8_t* rb_ = wbytes.data() + o * (wbytes.size() / c.rows);
    dequantize_row(c.dtype, rb_, wrow.data(), c.cols);
    for (int t = 0; t < n; ++t) {
      const float* xt = x.data() + static_cast<int64_t>(t) * c.cols;
      double mag = 0;
      for (int64_t i = 0; i < c.cols; ++i) mag += std::fabs(wrow[i] * xt[i]);
      double tol = 1e-5 * mag + 1e-6;  // fp32 summation order
      if (int8) tol += q8_rounding_bound(c.dtype, rb_, wrow.data(), xt, c.cols);
      const float w_ = want[t * c.rows + o], g_ = got[t * c.rows + o];
      ASSERT_NEAR(g_, w_, tol) << "row " << o << " token " << t;
    }
  }
}

TEST(CpuFast, MatmulMatchesReferenceForEveryKernelDtype) {
  const MatmulCase cases[] = {
      {DType::kQ4_0, 37, 160}, {DType::kQ5_0, 37, 160}, {DType::kQ8_0, 37, 160}, {DType::kQ4_K, 13, 768},
      {DType::kQ5_K, 13, 768}, {DType::kQ6_K, 13, 768}, {DType::kF16, 11, 200},  {DType::kBF16, 11, 203},
      {DType::kF32, 9, 77},    {DType::kQ4_1, 7, 96},   {DType::kQ5_1, 7, 96},   {DType::kIQ4_NL, 7, 64},
  };
  uint32_t seed = 10;
  for (const std::string& k : fast_kernel_names())
    for (const MatmulCase& c : cases)
      for (int n : {1, 2, 3, 4, 5, 9, 15, 16, 23, 67}) check_matmul(k, c, n, seed++);
}

// Decode shapes of the 270M through the int8 kernels: every token count 1..15 (tiles of
// kMaxTile and their tails), row counts that are no multiple of a task's rows.
TEST(CpuFast, DecodeMatmulEveryTokenCount) {
  const MatmulCase cases[] = {{DType::kQ8_0, 67, 640},  {DType::kQ5_0, 29, 640}, {DType::kQ4_K, 19, 2048},
                              {DType::kQ6_K, 11, 2048}, {DType::kQ4_0, 7, 1024}, {DType::kQ5_K, 5, 512}};
  uint32_t seed = 500;
  for (const std::string& k : fast_kernel_names())
    for (const MatmulCase& c : cases)
      for (int n = 1; n < cpu::kGemmMinTokens; ++n) check_matmul(k, c, n, seed++);
}

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
      auto w = random_weight(t, rows, k, 900 + static_cast<int>(t));
      const int64_t rbytes = static_cast<int64_t>(w.size()) / rows;
      auto x = randn(k, 901);
      TensorView view{"w", t, {rows, k}, w.data(), w.size(), {}};
      auto fb = fast(kn);
      auto fw = fb->upload(view).value();
      std::vector<float> got(rows);
      fb->matmul(x.data(), 1, *fw, got.data());
      double err = 0, bound = 0;
      std::vector<float> wrow(k);
      for (int64_t r = 0; r < rows; ++r) {
        dequantize_row(t, w.data() + r * rbytes, wrow.data(), k);
        double want = 0;
        for (int64_t i = 0; i < k; ++i) want += static_cast<double>(wrow[i]) * x[i];
        err += std::fabs(got[r] - want);
        bound += q8_rounding_bound(t, w.data() + r * rbytes, wrow.data(), x.data(), k);
      }
      EXPECT_LT(err, bound / 4);
      EXPECT_GT(err, 0.0);  // activations really are rounded (not the fp32 path)
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

TEST(CpuFast, MatmulOfManyRowsSplitsWorkWithoutGaps) {
  // More rows than one task holds, odd count; both threads take part.
  for (const std::string& k : fast_kernel_names()) {
    check_matmul(k, {DType::kQ8_0, 4099, 64}, 1, 77);
    check_matmul(k, {DType::kQ6_K, 1031, 256}, 6, 78);
    check_matmul(k, {DType::kQ5_0, 1031, 640}, 40, 79);  // GEMM: many panels, one partial
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
      auto w = random_weight(t, 1, cols, 40 + d);
      std::vector<float> want(cols), got(cols, -1.0f);
      dequantize_row(t, w.data(), want.data(), cols);
      ks->dequant[d](w.data(), cols, got.data());
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

// Attention through the fast backend equals the reference: GQA groups, windows, rings,
// bf16/f32 caches, decode (key splits merged) and prefill.
void check_attention(const std::string& kernels, int n_heads, int n_kv, int hd, int window, int capacity,
                     int pos0, int n, int kv_start, DType kv_type, int bidir_begin = 0, int bidir_end = 0) {
  SCOPED_TRACE(kernels + " heads " + std::to_string(n_heads) + "/" + std::to_string(n_kv) + " window " +
               std::to_string(window) + " cap " + std::to_string(capacity) + " pos0 " + std::to_string(pos0) +
               " n " + std::to_string(n) + " kv_start " + std::to_string(kv_start) + " bidir " +
               std::to_string(bidir_begin) + ".." + std::to_string(bidir_end) + " kv " + dtype_name(kv_type));
  auto rb = ref(), fb = fast(kernels);
  const int kvw = n_kv * hd, qw = n_heads * hd;
  const size_t row = row_bytes(kv_type, hd).value();  // one (slot, head) row
  std::vector<uint8_t> kc(static_cast<size_t>(capacity) * n_kv * row), vc(kc.size());
  KvLayer cache{kc.data(), vc.data(), capacity, kv_type};
  // Fill the cache as a session would: every position from kv_start up to pos0 + n - 1.
  const int total = pos0 + n - kv_start;
  auto k = randn(static_cast<size_t>(total) * kvw, 21), v = randn(k.size(), 22);
  for (int t = 0; t < total; ++t)
    rb->kv_write(k.data() + t * kvw, v.data() + t * kvw, 1, kv_start + t, kvw, cache);
  auto q = randn(static_cast<size_t>(n) * qw, 23);
  AttentionParams p;
  p.n_tokens = n;
  p.pos0 = pos0;
  p.n_heads = n_heads;
  p.n_kv_heads = n_kv;
  p.head_dim = hd;
  p.scale = 1.0f / std::sqrt(static_cast<float>(hd));
  p.window = window;
  p.kv_start = kv_start;
  p.bidir_begin = bidir_begin;
  p.bidir_end = bidir_end;
  std::vector<float> want(static_cast<size_t>(n) * qw), got(want.size(), -7.0f);
  rb->attention(q.data(), cache, p, want.data());
  fb->attention(q.data(), cache, p, got.data());
  for (size_t i = 0; i < want.size(); ++i) ASSERT_NEAR(got[i], want[i], 2e-5f) << "at " << i;
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

TEST(CpuFast, AttentionMatchesReference) {
  for (const std::string& k : fast_kernel_names()) {
    // prefill chunk, GQA group 4, causal
    check_attention(k, 4, 1, 64, 0, 64, 0, 37, 0, DType::kBF16);
    // decode at a long context: keys split over threads and merged
    check_attention(k, 4, 1, 256, 0, 1100, 1000, 1, 0, DType::kBF16);
    check_attention(k, 8, 2, 32, 0, 900, 700, 2, 0, DType::kF32);
    // sliding window through a ring of W + chunk - 1 slots, decode and prefill
    check_attention(k, 4, 1, 256, 512, 512 + 7, 1300, 1, 0, DType::kBF16);
    check_attention(k, 4, 2, 16, 24, 24 + 8 - 1, 100, 8, 0, DType::kF32);
    // a sequence that starts at an offset
    check_attention(k, 2, 1, 8, 0, 600, 100030, 3, 99700, DType::kF32);
  }
}

// Prefill (n >= kGemmMinTokens: query blocks x key chunks through the fp32 GEMM, online
// softmax) equals the reference: all four cache types, windows through rings that wrap,
// kv_start > 0, bidirectional groups (the whole input, as the vision tower; an image inside a
// sliding window), SigLIP's head_dim 72, several query blocks and key chunks.
TEST(CpuFast, PrefillAttentionMatchesReference) {
  for (const std::string& k : fast_kernel_names()) {
    for (DType dt : {DType::kF32, DType::kBF16, DType::kQ8_0, DType::kF8E4M3}) {
      // causal, GQA 4, 3 query blocks, 2 key chunks; a ring that wraps with kv_start > 0
      check_attention(k, 4, 1, 64, 0, 200, 0, 150, 0, dt);
      check_attention(k, 8, 2, 32, 0, 700, 1030, 300, 900, dt);
      // sliding window, ring of W + chunk - 1 slots, the chunk starting mid-sequence
      check_attention(k, 4, 2, 32, 48, 48 + 70 - 1, 333, 70, 0, dt);
      // an image group inside a sliding window smaller than it
      check_attention(k, 2, 1, 64, 16, 16 + 90 - 1, 40, 90, 0, dt, 60, 100);
    }
    for (DType dt : {DType::kF32, DType::kBF16}) {  // head_dim 72: no 32-blocks for q8_0
      // the vision tower: every token sees every token
      check_attention(k, 3, 3, 72, 0, 300, 0, 300, 0, dt, 0, 300);
      check_attention(k, 2, 2, 72, 0, 40, 0, 17, 0, dt, 0, 17);
    }
  }
}

TEST(CpuFast, ElementwiseOpsMatchReference) {
  auto rb = ref();
  for (const std::string& k : fast_kernel_names()) {
    SCOPED_TRACE(k);
    auto fb = fast(k);
    // gelu gate: the fast exp-based tanh stays within a few ulp of std::tanh
    auto g = randn(20001, 31, 3.0f), u = randn(20001, 32);
    g[5] = 30.0f, g[6] = -30.0f, g[7] = 0.0f, g[8] = 1e-6f;
    std::vector<float> want(g.size()), got(g.size());
    rb->gelu_gate(g.data(), u.data(), g.size(), want.data());
    fb->gelu_gate(g.data(), u.data(), g.size(), got.data());
    for (size_t i = 0; i < g.size(); ++i)
      ASSERT_NEAR(got[i], want[i], 1e-6f + 2e-6f * std::fabs(want[i])) << i;
    // rmsnorm with many rows (threaded) and rope at a large position
    const int rows = 300, dim = 640;
    auto x = randn(static_cast<size_t>(rows) * dim, 33), w = randn(dim, 34);
    TensorView wv{"n", DType::kF32, {dim}, w.data(), w.size() * 4, {}};
    auto rw = rb->upload(wv).value();
    auto fw = fb->upload(wv).value();
    std::vector<float> a(x.size()), b(x.size());
    rb->rmsnorm(x.data(), *rw, rows, dim, 1e-6f, a.data());
    fb->rmsnorm(x.data(), *fw, rows, dim, 1e-6f, b.data());
    for (size_t i = 0; i < a.size(); ++i) ASSERT_FLOAT_EQ(b[i], a[i]) << i;
    auto r1 = randn(static_cast<size_t>(13) * 4 * 256, 35), r2 = r1;
    rb->rope(r1.data(), 13, 4, 256, 31000, 1e6f, 8.0f);
    fb->rope(r2.data(), 13, 4, 256, 31000, 1e6f, 8.0f);
    fb->rope(r2.data(), 13, 4, 256, 31000, 1e6f, 8.0f);  // second call: cached table
    rb->rope(r1.data(), 13, 4, 256, 31000, 1e6f, 8.0f);
    EXPECT_EQ(r1, r2);
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
