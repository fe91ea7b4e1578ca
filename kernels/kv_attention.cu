// KV-cache writes and attention over the cache (ring slots, sliding window, bidirectional
// groups, GQA; fp32, bf16, Q8_0 and fp8 caches dequantized on the fly, fp32 math).
//
// Attention has two kernels, chosen by attention_plan (launch.h) from the call's shape. Both do
// an online softmax (fp32) over their share of the visible keys, 32 keys per tile; with one
// split they write the output, with several (flash-decoding) a partial (running max m, running
// sum l, unnormalized accumulator) per (token, head) and split, which a combine kernel reduces.
//   prefill (n_tokens > 8): one block per (query token, head, key split).
//   decode (n_tokens <= 8): one block per (kv head, key split, row group) serving every query
//     head of the kv head's GQA group and every token of the call, so K/V bytes are read once
//     per group instead of once per query head (docs/cuda.md).
#include <algorithm>
#include <type_traits>

#include "common.cuh"

namespace gemma3::cuda {
namespace {

// A cache element of type T from an fp32 value: float (fp32), uint16_t (bf16 bits, round to
// nearest even) or uint8_t (e4m3fn, saturating).
template <class T>
__device__ __forceinline__ T encode_kv(float x) {
  if constexpr (sizeof(T) == 4) {
    return x;
  } else if constexpr (sizeof(T) == 2) {
    return blocks::float_to_bf16(x);
  } else {
    return blocks::float_to_e4m3(x);
  }
}

// Elementwise cache stores: cache[(pos0 + t) % capacity, c] = encode_kv(src[t, c]) for t < n,
// c < kv_width, K and V. Preconditions: any 1-D grid (grid-stride loop over n * kv_width).
template <class T>
__global__ void kv_write_kernel(const float* k, const float* v, int n, int pos0, int kv_width, T* ck, T* cv,
                                int capacity) {
  const int64_t total = int64_t{n} * kv_width;
  for (int64_t idx = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; idx < total;
       idx += int64_t{gridDim.x} * blockDim.x) {
    const int64_t t = idx / kv_width, c = idx % kv_width;
    const int64_t dst = ((pos0 + t) % capacity) * kv_width + c;
    ck[dst] = encode_kv<T>(k[idx]);
    cv[dst] = encode_kv<T>(v[idx]);
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

// QK-norm, RoPE and the cache write of one layer, one block per (token t, head row): rows
// 0..n_heads-1 are q's heads, the rest k's. Each row is normalized and rotated in place exactly
// as rmsnorm_kernel (norm.cu, the same block size, so the same sums) and rope_kernel do it in
// turn; a k row then goes to its ring slot with the head's v row, encoded as kv_write does. So
// the result is bit for bit that of the five launches it replaces. T: a cache element type of
// encode_kv, or blocks::Q8_0 (one warp per 32-value block; head_dim % 32 == 0).
// Preconditions: blockDim.x = kPrepThreads, gridDim.x = n * (n_heads + n_kv_heads).
constexpr int kPrepThreads = 256;  // norm.cu's kNormThreads

struct PrepParams {
  QkPrepArgs a;
  int first_cached;  // tokens before it are overwritten within this call (n > capacity)
  float inv_freq[kRopeMaxHalf];
};

template <class T>
__global__ void __launch_bounds__(kPrepThreads) qk_prep_kernel(PrepParams p) {
  __shared__ float scratch[32];
  const QkPrepArgs& a = p.a;
  const int rows = a.n_heads + a.n_kv_heads, hd = a.head_dim, half = hd / 2;
  const int t = static_cast<int>(blockIdx.x / rows), r = static_cast<int>(blockIdx.x % rows);
  const bool is_q = r < a.n_heads;
  const int h = is_q ? r : r - a.n_heads;
  float* x = is_q ? a.q + (int64_t{t} * a.n_heads + h) * hd : a.k + (int64_t{t} * a.n_kv_heads + h) * hd;
  const float* w = is_q ? a.q_norm : a.k_norm;
  float ss = 0;
  for (int i = threadIdx.x; i < hd; i += blockDim.x) ss += x[i] * x[i];
  const float inv = rms_factor(block_sum(ss, scratch), hd, a.eps);
  const int pos = (a.pos_dev ? *a.pos_dev : a.pos0) + t;
  for (int i = threadIdx.x; i < half; i += blockDim.x) {
    float lo = __fmul_rn(__fmul_rn(x[i], inv), w[i]),
          hi = __fmul_rn(__fmul_rn(x[i + half], inv), w[i + half]);
    rope_pair(lo, hi, pos, p.inv_freq[i]);
    x[i] = lo;
    x[i + half] = hi;
  }
  if (is_q || t < p.first_cached) return;  // uniform across the block
  __syncthreads();  // the k row is complete (global writes are visible within the block)
  const int kv_width = a.n_kv_heads * hd;
  const int64_t at = int64_t{pos % a.capacity} * kv_width + int64_t{h} * hd;  // element offset
  const float* vr = a.v + (int64_t{t} * a.n_kv_heads + h) * hd;
  if constexpr (std::is_same_v<T, blocks::Q8_0>) {
    const int lane = threadIdx.x % 32;
    auto* ck = static_cast<uint8_t*>(a.cache_k) + at / 32 * blocks::Q8_0::kBytes;
    auto* cv = static_cast<uint8_t*>(a.cache_v) + at / 32 * blocks::Q8_0::kBytes;
    for (int b = threadIdx.x / 32; b < hd / 32; b += blockDim.x / 32) {  // uniform per warp
      q8_0_store(x[b * 32 + lane], lane, ck + b * blocks::Q8_0::kBytes);
      q8_0_store(vr[b * 32 + lane], lane, cv + b * blocks::Q8_0::kBytes);
    }
  } else {
    T* ck = static_cast<T*>(a.cache_k) + at;
    T* cv = static_cast<T*>(a.cache_v) + at;
    for (int i = threadIdx.x; i < hd; i += blockDim.x) {
      ck[i] = encode_kv<T>(x[i]);
      cv[i] = encode_kv<T>(vr[i]);
    }
  }
}

constexpr int kAttnThreads = 128;  // prefill kernel: 4 warps
constexpr int kAttnWarps = kAttnThreads / 32;
constexpr int kAttnTile = kAttentionKeyTile;  // keys scored per step
constexpr int kAttnDimsPerThread = kAttentionMaxHeadDim / kAttnThreads;
static_assert(kAttnTile == 32, "the softmax step gives lane jj key jj of a tile");

// ---- pieces shared by the prefill and decode kernels -----------------------------------------

// Ring slot of key j0 + jj, given first = j0 % capacity (one division per tile, not per key;
// jj < kAttnTile <= ... any jj < capacity).
__device__ __forceinline__ int64_t ring_slot(int64_t first, int jj, int capacity) {
  const int64_t s = first + jj;
  return s >= capacity ? s - capacity : s;
}

// Online softmax: the factor that rescales (l, acc) from the running max m_old to m_new, and the
// weight of a score s under m_new. m = -inf means "no key yet": the factor is 0 (l and acc are
// 0 anyway) and, while m_new is still -inf (every key so far masked), weights are 0 rather than
// exp(-inf - -inf) = NaN.
__device__ __forceinline__ float softmax_rescale(float m_old, float m_new) {
  return m_old == -INFINITY ? 0.0f : expf(m_old - m_new);
}
__device__ __forceinline__ float softmax_weight(float s, float m_new) {
  return m_new == -INFINITY ? 0.0f : expf(s - m_new);
}

// Partial of (token t, head h), split s: (m, l, acc[hd]) at partials[((t * n_heads + h) * splits
// + s) * (hd + 2)], m = -inf and l = 0 for a split without visible keys.
__device__ __forceinline__ float* partial_row(const AttentionArgs& a, int64_t t, int h, int splits, int s) {
  return a.partials + ((t * a.n_heads + h) * splits + s) * (a.head_dim + 2);
}

// KvChunk<D>::load(row, e0, out): out[0 .. kE) = row elements e0 .. e0 + kE - 1, with the values
// of blocks::row_value<D> (the same decoders' arithmetic), loaded in one 16-byte (fp32, bf16)
// or 8-byte (fp8) access; Q8_0 reads its block's half scale and 8 quants. e0 % kE == 0, row
// 16-byte aligned (decode plan: head_dim % kE == 0 and 16-byte aligned caches).
struct alignas(16) Bytes16 {
  uint32_t w[4];
};
struct alignas(8) Bytes8 {
  uint32_t w[2];
};
template <class D>
struct KvChunk;
template <>
struct KvChunk<blocks::F32> {
  static constexpr int kE = 4;
  __device__ __forceinline__ static void load(const uint8_t* row, int e0, float* out) {
    const Bytes16 b = *reinterpret_cast<const Bytes16*>(row + int64_t{e0} * 4);
#pragma unroll
    for (int i = 0; i < 4; ++i) out[i] = __uint_as_float(b.w[i]);
  }
};
template <>
struct KvChunk<blocks::BF16> {
  static constexpr int kE = 8;
  __device__ __forceinline__ static void load(const uint8_t* row, int e0, float* out) {
    const Bytes16 b = *reinterpret_cast<const Bytes16*>(row + int64_t{e0} * 2);
#pragma unroll
    for (int i = 0; i < 4; ++i) {  // little endian: element 2i in the low half
      out[2 * i] = __uint_as_float(b.w[i] << 16);
      out[2 * i + 1] = __uint_as_float(b.w[i] & 0xFFFF0000u);
    }
  }
};
template <>
struct KvChunk<blocks::F8E4M3> {
  static constexpr int kE = 8;
  __device__ __forceinline__ static void load(const uint8_t* row, int e0, float* out) {
    const Bytes8 b = *reinterpret_cast<const Bytes8*>(row + e0);
#pragma unroll
    for (int i = 0; i < 8; ++i) out[i] = blocks::e4m3_to_float((b.w[i / 4] >> (8 * (i % 4))) & 0xFF);
  }
};
template <>
struct KvChunk<blocks::Q8_0> {
  static constexpr int kE = 8;
  __device__ __forceinline__ static void load(const uint8_t* row, int e0, float* out) {
    const uint8_t* blk = row + int64_t{e0 / 32} * blocks::Q8_0::kBytes;
    const float d = blocks::ld_half(blk);
    const uint8_t* qs = blk + 2 + e0 % 32;  // 2-byte aligned
#pragma unroll
    for (int i = 0; i < 8; i += 2) {
      const uint32_t two = blocks::ld16(qs + i);
      out[i] = blocks::mul(static_cast<float>(static_cast<int8_t>(two & 0xFF)), d);
      out[i + 1] = blocks::mul(static_cast<float>(static_cast<int8_t>(two >> 8)), d);
    }
  }
};

// Sum over aligned groups of `width` lanes (a power of two <= 32); every lane of the warp calls
// it, each gets its group's sum.
__device__ __forceinline__ float group_sum(float v, int width) {
  for (int o = width / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xFFFFFFFFu, v, o);
  return v;
}
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xFFFFFFFFu, v, o));
  return v;
}
__host__ __device__ constexpr int pow2_at_least(int n) {
  int p = 1;
  while (p < n) p *= 2;
  return p;
}

// ---- prefill kernel --------------------------------------------------------------------------

// For each (token t, head h) = blockIdx.x and split s = blockIdx.y: online softmax of
// q[t, h, :] . K[j, g, :] * scale over the keys j of split s, lo + s * chunk <= j <
// min(hi + 1, lo + (s + 1) * chunk) ([lo, hi] = visible_keys(t)), key j in cache slot
// j % capacity, g = h / (n_heads / n_kv_heads), D the cache's block decoder. Running max m,
// running sum l, accumulator rescaled by exp(m_old - m_new), all fp32.
// splits == 1: out[t, h, :] = acc / l. Otherwise the partial (partial_row).
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
  if (a.pos_dev) {  // a recorded step: its position, and the splits recut for it
    a.pos0 = *a.pos_dev;
    chunk = step_chunk(a, splits, false);
  }
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
    const int64_t first = j0 % a.capacity;
    for (int jj = warp; jj < count; jj += kAttnWarps) {  // one warp per key
      const uint8_t* key = kc + ring_slot(first, jj, a.capacity) * slot_bytes;
      float s = 0;
      for (int d = lane; d < hd; d += 32) s += q_s[d] * blocks::row_value<D>(key, gd + d);
      s = warp_sum(s);
      if (lane == 0) p_s[jj] = s * a.scale;
    }
    __syncthreads();
    float m_new = m;
    for (int jj = 0; jj < count; ++jj) m_new = fmaxf(m_new, p_s[jj]);
    const float alpha = softmax_rescale(m, m_new);
    l *= alpha;
#pragma unroll
    for (int c = 0; c < kAttnDimsPerThread; ++c) acc[c] *= alpha;
    for (int jj = 0; jj < count; ++jj) {
      const float p = softmax_weight(p_s[jj], m_new);
      l += p;
      const uint8_t* val = vc + ring_slot(first, jj, a.capacity) * slot_bytes;
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
  float* part = partial_row(a, t, h, splits, blockIdx.y);
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

// ---- tensor-core prefill kernel ("flash") ------------------------------------------------------

// One warp-wide mma.sync.m16n8k16 (sm_80+): c [16 x 8] += a [16 x 16] b [16 x 8], bf16 operands,
// fp32 products (exact) and sums. Fragments in the PTX ISA's layout; lane = 4 g + t:
//   a[0] = A[g][2t, 2t+1]  a[1] = A[g+8][2t, 2t+1]  a[2] = A[g][2t+8, 2t+9]  a[3] = A[g+8][2t+8, 2t+9]
//   b[0] = B[2t, 2t+1][g]  b[1] = B[2t+8, 2t+9][g]
//   c[0], c[1] = C[g][2t, 2t+1]   c[2], c[3] = C[g+8][2t, 2t+1]
// (two bf16 per register, the lower index in the low half). The emulator has no tensor cores:
// there each lane gathers its rows of A and columns of B from the lanes that hold them, by
// shuffles of the same layout, and sums the products in k order.
__device__ __forceinline__ void mma_bf16_16816(float c[4], const uint32_t a[4], const uint32_t b[2]) {
#if defined(GEMMA3_CUDA_EMU)
  const int lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  auto lo = [](uint32_t w) { return blocks::bits_float(w << 16); };
  auto hi = [](uint32_t w) { return blocks::bits_float(w & 0xFFFF0000u); };
  for (int kp = 0; kp < 8; ++kp) {  // k = 2 kp, 2 kp + 1: one register of each operand
    const int ra = kp < 4 ? 0 : 2, rb = kp < 4 ? 0 : 1, src = kp % 4;
    const uint32_t a0 = __shfl_sync(0xFFFFFFFFu, a[ra], 4 * g + src);        // A[g][k, k+1]
    const uint32_t a1 = __shfl_sync(0xFFFFFFFFu, a[ra + 1], 4 * g + src);    // A[g+8][k, k+1]
    const uint32_t b0 = __shfl_sync(0xFFFFFFFFu, b[rb], 4 * (2 * t) + src);  // B[k, k+1][2t]
    const uint32_t b1 = __shfl_sync(0xFFFFFFFFu, b[rb], 4 * (2 * t + 1) + src);
    c[0] += lo(a0) * lo(b0) + hi(a0) * hi(b0);
    c[1] += lo(a0) * lo(b1) + hi(a0) * hi(b1);
    c[2] += lo(a1) * lo(b0) + hi(a1) * hi(b0);
    c[3] += lo(a1) * lo(b1) + hi(a1) * hi(b1);
  }
#else
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#endif
}

// Two consecutive bf16 of shared memory as one register (p 4-byte aligned).
__device__ __forceinline__ uint32_t ld_bf16x2(const uint16_t* p) {
#if defined(GEMMA3_CUDA_EMU)
  return uint32_t{p[0]} | uint32_t{p[1]} << 16;
#else
  return *reinterpret_cast<const uint32_t*>(p);
#endif
}
__device__ __forceinline__ uint32_t pack_bf16x2(float lo, float hi) {
  return uint32_t{blocks::float_to_bf16(lo)} | uint32_t{blocks::float_to_bf16(hi)} << 16;
}

// Shared memory of flash_attention_kernel<HDP, kWarps, kKeys> in bytes: Q [16 kWarps][HDP + 8],
// K [kKeys][HDP + 8] and V transposed [HDP][kKeys + 8], bf16 (rows padded by 16 bytes so that
// the 8 row groups of a fragment load fall in different banks).
constexpr size_t flash_smem_bytes(int hdp, int warps, int keys) {
  return (static_cast<size_t>(16 * warps + keys) * (hdp + 8) + static_cast<size_t>(hdp) * (keys + 8)) * 2;
}

// FlashAttention-2 on tensor cores, for prefill and the vision tower. Block (x, y, z) = (tile of
// 16 kWarps query rows t0.., head h, split z); warp w owns rows t0 + 16 w .. + 15. The block
// reads the union of its rows' visible keys [lo(t0), hi(last row)] (split z: its chunk of them)
// in tiles of kKeys, dequantized by the cache's decoder (the CPU's values, as the other
// kernels) and rounded to bf16 in shared memory, V transposed. Per tile, per warp:
// S = Q K^T (HDP / 16 x kKeys / 8 mma), scaled, each row masked to its own range (windows,
// kv_start, bidirectional groups, as visible_keys), online softmax in fp32 registers (row max by
// the quad of lanes that share a row; the running sum per lane, summed at the end), O = O alpha
// + P V with P rounded to bf16 (kKeys / 16 x HDP / 8 mma). q is rounded to bf16, head dims past
// head_dim are zeros. Output as the prefill kernel: out[t, h, :] = O / l, or the split's partial.
// Preconditions: gridDim = (ceil(n_tokens / (16 kWarps)), n_heads, splits), blockDim.x = 32
// kWarps, dynamic shared memory flash_smem_bytes(...), head_dim <= HDP, no pos_dev.
template <class D, int HDP, int kWarps, int kKeys>
__global__ void __launch_bounds__(32 * kWarps)
    flash_attention_kernel(AttentionArgs a, int splits, int chunk) {
  static_assert(HDP % 16 == 0 && kKeys % 16 == 0, "whole mma tiles");
  constexpr int kThreads = 32 * kWarps, kRows = 16 * kWarps, kQs = HDP + 8, kVs = kKeys + 8;
  GEMMA3_DYNAMIC_SHARED(uint16_t, smem);
  uint16_t* const q_s = smem;               // [kRows][kQs]
  uint16_t* const k_s = q_s + kRows * kQs;  // [kKeys][kQs]
  uint16_t* const v_s = k_s + kKeys * kQs;  // [HDP][kVs]: V transposed
  const int hd = a.head_dim, h = blockIdx.y, t0 = blockIdx.x * kRows;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, g = lane / 4, tq = lane % 4;
  const int64_t q_width = int64_t{a.n_heads} * hd;
  const int64_t gd = int64_t{h / (a.n_heads / a.n_kv_heads)} * hd;
  const int64_t slot_bytes = int64_t{a.n_kv_heads} * hd / D::kElems * D::kBytes;
  const uint8_t* kc = static_cast<const uint8_t*>(a.k);
  const uint8_t* vc = static_cast<const uint8_t*>(a.v);

  for (int i = threadIdx.x; i < kRows * HDP; i += kThreads) {
    const int r = i / HDP, d = i % HDP;
    const float x = t0 + r < a.n_tokens && d < hd ? a.q[(t0 + r) * q_width + int64_t{h} * hd + d] : 0.0f;
    q_s[r * kQs + d] = blocks::float_to_bf16(x);
  }
  // The block's keys (lo and hi are nondecreasing in t), this split's part, and each of this
  // lane's two rows' own range.
  const int last = (t0 + kRows < a.n_tokens ? t0 + kRows : a.n_tokens) - 1;
  int64_t lo, hi, lo_last, hi_last;
  visible_keys(a, t0, &lo, &hi);
  visible_keys(a, last, &lo_last, &hi_last);
  const int64_t begin = lo + int64_t{blockIdx.z} * chunk;
  const int64_t end = hi_last + 1 < begin + chunk ? hi_last + 1 : begin + chunk;  // exclusive
  int64_t row_lo[2], row_hi[2];
  for (int e = 0; e < 2; ++e) visible_keys(a, t0 + warp * 16 + g + 8 * e, &row_lo[e], &row_hi[e]);

  float o[HDP / 8][4] = {};
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f};
  for (int64_t j0 = begin; j0 < end; j0 += kKeys) {  // bounds uniform over the block
    __syncthreads();  // q_s is written (first tile); k_s, v_s are no longer read (later ones)
    // Every key read here is in the ring (span <= capacity: launch_attention), so jj < capacity
    // for each and ring_slot's one subtraction finds its slot.
    const int64_t first = j0 % a.capacity;
    for (int i = threadIdx.x; i < kKeys * HDP; i += kThreads) {
      const int jj = i / HDP, d = i % HDP;
      float kx = 0.0f, vx = 0.0f;
      if (j0 + jj < end && d < hd) {
        const int64_t slot = ring_slot(first, jj, a.capacity);
        kx = blocks::row_value<D>(kc + slot * slot_bytes, gd + d);
        vx = blocks::row_value<D>(vc + slot * slot_bytes, gd + d);
      }
      k_s[jj * kQs + d] = blocks::float_to_bf16(kx);
      v_s[d * kVs + jj] = blocks::float_to_bf16(vx);
    }
    __syncthreads();
    float sc[kKeys / 8][4] = {};  // S: key tile n covers keys j0 + 8 n ..
#pragma unroll
    for (int kk = 0; kk < HDP / 16; ++kk) {
      const uint16_t* qa = q_s + (warp * 16 + g) * kQs + kk * 16 + 2 * tq;
      const uint32_t af[4] = {ld_bf16x2(qa), ld_bf16x2(qa + 8 * kQs), ld_bf16x2(qa + 8),
                              ld_bf16x2(qa + 8 * kQs + 8)};
#pragma unroll
      for (int n = 0; n < kKeys / 8; ++n) {
        const uint16_t* kb = k_s + (n * 8 + g) * kQs + kk * 16 + 2 * tq;
        const uint32_t bf[2] = {ld_bf16x2(kb), ld_bf16x2(kb + 8)};
        mma_bf16_16816(sc[n], af, bf);
      }
    }
#pragma unroll
    for (int e = 0; e < 2; ++e) {  // row g + 8 e of the warp: registers 2 e, 2 e + 1
      float mx = -INFINITY;
#pragma unroll
      for (int n = 0; n < kKeys / 8; ++n)
#pragma unroll
        for (int c = 0; c < 2; ++c) {
          const int64_t j = j0 + n * 8 + 2 * tq + c;
          const bool seen = j >= row_lo[e] && j <= row_hi[e] && j < end;
          const float x = seen ? sc[n][2 * e + c] * a.scale : -INFINITY;
          sc[n][2 * e + c] = x;
          mx = fmaxf(mx, x);
        }
      mx = fmaxf(mx, __shfl_xor_sync(0xFFFFFFFFu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xFFFFFFFFu, mx, 2));
      const float m_new = fmaxf(m[e], mx), alpha = softmax_rescale(m[e], m_new);
      l[e] *= alpha;
#pragma unroll
      for (int n = 0; n < HDP / 8; ++n) o[n][2 * e] *= alpha, o[n][2 * e + 1] *= alpha;
#pragma unroll
      for (int n = 0; n < kKeys / 8; ++n)
#pragma unroll
        for (int c = 0; c < 2; ++c) {
          const float p = softmax_weight(sc[n][2 * e + c], m_new);
          sc[n][2 * e + c] = p;
          l[e] += p;
        }
      m[e] = m_new;
    }
    // O += P V: S's accumulator layout is the A layout of P, key tiles 2 kk and 2 kk + 1.
#pragma unroll
    for (int kk = 0; kk < kKeys / 16; ++kk) {
      const uint32_t pa[4] = {pack_bf16x2(sc[2 * kk][0], sc[2 * kk][1]),
                              pack_bf16x2(sc[2 * kk][2], sc[2 * kk][3]),
                              pack_bf16x2(sc[2 * kk + 1][0], sc[2 * kk + 1][1]),
                              pack_bf16x2(sc[2 * kk + 1][2], sc[2 * kk + 1][3])};
#pragma unroll
      for (int n = 0; n < HDP / 8; ++n) {
        const uint16_t* vb = v_s + (n * 8 + g) * kVs + kk * 16 + 2 * tq;
        const uint32_t bf[2] = {ld_bf16x2(vb), ld_bf16x2(vb + 8)};
        mma_bf16_16816(o[n], pa, bf);
      }
    }
  }
#pragma unroll
  for (int e = 0; e < 2; ++e) {
    float sum = l[e];
    sum += __shfl_xor_sync(0xFFFFFFFFu, sum, 1);
    sum += __shfl_xor_sync(0xFFFFFFFFu, sum, 2);
    const int t = t0 + warp * 16 + g + 8 * e;
    if (t >= a.n_tokens) continue;
    float* dst =
        splits == 1 ? a.out + t * q_width + int64_t{h} * hd : partial_row(a, t, h, splits, blockIdx.z) + 2;
    if (splits > 1 && tq == 0) dst[-2] = m[e], dst[-1] = sum;
#pragma unroll
    for (int n = 0; n < HDP / 8; ++n)
#pragma unroll
      for (int c = 0; c < 2; ++c) {
        const int d = n * 8 + 2 * tq + c;
        if (d < hd) dst[d] = splits == 1 ? o[n][2 * e + c] / sum : o[n][2 * e + c];
      }
  }
}

// ---- decode kernel ---------------------------------------------------------------------------

constexpr int kDecThreads = 256;  // 8 warps
constexpr int kDecWarps = kDecThreads / 32;
constexpr int kDecRows = kAttentionDecodeRows;
static_assert(kDecRows <= kDecWarps, "one softmax warp per row");

// Flash-decoding for n_tokens <= kAttentionDecodeMaxTokens. Block (kv head g = blockIdx.x, split
// s = blockIdx.y, row group z = blockIdx.z) serves rows r = z * rows_per_block + i (i <
// rows_per_block, r < n_tokens * G, G = n_heads / n_kv_heads): token r / G, query head g * G +
// r % G. Its keys: [lo(first token), hi(last token)] (visible_keys; nondecreasing in t), split
// s of it as in the prefill kernel; each row masks the keys outside its own range. Per tile of
// kAttnTile keys (ring slot computed once per tile):
//   scores   L = pow2 >= hd / E lanes per key (E = KvChunk<D>::kE), 32 / L keys per warp pass:
//            each lane loads its E-element chunks of the key row once and dots them with every
//            row's query (shared), then a group_sum over the L lanes;
//   softmax  warp i < rows updates row i's running max/sum (registers) and turns the tile's
//            scores into weights (lane jj: key jj);
//   values   thread = (chunk c of E dims, key group kg): the V chunk of keys kg, kg + KG, ...
//            loaded once, accumulated into every row (acc[row][E] registers).
// K and V bytes are read once per block. At the end the key groups' accumulators are summed in
// shared memory in a fixed order (kg ascending) and written: out (splits == 1) or partials.
// Preconditions: gridDim = (n_kv_heads, splits, row_groups), blockDim.x = kDecThreads, dynamic
// shared memory rows_per_block * head_dim floats, head_dim == HD when HD > 0, head_dim % E == 0,
// head_dim <= kAttentionMaxHeadDim, K/V 16-byte aligned; the plan of attention_plan.
// __launch_bounds__(.., 2): at most 128 registers, so two blocks (16 warps) share an SM and
// keep twice the loads in flight (docs/cuda.md's bytes-in-flight model).
template <class D, int HD>
__global__ void __launch_bounds__(kDecThreads, 2)
    decode_attention_kernel(AttentionArgs a, int splits, int chunk, int rows_per_block) {
  using C = KvChunk<D>;
  constexpr int E = C::kE;
  GEMMA3_DYNAMIC_SHARED(float, q_s);          // [rows][hd] queries, then the accumulators' sum
  __shared__ float p_s[kDecRows][kAttnTile];  // scores, then softmax weights, of the tile
  __shared__ float alpha_s[kDecRows];         // rescale factor of the tile, per row
  __shared__ float ml_s[kDecRows][2];         // final (m, l) per row
  __shared__ int64_t lo_s[kDecRows], hi_s[kDecRows];
  if (a.pos_dev) {  // a recorded step: its position, and the splits recut for it
    a.pos0 = *a.pos_dev;
    chunk = step_chunk(a, splits, true);
  }
  const int hd = HD > 0 ? HD : a.head_dim;
  const int group = a.n_heads / a.n_kv_heads, g = blockIdx.x;
  const int row0 = blockIdx.z * rows_per_block;
  const int nr = rows_per_block < a.n_tokens * group - row0 ? rows_per_block : a.n_tokens * group - row0;
  const int64_t q_width = int64_t{a.n_heads} * hd;
  const int64_t row_bytes = int64_t{hd} / D::kElems * D::kBytes;
  const int64_t slot_bytes = a.n_kv_heads * row_bytes;
  const uint8_t* kc = static_cast<const uint8_t*>(a.k) + g * row_bytes;
  const uint8_t* vc = static_cast<const uint8_t*>(a.v) + g * row_bytes;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int nch = hd / E;  // chunks per row

  for (int i = threadIdx.x; i < nr * hd; i += kDecThreads) {  // load the queries
    const int r = row0 + i / hd;
    q_s[i] = a.q[(r / group) * q_width + int64_t{g * group + r % group} * hd + i % hd];
  }
  if (threadIdx.x < kDecRows) {  // row ranges
    int64_t lo = 1, hi = 0;      // a row past nr: no keys
    if (static_cast<int>(threadIdx.x) < nr) visible_keys(a, (row0 + threadIdx.x) / group, &lo, &hi);
    lo_s[threadIdx.x] = lo;
    hi_s[threadIdx.x] = hi;
  }
  __syncthreads();
  const int64_t begin = lo_s[0] + int64_t{blockIdx.y} * chunk;
  const int64_t end = hi_s[nr - 1] + 1 < begin + chunk ? hi_s[nr - 1] + 1 : begin + chunk;

  // Scores: lane li of key group `sub` handles chunks li, li + L, ... of key `base + sub`.
  const int lk = nch >= 32 ? 32 : pow2_at_least(nch), kpw = 32 / lk;
  const int li = lane % lk, sub = lane / lk;
  // Values: thread (kg, c).
  const int lv = pow2_at_least(nch), kgs = kDecThreads / lv;  // nch <= 128: lv <= kDecThreads
  const int c = threadIdx.x % lv, kg = threadIdx.x / lv;
  float acc[kDecRows][E] = {};
  float m = -INFINITY, l = 0.0f;                         // row `warp` (warps < nr), the same in every lane
  for (int64_t j0 = begin; j0 < end; j0 += kAttnTile) {  // bounds uniform over the block
    const int count = static_cast<int>(end - j0 < kAttnTile ? end - j0 : kAttnTile);
    const int64_t first = j0 % a.capacity;
#pragma unroll 4  // a full tile's key loads issued together (4 passes at 1 key per warp)
    for (int base = warp * kpw; base < count; base += kDecWarps * kpw) {  // uniform per warp
      const int jj = base + sub;
      float dot[kDecRows] = {};
      if (jj < count) {
        const uint8_t* key = kc + ring_slot(first, jj, a.capacity) * slot_bytes;
        for (int ch = li; ch < nch; ch += lk) {
          float k[E];
          C::load(key, ch * E, k);
#pragma unroll
          for (int r = 0; r < kDecRows; ++r) {
            if (r >= nr) break;
            const float* q = q_s + r * hd + ch * E;
#pragma unroll
            for (int e = 0; e < E; ++e) dot[r] += q[e] * k[e];
          }
        }
      }
#pragma unroll
      for (int r = 0; r < kDecRows; ++r) {
        if (r >= nr) break;
        dot[r] = group_sum(dot[r], lk);
      }
      if (li == 0 && jj < count) {
        const int64_t j = j0 + jj;
#pragma unroll  // constant indices keep dot[] (and acc[] below) in registers, not local memory
        for (int r = 0; r < kDecRows; ++r) {
          if (r >= nr) break;
          p_s[r][jj] = j >= lo_s[r] && j <= hi_s[r] ? dot[r] * a.scale : -INFINITY;
        }
      }
    }
    __syncthreads();  // p_s holds the tile's scores
    if (warp < nr) {
      const float s = lane < count ? p_s[warp][lane] : -INFINITY;
      const float m_new = fmaxf(m, warp_max(s));
      const float p = softmax_weight(s, m_new);
      const float alpha = softmax_rescale(m, m_new);
      l = l * alpha + warp_sum(p);
      m = m_new;
      if (lane < count) p_s[warp][lane] = p;
      if (lane == 0) alpha_s[warp] = alpha;
    }
    __syncthreads();  // p_s holds the weights, alpha_s the rescale factors
#pragma unroll
    for (int r = 0; r < kDecRows; ++r) {
      if (r >= nr) break;
      const float alpha = alpha_s[r];
#pragma unroll
      for (int e = 0; e < E; ++e) acc[r][e] *= alpha;
    }
    if (c < nch) {
#pragma unroll 4  // the V loads of a tile's keys issued together
      for (int jj = kg; jj < count; jj += kgs) {
        const uint8_t* val = vc + ring_slot(first, jj, a.capacity) * slot_bytes;
        float v[E];
        C::load(val, c * E, v);
#pragma unroll
        for (int r = 0; r < kDecRows; ++r) {
          if (r >= nr) break;
          const float p = p_s[r][jj];
#pragma unroll
          for (int e = 0; e < E; ++e) acc[r][e] += p * v[e];
        }
      }
    }
    __syncthreads();  // the next tile rewrites p_s and alpha_s
  }
  if (warp < nr && lane == 0) {
    ml_s[warp][0] = m;
    ml_s[warp][1] = l;
  }
  // Sum the key groups' accumulators into q_s (no longer read: the last tile's barriers passed).
  for (int k = 0; k < kgs; ++k) {
    if (kg == k && c < nch) {
#pragma unroll
      for (int r = 0; r < kDecRows; ++r) {
        if (r >= nr) break;
#pragma unroll
        for (int e = 0; e < E; ++e) {
          float* dst = q_s + r * hd + c * E + e;
          *dst = k == 0 ? acc[r][e] : *dst + acc[r][e];
        }
      }
    }
    __syncthreads();
  }
  for (int i = threadIdx.x; i < nr * hd; i += kDecThreads) {
    const int ri = i / hd, r = row0 + ri, d = i % hd;
    const int64_t t = r / group;
    const int h = g * group + r % group;
    if (splits == 1) {
      a.out[t * q_width + int64_t{h} * hd + d] = q_s[i] / ml_s[ri][1];  // l >= 1 (key at the max)
    } else {
      float* part = partial_row(a, t, h, splits, blockIdx.y);
      if (d == 0) {
        part[0] = ml_s[ri][0];
        part[1] = ml_s[ri][1];
      }
      part[2 + d] = q_s[i];
    }
  }
}

// ---- split combine ---------------------------------------------------------------------------

constexpr int kCombineThreads = 256;
constexpr int kCombineWarps = kCombineThreads / 32;

// out[t, h, :] = sum_s w_s acc_s / sum_s w_s l_s, w_s = exp(m_s - max_s m_s) (0 for a split
// without visible keys, m_s = -inf; every row has a visible key, so the max is finite). Block
// (t, h) = blockIdx.x. Tree reductions: the max and sum of l by block_max/block_sum; for acc,
// warp w sums splits w, w + 8, ... per dim (lane: dims lane, lane + 32, ...), then the 8 warp
// sums are added pairwise (4 + 4, 2 + 2, 1 + 1) in shared memory.
// Preconditions: gridDim.x = n_tokens * n_heads, blockDim.x = kCombineThreads, dynamic shared
// memory (splits + kCombineWarps * hd) floats, partials written with the same splits.
__global__ void __launch_bounds__(kCombineThreads)
    attention_combine_kernel(const float* partials, int splits, int n_heads, int hd, float* out) {
  GEMMA3_DYNAMIC_SHARED(float, w_s);  // [splits] split weights, then [kCombineWarps][hd] sums
  __shared__ float scratch[32];
  float* sum_s = w_s + splits;
  const float* rows = partials + int64_t{blockIdx.x} * splits * (hd + 2);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  float mx = -INFINITY;
  for (int s = threadIdx.x; s < splits; s += kCombineThreads) mx = fmaxf(mx, rows[int64_t{s} * (hd + 2)]);
  mx = block_max(mx, scratch);
  float l = 0;
  for (int s = threadIdx.x; s < splits; s += kCombineThreads) {
    const float ms = rows[int64_t{s} * (hd + 2)];
    w_s[s] = ms == -INFINITY ? 0.0f : expf(ms - mx);
    l += w_s[s] * rows[int64_t{s} * (hd + 2) + 1];
  }
  l = block_sum(l, scratch);  // ends synchronized: w_s complete
  for (int d = lane; d < hd; d += 32) {
    float acc = 0;
    for (int s = warp; s < splits; s += kCombineWarps) acc += w_s[s] * rows[int64_t{s} * (hd + 2) + 2 + d];
    sum_s[warp * hd + d] = acc;
  }
  __syncthreads();
  for (int half = kCombineWarps / 2; half > 0; half /= 2) {
    for (int i = threadIdx.x; i < half * hd; i += kCombineThreads) sum_s[i] += sum_s[i + half * hd];
    __syncthreads();
  }
  const int t = blockIdx.x / n_heads, h = blockIdx.x % n_heads;
  float* o = out + (int64_t{t} * n_heads + h) * hd;
  for (int d = threadIdx.x; d < hd; d += kCombineThreads) o[d] = sum_s[d] / l;
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

int launch_qk_norm_rope_kv_write(const QkPrepArgs& a, const float* inv_freq_host, Stream stream) {
  const int hd = a.head_dim;
  if (a.n < 0 || a.n_heads < 0 || a.n_kv_heads < 0 || hd < 2 || hd % 2 != 0 || hd / 2 > kRopeMaxHalf ||
      a.pos0 < 0 || a.capacity < 1 || !a.q_norm || !a.k_norm || (a.kv_dtype == DType::kQ8_0 && hd % 32 != 0))
    return static_cast<int>(cudaErrorInvalidValue);
  if (a.n == 0 || a.n_heads + a.n_kv_heads == 0) return 0;
  PrepParams p{};
  p.a = a;
  p.first_cached = std::max(0, a.n - a.capacity);
  for (int i = 0; i < hd / 2; ++i) p.inv_freq[i] = inv_freq_host[i];
  const unsigned grid = static_cast<unsigned>(a.n) * static_cast<unsigned>(a.n_heads + a.n_kv_heads);
  const cudaStream_t s = as_stream(stream);
  switch (a.kv_dtype) {
    case DType::kF32: GEMMA3_LAUNCH(qk_prep_kernel<float>, grid, kPrepThreads, 0, s, p); break;
    case DType::kBF16: GEMMA3_LAUNCH(qk_prep_kernel<uint16_t>, grid, kPrepThreads, 0, s, p); break;
    case DType::kF8E4M3: GEMMA3_LAUNCH(qk_prep_kernel<uint8_t>, grid, kPrepThreads, 0, s, p); break;
    case DType::kQ8_0: GEMMA3_LAUNCH(qk_prep_kernel<blocks::Q8_0>, grid, kPrepThreads, 0, s, p); break;
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
  const cudaStream_t s = as_stream(stream);
  const int rc = dispatch_kv(a.kv_dtype, [&](auto d) {
    using D = decltype(d);
    if (p.flash_dim > 0) {
      // Instances (padded head dim, warps, keys per tile) within 48 KiB of shared memory:
      // 80: 33 KiB, 128: 36 KiB, 256: 37 KiB (2 warps, 16 keys: its 128 fp32 accumulators per
      // lane leave no room for more).
      auto launch = [&](auto kernel, int hdp, int warps, int keys) {
        const int rows = 16 * warps;
        const dim3 grid(static_cast<unsigned>((a.n_tokens + rows - 1) / rows),
                        static_cast<unsigned>(a.n_heads), static_cast<unsigned>(p.splits));
        GEMMA3_LAUNCH(kernel, grid, 32 * warps, flash_smem_bytes(hdp, warps, keys), s, a, p.splits, p.chunk);
        return launch_result();
      };
      static_assert(flash_rows(80) == 64 && flash_rows(128) == 64 && flash_rows(256) == 32,
                    "rows = 16 warps");
      if (p.flash_dim == 80) return launch(&flash_attention_kernel<D, 80, 4, 64>, 80, 4, 64);
      if (p.flash_dim == 128) return launch(&flash_attention_kernel<D, 128, 4, 32>, 128, 4, 32);
      return launch(&flash_attention_kernel<D, 256, 2, 16>, 256, 2, 16);
    }
    if (!p.decode) {
      const dim3 grid(static_cast<unsigned>(a.n_tokens * a.n_heads), static_cast<unsigned>(p.splits));
      const size_t smem = static_cast<size_t>(a.head_dim) * sizeof(float);
      GEMMA3_LAUNCH(attention_kernel<D>, grid, kAttnThreads, smem, s, a, p.splits, p.chunk);
      return launch_result();
    }
    const dim3 grid(static_cast<unsigned>(a.n_kv_heads), static_cast<unsigned>(p.splits),
                    static_cast<unsigned>(p.row_groups));
    const size_t smem = static_cast<size_t>(p.rows_per_block) * a.head_dim * sizeof(float);
    // Gemma 3's head dims unrolled; SigLIP's 72 and any other through the generic instance.
    auto kernel = a.head_dim == 128   ? decode_attention_kernel<D, 128>
                  : a.head_dim == 256 ? decode_attention_kernel<D, 256>
                                      : decode_attention_kernel<D, 0>;
    GEMMA3_LAUNCH(kernel, grid, kDecThreads, smem, s, a, p.splits, p.chunk, p.rows_per_block);
    return launch_result();
  });
  if (rc != 0 || p.splits == 1) return rc;
  const size_t smem =
      (static_cast<size_t>(p.splits) + static_cast<size_t>(kCombineWarps) * a.head_dim) * sizeof(float);
  GEMMA3_LAUNCH(attention_combine_kernel, static_cast<unsigned>(a.n_tokens * a.n_heads), kCombineThreads,
                smem, s, a.partials, p.splits, a.n_heads, a.head_dim, a.out);
  return launch_result();
}

}  // namespace gemma3::cuda
