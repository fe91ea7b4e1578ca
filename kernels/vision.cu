// The vision tower's own ops (SigLIP LayerNorm, bias, plain GELU) and the projector's average
// pool; everything else the tower runs (matmul, attention, kv_write, rmsnorm, add) is shared
// with the text model. Each matches the CPU reference in cpu_backend.cpp (HostBackend).
#include "common.cuh"
#include "vision.h"

namespace gemma3::cuda {
namespace {

constexpr int kThreads = 256;

// One block per row: mean, then the biased variance of (x - mean), both block sums (the
// reference sums sequentially; the results agree to fp32 rounding). With a residual `a`, first
// x += a (the residual step before the next LayerNorm; x is written then).
// Preconditions: blockDim.x = kThreads, gridDim.x = rows; out may equal x or a (each thread
// reads the elements it later writes, after both sums are complete); x is written only when a
// is given.
__global__ void __launch_bounds__(kThreads) layernorm_kernel(const float* a, float* x, const float* w,
                                                             const float* b, int dim, float eps, float* out) {
  __shared__ float scratch[32];
  float* xr = x + int64_t{blockIdx.x} * dim;
  float* o = out + int64_t{blockIdx.x} * dim;
  if (a) {
    const float* ar = a + int64_t{blockIdx.x} * dim;
    for (int i = threadIdx.x; i < dim; i += blockDim.x) xr[i] = xr[i] + ar[i];
  }
  float s = 0;
  for (int i = threadIdx.x; i < dim; i += blockDim.x) s += xr[i];
  const float mean = block_sum(s, scratch) / static_cast<float>(dim);
  float v = 0;
  for (int i = threadIdx.x; i < dim; i += blockDim.x) v += (xr[i] - mean) * (xr[i] - mean);
  const float var = block_sum(v, scratch) / static_cast<float>(dim);
  const float inv = __fdiv_rn(1.0f, __fsqrt_rn(var + eps));
  for (int i = threadIdx.x; i < dim; i += blockDim.x) o[i] = (xr[i] - mean) * inv * w[i] + b[i];
}

// out[r * dim + i] = x[r * dim + i] + b[i]. Preconditions: any 1-D grid; out may alias x.
__global__ void add_bias_kernel(const float* x, const float* b, int64_t n, int dim, float* out) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n;
       i += int64_t{gridDim.x} * blockDim.x)
    out[i] = x[i] + b[i % dim];
}

// out[i] = gelu_tanh(x[i]) (common.cuh; gelu_pytorch_tanh, SigLIP's MLP).
// Preconditions: any 1-D grid; out may alias x.
__global__ void gelu_kernel(const float* x, int64_t n, float* out) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n;
       i += int64_t{gridDim.x} * blockDim.x)
    out[i] = gelu_tanh(x[i]);
}

// One thread per output value (pooled row R * out_side + C, channel c): the k x k grid rows
// summed in the reference's order (dy, then dx), divided by k * k.
// Preconditions: any 1-D grid; out does not alias x.
__global__ void avg_pool_kernel(const float* x, int side, int dim, int k, float* out) {
  const int out_side = side / k;
  const int64_t n = int64_t{out_side} * out_side * dim;
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n;
       i += int64_t{gridDim.x} * blockDim.x) {
    const int c = static_cast<int>(i % dim);
    const int64_t cell = i / dim;
    const int R = static_cast<int>(cell / out_side), C = static_cast<int>(cell % out_side);
    float s = 0;
    for (int dy = 0; dy < k; ++dy)
      for (int dx = 0; dx < k; ++dx) s += x[(int64_t{R * k + dy} * side + (C * k + dx)) * dim + c];
    out[i] = s / static_cast<float>(k * k);
  }
}

}  // namespace

int launch_add_layernorm(const float* a, float* x, const float* w, const float* b, int64_t rows, int dim,
                         float eps, float* out, Stream stream) {
  if (rows < 0 || rows > 0x7FFFFFFF || dim < 1) return static_cast<int>(cudaErrorInvalidValue);
  if (rows == 0) return 0;
  GEMMA3_LAUNCH(layernorm_kernel, static_cast<unsigned>(rows), kThreads, 0, as_stream(stream), a, x, w, b,
                dim, eps, out);
  return launch_result();
}

int launch_layernorm(const float* x, const float* w, const float* b, int64_t rows, int dim, float eps,
                     float* out, Stream stream) {  // x is only read without a residual
  return launch_add_layernorm(nullptr, const_cast<float*>(x), w, b, rows, dim, eps, out, stream);
}

int launch_add_bias(const float* x, const float* b, int64_t rows, int dim, float* out, Stream stream) {
  if (rows < 0 || dim < 1) return static_cast<int>(cudaErrorInvalidValue);
  if (rows == 0) return 0;
  const int64_t n = rows * dim;
  GEMMA3_LAUNCH(add_bias_kernel, grid_for(n, kThreads), kThreads, 0, as_stream(stream), x, b, n, dim, out);
  return launch_result();
}

int launch_gelu(const float* x, int64_t n, float* out, Stream stream) {
  if (n < 0) return static_cast<int>(cudaErrorInvalidValue);
  if (n == 0) return 0;
  GEMMA3_LAUNCH(gelu_kernel, grid_for(n, kThreads), kThreads, 0, as_stream(stream), x, n, out);
  return launch_result();
}

int launch_avg_pool(const float* x, int side, int dim, int k, float* out, Stream stream) {
  if (side < 1 || dim < 1 || k < 1 || side % k != 0) return static_cast<int>(cudaErrorInvalidValue);
  const int64_t n = int64_t{side / k} * (side / k) * dim;
  GEMMA3_LAUNCH(avg_pool_kernel, grid_for(n, kThreads), kThreads, 0, as_stream(stream), x, side, dim, k, out);
  return launch_result();
}

}  // namespace gemma3::cuda
