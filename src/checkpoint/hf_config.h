// Hugging Face config.json -> ModelConfig (docs/formats.md §1.5, docs/architecture.md §1.2).
//
// Accepted:
//   - Gemma3ForCausalLM, model_type "gemma3_text": every text key at the top level. The
//     dimension keys (hidden_size, intermediate_size, num_hidden_layers, num_attention_heads,
//     num_key_value_heads, head_dim, vocab_size, sliding_window) are required: transformers
//     always writes top-level keys, so a config without them was not written by it.
//   - Gemma3ForConditionalGeneration, model_type "gemma3": text keys under text_config and
//     SigLIP keys under vision_config. Both are sparse (transformers drops keys equal to the
//     class defaults), so missing keys take the Gemma3TextConfig / SiglipVisionConfig
//     defaults; only hidden_size, intermediate_size and num_hidden_layers are required (their
//     class defaults, 2304/9216/26, match no Gemma 3 model).
//
// Key-name drift handled (transformers <= 4.5x vs newer):
//   rope_theta / rope_local_base_freq / rope_scaling{rope_type|type, factor}
//     vs rope_parameters{full_attention: {rope_theta, rope_type, factor}, sliding_attention: {...}}
//     (rope_parameters wins where both are given, as in transformers' convert_rope_params_to_dict;
//     rope_scaling applies to global layers only);
//   sliding_window_pattern / _sliding_window_pattern vs layer_types (layer_types wins).
//
// Refused with kUnsupported: other model types/architectures, non-null logit softcapping
// (a Gemma 2 feature), RoPE types other than default/linear, scaled local RoPE,
// use_bidirectional_attention (EmbeddingGemma), attention_bias, activations other than
// gelu_pytorch_tanh.
#pragma once

#include <string>
#include <string_view>
#include <vector>

#include "gemma3/status.h"
#include "model/config.h"

namespace gemma3 {

// Parses a config.json text. `source_name` names it in messages ("gemma-3-4b-it/config.json").
// The result is validated (ModelConfig::validate).
Result<ModelConfig> parse_hf_config(std::string_view json_text, const std::string& source_name);
// Reads `folder`/config.json (or `folder` itself when it names a .json file).
Result<ModelConfig> load_hf_config(const std::string& folder);

// What quantization_config (or the older compression_config) says about the weights
// (docs/formats.md §5.3). Parsing only: the loader keys off the tensors actually present.
enum class HfQuantKind {
  kNone,      // no quantization_config
  kFp8,       // compressed-tensors float-quantized / naive-quantized, 8-bit float weights
  kInt4Pack,  // compressed-tensors pack-quantized, 4-bit int weights (I32 packed)
  kOther,     // anything else (another quant_method, int8, mixed schemes, ...); see describe()
};

struct HfQuantGroup {
  std::string name;                  // "group_0"
  std::string format;                // group's own format (mixed-precision), else the top-level one
  std::vector<std::string> targets;  // ["Linear"] or "re:<regex>" patterns
  int num_bits = 0;                  // weights.num_bits
  std::string type;                  // weights.type: "float" | "int"
  std::string strategy;              // weights.strategy: "tensor" | "channel" | "group" | "block"
  int group_size = 0;                // weights.group_size (0 when null)
  bool symmetric = true;
  bool dynamic_activations = false;  // input_activations.dynamic
};

struct HfQuantization {
  HfQuantKind kind = HfQuantKind::kNone;
  std::string quant_method;  // "compressed-tensors", "fp8", ...; empty when none
  std::string format;        // top-level "format"
  std::string status;        // "quantization_status" ("compressed" for the stored layout)
  std::vector<HfQuantGroup> groups;
  std::vector<std::string> ignore;  // module names or "re:" patterns left unquantized

  // "none", or e.g. "compressed-tensors float-quantized (group_0: 8-bit float, channel)".
  std::string describe() const;
};

Result<HfQuantization> parse_hf_quantization(std::string_view json_text, const std::string& source_name);
Result<HfQuantization> load_hf_quantization(const std::string& folder);

}  // namespace gemma3
