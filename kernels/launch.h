// Host launchers of the CUDA kernels, declared without CUDA types so that the backend (and
// nothing else) can call them from plain C++. Pointers are device memory unless named *_host;
// `stream` is a cudaStream_t. Every launcher returns a cudaError_t as int (0 = success): the
// error of the launch itself or of an argument check done before it (cudaErrorInvalidValue).
// Kernel execution errors show up later, at the backend's next synchronization.
#pragma once

#include <cstddef>
#include <cstdint>

#include "core/dtype.h"

namespace gemma3::cuda {

using Stream = void*;  // cudaStream_t

// A weight matrix [rows, cols] in device memory: row r starts at data + r * row_bytes.
struct WeightRef {
  const void* data = nullptr;
  int64_t rows = 0;
  int64_t cols = 0;
  uint64_t row_bytes = 0;
  DType dtype = DType::kF32;
  const float* row_scale = nullptr;  // fp8 only: n_scales values (1: per tensor, rows: per row)
  int64_t n_scales = 0;
};

// ---- dequant.cu ----
// out[(r - row0) * cols + i] = W[r, i] (dequantized, row scale applied), row0 <= r < row0 + n_rows.
int launch_dequant_rows(const WeightRef& w, int64_t row0, int64_t n_rows, float* out, Stream stream);
// out[t, :] = W[ids[t], :] * scale for t < n; ids: device, [n], each in [0, rows).
int launch_embed(const WeightRef& w, const int32_t* ids, int n, float scale, float* out, Stream stream);

// ---- gemv.cu ----
constexpr int kGemvMaxTokens = 8;
// out[t, o] = sum_i x[t, i] * W[o, i], x [n, cols], out [n, rows], 1 <= n <= kGemvMaxTokens.
int launch_gemv(const WeightRef& w, const float* x, int n, float* out, Stream stream);

// ---- norm.cu ----
// out[r, :] = x[r, :] / sqrt(mean(x[r, :]^2) + eps) * w, w [dim] fp32; in place allowed.
int launch_rmsnorm(const float* x, const float* w, int64_t rows, int dim, float eps, float* out,
                   Stream stream);

// ---- rope.cu ----
constexpr int kRopeMaxHalf = 256;  // head_dim <= 512
// Rotate-half RoPE in place on x [n, n_heads, head_dim]; inv_freq_host [head_dim / 2] holds
// the per-pair frequencies (already divided by the linear scale), computed by the caller.
int launch_rope(float* x, int n, int n_heads, int head_dim, int pos0, const float* inv_freq_host,
                Stream stream);

// ---- kv_attention.cu ----
// Cache rows of positions pos0 .. pos0 + n - 1 (slot p % capacity) from k, v [n, kv_width];
// cache elements are fp32 (kv_bf16 false) or bf16 rounded to nearest even.
int launch_kv_write(const float* k, const float* v, int n, int pos0, int kv_width, void* cache_k,
                    void* cache_v, int capacity, bool kv_bf16, Stream stream);

struct AttentionArgs {
  const float* q = nullptr;  // [n_tokens, n_heads * head_dim]
  const void* k = nullptr;   // [capacity, n_kv_heads * head_dim], fp32 or bf16
  const void* v = nullptr;
  float* out = nullptr;  // [n_tokens, n_heads * head_dim]
  bool kv_bf16 = true;
  int capacity = 0;
  int n_tokens = 0, pos0 = 0;
  int n_heads = 0, n_kv_heads = 0, head_dim = 0;
  float scale = 0;
  int window = 0;    // 0: causal; W > 0: keys i - W < j <= i
  int kv_start = 0;  // keys j < kv_start do not exist
};
constexpr int kAttentionMaxHeadDim = 512;
int launch_attention(const AttentionArgs& a, Stream stream);

// ---- elementwise.cu ----
// out = gelu_tanh(g) * u over n values.
int launch_gelu_gate(const float* g, const float* u, int64_t n, float* out, Stream stream);
// out = a + b over n values.
int launch_add(const float* a, const float* b, int64_t n, float* out, Stream stream);

}  // namespace gemma3::cuda
