// A read-only view of a weight tensor that lives in a mapped checkpoint (or in memory the
// owning container keeps alive).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "core/dtype.h"
#include "gemma3/status.h"

namespace gemma3 {

struct TensorView {
  std::string name;  // name as found in the file
  DType dtype = DType::kF32;
  // Row-major, slowest dimension first (PyTorch/HF order). A GGUF ne = [in, out]
  // becomes shape = {out, in}. The last dimension is contiguous and holds whole blocks.
  std::vector<int64_t> shape;
  const void* data = nullptr;  // first byte of the tensor
  uint64_t nbytes = 0;
  // fp8 only: one fp32 scale per row (shape[0] values), or a single value for a per-tensor
  // scale (value = fp8 * scale). Empty for every other dtype.
  std::vector<float> row_scale;

  int64_t numel() const {
    int64_t n = 1;
    for (int64_t d : shape) n *= d;
    return n;
  }
  int64_t rows() const {  // product of the leading dimensions (no division: a 0 column count is legal)
    int64_t n = 1;
    for (size_t i = 0; i + 1 < shape.size(); ++i) n *= shape[i];
    return n;
  }
  int64_t cols() const { return shape.empty() ? 1 : shape.back(); }
  uint64_t row_stride_bytes() const { return rows() ? nbytes / static_cast<uint64_t>(rows()) : 0; }
  const uint8_t* row_ptr(int64_t r) const {
    return static_cast<const uint8_t*>(data) + static_cast<uint64_t>(r) * row_stride_bytes();
  }
};

// "[640, 2048]"
std::string shape_to_string(const std::vector<int64_t>& shape);

// A backend weight's row size in bytes: the tensor must be a vector or a matrix whose bytes hold
// exactly rows() x cols() values of its type (what every backend's upload checks first).
Result<uint64_t> weight_row_bytes(const TensorView& t);

}  // namespace gemma3
