// One normalized in-memory weight set, whatever the source (GGUF or HF safetensors).
// Matrices are views into the mapped files ([out, in], HF order). Norm weights are owned
// fp32 copies that already hold (1 + w): the +1 is applied here, exactly once (GGUF files
// already store 1 + w; HF files store w).
#pragma once

#include <deque>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "core/tensor.h"
#include "gemma3/tokenizer.h"
#include "model/config.h"

namespace gemma3 {

class GgufFile;
class SafetensorsSet;
struct VisionWeights;

struct LayerWeights {
  TensorView attn_norm;       // [H]  (1+w), before attention
  TensorView q, k, v;         // [nH*hd, H], [nKV*hd, H], [nKV*hd, H]
  TensorView q_norm, k_norm;  // [hd] (1+w), shared by all heads
  TensorView o;               // [H, nH*hd]
  TensorView post_attn_norm;  // [H]
  TensorView ffn_norm;        // [H]  pre-feedforward
  TensorView gate, up;        // [I, H]
  TensorView down;            // [H, I]
  TensorView post_ffn_norm;   // [H]
};

struct Weights {
  TensorView embed;       // [V, H], also the LM head (tied)
  TensorView final_norm;  // [H]
  std::vector<LayerWeights> layers;
};

// A checkpoint opened and checked: config, weights, tokenizer. Keeps the mapped files alive.
class Checkpoint {
 public:
  ~Checkpoint();
  // `path`: a .gguf file (or the first shard of a split GGUF) or a Hugging Face folder.
  static Result<std::unique_ptr<Checkpoint>> open(const std::string& path);

  const std::string& path() const { return path_; }
  const std::string& format() const { return format_; }  // "gguf" or "safetensors"
  const ModelConfig& config() const { return config_; }
  const Weights& weights() const { return weights_; }
  const Tokenizer& tokenizer() const { return tokenizer_; }
  // Every tensor of the text model (for `info`): name, type, shape, bytes.
  const std::vector<const TensorView*>& text_tensors() const { return text_tensors_; }
  uint64_t weight_bytes() const;

  // The vision tower + projector: loaded by open() from a multimodal HF folder, or attached
  // from a llama.cpp mmproj GGUF (docs/formats.md §2.11), which must match this text model (the
  // projection's width is H). Sets config().has_vision / vision. nullptr when there is none.
  Status attach_vision(const std::string& mmproj_path);
  const VisionWeights* vision() const { return vision_.get(); }

 private:
  Checkpoint();
  Status load_gguf();
  Status load_hf();
  // Resolves the text-model tensors through `find` (name in canonical HF form without prefix,
  // e.g. "layers.3.mlp.up_proj.weight"), checks shapes against config_, and fills weights_.
  Status bind(const std::function<const TensorView*(const std::string& hf_name)>& find, bool norms_hold_one);
  Status take_norm(const TensorView* t, const std::string& name, int64_t dim, bool holds_one,
                   TensorView* out);

  std::string path_, format_;
  ModelConfig config_;
  Weights weights_;
  Tokenizer tokenizer_;
  std::vector<const TensorView*> text_tensors_;
  std::unique_ptr<GgufFile> gguf_;
  std::unique_ptr<SafetensorsSet> safetensors_;
  std::deque<std::vector<float>> owned_;  // storage of norm weights (1 + w), fp32
  std::unique_ptr<VisionWeights> vision_;
};

}  // namespace gemma3
