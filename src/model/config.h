// One config struct for every Gemma 3 size, filled from the checkpoint (GGUF metadata or
// HF config.json), with the per-layer window/rope pattern expanded into arrays, and
// validated once before anything is allocated.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "gemma3/status.h"

namespace gemma3 {

enum class LayerType : uint8_t { kLocal, kGlobal };  // sliding-window / full attention

struct VisionConfig {
  int hidden = 1152;  // SigLIP width
  int intermediate = 4304;
  int n_layers = 27;
  int n_heads = 16;
  int image_size = 896;
  int patch_size = 14;
  int tokens_per_image = 256;  // after the 4x4 average pool
  float layer_norm_eps = 1e-6f;
};

struct ModelConfig {
  std::string size_label;  // "270M", "1B", "4B", "12B", "27B", or "custom"
  // The checkpoint says it is pre-trained, not instruction-tuned (a GGUF without
  // tokenizer.chat_template whose general.finetune names no instruction tune): the chat
  // template is not what it learned. False when unknown (HF folders).
  bool base_model = false;

  int n_layers = 0;        // L
  int hidden = 0;          // H
  int intermediate = 0;    // I
  int n_heads = 0;         // nH
  int n_kv_heads = 0;      // nKV
  int head_dim = 0;        // hd
  int vocab_size = 0;      // embedding rows (262144 or 262208 for the real models)
  int sliding_window = 0;  // W: keys i-W < j <= i on local layers
  int max_context = 0;     // max_position_embeddings

  float rms_norm_eps = 1e-6f;
  float rope_theta_global = 1e6f;
  float rope_theta_local = 1e4f;
  float rope_scale_global = 1.0f;   // linear factor on global layers only (8 on 4B+)
  float query_pre_attn_scalar = 0;  // attention scale = query_pre_attn_scalar^-0.5

  std::vector<LayerType> layer_types;  // [L]

  // Special token ids (read from the tokenizer where it has them).
  std::vector<int> eos_ids = {1, 106};
  int bos_id = 2;

  bool has_vision = false;  // a vision tower is present (HF folder or mmproj)
  VisionConfig vision;
  int boi_id = 255999;
  int eoi_id = 256000;
  int image_token_id = 262144;

  float attn_scale() const;
  bool is_global(int layer) const { return layer_types[layer] == LayerType::kGlobal; }
  int q_width() const { return n_heads * head_dim; }
  int kv_width() const { return n_kv_heads * head_dim; }
  int n_global_layers() const;
  // Sets layer_types from the Gemma 3 rule: layer i is global iff (i+1) % period == 0.
  void set_layer_pattern(int period = 6);
  // "270M" etc from the layer count, "custom" otherwise.
  static std::string size_label_for(int n_layers);

  // Checks every field for sane, mutually consistent values (positive sizes, heads divide,
  // layer_types has L entries, ...). `source` names the file for messages.
  Status validate(const std::string& source) const;
};

}  // namespace gemma3
