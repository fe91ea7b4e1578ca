// The CUDA backend's own behaviour (its op-by-op comparison with the CPU reference backend on
// random inputs at awkward shapes is the Cuda row of the conformance suite,
// test_backend_ops.cpp): large-weight tiling, stacked weights, the planar upload, the fp32
// prefill attention and recorded replays, timing, errors, fp8 weights, the sampler's
// frequencies, then the tiny model end to end. Suites needing a GPU skip, saying why,
// when the build has no CUDA or no device is visible. BlockDecode runs everywhere: it checks
// that the host/device block decoders of kernels/block_decode.h reproduce src/core/quant.cpp.
#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <random>
#include <string>

#include "../kernels/block_decode.h"
#include "../kernels/launch.h"
#include "backend/backend.h"
#include "backend/sampler.h"
#include "backend_test_util.h"
#include "bf16_gemm_reference.h"
#include "checkpoint/weights.h"
#include "core/quant.h"
#include "dev/make_model.h"
#include "model/forward.h"
#include "runtime/kv_cache.h"
#include "test_util.h"

namespace gemma3 {
namespace {

using testutil::Buf;
using testutil::emu_small;
using testutil::encode_cache;
using testutil::flash_bound;
using testutil::kU;
using testutil::randn;
using testutil::random_bytes;
using testutil::same_float;
using testutil::TestWeight;

// Element i of a row through the shared decoders, on the host.
float decode_host(DType t, const uint8_t* row, int64_t i) {
  namespace b = blocks;
  switch (t) {
    case DType::kF32: return b::row_value<b::F32>(row, i);
    case DType::kF16: return b::row_value<b::F16>(row, i);
    case DType::kBF16: return b::row_value<b::BF16>(row, i);
    case DType::kF8E4M3: return b::row_value<b::F8E4M3>(row, i);
    case DType::kQ4_0: return b::row_value<b::Q4_0>(row, i);
    case DType::kQ4_1: return b::row_value<b::Q4_1>(row, i);
    case DType::kQ5_0: return b::row_value<b::Q5_0>(row, i);
    case DType::kQ5_1: return b::row_value<b::Q5_1>(row, i);
    case DType::kQ8_0: return b::row_value<b::Q8_0>(row, i);
    case DType::kQ2_K: return b::row_value<b::Q2_K>(row, i);
    case DType::kQ3_K: return b::row_value<b::Q3_K>(row, i);
    case DType::kQ4_K: return b::row_value<b::Q4_K>(row, i);
    case DType::kQ5_K: return b::row_value<b::Q5_K>(row, i);
    case DType::kQ6_K: return b::row_value<b::Q6_K>(row, i);
    case DType::kIQ4_NL: return b::row_value<b::IQ4_NL>(row, i);
    case DType::kIQ4_XS: return b::row_value<b::IQ4_XS>(row, i);
  }
  return NAN;
}

// Fully random bytes (scales may be inf/NaN/subnormal): the decoders must agree with the
// reference on every bit pattern, not only on well-formed blocks.
TEST(BlockDecode, MatchesReferenceDequantizer) {
  for (DType t : testutil::all_weight_types()) {
    const DTypeInfo& info = dtype_info(t);
    EXPECT_EQ(info.block_bytes, [&] {
      switch (t) {
        case DType::kF32: return blocks::F32::kBytes;
        case DType::kF16: return blocks::F16::kBytes;
        case DType::kBF16: return blocks::BF16::kBytes;
        case DType::kF8E4M3: return blocks::F8E4M3::kBytes;
        case DType::kQ4_0: return blocks::Q4_0::kBytes;
        case DType::kQ4_1: return blocks::Q4_1::kBytes;
        case DType::kQ5_0: return blocks::Q5_0::kBytes;
        case DType::kQ5_1: return blocks::Q5_1::kBytes;
        case DType::kQ8_0: return blocks::Q8_0::kBytes;
        case DType::kQ2_K: return blocks::Q2_K::kBytes;
        case DType::kQ3_K: return blocks::Q3_K::kBytes;
        case DType::kQ4_K: return blocks::Q4_K::kBytes;
        case DType::kQ5_K: return blocks::Q5_K::kBytes;
        case DType::kQ6_K: return blocks::Q6_K::kBytes;
        case DType::kIQ4_NL: return blocks::IQ4_NL::kBytes;
        case DType::kIQ4_XS: return blocks::IQ4_XS::kBytes;
      }
      return 0;
    }()) << dtype_name(t);
    const int64_t n = info.block_elems * 24;  // 24 blocks (6144 elements for K-quants)
    const auto bytes = random_bytes(static_cast<size_t>(*row_bytes(t, n)), 1000 + static_cast<int>(t));
    std::vector<float> ref(n);
    dequantize_row(t, bytes.data(), ref.data(), n);
    int bad = 0;
    for (int64_t i = 0; i < n; ++i) {
      const float got = decode_host(t, bytes.data(), i);
      if (!same_float(got, ref[i]) && ++bad <= 3)
        ADD_FAILURE() << dtype_name(t) << " element " << i << ": decoder " << got << ", reference " << ref[i];
    }
    EXPECT_EQ(bad, 0) << dtype_name(t);
  }
}

// The CUDA backend's planar Q4_0/Q8_0 layout (block_decode.h Planar): repacked rows decode to
// the blocks' values bit for bit, for one block (scale plane padded from 2 to 16 bytes) and
// many; the padding is zero.
TEST(BlockDecode, PlanarLayoutMatchesBlocks) {
  for (DType t : {DType::kQ4_0, DType::kQ8_0}) {
    for (int64_t cols : {32, 96, 544}) {
      const auto raw = random_bytes(static_cast<size_t>(*row_bytes(t, cols)), 77 + static_cast<int>(cols));
      const bool q4 = t == DType::kQ4_0;
      const uint64_t prb = q4 ? blocks::Q4_0Planar::row_bytes(cols) : blocks::Q8_0Planar::row_bytes(cols);
      const int64_t nb = cols / 32;
      EXPECT_EQ(prb % 16, 0u);
      EXPECT_EQ(prb, static_cast<uint64_t>(nb * (q4 ? 16 : 32) + (2 * nb + 15) / 16 * 16));
      std::vector<uint8_t> planar(prb, 0xAB);
      (q4 ? blocks::Q4_0Planar::repack_row : blocks::Q8_0Planar::repack_row)(raw.data(), planar.data(), cols);
      for (uint64_t b = static_cast<uint64_t>(nb * (q4 ? 18 : 34)); b < prb; ++b)
        EXPECT_EQ(planar[b], 0) << b;
      int bad = 0;
      for (int64_t i = 0; i < cols; ++i) {
        const float want = decode_host(t, raw.data(), i);
        const float got = q4 ? blocks::weight_value<blocks::Q4_0Planar>(planar.data(), cols, i)
                             : blocks::weight_value<blocks::Q8_0Planar>(planar.data(), cols, i);
        if (!same_float(got, want) && ++bad <= 3)
          ADD_FAILURE() << dtype_name(t) << " cols " << cols << " element " << i << ": " << got << " vs "
                        << want;
      }
      EXPECT_EQ(bad, 0);
    }
  }
}

// The encoders the CUDA kv_write and fp8 weight upload use (block_decode.h), on the host,
// against the CPU code whose algorithms they copy: f32_to_f16 (dtype.cpp), f32_to_f8e4m3
// (make_model.cpp; NaN differs by design: 0x7F there, 0 in the KV/weight encoder) and the
// Q8_0 quantizer (quant.cpp). Every 2^16-th float bit pattern plus special values.
TEST(BlockDecode, EncodersMatchCpu) {
  std::vector<float> xs = {0.0f,           -0.0f,         448.0f,       -448.0f,        447.9f,
                           464.0f,         480.0f,        1e30f,        INFINITY,       -INFINITY,
                           0.015625f,      0.0146484375f, 0.001953125f, 0.0009765625f,  0.00097656251f,
                           65504.0f,       65519.99f,     65520.0f,     6.1035156e-05f, 5.9604645e-08f,
                           2.9802322e-08f, 1e-40f};
  for (uint64_t u = 0; u < (uint64_t{1} << 32); u += 65521) {
    float f;
    const uint32_t b = static_cast<uint32_t>(u);
    std::memcpy(&f, &b, 4);
    xs.push_back(f);
  }
  int bad = 0;
  for (float x : xs) {
    if (!std::isnan(x) && blocks::float_to_half(x) != f32_to_f16(x) && ++bad <= 3)
      ADD_FAILURE() << "half of " << x << ": " << blocks::float_to_half(x) << " vs " << f32_to_f16(x);
    const uint8_t want = std::isnan(x) ? 0 : f32_to_f8e4m3(x);
    if (blocks::float_to_e4m3(x) != want && ++bad <= 3)
      ADD_FAILURE() << "e4m3 of " << x << ": " << int(blocks::float_to_e4m3(x)) << " vs " << int(want);
  }
  EXPECT_EQ(bad, 0);
  // Q8_0: whole blocks of normals at several scales (1e-40: a subnormal scale whose inverse
  // is inf), an all-zero block, and NaN/+-inf sprinkled in (they count as 0 on both sides).
  for (float scale : {0.0f, 1e-40f, 1e-3f, 1.0f, 300.0f}) {
    const auto x = randn(32 * 16, 77, 1.0f);
    std::vector<float> xv(x.size());
    for (size_t i = 0; i < x.size(); ++i) xv[i] = x[i] * scale;
    for (size_t i = 5; i < xv.size(); i += 37) xv[i] = i % 3 == 0 ? NAN : i % 3 == 1 ? INFINITY : -INFINITY;
    std::vector<uint8_t> want(34 * 16), got(34 * 16);
    quantize_row(DType::kQ8_0, xv.data(), want.data(), static_cast<int64_t>(xv.size()));
    for (int blk = 0; blk < 16; ++blk) {
      float amax = 0;  // the device's shuffle max of q8_0_amax_term
      for (int e = 0; e < 32; ++e) amax = std::max(amax, blocks::q8_0_amax_term(xv[blk * 32 + e]));
      const float d = blocks::q8_0_scale(amax), inv = blocks::q8_0_inverse(d);
      const uint16_t h = blocks::float_to_half(d);
      got[34 * blk] = static_cast<uint8_t>(h & 0xFF);
      got[34 * blk + 1] = static_cast<uint8_t>(h >> 8);
      for (int e = 0; e < 32; ++e)
        got[34 * blk + 2 + e] = static_cast<uint8_t>(blocks::q8_0_quant(xv[blk * 32 + e], inv));
    }
    EXPECT_EQ(got, want) << "scale " << scale;
  }
}

// ---- attention planning (kernels/launch.h, host code: runs everywhere) -----------------------

cuda::AttentionArgs attention_args(int n_tokens, int pos0, int n_heads, int window, int kv_start,
                                   int capacity, int bidir_begin = 0, int bidir_end = 0, int sm_count = 132) {
  cuda::AttentionArgs a;
  a.n_tokens = n_tokens, a.pos0 = pos0, a.n_heads = n_heads, a.n_kv_heads = 1, a.head_dim = 128;
  a.window = window, a.kv_start = kv_start, a.capacity = capacity;
  a.bidir_begin = bidir_begin, a.bidir_end = bidir_end, a.sm_count = sm_count;
  return a;
}

// visible_keys against the mask as backend.h states it, key by key: j is visible to query i iff
// j >= kv_start, (j <= i or i and j both in [bidir_begin, bidir_end)), and (no window or
// j > i - W). The visible set must be exactly the range [lo, hi] (never empty).
TEST(AttentionPlan, VisibleKeysAreTheSpecsMask) {
  const cuda::AttentionArgs cases[] = {
      attention_args(1, 0, 1, 0, 0, 16),           attention_args(5, 10, 1, 4, 0, 16),
      attention_args(6, 3, 1, 4, 5 - 2, 16),       attention_args(10, 5, 1, 0, 0, 32, 8, 13),
      attention_args(12, 20, 1, 8, 0, 19, 22, 32), attention_args(7, 0, 1, 0, 0, 7, 0, 7),
      attention_args(4, 30, 1, 3, 29, 8, 31, 34),
  };
  for (const cuda::AttentionArgs& a : cases) {
    ASSERT_FALSE(cuda::bad_attention_args(a));
    for (int t = 0; t < a.n_tokens; ++t) {
      const int64_t i = a.pos0 + t;
      int64_t lo, hi;
      cuda::visible_keys(a, t, &lo, &hi);
      EXPECT_LE(lo, hi) << "t " << t;
      for (int64_t j = 0; j < a.pos0 + a.n_tokens + 3; ++j) {
        const bool group = i >= a.bidir_begin && i < a.bidir_end && j >= a.bidir_begin && j < a.bidir_end;
        const bool want = j >= a.kv_start && (j <= i || group) && (a.window == 0 || j > i - a.window);
        EXPECT_EQ(j >= lo && j <= hi, want) << "pos0 " << a.pos0 << " t " << t << " j " << j;
      }
    }
  }
}

// Split-KV plans: the splits of the longest row cover it with no empty tail split, chunks are
// whole key tiles, grid.y stays within kMaxSplits, and the workspace matches. Hand-computed
// anchors (132 SMs, target 4 * 132 = 528 blocks): prefill kernel, 9 tokens x 8 heads over 128K
// keys: 72 blocks want 8 splits of 16384 keys, clamped to 1024: 128 splits. Decode kernel
// (one block per kv head): 1 token, 8 heads on 1 kv head over 128K keys wants 528 splits of
// 249 keys, a whole tile: 256, 512 splits; 1 token x 1 head over 2M keys: 528 splits of 3972,
// rounded to 4000: 525 splits; 2 kv heads at 200 keys: 7 splits of 32 (the minimum).
TEST(AttentionPlan, SplitsCoverTheLongestRow) {
  struct Case {
    cuda::AttentionArgs a;
    int splits;  // expected, or 0: only the invariants
    bool decode;
  };
  cuda::AttentionArgs two_kv = attention_args(1, 199, 8, 0, 0, 256);
  two_kv.n_kv_heads = 2;
  const Case cases[] = {
      {attention_args(9, 131063, 8, 0, 0, 131072), 128, false},
      {attention_args(1, 131071, 8, 0, 0, 131072), 512, true},
      {attention_args(1, 4999, 8, 0, 0, 5000), 0, true},
      {attention_args(3, 1800, 2, 0, 770, 1900), 0, true},
      {attention_args(1, 70001, 8, 1024, 0, 1039), 0, true},
      {attention_args(1, 2097151, 1, 0, 0, 2097152), 525, true},
      {two_kv, 7, true},
      {attention_args(1, 20, 8, 0, 0, 256), 1, true},                  // short: no split
      {attention_args(12, 200, 8, 0, 0, 256), 1, false},               // prefill, short: no split
      {attention_args(512, 4096, 8, 0, 0, 8192), 1, false},            // prefill: rows fill the device
      {attention_args(1, 100000, 8, 0, 0, 100001, 0, 0, 0), 0, true},  // sm_count unknown
  };
  // Each case with the fp32 prefill kernel (the expected splits) and with the tensor-core one,
  // which serves every prefill call here (head_dim 128) with one block per 64 query rows: its
  // longest range is a row tile's union of keys (512 tokens at 4096: 8 tiles x 8 heads = 64
  // blocks, so 9 splits of 512 keys over 4608).
  for (const bool flash : {false, true})
    for (Case c : cases) {
      c.a.no_flash = !flash;
      if (flash && !c.decode) c.splits = c.a.n_tokens == 512 ? 9 : c.splits;
      const cuda::AttentionPlan p = cuda::attention_plan(c.a);
      const std::string what = "pos0 " + std::to_string(c.a.pos0) + " heads " + std::to_string(c.a.n_heads) +
                               (flash ? " (tensor cores)" : "");
      EXPECT_EQ(p.decode, c.decode) << what;
      EXPECT_EQ(p.flash_dim, flash && !c.decode ? 128 : 0) << what;
      if (c.splits) EXPECT_EQ(p.splits, c.splits) << what;
      EXPECT_GE(p.splits, 1) << what;
      EXPECT_LE(p.splits, cuda::kMaxSplits) << what;
      EXPECT_GE(int64_t{p.splits} * p.chunk, p.longest) << what;
      EXPECT_LT(int64_t{p.splits - 1} * p.chunk, p.longest) << what << ": an empty last split";
      if (p.splits > 1) {
        EXPECT_EQ(p.chunk % cuda::kAttentionKeyTile, 0) << what;
        EXPECT_EQ(p.workspace_floats, int64_t{c.a.n_tokens} * c.a.n_heads * p.splits * (c.a.head_dim + 2))
            << what;
      } else {
        EXPECT_EQ(p.workspace_floats, 0) << what;
      }
    }
}

// Which kernel serves a call, and the decode kernel's grid. Decode: n_tokens <= 8, head_dim a
// multiple of the 16-/8-byte load (8 elements; 4 for fp32), 16-byte aligned caches; rows
// (token, query head of a kv head) are packed kAttentionDecodeRows per block. For Gemma 3's
// decode shapes (1 token; kv heads 1, 4, 8, 16) at 128 .. 128K keys the grid has several blocks
// per SM (>= 3 * 132) unless every split is already at the minimum (short contexts, where a
// block's K/V are a few KiB and launch latency dominates).
TEST(AttentionPlan, DecodeKernelChoiceAndGrid) {
  auto with = [](cuda::AttentionArgs a, int n_kv, int hd, DType dt) {
    a.n_kv_heads = n_kv, a.head_dim = hd, a.kv_dtype = dt;
    return a;
  };
  const cuda::AttentionArgs base = attention_args(1, 1000, 16, 0, 0, 2048);
  EXPECT_TRUE(cuda::attention_plan(with(base, 1, 128, DType::kBF16)).decode);
  EXPECT_TRUE(cuda::attention_plan(with(base, 16, 72, DType::kBF16)).decode);  // SigLIP's head_dim
  EXPECT_TRUE(cuda::attention_plan(with(base, 16, 72, DType::kF32)).decode);
  EXPECT_FALSE(cuda::attention_plan(with(base, 16, 36, DType::kBF16)).decode);  // 36 % 8 != 0
  EXPECT_TRUE(cuda::attention_plan(with(base, 16, 36, DType::kF32)).decode);
  EXPECT_TRUE(
      cuda::attention_plan(with(attention_args(8, 1000, 16, 0, 0, 2048), 4, 128, DType::kQ8_0)).decode);
  EXPECT_FALSE(
      cuda::attention_plan(with(attention_args(9, 1000, 16, 0, 0, 2048), 4, 128, DType::kQ8_0)).decode);
  cuda::AttentionArgs misaligned = with(base, 4, 128, DType::kBF16);
  misaligned.k = reinterpret_cast<const void*>(uintptr_t{0x1008});
  EXPECT_FALSE(cuda::attention_plan(misaligned).decode);

  // Rows: 8 tokens x group 16 = 128 rows, 16 row groups of 8; 1 token x group 4: one of 4.
  const cuda::AttentionPlan big =
      cuda::attention_plan(with(attention_args(8, 1000, 16, 0, 0, 2048), 1, 128, DType::kBF16));
  EXPECT_EQ(big.rows_per_block, cuda::kAttentionDecodeRows);
  EXPECT_EQ(big.row_groups, 16);
  const cuda::AttentionPlan one = cuda::attention_plan(with(base, 4, 128, DType::kBF16));
  EXPECT_EQ(one.rows_per_block, 4);
  EXPECT_EQ(one.row_groups, 1);

  for (int n_kv : {1, 4, 8, 16}) {
    for (int keys : {128, 1024, 4096, 32768, 131072}) {
      const cuda::AttentionArgs a =
          with(attention_args(1, keys - 1, 2 * n_kv, 0, 0, keys), n_kv, 256, DType::kBF16);
      const cuda::AttentionPlan p = cuda::attention_plan(a);
      const std::string what = std::to_string(n_kv) + " kv heads, " + std::to_string(keys) + " keys";
      ASSERT_TRUE(p.decode) << what;
      const int64_t blocks = int64_t{n_kv} * p.row_groups * p.splits;
      EXPECT_TRUE(blocks >= 3 * 132 || p.chunk == cuda::kDecodeMinSplitKeys) << what << ": " << blocks;
      EXPECT_LE(blocks, 8 * 132) << what;
      EXPECT_EQ(p.longest, keys) << what;
    }
  }
  // The union of the tokens' ranges: 3 tokens under a window of 8 at 100: keys 93 .. 102.
  EXPECT_EQ(cuda::attention_plan(attention_args(3, 100, 4, 8, 0, 16)).longest, 10);
}

// The ring check: every key one call reads must be in the ring together. A local layer's ring
// of W + chunk - 1 slots (kv_cache.cpp) holds exactly a full chunk's keys; one slot less does
// not. A bidirectional group on a sliding layer reads up to its end from its first query's
// window start.
TEST(AttentionPlan, SpanIsEveryKeyTheCallReads) {
  const int W = 512, chunk = 256;
  EXPECT_EQ(cuda::attention_plan(attention_args(chunk, 1000, 4, W, 0, W + chunk - 1)).span, W + chunk - 1);
  EXPECT_EQ(cuda::attention_plan(attention_args(1, 5000, 4, W, 0, W)).span, W);  // decode
  EXPECT_EQ(cuda::attention_plan(attention_args(chunk, 100, 4, W, 0, W + chunk - 1)).span, 100 + chunk);
  EXPECT_EQ(cuda::attention_plan(attention_args(10, 40, 4, 0, 37, 64)).span, 13);         // kv_start
  EXPECT_EQ(cuda::attention_plan(attention_args(12, 20, 4, 8, 0, 19, 22, 32)).span, 19);  // 13 .. 31
  EXPECT_EQ(cuda::attention_plan(attention_args(4, 10, 4, 0, 11, 64)).span, 0);  // kv_start > pos0: bad
}

// ---- GPU suites -------------------------------------------------------------------------------

class CudaOps : public ::testing::Test {
 protected:
  void SetUp() override {
    auto g = make_cuda_backend({});
    if (!g.ok()) GTEST_SKIP() << "no CUDA backend here: " << g.status().to_string();
    gpu_ = std::move(*g);
    cpu_ = testutil::cpu_reference_backend(8);
  }
  void TearDown() override {
    if (gpu_ && !expect_failure_) {
      Status s = cuda_backend_status(*gpu_);
      EXPECT_TRUE(s.ok()) << s.to_string();
    }
  }
  std::unique_ptr<Backend> gpu_, cpu_;
  bool expect_failure_ = false;
};

// A weight larger than the 64 MiB dequantization scratch: the cuBLAS path runs in several tiles.
TEST_F(CudaOps, MatmulTilesLargeWeights) {
  const int64_t rows = 4200, cols = 8192;  // 34.4M elements > 32M bf16 in the scratch: 2 tiles
  TestWeight tw(DType::kQ8_0, rows, cols, 3);
  auto wg = gpu_->upload(tw.view);
  auto wc = cpu_->upload(tw.view);
  ASSERT_TRUE(wg.ok() && wc.ok());
  const int n = 12;
  const auto x = randn(static_cast<size_t>(n * cols), 5);
  Buf xg(*gpu_, x), og(*gpu_, static_cast<size_t>(n * rows) * 4);
  std::vector<float> ref(static_cast<size_t>(n * rows));
  cpu_->matmul(x.data(), n, **wc, ref.data());
  gpu_->matmul(xg.f(), n, **wg, og.f());
  const auto got = og.read();
  // As the Cuda/BackendOps.Matmul* tests (check_cuda_matmul); k = 8192 gives sqrt(k) * u ~ 5e-6.
  EXPECT_EQ(
      testutil::check_cuda_matmul(tw.dense, x, rows, cols, n, testutil::cuda_gemm_in_bf16(DType::kQ8_0, n),
                                  got.data(), ref.data(), "Q8_0 [2100 x 8192]"),
      0);
}

// Issue #14: q|k|v and gate|up stacked into one weight. For every type the vectorized GEMV
// reads (and bf16 narrowed to fp8), upload_stacked stacks; matmul_parts puts each part's rows
// in its own buffer and matmul_geglu gives gelu(gate) * up, within the GEMV's bound of the
// separate matmuls (the CPU reference's, or for fp8 the same backend's on each part) and
// gelu_gate, at 1, 3 and 8 tokens (the GEMV) and 12 (the cuBLAS path, part by part). Types the
// vectorized GEMV does not read, mixed types and mixed widths are not stacked, and the CPU
// backends stack nothing.
TEST_F(CudaOps, StackedWeightsMatchTheirParts) {
  BackendOptions fp8_options;
  fp8_options.fp8_weights = true;
  auto fp8 = make_cuda_backend(fp8_options);
  ASSERT_TRUE(fp8.ok()) << fp8.status().to_string();
  struct Case {
    DType t;
    int64_t cols;
    bool narrow;  // uploaded with --weights fp8
  };
  const Case cases[] = {{DType::kF32, 256, false},    {DType::kF16, 256, false},  {DType::kBF16, 256, false},
                        {DType::kF8E4M3, 256, false}, {DType::kQ4_0, 96, false},  {DType::kQ8_0, 96, false},
                        {DType::kQ4_K, 256, false},   {DType::kQ5_K, 256, false}, {DType::kBF16, 256, true}};
  for (const Case& c : cases) {
    Backend& gpu = c.narrow ? **fp8 : *gpu_;
    // Reference matmuls: the CPU reference, or for fp8 narrowing the same backend per part.
    Backend& ref_be = c.narrow ? **fp8 : *cpu_;
    for (const std::vector<int64_t>& rows :
         {std::vector<int64_t>{48, 16, 16}, std::vector<int64_t>{40, 40}}) {
      const bool geglu = rows.size() == 2;
      std::vector<std::unique_ptr<TestWeight>> tw;
      std::vector<const TensorView*> views;
      for (size_t j = 0; j < rows.size(); ++j) {
        tw.push_back(std::make_unique<TestWeight>(c.t, rows[j], c.cols, 700 + static_cast<uint32_t>(j)));
        views.push_back(&tw.back()->view);
      }
      auto stacked = gpu.upload_stacked(views);
      ASSERT_TRUE(stacked.ok()) << stacked.status().to_string();
      ASSERT_TRUE(*stacked) << dtype_name(c.t) << ": not stacked";
      for (int n : {1, 3, 8, 12}) {
        SCOPED_TRACE(::testing::Message() << dtype_name(c.t) << (c.narrow ? " as fp8" : "") << " parts "
                                          << rows.size() << " n " << n);
        const auto x = randn(static_cast<size_t>(n * c.cols), 800 + n);
        Buf xg(gpu, x);
        std::vector<std::vector<float>> want;  // each part's x W^T, and the sums of |w x|
        std::vector<std::vector<double>> mag;
        for (size_t j = 0; j < rows.size(); ++j) {
          auto w = ref_be.upload_matmul_weight(*views[j]);
          ASSERT_TRUE(w.ok()) << w.status().to_string();
          std::vector<float> out(static_cast<size_t>(n * rows[j]));
          // A bf16 GEMM (gemm_in_bf16) is held to the exact sum over its rounded operands.
          const bool bf16 = !c.narrow && testutil::cuda_gemm_in_bf16(c.t, n);
          if (c.narrow) {
            Buf og(gpu, out.size() * 4);
            gpu.matmul(xg.f(), n, **w, og.f());
            out = og.read();
          } else if (!bf16) {
            cpu_->matmul(x.data(), n, **w, out.data());
          }
          std::vector<double> m(out.size());
          for (int t = 0; t < n; ++t)
            for (int64_t o = 0; o < rows[j]; ++o) {
              double sum = 0;
              for (int64_t i = 0; i < c.cols; ++i) {
                const float wv = tw[j]->dense[o * c.cols + i], xv = x[t * c.cols + i];
                const double p = bf16 ? double(round_bf16(wv)) * round_bf16(xv) : double(wv) * xv;
                sum += p;
                m[t * rows[j] + o] += std::fabs(p);
              }
              if (bf16) out[t * rows[j] + o] = static_cast<float>(sum);
            }
          want.push_back(out);
          mag.push_back(m);
        }
        if (!geglu) {
          std::vector<std::unique_ptr<Buf>> outs;
          std::vector<float*> ptrs;
          for (int64_t r : rows) {
            outs.push_back(std::make_unique<Buf>(gpu, static_cast<size_t>(n * r) * 4));
            ptrs.push_back(outs.back()->f());
          }
          gpu.matmul_parts(xg.f(), n, **stacked, ptrs.data());
          for (size_t j = 0; j < rows.size(); ++j) {
            const auto got = outs[j]->read();
            for (size_t i = 0; i < got.size(); ++i)
              ASSERT_NEAR(got[i], want[j][i], 1e-4 * mag[j][i] + 1e-30) << "part " << j << " value " << i;
          }
        } else {
          const size_t count = want[0].size();
          std::vector<float> expect(count);
          cpu_->gelu_gate(want[0].data(), want[1].data(), static_cast<int64_t>(count), expect.data());
          Buf up(gpu, count * 4), out(gpu, count * 4);
          gpu.matmul_geglu(xg.f(), n, **stacked, up.f(), out.f());
          const auto got = out.read();
          // gelu's slope is below 1.13: the gate's error through it, times up, plus the gelu
          // value times up's error.
          for (size_t i = 0; i < count; ++i) {
            const double g = want[0][i], u = want[1][i];
            const double gelu = 0.5 * g * (1 + std::tanh(0.7978845608028654 * (g + 0.044715 * g * g * g)));
            const double tol = 1e-4 * (1.13 * mag[0][i] * std::fabs(u) + std::fabs(gelu) * mag[1][i]) +
                               4 * kU * std::fabs(expect[i]) + 1e-30;
            ASSERT_NEAR(got[i], expect[i], tol) << "value " << i;
          }
        }
      }
    }
  }
  // Not stacked: a type only the per-element GEMV reads, two types, two widths; the CPU.
  TestWeight a(DType::kQ6_K, 8, 256, 1), b(DType::kQ6_K, 8, 256, 2), c(DType::kBF16, 8, 256, 3),
      d(DType::kF16, 8, 256, 4), e(DType::kBF16, 8, 512, 5);
  for (const auto& parts :
       {std::vector<const TensorView*>{&a.view, &b.view}, {&c.view, &d.view}, {&c.view, &e.view}}) {
    auto s = gpu_->upload_stacked(parts);
    ASSERT_TRUE(s.ok()) << s.status().to_string();
    EXPECT_FALSE(*s) << parts[0]->name;
  }
  auto s = cpu_->upload_stacked({&c.view, &c.view});
  ASSERT_TRUE(s.ok());
  EXPECT_FALSE(*s);
}

// The planar Q4_0/Q8_0 upload read back exactly: embed (scale 1) returns every row and the
// cuBLAS path's dequantization multiplied by identity rows returns W[:, t] for t < 12; both
// must equal the CPU's dequantized values (sums of one product and exact zeros, so exact), for
// one block per row (scales padded to 16 bytes) and for many. The GEMM's tiles are bf16
// (launch_dequant_rows_bf16: the values rounded to bf16) or, in a backend made with
// GEMMA3_CUDA_FP32_GEMM=1, fp32 (launch_dequant_rows: the values themselves).
TEST_F(CudaOps, PlanarUploadDequantizesExactly) {
  setenv("GEMMA3_CUDA_FP32_GEMM", "1", 1);
  auto fp32 = make_cuda_backend({});
  unsetenv("GEMMA3_CUDA_FP32_GEMM");
  ASSERT_TRUE(fp32.ok()) << fp32.status().to_string();
  for (Backend* gpu : {gpu_.get(), fp32->get()})
    for (DType t : {DType::kQ4_0, DType::kQ8_0}) {
      const bool bf16_tiles = gpu == gpu_.get();
      for (int64_t cols : {32, 96, 2080}) {
        const int64_t rows = 13;
        TestWeight tw(t, rows, cols, 500 + static_cast<uint32_t>(cols));
        auto wg = gpu->upload(tw.view);
        ASSERT_TRUE(wg.ok()) << wg.status().to_string();
        std::vector<int32_t> ids(rows);
        for (int64_t r = 0; r < rows; ++r) ids[r] = static_cast<int32_t>(rows - 1 - r);
        Buf eg(*gpu, static_cast<size_t>(rows * cols) * 4);
        gpu->embed(**wg, ids.data(), static_cast<int>(rows), 1.0f, eg.f());
        const auto emb = eg.read();
        int bad = 0;
        for (int64_t r = 0; r < rows; ++r)
          for (int64_t i = 0; i < cols; ++i)
            if (!same_float(emb[r * cols + i], tw.dense[ids[r] * cols + i]) && ++bad <= 3)
              ADD_FAILURE() << dtype_name(t) << " cols " << cols << " embed row " << ids[r] << " element "
                            << i;
        const int n = static_cast<int>(std::min<int64_t>(cols, 12));  // > 8 tokens: dequantize + cuBLAS
        if (n > cuda::kGemvMaxTokens) {
          std::vector<float> x(static_cast<size_t>(n * cols), 0.0f);
          for (int k = 0; k < n; ++k) x[k * cols + k] = 1.0f;
          Buf xg(*gpu, x), og(*gpu, static_cast<size_t>(n * rows) * 4);
          gpu->matmul(xg.f(), n, **wg, og.f());
          const auto got = og.read();
          for (int k = 0; k < n; ++k)
            for (int64_t o = 0; o < rows; ++o) {
              const float want = bf16_tiles ? round_bf16(tw.dense[o * cols + k]) : tw.dense[o * cols + k];
              if (!(got[k * rows + o] == want) && ++bad <= 3)
                ADD_FAILURE() << dtype_name(t) << " cols " << cols << (bf16_tiles ? " bf16" : " fp32")
                              << " dequantized [" << o << "," << k << "]: " << got[k * rows + o] << " vs "
                              << want;
            }
        }
        EXPECT_EQ(bad, 0) << dtype_name(t) << " cols " << cols << (bf16_tiles ? " bf16" : " fp32");
      }
    }
}

// A CUDA backend whose prefill attention is the fp32 kernel (GEMMA3_CUDA_FLASH=0).
Result<std::unique_ptr<Backend>> cuda_backend_without_flash() {
  setenv("GEMMA3_CUDA_FLASH", "0", 1);
  auto b = make_cuda_backend({});
  unsetenv("GEMMA3_CUDA_FLASH");
  return b;
}

// The CUDA backend's other attention paths on the conformance suite's cases
// (testutil::attention_cases(); Cuda/BackendOps.Attention checks the default backend on them):
// where the tensor-core prefill kernel serves a call, the same call on the fp32 prefill kernel
// (GEMMA3_CUDA_FLASH=0), and each causal or sliding call recorded and replayed. Tolerances as
// the suite's CUDA row: 3e-5 (3e-6 past 10000 keys), both being fp32 kernels.
TEST_F(CudaOps, AttentionFp32PrefillAndReplayMatchCpu) {
  auto scalar = cuda_backend_without_flash();
  ASSERT_TRUE(scalar.ok()) << scalar.status().to_string();
  for (DType dt : testutil::kv_cache_types()) {
    for (const testutil::AttentionCase& c : testutil::attention_cases()) {
      if (!testutil::attention_case_runs(c, dt)) continue;
      if (emu_small() && c.large) continue;
      const int kvw = c.n_kv_heads * c.hd, qw = c.n_heads * c.hd;
      // Identical cache contents on both sides.
      const auto ck = encode_cache(dt, randn(static_cast<size_t>(c.capacity) * kvw, 31), kvw);
      const auto cv = encode_cache(dt, randn(static_cast<size_t>(c.capacity) * kvw, 32), kvw);
      const auto q = randn(static_cast<size_t>(c.n_tokens) * qw, 33);
      const AttentionParams p = testutil::attention_params(c);
      std::vector<float> ref(q.size());
      cpu_->attention(
          q.data(), KvLayer{const_cast<uint8_t*>(ck.data()), const_cast<uint8_t*>(cv.data()), c.capacity, dt},
          p, ref.data());
      Buf qg(*gpu_, q), ckg(*gpu_, ck), cvg(*gpu_, cv);
      const double tol = c.capacity > 10000 ? 3e-6 : 3e-5;
      if (testutil::cuda_uses_flash(p, c.capacity, dt, ckg.get(), cvg.get())) {
        Buf o(**scalar, q.size() * 4);
        (*scalar)->attention(qg.f(), KvLayer{ckg.get(), cvg.get(), c.capacity, dt}, p, o.f());
        const auto got = o.read();
        for (size_t i = 0; i < ref.size(); ++i)
          ASSERT_NEAR(got[i], ref[i], tol) << c.what << " (" << dtype_name(dt) << ", fp32 prefill) i " << i;
      }

      // The same call recorded (a CUDA graph) with the position read from the step position
      // and the split plan made for the bound (the last position whose keys fit the cache;
      // past the case's own under a window), then replayed at the case's position and, causal,
      // at one halfway back to kv_start, where the device recuts the bound's splits for half
      // the keys.
      if (c.bidir_begin < c.bidir_end || !gpu_->can_record()) continue;
      AttentionParams bound = p;
      bound.pos0 = c.window > 0 ? c.pos0 + 3 * c.capacity : c.kv_start + c.capacity - c.n_tokens;
      Buf og2(*gpu_, q.size() * 4);
      std::unique_ptr<RecordedStep> step;
      for (int attempt = 0; attempt < 2 && !step; ++attempt) {  // again: the bound's partials grew
        ASSERT_TRUE(gpu_->begin_recording());
        gpu_->attention(qg.f(), KvLayer{ckg.get(), cvg.get(), c.capacity, dt}, bound, og2.f());
        bool again = false;
        auto r = gpu_->end_recording(&again);
        ASSERT_TRUE(r.ok()) << r.status().to_string();
        step = std::move(*r);
      }
      ASSERT_TRUE(step) << c.what << ": not recorded";
      std::vector<int> positions = {c.pos0};
      if (c.window == 0 && c.pos0 > c.kv_start) positions.push_back((c.kv_start + c.pos0) / 2);
      for (int pos : positions) {
        AttentionParams at = p;
        at.pos0 = pos;
        cpu_->attention(
            q.data(),
            KvLayer{const_cast<uint8_t*>(ck.data()), const_cast<uint8_t*>(cv.data()), c.capacity, dt}, at,
            ref.data());
        gpu_->set_step_position(pos);
        gpu_->replay(*step);
        const auto replayed = og2.read();
        for (size_t i = 0; i < ref.size(); ++i)
          ASSERT_NEAR(replayed[i], ref[i], tol)
              << c.what << " (" << dtype_name(dt) << ", replayed at " << pos << ") i " << i;
      }
    }
  }
}

// Decode attention timing (printed for tools/gpu-check.sh's summary; the numbers are checked
// above): one token, 8 query heads over 2 kv heads, head_dim 256, bf16 and q8_0 caches, at
// 4K..128K visible keys. Effective bandwidth = K + V bytes read / time.
TEST_F(CudaOps, DecodeAttentionTiming) {
  for (DType dt : {DType::kBF16, DType::kQ8_0}) {
    for (int keys : {4096, 32768, 131072}) {
      if (emu_small() && keys > 4096) continue;
      const int hd = 256, nkv = 2, nh = 8, kvw = nkv * hd;
      const size_t bytes = static_cast<size_t>(keys) * *row_bytes(dt, kvw);
      Buf ck(*gpu_, bytes), cv(*gpu_, bytes), q(*gpu_, randn(nh * hd, 1)), o(*gpu_, nh * hd * 4);
      AttentionParams p;
      p.n_tokens = 1, p.pos0 = keys - 1, p.n_heads = nh, p.n_kv_heads = nkv, p.head_dim = hd;
      p.scale = 0.0625f;
      const KvLayer cache{ck.get(), cv.get(), keys, dt};
      gpu_->attention(q.f(), cache, p, o.f());  // warm-up (allocates the split partials)
      ASSERT_TRUE(cuda_backend_status(*gpu_).ok());
      const int reps = emu_small() ? 1 : 20;
      const auto t0 = std::chrono::steady_clock::now();
      for (int r = 0; r < reps; ++r) gpu_->attention(q.f(), cache, p, o.f());
      ASSERT_TRUE(cuda_backend_status(*gpu_).ok());
      const double us =
          std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count() / reps;
      std::printf("timing: decode attention %s %6d keys: %8.1f us, %6.1f GB/s\n", dtype_name(dt), keys, us,
                  2.0 * bytes / us / 1e3);
      const auto out = o.read();
      for (float v : out) ASSERT_TRUE(std::isfinite(v));  // zero caches: the output is 0
    }
  }
}

// A few small attention and GEMV cases, each reaching a different kernel path, for the
// compute-sanitizer runs of tools/gpu-check.sh (racecheck on shared memory: the attention
// kernel's q and score tiles, the split combine, the GEMV's x tile). Small enough for
// racecheck's slowdown; checked against the CPU as in Cuda/BackendOps.Attention and
// Cuda/BackendOps.MatmulEveryTypeAndTokenCount.
TEST_F(CudaOps, SmallAttentionAndGemv) {
  struct Case {
    const char* what;
    int n_tokens, pos0, n_heads, n_kv_heads, hd, window, capacity, bidir_begin, bidir_end;
  };
  const Case cases[] = {
      {"decode on a sliding ring", 1, 40, 4, 2, 128, 8, 8, 0, 0},
      {"prefill across the window", 11, 0, 4, 2, 256, 8, 18, 0, 0},
      {"split decode, 700 keys", 1, 699, 2, 1, 128, 0, 700, 0, 0},
      {"bidir group, head_dim 72", 9, 0, 4, 4, 72, 0, 9, 0, 9},
      {"decode kernel, 3 tokens, GQA 4, head_dim 72, splits", 3, 120, 8, 2, 72, 0, 128, 0, 0},
      {"decode kernel, 1 token, GQA 2, 300 keys", 1, 299, 4, 2, 256, 0, 300, 0, 0},
  };
  for (DType dt : {DType::kBF16, DType::kQ8_0}) {
    for (const Case& c : cases) {
      if (dt == DType::kQ8_0 && c.hd % 32 != 0) continue;
      const int kvw = c.n_kv_heads * c.hd, qw = c.n_heads * c.hd;
      const auto ck = encode_cache(dt, randn(static_cast<size_t>(c.capacity) * kvw, 61), kvw);
      const auto cv = encode_cache(dt, randn(static_cast<size_t>(c.capacity) * kvw, 62), kvw);
      const auto q = randn(static_cast<size_t>(c.n_tokens) * qw, 63);
      AttentionParams p;
      p.n_tokens = c.n_tokens, p.pos0 = c.pos0, p.n_heads = c.n_heads, p.n_kv_heads = c.n_kv_heads;
      p.head_dim = c.hd, p.scale = 1.0f / std::sqrt(static_cast<float>(c.hd)), p.window = c.window;
      p.bidir_begin = c.bidir_begin, p.bidir_end = c.bidir_end;
      std::vector<float> ref(q.size());
      cpu_->attention(
          q.data(), KvLayer{const_cast<uint8_t*>(ck.data()), const_cast<uint8_t*>(cv.data()), c.capacity, dt},
          p, ref.data());
      Buf qg(*gpu_, q), ckg(*gpu_, ck), cvg(*gpu_, cv), og(*gpu_, q.size() * 4);
      gpu_->attention(qg.f(), KvLayer{ckg.get(), cvg.get(), c.capacity, dt}, p, og.f());
      const auto got = og.read();
      std::vector<double> bound(q.size(), 0.0);  // as Cuda/BackendOps.Attention
      if (testutil::cuda_uses_flash(p, c.capacity, dt, ckg.get(), cvg.get()))
        bound = flash_bound(p, q, ck, cv, dt, c.capacity);
      for (size_t i = 0; i < ref.size(); ++i)
        ASSERT_NEAR(got[i], ref[i], 3e-5 + bound[i]) << c.what << " (" << dtype_name(dt) << ") i " << i;
    }
  }
  for (DType t : {DType::kBF16, DType::kF8E4M3, DType::kQ4_0, DType::kQ8_0, DType::kQ4_K}) {
    const int64_t rows = 45, cols = dtype_info(t).block_elems == 256 ? 2304 : 2112;
    TestWeight tw(t, rows, cols, 71);
    auto wg = gpu_->upload(tw.view);
    auto wc = cpu_->upload(tw.view);
    ASSERT_TRUE(wg.ok() && wc.ok()) << wg.status().to_string();
    for (int n : {1, 3, 8}) {
      const auto x = randn(static_cast<size_t>(n * cols), 72 + n);
      Buf xg(*gpu_, x), og(*gpu_, static_cast<size_t>(n * rows) * 4);
      std::vector<float> ref(static_cast<size_t>(n * rows));
      cpu_->matmul(x.data(), n, **wc, ref.data());
      gpu_->matmul(xg.f(), n, **wg, og.f());
      const auto got = og.read();
      for (int tk = 0; tk < n; ++tk)
        for (int64_t o = 0; o < rows; ++o) {
          double mag = 0;
          for (int64_t i = 0; i < cols; ++i)
            mag += std::fabs(double(tw.dense[o * cols + i]) * x[tk * cols + i]);
          ASSERT_NEAR(got[tk * rows + o], ref[tk * rows + o], 1e-4 * mag + 1e-30)
              << dtype_name(t) << " n " << n << " [" << tk << "," << o << "]";
        }
    }
  }
}

TEST_F(CudaOps, BadArgumentsBecomeAStickyStatus) {
  std::vector<float> q(1024, 1.0f);
  Buf qg(*gpu_, q), kv(*gpu_, 1024 * 4), og(*gpu_, 1024 * 4);
  AttentionParams p;
  p.n_tokens = 1;
  p.n_heads = 1;
  p.n_kv_heads = 1;
  p.head_dim = 1024;  // above the kernel's 512
  p.scale = 1;
  gpu_->attention(qg.f(), KvLayer{kv.get(), kv.get(), 1, DType::kF32}, p, og.f());
  Status s = cuda_backend_status(*gpu_);
  EXPECT_FALSE(s.ok());
  EXPECT_NE(s.message().find("attention"), std::string::npos) << s.to_string();
  const auto out = og.read();  // a failed backend returns NaN, never plausible numbers
  EXPECT_TRUE(std::isnan(out[0]));
  expect_failure_ = true;  // skip TearDown's status check: this backend is meant to have failed
}

TEST_F(CudaOps, AllocationFailureNamesBytesAndFreeAndIsNotSticky) {
  const uint64_t free = gpu_->free_bytes();
  EXPECT_GT(free, uint64_t{1} << 20);        // cudaMemGetInfo answered
  auto r = gpu_->allocate(size_t{1} << 50);  // 1 PiB
  ASSERT_FALSE(r.ok());
  const std::string m = r.status().message();
  EXPECT_NE(m.find("1125899906842624 bytes"), std::string::npos) << m;
  EXPECT_NE(m.find("free"), std::string::npos) << m;
  // The backend is still usable: an allocation failure is reported, not recorded.
  Buf ok(*gpu_, 4096);
  EXPECT_NE(ok.get(), nullptr);
  EXPECT_TRUE(cuda_backend_status(*gpu_).ok());
}

// ---- sampling: Backend::sample on the device against the default (host Sampler) -----------

// The sampled frequencies follow the softmax of hand-picked logits (independent of both
// samplers): logits {2, 1, 0, -1, -inf...} at temperature 1 with top-k 3 give probabilities
// e^2, e^1, e^0 over their sum = 0.665, 0.245, 0.090.
TEST_F(CudaOps, SampleFrequenciesFollowTheSoftmax) {
  const int vocab = 5000;
  std::vector<float> logits(vocab, -30.0f);
  logits[4000] = 2, logits[17] = 1, logits[2500] = 0, logits[9] = -1;
  Buf lg(*gpu_, logits);
  SamplingOptions o;
  o.temperature = 1, o.top_k = 3;
  std::mt19937_64 rng(7);
  const int n = emu_small() ? 200 : 4000;
  int hits[3] = {0, 0, 0};
  for (int i = 0; i < n; ++i) {
    const int32_t id = gpu_->sample(lg.f(), vocab, o, {}, {}, rng);
    ASSERT_TRUE(id == 4000 || id == 17 || id == 2500) << id;
    hits[id == 4000 ? 0 : id == 17 ? 1 : 2]++;
  }
  const double z = std::exp(2.0) + std::exp(1.0) + 1.0;
  const double p[3] = {std::exp(2.0) / z, std::exp(1.0) / z, 1.0 / z};
  for (int j = 0; j < 3; ++j) {
    const double sd = std::sqrt(n * p[j] * (1 - p[j]));
    EXPECT_NEAR(hits[j], n * p[j], 5 * sd) << "candidate " << j;  // 5 sigma: ~1e-6 false alarms
  }
}

// --weights fp8: F32/F16/BF16 matrices given to upload_matmul_weight become e4m3 + per-row
// scales for matmul. Reference: scale = amax / 448 (1 for a zero row), code = make_model's
// f32_to_f8e4m3(x / scale), value = f8e4m3_to_f32(code) * scale, computed here on the host.
// embed on the same weight returns the stored values (lookups are not narrowed), and upload()
// (norm vectors, the vision tower) keeps the stored type.
TEST_F(CudaOps, Fp8WeightsQuantizeAtUpload) {
  BackendOptions bo;
  bo.fp8_weights = true;
  auto fp8 = make_cuda_backend(bo);
  ASSERT_TRUE(fp8.ok()) << fp8.status().to_string();
  Backend& g8 = **fp8;
  EXPECT_NE(g8.name().find("fp8"), std::string::npos) << g8.name();
  for (DType t : {DType::kF32, DType::kF16, DType::kBF16}) {
    for (int64_t cols : {37, 2100}) {
      const int64_t rows = 45;
      TestWeight tw(t, rows, cols, 90 + static_cast<uint32_t>(cols));
      const uint64_t rb = *row_bytes(t, cols);
      std::fill(tw.bytes.begin() + 3 * rb, tw.bytes.begin() + 4 * rb, 0);  // an all-zero row
      std::fill(tw.dense.begin() + 3 * cols, tw.dense.begin() + 4 * cols, 0.0f);
      // The host reference quantization.
      std::vector<uint8_t> q(static_cast<size_t>(rows * cols));
      std::vector<float> scales(rows), want(q.size());
      for (int64_t r = 0; r < rows; ++r) {
        float amax = 0;
        for (int64_t i = 0; i < cols; ++i) amax = std::max(amax, std::fabs(tw.dense[r * cols + i]));
        scales[r] = amax > 0 ? amax / 448.0f : 1.0f;
        for (int64_t i = 0; i < cols; ++i) {
          q[r * cols + i] = f32_to_f8e4m3(tw.dense[r * cols + i] / scales[r]);
          want[r * cols + i] = f8e4m3_to_f32(q[r * cols + i]) * scales[r];
        }
      }
      auto stored = g8.upload(tw.view);
      ASSERT_TRUE(stored.ok()) << stored.status().to_string();
      EXPECT_EQ((*stored)->dtype, t) << "upload() keeps the stored type";
      auto w = g8.upload_matmul_weight(tw.view);
      ASSERT_TRUE(w.ok()) << w.status().to_string();
      EXPECT_EQ((*w)->dtype, DType::kF8E4M3);
      // embed: the stored rows, in a scrambled order with a repeat (host-gathered rows).
      std::vector<int32_t> ids(rows);
      for (int64_t r = 0; r < rows; ++r) ids[r] = static_cast<int32_t>((r * 7 + 3) % rows);
      ids[5] = ids[4];
      Buf og(g8, q.size() * 4);
      g8.embed(**w, ids.data(), static_cast<int>(rows), 0.5f, og.f());
      const auto got = og.read();
      int bad = 0;
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t i = 0; i < cols; ++i) {
          const float e = tw.dense[ids[r] * cols + i] * 0.5f;
          if (!same_float(got[r * cols + i], e) && ++bad <= 3)
            ADD_FAILURE() << dtype_name(t) << " cols " << cols << " embed [" << r << "," << i
                          << "]: " << got[r * cols + i] << " vs stored " << e;
        }
      EXPECT_EQ(bad, 0) << dtype_name(t) << " cols " << cols;
      // The quantized values, bit for bit: matmul by the identity (cols > 8 tokens: the
      // dequantize + cuBLAS path, whose bf16 operands are the values rounded to bf16) gives
      // out[t, o] = bf16(W[o, t]) exactly (one product by 1, the rest by 0; a -0 weight comes
      // back as +0, hence == rather than the bits).
      std::vector<float> eye(static_cast<size_t>(cols * cols), 0.0f);
      for (int64_t i = 0; i < cols; ++i) eye[i * cols + i] = 1.0f;
      Buf eg(g8, eye), wg(g8, static_cast<size_t>(cols * rows) * 4);
      g8.matmul(eg.f(), static_cast<int>(cols), **w, wg.f());
      const auto wt = wg.read();
      for (int64_t o = 0; o < rows; ++o)
        for (int64_t i = 0; i < cols; ++i)
          if (!(wt[i * rows + o] == round_bf16(want[o * cols + i])) && ++bad <= 3)
            ADD_FAILURE() << dtype_name(t) << " cols " << cols << " fp8 W[" << o << "," << i
                          << "]: " << wt[i * rows + o] << " vs " << want[o * cols + i];
      EXPECT_EQ(bad, 0) << dtype_name(t) << " cols " << cols;
      // The matmul paths (GEMV, dequantize + cuBLAS) on the quantized weight, against the CPU
      // reference on the reference fp8 tensor.
      TensorView qv{"fp8_reference", DType::kF8E4M3, {rows, cols}, q.data(), q.size(), scales};
      auto wc = cpu_->upload(qv);
      ASSERT_TRUE(wc.ok());
      for (int n : {1, 12}) {
        const auto x = randn(static_cast<size_t>(n * cols), 3 + n);
        Buf xg(g8, x), mg(g8, static_cast<size_t>(n * rows) * 4);
        std::vector<float> ref(static_cast<size_t>(n * rows));
        cpu_->matmul(x.data(), n, **wc, ref.data());
        g8.matmul(xg.f(), n, **w, mg.f());
        const auto m = mg.read();
        const std::string what = std::string(dtype_name(t)) + " as fp8, cols " + std::to_string(cols);
        ASSERT_EQ(testutil::check_cuda_matmul(want, x, rows, cols, n,
                                              testutil::cuda_gemm_in_bf16(DType::kF8E4M3, n), m.data(),
                                              ref.data(), what),
                  0);
      }
    }
  }
  EXPECT_TRUE(cuda_backend_status(g8).ok());
}

// ---- the tiny model, CUDA vs CPU through forward() -------------------------------------------

struct ModelRun {
  std::vector<std::vector<float>> logits;  // per step
  int recorded = 0;                        // recorded steps the decode steps replayed
};

ModelRun run_tiny(Backend& be, const Checkpoint& ck, DType kv, const std::vector<int32_t>& prompt,
                  const std::vector<int32_t>& decode) {
  ModelRun run;
  const ModelConfig& cfg = ck.config();
  auto w = BackendModel::upload(be, ck.weights());
  EXPECT_TRUE(w.ok()) << w.status().to_string();
  if (!w.ok()) return run;
  const int chunk = 16;
  KvCache cache(be, plan_kv(cfg, 64, chunk, kv));
  EXPECT_TRUE(cache.allocate(cfg).ok());
  ForwardScratch scratch(be);
  EXPECT_TRUE(scratch.allocate(cfg, chunk).ok());
  auto step = [&](const int32_t* ids, int n, int pos0, bool all) {
    std::vector<float> logits(static_cast<size_t>(all ? n : 1) * cfg.vocab_size);
    ForwardRequest req;
    req.ids = ids;
    req.n = n;
    req.pos0 = pos0;
    req.all_logits = all;
    Status s = forward(cfg, *w, be, cache.view(), scratch, req, logits.data(), nullptr);
    EXPECT_TRUE(s.ok()) << s.to_string();
    s = cuda_backend_status(be);
    EXPECT_TRUE(s.ok()) << s.to_string();
    run.logits.push_back(std::move(logits));
  };
  step(prompt.data(), static_cast<int>(prompt.size()), 0, true);  // 12 tokens: the cuBLAS path
  int pos = static_cast<int>(prompt.size());
  step(decode.data(), 3, pos, true);  // 3 tokens: the GEMV path
  pos += 3;
  for (size_t i = 3; i < decode.size(); ++i) step(&decode[i], 1, pos++, false);  // decode steps
  for (const auto& [key, step] : scratch.recorded) run.recorded += step != nullptr;
  return run;
}

// TinyModelMatchesCpu's allowance per cache type (the comment there says why).
double kv_tolerance(DType kv) {
  return kv == DType::kF32 ? 1e-4 : kv == DType::kBF16 ? 1e-3 : kv == DType::kQ8_0 ? 1e-2 : 3e-2;
}

TEST_F(CudaOps, TinyModelMatchesCpu) {
  // tools/gpu-check.sh runs prebuilt binaries in another copy of the tree: it points here.
  const char* root = std::getenv("GEMMA3_SOURCE_DIR");
  const std::string data = std::string(root && *root ? root : GEMMA3_SOURCE_DIR) + "/tests/data/";
  const std::vector<int32_t> prompt = {2, 105, 2364, 107, 818, 5279, 529, 7001, 563, 236881, 106, 107};
  // 40 tokens after the prompt reach position 52: the sliding layers' rings (window 8 + chunk
  // 16 - 1 = 23 slots) wrap twice, so decode reads keys from reused slots.
  std::vector<int32_t> decode = {105, 4368, 107, 818, 5279, 236761};
  // GEMMA3_CUDA_EMU_SMALL: 16 tokens (position 28: the rings wrap once).
  const size_t n_decode = emu_small() ? 16 : 40;
  for (int i = 0; decode.size() < n_decode; ++i) decode.push_back((i * 7919 + 13) % 100000);
  auto fp32_attention = cuda_backend_without_flash();
  ASSERT_TRUE(fp32_attention.ok()) << fp32_attention.status().to_string();
  for (const char* file : {"tiny-f32.gguf", "tiny-q8_0.gguf"}) {
    auto ck = Checkpoint::open(data + file);
    ASSERT_TRUE(ck.ok()) << ck.status().to_string();
    std::vector<int32_t> p = prompt, d = decode;
    for (auto& id : p) id %= (*ck)->config().vocab_size;
    for (auto& id : d) id %= (*ck)->config().vocab_size;
    for (DType kv : testutil::kv_cache_types()) {
      // GEMMA3_CUDA_EMU_SMALL: each cache type once, F32/BF16 with the f32 model, Q8_0/F8E4M3
      // with the q8_0 one.
      const bool f32_model = std::string(file) == "tiny-f32.gguf";
      if (emu_small() && f32_model != (kv == DType::kF32 || kv == DType::kBF16)) continue;
      // The reference multiplies what the GPU multiplies: bf16 operands in the prefill GEMMs.
      // The GPU's prefill attention is the fp32 kernel here; the tensor-core one below.
      testutil::Bf16GemmReference ref(*cpu_);
      const ModelRun g = run_tiny(**fp32_attention, **ck, kv, p, d);
      const ModelRun c = run_tiny(ref, **ck, kv, p, d);
      // With the tensor-core prefill attention (q, K, V and P in bf16: the prompt's 12 tokens
      // and the 3-token step), against the same GPU without it. Its per-op bound is checked by
      // Cuda/BackendOps.Attention; through 8 layers it moves the largest logit's scale by 0.1-0.7%
      // (measured); 3e-2 still catches a wrong mask or slot, which moves logits by O(1). Plus
      // the cache type's own allowance below: the changed activations flip 8-bit cache codes.
      const ModelRun f = run_tiny(*gpu_, **ck, kv, p, d);
      ASSERT_EQ(f.logits.size(), g.logits.size());
      for (size_t s = 0; s < g.logits.size(); ++s) {
        double err = 0, mag = 1;
        for (size_t i = 0; i < g.logits[s].size(); ++i) {
          err = std::max(err, std::fabs(double(f.logits[s][i]) - g.logits[s][i]));
          mag = std::max(mag, std::fabs(double(g.logits[s][i])));
        }
        EXPECT_LT(err / mag, 3e-2 + kv_tolerance(kv))
            << file << " kv " << dtype_name(kv) << " tensor-core attention, step " << s;
      }
      ASSERT_EQ(g.logits.size(), c.logits.size());
      // The decode steps (context 64: one position bucket) were recorded once and replayed,
      // each at its own position (the all-row-logits steps run directly).
      if (gpu_->can_record()) EXPECT_EQ(f.recorded, 1) << file << " kv " << dtype_name(kv);
      // fp32 everywhere, same weights: only summation order and libm differ (as CPU vs
      // transformers in test_model_golden, held to 1e-4). With a bf16 cache a key/value that
      // lands within an ulp of a bf16 rounding midpoint can round the other way (4e-3
      // relative on that element), so that case gets 1e-3. The 8-bit caches encode the same
      // way on both sides (BackendOps.KvWriteIsBitExact...), but a flip there moves one element by a
      // Q8_0 step (amax / 127) or an e4m3 ulp (6-12%): 1e-2 and 3e-2. A layout or
      // dequantization bug gives O(1) errors.
      const double tol = kv_tolerance(kv);
      for (size_t s = 0; s < g.logits.size(); ++s) {
        double err = 0, mag = 1;
        for (size_t i = 0; i < c.logits[s].size(); ++i) {
          err = std::max(err, std::fabs(double(g.logits[s][i]) - c.logits[s][i]));
          mag = std::max(mag, std::fabs(double(c.logits[s][i])));
        }
        EXPECT_LT(err / mag, tol) << file << " kv " << dtype_name(kv) << " step " << s;
      }
    }
  }
}

}  // namespace
}  // namespace gemma3
