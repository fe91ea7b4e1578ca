// Elementwise ops on fp32 activations: the GeGLU gate, the residual add, and the conversion of
// a GEMM's activations to bf16.
#include "common.cuh"

namespace gemma3::cuda {
namespace {

// out[i] = gelu_tanh(g[i]) * u[i] (common.cuh): gelu_pytorch_tanh applied to the gate
// projection (HF Gemma3MLP). Preconditions: any 1-D grid (grid-stride loop); out may alias g or u.
__global__ void gelu_gate_kernel(const float* g, const float* u, int64_t n, float* out) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n;
       i += int64_t{gridDim.x} * blockDim.x)
    out[i] = gelu_tanh(g[i]) * u[i];
}

// out[i] = a[i] + b[i]. Preconditions: any 1-D grid; out may alias a or b.
__global__ void add_kernel(const float* a, const float* b, int64_t n, float* out) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n;
       i += int64_t{gridDim.x} * blockDim.x)
    out[i] = a[i] + b[i];
}

// out[i] = bf16(x[i]) (round to nearest even). Preconditions: any 1-D grid.
__global__ void to_bf16_kernel(const float* x, int64_t n, uint16_t* out) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n;
       i += int64_t{gridDim.x} * blockDim.x)
    out[i] = blocks::float_to_bf16(x[i]);
}

}  // namespace

int launch_to_bf16(const float* x, int64_t n, uint16_t* out, Stream stream) {
  if (n < 0) return static_cast<int>(cudaErrorInvalidValue);
  if (n == 0) return 0;
  constexpr int kThreads = 256;
  GEMMA3_LAUNCH(to_bf16_kernel, grid_for(n, kThreads), kThreads, 0, as_stream(stream), x, n, out);
  return launch_result();
}

int launch_gelu_gate(const float* g, const float* u, int64_t n, float* out, Stream stream) {
  if (n < 0) return static_cast<int>(cudaErrorInvalidValue);
  if (n == 0) return 0;
  constexpr int kThreads = 256;
  GEMMA3_LAUNCH(gelu_gate_kernel, grid_for(n, kThreads), kThreads, 0, as_stream(stream), g, u, n, out);
  return launch_result();
}

int launch_add(const float* a, const float* b, int64_t n, float* out, Stream stream) {
  if (n < 0) return static_cast<int>(cudaErrorInvalidValue);
  if (n == 0) return 0;
  constexpr int kThreads = 256;
  GEMMA3_LAUNCH(add_kernel, grid_for(n, kThreads), kThreads, 0, as_stream(stream), a, b, n, out);
  return launch_result();
}

}  // namespace gemma3::cuda
