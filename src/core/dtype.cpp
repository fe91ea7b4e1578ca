#include "core/dtype.h"

#include <cmath>
#include <cstring>
#include <limits>

namespace gemma3 {
namespace {

struct DTypeEntry {
  DTypeInfo info;
  uint32_t ggml_id;  // UINT32_MAX: no ggml id
};

// Indexed by DType. Geometry from docs/formats.md §2.4 / §3.5 (ggml-common.h block structs).
constexpr DTypeEntry kDTypes[] = {
    {{"F32", 1, 4}, 0},               // kF32
    {{"F16", 1, 2}, 1},               // kF16
    {{"BF16", 1, 2}, 30},             // kBF16
    {{"F8_E4M3", 1, 1}, UINT32_MAX},  // kF8E4M3 (safetensors spelling; not a ggml type)
    {{"Q4_0", 32, 18}, 2},            // kQ4_0
    {{"Q4_1", 32, 20}, 3},            // kQ4_1
    {{"Q5_0", 32, 22}, 6},            // kQ5_0
    {{"Q5_1", 32, 24}, 7},            // kQ5_1
    {{"Q8_0", 32, 34}, 8},            // kQ8_0
    {{"Q2_K", 256, 84}, 10},          // kQ2_K
    {{"Q3_K", 256, 110}, 11},         // kQ3_K
    {{"Q4_K", 256, 144}, 12},         // kQ4_K
    {{"Q5_K", 256, 176}, 13},         // kQ5_K
    {{"Q6_K", 256, 210}, 14},         // kQ6_K
    {{"IQ4_NL", 32, 18}, 20},         // kIQ4_NL
    {{"IQ4_XS", 256, 136}, 23},       // kIQ4_XS
};
constexpr size_t kNumDTypes = sizeof(kDTypes) / sizeof(kDTypes[0]);
static_assert(kNumDTypes == static_cast<size_t>(DType::kIQ4_XS) + 1, "kDTypes must cover every DType");

char lower_ascii(char c) { return (c >= 'A' && c <= 'Z') ? static_cast<char>(c - 'A' + 'a') : c; }

// Compares ignoring ASCII case and underscores, so "q4k", "Q4_K" and "f8e4m3" all match.
bool loose_equal(std::string_view a, std::string_view b) {
  size_t i = 0, j = 0;
  while (true) {
    while (i < a.size() && a[i] == '_') ++i;
    while (j < b.size() && b[j] == '_') ++j;
    if (i == a.size() || j == b.size()) return i == a.size() && j == b.size();
    if (lower_ascii(a[i]) != lower_ascii(b[j])) return false;
    ++i;
    ++j;
  }
}

uint32_t float_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

float bits_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

}  // namespace

const DTypeInfo& dtype_info(DType t) {
  size_t i = static_cast<size_t>(t);
  // An out-of-range enum value is a programming error; answer with F32 rather than read past
  // the table (callers only ever pass values they got from this file).
  return kDTypes[i < kNumDTypes ? i : 0].info;
}

std::optional<DType> dtype_from_ggml(uint32_t ggml_id) {
  for (size_t i = 0; i < kNumDTypes; ++i) {
    if (kDTypes[i].ggml_id == ggml_id && ggml_id != UINT32_MAX) return static_cast<DType>(i);
  }
  return std::nullopt;
}

uint32_t dtype_to_ggml(DType t) {
  size_t i = static_cast<size_t>(t);
  return i < kNumDTypes ? kDTypes[i].ggml_id : UINT32_MAX;
}

std::optional<DType> dtype_from_name(std::string_view name) {
  if (name.empty()) return std::nullopt;
  for (size_t i = 0; i < kNumDTypes; ++i) {
    if (loose_equal(name, kDTypes[i].info.name)) return static_cast<DType>(i);
  }
  return std::nullopt;
}

std::optional<uint64_t> row_bytes(DType t, int64_t n) {
  const DTypeInfo& info = dtype_info(t);
  if (n < 0 || n % info.block_elems != 0) return std::nullopt;
  uint64_t blocks = static_cast<uint64_t>(n / info.block_elems);
  if (blocks > std::numeric_limits<uint64_t>::max() / static_cast<uint64_t>(info.block_bytes)) {
    return std::nullopt;
  }
  return blocks * static_cast<uint64_t>(info.block_bytes);
}

float f16_to_f32(uint16_t h) {
  uint32_t sign = static_cast<uint32_t>(h & 0x8000) << 16;
  uint32_t exp = (h >> 10) & 0x1F;
  uint32_t mant = h & 0x3FF;
  if (exp == 0) {
    // Zero or subnormal: mant * 2^-24, exact in f32.
    float v = std::ldexp(static_cast<float>(mant), -24);
    return (sign ? -v : v);
  }
  if (exp == 31) {
    // Inf (mant 0) or NaN (payload kept in the top mantissa bits).
    return bits_float(sign | 0x7F800000u | (mant << 13));
  }
  return bits_float(sign | ((exp - 15 + 127) << 23) | (mant << 13));
}

uint16_t f32_to_f16(float f) {
  uint32_t u = float_bits(f);
  uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000);
  uint32_t a = u & 0x7FFFFFFFu;
  if (a > 0x7F800000u) {
    // NaN: keep the top payload bits and force the quiet bit so it cannot become inf.
    return static_cast<uint16_t>(sign | 0x7E00 | ((a >> 13) & 0x3FF));
  }
  // 65520 = halfway between the largest finite f16 (65504, odd mantissa) and 2^16: ties to
  // even round it up, so everything >= 65520 (and inf) becomes inf.
  if (a >= 0x477FF000u) return static_cast<uint16_t>(sign | 0x7C00);
  if (a < 0x38800000u) {
    // Below 2^-14: subnormal f16 (or zero). Scaling by 2^24 is exact; nearbyint rounds to
    // nearest even in the default rounding mode. A result of 1024 is the smallest normal,
    // whose encoding 0x0400 is exactly that integer.
    float scaled = bits_float(a) * 16777216.0f;
    return static_cast<uint16_t>(sign | static_cast<uint16_t>(std::nearbyint(scaled)));
  }
  uint32_t exp = (a >> 23) - 127 + 15;  // 1..30
  uint32_t mant = a & 0x7FFFFF;
  uint32_t h = (exp << 10) | (mant >> 13);
  uint32_t rem = mant & 0x1FFF;
  // Round to nearest even; a carry out of the mantissa correctly bumps the exponent.
  if (rem > 0x1000 || (rem == 0x1000 && (h & 1))) ++h;
  return static_cast<uint16_t>(sign | h);
}

uint16_t f32_to_bf16(float f) {
  uint32_t u = float_bits(f);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) {
    // NaN stays NaN: truncate and set the quiet bit (ggml does the same).
    return static_cast<uint16_t>((u >> 16) | 0x40);
  }
  // Round to nearest even: add 0x7FFF plus the lowest kept bit, then truncate. Overflow of a
  // large finite value correctly produces inf.
  u += 0x7FFFu + ((u >> 16) & 1);
  return static_cast<uint16_t>(u >> 16);
}

float f8e4m3_to_f32(uint8_t v) {
  // e4m3fn (docs/formats.md §5.1): bias 7, no infinities, only S.1111.111 is NaN.
  bool neg = (v & 0x80) != 0;
  int exp = (v >> 3) & 0xF;
  int mant = v & 7;
  float r;
  if (exp == 15 && mant == 7) {
    r = std::numeric_limits<float>::quiet_NaN();
  } else if (exp == 0) {
    r = std::ldexp(static_cast<float>(mant), -9);  // 2^-6 * m/8
  } else {
    r = std::ldexp(static_cast<float>(8 + mant), exp - 10);  // 2^(e-7) * (1 + m/8)
  }
  return neg ? -r : r;
}

uint8_t f32_to_f8e4m3(float x) {
  const uint8_t sign = std::signbit(x) ? 0x80 : 0x00;
  float a = std::abs(x);
  if (std::isnan(x)) return 0x7F;
  if (!(a < 448.0f)) return sign | 0x7E;  // saturate (e4m3fn has no infinity)
  if (a == 0.0f) return sign;
  int e;
  std::frexp(a, &e);  // a = m * 2^e, m in [0.5, 1)
  int exp = e - 1;    // a = 1.f * 2^exp
  if (exp < -6) {
    // Subnormal: a = q * 2^-9, q in 0..7; q == 8 rounds up to the smallest normal 2^-6.
    const int q = static_cast<int>(std::nearbyint(std::ldexp(a, 9)));
    return static_cast<uint8_t>(sign | q);  // q == 8 is exponent 1, mantissa 0: the same bits
  }
  int q = static_cast<int>(std::nearbyint(std::ldexp(a, 3 - exp))) - 8;  // mantissa 0..8
  if (q == 8) q = 0, ++exp;
  const int biased = exp + 7;
  if (biased > 15 || (biased == 15 && q == 7)) return sign | 0x7E;
  return static_cast<uint8_t>(sign | (biased << 3) | q);
}

}  // namespace gemma3
