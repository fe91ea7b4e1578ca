#include "checkpoint/weights.h"

#include <fmt/format.h>
#include <sys/stat.h>

#include <algorithm>
#include <cctype>
#include <cmath>
#include <unordered_map>

#include "checkpoint/gguf.h"
#include "checkpoint/hf_config.h"
#include "checkpoint/safetensors.h"
#include "checkpoint/vision_weights.h"
#include "core/quant.h"
#include "text/tokenizer_gguf.h"

namespace gemma3 {
namespace {

// HF per-layer tensor suffix -> GGUF per-layer tensor suffix (docs/formats.md §2.7).
const std::vector<std::pair<std::string, std::string>>& layer_names() {
  static const std::vector<std::pair<std::string, std::string>> names = {
      {"input_layernorm.weight", "attn_norm.weight"},
      {"self_attn.q_proj.weight", "attn_q.weight"},
      {"self_attn.k_proj.weight", "attn_k.weight"},
      {"self_attn.v_proj.weight", "attn_v.weight"},
      {"self_attn.q_norm.weight", "attn_q_norm.weight"},
      {"self_attn.k_norm.weight", "attn_k_norm.weight"},
      {"self_attn.o_proj.weight", "attn_output.weight"},
      {"post_attention_layernorm.weight", "post_attention_norm.weight"},
      {"pre_feedforward_layernorm.weight", "ffn_norm.weight"},
      {"mlp.gate_proj.weight", "ffn_gate.weight"},
      {"mlp.up_proj.weight", "ffn_up.weight"},
      {"mlp.down_proj.weight", "ffn_down.weight"},
      {"post_feedforward_layernorm.weight", "post_ffw_norm.weight"},
  };
  return names;
}

std::string gguf_name_for(const std::string& hf) {
  if (hf == "embed_tokens.weight") return "token_embd.weight";
  if (hf == "norm.weight") return "output_norm.weight";
  // "layers.N.<suffix>"
  size_t dot = hf.find('.', 7);
  if (hf.rfind("layers.", 0) != 0 || dot == std::string::npos) return hf;
  std::string n = hf.substr(7, dot - 7), suffix = hf.substr(dot + 1);
  for (const auto& [h, g] : layer_names())
    if (h == suffix) return "blk." + n + "." + g;
  return hf;
}

// Strips the prefixes the various HF producers put before the text model's tensor names
// (docs/formats.md §1.8). Returns "" for tensors that are not part of the text decoder.
std::string canonical_hf_name(const std::string& name) {
  static const char* kPrefixes[] = {"model.language_model.", "language_model.model.", "model.",
                                    "language_model."};
  for (const char* p : kPrefixes) {
    std::string_view sv(p);
    if (name.rfind(sv, 0) == 0) {
      std::string rest = name.substr(sv.size());
      if (rest.rfind("layers.", 0) == 0 || rest == "embed_tokens.weight" || rest == "norm.weight")
        return rest;
    }
  }
  return "";
}

bool is_dir(const std::string& path) {
  struct stat st {};
  return stat(path.c_str(), &st) == 0 && S_ISDIR(st.st_mode);
}

// Reads an integer key if present; `fallback` otherwise; an error if present with a wrong type.
Result<int64_t> gguf_int_or(const GgufFile& f, const std::string& key, int64_t fallback) {
  if (!f.has(key)) return fallback;
  return f.get_int(key);
}
Result<double> gguf_float_or(const GgufFile& f, const std::string& key, double fallback) {
  if (!f.has(key)) return fallback;
  return f.get_float(key);
}

Result<int> to_int(const GgufFile& f, const std::string& key, int64_t v) {
  if (v < 0 || v > (1 << 30))
    return invalid_file(fmt::format("{}: {} = {} is out of range", f.path(), key, v));
  return static_cast<int>(v);
}

}  // namespace

Checkpoint::Checkpoint() = default;
Checkpoint::~Checkpoint() = default;

uint64_t Checkpoint::weight_bytes() const {
  uint64_t b = 0;
  for (const TensorView* t : text_tensors_) b += t->nbytes;
  return b;
}

Result<std::unique_ptr<Checkpoint>> Checkpoint::open(const std::string& path) {
  std::unique_ptr<Checkpoint> c(new Checkpoint());
  c->path_ = path;
  if (is_dir(path)) {
    c->format_ = "safetensors";
    GEMMA3_TRY(c->load_hf());
  } else {
    c->format_ = "gguf";
    GEMMA3_TRY(c->load_gguf());
  }
  return c;
}

Status Checkpoint::load_gguf() {
  GEMMA3_ASSIGN_OR_RETURN(GgufFile file, GgufFile::open(path_));
  gguf_ = std::make_unique<GgufFile>(std::move(file));
  const GgufFile& f = *gguf_;

  GEMMA3_ASSIGN_OR_RETURN(std::string arch, f.get_string("general.architecture"));
  if (arch != "gemma3")
    return unsupported(fmt::format("{}: general.architecture is \"{}\", expected \"gemma3\"", path_, arch));

  ModelConfig& c = config_;
  // Base or instruction-tuned: a chat template, or a fine-tune named like one ("it",
  // "instruct", "chat": llama.cpp's converter writes general.finetune from the model name).
  std::string finetune;
  if (f.has("general.finetune")) {
    GEMMA3_ASSIGN_OR_RETURN(finetune, f.get_string("general.finetune"));
  }
  std::transform(finetune.begin(), finetune.end(), finetune.begin(),
                 [](unsigned char ch) { return static_cast<char>(std::tolower(ch)); });
  const bool tuned_name = finetune == "it" || finetune.starts_with("it-") || finetune.ends_with("-it") ||
                          finetune.find("-it-") != std::string::npos ||
                          finetune.find("instruct") != std::string::npos ||
                          finetune.find("chat") != std::string::npos;
  c.base_model = !f.has("tokenizer.chat_template") && !tuned_name;
  auto get = [&](const char* key) -> Result<int> {
    GEMMA3_ASSIGN_OR_RETURN(int64_t v, f.get_int(key));
    return to_int(f, key, v);
  };
  GEMMA3_ASSIGN_OR_RETURN(c.n_layers, get("gemma3.block_count"));
  GEMMA3_ASSIGN_OR_RETURN(c.hidden, get("gemma3.embedding_length"));
  GEMMA3_ASSIGN_OR_RETURN(c.intermediate, get("gemma3.feed_forward_length"));
  GEMMA3_ASSIGN_OR_RETURN(int64_t n_heads, gguf_int_or(f, "gemma3.attention.head_count", 8));
  GEMMA3_ASSIGN_OR_RETURN(int64_t n_kv, gguf_int_or(f, "gemma3.attention.head_count_kv", 4));
  GEMMA3_ASSIGN_OR_RETURN(int64_t hd, gguf_int_or(f, "gemma3.attention.key_length", 256));
  GEMMA3_ASSIGN_OR_RETURN(c.n_heads, to_int(f, "gemma3.attention.head_count", n_heads));
  GEMMA3_ASSIGN_OR_RETURN(c.n_kv_heads, to_int(f, "gemma3.attention.head_count_kv", n_kv));
  GEMMA3_ASSIGN_OR_RETURN(c.head_dim, to_int(f, "gemma3.attention.key_length", hd));
  GEMMA3_ASSIGN_OR_RETURN(int64_t ctx, gguf_int_or(f, "gemma3.context_length", 131072));
  GEMMA3_ASSIGN_OR_RETURN(c.max_context, to_int(f, "gemma3.context_length", ctx));
  GEMMA3_ASSIGN_OR_RETURN(int64_t window, gguf_int_or(f, "gemma3.attention.sliding_window", 0));
  if (window <= 0)
    return unsupported(
        fmt::format("{}: gemma3.attention.sliding_window is missing; a Gemma 3 model needs it", path_));
  GEMMA3_ASSIGN_OR_RETURN(c.sliding_window, to_int(f, "gemma3.attention.sliding_window", window));
  GEMMA3_ASSIGN_OR_RETURN(double eps, gguf_float_or(f, "gemma3.attention.layer_norm_rms_epsilon", 1e-6));
  c.rms_norm_eps = static_cast<float>(eps);
  GEMMA3_ASSIGN_OR_RETURN(double theta, gguf_float_or(f, "gemma3.rope.freq_base", 1e6));
  c.rope_theta_global = static_cast<float>(theta);
  // The local base is not written by llama.cpp's converter (always 10000); Ollama spells it differently.
  double local_theta = 1e4;
  for (const char* key : {"gemma3.rope.freq_base_swa", "gemma3.rope.local.freq_base"}) {
    if (f.has(key)) {
      GEMMA3_ASSIGN_OR_RETURN(local_theta, f.get_float(key));
      break;
    }
  }
  c.rope_theta_local = static_cast<float>(local_theta);
  if (f.has("gemma3.rope.scaling.type")) {
    GEMMA3_ASSIGN_OR_RETURN(std::string type, f.get_string("gemma3.rope.scaling.type"));
    if (type == "linear") {
      GEMMA3_ASSIGN_OR_RETURN(double factor, f.get_float("gemma3.rope.scaling.factor"));
      c.rope_scale_global = static_cast<float>(factor);
    } else if (type != "none") {
      return unsupported(fmt::format("{}: rope scaling type \"{}\" (Gemma 3 uses \"linear\")", path_, type));
    }
  }
  for (const char* key : {"gemma3.final_logit_softcapping", "gemma3.attn_logit_softcapping"})
    if (f.has(key))
      return unsupported(
          fmt::format("{}: {} is set; logit soft-capping is Gemma 2, not Gemma 3", path_, key));
  if (c.n_kv_heads > 0 && c.n_heads % c.n_kv_heads != 0)  // before validate(), to name the GGUF keys
    return invalid_file(fmt::format(
        "{}: gemma3.attention.head_count ({}) is not a multiple of gemma3.attention.head_count_kv ({})",
        path_, c.n_heads, c.n_kv_heads));
  // Layer pattern: Ollama writes a BOOL array (true = sliding); otherwise an optional period.
  c.set_layer_pattern(6);
  if (f.has("gemma3.attention.sliding_window_pattern")) {
    auto arr = f.get_int_array("gemma3.attention.sliding_window_pattern");
    if (arr.ok()) {
      if (static_cast<int>(arr->size()) != c.n_layers)
        return invalid_file(
            fmt::format("{}: gemma3.attention.sliding_window_pattern has {} entries, expected {}", path_,
                        arr->size(), c.n_layers));
      for (int i = 0; i < c.n_layers; ++i)
        c.layer_types[i] = (*arr)[i] ? LayerType::kLocal : LayerType::kGlobal;
    } else {
      GEMMA3_ASSIGN_OR_RETURN(int64_t period, f.get_int("gemma3.attention.sliding_window_pattern"));
      if (period < 1 || period > c.n_layers + 1)
        return invalid_file(
            fmt::format("{}: gemma3.attention.sliding_window_pattern = {} is invalid", path_, period));
      c.set_layer_pattern(static_cast<int>(period));
    }
  }
  // The file carries no query_pre_attn_scalar; llama.cpp derives 27B's H/nH from the layer
  // count. Our tiny test models write it explicitly (our own key).
  c.query_pre_attn_scalar = static_cast<float>(c.head_dim);
  if (c.n_layers == 62) c.query_pre_attn_scalar = static_cast<float>(c.hidden) / c.n_heads;
  if (f.has("gemma3.attention.query_pre_attn_scalar")) {
    GEMMA3_ASSIGN_OR_RETURN(double q, f.get_float("gemma3.attention.query_pre_attn_scalar"));
    c.query_pre_attn_scalar = static_cast<float>(q);
  }
  c.size_label = ModelConfig::size_label_for(c.n_layers);

  const TensorView* embd = f.find_tensor("token_embd.weight");
  if (!embd) return not_found(fmt::format("{}: tensor token_embd.weight is missing", path_));
  if (embd->shape.size() != 2)
    return invalid_file(fmt::format("{}: token_embd.weight has shape {}, expected [n_vocab, {}]", path_,
                                    shape_to_string(embd->shape), c.hidden));
  if (embd->shape[1] != c.hidden)
    return invalid_file(
        fmt::format("{}: gemma3.embedding_length = {} but token_embd.weight has shape {} (width {})", path_,
                    c.hidden, shape_to_string(embd->shape), embd->shape[1]));
  c.vocab_size = static_cast<int>(embd->shape[0]);

  GEMMA3_ASSIGN_OR_RETURN(tokenizer_, tokenizer_from_gguf(f));
  if (tokenizer_.n_vocab() > c.vocab_size)
    return invalid_file(fmt::format("{}: the tokenizer has {} tokens but token_embd.weight only {} rows",
                                    path_, tokenizer_.n_vocab(), c.vocab_size));
  c.bos_id = tokenizer_.bos_id();
  c.eos_ids = {tokenizer_.eos_id()};
  if (tokenizer_.end_of_turn_id() >= 0) c.eos_ids.push_back(tokenizer_.end_of_turn_id());
  GEMMA3_TRY(c.validate(path_));

  return bind([&](const std::string& hf) { return f.find_tensor(gguf_name_for(hf)); },
              /*norms_hold_one=*/true);
}

Status Checkpoint::load_hf() {
  GEMMA3_ASSIGN_OR_RETURN(config_, load_hf_config(path_));
  GEMMA3_ASSIGN_OR_RETURN(SafetensorsSet set, SafetensorsSet::open(path_));
  safetensors_ = std::make_unique<SafetensorsSet>(std::move(set));
  std::unordered_map<std::string, const TensorView*> by_name;
  for (const TensorView& t : safetensors_->tensors()) {
    std::string canon = canonical_hf_name(t.name);
    if (canon.empty()) continue;
    if (!by_name.emplace(canon, &t).second)
      return invalid_file(fmt::format("{}: tensor {} appears twice under different prefixes", path_, canon));
  }
  const std::string tok_path = path_ + "/tokenizer.model";
  GEMMA3_ASSIGN_OR_RETURN(tokenizer_, Tokenizer::from_model_file(tok_path));
  ModelConfig& c = config_;
  auto it = by_name.find("embed_tokens.weight");
  if (it == by_name.end()) return not_found(fmt::format("{}: tensor embed_tokens.weight is missing", path_));
  if (it->second->shape.size() != 2 || it->second->shape[0] != c.vocab_size)
    return invalid_file(fmt::format("{}: embed_tokens.weight has shape {}, config.json says vocab_size {}",
                                    path_, shape_to_string(it->second->shape), c.vocab_size));
  if (tokenizer_.n_vocab() > c.vocab_size)
    return invalid_file(fmt::format("{}: tokenizer.model has {} pieces but the embedding only {} rows", path_,
                                    tokenizer_.n_vocab(), c.vocab_size));
  c.bos_id = tokenizer_.bos_id();
  // Stop on <eos> and <end_of_turn> whatever the config lists (a -pt config says only 1).
  for (int32_t id : {tokenizer_.eos_id(), tokenizer_.end_of_turn_id()})
    if (id >= 0 && std::find(c.eos_ids.begin(), c.eos_ids.end(), id) == c.eos_ids.end())
      c.eos_ids.push_back(id);
  GEMMA3_TRY(bind(
      [&](const std::string& hf) -> const TensorView* {
        auto i = by_name.find(hf);
        return i == by_name.end() ? nullptr : i->second;
      },
      /*norms_hold_one=*/false));
  if (c.has_vision) {
    GEMMA3_ASSIGN_OR_RETURN(vision_, load_vision_hf(*safetensors_, c.vision, c.hidden, path_));
  }
  return ok_status();
}

Status Checkpoint::attach_vision(const std::string& mmproj_path) {
  if (vision_)
    return invalid_argument(
        fmt::format("{}: {} already has a vision tower; not attaching {}", mmproj_path, path_, mmproj_path));
  GEMMA3_ASSIGN_OR_RETURN(vision_, load_vision_mmproj(mmproj_path, config_.hidden));
  config_.has_vision = true;
  config_.vision = vision_->config;
  return ok_status();
}

Status Checkpoint::take_norm(const TensorView* t, const std::string& name, int64_t dim, bool holds_one,
                             TensorView* out) {
  if (t->shape.size() != 1 || t->shape[0] != dim)
    return invalid_file(fmt::format("{}: tensor {} has shape {}, expected [{}]", path_, t->name,
                                    shape_to_string(t->shape), dim));
  if (t->dtype != DType::kF32 && t->dtype != DType::kF16 && t->dtype != DType::kBF16)
    return unsupported(fmt::format("{}: norm tensor {} has type {}, expected F32/F16/BF16", path_, t->name,
                                   dtype_name(t->dtype)));
  std::vector<float>& v = owned_.emplace_back(dim);
  dequantize_row(t->dtype, t->data, v.data(), dim);
  // Gemma RMSNorm multiplies by (1 + w). GGUF stores 1 + w already; HF stores w.
  if (!holds_one)
    for (float& x : v) x += 1.0f;
  *out = TensorView{name, DType::kF32, {dim}, v.data(), static_cast<uint64_t>(dim) * 4, {}};
  return ok_status();
}

Status Checkpoint::bind(const std::function<const TensorView*(const std::string&)>& find,
                        bool norms_hold_one) {
  const ModelConfig& c = config_;
  auto need = [&](const std::string& hf) -> Result<const TensorView*> {
    const TensorView* t = find(hf);
    if (!t)
      return not_found(
          fmt::format("{}: tensor {} is missing", path_, format_ == "gguf" ? gguf_name_for(hf) : hf));
    text_tensors_.push_back(t);
    return t;
  };
  auto matrix = [&](const std::string& hf, int64_t rows, int64_t cols, TensorView* out) -> Status {
    GEMMA3_ASSIGN_OR_RETURN(const TensorView* t, need(hf));
    if (t->shape.size() != 2 || t->shape[0] != rows || t->shape[1] != cols)
      return invalid_file(fmt::format("{}: tensor {} has shape {}, expected [{}, {}] from the config", path_,
                                      t->name, shape_to_string(t->shape), rows, cols));
    if (!row_bytes(t->dtype, cols))
      return invalid_file(fmt::format("{}: tensor {}: {} columns are not a whole number of {} blocks", path_,
                                      t->name, cols, dtype_name(t->dtype)));
    *out = *t;
    return ok_status();
  };
  auto norm = [&](const std::string& hf, int64_t dim, TensorView* out) -> Status {
    GEMMA3_ASSIGN_OR_RETURN(const TensorView* t, need(hf));
    return take_norm(t, hf, dim, norms_hold_one, out);
  };

  const int64_t H = c.hidden, I = c.intermediate, hd = c.head_dim;
  GEMMA3_TRY(matrix("embed_tokens.weight", c.vocab_size, H, &weights_.embed));
  GEMMA3_TRY(norm("norm.weight", H, &weights_.final_norm));
  weights_.layers.resize(c.n_layers);
  for (int i = 0; i < c.n_layers; ++i) {
    LayerWeights& l = weights_.layers[i];
    const std::string p = fmt::format("layers.{}.", i);
    GEMMA3_TRY(norm(p + "input_layernorm.weight", H, &l.attn_norm));
    GEMMA3_TRY(matrix(p + "self_attn.q_proj.weight", c.q_width(), H, &l.q));
    GEMMA3_TRY(matrix(p + "self_attn.k_proj.weight", c.kv_width(), H, &l.k));
    GEMMA3_TRY(matrix(p + "self_attn.v_proj.weight", c.kv_width(), H, &l.v));
    GEMMA3_TRY(norm(p + "self_attn.q_norm.weight", hd, &l.q_norm));
    GEMMA3_TRY(norm(p + "self_attn.k_norm.weight", hd, &l.k_norm));
    GEMMA3_TRY(matrix(p + "self_attn.o_proj.weight", H, c.q_width(), &l.o));
    GEMMA3_TRY(norm(p + "post_attention_layernorm.weight", H, &l.post_attn_norm));
    GEMMA3_TRY(norm(p + "pre_feedforward_layernorm.weight", H, &l.ffn_norm));
    GEMMA3_TRY(matrix(p + "mlp.gate_proj.weight", I, H, &l.gate));
    GEMMA3_TRY(matrix(p + "mlp.up_proj.weight", I, H, &l.up));
    GEMMA3_TRY(matrix(p + "mlp.down_proj.weight", H, I, &l.down));
    GEMMA3_TRY(norm(p + "post_feedforward_layernorm.weight", H, &l.post_ffn_norm));
  }
  return ok_status();
}

}  // namespace gemma3
