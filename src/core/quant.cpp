// Scalar reference dequantizers/quantizers. Every formula cites docs/formats.md §3; the block
// layouts are ggml's (ggml-common.h), read byte by byte so no struct packing or alignment is
// assumed.
#include "core/quant.h"

#include <algorithm>
#include <cmath>
#include <cstring>

namespace gemma3 {
namespace {

constexpr int kQK = 32;    // legacy block size
constexpr int kQKK = 256;  // K-quant super-block size

// IQ4_NL / IQ4_XS non-linear 4-bit codebook (docs/formats.md §3.4, ggml kvalues_iq4nl).
constexpr int8_t kIq4nlTable[16] = {-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113};

inline float load_f16(const uint8_t* p) { return f16_to_f32(static_cast<uint16_t>(p[0] | (p[1] << 8))); }
inline void store_f16(uint8_t* p, uint16_t h) {
  p[0] = static_cast<uint8_t>(h & 0xFF);
  p[1] = static_cast<uint8_t>(h >> 8);
}
inline uint32_t load_u32(const uint8_t* p) {
  return static_cast<uint32_t>(p[0]) | (static_cast<uint32_t>(p[1]) << 8) |
         (static_cast<uint32_t>(p[2]) << 16) | (static_cast<uint32_t>(p[3]) << 24);
}
inline void store_u32(uint8_t* p, uint32_t v) {
  for (int i = 0; i < 4; ++i) p[i] = static_cast<uint8_t>(v >> (8 * i));
}

// Legacy nibble order (§3.2): byte j holds element j (low) and element j+16 (high).
inline int legacy_nibble(const uint8_t* qs, int e) { return e < 16 ? (qs[e] & 0xF) : (qs[e - 16] >> 4); }

// Q4_K/Q5_K 6-bit (scale, min) of 32-element sub-block j (§3.3, get_scale_min_k4).
inline void scale_min_k4(int j, const uint8_t* s, int* sc, int* mn) {
  if (j < 4) {
    *sc = s[j] & 63;
    *mn = s[j + 4] & 63;
  } else {
    *sc = (s[j + 4] & 0xF) | ((s[j - 4] >> 6) << 4);
    *mn = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
  }
}

// ---- dequantizers: one block each; x points at the block, y at its first output -------------

void deq_q4_0(const uint8_t* x, float* y) {  // 18 bytes: d, qs[16]
  float d = load_f16(x);
  for (int e = 0; e < kQK; ++e) y[e] = static_cast<float>(legacy_nibble(x + 2, e) - 8) * d;
}

void deq_q4_1(const uint8_t* x, float* y) {  // 20 bytes: d, m, qs[16]
  float d = load_f16(x), m = load_f16(x + 2);
  for (int e = 0; e < kQK; ++e) y[e] = static_cast<float>(legacy_nibble(x + 4, e)) * d + m;
}

void deq_q5_0(const uint8_t* x, float* y) {  // 22 bytes: d, qh u32, qs[16]
  float d = load_f16(x);
  uint32_t qh = load_u32(x + 2);
  for (int e = 0; e < kQK; ++e) {
    int q = legacy_nibble(x + 6, e) | static_cast<int>(((qh >> e) & 1) << 4);
    y[e] = static_cast<float>(q - 16) * d;
  }
}

void deq_q5_1(const uint8_t* x, float* y) {  // 24 bytes: d, m, qh u32, qs[16]
  float d = load_f16(x), m = load_f16(x + 2);
  uint32_t qh = load_u32(x + 4);
  for (int e = 0; e < kQK; ++e) {
    int q = legacy_nibble(x + 8, e) | static_cast<int>(((qh >> e) & 1) << 4);
    y[e] = static_cast<float>(q) * d + m;
  }
}

void deq_q8_0(const uint8_t* x, float* y) {  // 34 bytes: d, qs[32] int8
  float d = load_f16(x);
  for (int e = 0; e < kQK; ++e) y[e] = static_cast<float>(static_cast<int8_t>(x[2 + e])) * d;
}

void deq_iq4_nl(const uint8_t* x, float* y) {  // 18 bytes: d, qs[16]
  float d = load_f16(x);
  for (int e = 0; e < kQK; ++e) y[e] = d * static_cast<float>(kIq4nlTable[legacy_nibble(x + 2, e)]);
}

void deq_q2_k(const uint8_t* x, float* y) {  // 84 bytes: scales[16], qs[64], d, dmin
  const uint8_t* scales = x;
  const uint8_t* qs = x + 16;
  float d = load_f16(x + 80), dmin = load_f16(x + 82);
  for (int e = 0; e < kQKK; ++e) {
    int h = e / 128, s = (e / 32) % 4, t = (e / 16) % 2, l = e % 16;
    int q = (qs[32 * h + 16 * t + l] >> (2 * s)) & 3;
    int sc = scales[e / 16];
    y[e] = d * static_cast<float>(sc & 0xF) * static_cast<float>(q) - dmin * static_cast<float>(sc >> 4);
  }
}

void deq_q3_k(const uint8_t* x, float* y) {  // 110 bytes: hmask[32], qs[64], scales[12], d
  const uint8_t* hmask = x;
  const uint8_t* qs = x + 32;
  const uint8_t* scales = x + 96;
  float d = load_f16(x + 108);
  int sb[16];
  for (int b = 0; b < 16; ++b) {
    int low = b < 8 ? (scales[b] & 0xF) : (scales[b - 8] >> 4);
    int high = (scales[8 + b % 4] >> (2 * (b / 4))) & 3;
    sb[b] = (low | (high << 4)) - 32;
  }
  for (int e = 0; e < kQKK; ++e) {
    int h = e / 128, s = (e / 32) % 4, t = (e / 16) % 2, l = e % 16;
    int lo2 = (qs[32 * h + 16 * t + l] >> (2 * s)) & 3;
    bool hi = (hmask[16 * t + l] >> (4 * h + s)) & 1;
    int q = hi ? lo2 : lo2 - 4;
    y[e] = d * static_cast<float>(sb[e / 16]) * static_cast<float>(q);
  }
}

void deq_q4_k(const uint8_t* x, float* y) {  // 144 bytes: d, dmin, scales[12], qs[128]
  float d = load_f16(x), dmin = load_f16(x + 2);
  const uint8_t* scales = x + 4;
  const uint8_t* qs = x + 16;
  for (int e = 0; e < kQKK; ++e) {
    int c = e / 64, l = e % 32;
    bool high = (e % 64) >= 32;
    int j = e / 32;  // == 2c + high
    int sc, mn;
    scale_min_k4(j, scales, &sc, &mn);
    uint8_t byte = qs[32 * c + l];
    int q = high ? (byte >> 4) : (byte & 0xF);
    y[e] = d * static_cast<float>(sc) * static_cast<float>(q) - dmin * static_cast<float>(mn);
  }
}

void deq_q5_k(const uint8_t* x, float* y) {  // 176 bytes: d, dmin, scales[12], qh[32], qs[128]
  float d = load_f16(x), dmin = load_f16(x + 2);
  const uint8_t* scales = x + 4;
  const uint8_t* qh = x + 16;
  const uint8_t* qs = x + 48;
  for (int e = 0; e < kQKK; ++e) {
    int c = e / 64, l = e % 32;
    bool high = (e % 64) >= 32;
    int j = e / 32;
    int sc, mn;
    scale_min_k4(j, scales, &sc, &mn);
    uint8_t byte = qs[32 * c + l];
    int q = (high ? (byte >> 4) : (byte & 0xF)) + 16 * ((qh[l] >> j) & 1);
    y[e] = d * static_cast<float>(sc) * static_cast<float>(q) - dmin * static_cast<float>(mn);
  }
}

void deq_q6_k(const uint8_t* x, float* y) {  // 210 bytes: ql[128], qh[64], scales[16] int8, d
  const uint8_t* ql = x;
  const uint8_t* qh = x + 128;
  const int8_t* scales = reinterpret_cast<const int8_t*>(x + 192);
  float d = load_f16(x + 208);
  for (int h = 0; h < 2; ++h) {
    const uint8_t* QL = ql + 64 * h;
    const uint8_t* QH = qh + 32 * h;
    for (int l = 0; l < 32; ++l) {
      int q[4] = {
          (QL[l] & 0xF) | ((QH[l] & 3) << 4),
          (QL[l + 32] & 0xF) | (((QH[l] >> 2) & 3) << 4),
          (QL[l] >> 4) | (((QH[l] >> 4) & 3) << 4),
          (QL[l + 32] >> 4) | (((QH[l] >> 6) & 3) << 4),
      };
      for (int k = 0; k < 4; ++k) {
        int e = 128 * h + 32 * k + l;
        y[e] = d * static_cast<float>(scales[e / 16]) * static_cast<float>(q[k] - 32);
      }
    }
  }
}

void deq_iq4_xs(const uint8_t* x, float* y) {  // 136 bytes: d, scales_h u16, scales_l[4], qs[128]
  float d = load_f16(x);
  uint32_t scales_h = static_cast<uint32_t>(x[2] | (x[3] << 8));
  const uint8_t* scales_l = x + 4;
  const uint8_t* qs = x + 8;
  for (int j = 0; j < 8; ++j) {
    int ls = ((scales_l[j / 2] >> (4 * (j % 2))) & 0xF) | (((scales_h >> (2 * j)) & 3) << 4);
    float dl = d * static_cast<float>(ls - 32);
    for (int e = 0; e < kQK; ++e) {
      y[32 * j + e] = dl * static_cast<float>(kIq4nlTable[legacy_nibble(qs + 16 * j, e)]);
    }
  }
}

using BlockFn = void (*)(const uint8_t*, float*);

BlockFn block_dequantizer(DType t) {
  switch (t) {
    case DType::kQ4_0: return deq_q4_0;
    case DType::kQ4_1: return deq_q4_1;
    case DType::kQ5_0: return deq_q5_0;
    case DType::kQ5_1: return deq_q5_1;
    case DType::kQ8_0: return deq_q8_0;
    case DType::kQ2_K: return deq_q2_k;
    case DType::kQ3_K: return deq_q3_k;
    case DType::kQ4_K: return deq_q4_k;
    case DType::kQ5_K: return deq_q5_k;
    case DType::kQ6_K: return deq_q6_k;
    case DType::kIQ4_NL: return deq_iq4_nl;
    case DType::kIQ4_XS: return deq_iq4_xs;
    default: return nullptr;
  }
}

// ---- quantizers ---------------------------------------------------------------------------

// ggml quantize_row_q8_0_ref: d = max|x| / 127, q = round(x / d). Unlike ggml, NaN and +-inf
// count as 0 (ggml's float -> int conversion of them is undefined): they do not raise amax
// and get code 0. x * id is clamped to +-127 before rounding (a subnormal d makes id inf; for
// other inputs the clamp changes nothing) and 0 * inf gives 0. kernels/block_decode.h's
// q8_0_* encoders (the CUDA KV cache) do the same, bit for bit.
void quant_q8_0(const float* x, uint8_t* y) {
  float amax = 0;
  for (int e = 0; e < kQK; ++e)
    if (std::isfinite(x[e])) amax = std::max(amax, std::fabs(x[e]));
  float d = amax / 127.0f;
  float id = d != 0 ? 1.0f / d : 0.0f;
  store_f16(y, f32_to_f16(d));
  for (int e = 0; e < kQK; ++e) {
    float v = std::isfinite(x[e]) ? x[e] * id : 0.0f;
    if (std::isnan(v)) v = 0.0f;  // 0 * inf
    v = std::clamp(v, -127.0f, 127.0f);
    y[2 + e] = static_cast<uint8_t>(static_cast<int8_t>(std::lround(v)));
  }
}

// ggml quantize_row_q4_0_ref: d = m / -8 (m = signed element of largest magnitude),
// q = min(15, trunc(x/d + 8.5)).
void quant_q4_0(const float* x, uint8_t* y) {
  float amax = 0, m = 0;
  for (int e = 0; e < kQK; ++e) {
    if (std::fabs(x[e]) > amax) {
      amax = std::fabs(x[e]);
      m = x[e];
    }
  }
  float d = m / -8.0f;
  float id = d != 0 ? 1.0f / d : 0.0f;
  store_f16(y, f32_to_f16(d));
  uint8_t* qs = y + 2;
  for (int j = 0; j < 16; ++j) {
    int q0 = std::min(15, static_cast<int>(x[j] * id + 8.5f));
    int q1 = std::min(15, static_cast<int>(x[j + 16] * id + 8.5f));
    q0 = std::max(0, q0);
    q1 = std::max(0, q1);
    qs[j] = static_cast<uint8_t>(q0 | (q1 << 4));
  }
}

// Smallest f16 >= v (v >= 0, finite), so that f16(scale) * 63 still covers the range.
uint16_t f16_round_up(float v) {
  uint16_t h = f32_to_f16(v);
  if (f16_to_f32(h) < v) ++h;  // positive f16 patterns are ordered like their values
  return h;
}

// A simple Q4_K quantizer (not llama.cpp's rmse search): for each 32-element sub-block j,
// mn_j covers -min(0, min x) from above and sc_j covers the remaining span, both 6-bit
// multiples of the fp16 super-scales dmin and d, rounded up so that q never clips.
// Per element |x - x'| <= d*sc_j/2 (plus float rounding).
void quant_q4_k(const float* x, uint8_t* y) {
  float neg_min[8], hi[8];
  float max_neg_min = 0;
  for (int j = 0; j < 8; ++j) {
    float lo = 0, h = 0;
    for (int l = 0; l < 32; ++l) {
      lo = std::min(lo, x[32 * j + l]);
      h = std::max(h, x[32 * j + l]);
    }
    neg_min[j] = -lo;
    hi[j] = h;
    max_neg_min = std::max(max_neg_min, neg_min[j]);
  }
  uint16_t dmin_h = f16_round_up(max_neg_min / 63.0f);
  float dmin = f16_to_f32(dmin_h);
  int mn[8];
  float span[8];  // hi_j + dmin*mn_j: what 15 steps of the scale must cover
  float max_step = 0;
  for (int j = 0; j < 8; ++j) {
    mn[j] = dmin > 0 ? std::min(63, static_cast<int>(std::ceil(neg_min[j] / dmin))) : 0;
    span[j] = hi[j] + dmin * static_cast<float>(mn[j]);
    max_step = std::max(max_step, span[j] / 15.0f);
  }
  uint16_t d_h = f16_round_up(max_step / 63.0f);
  float d = f16_to_f32(d_h);
  int sc[8];
  for (int j = 0; j < 8; ++j) {
    sc[j] = d > 0 ? std::min(63, static_cast<int>(std::ceil(span[j] / 15.0f / d))) : 0;
  }

  store_f16(y, d_h);
  store_f16(y + 2, dmin_h);
  uint8_t* scales = y + 4;
  // Inverse of get_scale_min_k4 (§3.3).
  for (int j = 0; j < 4; ++j) {
    scales[j] = static_cast<uint8_t>((sc[j] & 63) | ((sc[j + 4] >> 4) << 6));
    scales[j + 4] = static_cast<uint8_t>((mn[j] & 63) | ((mn[j + 4] >> 4) << 6));
    scales[j + 8] = static_cast<uint8_t>((sc[j + 4] & 0xF) | ((mn[j + 4] & 0xF) << 4));
  }
  uint8_t* qs = y + 16;
  std::memset(qs, 0, 128);
  for (int e = 0; e < kQKK; ++e) {
    int j = e / 32;
    float dd = d * static_cast<float>(sc[j]);
    float dm = dmin * static_cast<float>(mn[j]);
    int q = dd > 0 ? static_cast<int>(std::lround((x[e] + dm) / dd)) : 0;
    q = std::clamp(q, 0, 15);
    int c = e / 64, l = e % 32;
    qs[32 * c + l] |= static_cast<uint8_t>((e % 64) >= 32 ? q << 4 : q);
  }
}

// A simple Q6_K quantizer: per 16-element sub-block a symmetric scale m/-32 (m = signed
// element of largest magnitude, as ggml's make_qx_quants starts from), scales stored as int8
// multiples of d = max|scale|/127, then q = round(x / (d*sc)) + 32 clipped to 0..63.
void quant_q6_k(const float* x, uint8_t* y) {
  float sub_scale[16];
  float max_abs_scale = 0;
  for (int b = 0; b < 16; ++b) {
    float amax = 0, m = 0;
    for (int l = 0; l < 16; ++l) {
      float v = x[16 * b + l];
      if (std::fabs(v) > amax) {
        amax = std::fabs(v);
        m = v;
      }
    }
    sub_scale[b] = m / -32.0f;
    max_abs_scale = std::max(max_abs_scale, std::fabs(sub_scale[b]));
  }
  uint16_t d_h = f32_to_f16(max_abs_scale / 127.0f);
  float d = f16_to_f32(d_h);
  int8_t* scales = reinterpret_cast<int8_t*>(y + 192);
  for (int b = 0; b < 16; ++b) {
    int s = d > 0 ? static_cast<int>(std::lround(sub_scale[b] / d)) : 0;
    scales[b] = static_cast<int8_t>(std::clamp(s, -128, 127));
  }
  store_f16(y + 208, d_h);
  int q[kQKK];
  for (int e = 0; e < kQKK; ++e) {
    float dd = d * static_cast<float>(scales[e / 16]);
    int v = dd != 0 ? static_cast<int>(std::lround(x[e] / dd)) : 0;
    q[e] = std::clamp(v + 32, 0, 63);
  }
  uint8_t* ql = y;
  uint8_t* qh = y + 128;
  for (int h = 0; h < 2; ++h) {
    for (int l = 0; l < 32; ++l) {
      const int* Q = q + 128 * h;
      ql[64 * h + l] = static_cast<uint8_t>((Q[l] & 0xF) | ((Q[l + 64] & 0xF) << 4));
      ql[64 * h + l + 32] = static_cast<uint8_t>((Q[l + 32] & 0xF) | ((Q[l + 96] & 0xF) << 4));
      qh[32 * h + l] = static_cast<uint8_t>((Q[l] >> 4) | ((Q[l + 32] >> 4) << 2) | ((Q[l + 64] >> 4) << 4) |
                                            ((Q[l + 96] >> 4) << 6));
    }
  }
}

}  // namespace

void dequantize_row(DType t, const void* src, float* dst, int64_t n) {
  const uint8_t* x = static_cast<const uint8_t*>(src);
  switch (t) {
    case DType::kF32: std::memcpy(dst, x, static_cast<size_t>(n) * 4); return;
    case DType::kF16:
      for (int64_t i = 0; i < n; ++i) dst[i] = load_f16(x + 2 * i);
      return;
    case DType::kBF16:
      for (int64_t i = 0; i < n; ++i)
        dst[i] = bf16_to_f32(static_cast<uint16_t>(x[2 * i] | (x[2 * i + 1] << 8)));
      return;
    case DType::kF8E4M3:
      for (int64_t i = 0; i < n; ++i) dst[i] = f8e4m3_to_f32(x[i]);
      return;
    default: break;
  }
  BlockFn fn = block_dequantizer(t);
  if (!fn) return;  // every DType is handled above or by block_dequantizer
  const DTypeInfo& info = dtype_info(t);
  int64_t blocks = n / info.block_elems;
  for (int64_t b = 0; b < blocks; ++b) fn(x + b * info.block_bytes, dst + b * info.block_elems);
}

bool can_quantize(DType t) {
  switch (t) {
    case DType::kF32:
    case DType::kF16:
    case DType::kBF16:
    case DType::kQ8_0:
    case DType::kQ4_0:
    case DType::kQ4_K:
    case DType::kQ6_K: return true;
    default: return false;
  }
}

void quantize_row(DType t, const float* src, void* dst, int64_t n) {
  uint8_t* y = static_cast<uint8_t*>(dst);
  switch (t) {
    case DType::kF32: std::memcpy(y, src, static_cast<size_t>(n) * 4); return;
    case DType::kF16:
      for (int64_t i = 0; i < n; ++i) store_f16(y + 2 * i, f32_to_f16(src[i]));
      return;
    case DType::kBF16:
      for (int64_t i = 0; i < n; ++i) store_f16(y + 2 * i, f32_to_bf16(src[i]));
      return;
    default: break;
  }
  void (*fn)(const float*, uint8_t*) = nullptr;
  switch (t) {
    case DType::kQ8_0: fn = quant_q8_0; break;
    case DType::kQ4_0: fn = quant_q4_0; break;
    case DType::kQ4_K: fn = quant_q4_k; break;
    case DType::kQ6_K: fn = quant_q6_k; break;
    default: return;  // callers check can_quantize() first
  }
  const DTypeInfo& info = dtype_info(t);
  int64_t blocks = n / info.block_elems;
  for (int64_t b = 0; b < blocks; ++b) fn(src + b * info.block_elems, y + b * info.block_bytes);
}

}  // namespace gemma3
