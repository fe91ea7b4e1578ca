// AVX2 + FMA + F16C kernels. This whole translation unit is compiled for that ISA through
// `#pragma GCC target` (CMake needs no per-file flags); nothing here may run before
// cpu_has_avx2() said yes, so only plain functions are defined after the pragma (no inline
// library templates whose AVX2 copies could be picked by the linker for other callers).
//
// Weight decoding follows ggml's block layouts (formats.md §3; the reference dequantizers in
// core/quant.cpp): each 32-element sub-block becomes 32 int8 lanes, widened to int16 and
// multiplied by the int16 activations with madd_epi16 into int32 lanes, then scaled in fp32
// by d_weight * d_activation.
#include <cstdint>
#include <cstring>

#include "backend/cpu/cpu_kernels.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define GEMMA3_HAVE_AVX2_TU 1
#endif

#ifdef GEMMA3_HAVE_AVX2_TU
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
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

// Weights of one 32-element block as two int16 vectors (elements 0..15, 16..31).
struct W16 {
  __m256i lo, hi;
};
inline W16 widen_signed(__m256i w) {
  return {_mm256_cvtepi8_epi16(_mm256_castsi256_si128(w)),
          _mm256_cvtepi8_epi16(_mm256_extracti128_si256(w, 1))};
}
inline W16 widen_unsigned(__m256i w) {
  return {_mm256_cvtepu8_epi16(_mm256_castsi256_si128(w)),
          _mm256_cvtepu8_epi16(_mm256_extracti128_si256(w, 1))};
}
// 8 fp32 lanes whose sum is sum_i w[i] * q[i] over the block (exact in int32).
inline __m256 dot16(const W16& w, const int16_t* q) {
  const __m256i p =
      _mm256_add_epi32(_mm256_madd_epi16(w.lo, loadu256(q)), _mm256_madd_epi16(w.hi, loadu256(q + 16)));
  return _mm256_cvtepi32_ps(p);
}

// ---- activation quantizer -----------------------------------------------------------------

void quantize_q16a(const float* x, int64_t k, BlockQ16A* dst) {
  const __m256 sign_mask = _mm256_set1_ps(-0.0f);
  for (int64_t b = 0; b < k / 32; ++b) {
    const float* v = x + b * 32;
    __m256 v0 = _mm256_loadu_ps(v), v1 = _mm256_loadu_ps(v + 8), v2 = _mm256_loadu_ps(v + 16),
           v3 = _mm256_loadu_ps(v + 24);
    __m256 m = _mm256_max_ps(_mm256_max_ps(_mm256_andnot_ps(sign_mask, v0), _mm256_andnot_ps(sign_mask, v1)),
                             _mm256_max_ps(_mm256_andnot_ps(sign_mask, v2), _mm256_andnot_ps(sign_mask, v3)));
    __m128 m4 = _mm_max_ps(_mm256_extractf128_ps(m, 1), _mm256_castps256_ps128(m));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
    const float amax = _mm_cvtss_f32(m4);
    const float d = amax / 32767.0f, id = amax > 0 ? 32767.0f / amax : 0.0f;
    const __m256 mul = _mm256_set1_ps(id);
    constexpr int kRound = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
    __m256i i0 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v0, mul), kRound));
    __m256i i1 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v1, mul), kRound));
    __m256i i2 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v2, mul), kRound));
    __m256i i3 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v3, mul), kRound));
    const __m256i sum = _mm256_add_epi32(_mm256_add_epi32(i0, i1), _mm256_add_epi32(i2, i3));
    __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(sum), _mm256_extracti128_si256(sum, 1));
    s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4E));
    s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xB1));
    // packs interleave 128-bit lanes; the permute restores element order.
    i0 = _mm256_permute4x64_epi64(_mm256_packs_epi32(i0, i1), 0xD8);
    i2 = _mm256_permute4x64_epi64(_mm256_packs_epi32(i2, i3), 0xD8);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst[b].q), i0);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst[b].q + 16), i2);
    dst[b].d = d;
    dst[b].s = d * static_cast<float>(_mm_cvtsi128_si32(s4));
  }
}

// ---- quantized dot kernels: one weight row x NT activation rows ----------------------------

using Acts = const BlockQ16A* const*;

template <int NT>
void q8_0_t(int64_t k, const uint8_t* w, Acts a, float* out) {
  __m256 acc[NT];
  for (int t = 0; t < NT; ++t) acc[t] = _mm256_setzero_ps();
  for (int64_t b = 0; b < k / 32; ++b) {
    const uint8_t* blk = w + b * 34;
    const float dw = load_f16(blk);
    const __m256i ws = loadu256(blk + 2);
    const W16 w16 = widen_signed(ws);
    for (int t = 0; t < NT; ++t) {
      const BlockQ16A& x = a[t][b];
      acc[t] = _mm256_fmadd_ps(_mm256_set1_ps(dw * x.d), dot16(w16, x.q), acc[t]);
    }
  }
  for (int t = 0; t < NT; ++t) out[t] = hsum(acc[t]);
}

// Q8_0 against fp32 activations: the weights are exact int8 x scale, so this path adds no
// activation rounding at all (the tiny Q8_0 goldens hold to 1e-4). The Q8_0 tensors of the
// checkpoints we run are the LM head and V: memory-bound in decode either way.
template <int NT>
void q8_0f_t(int64_t k, const uint8_t* w, const float* const* a, float* out) {
  // Independent FMA chains per token: with one token, four (one per 8-lane part) so the FMA
  // latency does not bound the LM head's streaming rate; with more tokens, they already are.
  constexpr int kChains = NT == 1 ? 4 : NT == 2 ? 2 : 1;
  __m256 acc[kChains][NT];
  for (int c = 0; c < kChains; ++c)
    for (int t = 0; t < NT; ++t) acc[c][t] = _mm256_setzero_ps();
  for (int64_t b = 0; b < k / 32; ++b) {
    const uint8_t* blk = w + b * 34;
    const __m256 dw = _mm256_set1_ps(load_f16(blk));
    for (int part = 0; part < 4; ++part) {
      const __m128i q8 = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(blk + 2 + 8 * part));
      const __m256 wf = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q8)), dw);
      for (int t = 0; t < NT; ++t)
        acc[part % kChains][t] =
            _mm256_fmadd_ps(wf, _mm256_loadu_ps(a[t] + b * 32 + 8 * part), acc[part % kChains][t]);
    }
  }
  for (int t = 0; t < NT; ++t) {
    __m256 sum = acc[0][t];
    for (int c = 1; c < kChains; ++c) sum = _mm256_add_ps(sum, acc[c][t]);
    out[t] = hsum(sum);
  }
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

template <int NT>
void q4_0_t(int64_t k, const uint8_t* w, Acts a, float* out) {
  __m256 acc[NT];
  for (int t = 0; t < NT; ++t) acc[t] = _mm256_setzero_ps();
  for (int64_t b = 0; b < k / 32; ++b) {
    const uint8_t* blk = w + b * 18;
    const float dw = load_f16(blk);
    const __m256i ws = _mm256_sub_epi8(bytes_from_nibbles_32(blk + 2), _mm256_set1_epi8(8));
    const W16 w16 = widen_signed(ws);
    for (int t = 0; t < NT; ++t) {
      const BlockQ16A& x = a[t][b];
      acc[t] = _mm256_fmadd_ps(_mm256_set1_ps(dw * x.d), dot16(w16, x.q), acc[t]);
    }
  }
  for (int t = 0; t < NT; ++t) out[t] = hsum(acc[t]);
}

template <int NT>
void q5_0_t(int64_t k, const uint8_t* w, Acts a, float* out) {
  __m256 acc[NT];
  for (int t = 0; t < NT; ++t) acc[t] = _mm256_setzero_ps();
  for (int64_t b = 0; b < k / 32; ++b) {
    const uint8_t* blk = w + b * 22;  // d, qh u32, qs[16]
    const float dw = load_f16(blk);
    // q - 16 as int8: the 5th bit clear means the value is negative (0xF0 | low nibble).
    const __m256i hi =
        _mm256_andnot_si256(bytes_from_bits_32(blk + 2), _mm256_set1_epi8(static_cast<char>(0xF0)));
    const __m256i ws = _mm256_or_si256(bytes_from_nibbles_32(blk + 6), hi);
    const W16 w16 = widen_signed(ws);
    for (int t = 0; t < NT; ++t) {
      const BlockQ16A& x = a[t][b];
      acc[t] = _mm256_fmadd_ps(_mm256_set1_ps(dw * x.d), dot16(w16, x.q), acc[t]);
    }
  }
  for (int t = 0; t < NT; ++t) out[t] = hsum(acc[t]);
}

// Q4_K / Q5_K 6-bit (scale, min) pairs of the 8 sub-blocks (get_scale_min_k4).
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

template <int NT>
void q4_k_t(int64_t k, const uint8_t* w, Acts a, float* out) {
  __m256 acc[NT];
  float mins[NT];
  for (int t = 0; t < NT; ++t) acc[t] = _mm256_setzero_ps(), mins[t] = 0;
  const __m256i m4 = _mm256_set1_epi8(0x0F);
  for (int64_t sb = 0; sb < k / 256; ++sb) {
    const uint8_t* blk = w + sb * 144;  // d, dmin, scales[12], qs[128]
    float sc[8], mn[8];
    k4_scales(blk + 4, load_f16(blk), load_f16(blk + 2), sc, mn);
    const uint8_t* qs = blk + 16;
    for (int j = 0; j < 4; ++j) {
      const __m256i q4 = loadu256(qs + 32 * j);
      const __m256i lo = _mm256_and_si256(q4, m4), hi = _mm256_and_si256(_mm256_srli_epi16(q4, 4), m4);
      const W16 wl = widen_unsigned(lo), wh = widen_unsigned(hi);
      for (int t = 0; t < NT; ++t) {
        const BlockQ16A& x0 = a[t][sb * 8 + 2 * j];
        const BlockQ16A& x1 = a[t][sb * 8 + 2 * j + 1];
        acc[t] = _mm256_fmadd_ps(_mm256_set1_ps(sc[2 * j] * x0.d), dot16(wl, x0.q), acc[t]);
        acc[t] = _mm256_fmadd_ps(_mm256_set1_ps(sc[2 * j + 1] * x1.d), dot16(wh, x1.q), acc[t]);
        mins[t] += mn[2 * j] * x0.s + mn[2 * j + 1] * x1.s;
      }
    }
  }
  for (int t = 0; t < NT; ++t) out[t] = hsum(acc[t]) - mins[t];
}

template <int NT>
void q5_k_t(int64_t k, const uint8_t* w, Acts a, float* out) {
  __m256 acc[NT];
  float mins[NT];
  for (int t = 0; t < NT; ++t) acc[t] = _mm256_setzero_ps(), mins[t] = 0;
  const __m256i m4 = _mm256_set1_epi8(0x0F), m1 = _mm256_set1_epi8(1);
  for (int64_t sb = 0; sb < k / 256; ++sb) {
    const uint8_t* blk = w + sb * 176;  // d, dmin, scales[12], qh[32], qs[128]
    float sc[8], mn[8];
    k4_scales(blk + 4, load_f16(blk), load_f16(blk + 2), sc, mn);
    __m256i hb = loadu256(blk + 16);
    const uint8_t* qs = blk + 48;
    for (int j = 0; j < 4; ++j) {
      const __m256i q4 = loadu256(qs + 32 * j);
      const __m256i lo =
          _mm256_or_si256(_mm256_and_si256(q4, m4), _mm256_slli_epi16(_mm256_and_si256(hb, m1), 4));
      const __m256i hi =
          _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(q4, 4), m4),
                          _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hb, 1), m1), 4));
      hb = _mm256_srli_epi16(hb, 2);
      const W16 wl = widen_unsigned(lo), wh = widen_unsigned(hi);
      for (int t = 0; t < NT; ++t) {
        const BlockQ16A& x0 = a[t][sb * 8 + 2 * j];
        const BlockQ16A& x1 = a[t][sb * 8 + 2 * j + 1];
        acc[t] = _mm256_fmadd_ps(_mm256_set1_ps(sc[2 * j] * x0.d), dot16(wl, x0.q), acc[t]);
        acc[t] = _mm256_fmadd_ps(_mm256_set1_ps(sc[2 * j + 1] * x1.d), dot16(wh, x1.q), acc[t]);
        mins[t] += mn[2 * j] * x0.s + mn[2 * j + 1] * x1.s;
      }
    }
  }
  for (int t = 0; t < NT; ++t) out[t] = hsum(acc[t]) - mins[t];
}

template <int NT>
void q6_k_t(int64_t k, const uint8_t* w, Acts a, float* out) {
  __m256 acc[NT];
  for (int t = 0; t < NT; ++t) acc[t] = _mm256_setzero_ps();
  const __m256i m4 = _mm256_set1_epi8(0x0F), m3 = _mm256_set1_epi8(3), m30 = _mm256_set1_epi8(0x30),
                k32 = _mm256_set1_epi8(32);
  for (int64_t sb = 0; sb < k / 256; ++sb) {
    const uint8_t* blk = w + sb * 210;  // ql[128], qh[64], scales[16] int8, d
    const float d = load_f16(blk + 208);
    for (int n = 0; n < 2; ++n) {
      const uint8_t* ql = blk + 64 * n;
      const uint8_t* qh = blk + 128 + 32 * n;
      const int8_t* sc = reinterpret_cast<const int8_t*>(blk + 192) + 8 * n;
      const __m256i l0 = loadu256(ql), l1 = loadu256(ql + 32), h = loadu256(qh);
      __m256i q[4];
      q[0] = _mm256_or_si256(_mm256_and_si256(l0, m4), _mm256_slli_epi16(_mm256_and_si256(h, m3), 4));
      q[1] = _mm256_or_si256(_mm256_and_si256(l1, m4), _mm256_and_si256(_mm256_slli_epi16(h, 2), m30));
      q[2] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l0, 4), m4), _mm256_and_si256(h, m30));
      q[3] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l1, 4), m4),
                             _mm256_and_si256(_mm256_srli_epi16(h, 2), m30));
      for (int kk = 0; kk < 4; ++kk) {
        // (q - 32) * scale, the scale of elements 0..15 being sc[2kk], of 16..31 sc[2kk+1]:
        // |value| <= 32 * 128, so products with int16 activations still fit int32 pairs.
        W16 w16 = widen_signed(_mm256_sub_epi8(q[kk], k32));
        w16.lo = _mm256_mullo_epi16(w16.lo, _mm256_set1_epi16(sc[2 * kk]));
        w16.hi = _mm256_mullo_epi16(w16.hi, _mm256_set1_epi16(sc[2 * kk + 1]));
        for (int t = 0; t < NT; ++t) {
          const BlockQ16A& x = a[t][sb * 8 + n * 4 + kk];
          acc[t] = _mm256_fmadd_ps(_mm256_set1_ps(d * x.d), dot16(w16, x.q), acc[t]);
        }
      }
    }
  }
  for (int t = 0; t < NT; ++t) out[t] = hsum(acc[t]);
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

// nt (1..kMaxTile) -> the template instance.
#define GEMMA3_Q_DOT(name)                                                        \
  void name(int64_t k, const void* w, const void* const* a, int nt, float* out) { \
    const uint8_t* wb = static_cast<const uint8_t*>(w);                           \
    Acts x = reinterpret_cast<Acts>(a);                                           \
    switch (nt) {                                                                 \
      case 1: return name##_t<1>(k, wb, x, out);                                  \
      case 2: return name##_t<2>(k, wb, x, out);                                  \
      case 3: return name##_t<3>(k, wb, x, out);                                  \
      default: return name##_t<4>(k, wb, x, out);                                 \
    }                                                                             \
  }
GEMMA3_Q_DOT(q4_0)
GEMMA3_Q_DOT(q5_0)
GEMMA3_Q_DOT(q4_k)
GEMMA3_Q_DOT(q5_k)
GEMMA3_Q_DOT(q6_k)
#undef GEMMA3_Q_DOT

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

KernelSet make_avx2() {
  KernelSet k{};
  k.name = "avx2";
  k.quantize_q16a = quantize_q16a;
  auto set = [&k](DType t, DotFn fn, bool q8) {
    k.dot[static_cast<int>(t)] = fn;
    k.q16_acts[static_cast<int>(t)] = q8;
  };
  set(DType::kF32, f32_dot, false);
  set(DType::kF16, f16_dot, false);
  set(DType::kBF16, bf16_dot, false);
  set(DType::kQ8_0, q8_0f, false);  // q8_0_t (int16 activations) is the faster prefill option
  set(DType::kQ4_0, q4_0, true);
  set(DType::kQ5_0, q5_0, true);
  set(DType::kQ4_K, q4_k, true);
  set(DType::kQ5_K, q5_k, true);
  set(DType::kQ6_K, q6_k, true);
  k.dot_f32 = dot_f32;
  k.axpy_f32 = axpy_f32;
  k.bf16_to_f32 = bf16_row;
  k.gelu_gate = gelu_gate;
  k.exp_sub_sum = exp_sub_sum;
  return k;
}

}  // namespace

const KernelSet* avx2_kernels() {
  static const KernelSet k = make_avx2();
  return &k;
}

}  // namespace gemma3::cpu

#else  // !GEMMA3_HAVE_AVX2_TU

namespace gemma3::cpu {
const KernelSet* avx2_kernels() { return nullptr; }
}  // namespace gemma3::cpu

#endif
