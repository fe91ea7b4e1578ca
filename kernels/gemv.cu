// Matrix-vector products for decode and short chunks (n <= 8 tokens) with the dequantization
// fused in: the weight is read once, straight from its uploaded rows (docs/cuda.md, "GEMV").
//
// Two paths, chosen per call:
//  - gemv_vec_kernel<L, N> (F32, F16, BF16, F8E4M3, planar Q4_0/Q8_0, Q4_K, Q5_K; rows 16-byte
//    aligned): the row is cut into 16-byte chunks; each lane issues kUnroll chunk loads for
//    each of its kRowsPerWarp rows before decoding any (up to 8 x 16 B in flight per lane),
//    decodes 4..32 elements per chunk with the block scale converted once per chunk, and
//    multiplies them with x read as 16-byte quads from shared memory, each quad once for the
//    warp's rows. x is staged in a
//    chunk-major order (below) so the 32 lanes of a warp, which read the same quad of 32
//    consecutive chunks, hit 32 different banks. N (the token count) is a template argument.
//    Matrices with few rows split each row pair's chunks over 2..8 warps of the block (split-K
//    inside the block, combined through shared memory: deterministic) so that every SM gets
//    blocks; matrices with many rows are walked by a grid of at most 8 blocks per SM, each
//    staging x once when it fits one tile.
//  - gemv_element_kernel<L> (every other layout: Q4_1, Q5_0, Q5_1, Q2_K, Q3_K, Q6_K,
//    IQ4_NL, IQ4_XS, and plain types whose rows are not 16-byte multiples): the first version,
//    one warp per row, lanes striding element by element through blocks::weight_value.
// fp32 accumulation everywhere; results match the CPU reference up to summation order (the
// per-chunk decoders compute the same element values; scales multiply partial sums).
#include "common.cuh"

namespace gemma3::cuda {
namespace {

constexpr int kWarps = 8;  // warps per block (both paths)
constexpr int kThreads = 32 * kWarps;
constexpr int kRowsPerWarp = 2;        // vec path: rows a warp works on together (x reused)
constexpr int kTileBytes = 40 * 1024;  // vec path: x tile for all N tokens
constexpr int kElementTile = 1024;     // element path: x columns staged per step
static_assert(kElementTile % 256 == 0, "a tile must hold whole blocks of every type");

#if defined(GEMMA3_CUDA_EMU)
struct alignas(16) V16 {
  uint32_t x, y, z, w;
};
struct alignas(16) F4 {
  float x, y, z, w;
};
#else
using V16 = uint4;
using F4 = float4;
#endif

__device__ __forceinline__ V16 load16(const uint8_t* p) { return __ldg(reinterpret_cast<const V16*>(p)); }
__device__ __forceinline__ uint32_t word(const V16& v, int i) {
  return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;
}
// u - k for 0 <= u < 2^16 and a small integer k, exactly, without an integer conversion
// instruction (a quarter-rate one on recent GPUs): the float 2^23 + u minus (2^23 + k).
template <int K>
__device__ __forceinline__ float uint_minus(uint32_t u) {
  return blocks::bits_float(0x4B000000u | u) - (8388608.0f + K);
}

// acc[r][t] += sum over the chunk's Q quads of wv[r][4q .. 4q+3] . x quad q of token t, for
// the warp's kRowsPerWarp rows: each x quad is read from shared memory once for all rows.
// xq: the staged tile, [N][Q][tc] quads; c: the chunk's index in the tile.
template <int N, int Q>
__device__ __forceinline__ void dot_rows(const float (&wv)[kRowsPerWarp][4 * Q], const F4* xq, int tc, int c,
                                         float (&acc)[kRowsPerWarp][N]) {
#pragma unroll
  for (int q = 0; q < Q; ++q) {  // quads outer: a quad's decoded values die after their N uses
#pragma unroll
    for (int t = 0; t < N; ++t) {
      const F4 v = xq[(t * Q + q) * tc + c];
#pragma unroll
      for (int r = 0; r < kRowsPerWarp; ++r)
        acc[r][t] +=
            wv[r][4 * q] * v.x + wv[r][4 * q + 1] * v.y + wv[r][4 * q + 2] * v.z + wv[r][4 * q + 3] * v.w;
    }
  }
}

// ---- chunk decoders of the vec path ------------------------------------------------------------
// Vec<L>: kElems elements per 16-byte chunk of a row (a row has cols / kElems chunks);
//   slot(e, &chunk, &quad): element e of a tile (tiles start at multiples of 256 elements) is
//     element e % 4 of quad `quad` of chunk `chunk` (the order decode() writes);
//   load(row, cols, c): the loads of chunk c (the 16 quant bytes and what scales them);
//   decode(raw, c, wv): the chunk's kElems values, or, when kScaled, its integer codes minus
//     their offset, scale(raw) then multiplying the chunk's partial sums.
template <class L>
struct Vec {
  static constexpr bool kHas = false;
};

// Plain types and Q8_0: a chunk is kElems consecutive elements.
template <int E, bool Scaled>
struct Consecutive {
  static constexpr bool kHas = true, kScaled = Scaled;
  static constexpr int kElems = E, kQuads = E / 4;
  __device__ static void slot(int e, int* chunk, int* quad) {
    *chunk = e / E;
    *quad = (e % E) / 4;
  }
};

struct PlainRaw {
  V16 q;
};
// The plain types (F32, BF16, F16, F8E4M3): chunk c is bytes 16c .. 16c + 15 of the row, E
// elements of it; only decode differs.
template <int E>
struct PlainVec : Consecutive<E, false> {
  static constexpr int kUnroll = 4;
  using Raw = PlainRaw;
  __device__ static Raw load(const uint8_t* row, int64_t, int64_t c) { return {load16(row + 16 * c)}; }
};

template <>
struct Vec<blocks::F32> : PlainVec<4> {
  __device__ static void decode(const Raw& r, int, float* wv) {
#pragma unroll
    for (int i = 0; i < 4; ++i) wv[i] = blocks::bits_float(word(r.q, i));
  }
};

template <>
struct Vec<blocks::BF16> : PlainVec<8> {
  __device__ static void decode(const Raw& r, int, float* wv) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      wv[2 * i] = blocks::bits_float(word(r.q, i) << 16);
      wv[2 * i + 1] = blocks::bits_float(word(r.q, i) & 0xFFFF0000u);
    }
  }
};

template <>
struct Vec<blocks::F16> : PlainVec<8> {
  __device__ static void decode(const Raw& r, int, float* wv) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      wv[2 * i] = blocks::half_to_float(word(r.q, i) & 0xFFFFu);
      wv[2 * i + 1] = blocks::half_to_float(word(r.q, i) >> 16);
    }
  }
};

// fp8: the row scale multiplies the row's sum at the end (gemv_vec_kernel).
template <>
struct Vec<blocks::F8E4M3> : PlainVec<16> {
  __device__ static void decode(const Raw& r, int, float* wv) {
#pragma unroll
    for (int k = 0; k < 16; ++k) wv[k] = blocks::e4m3_to_float((word(r.q, k / 4) >> (8 * (k % 4))) & 0xFFu);
  }
};

// Planar Q4_0/Q8_0: the quants and the block's half scale d (multiplying the partial sums).
struct ScaledRaw {
  V16 q;
  uint32_t d;
};

// Planar Q8_0: chunk c is half of block c / 2.
template <>
struct Vec<blocks::Q8_0Planar> : Consecutive<16, true> {
  static constexpr int kUnroll = 4;
  using Raw = ScaledRaw;
  __device__ static Raw load(const uint8_t* row, int64_t cols, int64_t c) {
    return {load16(row + 16 * c), blocks::ld16(blocks::Q8_0Planar::scales(row, cols) + 2 * (c / 2))};
  }
  __device__ static void decode(const Raw& r, int, float* wv) {
#pragma unroll
    for (int k = 0; k < 16; ++k)  // int8 q: (q ^ 0x80) = q + 128 as an unsigned byte
      wv[k] = uint_minus<128>(((word(r.q, k / 4) >> (8 * (k % 4))) & 0xFFu) ^ 0x80u);
  }
  __device__ static float scale(const Raw& r) { return blocks::half_to_float(r.d); }
};

// Planar Q4_0: chunk c is block c (byte j: element j low nibble, element j + 16 high).
template <>
struct Vec<blocks::Q4_0Planar> : Consecutive<32, true> {
  static constexpr int kUnroll = 4;
  using Raw = ScaledRaw;
  __device__ static Raw load(const uint8_t* row, int64_t cols, int64_t c) {
    return {load16(row + 16 * c), blocks::ld16(blocks::Q4_0Planar::scales(row, cols) + 2 * c)};
  }
  __device__ static void decode(const Raw& r, int, float* wv) {
#pragma unroll
    for (int j = 0; j < 16; ++j) {
      const uint32_t b = word(r.q, j / 4) >> (8 * (j % 4));
      wv[j] = uint_minus<8>(b & 0xFu);
      wv[j + 16] = uint_minus<8>((b >> 4) & 0xFu);
    }
  }
  __device__ static float scale(const Raw& r) { return blocks::half_to_float(r.d); }
};

// Q4_K (144-byte blocks: d, dmin, scales[12], qs[128]) and Q5_K (176: d, dmin, scales[12],
// qh[32], qs[128]): chunk j of a block is qs bytes 16j .. 16j+15, i.e. pair p = j / 2 of 64
// elements, l0 = 16 (j % 2): low nibbles are elements 64p + l0 + i of sub-block 2p, high
// nibbles 64p + 32 + l0 + i of sub-block 2p + 1 (Q5_K: plus 16 * bit 2p / 2p + 1 of qh[l0 + i]).
// The block's 16-byte header is loaded beside it (the 8 lanes of a block read the same one).
struct KQuantChunks {
  static constexpr bool kHas = true, kScaled = false;
  static constexpr int kElems = 32, kQuads = 8, kUnroll = 2;
  struct HeaderScales {  // s[k] = scale byte k = header byte 4 + k
    const V16& h;
    __device__ int operator[](int k) const {
      const uint32_t w = k < 4 ? h.y : k < 8 ? h.z : h.w;
      return static_cast<int>((w >> (8 * (k & 3))) & 0xFFu);
    }
  };
  __device__ static void slot(int e, int* chunk, int* quad) {
    const int r = e % 256, l = r % 32;
    *chunk = (e / 256) * 8 + 2 * (r / 64) + l / 16;
    *quad = ((r % 64) / 32) * 4 + (l % 16) / 4;
  }
  // (d * sc, dmin * mn) of the two sub-blocks of chunk c (c % 8: its place in the block; tiles
  // hold whole blocks). The reference's element value is (d * sc) * q - dmin * mn; decode()
  // forms it with one fused rounding.
  __device__ static void sub_scales(const V16& h, int c, float* d0, float* m0, float* d1, float* m1) {
    const int p = (c % 8) / 2;
    int sc0, mn0, sc1, mn1;
    blocks::scale_min_k4(2 * p, HeaderScales{h}, &sc0, &mn0);
    blocks::scale_min_k4(2 * p + 1, HeaderScales{h}, &sc1, &mn1);
    const float d = blocks::half_to_float(h.x & 0xFFFFu), dmin = blocks::half_to_float(h.x >> 16);
    *d0 = blocks::mul(d, static_cast<float>(sc0));
    *m0 = blocks::mul(dmin, static_cast<float>(mn0));
    *d1 = blocks::mul(d, static_cast<float>(sc1));
    *m1 = blocks::mul(dmin, static_cast<float>(mn1));
  }
};

template <>
struct Vec<blocks::Q4_K> : KQuantChunks {
  struct Raw {
    V16 q, h;
  };
  __device__ static Raw load(const uint8_t* row, int64_t, int64_t c) {
    const uint8_t* blk = row + (c / 8) * blocks::Q4_K::kBytes;
    return {load16(blk + 16 + 16 * (c % 8)), load16(blk)};
  }
  __device__ static void decode(const Raw& r, int c, float* wv) {
    float d0, m0, d1, m1;
    sub_scales(r.h, c, &d0, &m0, &d1, &m1);
#pragma unroll
    for (int j = 0; j < 16; ++j) {
      const uint32_t b = word(r.q, j / 4) >> (8 * (j % 4));
      wv[j] = fmaf(d0, uint_minus<0>(b & 0xFu), -m0);
      wv[j + 16] = fmaf(d1, uint_minus<0>((b >> 4) & 0xFu), -m1);
    }
  }
};

template <>
struct Vec<blocks::Q5_K> : KQuantChunks {
  struct Raw {
    V16 q, h, qh;
  };
  __device__ static Raw load(const uint8_t* row, int64_t, int64_t c) {
    const uint8_t* blk = row + (c / 8) * blocks::Q5_K::kBytes;
    return {load16(blk + 48 + 16 * (c % 8)), load16(blk), load16(blk + 16 + 16 * (c % 2))};
  }
  __device__ static void decode(const Raw& r, int c, float* wv) {
    float d0, m0, d1, m1;
    sub_scales(r.h, c, &d0, &m0, &d1, &m1);
    const int p = (c % 8) / 2;
#pragma unroll
    for (int j = 0; j < 16; ++j) {
      const uint32_t b = word(r.q, j / 4) >> (8 * (j % 4));
      const uint32_t hb = (word(r.qh, j / 4) >> (8 * (j % 4) + 2 * p)) & 3u;  // bits 2p, 2p + 1
      wv[j] = fmaf(d0, uint_minus<0>((b & 0xFu) | ((hb & 1u) << 4)), -m0);
      wv[j + 16] = fmaf(d1, uint_minus<0>(((b >> 4) & 0xFu) | ((hb & 2u) << 3)), -m1);
    }
  }
};

// x[t, k0 .. k0 + len) for t < N into the tile, chunk-major: quad q of chunk c of token t at
// xq[(t * Q + q) * tc + c] (Vec<L>::slot), so that lanes reading the same quad of consecutive
// chunks read consecutive 16-byte words. 16-byte loads, four per thread issued before any
// store: the whole 10 KiB x of a 2560-wide layer costs the block one L2 round trip.
// Preconditions: cols % 4 == 0, k0 % 256 == 0, x 16-byte aligned.
template <class V, int N>
__device__ void stage_x(const float* x, int64_t cols, int64_t k0, int len, F4* xq) {
  constexpr int kBatch = 4;
  const F4* x4 = reinterpret_cast<const F4*>(x);
  const int tc = len / V::kElems, quads = len / 4, total = N * quads;
  for (int i0 = threadIdx.x; i0 < total; i0 += kBatch * kThreads) {
    F4 v[kBatch] = {};
#pragma unroll
    for (int b = 0; b < kBatch; ++b) {
      const int i = i0 + b * kThreads;
      if (i < total) v[b] = __ldg(x4 + (i / quads * cols + k0) / 4 + i % quads);
    }
#pragma unroll
    for (int b = 0; b < kBatch; ++b) {
      const int i = i0 + b * kThreads;
      if (i < total) {
        int chunk, quad;
        V::slot(i % quads * 4, &chunk, &quad);
        xq[(i / quads * V::kQuads + quad) * tc + chunk] = v[b];
      }
    }
  }
}

// Result v of row o for token t, to its part's buffer (GemvOut, launch.h).
__device__ __forceinline__ void store_row(const GemvOut& out, int64_t o, int t, float v) {
  int j = 0;
  while (j + 1 < out.parts && o >= out.end[j]) ++j;
  const int64_t start = j > 0 ? out.end[j - 1] : 0;
  out.out[j][t * (out.end[j] - start) + (o - start)] = v;
}

// out[t, o] = row_scale(o) * sum_i W[o, i] x[t, i] for t < N. A group of kWarps / split row
// pairs per block iteration: warp w takes pair w / split of the group and chunks part * 32 +
// lane (+ split * 32 ...) of it, part = w % split. A pair is rows 2p and 2p + 1, or with
// out.geglu rows p and p + rows / 2 (gate p and up p), which give one output.
// Preconditions: blockDim.x = kThreads; split in {1, 2, 4, 8}; tile_len a multiple of 256;
// cols % Vec<L>::kElems == 0; rows 16-byte aligned; dynamic shared memory (N * tile_len +
// kWarps * kRowsPerWarp * N) floats.
template <class L, int N>
__global__ void __launch_bounds__(kThreads)
    gemv_vec_kernel(WeightRef w, const float* x, GemvOut out, int split, int tile_len) {
  using V = Vec<L>;
  GEMMA3_DYNAMIC_SHARED(F4, gemv_smem);
  F4* xq = gemv_smem;                                               // [N * tile_len / 4] quads
  float* red = reinterpret_cast<float*>(gemv_smem) + N * tile_len;  // [kWarps][kRowsPerWarp][N]
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, part = warp % split;
  static_assert(kRowsPerWarp == 2, "a warp's rows are a pair");
  const int64_t pairs = out.geglu ? w.rows / 2 : (w.rows + 1) / 2;
  const int group_pairs = kWarps / split;
  const int64_t groups = (pairs + group_pairs - 1) / group_pairs;
  const int64_t ntiles = (w.cols + tile_len - 1) / tile_len;
  const uint8_t* base = static_cast<const uint8_t*>(w.data);
  if (ntiles == 1) {  // the whole x fits: staged once for every group this block takes
    stage_x<V, N>(x, w.cols, 0, static_cast<int>(w.cols), xq);
    __syncthreads();
  }
  for (int64_t g = blockIdx.x; g < groups; g += gridDim.x) {  // uniform over the block
    const int64_t pair = g * group_pairs + warp / split;
    int64_t row_of[kRowsPerWarp] = {2 * pair, 2 * pair + 1};
    if (out.geglu) row_of[0] = pair, row_of[1] = pair + w.rows / 2;
    const uint8_t* rows[kRowsPerWarp];
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r)  // rows past the end read the last row; dropped below
      rows[r] = base + (row_of[r] < w.rows ? row_of[r] : w.rows - 1) * w.row_bytes;
    float acc[kRowsPerWarp][N] = {};
    for (int64_t k0 = 0; k0 < w.cols; k0 += tile_len) {
      const int len = static_cast<int>(w.cols - k0 < tile_len ? w.cols - k0 : tile_len);
      if (ntiles > 1) {
        __syncthreads();  // every warp is done with the previous tile
        stage_x<V, N>(x, w.cols, k0, len, xq);
        __syncthreads();
      }
      const int tc = len / V::kElems;
      const int64_t c0 = k0 / V::kElems;
      const int step = split * 32;
      for (int c = part * 32 + lane; c < tc; c += V::kUnroll * step) {
        // Every load of this step is issued before any is used: kUnroll * kRowsPerWarp chunks
        // in flight per lane.
        typename V::Raw raw[V::kUnroll][kRowsPerWarp] = {};
#pragma unroll
        for (int u = 0; u < V::kUnroll; ++u)
          if (c + u * step < tc)
#pragma unroll
            for (int r = 0; r < kRowsPerWarp; ++r) raw[u][r] = V::load(rows[r], w.cols, c0 + c + u * step);
#pragma unroll
        for (int u = 0; u < V::kUnroll; ++u) {
          const int cu = c + u * step;
          if (cu < tc) {
            float wv[kRowsPerWarp][V::kElems];
#pragma unroll
            for (int r = 0; r < kRowsPerWarp; ++r) V::decode(raw[u][r], cu, wv[r]);
            if constexpr (V::kScaled) {
              float s[kRowsPerWarp][N] = {};
              dot_rows<N, V::kQuads>(wv, xq, tc, cu, s);
#pragma unroll
              for (int r = 0; r < kRowsPerWarp; ++r) {
                const float d = V::scale(raw[u][r]);
#pragma unroll
                for (int t = 0; t < N; ++t) acc[r][t] += d * s[r][t];
              }
            } else {
              dot_rows<N, V::kQuads>(wv, xq, tc, cu, acc);
            }
          }
        }
      }
    }
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r)
#pragma unroll
      for (int t = 0; t < N; ++t) acc[r][t] = warp_sum(acc[r][t]);
    if (split > 1) {  // uniform: the parts of a row pair add up in a fixed order
      if (lane == 0)
#pragma unroll
        for (int r = 0; r < kRowsPerWarp; ++r)
#pragma unroll
          for (int t = 0; t < N; ++t) red[(warp * kRowsPerWarp + r) * N + t] = acc[r][t];
      __syncthreads();
      if (part == 0 && lane == 0)
#pragma unroll
        for (int r = 0; r < kRowsPerWarp; ++r)
#pragma unroll
          for (int t = 0; t < N; ++t) {
            float v = 0;
            for (int s = 0; s < split; ++s) v += red[((warp + s) * kRowsPerWarp + r) * N + t];
            acc[r][t] = v;
          }
      __syncthreads();  // red is rewritten by the next group
    }
    if (part == 0 && lane == 0 && pair < pairs) {
      if (out.geglu) {
        const float sg = row_scale_of(w, row_of[0]), su = row_scale_of(w, row_of[1]);
#pragma unroll
        for (int t = 0; t < N; ++t)
          out.out[0][t * (w.rows / 2) + pair] = gelu_tanh(acc[0][t] * sg) * (acc[1][t] * su);
      } else {
#pragma unroll
        for (int r = 0; r < kRowsPerWarp; ++r) {
          if (row_of[r] < w.rows) {
            const float s = row_scale_of(w, row_of[r]);
#pragma unroll
            for (int t = 0; t < N; ++t) store_row(out, row_of[r], t, acc[r][t] * s);
          }
        }
      }
    }
  }
}

// The per-element path: out[t, o] = sum_i (W[o, i] * row_scale(o)) * x[t, i] for t < n; one
// warp per row, x staged in shared memory tile by tile, fp32 accumulation. No geglu.
// Preconditions: blockDim.x = kThreads, gridDim.x = ceil(rows / kWarps), 1 <= n <= kGemvMaxTokens.
template <class L>
__global__ void __launch_bounds__(kThreads)
    gemv_element_kernel(WeightRef w, const float* x, int n, GemvOut out) {
  __shared__ float xs[kGemvMaxTokens * kElementTile];  // [n, kElementTile] slice of x
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int64_t o = int64_t{blockIdx.x} * kWarps + warp;
  const bool active = o < w.rows;  // whole warps only: the shuffle below needs all 32 lanes
  const uint8_t* row = static_cast<const uint8_t*>(w.data) + (active ? o : 0) * w.row_bytes;
  const float s = active ? row_scale_of(w, o) : 0.0f;
  float acc[kGemvMaxTokens] = {};
  for (int64_t k0 = 0; k0 < w.cols; k0 += kElementTile) {
    const int len = static_cast<int>(w.cols - k0 < kElementTile ? w.cols - k0 : kElementTile);
    __syncthreads();  // every warp is done with the previous tile
    for (int idx = threadIdx.x; idx < n * len; idx += blockDim.x) {
      const int t = idx / len, c = idx % len;
      xs[t * kElementTile + c] = x[t * w.cols + k0 + c];
    }
    __syncthreads();
    if (active) {
      for (int c = lane; c < len; c += 32) {
        const float wv = blocks::mul(blocks::weight_value<L>(row, w.cols, k0 + c), s);
#pragma unroll
        for (int t = 0; t < kGemvMaxTokens; ++t)
          if (t < n) acc[t] += wv * xs[t * kElementTile + c];
      }
    }
  }
  if (active) {
#pragma unroll
    for (int t = 0; t < kGemvMaxTokens; ++t) {
      if (t < n) {
        const float v = warp_sum(acc[t]);
        if (lane == 0) store_row(out, o, t, v);
      }
    }
  }
}

// Warps per row pair: the fewest (1, 2, 4 or 8) that give at least 4 blocks (row groups) per
// SM, as long as every lane still gets a chunk of each row. One row group per block iteration;
// at most 8 blocks per SM, the rest of the groups walked by the grid-stride loop.
struct VecPlan {
  int split = 1, tile_len = 0;
  unsigned grid = 1;
  size_t smem = 0;
};
template <int N>
VecPlan vec_plan(int64_t pairs, int64_t cols, int elems_per_chunk, int sm_count) {
  VecPlan p;
  constexpr int kTileCap = kTileBytes / (4 * N) / 256 * 256;
  const int64_t cols256 = (cols + 255) / 256 * 256;
  p.tile_len = static_cast<int>(cols256 < kTileCap ? cols256 : kTileCap);
  const int64_t chunks = cols / elems_per_chunk, target = 4 * int64_t{sm_count};
  auto groups = [&](int split) {
    const int group_pairs = kWarps / split;
    return (pairs + group_pairs - 1) / group_pairs;
  };
  while (p.split < kWarps && groups(p.split) < target && chunks >= 64 * p.split) p.split *= 2;
  const int64_t g = groups(p.split), cap = 8 * int64_t{sm_count};
  p.grid = static_cast<unsigned>(g < cap ? g : cap);
  p.smem = static_cast<size_t>(N * p.tile_len + kWarps * kRowsPerWarp * N) * sizeof(float);
  return p;
}

template <class L, int N>
int launch_vec(const WeightRef& w, const float* x, const GemvOut& out, cudaStream_t stream, int sm_count) {
  const VecPlan p = vec_plan<N>(out.geglu ? w.rows / 2 : (w.rows + 1) / 2, w.cols, Vec<L>::kElems, sm_count);
  auto* const kernel = &gemv_vec_kernel<L, N>;  // (the macro would split "<L, N>" at its comma)
  GEMMA3_LAUNCH(kernel, p.grid, kThreads, p.smem, stream, w, x, out, p.split, p.tile_len);
  return launch_result();
}

template <class L>
int launch_vec_tokens(const WeightRef& w, const float* x, int n, const GemvOut& out, cudaStream_t stream,
                      int sm) {
  switch (n) {
    case 1: return launch_vec<L, 1>(w, x, out, stream, sm);
    case 2: return launch_vec<L, 2>(w, x, out, stream, sm);
    case 3: return launch_vec<L, 3>(w, x, out, stream, sm);
    case 4: return launch_vec<L, 4>(w, x, out, stream, sm);
    case 5: return launch_vec<L, 5>(w, x, out, stream, sm);
    case 6: return launch_vec<L, 6>(w, x, out, stream, sm);
    case 7: return launch_vec<L, 7>(w, x, out, stream, sm);
    case 8: return launch_vec<L, 8>(w, x, out, stream, sm);
  }
  return static_cast<int>(cudaErrorInvalidValue);
}
static_assert(kGemvMaxTokens == 8, "launch_vec_tokens has one case per token count");

// 16-byte loads need rows of whole 16-byte chunks; the planar and K layouts always have them.
template <class L>
bool vec_rows(const WeightRef& w) {
  if constexpr (Vec<L>::kHas) return w.cols > 0 && w.cols % Vec<L>::kElems == 0 && w.row_bytes % 16 == 0;
  return false;
}

}  // namespace

bool gemv_vectorized(const WeightRef& w) {
  // dispatch_weight returns the callable's int, or cudaErrorInvalidValue (1) for no decoder.
  constexpr int kYes = 2, kNo = 3;
  return dispatch_weight(w.dtype, [&](auto d) { return vec_rows<decltype(d)>(w) ? kYes : kNo; }) == kYes;
}

int launch_gemv(const WeightRef& w, const float* x, int n, const GemvOut& out, Stream stream, int sm_count) {
  if (n < 1 || n > kGemvMaxTokens || w.rows < 0 || w.cols < 0 || out.parts < 1 || out.parts > kGemvMaxParts ||
      out.end[out.parts - 1] != w.rows || (out.geglu && (out.parts != 2 || 2 * out.end[0] != w.rows)))
    return static_cast<int>(cudaErrorInvalidValue);
  for (int j = 0; j < out.parts; ++j)
    if (!out.out[j] || out.end[j] < (j > 0 ? out.end[j - 1] : 0))
      return static_cast<int>(cudaErrorInvalidValue);
  if (w.rows == 0) return 0;
  if (sm_count < 1) sm_count = 1;
  return dispatch_weight(w.dtype, [&](auto d) {
    using L = decltype(d);
    if constexpr (Vec<L>::kHas) {
      const bool aligned = vec_rows<L>(w) && reinterpret_cast<uintptr_t>(w.data) % 16 == 0 &&
                           reinterpret_cast<uintptr_t>(x) % 16 == 0;
      if (aligned) return launch_vec_tokens<L>(w, x, n, out, as_stream(stream), sm_count);
    }
    if (out.geglu) return static_cast<int>(cudaErrorInvalidValue);
    const unsigned grid = static_cast<unsigned>((w.rows + kWarps - 1) / kWarps);
    GEMMA3_LAUNCH(gemv_element_kernel<L>, grid, kThreads, 0, as_stream(stream), w, x, n, out);
    return launch_result();
  });
}

}  // namespace gemma3::cuda
