// Helpers for the tests of the Backend ops (backend.h): backend memory, random weights of every
// type, the CPU reference backend (the oracle), the attention case table and the per-backend
// error models that test_backend_ops.cpp and the backend-specific suites share.
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "../kernels/launch.h"  // cuda::kGemvMaxTokens, cuda::attention_plan (host code)
#include "backend/backend.h"
#include "backend/cpu/cpu_backend.h"
#include "core/dtype.h"
#include "core/quant.h"
#include "core/tensor.h"
#include "test_util.h"

namespace gemma3::testutil {

constexpr float kU = 5.9604645e-8f;  // 2^-24, fp32 unit roundoff

// GEMMA3_CUDA_EMU_SMALL=1 (scripts/test.sh cuda-emu): the CPU emulator (tools/cuda-emu) runs
// every CUDA thread as a fiber, so the CUDA suites skip or shrink their largest cases
// (docs/cuda.md). Unset or 0 on a GPU.
inline bool emu_small() {
  const char* s = std::getenv("GEMMA3_CUDA_EMU_SMALL");
  return s && *s && std::strcmp(s, "0") != 0;
}

// Every weight type (dtype.h), and every KV cache type (backend.h, KvLayer).
inline const std::vector<DType>& all_weight_types() {
  static const std::vector<DType> v = {DType::kF32,  DType::kF16,  DType::kBF16,   DType::kF8E4M3,
                                       DType::kQ4_0, DType::kQ4_1, DType::kQ5_0,   DType::kQ5_1,
                                       DType::kQ8_0, DType::kQ2_K, DType::kQ3_K,   DType::kQ4_K,
                                       DType::kQ5_K, DType::kQ6_K, DType::kIQ4_NL, DType::kIQ4_XS};
  return v;
}
inline const std::vector<DType>& kv_cache_types() {
  static const std::vector<DType> v = {DType::kF32, DType::kBF16, DType::kQ8_0, DType::kF8E4M3};
  return v;
}

inline std::vector<uint8_t> random_bytes(size_t n, uint32_t seed) {
  std::mt19937 g(seed);
  std::vector<uint8_t> v(n);
  for (auto& b : v) b = static_cast<uint8_t>(g());
  return v;
}

// a and b are the same float, NaNs of any payload counting as equal.
inline bool same_float(float a, float b) {
  if (std::isnan(a) && std::isnan(b)) return true;
  uint32_t ua, ub;
  std::memcpy(&ua, &a, 4);
  std::memcpy(&ub, &b, 4);
  return ua == ub;
}

// Distance in units in the last place between two finite floats (gtest's FLOAT_EQ allows 4).
inline int64_t ulp_distance(float a, float b) {
  auto key = [](float f) {
    int32_t i;
    std::memcpy(&i, &f, 4);
    return i < 0 ? int64_t{INT32_MIN} - i : int64_t{i};  // monotonic in f, -0 == +0
  };
  return std::llabs(key(a) - key(b));
}

// A [rows, cols] weight of type t: its bytes, row scales (F8E4M3), and the values dequantized by
// the reference (row scale applied). Plain float types hold uniform values in [-2, 2); F8E4M3
// random codes (no NaN) with random row scales; the block types random bytes, i.e. every bit
// pattern of the quants, with each block's fp16 scales (and mins) overwritten by small sane
// values so that the blocks are valid.
struct TestWeight {
  DType dtype;
  int64_t rows, cols;
  std::vector<uint8_t> bytes;
  std::vector<float> row_scale;
  std::vector<float> dense;  // [rows, cols]
  TensorView view;

  TestWeight(DType t, int64_t rows_, int64_t cols_, uint32_t seed) : dtype(t), rows(rows_), cols(cols_) {
    const uint64_t rb = *row_bytes(t, cols);
    bytes = random_bytes(rb * rows, seed);
    std::mt19937 g(seed + 1);
    std::uniform_real_distribution<float> scale(0.001f, 0.02f), val(-2.0f, 2.0f);
    auto put_f16 = [&](uint64_t off, float v) {
      const uint16_t h = f32_to_f16(v);
      std::memcpy(&bytes[off], &h, 2);
    };
    const DTypeInfo& info = dtype_info(t);
    if (t == DType::kF32 || t == DType::kF16 || t == DType::kBF16) {
      for (int64_t i = 0; i < rows * cols; ++i) {
        const float v = val(g);
        if (t == DType::kF32) std::memcpy(&bytes[i * 4], &v, 4);
        if (t == DType::kF16) put_f16(i * 2, v);
        if (t == DType::kBF16) {
          const uint16_t b = f32_to_bf16(v);
          std::memcpy(&bytes[i * 2], &b, 2);
        }
      }
    } else if (t == DType::kF8E4M3) {
      for (auto& b : bytes)
        if ((b & 0x7F) == 0x7F) b ^= 1;  // no NaN codes
      row_scale.resize(static_cast<size_t>(rows));
      for (float& s : row_scale) s = scale(g) * 10;
    } else {
      for (uint64_t blk = 0; blk < bytes.size() / info.block_bytes; ++blk) {
        const uint64_t o = blk * info.block_bytes;
        switch (t) {
          case DType::kQ4_K:
          case DType::kQ5_K:
            put_f16(o, scale(g));
            put_f16(o + 2, scale(g));
            break;
          case DType::kQ2_K:
            put_f16(o + 80, scale(g));
            put_f16(o + 82, scale(g));
            break;
          case DType::kQ3_K: put_f16(o + 108, scale(g)); break;
          case DType::kQ6_K: put_f16(o + 208, scale(g)); break;
          case DType::kQ4_1:
          case DType::kQ5_1:
            put_f16(o, scale(g) * 4);
            put_f16(o + 2, -scale(g) * 8);  // the block minimum
            break;
          default: put_f16(o, scale(g) * 4); break;  // Q4_0, Q5_0, Q8_0, IQ4_NL, IQ4_XS: d first
        }
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
  TestWeight(const TestWeight&) = delete;
  TestWeight& operator=(const TestWeight&) = delete;

  const uint8_t* row(int64_t r) const { return bytes.data() + r * (bytes.size() / rows); }
};

// Backend memory holding a copy of host data (or zeros), released with the backend.
class Buf {
 public:
  Buf(Backend& be, size_t bytes) : be_(be), bytes_(bytes) {
    auto r = be.allocate(std::max<size_t>(bytes, 1));
    EXPECT_TRUE(r.ok()) << r.status().to_string();
    p_ = r.ok() ? *r : nullptr;
  }
  template <class T>
  Buf(Backend& be, const std::vector<T>& v) : Buf(be, v.size() * sizeof(T)) {
    if (p_) be.from_host(v.data(), p_, bytes_);
  }
  Buf(const Buf&) = delete;
  Buf& operator=(const Buf&) = delete;
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

// The oracle: the CPU reference backend (plain loops), never the fast kernels make_cpu_backend
// may pick.
inline std::unique_ptr<Backend> cpu_reference_backend(int threads = 2) {
  auto be = make_cpu_ref_backend(threads);
  EXPECT_TRUE(be.ok()) << be.status().to_string();
  return be.ok() ? std::move(*be) : nullptr;
}

// Cache bytes of type dt holding `values` ([slots, kv_width]), encoded by the CPU code (not the
// encoders of a backend under test): quantize_row for F32/BF16/Q8_0, make_model's e4m3 for
// F8E4M3.
inline std::vector<uint8_t> encode_cache(DType dt, const std::vector<float>& values, int kv_width) {
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

// ---- attention cases -------------------------------------------------------------------------

struct AttentionCase {
  const char* what;
  int n_tokens, pos0, n_heads, n_kv_heads, hd, window, kv_start, capacity;
  int bidir_begin = 0, bidir_end = 0;
  bool all_types = true;  // false: a bf16 (and, head_dim 72, f32) cache only: the largest cases
  // Skipped on the CUDA emulator with GEMMA3_CUDA_EMU_SMALL: the 100K+ key cases and the fast
  // CPU attention's long prefill cases (every cache type; the emulated CUDA suites keep their
  // run time; a GPU and the CPU rows run them).
  bool large = false;
};

// Decode (1..8 tokens) and prefill, causal, sliding windows through rings that wrap, kv_start,
// bidirectional groups (an image; the vision tower's whole input), GQA 1..16, head dims 8..512
// (SigLIP's 72), the CUDA kernels' tiles, splits and row groups. Each case runs with every KV
// cache type that fits it (Q8_0: head_dim % 32 == 0).
inline const std::vector<AttentionCase>& attention_cases() {
  const int W = 8;
  static const std::vector<AttentionCase> cases = {
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
      {"head_dim 512 (the CUDA kernel's maximum)", 3, 5, 2, 1, 512, 0, 0, 8},
      // Split-KV decode (one block per (token, head, key chunk), then a combine pass): few
      // (token, head) rows and long visible ranges, at sizes that leave partial chunks/tiles.
      {"split: one token over 5000 keys", 1, 4999, 8, 4, 256, 0, 0, 5000},
      {"split: 3 tokens, 2 heads, ~1030 keys after kv_start", 3, 1800, 2, 1, 128, 0, 770, 1900},
      {"split: sliding ring, 1 token, window 1024", 1, 70001, 8, 2, 128, 1024, 0, 1024 + 15},
      {"split: bidir group at the end of a long range", 3, 3000, 4, 1, 128, 0, 0, 3003, 3000, 3003},
      {"split: one token over 100003 keys", 1, 100002, 2, 1, 128, 0, 0, 100003, 0, 0, false, true},
      {"split: one token at 128K, 8 heads (the most splits)", 1, 131071, 8, 1, 256, 0, 0, 131072, 0, 0, false,
       true},
      // Decode kernels (n_tokens <= 8; on CUDA one block per kv head, split and row group serving
      // every query head of the group and every token): GQA 1..16, head dims 72, 128, 256,
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
      {"decode at a long context, GQA 4, head_dim 256", 1, 1000, 4, 1, 256, 0, 0, 1100},
      {"decode, 2 tokens, GQA 4, head_dim 32", 2, 700, 8, 2, 32, 0, 0, 900},
      {"decode on a window ring of W + 7, head_dim 256", 1, 1300, 4, 1, 256, 512, 0, 512 + 7},
      {"8 tokens on a window ring of W + 7, head_dim 16", 8, 100, 4, 2, 16, 24, 0, 24 + 8 - 1},
      {"a sequence starting at 99700, head_dim 8", 3, 100030, 2, 1, 8, 0, 99700, 600},
      // Prefill: several query blocks and key chunks of the blocked CPU attention and of the
      // CUDA prefill kernels (the fp32 one: 9 tokens, past the decode kernel; the tensor-core one
      // past one tile of query rows: 64, 32 at head_dim 256), partial last tiles.
      {"prefill split: 9 tokens, 2 heads, 1500 keys", 9, 1491, 2, 1, 128, 0, 0, 1500},
      {"prefill chunk, GQA 4, causal", 37, 0, 4, 1, 64, 0, 0, 64, 0, 0, true, true},
      {"prefill, GQA 4, 3 query blocks, 2 key chunks", 150, 0, 4, 1, 64, 0, 0, 200, 0, 0, true, true},
      {"prefill on a ring that wraps, kv_start > 0", 300, 1030, 8, 2, 32, 0, 900, 700, 0, 0, true, true},
      {"prefill, sliding window ring of W + chunk - 1, mid-sequence", 70, 333, 4, 2, 32, 48, 0, 48 + 70 - 1,
       0, 0, true, true},
      {"prefill, an image group inside a smaller sliding window", 90, 40, 2, 1, 64, 16, 0, 16 + 90 - 1, 60,
       100, true, true},
      {"vision tower, 300 tokens, head_dim 72", 300, 0, 3, 3, 72, 0, 0, 300, 0, 300, false, true},
      {"vision tower, 17 tokens, head_dim 72", 17, 0, 2, 2, 72, 0, 0, 40, 0, 17, false},
      {"flash: 70 tokens, head_dim 64, 1100 keys (2 row tiles, splits)", 70, 1030, 2, 1, 64, 0, 0, 1100, 0, 0,
       false},
      {"flash: 40 tokens, head_dim 256, window ring", 40, 100, 4, 2, 256, W, 0, W + 40 - 1},
      {"flash: 75 tokens, GQA 2, head_dim 128, bidir group across the row tiles", 75, 0, 4, 2, 128, 0, 0, 75,
       50, 70, false},
  };
  return cases;
}

// Whether case c runs with cache type dt: all_types cases with every type (Q8_0 needs whole
// 32-blocks per head), the others with a bf16 cache (and f32, at head_dim 72).
inline bool attention_case_runs(const AttentionCase& c, DType dt) {
  if (dt == DType::kQ8_0 && c.hd % 32 != 0) return false;
  if (c.all_types) return true;
  return dt == DType::kBF16 || (c.hd == 72 && dt == DType::kF32);
}

inline AttentionParams attention_params(const AttentionCase& c) {
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
  return p;
}

// ---- the CUDA backend's arithmetic (docs/cuda.md) -------------------------------------------

// "Prefill GEMM": past kGemvMaxTokens tokens the CUDA matmul rounds both operands of a non-F32
// weight to bf16 (tensor cores) and sums their exact products in fp32.
inline bool cuda_gemm_in_bf16(DType t, int n) { return n > cuda::kGemvMaxTokens && t != DType::kF32; }

// The launcher's arguments for a backend attention call (no device buffers but k and v).
inline cuda::AttentionArgs cuda_attention_args(const AttentionParams& p, int capacity, DType dt,
                                               const void* k = nullptr, const void* v = nullptr) {
  cuda::AttentionArgs a;
  a.n_tokens = p.n_tokens, a.pos0 = p.pos0, a.n_heads = p.n_heads, a.n_kv_heads = p.n_kv_heads;
  a.head_dim = p.head_dim, a.window = p.window, a.kv_start = p.kv_start, a.capacity = capacity;
  a.bidir_begin = p.bidir_begin, a.bidir_end = p.bidir_end, a.kv_dtype = dt, a.k = k, a.v = v;
  return a;
}

// Whether the CUDA backend serves this call with the tensor-core prefill kernel.
inline bool cuda_uses_flash(const AttentionParams& p, int capacity, DType dt, const void* k, const void* v) {
  return cuda::attention_plan(cuda_attention_args(p, capacity, dt, k, v)).flash_dim > 0;
}

// The tensor-core prefill kernel (docs/cuda.md, "Tensor-core prefill attention") rounds q, K, V
// and the softmax weights to bf16; scores, sums and outputs stay fp32. Its distance from the
// exact result, per output (token t, head h, dim d): a score's operands are each off by at most
// 2^-8 relative (bf16's unit roundoff), so score j moves by at most delta_j = scale (2 * 2^-8 +
// 2^-16) sum_d |q_d k_jd|, the normalized weights by at most a factor e^(2 max delta) - 1, and
// rounding P and V adds 2^-8 each: |error| <= (e^(2 delta) - 1 + 2^-7 + 2^-16) sum_j p_j |v_jd| /
// sum_j p_j, computed here in double from the cache bytes over the keys backend.h's mask makes
// visible. A masking, slot or split bug moves outputs by O(0.1) instead.
inline std::vector<double> flash_bound(const AttentionParams& p, const std::vector<float>& q,
                                       const std::vector<uint8_t>& ck, const std::vector<uint8_t>& cv,
                                       DType dt, int capacity) {
  const int hd = p.head_dim, group = p.n_heads / p.n_kv_heads, kvw = p.n_kv_heads * hd;
  const size_t rb = ck.size() / capacity;
  std::vector<float> kd(static_cast<size_t>(capacity) * kvw), vd(kd.size());
  for (int s = 0; s < capacity; ++s) {
    dequantize_row(dt, ck.data() + s * rb, kd.data() + int64_t{s} * kvw, kvw);
    dequantize_row(dt, cv.data() + s * rb, vd.data() + int64_t{s} * kvw, kvw);
  }
  const double u2 = 2 * std::ldexp(1.0, -8) + std::ldexp(1.0, -16);
  std::vector<double> bound(q.size());
  for (int t = 0; t < p.n_tokens; ++t)
    for (int h = 0; h < p.n_heads; ++h) {
      const int64_t i = int64_t{p.pos0} + t;
      const int64_t lo = std::max<int64_t>(p.kv_start, p.window > 0 ? i - p.window + 1 : 0);
      const int64_t hi = attention_last_key(p, i);
      const float* qr = q.data() + (int64_t{t} * p.n_heads + h) * hd;
      const int64_t off = int64_t{h / group} * hd;
      std::vector<double> s, w;
      double m = -INFINITY, delta = 0;
      for (int64_t j = lo; j <= hi; ++j) {
        const float* kr = kd.data() + (j % capacity) * kvw + off;
        double dot = 0, mag = 0;
        for (int d = 0; d < hd; ++d) {
          const double x = double(qr[d]) * kr[d];
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
        for (int64_t j = lo; j <= hi; ++j) avg += w[j - lo] * std::fabs(vd[(j % capacity) * kvw + off + d]);
        bound[(int64_t{t} * p.n_heads + h) * hd + d] = (std::expm1(2 * delta) + u2) * avg / l;
      }
    }
  return bound;
}

// Checks the CUDA matmul's out [n, rows] of x [n, cols] against the CPU reference's ref,
// returning the number of bad values (the first 3 reported under `what`). Both sides sum fp32
// products of the same operands (the decoders agree bit for bit) in different orders. Rounding
// errors of a k-term sum grow like sqrt(k) * u * sum|w x| in practice (the worst case is k * u);
// 1e-4 * sum|w x| is >= 15 of those for k <= 2336, while an indexing bug (wrong row, token,
// tile or block) moves a result by ~sum|w x| / sqrt(k). For a bf16 GEMM (cuda_gemm_in_bf16) the
// operands differ: the result is checked in the same way against the exact sum over the
// bf16-rounded operands (round_bf16, double), and against the CPU's within the operand
// rounding's bound, (2 * 2^-8 + 2^-16) sum|w x| < 7.9e-3 sum|w x| (2^-8: bf16's unit
// roundoff), plus the same 1e-4.
inline int check_cuda_matmul(const std::vector<float>& dense, const std::vector<float>& x, int64_t rows,
                             int64_t cols, int n, bool bf16, const float* got, const float* ref,
                             const std::string& what) {
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
        ADD_FAILURE() << what << " n " << n << " [" << tk << "," << o << "]: got " << g << " cpu " << c
                      << (bf16 ? " exact over bf16 operands " + std::to_string(exact) : std::string())
                      << " (sum|wx| " << mag << ")";
    }
  return bad;
}

// ---- the fast CPU kernels' int8 decode (backend/cpu/cpu_kernels.h) --------------------------

// The int8 activation rounding of one dot, bounded. Block b of a token's row is stored as
// d_b q_i with d_b = max_b|x| / 127 and q_i = round(x_i / d_b), so x_i = d_b q_i + e_i with
// |e_i| <= d_b / 2. The kernel multiplies the weight quants' scaled values v_i = s q^w_i by
// d_b q_i (a format with a min, w_i = v_i - m_b, takes m_b * sum(x) from the exact fp32 sum), so
// |dot error| <= sum_b d_b / 2 * sum_{i in b} |v_i| = sum_b d_b / 2 * sum_{i in b} |w_i + m_b|.
// For random x this worst case is ~sqrt(32 k / 32) times the typical error; relative to
// sum |w x| it is ~1 / 254 (2^-8), the typical error ~2^-8 / sqrt(k): a real bug (wrong
// block, scale or sign) exceeds it. The 1.001 covers d_b and 1 / d_b rounding in fp32.
// m_b: the row dequantized with its quant bytes zeroed is -m_b at every element (Q4_K/Q5_K).
inline double q8_rounding_bound(DType t, const uint8_t* row, const float* w, const float* x, int64_t k) {
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

}  // namespace gemma3::testutil
