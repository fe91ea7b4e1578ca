// Gemma 3 vision tower (SigLIP) and multimodal projector weights, from a llama.cpp mmproj GGUF
// (docs/formats.md §2.11) or from the vision tensors of a Hugging Face multimodal folder (§1.7, §1.8),
// normalized to one layout and checked against VisionConfig and the text model's hidden size.
//
// Normalizations (done here, once):
//  * FFN: some older mmproj files store fc1 under ffn_down and fc2 under ffn_up. Detected by
//    shape (as clip.cpp does: ffn_down's rows are `hidden` wide) and swapped back; the same rule
//    is applied to HF names.
//  * mm_input_projection: HF holds [Hv, H] used as x @ W (not an nn.Linear); llama.cpp's
//    converter keeps those bytes (ne [H, Hv]). A file that stores it as [H, Hv] ([out, in], like
//    every other matrix) is transposed into an owned fp32 copy. When H == Hv the two cannot be
//    told apart and the converter's layout is assumed.
//  * mm_soft_emb_norm is a Gemma RMSNorm: GGUF stores 1 + w, HF stores w. It is kept as an owned
//    fp32 copy holding 1 + w. SigLIP LayerNorm weights and biases are plain in both formats.
// Running the tower is not implemented here; this is only loading and checking.
#pragma once

#include <deque>
#include <memory>
#include <string>
#include <vector>

#include "core/tensor.h"
#include "gemma3/status.h"
#include "model/config.h"

namespace gemma3 {

class GgufFile;
class SafetensorsSet;

struct VisionLayerWeights {
  TensorView ln1_w, ln1_b;  // [Hv] LayerNorm before attention (plain weight, bias)
  TensorView q_w, q_b;      // [Hv, Hv], [Hv]
  TensorView k_w, k_b;      // [Hv, Hv], [Hv]
  TensorView v_w, v_b;      // [Hv, Hv], [Hv]
  TensorView o_w, o_b;      // [Hv, Hv], [Hv]  attention output projection
  TensorView ln2_w, ln2_b;  // [Hv] LayerNorm before the MLP
  TensorView fc1_w, fc1_b;  // [Iv, Hv], [Iv]  (GGUF ffn_up)
  TensorView fc2_w, fc2_b;  // [Hv, Iv], [Hv]  (GGUF ffn_down)
};

struct VisionWeights {
  VisionConfig config;
  int text_hidden = 0;  // H: the projector's output width
  std::string source;   // file or folder, for messages

  TensorView patch_embd;     // [Hv, 3, p, p] Conv2d weight, stride p
  TensorView patch_bias;     // [Hv]
  TensorView position_embd;  // [(image/p)^2, Hv]
  std::vector<VisionLayerWeights> layers;
  TensorView post_ln_w, post_ln_b;  // [Hv]
  TensorView soft_emb_norm;         // [Hv] fp32, holds 1 + w
  TensorView input_projection;      // [Hv, H], used as x @ W (row i = input feature i)

  // How the file stored things (for `info` and tests).
  bool ffn_swapped = false;            // fc1/fc2 were stored under each other's names
  bool projection_transposed = false;  // the projection was stored [H, Hv] and transposed here

  // Every tensor view above, for byte counts.
  std::vector<const TensorView*> all() const;

  // Storage: the mmproj mapping (GGUF) and owned fp32 copies; HF views point into the
  // Checkpoint's SafetensorsSet, which must outlive this.
  std::unique_ptr<GgufFile> gguf;
  std::deque<std::vector<float>> owned;

  VisionWeights();
  ~VisionWeights();
};

// Opens a llama.cpp mmproj GGUF (general.architecture "clip", clip.projector_type "gemma3"),
// reads the sizes from clip.vision.* and checks every tensor, including that
// clip.vision.projection_dim and the projection's width equal `text_hidden`.
Result<std::unique_ptr<VisionWeights>> load_vision_mmproj(const std::string& path, int text_hidden);

// The vision tensors of a HF multimodal checkpoint (any of the name prefixes of docs/formats.md
// §1.8), checked against `config` (config.json's vision_config) and `text_hidden`. `source`
// names the folder in messages.
Result<std::unique_ptr<VisionWeights>> load_vision_hf(const SafetensorsSet& set, const VisionConfig& config,
                                                      int text_hidden, const std::string& source);

}  // namespace gemma3
