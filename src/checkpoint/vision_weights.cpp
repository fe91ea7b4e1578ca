#include "checkpoint/vision_weights.h"

#include <fmt/format.h>

#include <cmath>
#include <functional>

#include "checkpoint/gguf.h"
#include "checkpoint/safetensors.h"
#include "core/quant.h"

namespace gemma3 {
namespace {

// Canonical (GGUF-style) vision names -> the tensor found in the file, or nullptr.
using Finder = std::function<const TensorView*(const std::string& gguf_name)>;

bool is_float_type(DType t) { return t == DType::kF32 || t == DType::kF16 || t == DType::kBF16; }

// Binds every tensor of the tower + projector, checking shapes and types (docs/formats.md §2.11).
// `norm_holds_one`: mm.soft_emb_norm already holds 1 + w (GGUF) rather than w (HF).
// `display` maps a canonical name to the file's own name for messages.
Status bind_vision(const Finder& find, const std::function<std::string(const std::string&)>& display,
                   bool norm_holds_one, VisionWeights* w) {
  const VisionConfig& c = w->config;
  const std::string& src = w->source;
  const int64_t Hv = c.hidden, Iv = c.intermediate, p = c.patch_size, H = w->text_hidden;
  const int64_t side = c.image_size / c.patch_size;

  auto need = [&](const std::string& name) -> Result<const TensorView*> {
    const TensorView* t = find(name);
    if (!t) return not_found(fmt::format("{}: vision tensor {} is missing", src, display(name)));
    return t;
  };
  auto check_shape = [&](const TensorView* t, const std::vector<int64_t>& want, const char* why) -> Status {
    if (t->shape != want)
      return invalid_file(fmt::format("{}: vision tensor {} has shape {}, expected {} ({})", src, t->name,
                                      shape_to_string(t->shape), shape_to_string(want), why));
    if (!row_bytes(t->dtype, t->shape.back()))
      return invalid_file(fmt::format("{}: vision tensor {}: {} columns are not a whole number of {} blocks",
                                      src, t->name, t->shape.back(), dtype_name(t->dtype)));
    return ok_status();
  };
  // 1-D tensors (LayerNorm weights/biases, biases) and the convolution: plain float types.
  auto vec = [&](const std::string& name, int64_t n, TensorView* out) -> Status {
    GEMMA3_ASSIGN_OR_RETURN(const TensorView* t, need(name));
    GEMMA3_TRY(check_shape(t, {n}, "from the vision config"));
    if (!is_float_type(t->dtype))
      return unsupported(fmt::format("{}: vision tensor {} has type {}, expected F32/F16/BF16", src, t->name,
                                     dtype_name(t->dtype)));
    *out = *t;
    return ok_status();
  };
  auto mat = [&](const std::string& name, int64_t rows, int64_t cols, TensorView* out) -> Status {
    GEMMA3_ASSIGN_OR_RETURN(const TensorView* t, need(name));
    GEMMA3_TRY(check_shape(t, {rows, cols}, "from the vision config"));
    *out = *t;
    return ok_status();
  };

  // Patch embedding: Conv2d [Hv, 3, p, p] (GGUF ne [p, p, 3, Hv]).
  {
    GEMMA3_ASSIGN_OR_RETURN(const TensorView* t, need("v.patch_embd.weight"));
    GEMMA3_TRY(check_shape(t, {Hv, 3, p, p}, "Conv2d [hidden, 3, patch, patch]"));
    if (!is_float_type(t->dtype))
      return unsupported(fmt::format("{}: vision tensor {} has type {}, expected F32/F16/BF16", src, t->name,
                                     dtype_name(t->dtype)));
    w->patch_embd = *t;
  }
  GEMMA3_TRY(vec("v.patch_embd.bias", Hv, &w->patch_bias));
  GEMMA3_TRY(mat("v.position_embd.weight", side * side, Hv, &w->position_embd));

  w->layers.resize(c.n_layers);
  for (int j = 0; j < c.n_layers; ++j) {
    VisionLayerWeights& l = w->layers[j];
    auto n = [&](const char* s) { return fmt::format("v.blk.{}.{}", j, s); };
    GEMMA3_TRY(vec(n("ln1.weight"), Hv, &l.ln1_w));
    GEMMA3_TRY(vec(n("ln1.bias"), Hv, &l.ln1_b));
    GEMMA3_TRY(mat(n("attn_q.weight"), Hv, Hv, &l.q_w));
    GEMMA3_TRY(vec(n("attn_q.bias"), Hv, &l.q_b));
    GEMMA3_TRY(mat(n("attn_k.weight"), Hv, Hv, &l.k_w));
    GEMMA3_TRY(vec(n("attn_k.bias"), Hv, &l.k_b));
    GEMMA3_TRY(mat(n("attn_v.weight"), Hv, Hv, &l.v_w));
    GEMMA3_TRY(vec(n("attn_v.bias"), Hv, &l.v_b));
    GEMMA3_TRY(mat(n("attn_out.weight"), Hv, Hv, &l.o_w));
    GEMMA3_TRY(vec(n("attn_out.bias"), Hv, &l.o_b));
    GEMMA3_TRY(vec(n("ln2.weight"), Hv, &l.ln2_w));
    GEMMA3_TRY(vec(n("ln2.bias"), Hv, &l.ln2_b));
    // FFN: fc1 [Iv, Hv] is "ffn_up", fc2 [Hv, Iv] "ffn_down". Legacy files swap the names;
    // detect by shape like clip.cpp (ffn_down rows Hv wide means it holds fc1).
    std::string up = n("ffn_up"), down = n("ffn_down");
    GEMMA3_ASSIGN_OR_RETURN(const TensorView* down_w, need(down + ".weight"));
    const bool swapped =
        Iv != Hv && down_w->shape.size() == 2 && down_w->shape[1] == Hv && down_w->shape[0] == Iv;
    if (swapped) std::swap(up, down);
    if (j > 0 && swapped != w->ffn_swapped)
      return invalid_file(fmt::format(
          "{}: vision layer {} stores its MLP {} than layer 0 (ffn_up/ffn_down swapped in some layers only)",
          src, j, swapped ? "swapped, unlike" : "unswapped, unlike"));
    w->ffn_swapped = swapped;
    GEMMA3_TRY(mat(up + ".weight", Iv, Hv, &l.fc1_w));
    GEMMA3_TRY(vec(up + ".bias", Iv, &l.fc1_b));
    GEMMA3_TRY(mat(down + ".weight", Hv, Iv, &l.fc2_w));
    GEMMA3_TRY(vec(down + ".bias", Hv, &l.fc2_b));
  }
  GEMMA3_TRY(vec("v.post_ln.weight", Hv, &w->post_ln_w));
  GEMMA3_TRY(vec("v.post_ln.bias", Hv, &w->post_ln_b));

  // Projector norm: Gemma RMSNorm, kept as fp32 1 + w.
  {
    TensorView t;
    GEMMA3_TRY(vec("mm.soft_emb_norm.weight", Hv, &t));
    std::vector<float>& v = w->owned.emplace_back(Hv);
    dequantize_row(t.dtype, t.data, v.data(), Hv);
    if (!norm_holds_one)
      for (float& x : v) x += 1.0f;
    w->soft_emb_norm = TensorView{t.name, DType::kF32, {Hv}, v.data(), static_cast<uint64_t>(Hv) * 4, {}};
  }

  // Projection: [Hv, H] as x @ W; [H, Hv] ([out, in]) is transposed into fp32.
  {
    GEMMA3_ASSIGN_OR_RETURN(const TensorView* t, need("mm.input_projection.weight"));
    const bool as_hf = t->shape == std::vector<int64_t>{Hv, H};
    const bool transposed = !as_hf && t->shape == std::vector<int64_t>{H, Hv};
    if (!as_hf && !transposed)
      return invalid_file(
          fmt::format("{}: vision tensor {} has shape {}, expected [{}, {}] (vision hidden x text hidden; "
                      "the text model has "
                      "hidden size {})",
                      src, t->name, shape_to_string(t->shape), Hv, H, H));
    if (!row_bytes(t->dtype, t->shape.back()))
      return invalid_file(fmt::format("{}: vision tensor {}: {} columns are not a whole number of {} blocks",
                                      src, t->name, t->shape.back(), dtype_name(t->dtype)));
    if (as_hf) {
      w->input_projection = *t;
    } else {
      // Stored [H, Hv]: out[i * H + o] = stored[o][i].
      std::vector<float>& out = w->owned.emplace_back(static_cast<size_t>(Hv * H));
      std::vector<float> row(static_cast<size_t>(Hv));
      for (int64_t o = 0; o < H; ++o) {
        dequantize_row(t->dtype, t->row_ptr(o), row.data(), Hv);
        if (!t->row_scale.empty()) {
          const float s = t->row_scale.size() == 1 ? t->row_scale[0] : t->row_scale[o];
          for (float& x : row) x *= s;
        }
        for (int64_t i = 0; i < Hv; ++i) out[i * H + o] = row[i];
      }
      w->input_projection =
          TensorView{t->name, DType::kF32, {Hv, H}, out.data(), static_cast<uint64_t>(Hv * H) * 4, {}};
      w->projection_transposed = true;
    }
  }
  return ok_status();
}

Status check_vision_config(const VisionConfig& v, int text_hidden, const std::string& src) {
  if (v.hidden <= 0 || v.intermediate <= 0 || v.n_layers <= 0 || v.n_heads <= 0 || v.patch_size <= 0 ||
      v.image_size <= 0 || v.tokens_per_image <= 0 || v.hidden > (1 << 16) || v.intermediate > (1 << 18) ||
      v.n_layers > 1024 || v.image_size > (1 << 14))
    return invalid_file(fmt::format(
        "{}: vision sizes out of range (hidden {}, intermediate {}, layers {}, heads {}, image {}, patch {})",
        src, v.hidden, v.intermediate, v.n_layers, v.n_heads, v.image_size, v.patch_size));
  if (v.hidden % v.n_heads)
    return invalid_file(fmt::format("{}: vision hidden size {} is not a multiple of the head count {}", src,
                                    v.hidden, v.n_heads));
  if (v.image_size % v.patch_size)
    return invalid_file(fmt::format("{}: vision image_size {} is not a multiple of patch_size {}", src,
                                    v.image_size, v.patch_size));
  if (text_hidden <= 0)
    return invalid_argument(fmt::format("{}: text hidden size {} is invalid", src, text_hidden));
  return ok_status();
}

}  // namespace

VisionWeights::VisionWeights() = default;
VisionWeights::~VisionWeights() = default;

std::vector<const TensorView*> VisionWeights::all() const {
  std::vector<const TensorView*> v = {&patch_embd, &patch_bias, &position_embd};
  for (const VisionLayerWeights& l : layers)
    for (const TensorView* t : {&l.ln1_w, &l.ln1_b, &l.q_w, &l.q_b, &l.k_w, &l.k_b, &l.v_w, &l.v_b, &l.o_w,
                                &l.o_b, &l.ln2_w, &l.ln2_b, &l.fc1_w, &l.fc1_b, &l.fc2_w, &l.fc2_b})
      v.push_back(t);
  for (const TensorView* t : {&post_ln_w, &post_ln_b, &soft_emb_norm, &input_projection}) v.push_back(t);
  return v;
}

Result<std::unique_ptr<VisionWeights>> load_vision_mmproj(const std::string& path, int text_hidden) {
  GEMMA3_ASSIGN_OR_RETURN(GgufFile file, GgufFile::open(path));
  auto w = std::make_unique<VisionWeights>();
  w->gguf = std::make_unique<GgufFile>(std::move(file));
  w->source = path;
  w->text_hidden = text_hidden;
  const GgufFile& f = *w->gguf;

  GEMMA3_ASSIGN_OR_RETURN(std::string arch, f.get_string("general.architecture"));
  if (arch != "clip")
    return invalid_argument(fmt::format(
        "{}: general.architecture is \"{}\", expected \"clip\" (a llama.cpp mmproj file){}", path, arch,
        arch == "gemma3" ? "; this looks like the text model, not its vision projector" : ""));
  if (!f.has("clip.projector_type"))
    return unsupported(fmt::format("{}: clip.projector_type is missing; expected \"gemma3\"", path));
  GEMMA3_ASSIGN_OR_RETURN(std::string proj, f.get_string("clip.projector_type"));
  if (proj != "gemma3")
    return unsupported(fmt::format("{}: clip.projector_type is \"{}\", expected \"gemma3\"", path, proj));
  if (f.has("clip.has_vision_encoder")) {
    GEMMA3_ASSIGN_OR_RETURN(bool has, f.get_bool("clip.has_vision_encoder"));
    if (!has) return invalid_file(fmt::format("{}: clip.has_vision_encoder is false", path));
  }

  VisionConfig& c = w->config;
  auto get = [&](const char* key, int* out, bool required, int64_t fallback) -> Status {
    int64_t v = fallback;
    if (f.has(key) || required) {
      GEMMA3_ASSIGN_OR_RETURN(v, f.get_int(key));
    }
    if (v <= 0 || v > (1 << 30))
      return invalid_file(fmt::format("{}: {} = {} is out of range", path, key, v));
    *out = static_cast<int>(v);
    return ok_status();
  };
  GEMMA3_TRY(get("clip.vision.embedding_length", &c.hidden, true, 0));
  GEMMA3_TRY(get("clip.vision.feed_forward_length", &c.intermediate, true, 0));
  GEMMA3_TRY(get("clip.vision.block_count", &c.n_layers, true, 0));
  GEMMA3_TRY(get("clip.vision.attention.head_count", &c.n_heads, true, 0));
  GEMMA3_TRY(get("clip.vision.image_size", &c.image_size, true, 0));
  GEMMA3_TRY(get("clip.vision.patch_size", &c.patch_size, true, 0));
  int projection_dim = text_hidden, scale = 4;
  GEMMA3_TRY(get("clip.vision.projection_dim", &projection_dim, false, text_hidden));
  GEMMA3_TRY(get("clip.vision.projector.scale_factor", &scale, false, 4));
  if (f.has("clip.vision.attention.layer_norm_epsilon")) {
    GEMMA3_ASSIGN_OR_RETURN(double eps, f.get_float("clip.vision.attention.layer_norm_epsilon"));
    if (!(eps > 0 && eps < 1))
      return invalid_file(
          fmt::format("{}: clip.vision.attention.layer_norm_epsilon = {} is not in (0, 1)", path, eps));
    c.layer_norm_eps = static_cast<float>(eps);
  }
  if (projection_dim != text_hidden)
    return invalid_file(
        fmt::format("{}: clip.vision.projection_dim = {} but the text model's hidden size is {} (mmproj of "
                    "another model size?)",
                    path, projection_dim, text_hidden));
  // clip.cpp's gemma3 projector average-pools the patch grid with kernel = stride = scale.
  if (c.patch_size > 0 && c.image_size % c.patch_size == 0 && (c.image_size / c.patch_size) % scale != 0)
    return invalid_file(fmt::format("{}: the {}-patch grid side is not a multiple of the pooling factor {}",
                                    path, c.image_size / c.patch_size, scale));
  const int tokens_side = c.patch_size > 0 ? c.image_size / c.patch_size / scale : 0;
  c.tokens_per_image = tokens_side * tokens_side;
  GEMMA3_TRY(check_vision_config(c, text_hidden, path));

  GEMMA3_TRY(bind_vision([&](const std::string& n) { return f.find_tensor(n); },
                         [](const std::string& n) { return n; }, /*norm_holds_one=*/true, w.get()));
  return w;
}

Result<std::unique_ptr<VisionWeights>> load_vision_hf(const SafetensorsSet& set, const VisionConfig& config,
                                                      int text_hidden, const std::string& source) {
  auto w = std::make_unique<VisionWeights>();
  w->source = source;
  w->config = config;
  w->text_hidden = text_hidden;
  GEMMA3_TRY(check_vision_config(config, text_hidden, source));

  // Canonical GGUF-style name -> HF name without prefix (docs/formats.md §1.7).
  auto hf_of = [](const std::string& g) -> std::string {
    static const std::vector<std::pair<std::string, std::string>> fixed = {
        {"v.patch_embd.weight", "vision_model.embeddings.patch_embedding.weight"},
        {"v.patch_embd.bias", "vision_model.embeddings.patch_embedding.bias"},
        {"v.position_embd.weight", "vision_model.embeddings.position_embedding.weight"},
        {"v.post_ln.weight", "vision_model.post_layernorm.weight"},
        {"v.post_ln.bias", "vision_model.post_layernorm.bias"},
        {"mm.soft_emb_norm.weight", "mm_soft_emb_norm.weight"},
        {"mm.input_projection.weight", "mm_input_projection_weight"},
    };
    for (const auto& [a, b] : fixed)
      if (a == g) return b;
    // v.blk.J.<part>.<weight|bias>
    static const std::vector<std::pair<std::string, std::string>> parts = {
        {"ln1", "layer_norm1"},         {"ln2", "layer_norm2"},         {"attn_q", "self_attn.q_proj"},
        {"attn_k", "self_attn.k_proj"}, {"attn_v", "self_attn.v_proj"}, {"attn_out", "self_attn.out_proj"},
        {"ffn_up", "mlp.fc1"},          {"ffn_down", "mlp.fc2"}};
    const size_t a = g.find('.', 6), b = g.rfind('.');
    if (g.rfind("v.blk.", 0) != 0 || a == std::string::npos || b <= a) return g;
    const std::string layer = g.substr(6, a - 6), part = g.substr(a + 1, b - a - 1), kind = g.substr(b + 1);
    for (const auto& [x, y] : parts)
      if (x == part) return "vision_model.encoder.layers." + layer + "." + y + "." + kind;
    return g;
  };
  // Prefixes of the Hub layout and of transformers >= 4.52 re-saves (docs/formats.md §1.8).
  auto find = [&](const std::string& g) -> const TensorView* {
    const std::string h = hf_of(g);
    const bool projector = g.rfind("mm.", 0) == 0;
    static const char* kTower[] = {"vision_tower.", "model.vision_tower."};
    static const char* kProj[] = {"multi_modal_projector.", "model.multi_modal_projector."};
    for (const char* p : projector ? kProj : kTower)
      if (const TensorView* t = set.find_tensor(std::string(p) + h)) return t;
    // transformers 5.x save_pretrained writes the tower without "vision_model."
    // ("vision_tower.embeddings...", "vision_tower.encoder.layers...").
    if (!projector && h.rfind("vision_model.", 0) == 0)
      for (const char* p : kTower)
        if (const TensorView* t = set.find_tensor(std::string(p) + h.substr(13))) return t;
    return nullptr;
  };
  auto display = [&](const std::string& g) {
    return std::string(g.rfind("mm.", 0) == 0 ? "multi_modal_projector." : "vision_tower.") + hf_of(g);
  };
  GEMMA3_TRY(bind_vision(find, display, /*norm_holds_one=*/false, w.get()));
  return w;
}

}  // namespace gemma3
