// Dequantization of one row (a whole number of blocks) of any weight type we load, following
// the block layouts in ggml (see docs/formats.md §3). Scalar and obviously
// right: this is the reference every fast kernel is checked against.
#pragma once

#include <cstdint>

#include "core/dtype.h"

namespace gemma3 {

// dst[0..n) = values of the n elements starting at src. n must be a multiple of the block
// size of t. For kF8E4M3 the caller applies the row scale (dst holds the raw fp8 values).
void dequantize_row(DType t, const void* src, float* dst, int64_t n);

// Quantizers used by make-model and tests of the fast kernels (round-trip only; dequantizer
// goldens come from hand-built blocks, never from these).
void quantize_row(DType t, const float* src, void* dst, int64_t n);
bool can_quantize(DType t);

}  // namespace gemma3
