// The backend conformance suite (issue #16; as llama.cpp's test-backend-ops): one table of cases
// per Backend op (backend.h) — shapes at awkward sizes, every weight and KV cache type, decode
// and GEMM token counts, the attention mask's edge cases — run on every backend against the CPU
// reference backend (plain loops, the oracle). Rows (the gtest parameter):
//   Cpu/BackendOps.*/portable, Cpu/BackendOps.*/avx2, Cpu/BackendOps.*/avx512: the fast CPU
//     backend on each kernel table this CPU can run (avx2 and avx512 skip elsewhere, naming the
//     CPU features they need);
//   Cuda/BackendOps.*/cuda: the CUDA backend (on the CPU emulator in the GEMMA3_CUDA_EMU build);
//     skips with make_cuda_backend's status without CUDA or a device.
// Each row holds its backend to its own error model (RowTolerance below, with the reasoning).
// Backend-specific behaviour (kernel choice, tiles, pools, recording, allocation errors) stays in
// test_cpu_fast.cpp and test_cuda_ops.cpp.
//
// Built into gemma3_tests; in the emulator build the Cpu rows stay there and the Cuda rows go to
// gemma3_cuda_tests (GEMMA3_BACKEND_OPS_ROWS, CMakeLists.txt), whose runs shrink the largest
// cases under GEMMA3_CUDA_EMU_SMALL=1 (emu_small()).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <ostream>
#include <random>
#include <string>
#include <vector>

#include "backend/backend.h"
#include "backend/cpu/cpu_backend.h"
#include "backend/cpu/cpu_kernels.h"
#include "backend_test_util.h"
#include "core/dtype.h"
#include "core/quant.h"
#include "test_util.h"

#ifndef GEMMA3_BACKEND_OPS_ROWS
#define GEMMA3_BACKEND_OPS_ROWS 3  // 1: the Cpu rows, 2: the Cuda row, 3: both
#endif

namespace gemma3 {
namespace {

using testutil::Buf;
using testutil::kU;
using testutil::randn;
using testutil::TestWeight;

enum class Kind { kCpuFast, kCuda };

// How close a row's results must be to the reference's, per op. Only the error sources each
// backend actually has are allowed; an indexing, masking or scale bug exceeds every bound here.
struct RowTolerance {
  // matmul. CPU: the fast kernels compute in fp32 like the reference, in another summation
  // order: 1e-5 of sum_i |w_i x_i| (+ 1e-6), plus, when an int8 decode kernel (dot_q8) serves the
  // call, q8_rounding_bound (backend_test_util.h: the activations' int8 rounding). CUDA: 1e-4 of
  // sum|w x| and, past kGemvMaxTokens on a non-F32 weight, the bf16-GEMM model
  // (check_cuda_matmul).
  bool cuda_matmul;
  // rmsnorm. CPU: the reference's loop (same fp32 order): within 4 ulps (gtest's FLOAT_EQ).
  // CUDA: only the sum of squares differs (order); its relative error is ~sqrt(dim) * u, halved
  // by the square root: 2e-5 relative is > 20x that at dim 5376.
  int rmsnorm_ulps;
  double rmsnorm_rel;
  // The relative error of one rmsnorm in the fused ops (add_rmsnorm, qk_norm_rope_kv_write):
  // CPU 4 ulps (4 * 2^-23), CUDA 2e-5 as above.
  double norm_rel;
  // rope: |error| <= rope_mag * (|a| + |b|) of the rotated pair. CPU: the same fp32 angles and
  // double cos/sin as the reference, tabled: exact (0). CUDA: the device's double cos/sin
  // against glibc's can flip the final float rounding of c or s by one ulp: 4 u.
  double rope_mag;
  // qk_norm_rope_kv_write's q and k: rmsnorm's bound through rope's rotation, times (|a| + |b|)
  // of the normed pair. CPU: 1e-6 (4 ulps of the norm, exact rope). CUDA: 3e-5.
  double qk_mag;
  // gelu_gate: |error| <= abs + rel_want |want| + rel_gu |g u|. CPU: the fast exp-based tanh
  // stays within a few ulp of std::tanh: 1e-6 + 2e-6 |want|. CUDA: tanhf is within 2 ulp of
  // std::tanh and the cubic may be contracted into FMAs: within a few ulp of |gelu(g) u| <=
  // |g u|: 16 u |g u|.
  double gelu_gate_abs, gelu_gate_rel_want, gelu_gate_rel_gu;
  // attention, absolute. CPU: 2e-5 (the blocked online softmax sums in another order). CUDA:
  // same dequantized values (shared decoders), same fp32 math but the q.k sums, the softmax
  // sums and the split combination in another order, and expf vs std::exp (<= 2 ulp): scores
  // (|s| ~ 1..4) agree to ~1e-6 relative, so softmax weights do too; outputs are convex
  // combinations of v (|v| < ~5), so |error| < ~1e-5: 3e-5, and 3e-6 past 10000 keys (outputs
  // there are ~1/sqrt(keys) ~ 3e-3 but a wrong chunk moves them by as much); plus flash_bound
  // where the tensor-core prefill kernel serves the call.
  bool cuda_attention;
  // layernorm / add_layernorm output and gelu, max error over max |value|. CPU: both CPU
  // backends run the same code (HostBackend): exact (0). CUDA: layernorm sums mean and
  // variance in another order: 1e-5; gelu: tanhf vs std::tanh, 1-2 ulps: 1e-6.
  double layernorm_rel, gelu_rel;
  // sample: CPU, Backend::sample's default (the host Sampler itself): every draw identical.
  // CUDA: identical where the device sorts exactly; where the softmax sum is the device's (another
  // order) a draw within 1e-16 of a boundary may flip: one in a case.
  bool sample_is_host_sampler;
};

RowTolerance cpu_tolerance() {
  return {false, 4, 0, 4 * std::ldexp(1.0, -23), 0, 1e-6, 1e-6, 2e-6, 0, false, 0, 0, true};
}
RowTolerance cuda_tolerance() {
  return {true, 0, 2e-5, 2e-5, 4 * kU, 3e-5, 1e-30, 0, 16 * kU, true, 1e-5, 1e-6, false};
}

struct BackendRow {
  std::string name;  // the test name's suffix; for the CPU, the kernel table
  Kind kind;
};

void PrintTo(const BackendRow& row, std::ostream* os) { *os << row.name; }

class BackendOps : public ::testing::TestWithParam<BackendRow> {
 protected:
  void SetUp() override {
    const BackendRow& row = GetParam();
    if (row.kind == Kind::kCpuFast) {
      kernels_ = cpu::select_kernels(row.name.c_str());
      if (!kernels_)
        GTEST_SKIP() << "the " << row.name << " CPU kernels cannot run on this CPU (they need "
                     << cpu::kernels_requirement(row.name.c_str()) << ")";
      auto b = make_cpu_fast_backend(2, row.name);
      ASSERT_TRUE(b.ok()) << b.status().to_string();
      be_ = std::move(*b);
      tol_ = cpu_tolerance();
    } else {
      auto g = make_cuda_backend({});
      if (!g.ok()) GTEST_SKIP() << "no CUDA backend here: " << g.status().to_string();
      be_ = std::move(*g);
      tol_ = cuda_tolerance();
    }
    ref_ = testutil::cpu_reference_backend();
    ASSERT_NE(ref_, nullptr);
  }
  void TearDown() override {
    if (be_) {
      Status s = be_->status();
      EXPECT_TRUE(s.ok()) << s.to_string();
    }
  }
  bool cuda() const { return GetParam().kind == Kind::kCuda; }
  // The CUDA emulator with GEMMA3_CUDA_EMU_SMALL: the largest cases are skipped.
  bool skip_large() const { return cuda() && testutil::emu_small(); }

  // be_'s matmul of random x [n, w.cols] against the reference's, within the row's model.
  void check_matmul(const TestWeight& w, int n, uint32_t seed);

  std::unique_ptr<Backend> be_, ref_;
  const cpu::KernelSet* kernels_ = nullptr;
  RowTolerance tol_{};
};

std::string row_name(const ::testing::TestParamInfo<BackendRow>& info) { return info.param.name; }

// ---- matmul ----------------------------------------------------------------------------------

void BackendOps::check_matmul(const TestWeight& w, int n, uint32_t seed) {
  const std::string what = std::string(dtype_name(w.dtype)) + " [" + std::to_string(w.rows) + " x " +
                           std::to_string(w.cols) + "] n " + std::to_string(n);
  SCOPED_TRACE(what);
  auto wb = be_->upload(w.view);
  auto wr = ref_->upload(w.view);
  ASSERT_TRUE(wb.ok() && wr.ok()) << wb.status().to_string() << " " << wr.status().to_string();
  const auto x = randn(static_cast<size_t>(n) * w.cols, seed);
  Buf xb(*be_, x), ob(*be_, static_cast<size_t>(n) * w.rows * 4);
  std::vector<float> want(static_cast<size_t>(n) * w.rows);
  ref_->matmul(x.data(), n, **wr, want.data());
  be_->matmul(xb.f(), n, **wb, ob.f());
  const auto got = ob.read();
  if (tol_.cuda_matmul) {
    EXPECT_EQ(
        testutil::check_cuda_matmul(w.dense, x, w.rows, w.cols, n, testutil::cuda_gemm_in_bf16(w.dtype, n),
                                    got.data(), want.data(), what),
        0);
    return;
  }
  // The fast CPU matmul (cpu_fast_backend.cpp): up to kQ8MaxTokens tokens (any count without a
  // GEMM), the int8 kernel where the table has one for the type (no row scales, whole 32-blocks).
  const bool int8 = (n <= cpu::kQ8MaxTokens || !kernels_->gemm_f32) &&
                    kernels_->dot_q8[static_cast<int>(w.dtype)] && w.row_scale.empty() && w.cols % 32 == 0;
  int bad = 0;
  for (int64_t o = 0; o < w.rows; ++o) {
    const float* wrow = w.dense.data() + o * w.cols;
    for (int t = 0; t < n; ++t) {
      const float* xt = x.data() + static_cast<int64_t>(t) * w.cols;
      double mag = 0;
      for (int64_t i = 0; i < w.cols; ++i) mag += std::fabs(wrow[i] * xt[i]);
      double tol = 1e-5 * mag + 1e-6;  // fp32 summation order
      if (int8) tol += testutil::q8_rounding_bound(w.dtype, w.row(o), wrow, xt, w.cols);
      const float g = got[t * w.rows + o], c = want[t * w.rows + o];
      if (!(std::fabs(g - c) <= tol) && ++bad <= 3)
        ADD_FAILURE() << "row " << o << " token " << t << ": got " << g << ", reference " << c
                      << " (tolerance " << tol << (int8 ? ", int8 activations" : "") << ")";
    }
  }
  EXPECT_EQ(bad, 0);
}

struct MatmulCase {
  DType t;
  int64_t rows, cols;
  std::vector<int> ns;
  bool large = false;  // skipped on the CUDA emulator with GEMMA3_CUDA_EMU_SMALL
};

std::vector<int> one_to(int last) {
  std::vector<int> v;
  for (int n = 1; n <= last; ++n) v.push_back(n);
  return v;
}

// Every weight type at two widths: a non-multiple of 32 where the type allows, and one crossing
// the CUDA GEMV's 1024-column x tile with a partial last tile; 45 rows (no multiple of the GEMV's
// 8 rows per block); decode (1..8: the fused GEMV, the CPU dot kernels) and GEMM token counts.
// Then each type at the widths the CUDA GEMV's paths split differently: a short row (one tile,
// split 1) and a long one that is a multiple of the type's 16-byte chunk but not of 32 lanes'
// worth, crossing the x tile at n >= 5 (plain types also at a width whose rows are not 16-byte
// multiples: the per-element path), at every token count 1..8.
TEST_P(BackendOps, MatmulEveryTypeAndTokenCount) {
  std::vector<MatmulCase> cases;
  for (DType t : testutil::all_weight_types()) {
    const int be = dtype_info(t).block_elems;
    const std::vector<int64_t> wide = be == 1    ? std::vector<int64_t>{37, 2100}
                                      : be == 32 ? std::vector<int64_t>{96, 2336}
                                                 : std::vector<int64_t>{256, 2304};
    const std::vector<int64_t> gemv = be == 1    ? std::vector<int64_t>{40, 2096, 36}
                                      : be == 32 ? std::vector<int64_t>{96, 2080}
                                                 : std::vector<int64_t>{256, 2304};
    for (int64_t cols : wide) cases.push_back({t, 45, cols, {1, 3, 8, 9, 17}});
    for (int64_t cols : gemv) cases.push_back({t, 45, cols, one_to(cuda::kGemvMaxTokens)});
  }
  uint32_t seed = 7;
  for (const MatmulCase& c : cases) {
    TestWeight w(c.t, c.rows, c.cols, seed++);
    for (int n : c.ns) check_matmul(w, n, seed++);
    if (HasFailure()) return;
  }
}

// The fast CPU kernels' shapes: awkward widths per type at the decode dot kernels' tiles and
// tails (kMaxTile) and the GEMM (>= kGemmMinTokens), then the 270M's decode shapes through the
// int8 kernels at every token count 1..15 with row counts that are no multiple of a task's rows.
TEST_P(BackendOps, MatmulDecodeAndGemmTokenCounts) {
  std::vector<MatmulCase> cases = {
      {DType::kQ4_0, 37, 160, {}}, {DType::kQ5_0, 37, 160, {}}, {DType::kQ8_0, 37, 160, {}},
      {DType::kQ4_K, 13, 768, {}}, {DType::kQ5_K, 13, 768, {}}, {DType::kQ6_K, 13, 768, {}},
      {DType::kF16, 11, 200, {}},  {DType::kBF16, 11, 203, {}}, {DType::kF32, 9, 77, {}},
      {DType::kQ4_1, 7, 96, {}},   {DType::kQ5_1, 7, 96, {}},   {DType::kIQ4_NL, 7, 64, {}},
  };
  for (MatmulCase& c : cases) c.ns = {1, 2, 3, 4, 5, 9, 15, 16, 23, 67};
  for (const MatmulCase& c : {MatmulCase{DType::kQ8_0, 67, 640}, MatmulCase{DType::kQ5_0, 29, 640},
                              MatmulCase{DType::kQ4_K, 19, 2048}, MatmulCase{DType::kQ6_K, 11, 2048},
                              MatmulCase{DType::kQ4_0, 7, 1024}, MatmulCase{DType::kQ5_K, 5, 512}}) {
    cases.push_back(c);
    cases.back().ns = one_to(cpu::kGemmMinTokens - 1);
  }
  uint32_t seed = 500;
  for (const MatmulCase& c : cases) {
    TestWeight w(c.t, c.rows, c.cols, seed++);
    for (int n : c.ns) check_matmul(w, n, seed++);
    if (HasFailure()) return;
  }
}

// The int8 kernels from kQ8TileMinTokens tokens on (kernels_avx2.cpp q8tiles: 4-row x 2-token
// tiles over weight blocks staged 64 at a time; avx512: 4-row x 4-token tiles; 2336 columns: an
// odd block count): every type with an int8 kernel, row counts
// with every tail of a 4-row tile, widths of one segment and of two (the second partial: 73
// blocks, 9 super-blocks), token counts around the tiles, kGemmMinTokens and kQ8MaxTokens (65:
// the fp32 GEMM again). Bound: check_matmul's (fp32 summation order + q8_rounding_bound, the
// activations' int8 rounding: the tiles compute each block's product as the one-row kernel).
TEST_P(BackendOps, MatmulInt8TilesEveryTypeAndTokenCount) {
  std::vector<MatmulCase> cases;
  for (DType t : {DType::kQ4_0, DType::kQ5_0, DType::kQ8_0, DType::kQ4_K, DType::kQ5_K, DType::kQ6_K}) {
    const bool kq = dtype_info(t).block_elems == 256;
    for (int64_t rows : {1, 6, 45})
      for (int64_t cols : {kq ? int64_t{512} : int64_t{640}, kq ? int64_t{2304} : int64_t{2336}})
        cases.push_back({t, rows, cols, {1, 2, 3, 5, 8, 16, 17, 33, 64, 65}});
  }
  uint32_t seed = 900;
  for (const MatmulCase& c : cases) {
    TestWeight w(c.t, c.rows, c.cols, seed++);
    for (int n : c.ns) check_matmul(w, n, seed++);
    if (HasFailure()) return;
  }
}

// More rows than one task (CPU) or one grid (CUDA: 8 blocks per SM) holds, so work is split and
// blocks walk several row groups; fewer rows than one CUDA row group, a single row, a row pair
// over 8 warps at one token.
TEST_P(BackendOps, MatmulManyRowsAndNarrowMatrices) {
  const std::vector<MatmulCase> cases = {
      {DType::kQ8_0, 4099, 64, {1}},       {DType::kQ6_K, 1031, 256, {6}}, {DType::kQ5_0, 1031, 640, {40}},
      {DType::kBF16, 3, 4096, {1}},        {DType::kQ4_0, 1, 4096, {2}},   {DType::kQ8_0, 5, 2048, {8}},
      {DType::kQ4_K, 7, 4096, {1}},        {DType::kF8E4M3, 2, 4096, {3}}, {DType::kBF16, 17000, 16, {1}},
      {DType::kQ4_0, 17000, 32, {2}, true}};
  uint32_t seed = 300;
  for (const MatmulCase& c : cases) {
    if (c.large && skip_large()) continue;
    TestWeight w(c.t, c.rows, c.cols, seed++);
    for (int n : c.ns) check_matmul(w, n, seed++);
    if (HasFailure()) return;
  }
}

// ---- embed, rmsnorm, rope, the cache write ---------------------------------------------------

// Same decoder, same two roundings ((value * row scale) * scale): identical bits, for every
// type, a repeated id, and more tokens than a CUDA grid.y could hold (65535).
TEST_P(BackendOps, EmbedIsBitExact) {
  for (DType t : testutil::all_weight_types()) {
    const int64_t rows = 50, cols = dtype_info(t).block_elems == 1 ? 37 : 512;
    TestWeight w(t, rows, cols, 21);
    auto wb = be_->upload(w.view);
    auto wr = ref_->upload(w.view);
    ASSERT_TRUE(wb.ok() && wr.ok());
    const std::vector<int32_t> ids = {49, 0, 7, 7, 31};
    for (int n : {1, 5}) {
      Buf og(*be_, static_cast<size_t>(n * cols) * 4);
      std::vector<float> want(static_cast<size_t>(n * cols));
      ref_->embed(**wr, ids.data(), n, 33.9411f, want.data());
      be_->embed(**wb, ids.data(), n, 33.9411f, og.f());
      const auto got = og.read();
      int bad = 0;
      for (size_t i = 0; i < want.size(); ++i)
        if (!testutil::same_float(got[i], want[i]) && ++bad <= 3)
          ADD_FAILURE() << dtype_name(t) << " n " << n << " element " << i << ": " << got[i] << " vs "
                        << want[i];
      EXPECT_EQ(bad, 0) << dtype_name(t);
    }
  }
  TestWeight w(DType::kF16, 50, 37, 22);
  auto wb = be_->upload(w.view);
  auto wr = ref_->upload(w.view);
  ASSERT_TRUE(wb.ok() && wr.ok());
  const int n = 70001;
  std::vector<int32_t> ids(n);
  for (int t = 0; t < n; ++t) ids[t] = (t * 7) % 50;
  Buf og(*be_, static_cast<size_t>(n) * 37 * 4);
  std::vector<float> want(static_cast<size_t>(n) * 37);
  ref_->embed(**wr, ids.data(), n, 2.5f, want.data());
  be_->embed(**wb, ids.data(), n, 2.5f, og.f());
  EXPECT_EQ(og.read(), want);  // one exact product per element (f16 values * 2.5 fit fp32)
}

TEST_P(BackendOps, RmsNorm) {
  struct Case {
    int dim;
    int64_t rows;
  };
  std::vector<Case> cases = {{640, 300}};  // many rows: the CPU's threaded path
  for (int dim : {37, 128, 256, 1152, 5376})
    for (int64_t rows : {1, 7}) cases.push_back({dim, rows});
  for (const Case& c : cases) {
    SCOPED_TRACE(::testing::Message() << "dim " << c.dim << " rows " << c.rows);
    auto w = randn(c.dim, 1, 0.3f);
    for (float& v : w) v += 1.0f;
    TensorView wv{"norm", DType::kF32, {c.dim}, w.data(), w.size() * 4, {}};
    auto wb = be_->upload(wv);
    auto wr = ref_->upload(wv);
    ASSERT_TRUE(wb.ok() && wr.ok());
    const auto x = randn(static_cast<size_t>(c.rows * c.dim), 2, 3.0f);
    std::vector<float> want(x.size());
    ref_->rmsnorm(x.data(), **wr, c.rows, c.dim, 1e-6f, want.data());
    Buf xb(*be_, x), ob(*be_, x.size() * 4);
    be_->rmsnorm(xb.f(), **wb, c.rows, c.dim, 1e-6f, ob.f());
    be_->rmsnorm(xb.f(), **wb, c.rows, c.dim, 1e-6f, xb.f());  // in place, as forward() does for q/k
    for (const auto& got : {ob.read(), xb.read()})
      for (size_t i = 0; i < want.size(); ++i) {
        if (tol_.rmsnorm_ulps > 0)
          ASSERT_LE(testutil::ulp_distance(got[i], want[i]), tol_.rmsnorm_ulps)
              << "i " << i << ": " << got[i] << " vs " << want[i];
        else
          ASSERT_NEAR(got[i], want[i], tol_.rmsnorm_rel * std::fabs(want[i]) + 1e-30) << "i " << i;
      }
  }
}

TEST_P(BackendOps, RopeIncludingLargePositions) {
  struct Case {
    int n, heads, hd, pos0;
    float theta, scale;
  };
  for (const Case& c : {Case{1, 4, 128, 0, 10000.0f, 1.0f}, Case{5, 3, 256, 17, 1e6f, 8.0f},
                        Case{3, 2, 128, 40000, 1e6f, 8.0f}, Case{2, 8, 256, 131000, 10000.0f, 1.0f},
                        Case{4, 1, 32, 100000, 1e6f, 8.0f}, Case{13, 4, 256, 31000, 1e6f, 8.0f}}) {
    SCOPED_TRACE(::testing::Message() << "n " << c.n << " hd " << c.hd << " pos0 " << c.pos0);
    const auto x = randn(static_cast<size_t>(c.n * c.heads * c.hd), 9);
    auto want = x;
    ref_->rope(want.data(), c.n, c.heads, c.hd, c.pos0, c.theta, c.scale);
    // Twice from the same input: the second call may read tables the first one made.
    Buf x1(*be_, x), x2(*be_, x);
    be_->rope(x1.f(), c.n, c.heads, c.hd, c.pos0, c.theta, c.scale);
    be_->rope(x2.f(), c.n, c.heads, c.hd, c.pos0, c.theta, c.scale);
    const int half = c.hd / 2;
    for (const auto& got : {x1.read(), x2.read()})
      for (size_t i = 0; i < want.size(); ++i) {
        const size_t base = i - i % c.hd, d = i % c.hd % half;
        const float mag = std::fabs(x[base + d]) + std::fabs(x[base + d + half]);
        ASSERT_NEAR(got[i], want[i], tol_.rope_mag * mag) << "i " << i;
      }
  }
}

// Copies, round-to-nearest-even and the Q8_0 quantizer (correctly rounded divide, products and
// round-half-away) are exact operations on every backend: identical cache bytes. 7 tokens at
// 26 in a ring of 10: slots 6..9 then 0..2; 13 tokens at 5 (more than the ring): the
// reference's sequential writes leave the last 10 (positions 8..17), which a parallel write must
// not race onto one slot. Saturation, NaN, zero blocks and halfway cases for the 8-bit encoders.
TEST_P(BackendOps, KvWriteIsBitExactAndWrapsTheRing) {
  for (auto [n, pos0] : {std::pair{7, 26}, std::pair{13, 5}}) {
    for (DType dt : testutil::kv_cache_types()) {
      const int kvw = 2 * 128, capacity = 10;
      const size_t bytes = static_cast<size_t>(capacity) * *row_bytes(dt, kvw);
      auto k = randn(static_cast<size_t>(n * kvw), 4), v = randn(static_cast<size_t>(n * kvw), 5, 100.0f);
      k[3] = 1000.0f, k[4] = -INFINITY, k[5] = NAN, v[7] = 0.0f;
      for (int i = 32; i < 64; ++i) k[i] = 0.0f;
      k[70] = 0.0146484375f;  // halfway between two e4m3 values
      std::vector<uint8_t> ck(bytes, 0), cv(bytes, 0);
      ref_->kv_write(k.data(), v.data(), n, pos0, kvw, KvLayer{ck.data(), cv.data(), capacity, dt});
      Buf kb(*be_, k), vb(*be_, v), ckb(*be_, bytes), cvb(*be_, bytes);
      be_->kv_write(kb.f(), vb.f(), n, pos0, kvw, KvLayer{ckb.get(), cvb.get(), capacity, dt});
      EXPECT_EQ(ckb.read<uint8_t>(), ck) << dtype_name(dt) << " n " << n;
      EXPECT_EQ(cvb.read<uint8_t>(), cv) << dtype_name(dt) << " n " << n;
    }
  }
}

// The fused QK-norm + RoPE + cache write, against the reference's five ops (q, k within the
// row's rmsnorm-through-rope bound; an fp32 cache's k within it too, v exact; 8-bit caches
// exact wherever the encoded k agrees: checked through the q/k values above and KvWrite) and
// against the same backend's five ops (Backend::'s default), bit for bit: a fused pass promises
// the same sums, products and encoders. Decode at a large position, a chunk that wraps the
// ring, a chunk longer than the ring (only its last `capacity` tokens may be written), head dims
// 256, 128 and 48 (not a multiple of 32, while the two heads are: a Q8_0 cache then takes the
// CUDA backend's unfused path).
TEST_P(BackendOps, QkNormRopeKvWriteMatchesTheUnfusedOps) {
  struct Case {
    int n, heads, kv_heads, hd, pos0, capacity;
    float theta, scale;
  };
  for (const Case& c : {Case{1, 8, 4, 256, 70000, 64, 1e6f, 8.0f}, Case{3, 4, 1, 128, 26, 28, 10000.0f, 1.0f},
                        Case{13, 2, 2, 256, 5, 10, 10000.0f, 1.0f}, Case{2, 4, 2, 48, 7, 16, 1e6f, 1.0f}}) {
    const int qw = c.heads * c.hd, kvw = c.kv_heads * c.hd;
    auto qn = randn(c.hd, 21, 0.3f), kn = randn(c.hd, 22, 0.3f);
    for (float& v : qn) v += 1.0f;
    for (float& v : kn) v += 1.0f;
    TensorView qv{"q_norm", DType::kF32, {c.hd}, qn.data(), qn.size() * 4, {}};
    TensorView kv{"k_norm", DType::kF32, {c.hd}, kn.data(), kn.size() * 4, {}};
    auto qb = be_->upload(qv), kb = be_->upload(kv), qr = ref_->upload(qv), kr = ref_->upload(kv);
    ASSERT_TRUE(qb.ok() && kb.ok() && qr.ok() && kr.ok());
    const auto q = randn(static_cast<size_t>(c.n) * qw, 23, 2.0f),
               k = randn(static_cast<size_t>(c.n) * kvw, 24, 3.0f),
               v = randn(static_cast<size_t>(c.n) * kvw, 25);
    for (DType dt : testutil::kv_cache_types()) {
      SCOPED_TRACE(::testing::Message() << dtype_name(dt) << " n " << c.n << " hd " << c.hd);
      const size_t bytes = static_cast<size_t>(c.capacity) * *row_bytes(dt, kvw);
      auto qh = q, kh = k;
      std::vector<uint8_t> ck(bytes, 0), cv(bytes, 0);
      ref_->qk_norm_rope_kv_write(qh.data(), kh.data(), v.data(), **qr, **kr, c.n, c.heads, c.kv_heads, c.hd,
                                  1e-6f, c.pos0, c.theta, c.scale,
                                  KvLayer{ck.data(), cv.data(), c.capacity, dt});
      Buf q1(*be_, q), k1(*be_, k), v1(*be_, v), ck1(*be_, bytes), cv1(*be_, bytes);
      be_->qk_norm_rope_kv_write(q1.f(), k1.f(), v1.f(), **qb, **kb, c.n, c.heads, c.kv_heads, c.hd, 1e-6f,
                                 c.pos0, c.theta, c.scale, KvLayer{ck1.get(), cv1.get(), c.capacity, dt});
      Buf q2(*be_, q), k2(*be_, k), ck2(*be_, bytes), cv2(*be_, bytes);
      be_->Backend::qk_norm_rope_kv_write(q2.f(), k2.f(), v1.f(), **qb, **kb, c.n, c.heads, c.kv_heads, c.hd,
                                          1e-6f, c.pos0, c.theta, c.scale,
                                          KvLayer{ck2.get(), cv2.get(), c.capacity, dt});
      const auto fq = q1.read(), fk = k1.read();
      EXPECT_EQ(fq, q2.read());
      EXPECT_EQ(fk, k2.read());
      EXPECT_EQ(ck1.read<uint8_t>(), ck2.read<uint8_t>());
      EXPECT_EQ(cv1.read<uint8_t>(), cv2.read<uint8_t>());
      auto near = [&](const std::vector<float>& got, const std::vector<float>& want) {
        const int half = c.hd / 2;
        for (size_t i = 0; i < want.size(); ++i) {
          const size_t base = i - i % c.hd, d = i % c.hd % half;
          const double mag = std::fabs(want[base + d]) + std::fabs(want[base + d + half]);
          ASSERT_NEAR(got[i], want[i], tol_.qk_mag * mag + 1e-30) << "i " << i;
        }
      };
      near(fq, qh);
      near(fk, kh);
      if (dt == DType::kF32) {
        auto to_f = [](const std::vector<uint8_t>& b) {
          std::vector<float> f(b.size() / 4);
          std::memcpy(f.data(), b.data(), b.size());
          return f;
        };
        const auto gk = to_f(ck1.read<uint8_t>()), gv = to_f(cv1.read<uint8_t>());
        const auto rk = to_f(ck), rv = to_f(cv);
        // The cached k is the normed, rotated k (|k| ~ 1): the q/k bound above is far below
        // 1e-4 (1 + |k|), which a wrong slot or head exceeds.
        for (size_t i = 0; i < rk.size(); ++i) ASSERT_NEAR(gk[i], rk[i], 1e-4 * (1 + std::fabs(rk[i]))) << i;
        EXPECT_EQ(gv, rv);
      }
    }
  }
}

// The residual step (post-norm, add, the next block's norm) against the reference's three ops
// and against the same backend's three ops (Backend::'s default), bit for bit; without a next
// norm x is all it writes.
TEST_P(BackendOps, AddRmsNormMatchesTheUnfusedOps) {
  const double R = tol_.norm_rel;
  for (int dim : {37, 640, 1152, 5376}) {
    for (int64_t rows : {1, 5}) {
      for (bool next : {true, false}) {
        SCOPED_TRACE(::testing::Message() << "dim " << dim << " rows " << rows << " next " << next);
        auto wp = randn(dim, 31, 0.3f), wn = randn(dim, 32, 0.3f);
        for (float& x : wp) x += 1.0f;
        for (float& x : wn) x += 1.0f;
        TensorView pv{"post", DType::kF32, {dim}, wp.data(), wp.size() * 4, {}};
        TensorView nv{"next", DType::kF32, {dim}, wn.data(), wn.size() * 4, {}};
        auto pb = be_->upload(pv), nb = be_->upload(nv), pr = ref_->upload(pv), nr = ref_->upload(nv);
        ASSERT_TRUE(pb.ok() && nb.ok() && pr.ok() && nr.ok());
        const size_t count = static_cast<size_t>(rows) * dim;
        const auto a = randn(count, 33, 5.0f), x = randn(count, 34, 20.0f);
        std::vector<float> ah = a, xh = x, normed_h(count, -1.0f);
        ref_->add_rmsnorm(ah.data(), **pr, xh.data(), next ? nr->get() : nullptr, rows, dim, 1e-6f,
                          normed_h.data());
        const std::vector<float> sentinel(count, -1.0f);
        Buf a1(*be_, a), x1(*be_, x), o1(*be_, sentinel), a2(*be_, a), x2(*be_, x), o2(*be_, sentinel);
        be_->add_rmsnorm(a1.f(), **pb, x1.f(), next ? nb->get() : nullptr, rows, dim, 1e-6f, o1.f());
        be_->Backend::add_rmsnorm(a2.f(), **pb, x2.f(), next ? nb->get() : nullptr, rows, dim, 1e-6f, o2.f());
        const auto gx = x1.read(), go = o1.read();
        EXPECT_EQ(gx, x2.read());
        EXPECT_EQ(go, o2.read());
        if (!next) EXPECT_EQ(go, sentinel);
        // x + a * f * w: the factor's relative error (R, the row's rmsnorm bound) on the added
        // term, plus the add's rounding. normed: twice R, plus x's error carried through the next
        // factor and weight (large relative to a normed value whose x cancelled to near 0).
        for (int64_t r = 0; r < rows; ++r) {
          double ss = 0;
          for (int i = 0; i < dim; ++i) ss += double(xh[r * dim + i]) * xh[r * dim + i];
          const double factor = 1 / std::sqrt(ss / dim + 1e-6);
          for (int i = 0; i < dim; ++i) {
            const size_t at = static_cast<size_t>(r * dim + i);
            const double x_err = R * std::fabs(double(xh[at]) - x[at]) + 4 * kU * std::fabs(xh[at]);
            ASSERT_NEAR(gx[at], xh[at], x_err + 1e-30) << "x " << at;
            if (next)
              ASSERT_NEAR(go[at], normed_h[at],
                          2 * R * std::fabs(normed_h[at]) + x_err * factor * std::fabs(wn[i]))
                  << "normed " << at;
          }
        }
      }
    }
  }
}

// ---- attention -------------------------------------------------------------------------------

// testutil::attention_cases() with every KV cache type that fits each, the caches holding
// random values in every slot (stale ring slots included: a masking bug reads them).
TEST_P(BackendOps, Attention) {
  for (DType dt : testutil::kv_cache_types()) {
    for (const testutil::AttentionCase& c : testutil::attention_cases()) {
      if (!testutil::attention_case_runs(c, dt)) continue;
      if (c.large && skip_large()) continue;
      const int kvw = c.n_kv_heads * c.hd, qw = c.n_heads * c.hd;
      const auto ck = testutil::encode_cache(dt, randn(static_cast<size_t>(c.capacity) * kvw, 31), kvw);
      const auto cv = testutil::encode_cache(dt, randn(static_cast<size_t>(c.capacity) * kvw, 32), kvw);
      const auto q = randn(static_cast<size_t>(c.n_tokens) * qw, 33);
      const AttentionParams p = testutil::attention_params(c);
      std::vector<float> want(q.size());
      ref_->attention(
          q.data(), KvLayer{const_cast<uint8_t*>(ck.data()), const_cast<uint8_t*>(cv.data()), c.capacity, dt},
          p, want.data());
      Buf qb(*be_, q), ckb(*be_, ck), cvb(*be_, cv), ob(*be_, q.size() * 4);
      be_->attention(qb.f(), KvLayer{ckb.get(), cvb.get(), c.capacity, dt}, p, ob.f());
      const auto got = ob.read();
      double tol = 2e-5;
      std::vector<double> flash;
      if (tol_.cuda_attention) {
        tol = c.capacity > 10000 ? 3e-6 : 3e-5;
        if (testutil::cuda_uses_flash(p, c.capacity, dt, ckb.get(), cvb.get()))
          flash = testutil::flash_bound(p, q, ck, cv, dt, c.capacity);
      }
      for (size_t i = 0; i < want.size(); ++i)
        ASSERT_NEAR(got[i], want[i], tol + (flash.empty() ? 0.0 : flash[i]))
            << c.what << " (" << dtype_name(dt) << (flash.empty() ? "" : ", tensor cores") << ") i " << i;
    }
  }
}

// ---- elementwise and the vision tower's ops -------------------------------------------------

TEST_P(BackendOps, GeluGateAndAdd) {
  const int64_t n = 100003;
  auto g = randn(n, 41, 3.0f);
  const auto u = randn(n, 42);
  g[5] = 30.0f, g[6] = -30.0f, g[7] = 0.0f, g[8] = 1e-6f;
  std::vector<float> want(n), sum(n);
  ref_->gelu_gate(g.data(), u.data(), n, want.data());
  ref_->add(g.data(), u.data(), n, sum.data());
  Buf gb(*be_, g), ub(*be_, u), ob(*be_, static_cast<size_t>(n) * 4);
  be_->gelu_gate(gb.f(), ub.f(), n, ob.f());
  const auto got = ob.read();
  for (int64_t i = 0; i < n; ++i)
    ASSERT_NEAR(got[i], want[i],
                tol_.gelu_gate_abs + tol_.gelu_gate_rel_want * std::fabs(want[i]) +
                    tol_.gelu_gate_rel_gu * std::fabs(g[i] * u[i]))
        << i;
  be_->add(gb.f(), ub.f(), n, gb.f());  // in place
  EXPECT_EQ(gb.read(), sum);            // one correctly rounded add: identical
}

float max_rel(const std::vector<float>& a, const std::vector<float>& b) {
  float m = 0, s = 1e-6f;
  for (size_t i = 0; i < a.size(); ++i) {
    m = std::max(m, std::fabs(a[i] - b[i]));
    s = std::max(s, std::fabs(b[i]));
  }
  return m / s;
}

std::vector<float> shifted(std::vector<float> v, float mean) {
  for (float& x : v) x += mean;
  return v;
}

TEST_P(BackendOps, LayerNormAddBiasGelu) {
  for (int dim : {1, 31, 48, 1152}) {
    const int64_t rows = 37;
    SCOPED_TRACE(dim);
    const auto x = shifted(randn(rows * dim, dim, 2.0f), 0.5f);
    const auto wv = shifted(randn(dim, 2, 0.3f), 1.0f), bv = randn(dim, 3, 0.3f);
    TensorView wt{"w", DType::kF32, {dim}, wv.data(), wv.size() * 4, {}};
    TensorView bt{"b", DType::kF32, {dim}, bv.data(), bv.size() * 4, {}};
    auto wb = be_->upload(wt), bb = be_->upload(bt), wr = ref_->upload(wt), br = ref_->upload(bt);
    ASSERT_TRUE(wb.ok() && bb.ok() && wr.ok() && br.ok());
    std::vector<float> want(x.size());
    ref_->layernorm(x.data(), **wr, **br, rows, dim, 1e-6f, want.data());
    Buf d(*be_, x);
    be_->layernorm(d.f(), **wb, **bb, rows, dim, 1e-6f, d.f());  // in place
    EXPECT_LE(max_rel(d.read(), want), tol_.layernorm_rel);

    // The residual step (x += a, then the LayerNorm; out aliasing a, as the tower calls it)
    // against the reference's: x exactly (one fp32 add), out as above.
    const auto a = randn(rows * dim, dim + 7, 1.0f);
    std::vector<float> x_ref = x, out_ref(x.size()), a_ref = a;
    ref_->add_layernorm(a_ref.data(), x_ref.data(), **wr, **br, rows, dim, 1e-6f, out_ref.data());
    Buf xd(*be_, x), ad(*be_, a);
    be_->add_layernorm(ad.f(), xd.f(), **wb, **bb, rows, dim, 1e-6f, ad.f());
    EXPECT_EQ(xd.read(), x_ref);
    EXPECT_LE(max_rel(ad.read(), out_ref), tol_.layernorm_rel);

    ref_->add_bias(x.data(), **br, rows, want.data());
    Buf e(*be_, x);
    be_->add_bias(e.f(), **bb, rows, e.f());
    EXPECT_EQ(e.read(), want);  // one rounding, the same on every backend
  }
  const auto g = randn(10007, 5, 3.0f);
  std::vector<float> want(g.size());
  ref_->gelu(g.data(), static_cast<int64_t>(g.size()), want.data());
  Buf d(*be_, g);
  be_->gelu(d.f(), static_cast<int64_t>(g.size()), d.f());
  EXPECT_LE(max_rel(d.read(), want), tol_.gelu_rel);
}

// Averages of the same values added in the same order on every backend: identical.
TEST_P(BackendOps, AvgPool) {
  for (auto [side, k] : {std::pair{8, 2}, {64, 4}, {6, 3}, {5, 1}}) {
    const int dim = 19;
    const auto x = randn(static_cast<size_t>(side) * side * dim, side);
    std::vector<float> want(static_cast<size_t>(side / k) * (side / k) * dim);
    ref_->avg_pool(x.data(), side, dim, k, want.data());
    Buf dx(*be_, x), dout(*be_, want.size() * 4);
    be_->avg_pool(dx.f(), side, dim, k, dout.f());
    EXPECT_EQ(dout.read(), want) << side << " / " << k;
  }
}

// ---- sampling --------------------------------------------------------------------------------

SamplingOptions sampling(float t, int k, float p, float mp, float pen) {
  SamplingOptions o;
  o.temperature = t, o.top_k = k, o.top_p = p, o.min_p = mp, o.repeat_penalty = pen;
  return o;
}

// Backend::sample against the reference's (the host Sampler) on peaked logits with ties, every
// sampling option, banned ids (one outside the vocabulary) and a penalized id at the top. Both
// take one value from their rng per step.
TEST_P(BackendOps, SampleMatchesTheHostSampler) {
  const int vocab = 262147;  // not a multiple of any block size
  struct Case {
    const char* what;
    SamplingOptions o;
    bool exact;  // false: on CUDA the softmax sum is the device's (another order): allow a flip
  };
  const Case cases[] = {
      {"greedy", sampling(0, 0, 1, 0, 1), true},
      {"greedy with penalty", sampling(0, 0, 1, 0, 1.3f), true},
      {"top-k 1", sampling(0.8f, 1, 1, 0, 1), true},
      {"top-k 40, top-p 0.95, penalty", sampling(0.8f, 40, 0.95f, 0, 1.1f), true},
      {"top-k 64, min-p 0.05", sampling(1.0f, 64, 1, 0.05f, 1), true},
      {"top-k 1024 (all on the host)", sampling(1.5f, 1024, 1, 0, 1), true},
      {"top-k 5000, top-p 0.9", sampling(1.0f, 5000, 0.9f, 0, 1), false},
      {"no top-k, top-p 0.9", sampling(1.0f, 0, 0.9f, 0, 1), false},
      {"no top-k, min-p 0.1", sampling(0.7f, 0, 1, 0.1f, 1), false},
      {"plain temperature (full fallback)", sampling(1.0f, 0, 1, 0, 1), false},
  };
  const std::vector<int32_t> banned = {0, 1, 3, 262146, 999999};
  std::vector<int32_t> history;
  for (int i = 0; i < 100; ++i) history.push_back((i * 7919) % vocab);
  Buf lg(*be_, static_cast<size_t>(vocab) * 4);
  for (const Case& c : cases) {
    const bool exact = c.exact || tol_.sample_is_host_sampler;
    std::mt19937_64 rb(1234), rr(1234);
    int same = 0;
    // 4 steps on the emulator, and on a backend whose sample is Backend::sample's default (the
    // CPU's: the host Sampler, the oracle itself, whose 40 draws over 262K logits take seconds).
    const int steps = testutil::emu_small() || tol_.sample_is_host_sampler ? 4 : 40;
    for (int step = 0; step < steps; ++step) {
      auto logits = randn(vocab, 500 + step, 2.0f);
      for (float& x : logits) x = std::round(x * 8) / 8;  // ties: values on a 1/8 grid
      for (int j = 0; j < 20; ++j) logits[(step * 131 + j * 9973) % vocab] += 12.0f - j * 0.5f;
      logits[history[step % 100]] = 16.0f;
      be_->from_host(logits.data(), lg.get(), logits.size() * 4);
      const int32_t g = be_->sample(lg.f(), vocab, c.o, banned, history, rb);
      const int32_t e = ref_->sample(logits.data(), vocab, c.o, banned, history, rr);
      same += g == e;
      if (exact) ASSERT_EQ(g, e) << c.what << " step " << step;
      ASSERT_TRUE(g >= 0 && g < vocab && std::find(banned.begin(), banned.end(), g) == banned.end())
          << c.what << ": banned or out-of-range id " << g;
    }
    // Inexact cases differ only by the rounding of one double sum (1e-16 relative): a flip needs
    // the draw or a cutoff within that of a boundary.
    EXPECT_GE(same, steps - 1) << c.what;
    EXPECT_EQ(rb(), rr()) << c.what << ": both took one value per step";
  }
}

// Non-finite logits: NaN counts as -inf on every path (never the argmax, never sorted first,
// also with the sign bit set), +inf logits share the probability, a NaN at a penalized id stays
// -inf, a row with nothing drawable gives 0, and a tiny temperature (keys that overflow float)
// still matches. Every case has top_k <= 1024 or few candidates: exact on every backend.
TEST_P(BackendOps, SampleTreatsNanAsMinusInfinity) {
  const int vocab = 5003;
  const float nan = std::numeric_limits<float>::quiet_NaN(), inf = std::numeric_limits<float>::infinity();
  float neg_nan;
  const uint32_t neg_nan_bits = 0xFFC00001u;
  std::memcpy(&neg_nan, &neg_nan_bits, 4);
  struct Row {
    const char* what;
    std::vector<float> logits;
  };
  std::vector<Row> rows;
  auto base = [&](uint32_t seed) {
    auto v = randn(vocab, seed, 2.0f);
    for (int j = 0; j < 10; ++j) v[(seed * 97 + j * 491) % vocab] += 8.0f - j * 0.5f;
    return v;
  };
  {
    auto v = base(1);
    v[0] = nan, v[17] = nan, v[4000] = neg_nan;
    for (int i = 100; i < vocab; i += 50) v[i] = nan;
    rows.push_back({"NaN first and scattered", v});
  }
  {
    auto v = base(2);
    v[3] = inf, v[9] = nan, v[2222] = inf, v[2223] = -inf;
    rows.push_back({"two +inf among NaN", v});
  }
  {
    auto v = base(3);
    v[42] = nan;  // 42 is in the history
    rows.push_back({"NaN at a penalized id", v});
  }
  {
    std::vector<float> v(vocab, nan);
    v[7] = -inf;
    rows.push_back({"nothing drawable", v});
  }
  const SamplingOptions cases[] = {
      sampling(0, 0, 1, 0, 1),           sampling(0, 0, 1, 0, 1.3f),   sampling(0.8f, 40, 0.95f, 0, 1.1f),
      sampling(1.0f, 1024, 1, 0.05f, 1), sampling(1e-38f, 0, 1, 0, 1), sampling(nan, 0, 1, 0, 1)};
  const std::vector<int32_t> banned = {1, 5002};
  const std::vector<int32_t> history = {42, 300, 301, 3};
  Buf lg(*be_, static_cast<size_t>(vocab) * 4);
  for (const Row& row : rows) {
    be_->from_host(row.logits.data(), lg.get(), row.logits.size() * 4);
    for (const SamplingOptions& o : cases) {
      std::mt19937_64 rb(99), rr(99);
      for (int step = 0; step < (testutil::emu_small() ? 3 : 8); ++step) {
        const int32_t g = be_->sample(lg.f(), vocab, o, banned, history, rb);
        const int32_t c = ref_->sample(row.logits.data(), vocab, o, banned, history, rr);
        ASSERT_EQ(g, c) << row.what << ", temperature " << o.temperature << " top_k " << o.top_k << " step "
                        << step;
        ASSERT_TRUE(g >= 0 && g < vocab) << row.what << ": id " << g;
        ASSERT_FALSE(std::isnan(row.logits[g]) && std::string(row.what) != "nothing drawable")
            << row.what << ": picked NaN id " << g;
      }
    }
  }
}

#if GEMMA3_BACKEND_OPS_ROWS & 1
INSTANTIATE_TEST_SUITE_P(Cpu, BackendOps,
                         ::testing::Values(BackendRow{"portable", Kind::kCpuFast},
                                           BackendRow{"avx2", Kind::kCpuFast},
                                           BackendRow{"avx512", Kind::kCpuFast}),
                         row_name);
#endif
#if GEMMA3_BACKEND_OPS_ROWS & 2
INSTANTIATE_TEST_SUITE_P(Cuda, BackendOps, ::testing::Values(BackendRow{"cuda", Kind::kCuda}), row_name);
#endif

}  // namespace
}  // namespace gemma3
