// Per-element decoders of every weight type we load, usable from host and device code
// (docs/formats.md §3; ggml's block layouts). One struct per type:
//   kElems  elements per block, kBytes bytes per block,
//   get(block, e) = value of element e (0 <= e < kElems) of the block starting at `block`.
// They reproduce src/core/quant.cpp's dequantizers bit for bit (the CPU test
// BlockDecode.MatchesReferenceDequantizer checks every type on random blocks): same operand
// order, and on the device the products use __fmul_rn/__fsub_rn so nvcc cannot contract them
// into FMAs, which would round differently.
//
// Alignment: on the device, 16-bit and 32-bit fields are read with aligned loads. That holds
// because weights live in cudaMalloc'd buffers (256-byte aligned) with rows packed back to back,
// and every block size and field offset used with ld16/ld32 is a multiple of the field size.
// On the host every load is assembled byte by byte (no alignment assumed).
//
// This header is CUDA-free when compiled by a host compiler; it could replace the scalar block
// functions of src/core/quant.cpp (one set of decoders), which it was written to match.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define GEMMA3_HD __host__ __device__ __forceinline__
#else
#define GEMMA3_HD inline
#endif

namespace gemma3::blocks {

// ---- scalar helpers -------------------------------------------------------------------------

GEMMA3_HD float bits_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, 4);
  return f;
#endif
}

// Rounded exactly once, never fused (so host and device agree to the bit).
GEMMA3_HD float mul(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
GEMMA3_HD float sub(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fsub_rn(a, b);
#else
  return a - b;
#endif
}
GEMMA3_HD float add(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}

// Little-endian loads. p must be 2- (ld16) or 4-byte (ld32) aligned on the device.
GEMMA3_HD uint32_t ld16(const uint8_t* p) {
#if defined(__CUDA_ARCH__)
  return *reinterpret_cast<const uint16_t*>(p);
#else
  return static_cast<uint32_t>(p[0]) | (static_cast<uint32_t>(p[1]) << 8);
#endif
}
GEMMA3_HD uint32_t ld32(const uint8_t* p) {
#if defined(__CUDA_ARCH__)
  return *reinterpret_cast<const uint32_t*>(p);
#else
  return static_cast<uint32_t>(p[0]) | (static_cast<uint32_t>(p[1]) << 8) |
         (static_cast<uint32_t>(p[2]) << 16) | (static_cast<uint32_t>(p[3]) << 24);
#endif
}

// IEEE half -> float, exact; same cases as f16_to_f32 in src/core/dtype.cpp.
GEMMA3_HD float half_to_float(uint32_t h) {
  const uint32_t sign = (h & 0x8000u) << 16, exp = (h >> 10) & 0x1F, mant = h & 0x3FF;
  if (exp == 0) {
    const float v = static_cast<float>(mant) * 5.9604644775390625e-8f;  // mant * 2^-24, exact
    return sign ? -v : v;
  }
  if (exp == 31) return bits_float(sign | 0x7F800000u | (mant << 13));
  return bits_float(sign | ((exp - 15 + 127) << 23) | (mant << 13));
}
GEMMA3_HD float ld_half(const uint8_t* p) { return half_to_float(ld16(p)); }

// fp8 e4m3fn -> float (docs/formats.md §5.1): bias 7, no infinities, S.1111.111 is NaN.
// Branch-free (the GEMV decodes 16 of these per 16-byte load): the 7 exponent+mantissa bits
// placed at fp32's bit 20 make a float whose exponent field is e4m3's (bias 7 instead of 127)
// and whose top mantissa bits are e4m3's, so multiplying by 2^120 rebiases it exactly: normal
// codes give 2^(e-7) * (1 + m/8), and code exponent 0 gives the fp32 subnormal m/8 * 2^-126,
// times 2^120 = m * 2^-9, e4m3's subnormal (exact: no flush to zero without fast math). The
// sign bit rides along (-0 stays -0).
GEMMA3_HD float e4m3_to_float(uint32_t v) {
  const uint32_t sign = (v & 0x80u) << 24;
  if ((v & 0x7Fu) == 0x7Fu) return bits_float(sign | 0x7FC00000u);  // NaN (quiet, sign kept)
  return mul(bits_float(sign | ((v & 0x7Fu) << 20)), 0x1p120f);
}

// ---- encoders (KV cache writes, fp8 weight quantization) --------------------------------
// Host and device versions compute the same bits; the CPU test BlockDecode.EncodersMatchCpu checks the
// host side against src/core/dtype.cpp's f32_to_f16, make_model's f32_to_f8e4m3 and quant.cpp's
// Q8_0 quantizer, whose algorithms these are.

GEMMA3_HD float div_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}
// Round to nearest, ties to even (nearbyint in the default rounding mode).
GEMMA3_HD float rint_even(float x) {
#if defined(__CUDA_ARCH__)
  return rintf(x);
#else
  return std::nearbyint(x);
#endif
}
GEMMA3_HD uint32_t float_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
#endif
}

// float -> IEEE half bits, round to nearest even; f32_to_f16 in src/core/dtype.cpp.
GEMMA3_HD uint16_t float_to_half(float f) {
  const uint32_t u = float_bits(f);
  const uint32_t sign = (u >> 16) & 0x8000u, a = u & 0x7FFFFFFFu;
  if (a > 0x7F800000u) return static_cast<uint16_t>(sign | 0x7E00u | ((a >> 13) & 0x3FFu));  // NaN
  if (a >= 0x477FF000u) return static_cast<uint16_t>(sign | 0x7C00u);                        // >= 65520: inf
  if (a < 0x38800000u)  // below 2^-14: subnormal; scaling by 2^24 is exact
    return static_cast<uint16_t>(sign | static_cast<uint32_t>(rint_even(mul(bits_float(a), 16777216.0f))));
  uint32_t h = ((((a >> 23) - 127 + 15)) << 10) | ((a & 0x7FFFFFu) >> 13);
  const uint32_t rem = a & 0x1FFFu;
  if (rem > 0x1000u || (rem == 0x1000u && (h & 1))) ++h;  // a carry bumps the exponent: correct
  return static_cast<uint16_t>(sign | h);
}

// float -> bf16 bits, round to nearest even; NaN stays NaN with the quiet bit set (f32_to_bf16
// in src/core/dtype.cpp). The KV cache's bf16 encoder and the bf16 GEMM's operand conversion.
GEMMA3_HD uint16_t float_to_bf16(float f) {
  uint32_t u = float_bits(f);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return static_cast<uint16_t>((u >> 16) | 0x40);
  u += 0x7FFFu + ((u >> 16) & 1);  // a large finite value correctly overflows to inf
  return static_cast<uint16_t>(u >> 16);
}

// float -> e4m3fn byte, round to nearest even, saturating: |x| >= 448 and +-inf give +-448
// (e4m3fn has no infinity; vLLM's fp8 KV cache does the same), NaN gives 0 so a cache or
// weight never holds a NaN code. The algorithm of make_model's f32_to_f8e4m3 (which maps NaN
// to 0x7F) and of HostBackend::kv_write's encoder, with exponent bits instead of frexp/ldexp
// (the 2^k scalings below are exact).
GEMMA3_HD uint8_t float_to_e4m3(float x) {
  const uint32_t u = float_bits(x);
  const uint32_t sign = (u >> 24) & 0x80u, a_bits = u & 0x7FFFFFFFu;
  if (a_bits > 0x7F800000u) return 0;
  const float a = bits_float(a_bits);
  if (!(a < 448.0f)) return static_cast<uint8_t>(sign | 0x7E);
  if (a_bits == 0) return static_cast<uint8_t>(sign);
  // a = 1.f * 2^exp for normal floats; fp32 subnormals (< 2^-126) are far below e4m3's range
  // and land in the subnormal branch, which only needs a * 2^9.
  int exp = static_cast<int>(a_bits >> 23) - 127;
  if (exp < -6) {  // e4m3 subnormal: a = q * 2^-9, q in 0..8 (8 is the smallest normal's bits)
    return static_cast<uint8_t>(sign | static_cast<uint32_t>(rint_even(mul(a, 512.0f))));
  }
  // a * 2^(3 - exp) in [8, 16): exact (exp in -6..8).
  int q = static_cast<int>(rint_even(mul(a, bits_float(static_cast<uint32_t>(127 + 3 - exp) << 23)))) - 8;
  if (q == 8) q = 0, ++exp;
  const int biased = exp + 7;
  if (biased > 15 || (biased == 15 && q == 7)) return static_cast<uint8_t>(sign | 0x7E);
  return static_cast<uint8_t>(sign | static_cast<uint32_t>(biased << 3) | static_cast<uint32_t>(q));
}

// GGUF Q8_0 block from its 32 values (ggml quantize_row_q8_0_ref, quant.cpp's quant_q8_0):
// d = amax / 127 stored as half, q = round_half_away(x * (1 / d)) (0 when d == 0). Split in
// two steps so a device warp can compute amax with shuffles: amax over q8_0_amax_term(x),
// q8_0_scale(amax), q8_0_inverse(d), then q8_0_quant(x, inverse) per element.
// Non-finite values (ggml converts NaN/inf to int: UB on the host) count as 0: they neither
// raise amax nor get a code other than 0. The product is clamped to +-127 before rounding
// (finite inputs never exceed 127 + rounding; a subnormal d's inverse overflows to inf) and
// 0 * inf gives 0, so the int conversion is always in range.
GEMMA3_HD bool is_finite_float(float x) { return (float_bits(x) & 0x7F800000u) != 0x7F800000u; }
GEMMA3_HD float q8_0_amax_term(float x) {
  return is_finite_float(x) ? bits_float(float_bits(x) & 0x7FFFFFFFu) : 0.0f;
}
GEMMA3_HD float q8_0_scale(float amax) { return div_rn(amax, 127.0f); }
GEMMA3_HD float q8_0_inverse(float d) { return d != 0.0f ? div_rn(1.0f, d) : 0.0f; }
GEMMA3_HD int8_t q8_0_quant(float x, float inverse) {
  if (!is_finite_float(x)) return 0;
  float v = mul(x, inverse);
  if (v != v) return 0;  // 0 * inf
  v = v > 127.0f ? 127.0f : v < -127.0f ? -127.0f : v;
#if defined(__CUDA_ARCH__)
  return static_cast<int8_t>(static_cast<int>(roundf(v)));
#else
  return static_cast<int8_t>(std::lround(v));
#endif
}

// Legacy nibble order (§3.2): byte j holds element j (low) and element j+16 (high).
GEMMA3_HD int legacy_nibble(const uint8_t* qs, int e) { return e < 16 ? (qs[e] & 0xF) : (qs[e - 16] >> 4); }

// IQ4_NL / IQ4_XS codebook (§3.4, ggml kvalues_iq4nl) packed into two words, so that host and
// device share it without a table in memory: entry q is byte q of (kLo, kHi).
GEMMA3_HD int iq4nl_value(int q) {
  const uint64_t kLo = 0xf6eaddcfbfad9881ull;  // -127 -104 -83 -65 -49 -35 -22 -10
  const uint64_t kHi = 0x7159453526190d01ull;  //    1   13  25  38  53  69  89 113
  return static_cast<int8_t>(((q < 8 ? kLo : kHi) >> (8 * (q & 7))) & 0xFF);
}

// Q4_K/Q5_K 6-bit (scale, min) of 32-element sub-block j (§3.3, get_scale_min_k4). s[k] is the
// k-th of the 12 scale bytes: a pointer, or the GEMV's register copy of a block header.
template <class Bytes>
GEMMA3_HD void scale_min_k4(int j, const Bytes& s, int* sc, int* mn) {
  if (j < 4) {
    *sc = s[j] & 63;
    *mn = s[j + 4] & 63;
  } else {
    *sc = (s[j + 4] & 0xF) | ((s[j - 4] >> 6) << 4);
    *mn = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
  }
}

// ---- one struct per type --------------------------------------------------------------------

struct F32 {
  static constexpr int kElems = 1, kBytes = 4;
  GEMMA3_HD static float get(const uint8_t* x, int) { return bits_float(ld32(x)); }
};
struct F16 {
  static constexpr int kElems = 1, kBytes = 2;
  GEMMA3_HD static float get(const uint8_t* x, int) { return ld_half(x); }
};
struct BF16 {
  static constexpr int kElems = 1, kBytes = 2;
  GEMMA3_HD static float get(const uint8_t* x, int) { return bits_float(ld16(x) << 16); }
};
struct F8E4M3 {  // raw value; the caller applies the row scale
  static constexpr int kElems = 1, kBytes = 1;
  GEMMA3_HD static float get(const uint8_t* x, int) { return e4m3_to_float(x[0]); }
};

struct Q4_0 {  // 18 bytes: d, qs[16]
  static constexpr int kElems = 32, kBytes = 18;
  // Element e from the block's quants and its scale (also used by Planar<Q4_0>).
  GEMMA3_HD static float value(const uint8_t* qs, float d, int e) {
    return mul(static_cast<float>(legacy_nibble(qs, e) - 8), d);
  }
  GEMMA3_HD static float get(const uint8_t* x, int e) { return value(x + 2, ld_half(x), e); }
};
struct Q4_1 {  // 20 bytes: d, m, qs[16]
  static constexpr int kElems = 32, kBytes = 20;
  GEMMA3_HD static float get(const uint8_t* x, int e) {
    return add(mul(static_cast<float>(legacy_nibble(x + 4, e)), ld_half(x)), ld_half(x + 2));
  }
};
struct Q5_0 {  // 22 bytes: d, qh u32 (at offset 2: read as two u16), qs[16]
  static constexpr int kElems = 32, kBytes = 22;
  GEMMA3_HD static float get(const uint8_t* x, int e) {
    const uint32_t qh = ld16(x + 2) | (ld16(x + 4) << 16);
    const int q = legacy_nibble(x + 6, e) | static_cast<int>(((qh >> e) & 1) << 4);
    return mul(static_cast<float>(q - 16), ld_half(x));
  }
};
struct Q5_1 {  // 24 bytes: d, m, qh u32, qs[16]
  static constexpr int kElems = 32, kBytes = 24;
  GEMMA3_HD static float get(const uint8_t* x, int e) {
    const uint32_t qh = ld32(x + 4);
    const int q = legacy_nibble(x + 8, e) | static_cast<int>(((qh >> e) & 1) << 4);
    return add(mul(static_cast<float>(q), ld_half(x)), ld_half(x + 2));
  }
};
struct Q8_0 {  // 34 bytes: d, qs[32] int8
  static constexpr int kElems = 32, kBytes = 34;
  GEMMA3_HD static float value(const uint8_t* qs, float d, int e) {
    return mul(static_cast<float>(static_cast<int8_t>(qs[e])), d);
  }
  GEMMA3_HD static float get(const uint8_t* x, int e) { return value(x + 2, ld_half(x), e); }
};
struct IQ4_NL {  // 18 bytes: d, qs[16]
  static constexpr int kElems = 32, kBytes = 18;
  GEMMA3_HD static float get(const uint8_t* x, int e) {
    return mul(ld_half(x), static_cast<float>(iq4nl_value(legacy_nibble(x + 2, e))));
  }
};

struct Q2_K {  // 84 bytes: scales[16], qs[64], d, dmin
  static constexpr int kElems = 256, kBytes = 84;
  GEMMA3_HD static float get(const uint8_t* x, int e) {
    const int h = e / 128, s = (e / 32) % 4, t = (e / 16) % 2, l = e % 16;
    const int q = (x[16 + 32 * h + 16 * t + l] >> (2 * s)) & 3;
    const int sc = x[e / 16];
    return sub(mul(mul(ld_half(x + 80), static_cast<float>(sc & 0xF)), static_cast<float>(q)),
               mul(ld_half(x + 82), static_cast<float>(sc >> 4)));
  }
};
struct Q3_K {  // 110 bytes: hmask[32], qs[64], scales[12], d
  static constexpr int kElems = 256, kBytes = 110;
  GEMMA3_HD static float get(const uint8_t* x, int e) {
    const uint8_t* scales = x + 96;
    const int b = e / 16;
    const int low = b < 8 ? (scales[b] & 0xF) : (scales[b - 8] >> 4);
    const int high = (scales[8 + b % 4] >> (2 * (b / 4))) & 3;
    const int sb = (low | (high << 4)) - 32;
    const int h = e / 128, s = (e / 32) % 4, t = (e / 16) % 2, l = e % 16;
    const int lo2 = (x[32 + 32 * h + 16 * t + l] >> (2 * s)) & 3;
    const bool hi = (x[16 * t + l] >> (4 * h + s)) & 1;
    const int q = hi ? lo2 : lo2 - 4;
    return mul(mul(ld_half(x + 108), static_cast<float>(sb)), static_cast<float>(q));
  }
};
struct Q4_K {  // 144 bytes: d, dmin, scales[12], qs[128]
  static constexpr int kElems = 256, kBytes = 144;
  GEMMA3_HD static float get(const uint8_t* x, int e) {
    const int c = e / 64, l = e % 32, j = e / 32;
    int sc, mn;
    scale_min_k4(j, static_cast<const uint8_t*>(x + 4), &sc, &mn);
    const uint8_t byte = x[16 + 32 * c + l];
    const int q = (e % 64) >= 32 ? (byte >> 4) : (byte & 0xF);
    return sub(mul(mul(ld_half(x), static_cast<float>(sc)), static_cast<float>(q)),
               mul(ld_half(x + 2), static_cast<float>(mn)));
  }
};
struct Q5_K {  // 176 bytes: d, dmin, scales[12], qh[32], qs[128]
  static constexpr int kElems = 256, kBytes = 176;
  GEMMA3_HD static float get(const uint8_t* x, int e) {
    const int c = e / 64, l = e % 32, j = e / 32;
    int sc, mn;
    scale_min_k4(j, static_cast<const uint8_t*>(x + 4), &sc, &mn);
    const uint8_t byte = x[48 + 32 * c + l];
    const int q = ((e % 64) >= 32 ? (byte >> 4) : (byte & 0xF)) + 16 * ((x[16 + l] >> j) & 1);
    return sub(mul(mul(ld_half(x), static_cast<float>(sc)), static_cast<float>(q)),
               mul(ld_half(x + 2), static_cast<float>(mn)));
  }
};
struct Q6_K {  // 210 bytes: ql[128], qh[64], scales[16] int8, d
  static constexpr int kElems = 256, kBytes = 210;
  GEMMA3_HD static float get(const uint8_t* x, int e) {
    // Element e = 128h + 32k + l takes its low nibble from ql[64h + l + 32(k&1)] (low half for
    // k < 2, high half otherwise) and its two high bits from qh[32h + l] >> 2k.
    const int h = e / 128, k = (e % 128) / 32, l = e % 32;
    const uint8_t low = x[64 * h + l + 32 * (k & 1)];
    const int q = (k >= 2 ? (low >> 4) : (low & 0xF)) | (((x[128 + 32 * h + l] >> (2 * k)) & 3) << 4);
    const float sc = static_cast<float>(static_cast<int8_t>(x[192 + e / 16]));
    return mul(mul(ld_half(x + 208), sc), static_cast<float>(q - 32));
  }
};
struct IQ4_XS {  // 136 bytes: d, scales_h u16, scales_l[4], qs[128]
  static constexpr int kElems = 256, kBytes = 136;
  GEMMA3_HD static float get(const uint8_t* x, int e) {
    const int j = e / 32;
    const uint32_t scales_h = ld16(x + 2);
    const int ls =
        ((x[4 + j / 2] >> (4 * (j % 2))) & 0xF) | static_cast<int>(((scales_h >> (2 * j)) & 3) << 4);
    const float dl = mul(ld_half(x), static_cast<float>(ls - 32));
    return mul(dl, static_cast<float>(iq4nl_value(legacy_nibble(x + 8 + 16 * j, e % 32))));
  }
};

// Element i of a row that starts at `row` (whole blocks of D).
template <class D>
GEMMA3_HD float row_value(const uint8_t* row, int64_t i) {
  if constexpr (D::kElems == 1) {
    return D::get(row + i * D::kBytes, 0);
  } else {
    return D::get(row + (i / D::kElems) * D::kBytes, static_cast<int>(i % D::kElems));
  }
}

// ---- the CUDA backend's planar weight layout (Q4_0, Q8_0) -----------------------------------
// Q4_0 and Q8_0 blocks (18 and 34 bytes: a half scale d, then the quants) are not multiples of
// 16 bytes, so rows of them cannot be read with 16-byte vector loads. The CUDA backend repacks
// such a weight at upload, row by row, into
//   row = [quants of blocks 0 .. nb-1: nb * kQBytes bytes][d of blocks 0 .. nb-1: nb halves][zero
//          padding to a multiple of 16 bytes]          (nb = cols / 32)
// so every row, its quant plane and every block's quants start 16-byte aligned (the allocation
// is 256-byte aligned). Values are the block type's, bit for bit (B::value is shared). Every
// device reader of an uploaded Q4_0/Q8_0 weight uses this layout (kernels/common.cuh
// dispatch_weight); KV caches keep ggml's Q8_0 blocks. See docs/formats.md §8.1.
template <class B>
struct Planar {
  using Block = B;
  static constexpr bool kPlanar = true;
  static constexpr int kElems = B::kElems, kQBytes = B::kBytes - 2;
  static constexpr uint64_t row_bytes(int64_t cols) {
    const uint64_t nb = static_cast<uint64_t>(cols / kElems);
    return nb * kQBytes + (nb * 2 + 15) / 16 * 16;
  }
  GEMMA3_HD static const uint8_t* scales(const uint8_t* row, int64_t cols) {
    return row + (cols / kElems) * kQBytes;
  }
  // Element i of a planar row of `cols` elements.
  GEMMA3_HD static float get(const uint8_t* row, int64_t cols, int64_t i) {
    const int64_t b = i / kElems;
    return B::value(row + b * kQBytes, ld_half(scales(row, cols) + 2 * b), static_cast<int>(i % kElems));
  }
  // Host: one row of ggml blocks (cols / 32 of them) -> its planar form (row_bytes(cols) bytes).
  static void repack_row(const uint8_t* src, uint8_t* dst, int64_t cols) {
    const int64_t nb = cols / kElems;
    uint8_t* d = dst + nb * kQBytes;
    for (int64_t b = 0; b < nb; ++b) {
      std::memcpy(dst + b * kQBytes, src + b * B::kBytes + 2, kQBytes);
      std::memcpy(d + 2 * b, src + b * B::kBytes, 2);
    }
    std::memset(d + 2 * nb, 0, row_bytes(cols) - static_cast<uint64_t>(nb * kQBytes + 2 * nb));
  }
};
using Q4_0Planar = Planar<Q4_0>;
using Q8_0Planar = Planar<Q8_0>;

template <class L>
constexpr bool is_planar = requires {
  L::kPlanar;
};

// Element i of a weight row of `cols` elements in layout L (a block type, or Planar<B>).
template <class L>
GEMMA3_HD float weight_value(const uint8_t* row, int64_t cols, int64_t i) {
  if constexpr (is_planar<L>) {
    return L::get(row, cols, i);
  } else {
    return row_value<L>(row, i);
  }
}

}  // namespace gemma3::blocks
