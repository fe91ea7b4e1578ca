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
  const float inv = rms_factor(block_sum(ss, scratch), dim, eps);
  for (int i = threadIdx.x; i < dim; i += blockDim.x) o[i] = __fmul_rn(__fmul_rn(xr[i], inv), w[i]);
}

// The residual step between blocks, one block per row r:
//   x[r, :] += rmsnorm(a[r, :], w_post);  then, with w_next, normed[r, :] = rmsnorm(x[r, :], w_next).
// Each step rounds as rmsnorm_kernel and the add kernel do in turn (same sums in the same order),
// so the result is bit for bit that of the three launches it replaces.
// Preconditions: blockDim.x = kNormThreads, gridDim.x = rows; w_next null: no normed output.
__global__ void __launch_bounds__(kNormThreads)
    add_rmsnorm_kernel(const float* a, const float* w_post, float* x, const float* w_next, int dim, float eps,
                       float* normed) {
  __shared__ float scratch[32];
  const int64_t base = int64_t{blockIdx.x} * dim;
  const float* ar = a + base;
  float* xr = x + base;
  float ss = 0;
  for (int i = threadIdx.x; i < dim; i += blockDim.x) ss += ar[i] * ar[i];
  const float inv = rms_factor(block_sum(ss, scratch), dim, eps);
  float ss_x = 0;
  for (int i = threadIdx.x; i < dim; i += blockDim.x) {
    const float y = __fadd_rn(xr[i], __fmul_rn(__fmul_rn(ar[i], inv), w_post[i]));
    xr[i] = y;
    ss_x += y * y;
  }
  if (!w_next) return;
  const float inv_x = rms_factor(block_sum(ss_x, scratch), dim, eps);
  float* o = normed + base;
  for (int i = threadIdx.x; i < dim; i += blockDim.x) o[i] = __fmul_rn(__fmul_rn(xr[i], inv_x), w_next[i]);
}

}  // namespace

int launch_add_rmsnorm(const float* a, const float* w_post, float* x, const float* w_next, int64_t rows,
                       int dim, float eps, float* normed, Stream stream) {
  if (rows < 0 || rows > 0x7FFFFFFF || dim < 1 || (w_next && !normed))
    return static_cast<int>(cudaErrorInvalidValue);
  if (rows == 0) return 0;
  GEMMA3_LAUNCH(add_rmsnorm_kernel, static_cast<unsigned>(rows), kNormThreads, 0, as_stream(stream), a,
                w_post, x, w_next, dim, eps, normed);
  return launch_result();
}

int launch_rmsnorm(const float* x, const float* w, int64_t rows, int dim, float eps, float* out,
                   Stream stream) {
  if (rows < 0 || rows > 0x7FFFFFFF || dim < 1) return static_cast<int>(cudaErrorInvalidValue);
  if (rows == 0) return 0;
  GEMMA3_LAUNCH(rmsnorm_kernel, static_cast<unsigned>(rows), kNormThreads, 0, as_stream(stream), x, w, dim,
                eps, out);
  return launch_result();
}

}  // namespace gemma3::cuda
