// Element types of weights as stored in checkpoints, and their block geometry.
#pragma once

#include <cstdint>
#include <optional>
#include <string_view>

namespace gemma3 {

enum class DType : uint8_t {
  kF32,
  kF16,
  kBF16,
  kF8E4M3,  // fp8 e4m3fn (compressed-tensors); per-row scale kept beside the tensor
  kQ4_0,
  kQ4_1,
  kQ5_0,
  kQ5_1,
  kQ8_0,
  kQ2_K,
  kQ3_K,
  kQ4_K,
  kQ5_K,
  kQ6_K,
  kIQ4_NL,
  kIQ4_XS,
};

struct DTypeInfo {
  const char* name;  // ggml spelling: "Q4_K", "BF16", "F8_E4M3"
  int block_elems;   // elements per block (1 for plain floats)
  int block_bytes;   // bytes per block
};

const DTypeInfo& dtype_info(DType t);
inline const char* dtype_name(DType t) { return dtype_info(t).name; }

// ggml type id (GGUF tensor_info.type) -> DType; nullopt for ids we do not load.
std::optional<DType> dtype_from_ggml(uint32_t ggml_id);
uint32_t dtype_to_ggml(DType t);  // kF8E4M3 has no ggml id: returns UINT32_MAX
// "Q4_K", "q4_k", "bf16" ... -> DType
std::optional<DType> dtype_from_name(std::string_view name);

// Bytes of a row of n elements; nullopt if n is not a multiple of the block size.
std::optional<uint64_t> row_bytes(DType t, int64_t n);

// Scalar conversions (exact for f16/bf16 -> f32; f32 -> bf16/f16 round to nearest even).
float f16_to_f32(uint16_t h);
uint16_t f32_to_f16(float f);
inline float bf16_to_f32(uint16_t b) {
  uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  __builtin_memcpy(&f, &u, 4);
  return f;
}
uint16_t f32_to_bf16(float f);
inline float round_bf16(float f) { return bf16_to_f32(f32_to_bf16(f)); }
float f8e4m3_to_f32(uint8_t v);
// f32 -> fp8 e4m3fn, round to nearest even, saturating at +-448 (e4m3fn has no infinity);
// NaN gives 0x7F, the format's NaN.
uint8_t f32_to_f8e4m3(float x);

}  // namespace gemma3
