// Dtype conversions and block (de)quantizers. Every golden here is computed in the test from
// the spec (docs/formats.md §2.4, §3, §5.1): blocks are packed by hand from chosen per-element quants
// and scales, and the expected values use the spec formula on those chosen numbers, so a
// layout bug in quant.cpp cannot be mirrored by the test.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include "core/dtype.h"
#include "core/quant.h"

namespace gemma3 {
namespace {

// fp16 bit patterns of exact values used as block scales.
constexpr uint16_t kH0_125 = 0x3000;
constexpr uint16_t kH0_25 = 0x3400;
constexpr uint16_t kH0_5 = 0x3800;
constexpr uint16_t kH1 = 0x3C00;
constexpr uint16_t kH2 = 0x4000;
constexpr uint16_t kHm1 = 0xBC00;
constexpr uint16_t kHm2 = 0xC000;

// IQ4_NL codebook, typed from docs/formats.md §3.4.
constexpr int kIq4Table[16] = {-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113};

void put16(std::vector<uint8_t>& b, size_t at, uint16_t v) {
  b[at] = v & 0xFF;
  b[at + 1] = v >> 8;
}

std::vector<float> deq(DType t, const std::vector<uint8_t>& bytes, int64_t n) {
  std::vector<float> out(n, -12345.0f);
  dequantize_row(t, bytes.data(), out.data(), n);
  return out;
}

float bits_to_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
uint32_t float_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

// ---- dtype table ----------------------------------------------------------------------------

TEST(DType, TableMatchesGgmlGeometry) {
  struct Row {
    DType t;
    const char* name;
    int block, bytes;
    uint32_t ggml;
  };
  const Row rows[] = {
      {DType::kF32, "F32", 1, 4, 0},
      {DType::kF16, "F16", 1, 2, 1},
      {DType::kBF16, "BF16", 1, 2, 30},
      {DType::kQ4_0, "Q4_0", 32, 18, 2},
      {DType::kQ4_1, "Q4_1", 32, 20, 3},
      {DType::kQ5_0, "Q5_0", 32, 22, 6},
      {DType::kQ5_1, "Q5_1", 32, 24, 7},
      {DType::kQ8_0, "Q8_0", 32, 34, 8},
      {DType::kQ2_K, "Q2_K", 256, 84, 10},
      {DType::kQ3_K, "Q3_K", 256, 110, 11},
      {DType::kQ4_K, "Q4_K", 256, 144, 12},
      {DType::kQ5_K, "Q5_K", 256, 176, 13},
      {DType::kQ6_K, "Q6_K", 256, 210, 14},
      {DType::kIQ4_NL, "IQ4_NL", 32, 18, 20},
      {DType::kIQ4_XS, "IQ4_XS", 256, 136, 23},
  };
  for (const Row& r : rows) {
    SCOPED_TRACE(r.name);
    EXPECT_STREQ(dtype_name(r.t), r.name);
    EXPECT_EQ(dtype_info(r.t).block_elems, r.block);
    EXPECT_EQ(dtype_info(r.t).block_bytes, r.bytes);
    EXPECT_EQ(dtype_to_ggml(r.t), r.ggml);
    ASSERT_TRUE(dtype_from_ggml(r.ggml).has_value());
    EXPECT_EQ(*dtype_from_ggml(r.ggml), r.t);
    ASSERT_TRUE(dtype_from_name(r.name).has_value());
    EXPECT_EQ(*dtype_from_name(r.name), r.t);
  }
  EXPECT_STREQ(dtype_name(DType::kF8E4M3), "F8_E4M3");
  EXPECT_EQ(dtype_info(DType::kF8E4M3).block_bytes, 1);
  EXPECT_EQ(dtype_to_ggml(DType::kF8E4M3), UINT32_MAX);
  for (uint32_t id : {4u, 5u, 9u, 15u, 16u, 24u, 28u, 39u, 40u, 1000u, UINT32_MAX}) {
    EXPECT_FALSE(dtype_from_ggml(id).has_value()) << id;
  }
}

TEST(DType, FromNameIsCaseInsensitive) {
  EXPECT_EQ(dtype_from_name("q4_k"), DType::kQ4_K);
  EXPECT_EQ(dtype_from_name("bf16"), DType::kBF16);
  EXPECT_EQ(dtype_from_name("f8_e4m3"), DType::kF8E4M3);
  EXPECT_EQ(dtype_from_name("iq4_xs"), DType::kIQ4_XS);
  EXPECT_FALSE(dtype_from_name("q4").has_value());
  EXPECT_FALSE(dtype_from_name("").has_value());
  EXPECT_FALSE(dtype_from_name("Q4_K_M").has_value());
}

TEST(DType, RowBytes) {
  EXPECT_EQ(row_bytes(DType::kF32, 3), 12u);
  EXPECT_EQ(row_bytes(DType::kBF16, 640), 1280u);
  EXPECT_EQ(row_bytes(DType::kQ8_0, 640), 20u * 34u);
  EXPECT_EQ(row_bytes(DType::kQ4_K, 512), 2u * 144u);
  EXPECT_EQ(row_bytes(DType::kQ4_K, 0), 0u);
  EXPECT_FALSE(row_bytes(DType::kQ4_K, 640).has_value());  // 270M's H is not a multiple of 256
  EXPECT_FALSE(row_bytes(DType::kQ4_0, 33).has_value());
  EXPECT_FALSE(row_bytes(DType::kF32, -1).has_value());
  EXPECT_FALSE(row_bytes(DType::kF32, std::numeric_limits<int64_t>::max()).has_value());  // overflow
}

// ---- scalar conversions ---------------------------------------------------------------------

TEST(DType, F16ToF32KnownValues) {
  EXPECT_EQ(f16_to_f32(0x3C00), 1.0f);
  EXPECT_EQ(f16_to_f32(0xC000), -2.0f);
  EXPECT_EQ(f16_to_f32(0x3555), 0.333251953125f);        // 1 + 341/1024, times 2^-2
  EXPECT_EQ(f16_to_f32(0x7BFF), 65504.0f);               // max finite
  EXPECT_EQ(f16_to_f32(0x0400), std::ldexp(1.0f, -14));  // min normal
  EXPECT_EQ(f16_to_f32(0x0001), std::ldexp(1.0f, -24));  // min subnormal
  EXPECT_EQ(f16_to_f32(0x03FF), std::ldexp(1023.0f, -24));
  EXPECT_EQ(f16_to_f32(0x8001), -std::ldexp(1.0f, -24));
  EXPECT_EQ(f16_to_f32(0x0000), 0.0f);
  EXPECT_TRUE(std::signbit(f16_to_f32(0x8000)));
  EXPECT_EQ(f16_to_f32(0x7C00), std::numeric_limits<float>::infinity());
  EXPECT_EQ(f16_to_f32(0xFC00), -std::numeric_limits<float>::infinity());
  EXPECT_TRUE(std::isnan(f16_to_f32(0x7E00)));
  EXPECT_TRUE(std::isnan(f16_to_f32(0x7C01)));  // signalling NaN stays NaN
}

TEST(DType, F32ToF16RoundsToNearestEven) {
  EXPECT_EQ(f32_to_f16(1.0f), 0x3C00);
  EXPECT_EQ(f32_to_f16(-2.0f), 0xC000);
  EXPECT_EQ(f32_to_f16(65504.0f), 0x7BFF);
  EXPECT_EQ(f32_to_f16(65519.0f), 0x7BFF);  // just below the halfway point to 2^16
  EXPECT_EQ(f32_to_f16(65520.0f), 0x7C00);  // tie, rounds to even = inf
  EXPECT_EQ(f32_to_f16(1e10f), 0x7C00);
  EXPECT_EQ(f32_to_f16(-std::numeric_limits<float>::infinity()), 0xFC00);
  EXPECT_EQ(f32_to_f16(1.0f + std::ldexp(1.0f, -11)), 0x3C00);      // tie -> even (down)
  EXPECT_EQ(f32_to_f16(1.0f + 3 * std::ldexp(1.0f, -11)), 0x3C02);  // tie -> even (up)
  EXPECT_EQ(f32_to_f16(1.0f + std::ldexp(1.0f, -11) + std::ldexp(1.0f, -20)), 0x3C01);
  EXPECT_EQ(f32_to_f16(std::ldexp(1.0f, -24)), 0x0001);
  EXPECT_EQ(f32_to_f16(std::ldexp(1.0f, -25)), 0x0000);  // tie -> even (0)
  EXPECT_EQ(f32_to_f16(std::ldexp(3.0f, -25)), 0x0002);  // 1.5 ulp -> 2
  EXPECT_EQ(f32_to_f16(std::ldexp(1.0f, -26)), 0x0000);
  EXPECT_EQ(f32_to_f16(std::ldexp(1023.5f, -24)), 0x0400);  // rounds up into the normals
  EXPECT_EQ(f32_to_f16(-0.0f), 0x8000);
  uint16_t nan = f32_to_f16(std::numeric_limits<float>::quiet_NaN());
  EXPECT_EQ(nan & 0x7C00, 0x7C00);
  EXPECT_NE(nan & 0x03FF, 0);
  // Signalling NaN whose payload lives only in the low bits must not become inf.
  uint16_t snan = f32_to_f16(bits_to_float(0x7F800001));
  EXPECT_EQ(snan & 0x7C00, 0x7C00);
  EXPECT_NE(snan & 0x03FF, 0);
}

TEST(DType, F16RoundTripsEveryPattern) {
  for (uint32_t h = 0; h < 65536; ++h) {
    float f = f16_to_f32(static_cast<uint16_t>(h));
    if (std::isnan(f)) continue;
    ASSERT_EQ(f32_to_f16(f), h) << "pattern 0x" << std::hex << h;
  }
}

TEST(DType, Bf16RoundsToNearestEven) {
  EXPECT_EQ(f32_to_bf16(1.0f), 0x3F80);
  EXPECT_EQ(bf16_to_f32(0x3F80), 1.0f);
  EXPECT_EQ(bf16_to_f32(0xC040), -3.0f);
  EXPECT_EQ(f32_to_bf16(bits_to_float(0x3F808000)), 0x3F80);  // tie, even below
  EXPECT_EQ(f32_to_bf16(bits_to_float(0x3F818000)), 0x3F82);  // tie, even above
  EXPECT_EQ(f32_to_bf16(bits_to_float(0x3F808001)), 0x3F81);  // just above the tie
  EXPECT_EQ(f32_to_bf16(bits_to_float(0x3F807FFF)), 0x3F80);  // just below the tie
  EXPECT_EQ(f32_to_bf16(bits_to_float(0xBF818000)), 0xBF82);  // sign does not matter
  EXPECT_EQ(f32_to_bf16(bits_to_float(0x7F7FFFFF)), 0x7F80);  // max float rounds to inf
  EXPECT_EQ(f32_to_bf16(std::numeric_limits<float>::infinity()), 0x7F80);
  // NaN stays NaN, including a signalling NaN whose payload is only in the dropped bits.
  for (uint32_t nan_bits : {0x7FC00000u, 0x7F800001u, 0xFF800001u, 0x7FFFFFFFu}) {
    uint16_t b = f32_to_bf16(bits_to_float(nan_bits));
    EXPECT_TRUE(std::isnan(bf16_to_f32(b))) << std::hex << nan_bits;
  }
  EXPECT_EQ(round_bf16(bits_to_float(0x3F818000)), bits_to_float(0x3F820000));
}

TEST(DType, Fp8E4M3KnownValues) {
  EXPECT_EQ(f8e4m3_to_f32(0x38), 1.0f);
  EXPECT_EQ(f8e4m3_to_f32(0xB8), -1.0f);
  EXPECT_EQ(f8e4m3_to_f32(0x3C), 1.5f);  // m = 4
  EXPECT_EQ(f8e4m3_to_f32(0x40), 2.0f);
  EXPECT_EQ(f8e4m3_to_f32(0x7E), 448.0f);  // max finite
  EXPECT_EQ(f8e4m3_to_f32(0xFE), -448.0f);
  EXPECT_EQ(f8e4m3_to_f32(0x78), 256.0f);                // e = 15, m = 0 is finite (no inf in e4m3fn)
  EXPECT_EQ(f8e4m3_to_f32(0x01), std::ldexp(1.0f, -9));  // min subnormal
  EXPECT_EQ(f8e4m3_to_f32(0x07), std::ldexp(7.0f, -9));  // max subnormal
  EXPECT_EQ(f8e4m3_to_f32(0x08), std::ldexp(1.0f, -6));  // min normal
  EXPECT_EQ(f8e4m3_to_f32(0x00), 0.0f);
  EXPECT_TRUE(std::signbit(f8e4m3_to_f32(0x80)));
  EXPECT_TRUE(std::isnan(f8e4m3_to_f32(0x7F)));
  EXPECT_TRUE(std::isnan(f8e4m3_to_f32(0xFF)));
  int nans = 0;
  for (int v = 0; v < 256; ++v) nans += std::isnan(f8e4m3_to_f32(static_cast<uint8_t>(v)));
  EXPECT_EQ(nans, 2);
}

// ---- plain float rows -----------------------------------------------------------------------

TEST(Dequantize, PlainFloatRows) {
  std::vector<uint8_t> f32(8);
  uint32_t a = 0x3F800000, b = 0xC0490FDB;  // 1.0, -pi
  std::memcpy(f32.data(), &a, 4);
  std::memcpy(f32.data() + 4, &b, 4);
  auto y = deq(DType::kF32, f32, 2);
  EXPECT_EQ(y[0], 1.0f);
  EXPECT_EQ(y[1], bits_to_float(0xC0490FDB));

  std::vector<uint8_t> f16 = {0x00, 0x3C, 0x01, 0x00, 0x00, 0xFC};  // 1, 2^-24, -inf
  y = deq(DType::kF16, f16, 3);
  EXPECT_EQ(y[0], 1.0f);
  EXPECT_EQ(y[1], std::ldexp(1.0f, -24));
  EXPECT_EQ(y[2], -std::numeric_limits<float>::infinity());

  std::vector<uint8_t> bf16 = {0x80, 0x3F, 0x40, 0xC0};  // 1, -3
  y = deq(DType::kBF16, bf16, 2);
  EXPECT_EQ(y[0], 1.0f);
  EXPECT_EQ(y[1], -3.0f);

  std::vector<uint8_t> fp8 = {0x38, 0x7E, 0x01, 0xB8};  // raw values, no scale applied
  y = deq(DType::kF8E4M3, fp8, 4);
  EXPECT_EQ(y[0], 1.0f);
  EXPECT_EQ(y[1], 448.0f);
  EXPECT_EQ(y[2], std::ldexp(1.0f, -9));
  EXPECT_EQ(y[3], -1.0f);
}

// ---- legacy 32-element blocks (§3.2) ----------------------------------------------------------

// Packs 32 4-bit values in the legacy order: byte j = elem j (low) | elem j+16 (high).
void pack_legacy_nibbles(const int* q, uint8_t* qs) {
  for (int j = 0; j < 16; ++j) qs[j] = static_cast<uint8_t>((q[j] & 0xF) | ((q[j + 16] & 0xF) << 4));
}

TEST(Dequantize, Q4_0TwoBlocks) {
  const uint16_t d_bits[2] = {kH0_5, kHm2};
  const float d_val[2] = {0.5f, -2.0f};
  std::vector<uint8_t> b(36);
  int q[2][32];
  for (int blk = 0; blk < 2; ++blk) {
    for (int e = 0; e < 32; ++e) q[blk][e] = (e * 7 + 3 + blk) % 16;
    put16(b, 18 * blk, d_bits[blk]);
    pack_legacy_nibbles(q[blk], &b[18 * blk + 2]);
  }
  auto y = deq(DType::kQ4_0, b, 64);
  for (int blk = 0; blk < 2; ++blk)
    for (int e = 0; e < 32; ++e) EXPECT_EQ(y[32 * blk + e], (q[blk][e] - 8) * d_val[blk]) << blk << " " << e;
  // Explicit spot check: byte 2+3 = 0xA5 means element 3 has q=5 and element 19 has q=10.
  std::vector<uint8_t> one(18, 0x88);
  put16(one, 0, kH1);
  one[2 + 3] = 0xA5;
  y = deq(DType::kQ4_0, one, 32);
  EXPECT_EQ(y[3], -3.0f);
  EXPECT_EQ(y[19], 2.0f);
  EXPECT_EQ(y[4], 0.0f);
}

TEST(Dequantize, Q4_1) {
  std::vector<uint8_t> b(20);
  put16(b, 0, kH0_25);
  put16(b, 2, kHm1);
  int q[32];
  for (int e = 0; e < 32; ++e) q[e] = (e * 5 + 1) % 16;
  pack_legacy_nibbles(q, &b[4]);
  auto y = deq(DType::kQ4_1, b, 32);
  for (int e = 0; e < 32; ++e) EXPECT_EQ(y[e], q[e] * 0.25f - 1.0f) << e;
}

TEST(Dequantize, Q5_0) {
  std::vector<uint8_t> b(22);
  put16(b, 0, kH0_5);
  int q[32];
  uint32_t qh = 0;
  for (int e = 0; e < 32; ++e) {
    q[e] = (e * 11 + 5) % 32;
    qh |= static_cast<uint32_t>(q[e] >> 4) << e;  // 5th bit of element e = bit e of qh
  }
  for (int i = 0; i < 4; ++i) b[2 + i] = static_cast<uint8_t>(qh >> (8 * i));
  pack_legacy_nibbles(q, &b[6]);
  auto y = deq(DType::kQ5_0, b, 32);
  for (int e = 0; e < 32; ++e) EXPECT_EQ(y[e], (q[e] - 16) * 0.5f) << e;
}

TEST(Dequantize, Q5_1) {
  std::vector<uint8_t> b(24);
  put16(b, 0, kH0_125);
  put16(b, 2, kH1);
  int q[32];
  uint32_t qh = 0;
  for (int e = 0; e < 32; ++e) {
    q[e] = (e * 13 + 2) % 32;
    qh |= static_cast<uint32_t>(q[e] >> 4) << e;
  }
  for (int i = 0; i < 4; ++i) b[4 + i] = static_cast<uint8_t>(qh >> (8 * i));
  pack_legacy_nibbles(q, &b[8]);
  auto y = deq(DType::kQ5_1, b, 32);
  for (int e = 0; e < 32; ++e) EXPECT_EQ(y[e], q[e] * 0.125f + 1.0f) << e;
}

TEST(Dequantize, Q8_0TwoBlocks) {
  std::vector<uint8_t> b(68);
  put16(b, 0, kH0_25);
  put16(b, 34, kH2);
  for (int e = 0; e < 32; ++e) {
    b[2 + e] = static_cast<uint8_t>(static_cast<int8_t>(e * 8 - 128));  // -128 .. 120
    b[36 + e] = static_cast<uint8_t>(static_cast<int8_t>(127 - e));
  }
  auto y = deq(DType::kQ8_0, b, 64);
  for (int e = 0; e < 32; ++e) {
    EXPECT_EQ(y[e], (e * 8 - 128) * 0.25f);
    EXPECT_EQ(y[32 + e], (127 - e) * 2.0f);
  }
}

TEST(Dequantize, IQ4_NL) {
  std::vector<uint8_t> b(18);
  put16(b, 0, kH2);
  int q[32];
  for (int e = 0; e < 32; ++e) q[e] = (e * 5 + 3) % 16;
  pack_legacy_nibbles(q, &b[2]);
  auto y = deq(DType::kIQ4_NL, b, 32);
  for (int e = 0; e < 32; ++e) EXPECT_EQ(y[e], 2.0f * kIq4Table[q[e]]) << e;
}

// ---- K-quants (§3.3) --------------------------------------------------------------------------

// e = 128h + 32s + 16t + l
struct KIdx {
  int h, s, t, l;
};
KIdx kidx(int e) { return {e / 128, (e / 32) % 4, (e / 16) % 2, e % 16}; }

TEST(Dequantize, Q2_K) {
  std::vector<uint8_t> b(84, 0);
  int sc[16], mn[16], q[256];
  for (int k = 0; k < 16; ++k) {
    sc[k] = (k * 3 + 1) % 16;
    mn[k] = (k * 5 + 2) % 16;
    b[k] = static_cast<uint8_t>(sc[k] | (mn[k] << 4));
  }
  for (int e = 0; e < 256; ++e) {
    q[e] = (e * 7 + 1 + e / 64) % 4;
    KIdx i = kidx(e);
    b[16 + 32 * i.h + 16 * i.t + i.l] |= static_cast<uint8_t>(q[e] << (2 * i.s));
  }
  put16(b, 80, kH0_5);
  put16(b, 82, kH0_25);
  auto y = deq(DType::kQ2_K, b, 256);
  for (int e = 0; e < 256; ++e) EXPECT_EQ(y[e], 0.5f * sc[e / 16] * q[e] - 0.25f * mn[e / 16]) << e;
}

TEST(Dequantize, Q3_K) {
  std::vector<uint8_t> b(110, 0);
  int S[16], q[256];
  for (int k = 0; k < 16; ++k) {
    S[k] = (k * 7 + 3) % 64 - 32;  // -32..31
    int u = S[k] + 32;
    int low = u & 0xF, high = u >> 4;
    if (k < 8) {
      b[96 + k] |= static_cast<uint8_t>(low);
    } else {
      b[96 + k - 8] |= static_cast<uint8_t>(low << 4);
    }
    b[96 + 8 + k % 4] |= static_cast<uint8_t>(high << (2 * (k / 4)));
  }
  for (int e = 0; e < 256; ++e) {
    q[e] = (e * 5 + e / 32) % 8 - 4;  // -4..3
    KIdx i = kidx(e);
    int bit = q[e] >= 0 ? 1 : 0;
    int lo2 = bit ? q[e] : q[e] + 4;
    b[32 + 32 * i.h + 16 * i.t + i.l] |= static_cast<uint8_t>(lo2 << (2 * i.s));
    b[16 * i.t + i.l] |= static_cast<uint8_t>(bit << (4 * i.h + i.s));
  }
  put16(b, 108, kH0_25);
  auto y = deq(DType::kQ3_K, b, 256);
  for (int e = 0; e < 256; ++e) EXPECT_EQ(y[e], 0.25f * S[e / 16] * q[e]) << e;
}

// Packs eight 6-bit scales and mins the way §3.3 describes in words.
void pack_k4_scales(const int* sc, const int* mn, uint8_t* s) {
  for (int j = 0; j < 4; ++j) {
    s[j] = static_cast<uint8_t>(sc[j] | ((sc[j + 4] >> 4) << 6));      // bytes 0-3: sc0..3, top: sc4..7 high
    s[j + 4] = static_cast<uint8_t>(mn[j] | ((mn[j + 4] >> 4) << 6));  // bytes 4-7: mn0..3, top: mn4..7 high
    s[j + 8] = static_cast<uint8_t>((sc[j + 4] & 0xF) | ((mn[j + 4] & 0xF) << 4));
  }
}

const int kSc[8] = {1, 17, 33, 63, 5, 40, 18, 60};
const int kMn[8] = {2, 19, 0, 62, 50, 7, 33, 48};

TEST(Dequantize, Q4_K) {
  std::vector<uint8_t> b(144, 0);
  put16(b, 0, kH0_5);
  put16(b, 2, kH1);
  pack_k4_scales(kSc, kMn, &b[4]);
  int q[256];
  for (int e = 0; e < 256; ++e) {
    q[e] = (e * 7 + 3) % 16;
    int c = e / 64, l = e % 32;
    bool high = e % 64 >= 32;
    b[16 + 32 * c + l] |= static_cast<uint8_t>(high ? q[e] << 4 : q[e]);
  }
  auto y = deq(DType::kQ4_K, b, 256);
  for (int e = 0; e < 256; ++e) EXPECT_EQ(y[e], 0.5f * kSc[e / 32] * q[e] - 1.0f * kMn[e / 32]) << e;

  // Element 64c+32+l is the HIGH nibble of qs[32c+l] and belongs to sub-block 2c+1.
  std::vector<uint8_t> z(144, 0);
  put16(z, 0, kH1);
  put16(z, 2, kH1);
  const int sc2[8] = {0, 0, 2, 3, 0, 0, 0, 0}, mn2[8] = {0, 0, 5, 7, 0, 0, 0, 0};
  pack_k4_scales(sc2, mn2, &z[4]);
  z[16 + 32 * 1 + 5] = 0xA3;  // c = 1, l = 5
  y = deq(DType::kQ4_K, z, 256);
  EXPECT_EQ(y[64 + 5], 2.0f * 3 - 5);        // low nibble 3, sub-block 2
  EXPECT_EQ(y[64 + 32 + 5], 3.0f * 10 - 7);  // high nibble 10, sub-block 3
  EXPECT_EQ(y[64 + 6], -5.0f);
}

TEST(Dequantize, Q5_K) {
  std::vector<uint8_t> b(176, 0);
  put16(b, 0, kH0_25);
  put16(b, 2, kH0_5);
  pack_k4_scales(kSc, kMn, &b[4]);
  int q[256];
  for (int e = 0; e < 256; ++e) {
    q[e] = (e * 13 + 7) % 32;
    int c = e / 64, j = e / 32, l = e % 32;
    bool high = e % 64 >= 32;
    b[48 + 32 * c + l] |= static_cast<uint8_t>(high ? (q[e] & 0xF) << 4 : (q[e] & 0xF));
    b[16 + l] |= static_cast<uint8_t>((q[e] >> 4) << j);  // 5th bit: bit j of qh[l]
  }
  auto y = deq(DType::kQ5_K, b, 256);
  for (int e = 0; e < 256; ++e) EXPECT_EQ(y[e], 0.25f * kSc[e / 32] * q[e] - 0.5f * kMn[e / 32]) << e;
}

TEST(Dequantize, Q6_K) {
  std::vector<uint8_t> b(210, 0);
  int sc[16], q[256];
  for (int k = 0; k < 16; ++k) {
    sc[k] = (k * 37) % 256 - 128;  // signed int8, includes -128
    b[192 + k] = static_cast<uint8_t>(static_cast<int8_t>(sc[k]));
  }
  for (int e = 0; e < 256; ++e) q[e] = (e * 29 + 11) % 64;
  // Table in §3.3: for half h and l in 0..31, (QL[l], QL[l+32], QH[l]) hold elements
  // 128h + {0, 32, 64, 96} + l.
  for (int h = 0; h < 2; ++h) {
    for (int l = 0; l < 32; ++l) {
      int q0 = q[128 * h + l], q1 = q[128 * h + 32 + l], q2 = q[128 * h + 64 + l], q3 = q[128 * h + 96 + l];
      b[64 * h + l] = static_cast<uint8_t>((q0 & 0xF) | ((q2 & 0xF) << 4));
      b[64 * h + l + 32] = static_cast<uint8_t>((q1 & 0xF) | ((q3 & 0xF) << 4));
      b[128 + 32 * h + l] =
          static_cast<uint8_t>((q0 >> 4) | ((q1 >> 4) << 2) | ((q2 >> 4) << 4) | ((q3 >> 4) << 6));
    }
  }
  put16(b, 208, kH0_125);
  auto y = deq(DType::kQ6_K, b, 256);
  for (int e = 0; e < 256; ++e) EXPECT_EQ(y[e], 0.125f * sc[e / 16] * (q[e] - 32)) << e;
}

TEST(Dequantize, IQ4_XS) {
  std::vector<uint8_t> b(136, 0);
  put16(b, 0, kH0_5);
  int ls[8];
  uint16_t scales_h = 0;
  for (int j = 0; j < 8; ++j) {
    ls[j] = (j * 9 + 3) % 64;
    b[4 + j / 2] |= static_cast<uint8_t>((ls[j] & 0xF) << (4 * (j % 2)));
    scales_h |= static_cast<uint16_t>((ls[j] >> 4) << (2 * j));
  }
  put16(b, 2, scales_h);
  int q[256];
  for (int e = 0; e < 256; ++e) q[e] = (e * 3 + e / 32) % 16;
  for (int j = 0; j < 8; ++j) pack_legacy_nibbles(&q[32 * j], &b[8 + 16 * j]);
  auto y = deq(DType::kIQ4_XS, b, 256);
  for (int e = 0; e < 256; ++e) EXPECT_EQ(y[e], 0.5f * (ls[e / 32] - 32) * kIq4Table[q[e]]) << e;
}

// ---- quantizers (round trip only) ------------------------------------------------------------

std::vector<float> random_row(int n, uint32_t seed, float lo, float hi) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> dist(lo, hi);
  std::vector<float> x(n);
  for (float& v : x) v = dist(rng);
  return x;
}

float read_f16(const uint8_t* p) { return f16_to_f32(static_cast<uint16_t>(p[0] | (p[1] << 8))); }

TEST(Quantize, CanQuantize) {
  for (DType t :
       {DType::kF32, DType::kF16, DType::kBF16, DType::kQ8_0, DType::kQ4_0, DType::kQ4_K, DType::kQ6_K}) {
    EXPECT_TRUE(can_quantize(t)) << dtype_name(t);
  }
  for (DType t : {DType::kQ2_K, DType::kQ3_K, DType::kQ5_K, DType::kIQ4_XS, DType::kF8E4M3}) {
    EXPECT_FALSE(can_quantize(t)) << dtype_name(t);
  }
}

TEST(Quantize, PlainFloats) {
  std::vector<float> x = {1.0f, -2.5f, 65520.0f, bits_to_float(0x3F808000)};
  std::vector<uint8_t> b(8);
  quantize_row(DType::kF16, x.data(), b.data(), 4);
  EXPECT_EQ(b[0] | (b[1] << 8), 0x3C00);
  EXPECT_EQ(b[4] | (b[5] << 8), 0x7C00);
  quantize_row(DType::kBF16, x.data(), b.data(), 4);
  EXPECT_EQ(b[6] | (b[7] << 8), 0x3F80);
  auto y = deq(DType::kBF16, b, 4);
  EXPECT_EQ(y[1], -2.5f);
  std::vector<uint8_t> f(16);
  quantize_row(DType::kF32, x.data(), f.data(), 4);
  EXPECT_EQ(deq(DType::kF32, f, 4), x);
}

TEST(Quantize, Q8_0RoundTrip) {
  const int n = 256;
  auto x = random_row(n, 1, -3.0f, 3.0f);
  x[5] = 0;
  std::vector<uint8_t> b(n / 32 * 34);
  quantize_row(DType::kQ8_0, x.data(), b.data(), n);
  auto y = deq(DType::kQ8_0, b, n);
  for (int blk = 0; blk < n / 32; ++blk) {
    float amax = 0;
    for (int e = 0; e < 32; ++e) amax = std::max(amax, std::fabs(x[32 * blk + e]));
    float d_exact = amax / 127, d = read_f16(&b[34 * blk]);
    // |err| <= d/2 from rounding, plus up to 127 * |d - fp16(d)| from storing d as fp16.
    float bound = d / 2 + 127 * std::fabs(d - d_exact) + 1e-6f;
    for (int e = 0; e < 32; ++e)
      EXPECT_LE(std::fabs(y[32 * blk + e] - x[32 * blk + e]), bound) << blk << " " << e;
  }
  EXPECT_EQ(y[5], 0.0f);
  // All-zero block: d = 0, all values 0, no NaN.
  std::vector<float> zeros(32, 0.0f);
  quantize_row(DType::kQ8_0, zeros.data(), b.data(), 32);
  y = deq(DType::kQ8_0, b, 32);
  for (float v : y) EXPECT_EQ(v, 0.0f);
}

// Non-finite inputs count as 0 (ggml converts them to int: undefined behaviour): they neither
// set the scale nor get a non-zero code, and the finite elements of their block quantize as if
// they were absent. The CUDA KV writer does the same (BlockDecode.EncodersMatchCpu).
TEST(Quantize, Q8_0NonFiniteValuesBecomeZero) {
  const float inf = std::numeric_limits<float>::infinity(), nan = std::numeric_limits<float>::quiet_NaN();
  std::vector<float> x(32);
  for (int e = 0; e < 32; ++e) x[e] = (e - 16) * 0.25f;  // amax 4 (element 0), d = 4 / 127
  x[3] = nan, x[7] = inf, x[11] = -inf, x[13] = -nan;
  std::vector<uint8_t> b(34);
  quantize_row(DType::kQ8_0, x.data(), b.data(), 32);
  EXPECT_EQ(read_f16(b.data()), f16_to_f32(f32_to_f16(4.0f / 127.0f)));
  for (int e : {3, 7, 11, 13}) EXPECT_EQ(b[2 + e], 0) << "element " << e;
  EXPECT_EQ(static_cast<int8_t>(b[2 + 0]), -127);
  EXPECT_EQ(static_cast<int8_t>(b[2 + 16]), 0);
  EXPECT_EQ(static_cast<int8_t>(b[2 + 24]), 64);  // 2 / (4 / 127) = 63.5, rounded away from 0
  // Nothing finite: scale 0, every code 0, no NaN on the way back.
  std::vector<float> none = {nan, inf, -inf};
  none.resize(32, nan);
  quantize_row(DType::kQ8_0, none.data(), b.data(), 32);
  for (float v : deq(DType::kQ8_0, b, 32)) EXPECT_EQ(v, 0.0f);
  // A subnormal amax: 1 / d overflows to inf; codes stay in range (0 for 0, +-127 for the rest).
  std::vector<float> tiny(32, 0.0f);
  tiny[0] = 1e-40f, tiny[1] = -1e-40f;  // d = 7.9e-43
  quantize_row(DType::kQ8_0, tiny.data(), b.data(), 32);
  EXPECT_EQ(static_cast<int8_t>(b[2 + 0]), 127);
  EXPECT_EQ(static_cast<int8_t>(b[2 + 1]), -127);
  for (int e = 2; e < 32; ++e) EXPECT_EQ(b[2 + e], 0) << "element " << e;
}

TEST(Quantize, Q4_0RoundTrip) {
  const int n = 128;
  auto x = random_row(n, 2, -1.0f, 1.0f);
  std::vector<uint8_t> b(n / 32 * 18);
  quantize_row(DType::kQ4_0, x.data(), b.data(), n);
  auto y = deq(DType::kQ4_0, b, n);
  for (int blk = 0; blk < n / 32; ++blk) {
    float amax = 0;
    for (int e = 0; e < 32; ++e) amax = std::max(amax, std::fabs(x[32 * blk + e]));
    float d = std::fabs(read_f16(&b[18 * blk]));
    EXPECT_NEAR(d, amax / 8, amax / 8 * 1e-3);
    // Rounding error is d/2; the extreme opposite to the max element clips from +8 to +7 (error
    // up to d); fp16 storage of d adds up to 8 * 2^-11 * d.
    for (int e = 0; e < 32; ++e) {
      EXPECT_LE(std::fabs(y[32 * blk + e] - x[32 * blk + e]), d * 1.01f) << blk << " " << e;
    }
  }
}

TEST(Quantize, Q4_KRoundTrip) {
  const int n = 512;
  auto x = random_row(n, 3, -2.0f, 1.0f);
  for (int l = 0; l < 32; ++l) x[32 + l] = 0.5f + 0.01f * l;   // a sub-block with no negatives (min 0)
  for (int l = 0; l < 32; ++l) x[64 + l] = -1.0f - 0.02f * l;  // only negatives
  std::vector<uint8_t> b(n / 256 * 144);
  quantize_row(DType::kQ4_K, x.data(), b.data(), n);
  auto y = deq(DType::kQ4_K, b, n);
  double sum_sq = 0;
  for (int blk = 0; blk < n / 256; ++blk) {
    float d = read_f16(&b[144 * blk]), dmin = read_f16(&b[144 * blk + 2]);
    for (int j = 0; j < 8; ++j) {
      float lo = 0, hi = 0;
      for (int l = 0; l < 32; ++l) {
        lo = std::min(lo, x[256 * blk + 32 * j + l]);
        hi = std::max(hi, x[256 * blk + 32 * j + l]);
      }
      // Sub-block step d*sc <= (range + dmin)/15 + d; the error is at most half a step.
      float bound = ((hi - lo) + dmin) / 30 + d / 2 + 1e-5f;
      for (int l = 0; l < 32; ++l) {
        int e = 256 * blk + 32 * j + l;
        float err = std::fabs(y[e] - x[e]);
        EXPECT_LE(err, bound) << "block " << blk << " sub-block " << j << " l " << l;
        sum_sq += err * err;
      }
    }
  }
  EXPECT_LT(std::sqrt(sum_sq / n), 0.07);  // 3.0 range / 15 steps / sqrt(12) ~ 0.058
  std::vector<float> zeros(256, 0.0f);
  quantize_row(DType::kQ4_K, zeros.data(), b.data(), 256);
  y = deq(DType::kQ4_K, b, 256);
  for (float v : y) EXPECT_EQ(v, 0.0f);
}

TEST(Quantize, Q6_KRoundTrip) {
  const int n = 512;
  auto x = random_row(n, 4, -1.5f, 1.5f);
  for (int l = 0; l < 16; ++l) x[16 + l] = 0.001f * l;  // a tiny sub-block
  std::vector<uint8_t> b(n / 256 * 210);
  quantize_row(DType::kQ6_K, x.data(), b.data(), n);
  auto y = deq(DType::kQ6_K, b, n);
  for (int blk = 0; blk < n / 256; ++blk) {
    float d = read_f16(&b[210 * blk + 208]);
    for (int s = 0; s < 16; ++s) {
      float dd = std::fabs(d * static_cast<int8_t>(b[210 * blk + 192 + s]));
      // Half a step of rounding; the extreme opposite the largest-magnitude element can clip
      // from +32 to +31 steps (one step), and the int8 scale may round down by up to d/2,
      // which 32 steps magnify to 16 * d.
      float bound = dd + 16 * d + 1e-6f;
      for (int l = 0; l < 16; ++l) {
        int e = 256 * blk + 16 * s + l;
        EXPECT_LE(std::fabs(y[e] - x[e]), bound) << blk << " " << s << " " << l;
      }
    }
  }
}

}  // namespace
}  // namespace gemma3
