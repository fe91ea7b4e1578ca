#include "core/tensor.h"

#include <fmt/format.h>

namespace gemma3 {

std::string shape_to_string(const std::vector<int64_t>& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) {
    if (i) s += ", ";
    s += std::to_string(shape[i]);
  }
  return s + "]";
}

Result<uint64_t> weight_row_bytes(const TensorView& t) {
  if (t.shape.empty() || t.shape.size() > 2)
    return unsupported(fmt::format("tensor {}: {}-D weights are not supported", t.name, t.shape.size()));
  const auto rb = row_bytes(t.dtype, t.cols());
  if (!rb || *rb * static_cast<uint64_t>(t.rows()) != t.nbytes)
    return invalid_file(fmt::format("tensor {}: {} bytes do not hold {} {} values", t.name, t.nbytes,
                                    shape_to_string(t.shape), dtype_name(t.dtype)));
  return *rb;
}

}  // namespace gemma3
