// KV-cache writes and attention over the cache (ring slots, sliding window, bidirectional
// groups, GQA; fp32, bf16, Q8_0 and fp8 caches dequantized on the fly, fp32 math).
//
// Attention runs one block per (query token, head, key split). Each block does an online
// softmax over its share of the visible keys, tile by tile. With one split (prefill, short
// contexts) it writes the output; with several (decode over long contexts: flash-decoding) it
// writes a partial (running max m, running sum l, unnormalized accumulator) and a second
// kernel combines the splits of each (token, head).
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

// Elementwise cache stores: cache[(pos0 + t) % capacity, c] = encode(src[t, c]) for t < n,
// c < kv_width, K and V. T: float (fp32), uint16_t (bf16 bits) or uint8_t (e4m3fn).
// Preconditions: any 1-D grid (grid-stride loop over n * kv_width).
template <class T>
__global__ void kv_write_kernel(const float* k, const float* v, int n, int pos0, int kv_width, T* ck, T* cv,
                                int capacity) {
  const int64_t total = int64_t{n} * kv_width;
  for (int64_t idx = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; idx < total;
       idx += int64_t{gridDim.x} * blockDim.x) {
    const int64_t t = idx / kv_width, c = idx % kv_width;
    const int64_t dst = ((pos0 + t) % capacity) * kv_width + c;
    if constexpr (sizeof(T) == 4) {
      ck[dst] = k[idx];
      cv[dst] = v[idx];
    } else if constexpr (sizeof(T) == 2) {
      ck[dst] = to_bf16(k[idx]);
      cv[dst] = to_bf16(v[idx]);
    } else {
      ck[dst] = blocks::float_to_e4m3(k[idx]);
      cv[dst] = blocks::float_to_e4m3(v[idx]);
    }
  }
}

// One Q8_0 block (32 values) per warp, lane e holding element e: amax by shuffles (max is
// exact, so the order does not matter), then the shared encoder (block_decode.h; NaN/inf
// count as 0). A slot holds kv_width / 32 blocks of 34 bytes: block b of token t goes to
// slot_base + 34 b. Preconditions: blockDim.x a multiple of 32, any 1-D grid (warp-stride loop
// over n * kv_width / 32 blocks; the loop bound is uniform across a warp), kv_width % 32 == 0.
__device__ __forceinline__ void q8_0_store(float x, int lane, uint8_t* blk) {
  float amax = blocks::q8_0_amax_term(x);
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xFFFFFFFFu, amax, o));
  const float d = blocks::q8_0_scale(amax);
  if (lane == 0) {
    const uint16_t h = blocks::float_to_half(d);
    blk[0] = static_cast<uint8_t>(h & 0xFF);
    blk[1] = static_cast<uint8_t>(h >> 8);
  }
  blk[2 + lane] = static_cast<uint8_t>(blocks::q8_0_quant(x, blocks::q8_0_inverse(d)));
}

__global__ void kv_write_q8_0_kernel(const float* k, const float* v, int n, int pos0, int kv_width,
                                     uint8_t* ck, uint8_t* cv, int capacity) {
  const int lane = threadIdx.x % 32;
  const int64_t per_slot = kv_width / 32, total = int64_t{n} * per_slot;
  const int64_t warps = int64_t{gridDim.x} * (blockDim.x / 32);
  for (int64_t b = (blockIdx.x * int64_t{blockDim.x} + threadIdx.x) / 32; b < total; b += warps) {
    const int64_t t = b / per_slot, blk = b % per_slot;
    const int64_t dst = (((pos0 + t) % capacity) * per_slot + blk) * blocks::Q8_0::kBytes;
    const int64_t src = t * kv_width + blk * 32 + lane;
    q8_0_store(k[src], lane, ck + dst);
    q8_0_store(v[src], lane, cv + dst);
  }
}

constexpr int kAttnThreads = 128;  // 4 warps
constexpr int kAttnWarps = kAttnThreads / 32;
constexpr int kAttnTile = kAttentionKeyTile;  // keys scored per step
constexpr int kAttnDimsPerThread = kAttentionMaxHeadDim / kAttnThreads;

// For each (token t, head h) = blockIdx.x and split s = blockIdx.y: online softmax of
// q[t, h, :] . K[j, g, :] * scale over the keys j of split s, lo + s * chunk <= j <
// min(hi + 1, lo + (s + 1) * chunk) ([lo, hi] = visible_keys(t)), key j in cache slot
// j % capacity, g = h / (n_heads / n_kv_heads), D the cache's block decoder. Running max m,
// running sum l, accumulator rescaled by exp(m_old - m_new), all fp32.
// splits == 1: out[t, h, :] = acc / l. Otherwise partials[(blockIdx.x * splits + s) * (hd + 2)
// + {0: m, 1: l, 2 + d: acc[d]}], m = -inf and l = 0 for an empty split.
// Preconditions: gridDim = (n_tokens * n_heads, splits), blockDim.x = kAttnThreads, dynamic
// shared memory head_dim floats, head_dim <= kAttentionMaxHeadDim, n_heads % n_kv_heads == 0,
// head_dim % D::kElems == 0.
template <class D>
__global__ void __launch_bounds__(kAttnThreads) attention_kernel(AttentionArgs a, int splits, int chunk) {
  GEMMA3_DYNAMIC_SHARED(float, q_s);  // [head_dim] this block's query
  __shared__ float p_s[kAttnTile];    // scores of the current key tile
  const int hd = a.head_dim;
  const int t = blockIdx.x / a.n_heads, h = blockIdx.x % a.n_heads;
  const int64_t gd = int64_t{h / (a.n_heads / a.n_kv_heads)} * hd;  // kv head's first element in a slot
  const int64_t q_width = int64_t{a.n_heads} * hd;
  const int64_t slot_bytes = int64_t{a.n_kv_heads} * hd / D::kElems * D::kBytes;
  int64_t lo, hi;
  visible_keys(a, t, &lo, &hi);
  const int64_t begin = lo + int64_t{blockIdx.y} * chunk;
  const int64_t end = hi + 1 < begin + chunk ? hi + 1 : begin + chunk;  // exclusive; <= begin: empty
  const uint8_t* kc = static_cast<const uint8_t*>(a.k);
  const uint8_t* vc = static_cast<const uint8_t*>(a.v);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;

  for (int d = threadIdx.x; d < hd; d += kAttnThreads) q_s[d] = a.q[t * q_width + int64_t{h} * hd + d];
  __syncthreads();

  float acc[kAttnDimsPerThread] = {};  // output dims threadIdx.x + kAttnThreads * c
  float m = -INFINITY, l = 0.0f;
  for (int64_t j0 = begin; j0 < end; j0 += kAttnTile) {  // bounds uniform over the block
    const int count = static_cast<int>(end - j0 < kAttnTile ? end - j0 : kAttnTile);
    for (int jj = warp; jj < count; jj += kAttnWarps) {  // one warp per key
      const uint8_t* key = kc + ((j0 + jj) % a.capacity) * slot_bytes;
      float s = 0;
      for (int d = lane; d < hd; d += 32) s += q_s[d] * blocks::row_value<D>(key, gd + d);
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
      const uint8_t* val = vc + ((j0 + jj) % a.capacity) * slot_bytes;
#pragma unroll
      for (int c = 0; c < kAttnDimsPerThread; ++c) {
        const int d = threadIdx.x + kAttnThreads * c;
        if (d < hd) acc[c] += p * blocks::row_value<D>(val, gd + d);
      }
    }
    m = m_new;
    __syncthreads();  // p_s is rewritten by the next tile
  }
  if (splits == 1) {
    float* o = a.out + t * q_width + int64_t{h} * hd;
#pragma unroll
    for (int c = 0; c < kAttnDimsPerThread; ++c) {
      const int d = threadIdx.x + kAttnThreads * c;
      if (d < hd) o[d] = acc[c] / l;  // l >= 1: the key at the running max contributes exp(0)
    }
    return;
  }
  float* part = a.partials + (int64_t{blockIdx.x} * splits + blockIdx.y) * (hd + 2);
  if (threadIdx.x == 0) {
    part[0] = m;
    part[1] = l;
  }
#pragma unroll
  for (int c = 0; c < kAttnDimsPerThread; ++c) {
    const int d = threadIdx.x + kAttnThreads * c;
    if (d < hd) part[2 + d] = acc[c];
  }
}

// out[t, h, :] = sum_s w_s acc_s / sum_s w_s l_s, w_s = exp(m_s - max_s m_s) (0 for an empty
// split, m_s = -inf; split 0 is never empty, so the max is finite).
// Preconditions: gridDim.x = n_tokens * n_heads, blockDim.x = kAttnThreads, dynamic shared
// memory `splits` floats, partials written by attention_kernel with the same splits.
__global__ void __launch_bounds__(kAttnThreads)
    attention_combine_kernel(const float* partials, int splits, int n_heads, int hd, float* out) {
  GEMMA3_DYNAMIC_SHARED(float, w_s);  // [splits] split weights
  const float* rows = partials + int64_t{blockIdx.x} * splits * (hd + 2);
  float mx = -INFINITY;
  for (int s = 0; s < splits; ++s) mx = fmaxf(mx, rows[int64_t{s} * (hd + 2)]);
  for (int s = threadIdx.x; s < splits; s += kAttnThreads) {
    const float ms = rows[int64_t{s} * (hd + 2)];
    w_s[s] = ms == -INFINITY ? 0.0f : expf(ms - mx);
  }
  __syncthreads();
  float l = 0;
  for (int s = 0; s < splits; ++s) l += w_s[s] * rows[int64_t{s} * (hd + 2) + 1];  // same order everywhere
  const int t = blockIdx.x / n_heads, h = blockIdx.x % n_heads;
  float* o = out + (int64_t{t} * n_heads + h) * hd;
  for (int d = threadIdx.x; d < hd; d += kAttnThreads) {
    float acc = 0;
    for (int s = 0; s < splits; ++s) acc += w_s[s] * rows[int64_t{s} * (hd + 2) + 2 + d];
    o[d] = acc / l;
  }
}

template <class F>
int dispatch_kv(DType t, F&& f) {
  switch (t) {
    case DType::kF32: return f(blocks::F32{});
    case DType::kBF16: return f(blocks::BF16{});
    case DType::kQ8_0: return f(blocks::Q8_0{});
    case DType::kF8E4M3: return f(blocks::F8E4M3{});
    default: return static_cast<int>(cudaErrorInvalidValue);
  }
}

}  // namespace

int launch_kv_write(const float* k, const float* v, int n, int pos0, int kv_width, void* cache_k,
                    void* cache_v, int capacity, DType kv_dtype, Stream stream) {
  if (n < 0 || pos0 < 0 || kv_width < 0 || capacity < 1) return static_cast<int>(cudaErrorInvalidValue);
  if (n == 0 || kv_width == 0) return 0;
  if (n > capacity) {
    // A chunk longer than the ring: only its last `capacity` tokens survive (the CPU's
    // sequential writes leave exactly those). Writing all of them would have two threads
    // store different tokens into one slot, in no defined order.
    const int skip = n - capacity;
    k += int64_t{skip} * kv_width;
    v += int64_t{skip} * kv_width;
    pos0 += skip;
    n = capacity;
  }
  constexpr int kThreads = 256;
  const unsigned grid = grid_for(int64_t{n} * kv_width, kThreads);
  const cudaStream_t s = as_stream(stream);
  switch (kv_dtype) {
    case DType::kF32:
      GEMMA3_LAUNCH(kv_write_kernel, grid, kThreads, 0, s, k, v, n, pos0, kv_width,
                    static_cast<float*>(cache_k), static_cast<float*>(cache_v), capacity);
      break;
    case DType::kBF16:
      GEMMA3_LAUNCH(kv_write_kernel, grid, kThreads, 0, s, k, v, n, pos0, kv_width,
                    static_cast<uint16_t*>(cache_k), static_cast<uint16_t*>(cache_v), capacity);
      break;
    case DType::kF8E4M3:
      GEMMA3_LAUNCH(kv_write_kernel, grid, kThreads, 0, s, k, v, n, pos0, kv_width,
                    static_cast<uint8_t*>(cache_k), static_cast<uint8_t*>(cache_v), capacity);
      break;
    case DType::kQ8_0:
      if (kv_width % 32 != 0) return static_cast<int>(cudaErrorInvalidValue);
      // One warp per block: n * kv_width / 32 warps = n * kv_width threads, as the grid above.
      GEMMA3_LAUNCH(kv_write_q8_0_kernel, grid, kThreads, 0, s, k, v, n, pos0, kv_width,
                    static_cast<uint8_t*>(cache_k), static_cast<uint8_t*>(cache_v), capacity);
      break;
    default: return static_cast<int>(cudaErrorInvalidValue);
  }
  return launch_result();
}

int launch_attention(const AttentionArgs& a, Stream stream) {
  if (bad_attention_args(a)) return static_cast<int>(cudaErrorInvalidValue);
  if (a.n_tokens == 0) return 0;
  const AttentionPlan p = attention_plan(a);
  // Every key this call reads must still be in the ring (AttentionPlan::span).
  if (p.span > a.capacity) return static_cast<int>(cudaErrorInvalidValue);
  if (p.splits > 1 && (!a.partials || a.partial_floats < p.workspace_floats))
    return static_cast<int>(cudaErrorInvalidValue);
  const dim3 grid(static_cast<unsigned>(a.n_tokens * a.n_heads), static_cast<unsigned>(p.splits));
  const size_t smem = static_cast<size_t>(a.head_dim) * sizeof(float);
  const cudaStream_t s = as_stream(stream);
  const int rc = dispatch_kv(a.kv_dtype, [&](auto d) {
    GEMMA3_LAUNCH(attention_kernel<decltype(d)>, grid, kAttnThreads, smem, s, a, p.splits, p.chunk);
    return launch_result();
  });
  if (rc != 0 || p.splits == 1) return rc;
  GEMMA3_LAUNCH(attention_combine_kernel, grid.x, kAttnThreads, static_cast<size_t>(p.splits) * sizeof(float),
                s, a.partials, p.splits, a.n_heads, a.head_dim, a.out);
  return launch_result();
}

}  // namespace gemma3::cuda
