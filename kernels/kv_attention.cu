// KV-cache writes and attention over the cache (ring slots, sliding window, GQA).
//
// Attention is one block per (query token, head) with an online softmax over the visible keys,
// tile by tile. It is the obviously-right version; a split-KV decode kernel (several blocks
// per head for long contexts at n_tokens = 1, combined by a second pass) is the next step.
#include "common.cuh"

namespace gemma3::cuda {
namespace {

// fp32 -> bf16 bits, round to nearest even; NaN stays NaN with the quiet bit set. Identical to
// f32_to_bf16 in src/core/dtype.cpp.
__device__ __forceinline__ uint16_t to_bf16(float f) {
  uint32_t u = __float_as_uint(f);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return static_cast<uint16_t>((u >> 16) | 0x40);
  u += 0x7FFFu + ((u >> 16) & 1);
  return static_cast<uint16_t>(u >> 16);
}

__device__ __forceinline__ float load_kv(const float* p, int64_t i) { return p[i]; }
__device__ __forceinline__ float load_kv(const uint16_t* p, int64_t i) {
  return __uint_as_float(static_cast<uint32_t>(p[i]) << 16);
}

// cache[(pos0 + t) % capacity, c] = src[t, c] for t < n, c < kv_width, for both K and V.
// Preconditions: any 1-D grid (grid-stride loop over n * kv_width).
template <class T>
__global__ void kv_write_kernel(const float* k, const float* v, int n, int pos0, int kv_width, T* ck, T* cv,
                                int capacity) {
  const int64_t total = int64_t{n} * kv_width;
  for (int64_t idx = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; idx < total;
       idx += int64_t{gridDim.x} * blockDim.x) {
    const int64_t t = idx / kv_width, c = idx % kv_width;
    const int64_t dst = ((pos0 + t) % capacity) * kv_width + c;
    if constexpr (sizeof(T) == 2) {
      ck[dst] = to_bf16(k[idx]);
      cv[dst] = to_bf16(v[idx]);
    } else {
      ck[dst] = k[idx];
      cv[dst] = v[idx];
    }
  }
}

constexpr int kAttnThreads = 128;  // 4 warps
constexpr int kAttnWarps = kAttnThreads / 32;
constexpr int kAttnTile = 32;  // keys scored per step
constexpr int kAttnDimsPerThread = kAttentionMaxHeadDim / kAttnThreads;

// out[t, h, :] = sum_j softmax_j(q[t, h, :] . K[j, g, :] * scale) V[j, g, :] over the keys j the
// query at position i = pos0 + t sees: max(kv_start, i - window + 1 if window else 0) <= j <= i,
// key j in cache slot j % capacity, g = h / (n_heads / n_kv_heads). Online softmax in fp32
// (running max m, running sum l, accumulator rescaled by exp(m_old - m_new)), one final divide.
// Preconditions: gridDim.x = n_tokens * n_heads, blockDim.x = kAttnThreads, dynamic shared
// memory head_dim floats, head_dim <= kAttentionMaxHeadDim, n_heads % n_kv_heads == 0.
template <class T>
__global__ void __launch_bounds__(kAttnThreads) attention_kernel(AttentionArgs a) {
  extern __shared__ float q_s[];    // [head_dim] this block's query
  __shared__ float p_s[kAttnTile];  // scores of the current key tile
  const int hd = a.head_dim;
  const int t = blockIdx.x / a.n_heads, h = blockIdx.x % a.n_heads;
  const int g = h / (a.n_heads / a.n_kv_heads);
  const int64_t q_width = int64_t{a.n_heads} * hd, kv_width = int64_t{a.n_kv_heads} * hd;
  const int64_t i = int64_t{a.pos0} + t;
  int64_t lo = a.window > 0 ? i - a.window + 1 : 0;
  if (lo < a.kv_start) lo = a.kv_start;
  const T* kc = static_cast<const T*>(a.k);
  const T* vc = static_cast<const T*>(a.v);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;

  for (int d = threadIdx.x; d < hd; d += kAttnThreads) q_s[d] = a.q[t * q_width + int64_t{h} * hd + d];
  __syncthreads();

  float acc[kAttnDimsPerThread] = {};  // output dims threadIdx.x + kAttnThreads * c
  float m = -INFINITY, l = 0.0f;
  for (int64_t j0 = lo; j0 <= i; j0 += kAttnTile) {
    const int count = static_cast<int>(i - j0 + 1 < kAttnTile ? i - j0 + 1 : kAttnTile);
    for (int jj = warp; jj < count; jj += kAttnWarps) {  // one warp per key
      const T* key = kc + ((j0 + jj) % a.capacity) * kv_width + int64_t{g} * hd;
      float s = 0;
      for (int d = lane; d < hd; d += 32) s += q_s[d] * load_kv(key, d);
      s = warp_sum(s);
      if (lane == 0) p_s[jj] = s * a.scale;
    }
    __syncthreads();
    float m_new = m;
    for (int jj = 0; jj < count; ++jj) m_new = fmaxf(m_new, p_s[jj]);
    const float alpha = expf(m - m_new);  // 0 on the first tile (m = -inf)
    l *= alpha;
#pragma unroll
    for (int c = 0; c < kAttnDimsPerThread; ++c) acc[c] *= alpha;
    for (int jj = 0; jj < count; ++jj) {
      const float p = expf(p_s[jj] - m_new);
      l += p;
      const T* val = vc + ((j0 + jj) % a.capacity) * kv_width + int64_t{g} * hd;
#pragma unroll
      for (int c = 0; c < kAttnDimsPerThread; ++c) {
        const int d = threadIdx.x + kAttnThreads * c;
        if (d < hd) acc[c] += p * load_kv(val, d);
      }
    }
    m = m_new;
    __syncthreads();  // p_s is rewritten by the next tile
  }
  float* o = a.out + t * q_width + int64_t{h} * hd;
#pragma unroll
  for (int c = 0; c < kAttnDimsPerThread; ++c) {
    const int d = threadIdx.x + kAttnThreads * c;
    if (d < hd) o[d] = acc[c] / l;  // l >= 1: the key at the running max contributes exp(0)
  }
}

}  // namespace

int launch_kv_write(const float* k, const float* v, int n, int pos0, int kv_width, void* cache_k,
                    void* cache_v, int capacity, bool kv_bf16, Stream stream) {
  if (n < 0 || pos0 < 0 || kv_width < 0 || capacity < 1) return static_cast<int>(cudaErrorInvalidValue);
  if (n == 0 || kv_width == 0) return 0;
  constexpr int kThreads = 256;
  const unsigned grid = grid_for(int64_t{n} * kv_width, kThreads);
  if (kv_bf16) {
    kv_write_kernel<<<grid, kThreads, 0, as_stream(stream)>>>(
        k, v, n, pos0, kv_width, static_cast<uint16_t*>(cache_k), static_cast<uint16_t*>(cache_v), capacity);
  } else {
    kv_write_kernel<<<grid, kThreads, 0, as_stream(stream)>>>(
        k, v, n, pos0, kv_width, static_cast<float*>(cache_k), static_cast<float*>(cache_v), capacity);
  }
  return launch_result();
}

int launch_attention(const AttentionArgs& a, Stream stream) {
  if (a.n_tokens < 0 || a.pos0 < 0 || a.n_heads < 1 || a.n_kv_heads < 1 || a.n_heads % a.n_kv_heads != 0 ||
      a.head_dim < 1 || a.head_dim > kAttentionMaxHeadDim || a.capacity < 1 || a.window < 0 ||
      a.kv_start < 0 || a.kv_start > a.pos0 || int64_t{a.n_tokens} * a.n_heads > 0x7FFFFFFF)
    return static_cast<int>(cudaErrorInvalidValue);
  if (a.n_tokens == 0) return 0;
  const unsigned grid = static_cast<unsigned>(a.n_tokens * a.n_heads);
  const size_t smem = static_cast<size_t>(a.head_dim) * sizeof(float);
  if (a.kv_bf16) {
    attention_kernel<uint16_t><<<grid, kAttnThreads, smem, as_stream(stream)>>>(a);
  } else {
    attention_kernel<float><<<grid, kAttnThreads, smem, as_stream(stream)>>>(a);
  }
  return launch_result();
}

}  // namespace gemma3::cuda
