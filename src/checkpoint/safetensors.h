// Hugging Face safetensors checkpoints: one file, or a folder of shards described by
// model.safetensors.index.json (docs/formats.md §1.1-1.4). Tensors are zero-copy views into the
// mapped files; nothing is read into memory except the headers and fp8 scales.
//
// Loadable dtypes: BF16, F16, F32 and F8_E4M3. Every other dtype is an error (kUnsupported),
// so a checkpoint either loads whole or says which tensor it cannot handle.
//
// FP8 (compressed-tensors "float-quantized", docs/formats.md §5.2): every F8_E4M3 tensor `X.weight`
// must have a scale `X.weight_scale` (F32/BF16/F16) of shape [], [1], [1, 1] (per-tensor) or
// [rows], [rows, 1] (per-channel). The scale is copied into TensorView::row_scale and the
// `X.weight_scale` tensor is removed from tensors(); so is `X.input_scale` (static activation
// scale of the "FP8" preset: we dequantize weights and keep activations in float, so it is not
// needed). Group/block scales and HF's `X.weight_scale_inv` (quant_method "fp8", one scale per
// 128x128 block, convention unverified in §5.3) cannot be expressed as one scale per row and
// are reported as kUnsupported rather than guessed.
//
// Note: safetensors only guarantees byte alignment of tensor data; `TensorView::data` may be
// misaligned for its element type (read with memcpy or unaligned loads).
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "core/tensor.h"
#include "gemma3/status.h"
#include "io/mapped_file.h"

namespace gemma3 {

class SafetensorsSet {
 public:
  // `path_or_folder`:
  //   - a folder: model.safetensors.index.json if present (weight_map -> shards), else
  //     model.safetensors, else the only *.safetensors file in it;
  //   - a *.safetensors file;
  //   - a *.safetensors.index.json file (shards are resolved next to it).
  static Result<SafetensorsSet> open(const std::string& path_or_folder);

  SafetensorsSet(SafetensorsSet&&) noexcept = default;
  SafetensorsSet& operator=(SafetensorsSet&&) noexcept = default;

  // All tensors (fp8 scales folded in), shard by shard in data-offset order.
  const std::vector<TensorView>& tensors() const { return tensors_; }
  // nullptr when absent.
  const TensorView* find_tensor(std::string_view name) const;
  // The file a tensor lives in ("" for a name that is not in the set); for messages.
  const std::string& file_of(std::string_view name) const;
  // What open() was given.
  const std::string& path() const { return path_; }
  // The mapped files, in the order they were opened.
  std::vector<std::string> file_paths() const;

 private:
  SafetensorsSet() = default;

  struct NameHash {
    using is_transparent = void;
    size_t operator()(std::string_view s) const { return std::hash<std::string_view>{}(s); }
  };
  void rebuild_index();

  std::string path_;
  std::vector<MappedFile> files_;      // kept mapped for the lifetime of the views
  std::vector<TensorView> tensors_;    // [n_tensors]
  std::vector<uint32_t> tensor_file_;  // [n_tensors] index into files_
  std::unordered_map<std::string, size_t, NameHash, std::equal_to<>> index_;  // name -> tensors_ index
};

}  // namespace gemma3
