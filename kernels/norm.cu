// RMSNorm over rows (the model's hidden rows, and q/k heads with dim = head_dim).
#include "common.cuh"

namespace gemma3::cuda {
namespace {

constexpr int kNormThreads = 256;

// out[r, i] = (x[r, i] * (1 / sqrt(sum_i x[r, i]^2 / dim + eps))) * w[i], one block per row r
// (matches the CPU reference and HF Gemma3RMSNorm in fp32; w already holds 1 + w_hf).
// Preconditions: blockDim.x = kNormThreads, gridDim.x = rows; out may equal x (each thread
// reads the elements it later writes, and the sum is complete before any write).
__global__ void __launch_bounds__(kNormThreads)
    rmsnorm_kernel(const float* x, const float* w, int dim, float eps, float* out) {
  __shared__ float scratch[32];
  const float* xr = x + int64_t{blockIdx.x} * dim;
  float* o = out + int64_t{blockIdx.x} * dim;
  float ss = 0;
  for (int i = threadIdx.x; i < dim; i += blockDim.x) ss += xr[i] * xr[i];
  ss = block_sum(ss, scratch);
  // Correctly rounded sqrt and divide, as the host's 1.0f / std::sqrt(...).
  const float inv = __fdiv_rn(1.0f, __fsqrt_rn(__fadd_rn(__fdiv_rn(ss, static_cast<float>(dim)), eps)));
  for (int i = threadIdx.x; i < dim; i += blockDim.x) o[i] = __fmul_rn(__fmul_rn(xr[i], inv), w[i]);
}

}  // namespace

int launch_rmsnorm(const float* x, const float* w, int64_t rows, int dim, float eps, float* out,
                   Stream stream) {
  if (rows < 0 || rows > 0x7FFFFFFF || dim < 1) return static_cast<int>(cudaErrorInvalidValue);
  if (rows == 0) return 0;
  GEMMA3_LAUNCH(rmsnorm_kernel, static_cast<unsigned>(rows), kNormThreads, 0, as_stream(stream), x, w, dim,
                eps, out);
  return launch_result();
}

}  // namespace gemma3::cuda
