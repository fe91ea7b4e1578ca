// The portable kernel table: plain C++ that any compiler vectorizes as far as the baseline ISA
// allows. Quantized weights are dequantized a row at a time (with the reference dequantizer)
// into a per-thread buffer and multiplied in fp32, so this path is exact up to fp32 rounding.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "backend/cpu/cpu_kernels.h"
#include "core/quant.h"

namespace gemma3::cpu {
namespace {

float dot_f32(const float* a, const float* b, int64_t n) {
  float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int k = 0; k < 8; ++k) acc[k] += a[i + k] * b[i + k];
  float s = 0;
  for (; i < n; ++i) s += a[i] * b[i];
  return s + ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
}

void axpy_f32(float a, const float* x, float* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += a * x[i];
}

void bf16_row(const uint16_t* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = bf16_to_f32(src[i]);
}

void gelu_gate(const float* g, const float* u, int64_t n, float* out) {
  constexpr float kSqrt2OverPi = 0.7978845608028654f;
  for (int64_t i = 0; i < n; ++i) {
    const float x = g[i];
    out[i] = 0.5f * x * (1.0f + std::tanh(kSqrt2OverPi * (x + 0.044715f * x * x * x))) * u[i];
  }
}

float exp_sub_sum(float* x, int64_t n, float max) {
  float sum = 0;
  for (int64_t i = 0; i < n; ++i) sum += (x[i] = std::exp(x[i] - max));
  return sum;
}

// dot_f32 with element i always in lane i % 8, the tail included, so that zeros appended to
// both operands leave the bits of the result unchanged: the blocked attention's P V product
// relies on it for batch invariance (BackendOptions::batch_invariant).
float dot_lanes(const float* a, const float* b, int64_t n) {
  float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int k = 0; k < 8; ++k) acc[k] += a[i + k] * b[i + k];
  for (int k = 0; i + k < n; ++k) acc[k] += a[i + k] * b[i + k];
  return ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
}

// out[t * ldo + r] = dot(row r, token t): the plain loop of the prefill GEMM.
void gemm_f32(const float* w, int64_t ldw, int nr, const float* x, int64_t ldx, int nt, int64_t k, float* out,
              int64_t ldo, float* /*scratch*/) {
  for (int t = 0; t < nt; ++t)
    for (int r = 0; r < nr; ++r) out[t * ldo + r] = dot_lanes(w + r * ldw, x + t * ldx, k);
}

// Any weight dtype: dequantize the row once, then fp32 dots with each token's activations.
template <DType T>
void dot_dequant(int64_t k, const void* w, const void* const* a, int nt, float* out) {
  thread_local std::vector<float> row;
  if (static_cast<int64_t>(row.size()) < k) row.resize(k);
  if constexpr (T == DType::kF32) {
    for (int t = 0; t < nt; ++t)
      out[t] = dot_f32(static_cast<const float*>(w), static_cast<const float*>(a[t]), k);
    return;
  } else {
    dequantize_row(T, w, row.data(), k);
    for (int t = 0; t < nt; ++t) out[t] = dot_f32(row.data(), static_cast<const float*>(a[t]), k);
  }
}

KernelSet make_portable() {
  KernelSet k{};
  k.name = "portable";
  k.dot[static_cast<int>(DType::kF32)] = dot_dequant<DType::kF32>;
  k.dot[static_cast<int>(DType::kF16)] = dot_dequant<DType::kF16>;
  k.dot[static_cast<int>(DType::kBF16)] = dot_dequant<DType::kBF16>;
  k.dot[static_cast<int>(DType::kQ4_0)] = dot_dequant<DType::kQ4_0>;
  k.dot[static_cast<int>(DType::kQ4_1)] = dot_dequant<DType::kQ4_1>;
  k.dot[static_cast<int>(DType::kQ5_0)] = dot_dequant<DType::kQ5_0>;
  k.dot[static_cast<int>(DType::kQ5_1)] = dot_dequant<DType::kQ5_1>;
  k.dot[static_cast<int>(DType::kQ8_0)] = dot_dequant<DType::kQ8_0>;
  k.dot[static_cast<int>(DType::kQ2_K)] = dot_dequant<DType::kQ2_K>;
  k.dot[static_cast<int>(DType::kQ3_K)] = dot_dequant<DType::kQ3_K>;
  k.dot[static_cast<int>(DType::kQ4_K)] = dot_dequant<DType::kQ4_K>;
  k.dot[static_cast<int>(DType::kQ5_K)] = dot_dequant<DType::kQ5_K>;
  k.dot[static_cast<int>(DType::kQ6_K)] = dot_dequant<DType::kQ6_K>;
  k.dot[static_cast<int>(DType::kIQ4_NL)] = dot_dequant<DType::kIQ4_NL>;
  k.dot[static_cast<int>(DType::kIQ4_XS)] = dot_dequant<DType::kIQ4_XS>;
  // kF8E4M3 has a row scale the kernel does not see: left null, the backend handles it.
  k.gemm_f32 = gemm_f32;  // dequant[] stays null: the reference dequantizer
  k.dot_f32 = dot_f32;
  k.axpy_f32 = axpy_f32;
  k.bf16_to_f32 = bf16_row;
  k.gelu_gate = gelu_gate;
  k.exp_sub_sum = exp_sub_sum;
  return k;
}

}  // namespace

const KernelSet& portable_kernels() {
  static const KernelSet k = make_portable();
  return k;
}

bool cpu_has_avx2() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
#else
  return false;
#endif
}

bool cpu_has_avx512() {
#if defined(__x86_64__) || defined(__i386__)
  // __builtin_cpu_supports also checks that the OS saves the zmm state (XCR0).
  return cpu_has_avx2() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
#else
  return false;
#endif
}

const char* kernels_requirement(const char* name) {
  if (name && std::strcmp(name, "avx2") == 0) return "AVX2, FMA, F16C";
  if (name && std::strcmp(name, "avx512") == 0) return "AVX2, FMA, F16C, AVX-512 F/BW/VL, AVX512_VNNI";
  return "";
}

const KernelSet* select_kernels(const char* name) {
  const KernelSet* avx2 = cpu_has_avx2() ? avx2_kernels() : nullptr;
  const KernelSet* avx512 = cpu_has_avx512() ? avx512_kernels() : nullptr;
  if (name == nullptr || name[0] == '\0' || std::strcmp(name, "auto") == 0)
    return avx512 ? avx512 : avx2 ? avx2 : &portable_kernels();
  if (std::strcmp(name, "portable") == 0) return &portable_kernels();
  if (std::strcmp(name, "avx2") == 0) return avx2;
  if (std::strcmp(name, "avx512") == 0) return avx512;
  return nullptr;
}

}  // namespace gemma3::cpu
