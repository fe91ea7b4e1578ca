// The CUDA backend against the CPU reference backend (the oracle), op by op on random inputs
// at awkward shapes, then the tiny model end to end. Suites needing a GPU skip, saying why,
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
#include "bf16_gemm_reference.h"
#include "checkpoint/weights.h"
#include "core/quant.h"
#include "dev/make_model.h"
#include "model/forward.h"
#include "test_util.h"

namespace gemma3 {
namespace {

constexpr float kU = 5.9604645e-8f;  // 2^-24, fp32 unit roundoff

using testutil::randn;

std::vector<uint8_t> random_bytes(size_t n, uint32_t seed) {
  std::mt19937 g(seed);
  std::vector<uint8_t> v(n);
  for (auto& b : v) b = static_cast<uint8_t>(g());
  return v;
}

bool same_float(float a, float b) {
  if (std::isnan(a) && std::isnan(b)) return true;
  uint32_t ua, ub;
  std::memcpy(&ua, &a, 4);
  std::memcpy(&ub, &b, 4);
  return ua == ub;
}

// GEMMA3_CUDA_EMU_SMALL=1 (scripts/test.sh cuda-emu): the CPU emulator (tools/cuda-emu) runs
// every CUDA thread as a fiber, so the largest cases shrink: attention skips its 100003- and
// 131072-key cases, the decode timing runs 4096 keys once, the sampling comparison runs 4 of
// its 40 steps per case over the 262147-entry vocabulary (the non-finite one 3 of 8), the
// frequency test draws 200 tokens instead of 4000, and the tiny model decodes 16 tokens instead
// of 40 with each KV cache type once instead of with both models (docs/cuda.md). Unset or 0 on
// a GPU.
bool emu_small() {
  const char* s = std::getenv("GEMMA3_CUDA_EMU_SMALL");
  return s && *s && std::strcmp(s, "0") != 0;
}

const DType kAllTypes[] = {DType::kF32,  DType::kF16,  DType::kBF16,   DType::kF8E4M3,
                           DType::kQ4_0, DType::kQ4_1, DType::kQ5_0,   DType::kQ5_1,
                           DType::kQ8_0, DType::kQ2_K, DType::kQ3_K,   DType::kQ4_K,
                           DType::kQ5_K, DType::kQ6_K, DType::kIQ4_NL, DType::kIQ4_XS};

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
  for (DType t : kAllTypes) {
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

// Backend memory holding a copy of host data (or zeros), released with the backend.
class Buf {
 public:
  Buf(Backend& be, size_t bytes) : be_(be), bytes_(bytes) {
    auto r = be.allocate(bytes);
    EXPECT_TRUE(r.ok()) << r.status().to_string();
    p_ = r.ok() ? *r : nullptr;
  }
  template <class T>
  Buf(Backend& be, const std::vector<T>& v) : Buf(be, v.size() * sizeof(T)) {
    if (p_) be.from_host(v.data(), p_, bytes_);
  }
  ~Buf() {
    if (p_) be_.release(p_);
  }
  float* f() const { return static_cast<float*>(p_); }
  void* get() const { return p_; }
  template <class T = float>
  std::vector<T> read() const {
    std::vector<T> v(bytes_ / sizeof(T));
    if (p_) be_.to_host(p_, v.data(), bytes_);
    return v;
  }

 private:
  Backend& be_;
  size_t bytes_;
  void* p_ = nullptr;
};

// The oracle is the CPU *reference* backend (plain loops), not the fast CPU kernels that
// make_cpu_backend may pick: GEMMA3_CPU_KERNELS=ref selects it, and is restored afterwards.
std::unique_ptr<Backend> cpu_reference_backend() {
  const char* old = std::getenv("GEMMA3_CPU_KERNELS");
  const std::string saved = old ? old : "";
  setenv("GEMMA3_CPU_KERNELS", "ref", 1);
  auto be = make_cpu_backend({8});
  if (old)
    setenv("GEMMA3_CPU_KERNELS", saved.c_str(), 1);
  else
    unsetenv("GEMMA3_CPU_KERNELS");
  EXPECT_TRUE(be.ok()) << be.status().to_string();
  return be.ok() ? std::move(*be) : nullptr;
}

class CudaOps : public ::testing::Test {
 protected:
  void SetUp() override {
    auto g = make_cuda_backend({});
    if (!g.ok()) GTEST_SKIP() << "no CUDA backend here: " << g.status().to_string();
    gpu_ = std::move(*g);
    cpu_ = cpu_reference_backend();
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

// A weight of type t, [rows, cols], with its bytes and a host fp32 copy (dequantized by the
// reference, row scale applied). Types with a quantizer get quantized normal data; the others
// get random blocks whose fp16 scales are set to small positive values (valid blocks).
struct TestWeight {
  std::vector<uint8_t> bytes;
  std::vector<float> row_scale;
  std::vector<float> dense;  // [rows, cols]
  TensorView view;

  TestWeight(DType t, int64_t rows, int64_t cols, uint32_t seed) {
    const uint64_t rb = *row_bytes(t, cols);
    bytes.resize(rb * rows);
    if (t != DType::kF8E4M3 && can_quantize(t)) {
      const auto src = randn(static_cast<size_t>(rows * cols), seed, 0.5f);
      for (int64_t r = 0; r < rows; ++r) quantize_row(t, src.data() + r * cols, bytes.data() + r * rb, cols);
    } else {
      bytes = random_bytes(bytes.size(), seed);
      std::mt19937 g(seed + 1);
      std::uniform_real_distribution<float> u(1e-3f, 2e-2f);
      auto set_half = [&](uint8_t* p) {
        const uint16_t h = f32_to_f16(u(g));
        p[0] = static_cast<uint8_t>(h & 0xFF);
        p[1] = static_cast<uint8_t>(h >> 8);
      };
      const DTypeInfo& info = dtype_info(t);
      const int64_t nblocks = rows * cols / info.block_elems;
      for (int64_t b = 0; b < nblocks; ++b) {
        uint8_t* x = bytes.data() + b * info.block_bytes;
        switch (t) {
          case DType::kQ4_1:
          case DType::kQ5_1:
          case DType::kQ5_K: set_half(x), set_half(x + 2); break;
          case DType::kQ5_0:
          case DType::kIQ4_NL:
          case DType::kIQ4_XS: set_half(x); break;
          case DType::kQ2_K: set_half(x + 80), set_half(x + 82); break;
          case DType::kQ3_K: set_half(x + 108); break;
          case DType::kF8E4M3:
            if ((x[0] & 0x7F) == 0x7F) x[0] ^= 1;  // no NaN codes
            break;
          default: break;
        }
      }
      if (t == DType::kF8E4M3) {
        row_scale.resize(static_cast<size_t>(rows));
        for (float& s : row_scale) s = u(g) * 10;
      }
    }
    view = TensorView{"test_weight", t, {rows, cols}, bytes.data(), bytes.size(), row_scale};
    dense.resize(static_cast<size_t>(rows * cols));
    for (int64_t r = 0; r < rows; ++r) {
      dequantize_row(t, bytes.data() + r * rb, dense.data() + r * cols, cols);
      if (!row_scale.empty())
        for (int64_t i = 0; i < cols; ++i) dense[r * cols + i] *= row_scale[r];
    }
  }
};

// Columns for a type: a non-multiple of 32 where the type allows, and one crossing the GEMV's
// 1024-column x tile with a partial last tile.
std::vector<int64_t> awkward_cols(DType t) {
  const int be = dtype_info(t).block_elems;
  if (be == 1) return {37, 2100};
  if (be == 32) return {96, 2336};
  return {256, 2304};
}

// docs/cuda.md, "Prefill GEMM": past kGemvMaxTokens tokens the CUDA matmul rounds both operands
// of a non-F32 weight to bf16 (tensor cores) and sums their exact products in fp32.
bool gemm_in_bf16(DType t, int n) { return n > cuda::kGemvMaxTokens && t != DType::kF32; }

// Checks the CUDA matmul's out [n, rows] of x [n, cols] and the weight's dense rows against the
// CPU reference's ref, returning the number of bad values (the first 3 reported under `what`).
// Both sides sum fp32 products of the same operands (the decoders agree bit for bit) in
// different orders. Rounding errors of a k-term sum grow like sqrt(k) * u * sum|w x| in practice
// (the worst case is k * u); 1e-4 * sum|w x| is >= 15 of those for k <= 2336, while an indexing
// bug (wrong row, token, tile or block) moves a result by ~sum|w x| / sqrt(k). For a bf16 GEMM
// the operands differ: the result is checked in the same way against the exact sum over the
// bf16-rounded operands (round_bf16, double), and against the CPU's within the operand
// rounding's bound, (2 * 2^-8 + 2^-16) sum|w x| < 7.9e-3 sum|w x| (2^-8: bf16's unit
// roundoff), plus the same 1e-4.
int check_matmul(const std::vector<float>& dense, const std::vector<float>& x, int64_t rows, int64_t cols,
                 int n, bool bf16, const float* got, const float* ref, const std::string& what) {
  int bad = 0;
  for (int tk = 0; tk < n; ++tk)
    for (int64_t o = 0; o < rows; ++o) {
      double mag = 0, exact = 0, mag16 = 0;
      for (int64_t i = 0; i < cols; ++i) {
        const float w = dense[o * cols + i], v = x[tk * cols + i];
        mag += std::fabs(double(w) * v);
        if (!bf16) continue;
        const double p = double(round_bf16(w)) * round_bf16(v);
        exact += p;
        mag16 += std::fabs(p);
      }
      const double g = got[tk * rows + o], c = ref[tk * rows + o];
      const bool ok = bf16 ? std::fabs(g - exact) <= 1e-4 * mag16 + 1e-30 &&
                                 std::fabs(g - c) <= (7.9e-3 + 1e-4) * mag + 1e-30
                           : std::fabs(g - c) <= 1e-4 * mag + 1e-30;
      if (!ok && ++bad <= 3)
        ADD_FAILURE() << what << " n " << n << " [" << tk << "," << o << "]: gpu " << g << " cpu " << c
                      << (bf16 ? " exact over bf16 operands " + std::to_string(exact) : std::string())
                      << " (sum|wx| " << mag << ")";
    }
  return bad;
}

TEST_F(CudaOps, MatmulMatchesCpuForEveryTypeAndTokenCount) {
  for (DType t : kAllTypes) {
    for (int64_t cols : awkward_cols(t)) {
      const int64_t rows = 45;  // not a multiple of the GEMV's 8 rows per block
      TestWeight tw(t, rows, cols, 7 + static_cast<uint32_t>(cols));
      auto wg = gpu_->upload(tw.view);
      auto wc = cpu_->upload(tw.view);
      ASSERT_TRUE(wg.ok() && wc.ok()) << wg.status().to_string();
      for (int n : {1, 3, 8, 9, 17}) {  // <= 8: fused GEMV; > 8: dequantize + cuBLAS
        const auto x = randn(static_cast<size_t>(n * cols), 11 + n);
        Buf xg(*gpu_, x), og(*gpu_, static_cast<size_t>(n * rows) * 4);
        std::vector<float> ref(static_cast<size_t>(n * rows));
        cpu_->matmul(x.data(), n, **wc, ref.data());
        gpu_->matmul(xg.f(), n, **wg, og.f());
        const auto got = og.read();
        const std::string what = std::string(dtype_name(t)) + " cols " + std::to_string(cols);
        EXPECT_EQ(check_matmul(tw.dense, x, rows, cols, n, gemm_in_bf16(t, n), got.data(), ref.data(), what),
                  0)
            << what << " n " << n;
      }
    }
  }
}

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
  // As MatmulMatchesCpu; k = 8192 gives sqrt(k) * u ~ 5e-6.
  EXPECT_EQ(check_matmul(tw.dense, x, rows, cols, n, gemm_in_bf16(DType::kQ8_0, n), got.data(), ref.data(),
                         "Q8_0 [2100 x 8192]"),
            0);
}

// The decode GEMV (kernels/gemv.cu) at every token count 1..8 and every type, against the CPU
// reference with MatmulMatchesCpu's tolerance. Columns per type: a short row (one tile, each
// row group in one block: split 1) and a long one that is a multiple of the type's 16-byte
// chunk but not of 32 lanes' worth, crosses the x tile at n >= 5 (partial last tile) and makes
// the block split each row pair over 2, 4 or 8 warps; plain types also at a width whose rows
// are not 16-byte multiples (the per-element path). 45 rows: not a multiple of any row group.
std::vector<int64_t> gemv_cols(DType t) {
  const int be = dtype_info(t).block_elems;
  if (be == 1) return {40, 2096, 36};  // f16/bf16 at 36 and fp8 at 40, 36: the element path
  if (be == 32) return {96, 2080};
  return {256, 2304};
}

void expect_matmul_close(Backend& gpu, Backend& cpu, const TestWeight& tw, DType t, int64_t rows,
                         int64_t cols, int n, uint32_t seed) {
  auto wg = gpu.upload(tw.view);
  auto wc = cpu.upload(tw.view);
  ASSERT_TRUE(wg.ok() && wc.ok()) << wg.status().to_string();
  const auto x = randn(static_cast<size_t>(n * cols), seed);
  Buf xg(gpu, x), og(gpu, static_cast<size_t>(n * rows) * 4);
  std::vector<float> ref(static_cast<size_t>(n * rows));
  cpu.matmul(x.data(), n, **wc, ref.data());
  gpu.matmul(xg.f(), n, **wg, og.f());
  const auto got = og.read();
  const std::string what =
      std::string(dtype_name(t)) + " [" + std::to_string(rows) + " x " + std::to_string(cols) + "]";
  EXPECT_EQ(check_matmul(tw.dense, x, rows, cols, n, gemm_in_bf16(t, n), got.data(), ref.data(), what), 0)
      << what << " n " << n;
}

TEST_F(CudaOps, GemvMatchesCpuForEveryTypeAndTokenCount) {
  for (DType t : kAllTypes) {
    for (int64_t cols : gemv_cols(t)) {
      const int64_t rows = 45;
      TestWeight tw(t, rows, cols, 101 + static_cast<uint32_t>(cols));
      for (int n = 1; n <= cuda::kGemvMaxTokens; ++n) {
        expect_matmul_close(*gpu_, *cpu_, tw, t, rows, cols, n, 200 + n);
        if (HasFailure()) return;
      }
    }
  }
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
          const bool bf16 = !c.narrow && gemm_in_bf16(c.t, n);
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

// Shapes of the GEMV's other paths: fewer rows than one row group (3), a single row, a row
// pair over 8 warps at 1 token, and more row groups than the grid (8 blocks per SM: 132 SMs
// in the emulator), so blocks walk several groups with x staged once.
TEST_F(CudaOps, GemvNarrowAndTallMatrices) {
  struct Case {
    DType t;
    int64_t rows, cols;
    int n;
  };
  std::vector<Case> cases = {{DType::kBF16, 3, 4096, 1},   {DType::kQ4_0, 1, 4096, 2},
                             {DType::kQ8_0, 5, 2048, 8},   {DType::kQ4_K, 7, 4096, 1},
                             {DType::kF8E4M3, 2, 4096, 3}, {DType::kBF16, 17000, 16, 1},
                             {DType::kQ4_0, 17000, 32, 2}};
  for (const Case& c : cases) {
    if (emu_small() && c.rows > 10000 && c.t != DType::kBF16) continue;
    TestWeight tw(c.t, c.rows, c.cols, 300 + static_cast<uint32_t>(c.rows));
    expect_matmul_close(*gpu_, *cpu_, tw, c.t, c.rows, c.cols, c.n, 400);
    if (HasFailure()) return;
  }
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

TEST_F(CudaOps, EmbedIsBitExactForEveryType) {
  for (DType t : kAllTypes) {
    const int64_t rows = 50, cols = dtype_info(t).block_elems == 1 ? 37 : 512;
    TestWeight tw(t, rows, cols, 21);
    auto wg = gpu_->upload(tw.view);
    auto wc = cpu_->upload(tw.view);
    ASSERT_TRUE(wg.ok() && wc.ok());
    const std::vector<int32_t> ids = {49, 0, 7, 7, 31};
    for (int n : {1, 5}) {
      Buf og(*gpu_, static_cast<size_t>(n * cols) * 4);
      std::vector<float> ref(static_cast<size_t>(n * cols));
      cpu_->embed(**wc, ids.data(), n, 33.9411f, ref.data());
      gpu_->embed(**wg, ids.data(), n, 33.9411f, og.f());
      const auto got = og.read();
      // Same decoder, same two roundings ((value * row scale) * scale): identical bits.
      int bad = 0;
      for (size_t i = 0; i < ref.size(); ++i)
        if (!same_float(got[i], ref[i]) && ++bad <= 3)
          ADD_FAILURE() << dtype_name(t) << " n " << n << " element " << i << ": " << got[i] << " vs "
                        << ref[i];
      EXPECT_EQ(bad, 0) << dtype_name(t);
    }
  }
}

// More tokens than a grid.y of tokens could hold (65535): the embed kernel's grid-stride loop.
TEST_F(CudaOps, EmbedTakesAnyNumberOfTokens) {
  const int64_t rows = 50, cols = 37;
  TestWeight tw(DType::kF16, rows, cols, 22);
  auto wg = gpu_->upload(tw.view);
  auto wc = cpu_->upload(tw.view);
  ASSERT_TRUE(wg.ok() && wc.ok());
  const int n = 70001;
  std::vector<int32_t> ids(n);
  for (int t = 0; t < n; ++t) ids[t] = (t * 7) % rows;
  Buf og(*gpu_, static_cast<size_t>(n * cols) * 4);
  std::vector<float> ref(static_cast<size_t>(n * cols));
  cpu_->embed(**wc, ids.data(), n, 2.5f, ref.data());
  gpu_->embed(**wg, ids.data(), n, 2.5f, og.f());
  EXPECT_EQ(og.read(), ref);  // one exact product per element (f16 values * 2.5 fit fp32)
}

TEST_F(CudaOps, RmsNormMatchesCpu) {
  for (int dim : {37, 128, 256, 1152, 5376}) {
    for (int64_t rows : {1, 7}) {
      auto w = randn(dim, 1, 0.3f);
      for (float& v : w) v += 1.0f;
      TensorView wv{"norm", DType::kF32, {dim}, w.data(), w.size() * 4, {}};
      auto wg = gpu_->upload(wv);
      auto wc = cpu_->upload(wv);
      ASSERT_TRUE(wg.ok() && wc.ok());
      const auto x = randn(static_cast<size_t>(rows * dim), 2, 3.0f);
      std::vector<float> ref(x.size());
      cpu_->rmsnorm(x.data(), **wc, rows, dim, 1e-6f, ref.data());
      Buf xg(*gpu_, x);
      gpu_->rmsnorm(xg.f(), **wg, rows, dim, 1e-6f, xg.f());  // in place, as forward() does for q/k
      const auto got = xg.read();
      // Only the sum of squares differs (order); its relative error is ~sqrt(dim) * u, halved
      // by the square root: 2e-5 relative is > 20x that at dim 5376.
      for (size_t i = 0; i < ref.size(); ++i)
        ASSERT_NEAR(got[i], ref[i], 2e-5 * std::fabs(ref[i]) + 1e-30) << "dim " << dim << " i " << i;
    }
  }
}

TEST_F(CudaOps, RopeMatchesCpuIncludingLargePositions) {
  struct Case {
    int n, heads, hd, pos0;
    float theta, scale;
  };
  for (const Case& c : {Case{1, 4, 128, 0, 10000.0f, 1.0f}, Case{5, 3, 256, 17, 1e6f, 8.0f},
                        Case{3, 2, 128, 40000, 1e6f, 8.0f}, Case{2, 8, 256, 131000, 10000.0f, 1.0f},
                        Case{4, 1, 32, 100000, 1e6f, 8.0f}}) {
    const auto x = randn(static_cast<size_t>(c.n * c.heads * c.hd), 9);
    auto ref = x;
    cpu_->rope(ref.data(), c.n, c.heads, c.hd, c.pos0, c.theta, c.scale);
    Buf xg(*gpu_, x);
    gpu_->rope(xg.f(), c.n, c.heads, c.hd, c.pos0, c.theta, c.scale);
    const auto got = xg.read();
    // Identical frequencies and angles, products rounded separately: the only difference is
    // the device's double cos/sin against glibc's (both far below float precision), which can
    // flip the final float rounding of c or s by one ulp: |error| <= 2 u (|a| + |b|).
    const int half = c.hd / 2;
    for (size_t i = 0; i < ref.size(); ++i) {
      const size_t base = i - i % c.hd, d = i % c.hd % half;
      const float mag = std::fabs(x[base + d]) + std::fabs(x[base + d + half]);
      ASSERT_NEAR(got[i], ref[i], 4 * kU * mag + 1e-30) << "pos0 " << c.pos0 << " i " << i;
    }
  }
}

const DType kKvTypes[] = {DType::kF32, DType::kBF16, DType::kQ8_0, DType::kF8E4M3};

TEST_F(CudaOps, KvWriteIsBitExactAndWrapsTheRing) {
  // 7 tokens at 26: slots 6..9 then 0..2. 13 tokens at 5 (more than the ring): the CPU's
  // sequential writes leave the last 10 (positions 8..17); the device must not race two
  // tokens onto one slot.
  for (auto [n, pos0] : {std::pair{7, 26}, std::pair{13, 5}}) {
    for (DType dt : kKvTypes) {
      const int kvw = 2 * 128, capacity = 10;
      const size_t bytes = static_cast<size_t>(capacity) * *row_bytes(dt, kvw);
      auto k = randn(static_cast<size_t>(n * kvw), 4), v = randn(static_cast<size_t>(n * kvw), 5, 100.0f);
      // Saturation, NaN, zero blocks and halfway cases for the 8-bit encoders.
      k[3] = 1000.0f, k[4] = -INFINITY, k[5] = NAN, v[7] = 0.0f;
      for (int i = 32; i < 64; ++i) k[i] = 0.0f;
      k[70] = 0.0146484375f;  // halfway between two e4m3 values
      std::vector<uint8_t> ck(bytes, 0), cv(bytes, 0);
      cpu_->kv_write(k.data(), v.data(), n, pos0, kvw, KvLayer{ck.data(), cv.data(), capacity, dt});
      Buf kg(*gpu_, k), vg(*gpu_, v), ckg(*gpu_, bytes), cvg(*gpu_, bytes);
      gpu_->kv_write(kg.f(), vg.f(), n, pos0, kvw, KvLayer{ckg.get(), cvg.get(), capacity, dt});
      // Copies, round-to-nearest-even and the Q8_0 quantizer (correctly rounded divide, products
      // and round-half-away) are exact operations on both sides: identical bytes.
      EXPECT_EQ(ckg.read<uint8_t>(), ck) << dtype_name(dt) << " n " << n;
      EXPECT_EQ(cvg.read<uint8_t>(), cv) << dtype_name(dt) << " n " << n;
    }
  }
}

// Issue #14: the fused QK-norm + RoPE + cache write. Against the CPU reference's five ops
// (q, k within the rmsnorm and rope tolerances; an fp32 cache within them too) and against the
// same backend's five launches, bit for bit (the fused kernel promises the same sums, products
// and encoders). Cases: decode at a large position, a chunk that wraps the ring, a chunk longer
// than the ring (only its last `capacity` tokens may be written), head dims 256, 128, and 48
// (not a multiple of 32, while the two heads are: a Q8_0 cache then takes the unfused path).
TEST_F(CudaOps, QkNormRopeKvWriteMatchesCpuAndTheUnfusedOps) {
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
    auto qg = gpu_->upload(qv), kg = gpu_->upload(kv), qc = cpu_->upload(qv), kc = cpu_->upload(kv);
    ASSERT_TRUE(qg.ok() && kg.ok() && qc.ok() && kc.ok());
    const auto q = randn(static_cast<size_t>(c.n) * qw, 23, 2.0f),
               k = randn(static_cast<size_t>(c.n) * kvw, 24, 3.0f),
               v = randn(static_cast<size_t>(c.n) * kvw, 25);
    for (DType dt : kKvTypes) {
      SCOPED_TRACE(::testing::Message() << dtype_name(dt) << " n " << c.n << " hd " << c.hd);
      const size_t bytes = static_cast<size_t>(c.capacity) * *row_bytes(dt, kvw);
      auto qh = q, kh = k;
      std::vector<uint8_t> ck(bytes, 0), cv(bytes, 0);
      cpu_->qk_norm_rope_kv_write(qh.data(), kh.data(), v.data(), **qc, **kc, c.n, c.heads, c.kv_heads, c.hd,
                                  1e-6f, c.pos0, c.theta, c.scale,
                                  KvLayer{ck.data(), cv.data(), c.capacity, dt});
      Buf q1(*gpu_, q), k1(*gpu_, k), v1(*gpu_, v), ck1(*gpu_, bytes), cv1(*gpu_, bytes);
      gpu_->qk_norm_rope_kv_write(q1.f(), k1.f(), v1.f(), **qg, **kg, c.n, c.heads, c.kv_heads, c.hd, 1e-6f,
                                  c.pos0, c.theta, c.scale, KvLayer{ck1.get(), cv1.get(), c.capacity, dt});
      Buf q2(*gpu_, q), k2(*gpu_, k), ck2(*gpu_, bytes), cv2(*gpu_, bytes);
      gpu_->Backend::qk_norm_rope_kv_write(q2.f(), k2.f(), v1.f(), **qg, **kg, c.n, c.heads, c.kv_heads, c.hd,
                                           1e-6f, c.pos0, c.theta, c.scale,
                                           KvLayer{ck2.get(), cv2.get(), c.capacity, dt});
      const auto fq = q1.read(), fk = k1.read();
      EXPECT_EQ(fq, q2.read());
      EXPECT_EQ(fk, k2.read());
      EXPECT_EQ(ck1.read<uint8_t>(), ck2.read<uint8_t>());
      EXPECT_EQ(cv1.read<uint8_t>(), cv2.read<uint8_t>());
      // rmsnorm's 2e-5 (the sum's order) through rope's rotation (|a| + |b| of the normed pair).
      auto near = [&](const std::vector<float>& got, const std::vector<float>& want) {
        const int half = c.hd / 2;
        for (size_t i = 0; i < want.size(); ++i) {
          const size_t base = i - i % c.hd, d = i % c.hd % half;
          const double mag = std::fabs(want[base + d]) + std::fabs(want[base + d + half]);
          ASSERT_NEAR(got[i], want[i], 3e-5 * mag + 1e-30) << "i " << i;
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
        for (size_t i = 0; i < rk.size(); ++i) ASSERT_NEAR(gk[i], rk[i], 1e-4 * (1 + std::fabs(rk[i]))) << i;
        EXPECT_EQ(gv, rv);
      }
    }
  }
}

// Issue #14: the residual step (post-norm, add, the next block's norm) against the CPU
// reference's three ops and against the same backend's three launches, bit for bit; without a
// next norm x is all it writes.
TEST_F(CudaOps, AddRmsNormMatchesCpuAndTheUnfusedOps) {
  for (int dim : {37, 640, 1152, 5376}) {
    for (int64_t rows : {1, 5}) {
      for (bool next : {true, false}) {
        SCOPED_TRACE(::testing::Message() << "dim " << dim << " rows " << rows << " next " << next);
        auto wp = randn(dim, 31, 0.3f), wn = randn(dim, 32, 0.3f);
        for (float& x : wp) x += 1.0f;
        for (float& x : wn) x += 1.0f;
        TensorView pv{"post", DType::kF32, {dim}, wp.data(), wp.size() * 4, {}};
        TensorView nv{"next", DType::kF32, {dim}, wn.data(), wn.size() * 4, {}};
        auto pg = gpu_->upload(pv), ng = gpu_->upload(nv), pc = cpu_->upload(pv), nc = cpu_->upload(nv);
        ASSERT_TRUE(pg.ok() && ng.ok() && pc.ok() && nc.ok());
        const size_t count = static_cast<size_t>(rows) * dim;
        const auto a = randn(count, 33, 5.0f), x = randn(count, 34, 20.0f);
        std::vector<float> ah = a, xh = x, normed_h(count, -1.0f);
        cpu_->add_rmsnorm(ah.data(), **pc, xh.data(), next ? nc->get() : nullptr, rows, dim, 1e-6f,
                          normed_h.data());
        const std::vector<float> sentinel(count, -1.0f);
        Buf a1(*gpu_, a), x1(*gpu_, x), o1(*gpu_, sentinel), a2(*gpu_, a), x2(*gpu_, x), o2(*gpu_, sentinel);
        gpu_->add_rmsnorm(a1.f(), **pg, x1.f(), next ? ng->get() : nullptr, rows, dim, 1e-6f, o1.f());
        gpu_->Backend::add_rmsnorm(a2.f(), **pg, x2.f(), next ? ng->get() : nullptr, rows, dim, 1e-6f,
                                   o2.f());
        const auto gx = x1.read(), go = o1.read();
        EXPECT_EQ(gx, x2.read());
        EXPECT_EQ(go, o2.read());
        if (!next) EXPECT_EQ(go, sentinel);
        // x + a * f * w: the factor's relative error (2e-5, rmsnorm's bound) on the added term.
        // normed: rmsnorm's bound, plus x's error carried through the next factor and weight
        // (large relative to a normed value whose x cancelled to near 0).
        for (int64_t r = 0; r < rows; ++r) {
          double ss = 0;
          for (int i = 0; i < dim; ++i) ss += double(xh[r * dim + i]) * xh[r * dim + i];
          const double factor = 1 / std::sqrt(ss / dim + 1e-6);
          for (int i = 0; i < dim; ++i) {
            const size_t at = static_cast<size_t>(r * dim + i);
            const double x_err = 2e-5 * std::fabs(double(xh[at]) - x[at]) + 4 * kU * std::fabs(xh[at]);
            ASSERT_NEAR(gx[at], xh[at], x_err + 1e-30) << "x " << at;
            if (next)
              ASSERT_NEAR(go[at], normed_h[at],
                          4e-5 * std::fabs(normed_h[at]) + x_err * factor * std::fabs(wn[i]))
                  << "normed " << at;
          }
        }
      }
    }
  }
}

// Cache bytes of type dt holding `values` ([slots, kv_width]), encoded by the CPU code (not the
// encoders under test): quantize_row for F32/BF16/Q8_0, make_model's e4m3 for F8E4M3.
std::vector<uint8_t> encode_cache(DType dt, const std::vector<float>& values, int kv_width) {
  const uint64_t rb = *row_bytes(dt, kv_width);
  const size_t slots = values.size() / kv_width;
  std::vector<uint8_t> out(slots * rb);
  for (size_t s = 0; s < slots; ++s) {
    const float* src = values.data() + s * kv_width;
    uint8_t* dst = out.data() + s * rb;
    if (dt == DType::kF8E4M3) {
      for (int i = 0; i < kv_width; ++i) dst[i] = f32_to_f8e4m3(src[i]);
    } else {
      quantize_row(dt, src, dst, kv_width);
    }
  }
  return out;
}

// A CUDA backend whose prefill attention is the fp32 kernel (GEMMA3_CUDA_FLASH=0).
Result<std::unique_ptr<Backend>> cuda_backend_without_flash() {
  setenv("GEMMA3_CUDA_FLASH", "0", 1);
  auto b = make_cuda_backend({});
  unsetenv("GEMMA3_CUDA_FLASH");
  return b;
}

// The launcher's arguments for a backend attention call (no device buffers but k and v).
cuda::AttentionArgs args_of(const AttentionParams& p, int capacity, DType dt, const void* k = nullptr,
                            const void* v = nullptr) {
  cuda::AttentionArgs a;
  a.n_tokens = p.n_tokens, a.pos0 = p.pos0, a.n_heads = p.n_heads, a.n_kv_heads = p.n_kv_heads;
  a.head_dim = p.head_dim, a.window = p.window, a.kv_start = p.kv_start, a.capacity = capacity;
  a.bidir_begin = p.bidir_begin, a.bidir_end = p.bidir_end, a.kv_dtype = dt, a.k = k, a.v = v;
  return a;
}

// Whether launch_attention serves this call with the tensor-core prefill kernel.
bool uses_flash(const AttentionParams& p, int capacity, DType dt, const void* k, const void* v) {
  return cuda::attention_plan(args_of(p, capacity, dt, k, v)).flash_dim > 0;
}

// The tensor-core prefill kernel (docs/cuda.md, "Tensor-core prefill attention") rounds q, K, V
// and the softmax weights to bf16; scores, sums and outputs stay fp32. Its distance from the
// exact result, per output (token t, head h, dim d): a score's operands are each off by at most
// 2^-8 relative (bf16's unit roundoff), so score j moves by at most delta_j = scale (2 * 2^-8 +
// 2^-16) sum_d |q_d k_jd|, the normalized weights by at most a factor e^(2 max delta) - 1, and
// rounding P and V adds 2^-8 each: |error| <= (e^(2 delta) - 1 + 2^-7 + 2^-16) sum_j p_j |v_jd| /
// sum_j p_j, computed here in double from the cache bytes (the visible keys by visible_keys,
// checked against the spec in AttentionPlan.VisibleKeysAreTheSpecsMask). A masking, slot or
// split bug moves outputs by O(0.1) instead.
std::vector<double> flash_bound(const AttentionParams& p, const std::vector<float>& q,
                                const std::vector<uint8_t>& ck, const std::vector<uint8_t>& cv, DType dt,
                                int capacity) {
  const cuda::AttentionArgs a = args_of(p, capacity, dt);
  const int hd = p.head_dim, group = p.n_heads / p.n_kv_heads;
  const size_t rb = ck.size() / capacity;
  const double u2 = 2 * std::ldexp(1.0, -8) + std::ldexp(1.0, -16);
  std::vector<double> bound(q.size());
  for (int t = 0; t < p.n_tokens; ++t)
    for (int h = 0; h < p.n_heads; ++h) {
      int64_t lo, hi;
      cuda::visible_keys(a, t, &lo, &hi);
      const float* qr = q.data() + (int64_t{t} * p.n_heads + h) * hd;
      const int64_t off = int64_t{h / group} * hd;
      std::vector<double> s, w;
      double m = -INFINITY, delta = 0;
      for (int64_t j = lo; j <= hi; ++j) {
        const uint8_t* kr = ck.data() + (j % capacity) * rb;
        double dot = 0, mag = 0;
        for (int d = 0; d < hd; ++d) {
          const double x = double(qr[d]) * decode_host(dt, kr, off + d);
          dot += x, mag += std::fabs(x);
        }
        s.push_back(dot * p.scale);
        m = std::max(m, s.back());
        delta = std::max(delta, p.scale * u2 * mag);
      }
      double l = 0;
      for (double x : s) w.push_back(std::exp(x - m)), l += w.back();
      for (int d = 0; d < hd; ++d) {
        double avg = 0;
        for (int64_t j = lo; j <= hi; ++j)
          avg += w[j - lo] * std::fabs(decode_host(dt, cv.data() + (j % capacity) * rb, off + d));
        bound[(int64_t{t} * p.n_heads + h) * hd + d] = (std::expm1(2 * delta) + u2) * avg / l;
      }
    }
  return bound;
}

TEST_F(CudaOps, AttentionMatchesCpu) {
  struct Case {
    const char* what;
    int n_tokens, pos0, n_heads, n_kv_heads, hd, window, kv_start, capacity;
    int bidir_begin = 0, bidir_end = 0;
    bool all_types = true;  // false: a bf16 cache only (the largest cases; head_dim 72 has no Q8_0)
  };
  const int W = 8;
  const Case cases[] = {
      {"one key", 1, 0, 4, 4, 128, 0, 0, 16},
      {"window-1 keys", 1, W - 2, 4, 2, 128, W, 0, W},
      {"window keys", 1, W - 1, 4, 2, 128, W, 0, W},
      {"window+1 keys (one masked)", 1, W, 4, 2, 128, W, 0, W + 1},
      {"prefill across the window", W + 3, 0, 8, 2, 256, W, 0, W + W + 2},
      {"ring wrap", 5, 100, 8, 2, 128, W, 0, W + 4},
      {"kv_start > 0", 4, 40, 4, 1, 256, 0, 37, 64},
      {"kv_start inside the window", 3, 45, 4, 4, 128, W, 41, W + 2},
      {"long causal, several key tiles", 3, 300, 8, 4, 256, 0, 0, 512},
      {"long causal ring", 2, 1000, 2, 1, 128, 0, 0, 1100},
      {"head_dim 32, GQA 2", 6, 3, 4, 2, 32, 0, 0, 16},
      // Bidirectional groups: queries in [begin, end) also see the later keys of the group.
      {"bidir group inside a causal prefill", 10, 5, 4, 2, 128, 0, 0, 32, 8, 13},
      {"bidir group at the chunk's ends", 6, 20, 4, 4, 64, 0, 0, 32, 20, 26},
      {"bidir group on a sliding layer (longer than W)", 12, 20, 4, 2, 128, W, 0, W + 12 - 1, 22, 32},
      {"bidir group of one token", 4, 9, 2, 1, 128, 0, 0, 16, 10, 11},
      {"vision tower: the whole input bidirectional", 7, 0, 4, 4, 64, 0, 0, 7, 0, 7},
      // SigLIP's head_dim 72 (not a multiple of 32: partly idle lanes; no Q8_0 cache for it).
      {"vision head_dim 72", 9, 0, 4, 4, 72, 0, 0, 9, 0, 9, false},
      {"head_dim 512 (the kernel's maximum)", 3, 5, 2, 1, 512, 0, 0, 8},
      // Split-KV decode (one block per (token, head, key chunk), then a combine pass): few
      // (token, head) rows and long visible ranges, at sizes that leave partial chunks/tiles.
      {"split: one token over 5000 keys", 1, 4999, 8, 4, 256, 0, 0, 5000},
      {"split: 3 tokens, 2 heads, ~1030 keys after kv_start", 3, 1800, 2, 1, 128, 0, 770, 1900},
      {"split: sliding ring, 1 token, window 1024", 1, 70001, 8, 2, 128, 1024, 0, 1024 + 15},
      {"split: bidir group at the end of a long range", 3, 3000, 4, 1, 128, 0, 0, 3003, 3000, 3003},
      {"split: one token over 100003 keys", 1, 100002, 2, 1, 128, 0, 0, 100003, 0, 0, false},
      {"split: one token at 128K, 8 heads (the most splits)", 1, 131071, 8, 1, 256, 0, 0, 131072, 0, 0,
       false},
      // Decode kernel (n_tokens <= 8: one block per kv head, split and row group serving every
      // query head of the group and every token): GQA 1..16, head dims 72 (generic), 128, 256,
      // 1..8 tokens, one split and many, ring wraps under a window, kv_start, bidir groups.
      {"decode: GQA 1, one split", 1, 20, 4, 4, 256, 0, 0, 32},
      {"decode: GQA 2, ring wrap in a window, one split", 1, 1000, 4, 2, 256, 16, 0, 16},
      {"decode: GQA 4 (1B's), 701 keys, splits", 1, 700, 4, 1, 256, 0, 0, 701},
      {"decode: GQA 8, head_dim 128, splits", 1, 300, 8, 1, 128, 0, 0, 320},
      {"decode: GQA 16, 2 tokens (4 row groups)", 2, 150, 16, 1, 128, 0, 0, 160},
      {"decode: GQA 16, 2000 keys (2 row groups, many splits)", 1, 1999, 16, 1, 256, 0, 0, 2000},
      {"decode: 8 tokens, GQA 4, window ring wrap", 8, 500, 8, 2, 256, 32, 0, 32 + 8 - 1},
      {"decode: 5 tokens, kv_start, splits", 5, 400, 4, 2, 128, 0, 250, 512},
      {"decode: 6 tokens, bidir group on a window ring", 6, 60, 4, 2, 128, 16, 0, 16 + 6 - 1, 61, 65},
      {"decode: 7 tokens, GQA 2, head_dim 256", 7, 90, 4, 2, 256, 0, 0, 128},
      {"decode: 4 tokens, head_dim 72, all bidirectional (vision)", 4, 0, 16, 16, 72, 0, 0, 4, 0, 4},
      {"decode: 2 tokens, head_dim 72, GQA 4, splits", 2, 200, 8, 2, 72, 0, 0, 256},
      // The prefill kernel's own split path (9 tokens: past the decode kernel).
      {"prefill split: 9 tokens, 2 heads, 1500 keys", 9, 1491, 2, 1, 128, 0, 0, 1500},
      // The tensor-core prefill kernel past one tile of query rows (64; 32 at head_dim 256),
      // with a partial last tile, a sliding ring, and splits of a long range.
      {"flash: 70 tokens, head_dim 64, 1100 keys (2 row tiles, splits)", 70, 1030, 2, 1, 64, 0, 0, 1100, 0, 0,
       false},
      {"flash: 40 tokens, head_dim 256, window ring", 40, 100, 4, 2, 256, W, 0, W + 40 - 1},
      {"flash: 75 tokens, GQA 2, head_dim 128, bidir group across the row tiles", 75, 0, 4, 2, 128, 0, 0, 75,
       50, 70, false},
  };
  // The same cases with the tensor-core prefill kernel turned off: the fp32 prefill kernel.
  auto scalar = cuda_backend_without_flash();
  ASSERT_TRUE(scalar.ok()) << scalar.status().to_string();
  for (DType dt : kKvTypes) {
    for (const Case& c : cases) {
      if (!c.all_types && dt != DType::kBF16) continue;
      if (dt == DType::kQ8_0 && c.hd % 32 != 0) continue;  // Q8_0 caches need whole blocks per head
      if (emu_small() && c.capacity > 10000) continue;
      const int kvw = c.n_kv_heads * c.hd, qw = c.n_heads * c.hd;
      // Identical cache contents on both sides.
      const auto ck = encode_cache(dt, randn(static_cast<size_t>(c.capacity) * kvw, 31), kvw);
      const auto cv = encode_cache(dt, randn(static_cast<size_t>(c.capacity) * kvw, 32), kvw);
      const auto q = randn(static_cast<size_t>(c.n_tokens) * qw, 33);
      AttentionParams p;
      p.n_tokens = c.n_tokens;
      p.pos0 = c.pos0;
      p.n_heads = c.n_heads;
      p.n_kv_heads = c.n_kv_heads;
      p.head_dim = c.hd;
      p.scale = 1.0f / std::sqrt(static_cast<float>(c.hd));
      p.window = c.window;
      p.kv_start = c.kv_start;
      p.bidir_begin = c.bidir_begin;
      p.bidir_end = c.bidir_end;
      std::vector<float> ref(q.size());
      cpu_->attention(
          q.data(), KvLayer{const_cast<uint8_t*>(ck.data()), const_cast<uint8_t*>(cv.data()), c.capacity, dt},
          p, ref.data());
      Buf qg(*gpu_, q), ckg(*gpu_, ck), cvg(*gpu_, cv);
      // Same dequantized values (shared decoders), same fp32 math but the q.k sums (hd terms),
      // the softmax sums and the split combination in another order, and expf vs std::exp
      // (<= 2 ulp): scores (|s| ~ 1..4) agree to ~1e-6 relative, so softmax weights do too;
      // outputs are convex combinations of v (|v| < ~5), so |error| < ~1e-5. A masking, slot,
      // split or dequantization bug changes outputs by O(0.01..0.1) even over 128K keys
      // (outputs there are ~1/sqrt(keys) ~ 3e-3 but a wrong chunk moves them by as much).
      const double tol = c.capacity > 10000 ? 3e-6 : 3e-5;
      const bool flash = uses_flash(p, c.capacity, dt, ckg.get(), cvg.get());
      std::vector<double> flash_tol;
      if (flash) flash_tol = flash_bound(p, q, ck, cv, dt, c.capacity);
      for (Backend* gpu : {gpu_.get(), scalar->get()}) {
        if (gpu != gpu_.get() && !flash) continue;  // the same kernels as above
        const bool bf16 = flash && gpu == gpu_.get();
        Buf o(*gpu, q.size() * 4);
        gpu->attention(qg.f(), KvLayer{ckg.get(), cvg.get(), c.capacity, dt}, p, o.f());
        const auto got = o.read();
        for (size_t i = 0; i < ref.size(); ++i)
          ASSERT_NEAR(got[i], ref[i], bf16 ? flash_tol[i] + tol : tol)
              << c.what << " (" << dtype_name(dt) << (bf16 ? ", tensor cores" : "") << ") i " << i;
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
// racecheck's slowdown; checked against the CPU as in AttentionMatchesCpu and
// MatmulMatchesCpuForEveryTypeAndTokenCount.
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
      std::vector<double> bound(q.size(), 0.0);  // as AttentionMatchesCpu
      if (uses_flash(p, c.capacity, dt, ckg.get(), cvg.get()))
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

TEST_F(CudaOps, GeluGateAndAddMatchCpu) {
  const int64_t n = 100003;
  const auto g = randn(n, 41, 3.0f), u = randn(n, 42);
  std::vector<float> ref(n), sum(n);
  cpu_->gelu_gate(g.data(), u.data(), n, ref.data());
  cpu_->add(g.data(), u.data(), n, sum.data());
  Buf gg(*gpu_, g), ug(*gpu_, u), og(*gpu_, static_cast<size_t>(n) * 4);
  gpu_->gelu_gate(gg.f(), ug.f(), n, og.f());
  const auto got = og.read();
  // tanhf is within 2 ulp of std::tanh and the cubic may be contracted into FMAs: the result
  // is within a few ulp of |gelu(g) u| <= |g u|.
  for (int64_t i = 0; i < n; ++i) ASSERT_NEAR(got[i], ref[i], 16 * kU * std::fabs(g[i] * u[i]) + 1e-30) << i;
  gpu_->add(gg.f(), ug.f(), n, gg.f());  // in place
  EXPECT_EQ(gg.read(), sum);             // one correctly rounded add: identical
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

struct SampleCase {
  const char* what;
  SamplingOptions o;
  bool exact;  // false: the softmax sum is the device's (another order): allow rare flips
};

TEST_F(CudaOps, SampleMatchesCpuSampler) {
  const int vocab = 262147;  // not a multiple of any block size
  auto opts = [](float t, int k, float p, float mp, float pen) {
    SamplingOptions o;
    o.temperature = t, o.top_k = k, o.top_p = p, o.min_p = mp, o.repeat_penalty = pen;
    return o;
  };
  const SampleCase cases[] = {
      {"greedy", opts(0, 0, 1, 0, 1), true},
      {"greedy with penalty", opts(0, 0, 1, 0, 1.3f), true},
      {"top-k 1", opts(0.8f, 1, 1, 0, 1), true},
      {"top-k 40, top-p 0.95, penalty", opts(0.8f, 40, 0.95f, 0, 1.1f), true},
      {"top-k 64, min-p 0.05", opts(1.0f, 64, 1, 0.05f, 1), true},
      {"top-k 1024 (all on the host)", opts(1.5f, 1024, 1, 0, 1), true},
      {"top-k 5000, top-p 0.9", opts(1.0f, 5000, 0.9f, 0, 1), false},
      {"no top-k, top-p 0.9", opts(1.0f, 0, 0.9f, 0, 1), false},
      {"no top-k, min-p 0.1", opts(0.7f, 0, 1, 0.1f, 1), false},
      {"plain temperature (full fallback)", opts(1.0f, 0, 1, 0, 1), false},
  };
  const std::vector<int32_t> banned = {0, 1, 3, 262146, 999999};  // one outside the vocab
  std::vector<int32_t> history;
  for (int i = 0; i < 100; ++i) history.push_back((i * 7919) % vocab);
  Buf lg(*gpu_, static_cast<size_t>(vocab) * 4);
  for (const SampleCase& c : cases) {
    std::mt19937_64 rg(1234), rc(1234);
    int same = 0;
    const int steps = emu_small() ? 4 : 40;
    for (int step = 0; step < steps; ++step) {
      // Peaked logits (a few strong ids, as a trained model's), with ties: values on a 1/8 grid.
      auto logits = randn(vocab, 500 + step, 2.0f);
      for (float& x : logits) x = std::round(x * 8) / 8;
      for (int j = 0; j < 20; ++j) logits[(step * 131 + j * 9973) % vocab] += 12.0f - j * 0.5f;
      logits[history[step % 100]] = 16.0f;  // a penalized id at the top
      gpu_->from_host(logits.data(), lg.get(), logits.size() * 4);
      const int32_t g = gpu_->sample(lg.f(), vocab, c.o, banned, history, rg);
      const int32_t e = cpu_->sample(logits.data(), vocab, c.o, banned, history, rc);
      same += g == e;
      if (c.exact) ASSERT_EQ(g, e) << c.what << " step " << step;
      ASSERT_TRUE(g >= 0 && g < vocab && std::find(banned.begin(), banned.end(), g) == banned.end())
          << c.what << ": banned or out-of-range id " << g;
    }
    // Inexact cases differ from the CPU only by the rounding of one double sum (1e-16
    // relative): a flip needs the draw or a cutoff within that of a boundary.
    EXPECT_GE(same, steps - 1) << c.what;
    EXPECT_EQ(rg(), rc()) << c.what << ": both took one value per step";
  }
}

// Non-finite logits, device against the host Sampler (which counts NaN as -inf on every path):
// NaN never wins the argmax nor sorts first in the radix sort (a NaN with the sign bit clear
// has the largest key bits of all), +inf logits share the probability, a NaN at a penalized id
// stays -inf, a row with nothing drawable gives 0 on both, and a tiny temperature (keys that
// overflow float) still matches. Every case has top_k <= 1024 or few candidates: exact.
TEST_F(CudaOps, SampleTreatsNanAsMinusInfinityLikeTheCpu) {
  const int vocab = 5003;
  const float nan = std::numeric_limits<float>::quiet_NaN(), inf = std::numeric_limits<float>::infinity();
  float neg_nan;  // sign bit set: sorts last as raw bits, but must still be -inf
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
    v[42] = nan;  // 42 is in the history: penalized NaN stays -inf
    rows.push_back({"NaN at a penalized id", v});
  }
  {
    std::vector<float> v(vocab, nan);
    v[7] = -inf;
    rows.push_back({"nothing drawable", v});
  }
  auto opts = [](float t, int k, float p, float mp, float pen) {
    SamplingOptions o;
    o.temperature = t, o.top_k = k, o.top_p = p, o.min_p = mp, o.repeat_penalty = pen;
    return o;
  };
  const SamplingOptions cases[] = {
      opts(0, 0, 1, 0, 1),           opts(0, 0, 1, 0, 1.3f),   opts(0.8f, 40, 0.95f, 0, 1.1f),
      opts(1.0f, 1024, 1, 0.05f, 1), opts(1e-38f, 0, 1, 0, 1), opts(nan, 0, 1, 0, 1)};
  const std::vector<int32_t> banned = {1, 5002};
  const std::vector<int32_t> history = {42, 300, 301, 3};
  Buf lg(*gpu_, static_cast<size_t>(vocab) * 4);
  for (const Row& row : rows) {
    gpu_->from_host(row.logits.data(), lg.get(), row.logits.size() * 4);
    for (const SamplingOptions& o : cases) {
      std::mt19937_64 rg(99), rc(99);
      for (int step = 0; step < (emu_small() ? 3 : 8); ++step) {
        const int32_t g = gpu_->sample(lg.f(), vocab, o, banned, history, rg);
        const int32_t c = cpu_->sample(row.logits.data(), vocab, o, banned, history, rc);
        ASSERT_EQ(g, c) << row.what << ", temperature " << o.temperature << " top_k " << o.top_k << " step "
                        << step;
        ASSERT_TRUE(g >= 0 && g < vocab) << row.what << ": id " << g;
        ASSERT_FALSE(std::isnan(row.logits[g]) && std::string(row.what) != "nothing drawable")
            << row.what << ": picked NaN id " << g;
      }
    }
  }
}

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
        ASSERT_EQ(
            check_matmul(want, x, rows, cols, n, gemm_in_bf16(DType::kF8E4M3, n), m.data(), ref.data(), what),
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
    Status s = forward(cfg, *w, be, cache, scratch, req, logits.data(), nullptr);
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
    for (DType kv : kKvTypes) {
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
      // AttentionMatchesCpu; through 8 layers it moves the largest logit's scale by 0.1-0.7%
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
      // way on both sides (KvWriteIsBitExact...), but a flip there moves one element by a
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
