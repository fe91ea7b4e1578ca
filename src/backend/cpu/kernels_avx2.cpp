// AVX2 + FMA + F16C kernels, and the same source for AVX-512 + VNNI. This translation unit is
// compiled for its ISA through `#pragma GCC target` (CMake needs no per-file flags); nothing here
// may run before cpu_has_avx2() (cpu_has_avx512()) said yes, so only plain functions are defined
// after the pragma (no inline library templates whose AVX2 copies could be picked by the linker
// for other callers).
//
// Compiled twice: as itself (the "avx2" table), and included by kernels_avx512.cpp with
// GEMMA3_KERNELS_AVX512 defined (the "avx512" table, for AVX-512 F/BW/VL + AVX512_VNNI: every
// kernel recompiled with EVEX encodings; the int8 decode kernels differ where an #ifdef says so:
// vpdpbusd for the int8 products, and 4-token row x token tiles).
//
// Weight decoding follows ggml's block layouts (docs/formats.md §3; the reference dequantizers in
// core/quant.cpp): each 32-element block becomes 32 int8 lanes plus fp32 scales (Blk), then
// fp32 (widened and FMA'd against fp32 activations in decode, or dequantized into the prefill
// GEMM's panels).
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "backend/cpu/cpu_kernels.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define GEMMA3_HAVE_AVX2_TU 1
#endif

// The target ISA, applied by a _Pragma (#pragma GCC target does not expand macros; the two
// levels expand GEMMA3_KERNELS_ISA before it is made a string).
#ifdef GEMMA3_KERNELS_AVX512
#define GEMMA3_KERNELS_ISA "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni"
#define GEMMA3_KERNELS_NAME "avx512"
#define GEMMA3_KERNELS_TABLE avx512_kernels
#else
#define GEMMA3_KERNELS_ISA "avx2,fma,f16c"
#define GEMMA3_KERNELS_NAME "avx2"
#define GEMMA3_KERNELS_TABLE avx2_kernels
#endif
#define GEMMA3_KERNELS_PRAGMA_STR(x) _Pragma(#x)
#define GEMMA3_KERNELS_PRAGMA(x) GEMMA3_KERNELS_PRAGMA_STR(x)

#ifdef GEMMA3_HAVE_AVX2_TU
#if defined(__clang__)
GEMMA3_KERNELS_PRAGMA(clang attribute push(__attribute__((target(GEMMA3_KERNELS_ISA))), apply_to = function))
#else
#pragma GCC push_options
GEMMA3_KERNELS_PRAGMA(GCC target(GEMMA3_KERNELS_ISA))
#endif
#include <immintrin.h>

namespace gemma3::cpu {
namespace {

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  __m128 sh = _mm_movehdup_ps(s);
  s = _mm_add_ps(s, sh);
  sh = _mm_movehl_ps(sh, s);
  s = _mm_add_ss(s, sh);
  return _mm_cvtss_f32(s);
}

inline float load_f16(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return _cvtsh_ss(h);
}

inline __m256i loadu256(const void* p) { return _mm256_loadu_si256(static_cast<const __m256i*>(p)); }

// 16 bytes of legacy nibbles -> 32 values 0..15: elements 0..15 (low nibbles), 16..31 (high).
inline __m256i bytes_from_nibbles_32(const uint8_t* p) {
  const __m128i t = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  const __m256i b = _mm256_set_m128i(_mm_srli_epi16(t, 4), t);
  return _mm256_and_si256(b, _mm256_set1_epi8(0x0F));
}

// 32 bits -> 32 bytes, 0xFF where the bit is set (ggml bytes_from_bits_32).
inline __m256i bytes_from_bits_32(const uint8_t* p) {
  uint32_t x32;
  std::memcpy(&x32, p, 4);
  const __m256i shuf = _mm256_set_epi64x(0x0303030303030303, 0x0202020202020202, 0x0101010101010101, 0);
  __m256i bytes = _mm256_shuffle_epi8(_mm256_set1_epi32(static_cast<int>(x32)), shuf);
  bytes = _mm256_or_si256(bytes, _mm256_set1_epi64x(0x7fbfdfeff7fbfdfe));
  return _mm256_cmpeq_epi8(bytes, _mm256_set1_epi64x(-1));
}

// ---- quantized weight blocks ---------------------------------------------------------------

// One 32-element block of a weight row: element i = q[i] * (i < 16 ? s_lo : s_hi) - m, q as
// int8 lanes. Every format with a kernel reduces to this (Q4_K/Q5_K: per-sub-block scale and
// min; Q6_K: a scale per 16 elements), so one dot kernel and one dequantizer serve them all.
struct Blk {
  __m256i q;
  float s_lo, s_hi, m;
};

// Q4_K / Q5_K 6-bit (scale, min) pairs of the 8 sub-blocks (get_scale_min_k4), times d / dmin.
inline void k4_scales(const uint8_t* s, float d, float dmin, float* sc, float* mn) {
  for (int j = 0; j < 8; ++j) {
    int a, m;
    if (j < 4) {
      a = s[j] & 63;
      m = s[j + 4] & 63;
    } else {
      a = (s[j + 4] & 0xF) | ((s[j - 4] >> 6) << 4);
      m = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
    }
    sc[j] = d * static_cast<float>(a);
    mn[j] = dmin * static_cast<float>(m);
  }
}

// f(b, blk) for every 32-element block b of a row of k elements of dtype T (ggml layouts,
// docs/formats.md §3; the reference dequantizers in core/quant.cpp).
template <DType T, class F>
inline void each_block(const uint8_t* p, int64_t k, F&& f) {
  if constexpr (T == DType::kQ8_0) {  // d, qs[32] int8
    for (int64_t b = 0; b < k / 32; ++b, p += 34) {
      const float d = load_f16(p);
      f(b, Blk{loadu256(p + 2), d, d, 0.0f});
    }
  } else if constexpr (T == DType::kQ4_0 || T == DType::kQ5_0) {
    constexpr int kBytes = T == DType::kQ4_0 ? 18 : 22;  // d, [qh u32], qs[16]
    for (int64_t b = 0; b < k / 32; ++b, p += kBytes) {
      const float d = load_f16(p);
      __m256i q;
      if constexpr (T == DType::kQ4_0) {
        q = _mm256_sub_epi8(bytes_from_nibbles_32(p + 2), _mm256_set1_epi8(8));
      } else {  // q - 16 as int8: the 5th bit clear means negative (0xF0 | low nibble)
        const __m256i hi =
            _mm256_andnot_si256(bytes_from_bits_32(p + 2), _mm256_set1_epi8(static_cast<char>(0xF0)));
        q = _mm256_or_si256(bytes_from_nibbles_32(p + 6), hi);
      }
      f(b, Blk{q, d, d, 0.0f});
    }
  } else if constexpr (T == DType::kQ4_K || T == DType::kQ5_K) {
    constexpr bool kQ5 = T == DType::kQ5_K;  // d, dmin, scales[12], [qh[32]], qs[128]
    const __m256i m4 = _mm256_set1_epi8(0x0F), m1 = _mm256_set1_epi8(1);
    for (int64_t sb = 0; sb < k / 256; ++sb, p += kQ5 ? 176 : 144) {
      float sc[8], mn[8];
      k4_scales(p + 4, load_f16(p), load_f16(p + 2), sc, mn);
      const uint8_t* qs = p + (kQ5 ? 48 : 16);
      __m256i hb = kQ5 ? loadu256(p + 16) : _mm256_setzero_si256();
      for (int j = 0; j < 4; ++j) {
        const __m256i q4 = loadu256(qs + 32 * j);
        __m256i lo = _mm256_and_si256(q4, m4), hi = _mm256_and_si256(_mm256_srli_epi16(q4, 4), m4);
        if constexpr (kQ5) {
          lo = _mm256_or_si256(lo, _mm256_slli_epi16(_mm256_and_si256(hb, m1), 4));
          hi = _mm256_or_si256(hi, _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hb, 1), m1), 4));
          hb = _mm256_srli_epi16(hb, 2);
        }
        f(sb * 8 + 2 * j, Blk{lo, sc[2 * j], sc[2 * j], mn[2 * j]});
        f(sb * 8 + 2 * j + 1, Blk{hi, sc[2 * j + 1], sc[2 * j + 1], mn[2 * j + 1]});
      }
    }
  } else {
    static_assert(T == DType::kQ6_K);  // ql[128], qh[64], scales[16] int8, d
    const __m256i m4 = _mm256_set1_epi8(0x0F), m3 = _mm256_set1_epi8(3), m30 = _mm256_set1_epi8(0x30),
                  k32 = _mm256_set1_epi8(32);
    for (int64_t sb = 0; sb < k / 256; ++sb, p += 210) {
      const float d = load_f16(p + 208);
      for (int n = 0; n < 2; ++n) {
        const uint8_t* ql = p + 64 * n;
        const uint8_t* qh = p + 128 + 32 * n;
        const int8_t* sc = reinterpret_cast<const int8_t*>(p + 192) + 8 * n;
        const __m256i l0 = loadu256(ql), l1 = loadu256(ql + 32), h = loadu256(qh);
        __m256i q[4];
        q[0] = _mm256_or_si256(_mm256_and_si256(l0, m4), _mm256_slli_epi16(_mm256_and_si256(h, m3), 4));
        q[1] = _mm256_or_si256(_mm256_and_si256(l1, m4), _mm256_and_si256(_mm256_slli_epi16(h, 2), m30));
        q[2] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l0, 4), m4), _mm256_and_si256(h, m30));
        q[3] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l1, 4), m4),
                               _mm256_and_si256(_mm256_srli_epi16(h, 2), m30));
        for (int kk = 0; kk < 4; ++kk)
          f(sb * 8 + n * 4 + kk, Blk{_mm256_sub_epi8(q[kk], k32), d * static_cast<float>(sc[2 * kk]),
                                     d * static_cast<float>(sc[2 * kk + 1]), 0.0f});
      }
    }
  }
}

// The 32 int8 lanes of q as four fp32 vectors (elements 0-7, 8-15, 16-23, 24-31).
inline void to_f32(__m256i q, __m256* f) {
  const __m128i a = _mm256_castsi256_si128(q), b = _mm256_extracti128_si256(q, 1);
  f[0] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(a));
  f[1] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(a, 8)));
  f[2] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b));
  f[3] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(b, 8)));
}

// ---- quantized weights x fp32 activations: one weight row x NT tokens ----------------------
//
// Activations stay fp32 (no activation rounding: decode and prefill give the reference's
// result up to summation order, so a token's logits do not depend on how it was batched).
// Per block: sum(q * x) over each half in fp32, times the half's scale; the min of Q4_K/Q5_K
// times sum(x) in its own accumulator. Two chains (lo/hi halves) per token hide FMA latency.
template <DType T, int NT>
void qdot_t(int64_t k, const uint8_t* w, const float* const* a, float* out) {
  constexpr bool kMin = T == DType::kQ4_K || T == DType::kQ5_K;
  __m256 lo[NT], hi[NT], mins[NT];
  for (int t = 0; t < NT; ++t) lo[t] = hi[t] = mins[t] = _mm256_setzero_ps();
  each_block<T>(w, k, [&](int64_t b, const Blk& blk) {
    __m256 f[4];
    to_f32(blk.q, f);
    const __m256 s_lo = _mm256_set1_ps(blk.s_lo), s_hi = _mm256_set1_ps(blk.s_hi);
    for (int t = 0; t < NT; ++t) {
      const float* x = a[t] + b * 32;
      const __m256 x0 = _mm256_loadu_ps(x), x1 = _mm256_loadu_ps(x + 8), x2 = _mm256_loadu_ps(x + 16),
                   x3 = _mm256_loadu_ps(x + 24);
      lo[t] = _mm256_fmadd_ps(_mm256_fmadd_ps(f[1], x1, _mm256_mul_ps(f[0], x0)), s_lo, lo[t]);
      hi[t] = _mm256_fmadd_ps(_mm256_fmadd_ps(f[3], x3, _mm256_mul_ps(f[2], x2)), s_hi, hi[t]);
      if constexpr (kMin)
        mins[t] = _mm256_fmadd_ps(_mm256_add_ps(_mm256_add_ps(x0, x1), _mm256_add_ps(x2, x3)),
                                  _mm256_set1_ps(blk.m), mins[t]);
    }
  });
  for (int t = 0; t < NT; ++t) out[t] = hsum(_mm256_sub_ps(_mm256_add_ps(lo[t], hi[t]), mins[t]));
}

template <DType T>
void qdot(int64_t k, const void* w, const void* const* a, int nt, float* out) {
  const uint8_t* wb = static_cast<const uint8_t*>(w);
  const float* const* x = reinterpret_cast<const float* const*>(a);
  switch (nt) {
    case 1: return qdot_t<T, 1>(k, wb, x, out);
    case 2: return qdot_t<T, 2>(k, wb, x, out);
    case 3: return qdot_t<T, 3>(k, wb, x, out);
    default: return qdot_t<T, 4>(k, wb, x, out);
  }
}

// Q8_0 has its own kernel: its int8 lanes widen straight from memory. Per block and token,
// sum(q * x) in fp32, then one FMA by the block scale into one of two accumulators (even and
// odd blocks), so consecutive blocks' chains overlap. Q8_0 is the 270M's LM head (73% of the
// bytes read per decoded token).
template <int NT>
inline void q8_0_block(const uint8_t* blk, const float* const* a, int64_t b, __m256* acc) {
  const __m256 d = _mm256_set1_ps(load_f16(blk));
  __m256 f[4];
  for (int part = 0; part < 4; ++part)
    f[part] = _mm256_cvtepi32_ps(
        _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(blk + 2 + 8 * part))));
#pragma GCC unroll 4
  for (int t = 0; t < NT; ++t) {
    const float* x = a[t] + b * 32;
    __m256 sum = _mm256_mul_ps(f[0], _mm256_loadu_ps(x));
    sum = _mm256_fmadd_ps(f[1], _mm256_loadu_ps(x + 8), sum);
    sum = _mm256_fmadd_ps(f[2], _mm256_loadu_ps(x + 16), sum);
    sum = _mm256_fmadd_ps(f[3], _mm256_loadu_ps(x + 24), sum);
    acc[t] = _mm256_fmadd_ps(sum, d, acc[t]);
  }
}

template <int NT>
void q8_0f_t(int64_t k, const uint8_t* w, const float* const* a, float* out) {
  __m256 even[NT], odd[NT];
  for (int t = 0; t < NT; ++t) even[t] = odd[t] = _mm256_setzero_ps();
  const int64_t nb = k / 32;
  int64_t b = 0;
  for (; b + 2 <= nb; b += 2) {
    q8_0_block<NT>(w + b * 34, a, b, even);
    q8_0_block<NT>(w + (b + 1) * 34, a, b + 1, odd);
  }
  if (b < nb) q8_0_block<NT>(w + b * 34, a, b, even);
  for (int t = 0; t < NT; ++t) out[t] = hsum(_mm256_add_ps(even[t], odd[t]));
}

void q8_0f(int64_t k, const void* w, const void* const* a, int nt, float* out) {
  const uint8_t* wb = static_cast<const uint8_t*>(w);
  const float* const* x = reinterpret_cast<const float* const*>(a);
  switch (nt) {
    case 1: return q8_0f_t<1>(k, wb, x, out);
    case 2: return q8_0f_t<2>(k, wb, x, out);
    case 3: return q8_0f_t<3>(k, wb, x, out);
    default: return q8_0f_t<4>(k, wb, x, out);
  }
}

// ---- quantized weights x int8 activations (decode) -----------------------------------------
//
// Per block: the 32 int8 products summed exactly in int32 into 8 lanes of 4 elements each
// (lanes 0-3: elements 0-15, lanes 4-7: 16-31), converted to fp32 and FMA'd by (weight scale x
// activation scale). The products take one unsigned operand (u8 x s8): Q4_K/Q5_K quants are
// 0..31 already; signed weights use the sign trick |w| x (a * sign(w)), |w| <= 128, |a| <= 127.
// AVX2: maddubs (pairs -> int16: 2 * 128 * 127 = 32512 < 32767, no saturation) and madd (pairs
// of int16 -> int32). VNNI: vpdpbusd, the four products of a lane summed in int32 in one op
// (|lane| <= 4 * 128 * 127). Q4_K/Q5_K's min term m * sum(x) uses the block's fp32 activation
// sum. Even and odd blocks feed separate accumulators (overlapping FMA chains).
template <bool kSigned>
inline __m256i dot_i8(__m256i w, __m256i a) {
  const __m256i u = kSigned ? _mm256_sign_epi8(w, w) : w, s = kSigned ? _mm256_sign_epi8(a, w) : a;
#ifdef GEMMA3_KERNELS_AVX512
  return _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s);
#else
  return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
#endif
}

template <DType T, int NT>
inline void q8dot_t(int64_t k, const uint8_t* w, const Q8Block* const* a, float* out, int64_t ldo) {
  constexpr bool kMin = T == DType::kQ4_K || T == DType::kQ5_K;
  __m256 even[NT], odd[NT];
  float mins[NT];
  for (int t = 0; t < NT; ++t) even[t] = odd[t] = _mm256_setzero_ps(), mins[t] = 0.0f;
  each_block<T>(w, k, [&](int64_t b, const Blk& blk) {
    // Q6_K has a scale per 16 elements (lanes 0-3 vs 4-7); the other formats one per block.
    const __m256 s = T == DType::kQ6_K ? _mm256_set_m128(_mm_set1_ps(blk.s_hi), _mm_set1_ps(blk.s_lo))
                                       : _mm256_set1_ps(blk.s_lo);
#pragma GCC unroll 4
    for (int t = 0; t < NT; ++t) {
      const Q8Block& ab = a[t][b];
      const __m256 p = _mm256_cvtepi32_ps(dot_i8<!kMin>(blk.q, loadu256(ab.q)));
      const __m256 sd = _mm256_mul_ps(s, _mm256_set1_ps(ab.d));
      if (b & 1)
        odd[t] = _mm256_fmadd_ps(p, sd, odd[t]);
      else
        even[t] = _mm256_fmadd_ps(p, sd, even[t]);
      if constexpr (kMin) mins[t] += blk.m * ab.sum;
    }
  });
  for (int t = 0; t < NT; ++t) out[t * ldo] = hsum(_mm256_add_ps(even[t], odd[t])) - mins[t];
}

template <DType T, int NT>
void q8rows_t(int64_t k, const uint8_t* w, int64_t row_bytes, int nr, const Q8Block* const* a, float* out,
              int64_t ldo) {
  for (int r = 0; r < nr; ++r) q8dot_t<T, NT>(k, w + r * row_bytes, a, out + r, ldo);
}

// ---- int8 tiles: kTileRows weight rows x kTileTokens tokens (batched decode) ----------------
//
// From kQ8TileMinTokens tokens on, a range of rows is walked kTileRows rows at a time: the
// rows' blocks (kSegBlocks at a time) are decoded once into a staging area on the stack (int8
// lanes, scales, mins), which then stays in L1 while every tile of kTileTokens tokens passes
// over it. So decoding a weight block (the nibble and scale unpacking of Q4_K, Q5_0, Q6_K) is
// paid once per step, not once per token tile, and each tile's inner step (one block, 4 rows x
// kTileTokens tokens) reuses each activation load for 4 rows and each staged weight for every
// token of the tile, with 4 x kTileTokens independent accumulators. The weight scale x
// activation scale products are formed 4 rows at a time before the block loop (Q6_K, a scale
// per 16 elements, multiplies per-lane scales in the loop). Arithmetic per (row, token, block)
// is the one-row kernel's (the exact int32 block product, converted, times the same scale
// product); only the order of the sum over blocks differs (per segment, then summed).
//
// The products per ISA (stage_q, act_operand, dot_lanes): AVX2 stages signed quants as |q|
// and q (the sign trick's operands, decoded once) for maddubs + madd. VNNI (the avx512 table)
// uses vpdpbusd (4 u8 x s8 products summed into each int32 lane): unsigned quants (Q4_K/Q5_K)
// x activations from 0; signed quants q with the activation as the unsigned operand, a + 128
// (1..255, one xor per token and block for all rows), started from -128 x the lane's four q
// (staged per row and block, where the sign trick's |q| was), so the lane ends at sum a q
// exactly: every partial sum stays within 4 * 128 * 128 + 4 * 255 * 128 < 2^31 and the result
// within 4 * 127 * 128 (exact in fp32). This drops the sign fix and the madd per (row, token,
// block): 3 ops per 32 products instead of 5, and tiles of 4 tokens (AVX-512VL's 32 ymm
// registers hold 16 accumulators). Two blocks per zmm register (interleaved by int32 lane so
// that one 64-bit broadcast scales both) measured no faster on the AMD Zen 4 tried (zmm ops at
// half rate) and its staging cost more: not kept (docs/perf.md).
constexpr int kTileRows = 4;
#ifdef GEMMA3_KERNELS_AVX512
constexpr int kTileTokens = 4;  // 16 accumulators: AVX-512VL has 32 ymm registers
#else
constexpr int kTileTokens = 2;  // 8 accumulators of the 16 ymm registers
#endif
constexpr int kSegBlocks = 64;  // multiple of 8: a segment is whole 256-element super-blocks

struct Stage {
  // Signed formats: AVX2 |q| in q and q (the sign source) in aux; VNNI q in q and in aux the
  // int32 lanes' -128 x (sum of the lane's four q). Unsigned formats: q only.
  alignas(32) int8_t q[kSegBlocks][kTileRows][32];
  alignas(32) int8_t aux[kSegBlocks][kTileRows][32];
  alignas(32) float sc[kSegBlocks][kTileRows][8];  // Q6_K: the scale per int32 lane
  alignas(32) float s[kSegBlocks][kTileRows];      // the others: the block's scale
  alignas(32) float mn[kTileRows][kSegBlocks];     // Q4_K / Q5_K: the block's min
};

inline __m256i load_vec(const int8_t* p) { return _mm256_load_si256(reinterpret_cast<const __m256i*>(p)); }

// The products: the exact int32 sums of 4 staged weights x 4 activations per lane. act_operand
// turns a token's loaded activation block into the products' operand once for all rows.
#ifdef GEMMA3_KERNELS_AVX512
template <bool kSigned>
inline void stage_q(__m256i q, int8_t* st_q, int8_t* st_aux) {
  _mm256_store_si256(reinterpret_cast<__m256i*>(st_q), q);
  if constexpr (kSigned) {
    const __m256i pairs = _mm256_maddubs_epi16(_mm256_set1_epi8(1), q);  // |pair sum| <= 256
    _mm256_store_si256(reinterpret_cast<__m256i*>(st_aux), _mm256_madd_epi16(pairs, _mm256_set1_epi16(-128)));
  }
}
template <bool kSigned>
inline __m256i act_operand(__m256i a) {
  return kSigned ? _mm256_xor_si256(a, _mm256_set1_epi8(static_cast<char>(0x80))) : a;
}
template <bool kSigned>
inline __m256i dot_lanes(__m256i wq, __m256i aux, __m256i av) {
  return kSigned ? _mm256_dpbusd_epi32(aux, av, wq) : _mm256_dpbusd_epi32(_mm256_setzero_si256(), wq, av);
}
#else
template <bool kSigned>
inline void stage_q(__m256i q, int8_t* st_q, int8_t* st_aux) {
  _mm256_store_si256(reinterpret_cast<__m256i*>(st_q), kSigned ? _mm256_sign_epi8(q, q) : q);
  if constexpr (kSigned) _mm256_store_si256(reinterpret_cast<__m256i*>(st_aux), q);
}
template <bool kSigned>
inline __m256i act_operand(__m256i a) {
  return a;
}
template <bool kSigned>
inline __m256i dot_lanes(__m256i wq, __m256i aux, __m256i av) {  // as dot_i8
  const __m256i p = _mm256_maddubs_epi16(wq, kSigned ? _mm256_sign_epi8(av, aux) : av);
  return _mm256_madd_epi16(p, _mm256_set1_epi16(1));
}
#endif

template <DType T>
constexpr int64_t seg_offset(int64_t b0) {  // byte offset of block b0 (a multiple of 8) in a row
  switch (T) {
    case DType::kQ8_0: return b0 * 34;
    case DType::kQ4_0: return b0 * 18;
    case DType::kQ5_0: return b0 * 22;
    case DType::kQ4_K: return b0 / 8 * 144;
    case DType::kQ5_K: return b0 / 8 * 176;
    default: return b0 / 8 * 210;  // Q6_K
  }
}

// Rows [0, rr) of the tile (row r at w + r * row_bytes), blocks [b0, b0 + nbs), into st; rows
// rr..kTileRows-1 are zeros (their outputs are not written).
template <DType T>
void stage_rows(const uint8_t* w, int64_t row_bytes, int rr, int64_t b0, int nbs, Stage& st) {
  constexpr bool kSigned = !(T == DType::kQ4_K || T == DType::kQ5_K);
  for (int r = 0; r < kTileRows; ++r) {
    if (r >= rr) {
      for (int b = 0; b < nbs; ++b) {
        stage_q<kSigned>(_mm256_setzero_si256(), st.q[b][r], st.aux[b][r]);
        _mm256_store_ps(st.sc[b][r], _mm256_setzero_ps());
        st.s[b][r] = st.mn[r][b] = 0.0f;
      }
      continue;
    }
    each_block<T>(w + r * row_bytes + seg_offset<T>(b0), 32 * static_cast<int64_t>(nbs),
                  [&](int64_t b, const Blk& blk) {
                    stage_q<kSigned>(blk.q, st.q[b][r], st.aux[b][r]);
                    if constexpr (T == DType::kQ6_K)
                      _mm256_store_ps(st.sc[b][r],
                                      _mm256_set_m128(_mm_set1_ps(blk.s_hi), _mm_set1_ps(blk.s_lo)));
                    st.s[b][r] = blk.s_lo;
                    st.mn[r][b] = blk.m;
                  });
  }
}

// The next stage's weight bytes, asked for a few cache lines at a time while the current
// stage's tiles compute (step() once per block of a tile). The weights stream from memory once
// per step (the LM head is most of a small model's bytes): left to the hardware prefetcher the
// staging loads waited on DRAM, and prefetching a whole stage at once stalled on the miss
// buffers (docs/perf.md).
struct Prefetch {
  const uint8_t* w = nullptr;  // rows [0, rows) at w + r * row_bytes, bytes [lo, hi) of each
  int64_t row_bytes = 0, lo = 0, hi = 0, off = 0;
  int rows = 0, r = 0, per_step = 0;
  void step() {
    for (int i = 0; i < per_step && r < rows; ++i) {
      _mm_prefetch(reinterpret_cast<const char*>(w + r * row_bytes + off), _MM_HINT_T0);
      if ((off += 64) >= hi + 63) ++r, off = lo;  // + 63: the line holding byte hi - 1
    }
  }
};

template <DType T>
Prefetch next_stage(const uint8_t* w, int64_t row_bytes, int rows, int64_t b0, int nbs, int steps) {
  Prefetch pf;
  pf.w = w, pf.row_bytes = row_bytes, pf.rows = rows;
  pf.lo = pf.off = seg_offset<T>(b0), pf.hi = seg_offset<T>(b0 + nbs);  // K formats: whole super-blocks
  const int64_t lines = rows * ((pf.hi - pf.lo) / 64 + 2);
  pf.per_step = static_cast<int>((lines + steps - 1) / steps);
  return pf;
}

// The stage after rows [r0, r0 + rows) x blocks [b0, b0 + kSegBlocks) of nr rows x nb blocks:
// the next segment of these rows, else the next rows' first (none after the last).
template <DType T>
Prefetch after_stage(const uint8_t* w, int64_t row_bytes, int nr, int r0, int rows, int64_t nb, int64_t b0,
                     int steps) {
  if (b0 + kSegBlocks < nb)
    return next_stage<T>(w + r0 * row_bytes, row_bytes, std::min(nr - r0, rows), b0 + kSegBlocks,
                         static_cast<int>(std::min<int64_t>(nb - b0 - kSegBlocks, kSegBlocks)), steps);
  if (r0 + rows < nr)
    return next_stage<T>(w + (r0 + rows) * row_bytes, row_bytes, std::min(nr - r0 - rows, rows), 0,
                         static_cast<int>(std::min<int64_t>(nb, kSegBlocks)), steps);
  return {};
}

// out[t * ldo + r] (+)= dot over the staged blocks [0, nbs) of row r < rr and token t < NT, whose
// blocks are a[t][b0 ..]. `add`: accumulate onto the previous segments' sums.
template <DType T, int NT>
void q8_tile(const Stage& st, int nbs, const Q8Block* const* a, int64_t b0, int rr, float* out, int64_t ldo,
             bool add, Prefetch& pf) {
  constexpr bool kSigned = !(T == DType::kQ4_K || T == DType::kQ5_K), kMin = !kSigned;
  constexpr bool kHalves = T == DType::kQ6_K;  // a scale per 16 elements: per-lane scales
  __m256 acc[kTileRows][NT];
#pragma GCC unroll 4
  for (int r = 0; r < kTileRows; ++r)
#pragma GCC unroll 4
    for (int t = 0; t < NT; ++t) acc[r][t] = _mm256_setzero_ps();
  const Q8Block* at[NT];
#pragma GCC unroll 4
  for (int t = 0; t < NT; ++t) at[t] = a[t] + b0;
  // sd[b][4 t + r] = weight scale x activation scale
  alignas(32) float sd[kHalves ? 1 : kSegBlocks][kTileRows * NT];
  if constexpr (!kHalves)
    for (int b = 0; b < nbs; ++b) {
      const __m128 s4 = _mm_load_ps(st.s[b]);
#pragma GCC unroll 4
      for (int t = 0; t < NT; ++t) _mm_store_ps(sd[b] + 4 * t, _mm_mul_ps(s4, _mm_set1_ps(at[t][b].d)));
    }
  for (int b = 0; b < nbs; ++b) {
    pf.step();
    __m256i av[NT];
#pragma GCC unroll 4
    for (int t = 0; t < NT; ++t) av[t] = act_operand<kSigned>(loadu256(at[t][b].q));
#pragma GCC unroll 4
    for (int r = 0; r < kTileRows; ++r) {
      const __m256i wq = load_vec(st.q[b][r]);
      const __m256i aux = kSigned ? load_vec(st.aux[b][r]) : wq;
#pragma GCC unroll 4
      for (int t = 0; t < NT; ++t) {
        const __m256 f = kHalves
                             ? _mm256_mul_ps(_mm256_load_ps(st.sc[b][r]), _mm256_broadcast_ss(&at[t][b].d))
                             : _mm256_broadcast_ss(&sd[b][4 * t + r]);
        acc[r][t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot_lanes<kSigned>(wq, aux, av[t])), f, acc[r][t]);
      }
    }
  }
  for (int t = 0; t < NT; ++t) {
    alignas(32) float sums[kSegBlocks];
    if constexpr (kMin)
      for (int b = 0; b < nbs; ++b) sums[b] = at[t][b].sum;
    for (int r = 0; r < rr; ++r) {
      float v = hsum(acc[r][t]);
      if constexpr (kMin) {  // sum_b m_b * sum(x_b), nbs a multiple of 8 (whole super-blocks)
        __m256 m = _mm256_setzero_ps();
        for (int b = 0; b < nbs; b += 8)
          m = _mm256_fmadd_ps(_mm256_load_ps(st.mn[r] + b), _mm256_load_ps(sums + b), m);
        v -= hsum(m);
      }
      float& o = out[t * ldo + r];
      o = add ? o + v : v;
    }
  }
}

#ifdef GEMMA3_KERNELS_AVX512
// ---- VNNI, signed formats with one scale per block (Q8_0, Q4_0, Q5_0): 8 rows per lane -------
//
// The tiles above spend, per (row, token, block), a vpdpbusd on 32 products, a conversion and an
// FMA, and leave 8 partial sums per row to add at the end. Here a stage of 8 rows is transposed
// so that int32 lane r of a register is row r: register j of a block holds elements 4j..4j+3 of
// the 8 rows. A block of one token is then 8 vpdpbusd, each with the token's 4 activations
// broadcast from memory, into one register of 8 row sums (exact, in int32), and one conversion
// and FMA for 8 rows: 256 products for about 11 ops instead of 24. vpdpbusd takes its unsigned
// operand from the weights, staged as q + 128 (0..255), and the token as the signed one; the lane
// starts from -128 x (the sum of the token's 32 quants) so that it ends at sum q a exactly
// (|partial sums| <= 32 * 255 * 127 + 128 * 32 * 127 < 2^21, exact in fp32 too).
constexpr int kRows8 = 8;
constexpr int kTokens8 = 8;  // 8 fp32 accumulators + 8 weight registers + temporaries

template <DType T>
constexpr bool kRowLanes = T == DType::kQ8_0 || T == DType::kQ4_0 || T == DType::kQ5_0;

struct Stage8 {
  alignas(32) int8_t raw[kSegBlocks][kRows8][32];  // each row's decoded quants, as stage_rows
  alignas(32) uint8_t q[kSegBlocks][8][32];        // [block][j][row r: elements 4j..4j+3] + 128
  alignas(32) float s[kSegBlocks][kRows8];         // the rows' block scales
};

template <DType T>
void stage_rows8(const uint8_t* w, int64_t row_bytes, int rr, int64_t b0, int nbs, Stage8& st) {
  for (int r = 0; r < kRows8; ++r) {
    if (r >= rr) {
      for (int b = 0; b < nbs; ++b) {
        _mm256_store_si256(reinterpret_cast<__m256i*>(st.raw[b][r]), _mm256_setzero_si256());
        st.s[b][r] = 0.0f;
      }
      continue;
    }
    each_block<T>(w + r * row_bytes + seg_offset<T>(b0), 32 * static_cast<int64_t>(nbs),
                  [&](int64_t b, const Blk& blk) {
                    _mm256_store_si256(reinterpret_cast<__m256i*>(st.raw[b][r]), blk.q);
                    st.s[b][r] = blk.s_lo;
                  });
  }
  const __m256i bias = _mm256_set1_epi8(static_cast<char>(0x80));
  for (int b = 0; b < nbs; ++b) {  // an 8 x 8 transpose of 32-bit groups
    __m256i x[8], t[8], u[8];
    for (int r = 0; r < 8; ++r) x[r] = load_vec(st.raw[b][r]);
    for (int r = 0; r < 8; r += 2) {
      t[r] = _mm256_unpacklo_epi32(x[r], x[r + 1]);
      t[r + 1] = _mm256_unpackhi_epi32(x[r], x[r + 1]);
    }
    for (int h = 0; h < 8; h += 4) {
      u[h] = _mm256_unpacklo_epi64(t[h], t[h + 2]);
      u[h + 1] = _mm256_unpackhi_epi64(t[h], t[h + 2]);
      u[h + 2] = _mm256_unpacklo_epi64(t[h + 1], t[h + 3]);
      u[h + 3] = _mm256_unpackhi_epi64(t[h + 1], t[h + 3]);
    }
    for (int j = 0; j < 4; ++j) {
      const __m256i lo = _mm256_permute2x128_si256(u[j], u[j + 4], 0x20);
      const __m256i hi = _mm256_permute2x128_si256(u[j], u[j + 4], 0x31);
      _mm256_store_si256(reinterpret_cast<__m256i*>(st.q[b][j]), _mm256_xor_si256(lo, bias));
      _mm256_store_si256(reinterpret_cast<__m256i*>(st.q[b][j + 4]), _mm256_xor_si256(hi, bias));
    }
  }
}

// out[t * ldo + r] (+)= dot over the staged blocks of row r < rr and token t < NT; qsum[t][b]:
// -128 x the sum of token t's quants in block b0 + b.
template <int NT>
void q8_tile8(const Stage8& st, int nbs, const Q8Block* const* a, const int32_t* const* qsum, int64_t b0,
              int rr, float* out, int64_t ldo, bool add, Prefetch& pf) {
  __m256 acc[NT];
#pragma GCC unroll 8
  for (int t = 0; t < NT; ++t) acc[t] = _mm256_setzero_ps();
  for (int b = 0; b < nbs; ++b) {
    pf.step();
    __m256i wq[8];
#pragma GCC unroll 8
    for (int j = 0; j < 8; ++j) wq[j] = load_vec(reinterpret_cast<const int8_t*>(st.q[b][j]));
    const __m256 sw = _mm256_load_ps(st.s[b]);
#pragma GCC unroll 8
    for (int t = 0; t < NT; ++t) {
      const Q8Block& ab = a[t][b0 + b];
      __m256i d = _mm256_set1_epi32(qsum[t][b]);
#pragma GCC unroll 8
      for (int j = 0; j < 8; ++j)  // the token's 4 quants broadcast from memory
        d = _mm256_dpbusd_epi32(d, wq[j], _mm256_broadcastd_epi32(_mm_loadu_si32(ab.q + 4 * j)));
      acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d), _mm256_mul_ps(sw, _mm256_set1_ps(ab.d)), acc[t]);
    }
  }
  for (int t = 0; t < NT; ++t) {
    float* o = out + t * ldo;
    if (rr == kRows8) {
      _mm256_storeu_ps(o, add ? _mm256_add_ps(_mm256_loadu_ps(o), acc[t]) : acc[t]);
    } else {
      alignas(32) float v[8];
      _mm256_store_ps(v, acc[t]);
      for (int r = 0; r < rr; ++r) o[r] = add ? o[r] + v[r] : v[r];
    }
  }
}

inline int32_t hsum_epi32(__m256i v) {
  __m128i x = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  x = _mm_add_epi32(x, _mm_shuffle_epi32(x, 0x4E));
  x = _mm_add_epi32(x, _mm_shuffle_epi32(x, 0xB1));
  return _mm_cvtsi128_si32(x);
}

template <DType T>
void q8tiles8(int64_t k, const uint8_t* w, int64_t row_bytes, int nr, const Q8Block* const* a, int nt,
              float* out, int64_t ldo) {
  Stage8 st;
  const int64_t nb = k / 32;
  // -128 x each token's block sums of quants, once per call (the rows of a call share them)
  thread_local std::vector<int32_t> sums;
  sums.resize(static_cast<size_t>(nt * nb));
  const __m256i ones = _mm256_set1_epi8(1);
  for (int t = 0; t < nt; ++t)
    for (int64_t b = 0; b < nb; ++b) {
      const __m256i l = _mm256_dpbusd_epi32(_mm256_setzero_si256(), ones, loadu256(a[t][b].q));
      sums[t * nb + b] = -128 * hsum_epi32(l);
    }
  for (int r0 = 0; r0 < nr; r0 += kRows8) {
    const int rr = std::min(nr - r0, kRows8);
    for (int64_t b0 = 0; b0 < nb; b0 += kSegBlocks) {
      const int nbs = static_cast<int>(std::min<int64_t>(nb - b0, kSegBlocks));
      stage_rows8<T>(w + r0 * row_bytes, row_bytes, rr, b0, nbs, st);
      const int steps = (nt + kTokens8 - 1) / kTokens8 * nbs;
      Prefetch pf = after_stage<T>(w, row_bytes, nr, r0, kRows8, nb, b0, steps);
      for (int t = 0; t < nt; t += kTokens8) {
        const int32_t* qs[kTokens8];
        for (int i = 0; i < kTokens8 && t + i < nt; ++i) qs[i] = sums.data() + (t + i) * nb + b0;
        float* o = out + t * ldo + r0;
        const bool add = b0 > 0;
        switch (std::min(nt - t, kTokens8)) {
          case 1: q8_tile8<1>(st, nbs, a + t, qs, b0, rr, o, ldo, add, pf); break;
          case 2: q8_tile8<2>(st, nbs, a + t, qs, b0, rr, o, ldo, add, pf); break;
          case 3: q8_tile8<3>(st, nbs, a + t, qs, b0, rr, o, ldo, add, pf); break;
          case 4: q8_tile8<4>(st, nbs, a + t, qs, b0, rr, o, ldo, add, pf); break;
          case 5: q8_tile8<5>(st, nbs, a + t, qs, b0, rr, o, ldo, add, pf); break;
          case 6: q8_tile8<6>(st, nbs, a + t, qs, b0, rr, o, ldo, add, pf); break;
          case 7: q8_tile8<7>(st, nbs, a + t, qs, b0, rr, o, ldo, add, pf); break;
          default: q8_tile8<8>(st, nbs, a + t, qs, b0, rr, o, ldo, add, pf); break;
        }
      }
    }
  }
}
#endif

template <DType T>
void q8tiles(int64_t k, const uint8_t* w, int64_t row_bytes, int nr, const Q8Block* const* a, int nt,
             float* out, int64_t ldo) {
  Stage st;
  const int64_t nb = k / 32;
  for (int r0 = 0; r0 < nr; r0 += kTileRows) {
    const int rr = nr - r0 < kTileRows ? nr - r0 : kTileRows;
    for (int64_t b0 = 0; b0 < nb; b0 += kSegBlocks) {
      const int nbs = static_cast<int>(nb - b0 < kSegBlocks ? nb - b0 : kSegBlocks);
      stage_rows<T>(w + r0 * row_bytes, row_bytes, rr, b0, nbs, st);
      const int steps = (nt + kTileTokens - 1) / kTileTokens * nbs;  // blocks the tiles walk
      Prefetch pf = after_stage<T>(w, row_bytes, nr, r0, kTileRows, nb, b0, steps);
      for (int t = 0; t < nt; t += kTileTokens) {
        float* o = out + t * ldo + r0;
        switch (nt - t < kTileTokens ? nt - t : kTileTokens) {
          case 1: q8_tile<T, 1>(st, nbs, a + t, b0, rr, o, ldo, b0 > 0, pf); break;
          case 2: q8_tile<T, 2>(st, nbs, a + t, b0, rr, o, ldo, b0 > 0, pf); break;
          case 3: q8_tile<T, 3>(st, nbs, a + t, b0, rr, o, ldo, b0 > 0, pf); break;
          default: q8_tile<T, 4>(st, nbs, a + t, b0, rr, o, ldo, b0 > 0, pf); break;  // 3, 4: VNNI only
        }
      }
    }
  }
}

template <DType T>
void q8dot(int64_t k, const void* w, int64_t row_bytes, int nr, const Q8Block* const* a, int nt, float* out,
           int64_t ldo) {
  const uint8_t* wb = static_cast<const uint8_t*>(w);
#ifdef GEMMA3_KERNELS_AVX512
  if constexpr (kRowLanes<T>)
    if (nt >= kQ8TileMinTokens) return q8tiles8<T>(k, wb, row_bytes, nr, a, nt, out, ldo);
#endif
  if (nt >= kQ8TileMinTokens) return q8tiles<T>(k, wb, row_bytes, nr, a, nt, out, ldo);
  for (int t = 0; t < nt; t += kMaxTile) {
    const Q8Block* const* at = a + t;
    float* ot = out + t * ldo;
    switch (nt - t) {
      case 1: q8rows_t<T, 1>(k, wb, row_bytes, nr, at, ot, ldo); break;
      case 2: q8rows_t<T, 2>(k, wb, row_bytes, nr, at, ot, ldo); break;
      case 3: q8rows_t<T, 3>(k, wb, row_bytes, nr, at, ot, ldo); break;
      default: q8rows_t<T, 4>(k, wb, row_bytes, nr, at, ot, ldo); break;
    }
  }
}

// x[0 .. k) -> k / 32 blocks: d = max|x| / 127, q = round-to-nearest(x / d) in -127..127.
void quantize_q8(const float* x, int64_t k, Q8Block* out) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  for (int64_t b = 0; b < k / 32; ++b, x += 32) {
    __m256 v[4];
    for (int j = 0; j < 4; ++j) v[j] = _mm256_loadu_ps(x + 8 * j);
    __m256 mx = _mm256_max_ps(_mm256_max_ps(_mm256_andnot_ps(sign, v[0]), _mm256_andnot_ps(sign, v[1])),
                              _mm256_max_ps(_mm256_andnot_ps(sign, v[2]), _mm256_andnot_ps(sign, v[3])));
    __m128 m4 = _mm_max_ps(_mm256_extractf128_ps(mx, 1), _mm256_castps256_ps128(mx));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
    const float amax = _mm_cvtss_f32(m4);
    const float d = amax / 127.0f;
    const __m256 id = _mm256_set1_ps(amax > 0.0f ? 127.0f / amax : 0.0f);
    out[b].d = d;
    out[b].sum = hsum(_mm256_add_ps(_mm256_add_ps(v[0], v[1]), _mm256_add_ps(v[2], v[3])));
    __m256i i[4];
    for (int j = 0; j < 4; ++j)
      i[j] = _mm256_cvtps_epi32(
          _mm256_round_ps(_mm256_mul_ps(v[j], id), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    // packs works per 128-bit lane: the bytes come out as 0-3 8-11 16-19 24-27 4-7 12-15 20-23
    // 28-31 (in groups of 4 elements); the permute puts them back in order.
    const __m256i q = _mm256_packs_epi16(_mm256_packs_epi32(i[0], i[1]), _mm256_packs_epi32(i[2], i[3]));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out[b].q),
                        _mm256_permutevar8x32_epi32(q, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
  }
}

// ---- float weights x fp32 activations ------------------------------------------------------

enum FloatKind { kKindF32, kKindF16, kKindBF16 };

template <int Kind>
inline __m256 load8(const uint8_t* w, int64_t i) {
  if constexpr (Kind == kKindF32) {
    return _mm256_loadu_ps(reinterpret_cast<const float*>(w) + i);
  } else if constexpr (Kind == kKindF16) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + 2 * i)));
  } else {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + 2 * i));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  }
}

template <int Kind>
inline float load1(const uint8_t* w, int64_t i) {
  if constexpr (Kind == kKindF32) {
    return reinterpret_cast<const float*>(w)[i];
  } else {
    uint16_t h;
    std::memcpy(&h, w + 2 * i, 2);
    if constexpr (Kind == kKindF16) return _cvtsh_ss(h);
    uint32_t u = static_cast<uint32_t>(h) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
}

template <int NT, int Kind>
void float_t(int64_t k, const uint8_t* w, const float* const* a, float* out) {
  __m256 acc[NT];
  for (int t = 0; t < NT; ++t) acc[t] = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= k; i += 8) {
    const __m256 wv = load8<Kind>(w, i);
    for (int t = 0; t < NT; ++t) acc[t] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(a[t] + i), acc[t]);
  }
  for (int t = 0; t < NT; ++t) {
    float s = hsum(acc[t]);
    for (int64_t j = i; j < k; ++j) s += load1<Kind>(w, j) * a[t][j];
    out[t] = s;
  }
}

template <int Kind>
void float_dot(int64_t k, const void* w, const void* const* a, int nt, float* out) {
  const uint8_t* wb = static_cast<const uint8_t*>(w);
  const float* const* x = reinterpret_cast<const float* const*>(a);
  switch (nt) {
    case 1: return float_t<1, Kind>(k, wb, x, out);
    case 2: return float_t<2, Kind>(k, wb, x, out);
    case 3: return float_t<3, Kind>(k, wb, x, out);
    default: return float_t<4, Kind>(k, wb, x, out);
  }
}

void f32_dot(int64_t k, const void* w, const void* const* a, int nt, float* out) {
  float_dot<kKindF32>(k, w, a, nt, out);
}
void f16_dot(int64_t k, const void* w, const void* const* a, int nt, float* out) {
  float_dot<kKindF16>(k, w, a, nt, out);
}
void bf16_dot(int64_t k, const void* w, const void* const* a, int nt, float* out) {
  float_dot<kKindBF16>(k, w, a, nt, out);
}

// ---- dequantization to fp32 rows (the prefill GEMM's weight panels) -------------------------

// out[0 .. 32) = the block's fp32 values. Multiply then subtract, as the reference rounds.
inline void put32(const Blk& blk, float* out) {
  __m256 f[4];
  to_f32(blk.q, f);
  const __m256 s_lo = _mm256_set1_ps(blk.s_lo), s_hi = _mm256_set1_ps(blk.s_hi), m = _mm256_set1_ps(blk.m);
  _mm256_storeu_ps(out, _mm256_sub_ps(_mm256_mul_ps(f[0], s_lo), m));
  _mm256_storeu_ps(out + 8, _mm256_sub_ps(_mm256_mul_ps(f[1], s_lo), m));
  _mm256_storeu_ps(out + 16, _mm256_sub_ps(_mm256_mul_ps(f[2], s_hi), m));
  _mm256_storeu_ps(out + 24, _mm256_sub_ps(_mm256_mul_ps(f[3], s_hi), m));
}

template <DType T>
void deq(const void* w, int64_t k, float* y) {
  each_block<T>(static_cast<const uint8_t*>(w), k,
                [y](int64_t b, const Blk& blk) { put32(blk, y + b * 32); });
}

void deq_f16(const void* w, int64_t k, float* y) {
  const uint8_t* p = static_cast<const uint8_t*>(w);
  int64_t i = 0;
  for (; i + 8 <= k; i += 8) _mm256_storeu_ps(y + i, load8<kKindF16>(p, i));
  for (; i < k; ++i) y[i] = load1<kKindF16>(p, i);
}

void deq_bf16(const void* w, int64_t k, float* y) {
  const uint8_t* p = static_cast<const uint8_t*>(w);
  int64_t i = 0;
  for (; i + 8 <= k; i += 8) _mm256_storeu_ps(y + i, load8<kKindBF16>(p, i));
  for (; i < k; ++i) y[i] = load1<kKindBF16>(p, i);
}

// ---- fp32 GEMM -----------------------------------------------------------------------------

// The panel's rows transposed to wp[k][kGemmPanel] (rows >= nr zero), so one k step of the
// kernel loads 16 rows' weights as two vectors. 8x8 blocks through registers.
void pack_panel(const float* w, int64_t ldw, int nr, int64_t k, float* wp) {
  int64_t i = 0;
  for (; i + 8 <= k; i += 8)
    for (int g = 0; g < kGemmPanel / 8; ++g) {
      __m256 r[8];
      for (int j = 0; j < 8; ++j)
        r[j] = 8 * g + j < nr ? _mm256_loadu_ps(w + (8 * g + j) * ldw + i) : _mm256_setzero_ps();
      const __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
      const __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
      const __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
      const __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
      const __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE);
      const __m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE);
      const __m256 u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE);
      const __m256 u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
      float* o = wp + i * kGemmPanel + 8 * g;  // column c of the block -> o + c * kGemmPanel
      _mm256_storeu_ps(o + 0 * kGemmPanel, _mm256_permute2f128_ps(u0, u4, 0x20));
      _mm256_storeu_ps(o + 1 * kGemmPanel, _mm256_permute2f128_ps(u1, u5, 0x20));
      _mm256_storeu_ps(o + 2 * kGemmPanel, _mm256_permute2f128_ps(u2, u6, 0x20));
      _mm256_storeu_ps(o + 3 * kGemmPanel, _mm256_permute2f128_ps(u3, u7, 0x20));
      _mm256_storeu_ps(o + 4 * kGemmPanel, _mm256_permute2f128_ps(u0, u4, 0x31));
      _mm256_storeu_ps(o + 5 * kGemmPanel, _mm256_permute2f128_ps(u1, u5, 0x31));
      _mm256_storeu_ps(o + 6 * kGemmPanel, _mm256_permute2f128_ps(u2, u6, 0x31));
      _mm256_storeu_ps(o + 7 * kGemmPanel, _mm256_permute2f128_ps(u3, u7, 0x31));
    }
  for (; i < k; ++i)
    for (int r = 0; r < kGemmPanel; ++r) wp[i * kGemmPanel + r] = r < nr ? w[r * ldw + i] : 0.0f;
}

// NT tokens x 16 rows: 2 * NT accumulators (12 of the 16 ymm registers at NT = 6), two weight
// vectors per k step each serving NT tokens, one broadcast activation serving 16 rows: 8 loads
// per 12 FMAs, no horizontal sums (the lanes are output rows).
template <int NT>
void gemm_tile(const float* wp, const float* x, int64_t ldx, int64_t k, int nr, float* out, int64_t ldo) {
  // Named per token and fully unrolled: GCC keeps a 2-D accumulator array on the stack.
  __m256 a0[NT], a1[NT];
  const float* xt[NT];
#pragma GCC unroll 8
  for (int t = 0; t < NT; ++t) a0[t] = a1[t] = _mm256_setzero_ps(), xt[t] = x + t * ldx;
  for (int64_t i = 0; i < k; ++i) {
    const __m256 w0 = _mm256_loadu_ps(wp + i * kGemmPanel), w1 = _mm256_loadu_ps(wp + i * kGemmPanel + 8);
#pragma GCC unroll 8
    for (int t = 0; t < NT; ++t) {
      const __m256 xv = _mm256_broadcast_ss(xt[t] + i);
      a0[t] = _mm256_fmadd_ps(w0, xv, a0[t]);
      a1[t] = _mm256_fmadd_ps(w1, xv, a1[t]);
    }
  }
  if (nr == kGemmPanel) {
#pragma GCC unroll 8
    for (int t = 0; t < NT; ++t) {
      _mm256_storeu_ps(out + t * ldo, a0[t]);
      _mm256_storeu_ps(out + t * ldo + 8, a1[t]);
    }
    return;
  }
  float tmp[NT][kGemmPanel];
#pragma GCC unroll 8
  for (int t = 0; t < NT; ++t) {
    _mm256_storeu_ps(tmp[t], a0[t]);
    _mm256_storeu_ps(tmp[t] + 8, a1[t]);
  }
  for (int t = 0; t < NT; ++t)
    for (int r = 0; r < nr; ++r) out[t * ldo + r] = tmp[t][r];
}

constexpr int kGemmTokens = 6;

// The panel is packed once (scratch: kGemmPanel * k floats) and stays in L2 while every group
// of kGemmTokens tokens passes over it.
void gemm_f32(const float* w, int64_t ldw, int nr, const float* x, int64_t ldx, int nt, int64_t k, float* out,
              int64_t ldo, float* scratch) {
  pack_panel(w, ldw, nr, k, scratch);
  for (int t = 0; t < nt; t += kGemmTokens) {
    const float* xt = x + t * ldx;
    float* ot = out + t * ldo;
    switch (nt - t < kGemmTokens ? nt - t : kGemmTokens) {
      case 1: gemm_tile<1>(scratch, xt, ldx, k, nr, ot, ldo); break;
      case 2: gemm_tile<2>(scratch, xt, ldx, k, nr, ot, ldo); break;
      case 3: gemm_tile<3>(scratch, xt, ldx, k, nr, ot, ldo); break;
      case 4: gemm_tile<4>(scratch, xt, ldx, k, nr, ot, ldo); break;
      case 5: gemm_tile<5>(scratch, xt, ldx, k, nr, ot, ldo); break;
      default: gemm_tile<6>(scratch, xt, ldx, k, nr, ot, ldo); break;
    }
  }
}

// ---- fp32 helpers ---------------------------------------------------------------------------

float dot_f32(const float* a, const float* b, int64_t n) {
  __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
    s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), s1);
  }
  for (; i + 8 <= n; i += 8) s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
  float s = hsum(_mm256_add_ps(s0, s1));
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

void axpy_f32(float a, const float* x, float* y, int64_t n) {
  const __m256 av = _mm256_set1_ps(a);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(y + i, _mm256_fmadd_ps(av, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
  for (; i < n; ++i) y[i] += a * x[i];
}

void bf16_row(const uint16_t* src, float* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i));
    _mm256_storeu_ps(dst + i, _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16)));
  }
  for (; i < n; ++i) {
    uint32_t u = static_cast<uint32_t>(src[i]) << 16;
    std::memcpy(dst + i, &u, 4);
  }
}

// exp(x) to ~2 ulp (Cephes expf: range reduction by ln 2 in two parts, degree-6 polynomial).
inline __m256 exp256(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.3f));
  __m256 fx = _mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f));
  fx = _mm256_floor_ps(fx);
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), x);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(fx), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

inline float exp1(float x) {
  float buf[8] = {x, 0, 0, 0, 0, 0, 0, 0};
  _mm256_storeu_ps(buf, exp256(_mm256_loadu_ps(buf)));
  return buf[0];
}

// gelu_tanh(x) = 0.5 x (1 + tanh(y)) = x / (1 + exp(-2y)), y = sqrt(2/pi) (x + 0.044715 x^3).
void gelu_gate(const float* g, const float* u, int64_t n, float* out) {
  const __m256 c0 = _mm256_set1_ps(-2.0f * 0.7978845608028654f), c1 = _mm256_set1_ps(0.044715f),
               one = _mm256_set1_ps(1.0f);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 x = _mm256_loadu_ps(g + i);
    const __m256 y = _mm256_mul_ps(c0, _mm256_fmadd_ps(_mm256_mul_ps(c1, x), _mm256_mul_ps(x, x), x));
    const __m256 gl = _mm256_div_ps(x, _mm256_add_ps(one, exp256(y)));
    _mm256_storeu_ps(out + i, _mm256_mul_ps(gl, _mm256_loadu_ps(u + i)));
  }
  for (; i < n; ++i) {
    const float x = g[i];
    const float y = -2.0f * 0.7978845608028654f * (x + 0.044715f * x * x * x);
    out[i] = x / (1.0f + exp1(y)) * u[i];
  }
}

float exp_sub_sum(float* x, int64_t n, float max) {
  const __m256 mv = _mm256_set1_ps(max);
  __m256 s = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 e = exp256(_mm256_sub_ps(_mm256_loadu_ps(x + i), mv));
    _mm256_storeu_ps(x + i, e);
    s = _mm256_add_ps(s, e);
  }
  float sum = hsum(s);
  for (; i < n; ++i) sum += (x[i] = exp1(x[i] - max));
  return sum;
}

}  // namespace
}  // namespace gemma3::cpu

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

namespace gemma3::cpu {
namespace {

KernelSet make_table() {
  KernelSet k{};
  k.name = GEMMA3_KERNELS_NAME;
  auto set = [&k](DType t, DotFn fn) { k.dot[static_cast<int>(t)] = fn; };
  set(DType::kF32, f32_dot);
  set(DType::kF16, f16_dot);
  set(DType::kBF16, bf16_dot);
  set(DType::kQ8_0, q8_0f);
  set(DType::kQ4_0, qdot<DType::kQ4_0>);
  set(DType::kQ5_0, qdot<DType::kQ5_0>);
  set(DType::kQ4_K, qdot<DType::kQ4_K>);
  set(DType::kQ5_K, qdot<DType::kQ5_K>);
  set(DType::kQ6_K, qdot<DType::kQ6_K>);
  auto set8 = [&k](DType t, DotQ8Fn fn) { k.dot_q8[static_cast<int>(t)] = fn; };
  set8(DType::kQ8_0, q8dot<DType::kQ8_0>);
  set8(DType::kQ4_0, q8dot<DType::kQ4_0>);
  set8(DType::kQ5_0, q8dot<DType::kQ5_0>);
  set8(DType::kQ4_K, q8dot<DType::kQ4_K>);
  set8(DType::kQ5_K, q8dot<DType::kQ5_K>);
  set8(DType::kQ6_K, q8dot<DType::kQ6_K>);
  k.quantize_q8 = quantize_q8;
  k.dequant[static_cast<int>(DType::kF16)] = deq_f16;
  k.dequant[static_cast<int>(DType::kBF16)] = deq_bf16;
  k.dequant[static_cast<int>(DType::kQ8_0)] = deq<DType::kQ8_0>;
  k.dequant[static_cast<int>(DType::kQ4_0)] = deq<DType::kQ4_0>;
  k.dequant[static_cast<int>(DType::kQ5_0)] = deq<DType::kQ5_0>;
  k.dequant[static_cast<int>(DType::kQ4_K)] = deq<DType::kQ4_K>;
  k.dequant[static_cast<int>(DType::kQ5_K)] = deq<DType::kQ5_K>;
  k.dequant[static_cast<int>(DType::kQ6_K)] = deq<DType::kQ6_K>;
  k.gemm_f32 = gemm_f32;
  k.dot_f32 = dot_f32;
  k.axpy_f32 = axpy_f32;
  k.bf16_to_f32 = bf16_row;
  k.gelu_gate = gelu_gate;
  k.exp_sub_sum = exp_sub_sum;
  return k;
}

}  // namespace

const KernelSet* GEMMA3_KERNELS_TABLE() {
  static const KernelSet k = make_table();
  return &k;
}

}  // namespace gemma3::cpu

#else  // !GEMMA3_HAVE_AVX2_TU

namespace gemma3::cpu {
const KernelSet* GEMMA3_KERNELS_TABLE() { return nullptr; }
}  // namespace gemma3::cpu

#endif
