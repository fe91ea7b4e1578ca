// A CPU reference for the CUDA backend's arithmetic with bf16 prefill GEMMs (docs/cuda.md,
// "Prefill GEMM"): every op is the wrapped backend's (the CPU reference), except that a matmul
// of more than kGemvMaxTokens tokens on a weight that is not F32 multiplies the operands the GPU
// multiplies — the activations and the (dequantized, row-scaled) weight rounded to bf16 — with
// fp32 products and sums. A whole model on the GPU can then be held to the fp32 tolerances of
// summation order against it, instead of to a tolerance loose enough for bf16's rounding.
#pragma once

#include <memory>
#include <vector>

#include "../kernels/launch.h"  // cuda::kGemvMaxTokens
#include "backend/backend.h"
#include "core/dtype.h"
#include "core/quant.h"
#include "core/tensor.h"

namespace gemma3::testutil {

class Bf16GemmReference final : public Backend {
 public:
  explicit Bf16GemmReference(Backend& inner) : in_(inner) {}

  std::string name() const override { return in_.name() + " (bf16 GEMM operands)"; }
  Result<void*> allocate(size_t bytes) override { return in_.allocate(bytes); }
  void release(void* ptr) override { in_.release(ptr); }
  void to_host(const void* src, void* dst, size_t bytes) override { in_.to_host(src, dst, bytes); }
  void from_host(const void* src, void* dst, size_t bytes) override { in_.from_host(src, dst, bytes); }
  void copy(const void* src, void* dst, size_t bytes) override { in_.copy(src, dst, bytes); }

  // The stored weight, and for a matrix that is not F32 also its values rounded to bf16 (as an
  // F32 weight of the wrapped backend).
  struct Weight final : BackendWeight {
    std::unique_ptr<BackendWeight> stored, rounded;
    std::vector<float> rounded_values;  // the view of `rounded` (the CPU backend reads it in place)
  };

  Result<std::unique_ptr<BackendWeight>> upload(const TensorView& t) override {
    auto w = std::make_unique<Weight>();
    GEMMA3_ASSIGN_OR_RETURN(w->stored, in_.upload(t));
    w->rows = w->stored->rows, w->cols = w->stored->cols, w->dtype = w->stored->dtype;
    if (t.shape.size() == 2 && t.dtype != DType::kF32) {
      const int64_t rows = t.rows(), cols = t.cols();
      w->rounded_values.resize(static_cast<size_t>(rows * cols));
      for (int64_t r = 0; r < rows; ++r) {
        float* row = w->rounded_values.data() + r * cols;
        dequantize_row(t.dtype, t.row_ptr(r), row, cols);
        const float scale = t.row_scale.empty()       ? 1.0f
                            : t.row_scale.size() == 1 ? t.row_scale[0]
                                                      : t.row_scale[r];
        for (int64_t i = 0; i < cols; ++i) row[i] = round_bf16(row[i] * scale);
      }
      TensorView v{t.name, DType::kF32, t.shape, w->rounded_values.data(), w->rounded_values.size() * 4, {}};
      GEMMA3_ASSIGN_OR_RETURN(w->rounded, in_.upload(v));
    }
    return std::unique_ptr<BackendWeight>(std::move(w));
  }

  void embed(const BackendWeight& table, const int32_t* ids, int n, float scale, float* out) override {
    in_.embed(*stored(table), ids, n, scale, out);
  }
  void rmsnorm(const float* x, const BackendWeight& w, int64_t rows, int dim, float eps,
               float* out) override {
    in_.rmsnorm(x, *stored(w), rows, dim, eps, out);
  }
  void matmul(const float* x, int n, const BackendWeight& w, float* out) override {
    const auto& bw = static_cast<const Weight&>(w);
    if (n <= cuda::kGemvMaxTokens || !bw.rounded) return in_.matmul(x, n, *bw.stored, out);
    std::vector<float> x16(x, x + static_cast<size_t>(n) * bw.cols);
    for (float& v : x16) v = round_bf16(v);
    in_.matmul(x16.data(), n, *bw.rounded, out);
  }
  void rope(float* x, int n, int n_heads, int head_dim, int pos0, float theta, float scale) override {
    in_.rope(x, n, n_heads, head_dim, pos0, theta, scale);
  }
  void kv_write(const float* k, const float* v, int n, int pos0, int kv_width,
                const KvLayer& cache) override {
    in_.kv_write(k, v, n, pos0, kv_width, cache);
  }
  void attention(const float* q, const KvLayer& cache, const AttentionParams& p, float* out) override {
    in_.attention(q, cache, p, out);
  }
  void gelu_gate(const float* g, const float* u, int64_t n, float* out) override {
    in_.gelu_gate(g, u, n, out);
  }
  void add(const float* a, const float* b, int64_t n, float* out) override { in_.add(a, b, n, out); }
  void layernorm(const float* x, const BackendWeight& w, const BackendWeight& b, int64_t rows, int dim,
                 float eps, float* out) override {
    in_.layernorm(x, *stored(w), *stored(b), rows, dim, eps, out);
  }
  void add_bias(const float* x, const BackendWeight& b, int64_t rows, float* out) override {
    in_.add_bias(x, *stored(b), rows, out);
  }
  void gelu(const float* x, int64_t n, float* out) override { in_.gelu(x, n, out); }
  void avg_pool(const float* x, int side, int dim, int k, float* out) override {
    in_.avg_pool(x, side, dim, k, out);
  }

 private:
  static const BackendWeight* stored(const BackendWeight& w) {
    return static_cast<const Weight&>(w).stored.get();
  }

  Backend& in_;
};

}  // namespace gemma3::testutil
