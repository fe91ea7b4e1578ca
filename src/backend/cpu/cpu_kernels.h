// Fast CPU kernels: the pieces the fast CPU backend (cpu_backend.cpp) calls, in one table per
// instruction set. Each table lives in its own translation unit compiled for its ISA with
// `#pragma GCC target`, so the library still runs on any x86-64 (and non-x86) CPU; the table is
// picked at run time from the CPU's features (select_kernels()).
//
// Activations are never quantized: every kernel computes in fp32 from fp32 activations, so the
// fast path equals the reference up to fp32 summation order, whatever the batch size.
//  * Decode (few tokens): dot[dtype] reads a weight row once, decoding each block into
//    registers, for up to kMaxTile tokens.
//  * Prefill (many tokens): dequant[dtype] turns kGemmPanel rows into fp32 once, and gemm_f32
//    multiplies them with every token in register tiles (an fp32 GEMM: weights reused from L2).
// The reference backend stays the oracle: tests/test_cpu_fast.cpp checks every kernel here
// against it.
#pragma once

#include <cstddef>
#include <cstdint>

#include "core/dtype.h"

namespace gemma3::cpu {

constexpr int kGemmPanel = 16;  // weight rows per gemm_f32 call
constexpr int kMaxTile = 4;     // tokens one dot call handles (weights decoded once for all)
constexpr int kNumDTypes = static_cast<int>(DType::kIQ4_XS) + 1;

// out[t] = dot(weight row w (k elements of the weight's dtype), activation row a[t] (k floats))
// for t < nt <= kMaxTile.
using DotFn = void (*)(int64_t k, const void* w, const void* const* a, int nt, float* out);

struct KernelSet {
  const char* name;  // "avx2", "portable"
  // Per weight dtype: the dot kernel, or null (the backend then dequantizes rows to fp32).
  DotFn dot[kNumDTypes];
  // Prefill GEMM: weight rows dequantized to fp32 once per matmul (amortized over the tokens),
  // then a register-tiled fp32 kernel; exact up to fp32 rounding (no activation quantization).
  // dequant[dtype]: dst[0 .. k) = one row of that dtype (as core/quant.h's dequantize_row, up to
  // fp32 rounding), or null: the backend uses the reference dequantizer.
  void (*dequant[kNumDTypes])(const void* w, int64_t k, float* dst);
  // out[t * ldo + r] = dot(w + r * ldw, x + t * ldx) over k elements, r < nr <= kGemmPanel,
  // t < nt. scratch: kGemmPanel * k floats (the kernel's packed copy of the rows).
  void (*gemm_f32)(const float* w, int64_t ldw, int nr, const float* x, int64_t ldx, int nt, int64_t k,
                   float* out, int64_t ldo, float* scratch);
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
