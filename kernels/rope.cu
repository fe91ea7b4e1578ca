// Rotate-half rotary position embedding.
#include "common.cuh"

namespace gemma3::cuda {
namespace {

struct RopeParams {
  float* x;  // [n, n_heads, head_dim]
  int n, n_heads, head_dim, pos0;
  float inv_freq[kRopeMaxHalf];  // [head_dim / 2], from the host: the CPU reference's values
};

// For token t (position pos0 + t), head h, pair i < head_dim/2:
//   angle = float(pos) * inv_freq[i]   (fp32, as HF and the CPU reference compute it)
//   (x[i], x[i + half]) <- (x[i] c - x[i + half] s, x[i + half] c + x[i] s), c/s = cos/sin(angle)
// cos/sin are evaluated in double on the fp32 angle and rounded to float, exactly as the CPU
// reference does; never the fast __cosf/__sinf, whose error grows with |angle| (positions past
// 32K give angles ~1e5 rad, where the intrinsics are useless). Products are rounded separately
// (__fmul_rn), so the result matches the CPU bit for bit when libm's cos/sin agree.
// Preconditions: one thread per (t, h, i), any 1-D grid (grid-stride loop).
__global__ void rope_kernel(RopeParams p) {
  const int half = p.head_dim / 2;
  const int64_t total = int64_t{p.n} * p.n_heads * half;
  for (int64_t idx = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; idx < total;
       idx += int64_t{gridDim.x} * blockDim.x) {
    const int i = static_cast<int>(idx % half);
    const int64_t th = idx / half;  // t * n_heads + h
    const int t = static_cast<int>(th / p.n_heads);
    const float angle = __fmul_rn(static_cast<float>(p.pos0 + t), p.inv_freq[i]);
    const float c = static_cast<float>(cos(static_cast<double>(angle)));
    const float s = static_cast<float>(sin(static_cast<double>(angle)));
    float* v = p.x + th * p.head_dim;
    const float a = v[i], b = v[i + half];
    v[i] = __fsub_rn(__fmul_rn(a, c), __fmul_rn(b, s));
    v[i + half] = __fadd_rn(__fmul_rn(b, c), __fmul_rn(a, s));
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
