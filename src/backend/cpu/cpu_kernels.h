// Fast CPU kernels: the pieces the fast CPU backend (cpu_backend.cpp) calls, in one table per
// instruction set. Each table lives in its own translation unit compiled for its ISA with
// `#pragma GCC target`, so the library still runs on any x86-64 (and non-x86) CPU; the table is
// picked at run time from the CPU's features (select_kernels()).
//
// Quantized weights are multiplied by activations quantized to int16 blocks of 32 (BlockQ16A):
// integer products within a block (madd_epi16), fp32 across blocks. int16 rather than
// llama.cpp's int8 activations: on AVX2 it costs the same instructions per block (two
// madd_epi16 instead of maddubs + madd) and its rounding error is 256x smaller, so the model
// still matches the fp32 transformers goldens (int8 activations move the 270M's logits by ~3%). Float
// weights (F32/F16/BF16) take fp32 activations. The reference backend stays the oracle:
// tests/test_cpu_fast.cpp checks every kernel here against it.
#pragma once

#include <cstddef>
#include <cstdint>

#include "core/dtype.h"

namespace gemma3::cpu {

// 32 activations quantized to int16 with one scale: x[i] ~= d * q[i], d = amax / 32767.
// s = d * sum(q) lets kernels of offset formats (Q4_K/Q5_K mins) fold the offset into one multiply.
struct BlockQ16A {
  float d;
  float s;
  int16_t q[32];
};
static_assert(sizeof(BlockQ16A) == 72, "BlockQ16A is 72 bytes");

constexpr int kMaxTile = 4;  // tokens one dot call handles (weights decoded once for all)
constexpr int kNumDTypes = static_cast<int>(DType::kIQ4_XS) + 1;

// out[t] = dot(weight row w (k elements of the weight's dtype), activation row a[t]) for
// t < nt <= kMaxTile. a[t] points at k/32 BlockQ16A for quantized weights, k floats for float ones.
using DotFn = void (*)(int64_t k, const void* w, const void* const* a, int nt, float* out);

struct KernelSet {
  const char* name;  // "avx2", "portable"
  // dst[0 .. k/32) = blocks of x[0 .. k); k % 32 == 0.
  void (*quantize_q16a)(const float* x, int64_t k, BlockQ16A* dst);
  // Per weight dtype: the dot kernel, or null (the backend then dequantizes rows to fp32).
  DotFn dot[kNumDTypes];
  // Whether dot[dtype] takes BlockQ16A activations (else fp32).
  bool q16_acts[kNumDTypes];
  // fp32 helpers used by attention and the elementwise ops.
  float (*dot_f32)(const float* a, const float* b, int64_t n);
  void (*axpy_f32)(float a, const float* x, float* y, int64_t n);            // y += a * x
  void (*bf16_to_f32)(const uint16_t* src, float* dst, int64_t n);           // widen a row
  void (*gelu_gate)(const float* g, const float* u, int64_t n, float* out);  // gelu_tanh(g) * u
  // x[i] = exp(x[i] - max), returns the sum (softmax numerator).
  float (*exp_sub_sum)(float* x, int64_t n, float max);
};

const KernelSet& portable_kernels();
// Null when the library was built without the ISA (non-x86 or a compiler that lacks it).
const KernelSet* avx2_kernels();

// What this CPU can run: "avx2" needs AVX2 + FMA + F16C.
bool cpu_has_avx2();

// The best table for this CPU, or the one named by `name` ("portable", "avx2") when it can
// run here; null if the name is unknown or unsupported.
const KernelSet* select_kernels(const char* name = nullptr);

}  // namespace gemma3::cpu
