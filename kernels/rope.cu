// Rotate-half rotary position embedding.
#include "common.cuh"

namespace gemma3::cuda {
namespace {

struct RopeParams {
  float* x;  // [n, n_heads, head_dim]
  int n, n_heads, head_dim, pos0;
  float inv_freq[kRopeMaxHalf];  // [head_dim / 2], from the host: the CPU reference's values
};

// For token t (position pos0 + t), head h, pair i < head_dim/2: rope_pair (common.cuh) on
// (x[i], x[i + half]). Preconditions: one thread per (t, h, i), any 1-D grid (grid-stride loop).
__global__ void rope_kernel(RopeParams p) {
  const int half = p.head_dim / 2;
  const int64_t total = int64_t{p.n} * p.n_heads * half;
  for (int64_t idx = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; idx < total;
       idx += int64_t{gridDim.x} * blockDim.x) {
    const int i = static_cast<int>(idx % half);
    const int64_t th = idx / half;  // t * n_heads + h
    const int t = static_cast<int>(th / p.n_heads);
    float* v = p.x + th * p.head_dim;
    rope_pair(v[i], v[i + half], p.pos0 + t, p.inv_freq[i]);
  }
}

}  // namespace

int launch_rope(float* x, int n, int n_heads, int head_dim, int pos0, const float* inv_freq_host,
                Stream stream) {
  if (n < 0 || n_heads < 0 || head_dim < 2 || head_dim % 2 != 0 || head_dim / 2 > kRopeMaxHalf)
    return static_cast<int>(cudaErrorInvalidValue);
  if (n == 0 || n_heads == 0) return 0;
  RopeParams p{};
  p.x = x;
  p.n = n;
  p.n_heads = n_heads;
  p.head_dim = head_dim;
  p.pos0 = pos0;
  for (int i = 0; i < head_dim / 2; ++i) p.inv_freq[i] = inv_freq_host[i];
  constexpr int kThreads = 256;
  GEMMA3_LAUNCH(rope_kernel, grid_for(int64_t{n} * n_heads * (head_dim / 2), kThreads), kThreads, 0,
                as_stream(stream), p);
  return launch_result();
}

}  // namespace gemma3::cuda
