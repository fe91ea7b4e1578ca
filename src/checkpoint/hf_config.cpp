#include "checkpoint/hf_config.h"

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <limits>
#include <nlohmann/json.hpp>
#include <optional>

#include "io/mapped_file.h"

namespace gemma3 {
namespace {

using json = nlohmann::json;

// Typed access to one JSON object; messages name the key with its path ("text_config.head_dim").
struct Obj {
  const json& j;
  std::string prefix;  // "", "text_config.", ...
  const std::string& source;

  const json* find(const char* key) const {
    auto it = j.find(key);
    return it == j.end() ? nullptr : &*it;
  }
  // Present and not null.
  const json* find_value(const char* key) const {
    const json* v = find(key);
    return v && !v->is_null() ? v : nullptr;
  }
  std::string name(const char* key) const { return prefix + key; }
  Status missing(const char* key, const char* why) const {
    return invalid_file(fmt::format("{}: missing required key '{}'{}", source, name(key), why));
  }
  Status wrong_type(const char* key, const json& v, const char* expected) const {
    std::string shown = v.dump();
    if (shown.size() > 60) shown = shown.substr(0, 57) + "...";
    return invalid_file(fmt::format("{}: key '{}' is {} ({}), expected {}", source, name(key), v.type_name(),
                                    shown, expected));
  }

  // Absent: error if `required` (with `why`), else *out unchanged. Present: must be an
  // integer that fits an int (null is a type error: HF would store None and fail later).
  Status get_int(const char* key, int* out, bool required = false, const char* why = "") const {
    const json* v = find(key);
    if (!v) return required ? missing(key, why) : ok_status();
    if (!v->is_number_integer()) return wrong_type(key, *v, "an integer");
    if (v->is_number_unsigned() ? v->get<uint64_t>() > static_cast<uint64_t>(std::numeric_limits<int>::max())
                                : (v->get<int64_t>() < std::numeric_limits<int>::min() ||
                                   v->get<int64_t>() > std::numeric_limits<int>::max()))
      return invalid_file(
          fmt::format("{}: key '{}' = {} does not fit in 32 bits", source, name(key), v->dump()));
    *out = static_cast<int>(v->get<int64_t>());
    return ok_status();
  }
  Status get_float(const char* key, float* out) const {
    const json* v = find(key);
    if (!v) return ok_status();
    if (!v->is_number()) return wrong_type(key, *v, "a number");
    *out = v->get<float>();
    return ok_status();
  }
  // Absent or null: *out unchanged.
  Status get_string(const char* key, std::string* out) const {
    const json* v = find_value(key);
    if (!v) return ok_status();
    if (!v->is_string()) return wrong_type(key, *v, "a string");
    *out = v->get<std::string>();
    return ok_status();
  }
  Status get_bool(const char* key, bool* out) const {
    const json* v = find_value(key);
    if (!v) return ok_status();
    if (!v->is_boolean()) return wrong_type(key, *v, "true or false");
    *out = v->get<bool>();
    return ok_status();
  }
  // A nested object (absent or null: nullopt). `out_obj` is set when present.
  Status get_object(const char* key, const json** out_obj) const {
    *out_obj = nullptr;
    const json* v = find_value(key);
    if (!v) return ok_status();
    if (!v->is_object()) return wrong_type(key, *v, "an object");
    *out_obj = v;
    return ok_status();
  }
  Obj child(const json& sub, const char* key) const { return Obj{sub, prefix + key + ".", source}; }
};

Result<json> parse_json(std::string_view text, const std::string& source) {
  json root;
  try {
    root = json::parse(text.begin(), text.end());
  } catch (const json::exception& e) {
    return invalid_file(fmt::format("{}: not valid JSON: {}", source, e.what()));
  }
  if (!root.is_object())
    return invalid_file(fmt::format("{}: is a JSON {}, expected an object", source, root.type_name()));
  return root;
}

Result<std::string> read_config_text(const std::string& folder, std::string* source) {
  namespace fs = std::filesystem;
  std::error_code ec;
  std::string path = folder;
  if (fs::is_directory(folder, ec)) path = (fs::path(folder) / "config.json").string();
  *source = path;
  GEMMA3_ASSIGN_OR_RETURN(MappedFile f, MappedFile::open(path));
  return std::string(reinterpret_cast<const char*>(f.data()), f.size());
}

// Gemma 2 features and variants that share the gemma3 config class but not our forward.
Status check_unsupported_features(const Obj& o) {
  for (const char* key : {"final_logit_softcapping", "attn_logit_softcapping"}) {
    if (const json* v = o.find_value(key))
      return unsupported(fmt::format("{}: {} = {}: logit soft-capping is a Gemma 2 feature, Gemma 3 has none",
                                     o.source, o.name(key), v->dump()));
  }
  bool flag = false;
  GEMMA3_TRY(o.get_bool("use_bidirectional_attention", &flag));
  if (flag)
    return unsupported(fmt::format("{}: {} = true (EmbeddingGemma): only causal Gemma 3 models are supported",
                                   o.source, o.name("use_bidirectional_attention")));
  flag = false;
  GEMMA3_TRY(o.get_bool("attention_bias", &flag));
  if (flag)
    return unsupported(
        fmt::format("{}: {} = true: Gemma 3 attention has no biases", o.source, o.name("attention_bias")));
  std::string act = "gelu_pytorch_tanh";
  GEMMA3_TRY(o.get_string("hidden_activation", &act));
  if (act != "gelu_pytorch_tanh")
    return unsupported(fmt::format("{}: {} = '{}', only gelu_pytorch_tanh is supported", o.source,
                                   o.name("hidden_activation"), act));
  return ok_status();
}

// One RoPE description ({rope_type | type, factor}) -> linear factor (1 for "default").
Status read_rope_kind(const Obj& o, float* factor) {
  std::string type;
  GEMMA3_TRY(o.get_string("rope_type", &type));
  if (type.empty()) GEMMA3_TRY(o.get_string("type", &type));
  if (type.empty() || type == "default") {
    *factor = 1.0f;
    return ok_status();
  }
  if (type != "linear")
    return unsupported(fmt::format("{}: {}rope_type = '{}': only default and linear RoPE are supported",
                                   o.source, o.prefix, type));
  if (!o.find_value("factor")) return o.missing("factor", " (linear RoPE scaling needs a factor)");
  GEMMA3_TRY(o.get_float("factor", factor));
  return ok_status();
}

Status read_rope(const Obj& t, ModelConfig* c) {
  // Old keys first; rope_parameters (newer transformers) wins for the thetas, and rope_scaling
  // is applied on top of rope_parameters.full_attention, as convert_rope_params_to_dict does.
  GEMMA3_TRY(t.get_float("rope_theta", &c->rope_theta_global));
  GEMMA3_TRY(t.get_float("rope_local_base_freq", &c->rope_theta_local));
  c->rope_scale_global = 1.0f;

  const json* params = nullptr;
  GEMMA3_TRY(t.get_object("rope_parameters", &params));
  if (params) {
    const Obj p = t.child(*params, "rope_parameters");
    const json* full = nullptr;
    const json* sliding = nullptr;
    GEMMA3_TRY(p.get_object("full_attention", &full));
    GEMMA3_TRY(p.get_object("sliding_attention", &sliding));
    if (!full && !sliding)
      return invalid_file(
          fmt::format("{}: {} has neither 'full_attention' nor 'sliding_attention' (Gemma 3 keeps one RoPE "
                      "per layer type)",
                      t.source, p.prefix.substr(0, p.prefix.size() - 1)));
    if (full) {
      const Obj f = p.child(*full, "full_attention");
      GEMMA3_TRY(f.get_float("rope_theta", &c->rope_theta_global));
      GEMMA3_TRY(read_rope_kind(f, &c->rope_scale_global));
    }
    if (sliding) {
      const Obj s = p.child(*sliding, "sliding_attention");
      GEMMA3_TRY(s.get_float("rope_theta", &c->rope_theta_local));
      float local_factor = 1.0f;
      GEMMA3_TRY(read_rope_kind(s, &local_factor));
      if (local_factor != 1.0f)
        return unsupported(
            fmt::format("{}: {}factor = {}: RoPE scaling on sliding-window layers is not supported", t.source,
                        s.prefix, local_factor));
    }
  }
  const json* scaling = nullptr;
  GEMMA3_TRY(t.get_object("rope_scaling", &scaling));
  if (scaling) GEMMA3_TRY(read_rope_kind(t.child(*scaling, "rope_scaling"), &c->rope_scale_global));
  return ok_status();
}

Status read_layer_types(const Obj& t, ModelConfig* c) {
  const json* lt = t.find_value("layer_types");
  if (lt) {
    if (!lt->is_array())
      return t.wrong_type("layer_types", *lt, "a list of \"sliding_attention\"/\"full_attention\"");
    if (static_cast<int>(lt->size()) != c->n_layers)
      return invalid_file(fmt::format("{}: {} has {} entries, but num_hidden_layers is {}", t.source,
                                      t.name("layer_types"), lt->size(), c->n_layers));
    c->layer_types.clear();
    for (size_t i = 0; i < lt->size(); ++i) {
      const json& v = (*lt)[i];
      if (v == "sliding_attention") {
        c->layer_types.push_back(LayerType::kLocal);
      } else if (v == "full_attention") {
        c->layer_types.push_back(LayerType::kGlobal);
      } else {
        return invalid_file(
            fmt::format("{}: {}[{}] = {}, expected \"sliding_attention\" or \"full_attention\"", t.source,
                        t.name("layer_types"), i, v.dump()));
      }
    }
    return ok_status();
  }
  int period = 6;  // Gemma3TextConfig default: 5 local layers, then 1 global
  const char* key =
      t.find_value("sliding_window_pattern") ? "sliding_window_pattern" : "_sliding_window_pattern";
  if (t.find_value(key)) GEMMA3_TRY(t.get_int(key, &period));
  if (period < 1) return invalid_file(fmt::format("{}: {} = {} must be >= 1", t.source, t.name(key), period));
  c->set_layer_pattern(period);
  return ok_status();
}

// eos_token_id: an int or a non-empty list of ints.
Status read_eos(const Obj& o, std::vector<int>* eos) {
  const json* v = o.find_value("eos_token_id");
  if (!v) return ok_status();
  std::vector<json> items;
  if (v->is_array() && !v->empty()) {
    items.assign(v->begin(), v->end());
  } else {
    items.push_back(*v);
  }
  std::vector<int> ids;
  for (const json& e : items) {
    if (!e.is_number_integer()) return o.wrong_type("eos_token_id", *v, "an integer or a list of integers");
    const int64_t id = e.is_number_unsigned()
                           ? static_cast<int64_t>(std::min<uint64_t>(e.get<uint64_t>(), 1ull << 40))
                           : e.get<int64_t>();
    if (id < 0 || id > std::numeric_limits<int>::max())
      return invalid_file(
          fmt::format("{}: {} has id {}, outside [0, 2^31)", o.source, o.name("eos_token_id"), id));
    ids.push_back(static_cast<int>(id));
  }
  *eos = std::move(ids);
  return ok_status();
}

// SiglipVisionConfig defaults are SigLIP-base (768 wide, 12 layers, 224 px, patch 16); the
// Gemma 3 configs spell out their So400m values, so a sparse vision_config gets HF's defaults,
// and the loader's shape checks catch a mismatch with the tensors.
Status read_vision(const Obj& v, int mm_tokens, VisionConfig* out) {
  VisionConfig vc;
  vc.hidden = 768;
  vc.intermediate = 3072;
  vc.n_layers = 12;
  vc.n_heads = 12;
  vc.image_size = 224;
  vc.patch_size = 16;
  vc.layer_norm_eps = 1e-6f;
  vc.tokens_per_image = mm_tokens;
  GEMMA3_TRY(v.get_int("hidden_size", &vc.hidden));
  GEMMA3_TRY(v.get_int("intermediate_size", &vc.intermediate));
  GEMMA3_TRY(v.get_int("num_hidden_layers", &vc.n_layers));
  GEMMA3_TRY(v.get_int("num_attention_heads", &vc.n_heads));
  GEMMA3_TRY(v.get_int("image_size", &vc.image_size));
  GEMMA3_TRY(v.get_int("patch_size", &vc.patch_size));
  GEMMA3_TRY(v.get_float("layer_norm_eps", &vc.layer_norm_eps));
  int channels = 3;
  GEMMA3_TRY(v.get_int("num_channels", &channels));
  if (channels != 3)
    return unsupported(fmt::format("{}: {} = {}, only RGB (3) images are supported", v.source,
                                   v.name("num_channels"), channels));
  std::string act = "gelu_pytorch_tanh";
  GEMMA3_TRY(v.get_string("hidden_act", &act));
  if (act != "gelu_pytorch_tanh")
    return unsupported(fmt::format("{}: {} = '{}', only gelu_pytorch_tanh is supported", v.source,
                                   v.name("hidden_act"), act));
  // Gemma3MultiModalProjector average-pools the (image/patch)^2 patch grid down to
  // sqrt(mm_tokens_per_image)^2 tokens with kernel = patches_per_side / tokens_per_side.
  if (vc.patch_size > 0 && vc.image_size > 0 && mm_tokens > 0) {
    const int patches_per_side = vc.image_size / vc.patch_size;
    const int tokens_per_side = static_cast<int>(std::lround(std::sqrt(static_cast<double>(mm_tokens))));
    if (tokens_per_side * tokens_per_side != mm_tokens || patches_per_side % tokens_per_side != 0)
      return invalid_file(fmt::format(
          "{}: mm_tokens_per_image = {} is not a square that divides the {}x{} patch grid (image_size {} / "
          "patch_size {})",
          v.source, mm_tokens, patches_per_side, patches_per_side, vc.image_size, vc.patch_size));
  }
  *out = vc;
  return ok_status();
}

// Accepted architectures; anything else listed is refused by name.
bool known_architecture(const std::string& a) {
  return a == "Gemma3ForCausalLM" || a == "Gemma3ForConditionalGeneration";
}

}  // namespace

Result<ModelConfig> parse_hf_config(std::string_view json_text, const std::string& source) {
  GEMMA3_ASSIGN_OR_RETURN(json root, parse_json(json_text, source));
  const Obj top{root, "", source};

  std::string model_type;
  GEMMA3_TRY(top.get_string("model_type", &model_type));
  std::vector<std::string> archs;
  if (const json* a = top.find_value("architectures")) {
    if (!a->is_array()) return top.wrong_type("architectures", *a, "a list of class names");
    for (const json& e : *a) {
      if (!e.is_string()) return top.wrong_type("architectures", *a, "a list of class names");
      archs.push_back(e.get<std::string>());
    }
  }
  for (const std::string& a : archs)
    if (!known_architecture(a))
      return unsupported(
          fmt::format("{}: architecture '{}' is not supported (expected Gemma3ForCausalLM or "
                      "Gemma3ForConditionalGeneration)",
                      source, a));
  bool multimodal;
  if (model_type == "gemma3") {
    multimodal = true;
  } else if (model_type == "gemma3_text") {
    multimodal = false;
  } else if (!model_type.empty()) {
    return unsupported(fmt::format("{}: model_type '{}' is not supported (expected gemma3 or gemma3_text)",
                                   source, model_type));
  } else if (!archs.empty()) {
    multimodal = archs.front() == "Gemma3ForConditionalGeneration";
  } else {
    return invalid_file(fmt::format("{}: neither model_type nor architectures is given", source));
  }

  const json empty = json::object();
  const json* text_json = &root;
  if (multimodal) {
    GEMMA3_TRY(top.get_object("text_config", &text_json));
    if (!text_json) text_json = &empty;
  }
  const Obj t = multimodal ? top.child(*text_json, "text_config") : top;
  if (multimodal) {
    std::string sub_type;
    GEMMA3_TRY(t.get_string("model_type", &sub_type));
    if (!sub_type.empty() && sub_type != "gemma3_text")
      return unsupported(fmt::format("{}: text_config.model_type '{}' is not gemma3_text", source, sub_type));
    GEMMA3_TRY(check_unsupported_features(top));
  }
  GEMMA3_TRY(check_unsupported_features(t));

  ModelConfig c;
  // Gemma3TextConfig defaults (transformers configuration_gemma3.py), used for keys a sparse
  // text_config leaves out. A flat gemma3_text config must list the dimensions.
  c.vocab_size = 262208;
  c.n_heads = 8;
  c.n_kv_heads = 4;
  c.head_dim = 256;
  c.query_pre_attn_scalar = 256;
  c.rms_norm_eps = 1e-6f;
  c.rope_theta_global = 1e6f;
  c.rope_theta_local = 1e4f;
  c.sliding_window = 4096;
  c.max_context = 131072;
  const bool flat = !multimodal;
  const char* why = flat ? " (a gemma3_text config lists every text key)"
                         : " (its Gemma3TextConfig default matches no Gemma 3 model)";
  GEMMA3_TRY(t.get_int("hidden_size", &c.hidden, true, why));
  GEMMA3_TRY(t.get_int("intermediate_size", &c.intermediate, true, why));
  GEMMA3_TRY(t.get_int("num_hidden_layers", &c.n_layers, true, why));
  GEMMA3_TRY(t.get_int("num_attention_heads", &c.n_heads, flat, why));
  GEMMA3_TRY(t.get_int("num_key_value_heads", &c.n_kv_heads, flat, why));
  GEMMA3_TRY(t.get_int("head_dim", &c.head_dim, flat, why));
  GEMMA3_TRY(t.get_int("vocab_size", &c.vocab_size, flat, why));
  GEMMA3_TRY(t.get_int("sliding_window", &c.sliding_window, flat, why));
  GEMMA3_TRY(t.get_int("max_position_embeddings", &c.max_context));
  GEMMA3_TRY(t.get_float("query_pre_attn_scalar", &c.query_pre_attn_scalar));
  GEMMA3_TRY(t.get_float("rms_norm_eps", &c.rms_norm_eps));
  GEMMA3_TRY(read_rope(t, &c));
  if (c.n_layers < 1 || c.n_layers > 1024)  // before sizing layer_types from it
    return invalid_file(
        fmt::format("{}: {} = {} is outside [1, 1024]", source, t.name("num_hidden_layers"), c.n_layers));
  GEMMA3_TRY(read_layer_types(t, &c));

  // Special ids: the top level of a multimodal config wins over its text_config.
  GEMMA3_TRY(read_eos(t, &c.eos_ids));
  GEMMA3_TRY(t.get_int("bos_token_id", &c.bos_id));
  if (multimodal) {
    GEMMA3_TRY(read_eos(top, &c.eos_ids));
    GEMMA3_TRY(top.get_int("bos_token_id", &c.bos_id));
    // Saved configs use *_index; the *_id spellings are transformers attribute aliases.
    GEMMA3_TRY(top.get_int(top.find("boi_token_index") ? "boi_token_index" : "boi_token_id", &c.boi_id));
    GEMMA3_TRY(top.get_int(top.find("eoi_token_index") ? "eoi_token_index" : "eoi_token_id", &c.eoi_id));
    GEMMA3_TRY(top.get_int(top.find("image_token_index") ? "image_token_index" : "image_token_id",
                           &c.image_token_id));
    int mm_tokens = 256;
    GEMMA3_TRY(top.get_int("mm_tokens_per_image", &mm_tokens));
    if (mm_tokens < 1)
      return invalid_file(fmt::format("{}: mm_tokens_per_image = {} must be positive", source, mm_tokens));
    const json* vision_json = nullptr;
    GEMMA3_TRY(top.get_object("vision_config", &vision_json));
    GEMMA3_TRY(
        read_vision(top.child(vision_json ? *vision_json : empty, "vision_config"), mm_tokens, &c.vision));
    c.has_vision = true;
  }

  c.size_label = ModelConfig::size_label_for(c.n_layers);
  GEMMA3_TRY(c.validate(source));
  return c;
}

Result<ModelConfig> load_hf_config(const std::string& folder) {
  std::string source;
  GEMMA3_ASSIGN_OR_RETURN(std::string text, read_config_text(folder, &source));
  return parse_hf_config(text, source);
}

std::string HfQuantization::describe() const {
  if (kind == HfQuantKind::kNone) return "none";
  std::string s = quant_method;
  if (!format.empty()) s += " " + format;
  std::vector<std::string> parts;
  for (const HfQuantGroup& g : groups) {
    std::string p = fmt::format("{}: {}-bit {}, {}", g.name, g.num_bits, g.type, g.strategy);
    if (g.group_size > 0) p += fmt::format(" {}", g.group_size);
    if (!g.format.empty() && g.format != format) p += ", " + g.format;
    parts.push_back(std::move(p));
  }
  if (!parts.empty()) s += fmt::format(" ({})", fmt::join(parts, "; "));
  if (!status.empty() && status != "compressed") s += ", status " + status;
  return s;
}

Result<HfQuantization> parse_hf_quantization(std::string_view json_text, const std::string& source) {
  GEMMA3_ASSIGN_OR_RETURN(json root, parse_json(json_text, source));
  const Obj top{root, "", source};
  HfQuantization q;
  const json* qc = nullptr;
  const char* key = top.find_value("quantization_config") ? "quantization_config" : "compression_config";
  GEMMA3_TRY(top.get_object(key, &qc));
  if (!qc) return q;
  const Obj o = top.child(*qc, key);

  // compression_config is the older compressed-tensors spelling and may lack quant_method.
  if (std::string(key) == "compression_config") q.quant_method = "compressed-tensors";
  GEMMA3_TRY(o.get_string("quant_method", &q.quant_method));
  if (q.quant_method.empty()) return o.missing("quant_method", "");
  GEMMA3_TRY(o.get_string("format", &q.format));
  GEMMA3_TRY(o.get_string("quantization_status", &q.status));
  if (const json* ig = o.find_value("ignore")) {
    if (!ig->is_array()) return o.wrong_type("ignore", *ig, "a list of module names");
    for (const json& e : *ig) {
      if (!e.is_string()) return o.wrong_type("ignore", *ig, "a list of module names");
      q.ignore.push_back(e.get<std::string>());
    }
  }
  const json* groups = nullptr;
  GEMMA3_TRY(o.get_object("config_groups", &groups));
  if (groups) {
    const Obj gs = o.child(*groups, "config_groups");
    for (const auto& [name, gj] : groups->items()) {
      if (!gj.is_object()) return gs.wrong_type(name.c_str(), gj, "an object");
      const Obj g = gs.child(gj, name.c_str());
      HfQuantGroup group;
      group.name = name;
      GEMMA3_TRY(g.get_string("format", &group.format));
      if (group.format.empty()) group.format = q.format;
      if (const json* tg = g.find_value("targets")) {
        if (!tg->is_array()) return g.wrong_type("targets", *tg, "a list of strings");
        for (const json& e : *tg) {
          if (!e.is_string()) return g.wrong_type("targets", *tg, "a list of strings");
          group.targets.push_back(e.get<std::string>());
        }
      }
      const json* w = nullptr;
      GEMMA3_TRY(g.get_object("weights", &w));
      if (w) {
        const Obj wo = g.child(*w, "weights");
        GEMMA3_TRY(wo.get_int("num_bits", &group.num_bits));
        GEMMA3_TRY(wo.get_string("type", &group.type));
        GEMMA3_TRY(wo.get_string("strategy", &group.strategy));
        if (wo.find_value("group_size")) GEMMA3_TRY(wo.get_int("group_size", &group.group_size));
        GEMMA3_TRY(wo.get_bool("symmetric", &group.symmetric));
      }
      const json* in = nullptr;
      GEMMA3_TRY(g.get_object("input_activations", &in));
      if (in) GEMMA3_TRY(g.child(*in, "input_activations").get_bool("dynamic", &group.dynamic_activations));
      q.groups.push_back(std::move(group));
    }
  }

  auto is_fp8 = [](const HfQuantGroup& g) {
    return (g.format == "float-quantized" || g.format == "naive-quantized") && g.type == "float" &&
           g.num_bits == 8;
  };
  auto is_int4_pack = [](const HfQuantGroup& g) {
    return g.format == "pack-quantized" && g.type == "int" && g.num_bits == 4;
  };
  q.kind = HfQuantKind::kOther;
  const bool compressed = q.status.empty() || q.status == "compressed";
  if (q.quant_method == "compressed-tensors" && compressed && !q.groups.empty()) {
    if (std::all_of(q.groups.begin(), q.groups.end(), is_fp8)) q.kind = HfQuantKind::kFp8;
    if (std::all_of(q.groups.begin(), q.groups.end(), is_int4_pack)) q.kind = HfQuantKind::kInt4Pack;
  }
  return q;
}

Result<HfQuantization> load_hf_quantization(const std::string& folder) {
  std::string source;
  GEMMA3_ASSIGN_OR_RETURN(std::string text, read_config_text(folder, &source));
  return parse_hf_quantization(text, source);
}

}  // namespace gemma3
