// Device helpers shared by the kernel families: warp/block reductions, launch-error checks,
// and the one runtime DType -> decoder-type switch used by every weight-reading op.
#pragma once

#include <cuda_runtime.h>

#include "block_decode.h"
#include "launch.h"

// Every launch is GEMMA3_LAUNCH(kernel, grid, block, smem, stream, args...) and dynamic shared
// memory is GEMMA3_DYNAMIC_SHARED(T, name): under nvcc the plain CUDA syntax; under the CPU
// emulator (GEMMA3_CUDA_EMU; tools/cuda-emu/cuda_emu.h defines both) g++ compiles this code
// and each CUDA thread becomes a fiber. Code the emulator cannot run (tensor cores, async
// copies) needs a scalar path selected by GEMMA3_CUDA_EMU, tested against the same reference.
#if !defined(GEMMA3_CUDA_EMU)
#define GEMMA3_LAUNCH(kernel, grid, block, smem, stream, ...) \
  kernel<<<grid, block, smem, stream>>>(__VA_ARGS__)
#define GEMMA3_DYNAMIC_SHARED(T, name) extern __shared__ T name[]
#endif

namespace gemma3::cuda {

inline cudaStream_t as_stream(Stream s) { return static_cast<cudaStream_t>(s); }

// The error of the last launch, as the int every launcher returns.
inline int launch_result() { return static_cast<int>(cudaGetLastError()); }

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xFFFFFFFFu, v, o);
  return v;
}

// Sum over the block (blockDim.x a multiple of 32, <= 1024); every thread gets the result.
// `scratch` holds >= 32 floats of shared memory; the call ends with the block synchronized.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
  v = warp_sum(v);
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  float total = 0;
  for (int w = 0; w < warps; ++w) total += scratch[w];  // same order in every thread
  __syncthreads();
  return total;
}

// The RMSNorm factor 1 / sqrt(ss / dim + eps) with correctly rounded sqrt and divide, as the
// host's 1.0f / std::sqrt(...); an element is then (x * factor) * w, each product rounded.
__device__ __forceinline__ float rms_factor(float ss, int dim, float eps) {
  return __fdiv_rn(1.0f, __fsqrt_rn(__fadd_rn(__fdiv_rn(ss, static_cast<float>(dim)), eps)));
}

// Rotate-half RoPE of one pair (a, b) = (x[i], x[i + head_dim / 2]) at position pos:
//   angle = float(pos) * inv_freq (fp32, as HF and the CPU reference compute it);
//   (a, b) <- (a c - b s, b c + a s), c/s = cos/sin(angle).
// cos/sin are evaluated in double on the fp32 angle and rounded to float, exactly as the CPU
// reference does; never the fast __cosf/__sinf, whose error grows with |angle| (positions past
// 32K give angles ~1e5 rad, where the intrinsics are useless). Products are rounded separately
// (__fmul_rn), so the result matches the CPU bit for bit when libm's cos/sin agree.
__device__ __forceinline__ void rope_pair(float& a, float& b, int pos, float inv_freq) {
  const float angle = __fmul_rn(static_cast<float>(pos), inv_freq);
  const float c = static_cast<float>(cos(static_cast<double>(angle)));
  const float s = static_cast<float>(sin(static_cast<double>(angle)));
  const float a0 = a, b0 = b;
  a = __fsub_rn(__fmul_rn(a0, c), __fmul_rn(b0, s));
  b = __fadd_rn(__fmul_rn(b0, c), __fmul_rn(a0, s));
}

// gelu_pytorch_tanh: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), the CPU reference's
// expression with the precise tanhf (the GeGLU gate of Gemma3MLP, SigLIP's MLP).
__device__ __forceinline__ float gelu_tanh(float x) {
  constexpr float kSqrt2OverPi = 0.7978845608028654f;
  return 0.5f * x * (1.0f + tanhf(kSqrt2OverPi * (x + 0.044715f * x * x * x)));
}

// Max over the block, as block_sum (max is exact, so every order gives the same result).
__device__ __forceinline__ float block_max(float v, float* scratch) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xFFFFFFFFu, v, o));
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  float m = scratch[0];
  for (int w = 1; w < warps; ++w) m = fmaxf(m, scratch[w]);
  __syncthreads();
  return m;
}

// Calls f(Decoder{}) with the block decoder of t (block_decode.h); cudaErrorInvalidValue for a
// type without one (none today: every DType we load has a decoder). kUploaded: the decoder of
// a weight as the backend uploads it (Q4_0 and Q8_0 in block_decode.h's Planar layout).
template <bool kUploaded, class F>
int dispatch_decoder(DType t, F&& f) {
  if constexpr (kUploaded) {
    if (t == DType::kQ4_0) return f(blocks::Q4_0Planar{});
    if (t == DType::kQ8_0) return f(blocks::Q8_0Planar{});
  }
  switch (t) {
    case DType::kF32: return f(blocks::F32{});
    case DType::kF16: return f(blocks::F16{});
    case DType::kBF16: return f(blocks::BF16{});
    case DType::kF8E4M3: return f(blocks::F8E4M3{});
    case DType::kQ4_0:
      if constexpr (!kUploaded) return f(blocks::Q4_0{});
      break;
    case DType::kQ4_1: return f(blocks::Q4_1{});
    case DType::kQ5_0: return f(blocks::Q5_0{});
    case DType::kQ5_1: return f(blocks::Q5_1{});
    case DType::kQ8_0:
      if constexpr (!kUploaded) return f(blocks::Q8_0{});
      break;
    case DType::kQ2_K: return f(blocks::Q2_K{});
    case DType::kQ3_K: return f(blocks::Q3_K{});
    case DType::kQ4_K: return f(blocks::Q4_K{});
    case DType::kQ5_K: return f(blocks::Q5_K{});
    case DType::kQ6_K: return f(blocks::Q6_K{});
    case DType::kIQ4_NL: return f(blocks::IQ4_NL{});
    case DType::kIQ4_XS: return f(blocks::IQ4_XS{});
  }
  return static_cast<int>(cudaErrorInvalidValue);
}
// Raw ggml blocks of t (KV caches, host-side tests).
template <class F>
int dispatch_dtype(DType t, F&& f) {
  return dispatch_decoder<false>(t, static_cast<F&&>(f));
}
// A weight uploaded by the CUDA backend (WeightRef): what every weight-reading kernel uses.
template <class F>
int dispatch_weight(DType t, F&& f) {
  return dispatch_decoder<true>(t, static_cast<F&&>(f));
}

// Row scale of row r (fp8 weights), 1 for every other type.
__device__ __forceinline__ float row_scale_of(const WeightRef& w, int64_t r) {
  if (w.n_scales == 0) return 1.0f;
  return w.n_scales == 1 ? w.row_scale[0] : w.row_scale[r];
}

inline unsigned grid_for(int64_t n, int threads) {
  const int64_t blocks = (n + threads - 1) / threads;
  return static_cast<unsigned>(blocks < 65535 * 32 ? blocks
                                                   : 65535 * 32);  // grid-stride loops cover the rest
}

}  // namespace gemma3::cuda
