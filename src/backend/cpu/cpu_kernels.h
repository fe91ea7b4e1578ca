// Fast CPU kernels: the pieces the fast CPU backend (cpu_backend.cpp) calls, in one table per
// instruction set. Each table lives in its own translation unit compiled for its ISA with
// `#pragma GCC target`, so the library still runs on any x86-64 (and non-x86) CPU; the table is
// picked at run time from the CPU's features (select_kernels()).
//
//  * Decode (up to kQ8MaxTokens tokens: one sequence, or one token of each of many): where the
//    table has dot_q8[dtype], each token's activations are quantized once per matmul to int8
//    blocks of 32 (Q8Block) and the kernel multiplies int8 weights by int8 activations in
//    integer registers (llama.cpp's approach: ~4x fewer vector ops per weight than decoding to
//    fp32; relative rounding of a dot ~2^-8 / sqrt(k / 32)); from kQ8TileMinTokens tokens in
//    tiles of weight rows x tokens over staged weight blocks. Otherwise (below kGemmMinTokens)
//    dot[dtype] reads a weight row once, decoding each block into registers against fp32
//    activations, for up to kMaxTile tokens.
//    Decode and prefill therefore differ by the activation rounding (~1e-3 relative in logits),
//    as in llama.cpp.
//  * Prefill (more than kQ8MaxTokens tokens, or from kGemmMinTokens for dtypes without dot_q8,
//    or always under BackendOptions::batch_invariant): dequant[dtype] turns kGemmPanel rows into fp32 once,
//    and gemm_f32 multiplies them with every token in register tiles (an fp32 GEMM: weights reused from L2).
// The reference backend stays the oracle: tests/test_cpu_fast.cpp checks every kernel here
// against it.
#pragma once

#include <cstddef>
#include <cstdint>

#include "core/dtype.h"

namespace gemma3::cpu {

constexpr int kGemmPanel = 16;  // weight rows per gemm_f32 call
// From this many tokens on, matmul dequantizes weight panels and runs the fp32 GEMM (prefill);
// below, the dot kernels (decode), which decode each weight block once in registers.
constexpr int kGemmMinTokens = 16;
constexpr int kMaxTile = 4;  // tokens one dot call handles (weights decoded once for all)
// Up to this many tokens a matmul whose weight dtype has an int8 kernel (dot_q8) runs it with
// int8-quantized activations, also from kGemmMinTokens on (batched decode: one token per
// sequence); above, the fp32 GEMM (prefill chunks).
constexpr int kQ8MaxTokens = 64;
// From this many tokens on, dot_q8 walks row x token tiles over staged weight blocks
// (kernels_avx2.cpp); below, one row at a time for up to kMaxTile tokens (faster there: the
// staging is paid for by few tokens; at 5 the one-row kernel would decode each row twice).
constexpr int kQ8TileMinTokens = 5;
constexpr int kNumDTypes = static_cast<int>(DType::kIQ4_XS) + 1;

// out[t] = dot(weight row w (k elements of the weight's dtype), activation row a[t] (k floats))
// for t < nt <= kMaxTile.
using DotFn = void (*)(int64_t k, const void* w, const void* const* a, int nt, float* out);

// Decode activations quantized to int8 (llama.cpp's q8_0 plus a block sum): the 32 elements
// x[32 b .. 32 b + 32) of a row become q[i] with x ~= d * q[i], d = max|x| / 127, so
// |x - d q| <= d / 2 (round to nearest). `sum` is the fp32 sum of the block's 32 inputs, which
// the formats with a min (Q4_K, Q5_K: w = s q - m) need for m * sum(x).
struct Q8Block {
  float d;
  float sum;
  int8_t q[32];
};
// For nr consecutive weight rows (row r at w + r * row_bytes, k elements) and nt tokens (any
// count): out[t * ldo + r] = dot(row r, activation row a[t] (k / 32 blocks)). One call per
// range of rows, so the per-row cost is the kernel's loop, not a call and a dispatch.
using DotQ8Fn = void (*)(int64_t k, const void* w, int64_t row_bytes, int nr, const Q8Block* const* a, int nt,
                         float* out, int64_t ldo);

struct KernelSet {
  const char* name;  // "avx512", "avx2", "portable"
  // Per weight dtype: the dot kernel, or null (the backend then dequantizes rows to fp32).
  DotFn dot[kNumDTypes];
  // Decode with int8 activations: per weight dtype an int8 x int8 dot kernel (products summed
  // exactly in int32 per block, then scaled in fp32), or null (the backend then uses dot[]).
  // quantize_q8 turns a row of k floats (k % 32 == 0) into k / 32 blocks.
  DotQ8Fn dot_q8[kNumDTypes];
  void (*quantize_q8)(const float* x, int64_t k, Q8Block* out);
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
// The same source as avx2_kernels() compiled for AVX-512 + VNNI (kernels_avx512.cpp): the
// int8 decode kernels use vpdpbusd (ymm registers), the row x token tiles 4 tokens.
const KernelSet* avx512_kernels();

// What this CPU can run: "avx2" needs AVX2 + FMA + F16C; "avx512" that and AVX-512 F, BW, VL
// and AVX512_VNNI.
bool cpu_has_avx2();
bool cpu_has_avx512();
// The features the named table needs, for messages ("AVX2, FMA, F16C"); "" for "portable" or
// an unknown name.
const char* kernels_requirement(const char* name);

// The best table for this CPU, or the one named by `name` ("portable", "avx2", "avx512") when
// it can run here; null if the name is unknown or unsupported.
const KernelSet* select_kernels(const char* name = nullptr);

}  // namespace gemma3::cpu
