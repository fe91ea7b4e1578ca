#include "model/config.h"

#include <fmt/format.h>

#include <cmath>

namespace gemma3 {

float ModelConfig::attn_scale() const { return 1.0f / std::sqrt(query_pre_attn_scalar); }

int ModelConfig::n_global_layers() const {
  int n = 0;
  for (LayerType t : layer_types) n += t == LayerType::kGlobal;
  return n;
}

void ModelConfig::set_layer_pattern(int period) {
  layer_types.assign(n_layers, LayerType::kLocal);
  for (int i = 0; i < n_layers; ++i)
    if (period > 0 && (i + 1) % period == 0) layer_types[i] = LayerType::kGlobal;
}

std::string ModelConfig::size_label_for(int n_layers) {
  switch (n_layers) {
    case 18: return "270M";
    case 26: return "1B";
    case 34: return "4B";
    case 48: return "12B";
    case 62: return "27B";
    default: return "custom";
  }
}

Status ModelConfig::validate(const std::string& source) const {
  auto bad = [&](const std::string& what) { return invalid_file(fmt::format("{}: {}", source, what)); };
  auto check_range = [&](const char* name, int64_t v, int64_t lo, int64_t hi) -> Status {
    if (v < lo || v > hi) return bad(fmt::format("{} = {} is outside [{}, {}]", name, v, lo, hi));
    return ok_status();
  };
  GEMMA3_TRY(check_range("num_hidden_layers", n_layers, 1, 1024));
  GEMMA3_TRY(check_range("hidden_size", hidden, 1, 1 << 16));
  GEMMA3_TRY(check_range("intermediate_size", intermediate, 1, 1 << 18));
  GEMMA3_TRY(check_range("num_attention_heads", n_heads, 1, 1024));
  GEMMA3_TRY(check_range("num_key_value_heads", n_kv_heads, 1, 1024));
  GEMMA3_TRY(check_range("head_dim", head_dim, 2, 1024));
  GEMMA3_TRY(check_range("vocab_size", vocab_size, 1, 1 << 22));
  GEMMA3_TRY(check_range("sliding_window", sliding_window, 1, 1 << 24));
  GEMMA3_TRY(check_range("max_position_embeddings", max_context, 1, 1 << 24));
  if (n_heads % n_kv_heads != 0)
    return bad(fmt::format("num_attention_heads ({}) is not a multiple of num_key_value_heads ({})",
                           n_heads, n_kv_heads));
  if (head_dim % 2 != 0) return bad(fmt::format("head_dim ({}) must be even for RoPE", head_dim));
  if (static_cast<int>(layer_types.size()) != n_layers)
    return bad(fmt::format("layer_types has {} entries, expected num_hidden_layers = {}",
                           layer_types.size(), n_layers));
  if (!(query_pre_attn_scalar > 0) || !std::isfinite(query_pre_attn_scalar))
    return bad(fmt::format("query_pre_attn_scalar = {} must be positive", query_pre_attn_scalar));
  if (!(rms_norm_eps > 0) || rms_norm_eps > 1) return bad(fmt::format("rms_norm_eps = {} is not in (0, 1]", rms_norm_eps));
  if (!(rope_theta_global > 1) || !(rope_theta_local > 1))
    return bad(fmt::format("rope theta (global {}, local {}) must be > 1", rope_theta_global, rope_theta_local));
  if (!(rope_scale_global >= 1) || !std::isfinite(rope_scale_global))
    return bad(fmt::format("rope scaling factor = {} must be >= 1", rope_scale_global));
  if (bos_id < 0 || bos_id >= vocab_size) return bad(fmt::format("bos id {} outside the vocabulary", bos_id));
  if (has_vision) {
    const VisionConfig& v = vision;
    if (v.hidden <= 0 || v.n_heads <= 0 || v.hidden % v.n_heads || v.n_layers <= 0 || v.patch_size <= 0 ||
        v.image_size <= 0 || v.image_size % v.patch_size || v.tokens_per_image <= 0 || v.intermediate <= 0)
      return bad("vision config has inconsistent sizes");
  }
  return ok_status();
}

}  // namespace gemma3
