// make-model: random Gemma 3 checkpoints (see make_model.h for the layout and the scales).
#include "dev/make_model.h"

#include <fmt/format.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <memory>
#include <nlohmann/json.hpp>

#include "core/quant.h"
#include "core/thread_pool.h"
#include "dev/gguf_writer.h"
#include "gemma3/tokenizer.h"
#include "text/spm_proto.h"

namespace gemma3 {
namespace {

namespace fs = std::filesystem;
using ojson = nlohmann::ordered_json;

// ---- sizes ----------------------------------------------------------------------------------

struct SizeDefaults {
  int layers, hidden, intermediate, heads, kv_heads, head_dim, window, context;
  float rope_scale;     // linear factor on global layers (1 = none)
  bool vision_capable;  // 4B/12B/27B carry a SigLIP tower; tiny gets a tiny one for tests
  VisionConfig vision;
};

VisionConfig siglip_so400m() { return VisionConfig{}; }  // 1152 wide, 27 layers, 896 px, patch 14

// A vision tower small enough for tests: 8x8 patches of 14 px, pooled 4x4 to 2x2 = 4 tokens.
VisionConfig tiny_vision() {
  VisionConfig v;
  v.hidden = 64;
  v.intermediate = 96;
  v.n_layers = 2;
  v.n_heads = 2;
  v.image_size = 112;
  v.patch_size = 14;
  v.tokens_per_image = 4;
  return v;
}

// docs/architecture.md §1.1. "tiny" mirrors tests/data/tiny.
Result<SizeDefaults> defaults_for(const std::string& size) {
  if (size == "270m") return SizeDefaults{18, 640, 2048, 4, 1, 256, 512, 32768, 1, false, {}};
  if (size == "1b") return SizeDefaults{26, 1152, 6912, 4, 1, 256, 512, 32768, 1, false, {}};
  if (size == "4b") return SizeDefaults{34, 2560, 10240, 8, 4, 256, 1024, 131072, 8, true, siglip_so400m()};
  if (size == "12b") return SizeDefaults{48, 3840, 15360, 16, 8, 256, 1024, 131072, 8, true, siglip_so400m()};
  if (size == "27b")
    return SizeDefaults{62, 5376, 21504, 32, 16, 128, 1024, 131072, 8, true, siglip_so400m()};
  if (size == "tiny") return SizeDefaults{8, 96, 160, 4, 2, 32, 8, 4096, 1, true, tiny_vision()};
  return invalid_argument(fmt::format("make-model: unknown size '{}' (270m, 1b, 4b, 12b, 27b, tiny)", size));
}

// ---- deterministic random values ------------------------------------------------------------

uint64_t splitmix64(uint64_t& s) {
  uint64_t z = (s += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

uint64_t fnv1a(const std::string& s) {
  uint64_t h = 0xCBF29CE484222325ull;
  for (unsigned char c : s) h = (h ^ c) * 0x100000001B3ull;
  return h;
}

// Row `row` of a tensor: mean + std * z, z ~ approximately N(0, 1) (Irwin-Hall sum of four
// 16-bit uniforms: one 64-bit draw per value, cheap enough for 27B parameters). The stream
// depends only on (tensor_seed, row), so any row block can be generated independently.
void gen_row(uint64_t tensor_seed, int64_t row, int64_t n, float mean, float std, float* out) {
  uint64_t s = tensor_seed ^ (static_cast<uint64_t>(row) * 0xD6E8FEB86659FD93ull);
  splitmix64(s);
  // Sum of 4 U(0,1) has mean 2 and variance 1/3.
  const float k = std * std::sqrt(3.0f) / 65536.0f;
  for (int64_t i = 0; i < n; ++i) {
    uint64_t r = splitmix64(s);
    float sum = static_cast<float>((r & 0xFFFF) + ((r >> 16) & 0xFFFF) + ((r >> 32) & 0xFFFF) + (r >> 48)) -
                2.0f * 65536.0f;
    out[i] = mean + k * sum;
  }
}

// ---- the tensor plan ------------------------------------------------------------------------

enum class Emit {
  kValues,    // generated values in `dtype` (quantized / converted)
  kFp8,       // generated values as F8_E4M3 divided by the row scale
  kFp8Scale,  // F32 [rows, 1]: the row scales of the kFp8 tensor with the same key
};

struct PlannedTensor {
  std::string name;            // name in the output file
  std::string key;             // seeds the values (the GGUF-style name, shared by every output)
  DType dtype = DType::kF32;   // stored type (F32 for kFp8Scale)
  std::vector<int64_t> shape;  // HF order (slowest first)
  float mean = 0, std = 0;
  Emit emit = Emit::kValues;
  int64_t gen_cols = 0;  // kFp8Scale: columns of the weight the scales belong to
};

// The generated tensors, described once for both outputs.
enum class Role { kEmbedding, kGemmaNorm, kMatrix, kLnWeight, kBias, kPosition, kConvPatch, kProjection };

struct Source {
  std::string gguf;  // GGUF name (also the seed key)
  std::string hf;    // HF name without the model prefix (text) or full name (vision)
  std::vector<int64_t> shape;
  Role role;
  int layer = -1;
};

std::vector<Source> text_sources(const ModelConfig& c) {
  const int64_t H = c.hidden, I = c.intermediate, V = c.vocab_size, hd = c.head_dim;
  const int64_t q = c.q_width(), kv = c.kv_width();
  std::vector<Source> s;
  s.push_back({"token_embd.weight", "embed_tokens.weight", {V, H}, Role::kEmbedding});
  for (int i = 0; i < c.n_layers; ++i) {
    auto g = [&](const char* n) { return fmt::format("blk.{}.{}", i, n); };
    auto h = [&](const char* n) { return fmt::format("layers.{}.{}", i, n); };
    s.push_back({g("attn_norm.weight"), h("input_layernorm.weight"), {H}, Role::kGemmaNorm, i});
    s.push_back({g("attn_q.weight"), h("self_attn.q_proj.weight"), {q, H}, Role::kMatrix, i});
    s.push_back({g("attn_k.weight"), h("self_attn.k_proj.weight"), {kv, H}, Role::kMatrix, i});
    s.push_back({g("attn_v.weight"), h("self_attn.v_proj.weight"), {kv, H}, Role::kMatrix, i});
    s.push_back({g("attn_q_norm.weight"), h("self_attn.q_norm.weight"), {hd}, Role::kGemmaNorm, i});
    s.push_back({g("attn_k_norm.weight"), h("self_attn.k_norm.weight"), {hd}, Role::kGemmaNorm, i});
    s.push_back({g("attn_output.weight"), h("self_attn.o_proj.weight"), {H, q}, Role::kMatrix, i});
    s.push_back(
        {g("post_attention_norm.weight"), h("post_attention_layernorm.weight"), {H}, Role::kGemmaNorm, i});
    s.push_back({g("ffn_norm.weight"), h("pre_feedforward_layernorm.weight"), {H}, Role::kGemmaNorm, i});
    s.push_back({g("ffn_gate.weight"), h("mlp.gate_proj.weight"), {I, H}, Role::kMatrix, i});
    s.push_back({g("ffn_up.weight"), h("mlp.up_proj.weight"), {I, H}, Role::kMatrix, i});
    s.push_back({g("ffn_down.weight"), h("mlp.down_proj.weight"), {H, I}, Role::kMatrix, i});
    s.push_back(
        {g("post_ffw_norm.weight"), h("post_feedforward_layernorm.weight"), {H}, Role::kGemmaNorm, i});
  }
  s.push_back({"output_norm.weight", "norm.weight", {H}, Role::kGemmaNorm});
  return s;
}

// SigLIP tower + projector: GGUF names of docs/formats.md §2.11, HF names of §1.7 (Hub layout).
std::vector<Source> vision_sources(const ModelConfig& c) {
  const VisionConfig& v = c.vision;
  const int64_t Hv = v.hidden, Iv = v.intermediate, p = v.patch_size;
  const int64_t n_pos = (v.image_size / v.patch_size) * (v.image_size / v.patch_size);
  const std::string vt = "vision_tower.vision_model.";
  std::vector<Source> s;
  s.push_back(
      {"v.patch_embd.weight", vt + "embeddings.patch_embedding.weight", {Hv, 3, p, p}, Role::kConvPatch});
  s.push_back({"v.patch_embd.bias", vt + "embeddings.patch_embedding.bias", {Hv}, Role::kBias});
  s.push_back(
      {"v.position_embd.weight", vt + "embeddings.position_embedding.weight", {n_pos, Hv}, Role::kPosition});
  for (int j = 0; j < v.n_layers; ++j) {
    auto g = [&](const char* n) { return fmt::format("v.blk.{}.{}", j, n); };
    auto h = [&](const char* n) { return fmt::format("{}encoder.layers.{}.{}", vt, j, n); };
    s.push_back({g("ln1.weight"), h("layer_norm1.weight"), {Hv}, Role::kLnWeight});
    s.push_back({g("ln1.bias"), h("layer_norm1.bias"), {Hv}, Role::kBias});
    for (auto [gn, hn] :
         {std::pair{"attn_q", "self_attn.q_proj"}, std::pair{"attn_k", "self_attn.k_proj"},
          std::pair{"attn_v", "self_attn.v_proj"}, std::pair{"attn_out", "self_attn.out_proj"}}) {
      s.push_back({g((std::string(gn) + ".weight").c_str()),
                   h((std::string(hn) + ".weight").c_str()),
                   {Hv, Hv},
                   Role::kMatrix});
      s.push_back({g((std::string(gn) + ".bias").c_str()),
                   h((std::string(hn) + ".bias").c_str()),
                   {Hv},
                   Role::kBias});
    }
    s.push_back({g("ln2.weight"), h("layer_norm2.weight"), {Hv}, Role::kLnWeight});
    s.push_back({g("ln2.bias"), h("layer_norm2.bias"), {Hv}, Role::kBias});
    s.push_back({g("ffn_up.weight"), h("mlp.fc1.weight"), {Iv, Hv}, Role::kMatrix});
    s.push_back({g("ffn_up.bias"), h("mlp.fc1.bias"), {Iv}, Role::kBias});
    s.push_back({g("ffn_down.weight"), h("mlp.fc2.weight"), {Hv, Iv}, Role::kMatrix});
    s.push_back({g("ffn_down.bias"), h("mlp.fc2.bias"), {Hv}, Role::kBias});
  }
  s.push_back({"v.post_ln.weight", vt + "post_layernorm.weight", {Hv}, Role::kLnWeight});
  s.push_back({"v.post_ln.bias", vt + "post_layernorm.bias", {Hv}, Role::kBias});
  s.push_back(
      {"mm.soft_emb_norm.weight", "multi_modal_projector.mm_soft_emb_norm.weight", {Hv}, Role::kGemmaNorm});
  // A bare Parameter used as x @ W: HF [Hv, H]; GGUF keeps the bytes (ne [H, Hv]).
  s.push_back({"mm.input_projection.weight",
               "multi_modal_projector.mm_input_projection_weight",
               {Hv, c.hidden},
               Role::kProjection});
  return s;
}

// Mean and std of a source's values. Gemma norms hold 1 + w in GGUF and w in HF files.
void init_for(const Source& s, bool norms_hold_one, float* mean, float* std) {
  *mean = 0;
  switch (s.role) {
    case Role::kEmbedding: *std = 1.0f / std::sqrt(static_cast<float>(s.shape[1])); break;
    case Role::kGemmaNorm:
      *std = 0.05f;
      *mean = norms_hold_one ? 1.0f : 0.0f;
      break;
    case Role::kMatrix: *std = 1.0f / std::sqrt(static_cast<float>(s.shape.back())); break;
    case Role::kLnWeight:
      *std = 0.05f;
      *mean = 1.0f;
      break;
    case Role::kBias: *std = 0.02f; break;
    case Role::kPosition: *std = 0.02f; break;
    case Role::kConvPatch:
      *std = 1.0f / std::sqrt(static_cast<float>(s.shape[1] * s.shape[2] * s.shape[3]));
      break;
    case Role::kProjection:
      *std = 1.0f / std::sqrt(static_cast<float>(s.shape[0]));
      break;  // x @ W: fan_in rows
  }
}

// llama-quantize's use_more_bits (docs/formats.md §3.7): Q4_K_M gives these layers' attn_v/ffn_down Q6_K.
bool use_more_bits(int i, int n) { return i < n / 8 || i >= 7 * n / 8 || (i - n / 8) % 3 == 2; }

// GGUF type of a text tensor for the requested file type (docs/formats.md §2.10, §3.7, §6.2), with
// llama-quantize's shape fallback for rows that are not a whole number of blocks (we have no
// Q5_0 quantizer, so Q4_K falls back to Q8_0 where llama-quantize picks Q5_0).
DType gguf_text_type(DType want, const Source& s, int n_layers) {
  if (s.shape.size() == 1) return DType::kF32;
  const int64_t cols = s.shape.back();
  DType t = want;
  if (s.role == Role::kEmbedding) {
    if (want == DType::kQ4_0) t = DType::kF16;   // Google's QAT Q4_0 GGUFs
    if (want == DType::kQ4_K) t = DType::kQ6_K;  // Q4_K_M: the (tied) output tensor gets Q6_K
  } else if (want == DType::kQ4_K && s.layer >= 0 && use_more_bits(s.layer, n_layers) &&
             (s.gguf.ends_with("attn_v.weight") || s.gguf.ends_with("ffn_down.weight"))) {
    t = DType::kQ6_K;
  }
  if (!row_bytes(t, cols)) t = (t == DType::kQ4_K || t == DType::kQ6_K) ? DType::kQ8_0 : t;
  if (!row_bytes(t, cols)) t = DType::kF16;
  return t;
}

// mmproj types of an "f16" mmproj (docs/formats.md §2.11): patch and position embeddings F32, 1-D
// F32, other matrices F16 (F32/BF16 when the text model is F32/BF16).
DType gguf_vision_type(DType want, const Source& s) {
  if (s.shape.size() == 1 || s.role == Role::kConvPatch || s.role == Role::kPosition) return DType::kF32;
  if (want == DType::kF32 || want == DType::kBF16) return want;
  return DType::kF16;
}

uint32_t llama_ftype(DType t) {
  switch (t) {
    case DType::kF32: return 0;
    case DType::kF16: return 1;
    case DType::kQ4_0: return 2;
    case DType::kQ8_0: return 7;
    case DType::kQ4_K: return 15;  // MOSTLY_Q4_K_M
    case DType::kBF16: return 32;
    default: return 0;
  }
}

// ---- emitting tensor data -------------------------------------------------------------------

using WriteFn = std::function<Status(const void*, size_t)>;

struct Emitter {
  uint64_t seed;
  ThreadPool* pool;
  MakeModelProgress progress;
  const MakeModelProgressFn* progress_fn;

  // Generates `t` row block by row block (about 4M values per block, threaded over rows) and
  // hands the stored bytes to `write`.
  Status emit(const PlannedTensor& t, const WriteFn& write) {
    const uint64_t tseed = seed * 0x9E3779B97F4A7C15ull ^ fnv1a(t.key);
    int64_t gen_cols, rows;
    uint64_t rb;
    if (t.emit == Emit::kFp8Scale) {
      gen_cols = t.gen_cols;
      rows = t.shape[0];
      rb = 4;
    } else {
      gen_cols = t.shape.back();
      rows = 1;
      for (size_t i = 0; i + 1 < t.shape.size(); ++i) rows *= t.shape[i];
      if (t.emit == Emit::kFp8) {
        rb = static_cast<uint64_t>(gen_cols);
      } else {
        auto r = row_bytes(t.dtype, gen_cols);
        if (!r)
          return internal_error(
              fmt::format("make-model: {} row of {} is not whole blocks", t.name, gen_cols));
        rb = *r;
      }
    }
    const int64_t block_rows = std::max<int64_t>(1, (int64_t{4} << 20) / std::max<int64_t>(gen_cols, 1));
    std::vector<uint8_t> buf(static_cast<size_t>(std::min(block_rows, rows) * rb));
    progress.tensor = t.name;
    for (int64_t r0 = 0; r0 < rows; r0 += block_rows) {
      const int64_t n = std::min(block_rows, rows - r0);
      pool->parallel_for(n, [&](int64_t b, int64_t e, int) {
        std::vector<float> x(static_cast<size_t>(gen_cols));
        for (int64_t r = b; r < e; ++r) {
          uint8_t* dst = buf.data() + r * rb;
          gen_row(tseed, r0 + r, gen_cols, t.mean, t.std, x.data());
          if (t.emit == Emit::kValues) {
            quantize_row(t.dtype, x.data(), dst, gen_cols);
            continue;
          }
          // compressed-tensors channel strategy: scale = max|w| / 448, q = fp8(w / scale).
          float amax = 0;
          for (float v : x) amax = std::max(amax, std::abs(v));
          const float scale = amax > 0 ? amax / 448.0f : 1.0f;
          if (t.emit == Emit::kFp8Scale) {
            std::memcpy(dst, &scale, 4);
          } else {
            for (int64_t i = 0; i < gen_cols; ++i) dst[i] = f32_to_f8e4m3(x[i] / scale);
          }
        }
      });
      GEMMA3_TRY(write(buf.data(), static_cast<size_t>(n * rb)));
      progress.bytes_done += static_cast<uint64_t>(n) * rb;
      if (*progress_fn) (*progress_fn)(progress);
    }
    return ok_status();
  }
};

uint64_t stored_bytes(const PlannedTensor& t) {
  if (t.emit == Emit::kFp8Scale) return static_cast<uint64_t>(t.shape[0]) * 4;
  uint64_t n =
      t.emit == Emit::kFp8 ? static_cast<uint64_t>(t.shape.back()) : *row_bytes(t.dtype, t.shape.back());
  for (size_t i = 0; i + 1 < t.shape.size(); ++i) n *= static_cast<uint64_t>(t.shape[i]);
  return n;
}

// ---- GGUF -----------------------------------------------------------------------------------

Status write_gguf(GgufWriter& w, const std::vector<PlannedTensor>& plan, const std::string& path,
                  Emitter& em) {
  for (const PlannedTensor& t : plan) GEMMA3_TRY(w.add_tensor(t.name, t.dtype, t.shape));
  em.progress.file = path;
  return w.write(path, [&](size_t i, const GgufWriter::TensorInfo&, GgufSink& sink) -> Status {
    return em.emit(plan[i], [&](const void* p, size_t n) { return sink.write(p, n); });
  });
}

void set_text_metadata(GgufWriter& w, const ModelConfig& c, const MakeModelOptions& o,
                       const SynthVocab& vocab) {
  w.set_string("general.architecture", "gemma3");
  w.set_string("general.type", "model");
  w.set_string("general.name", fmt::format("gemma-3-{}-random", o.size));
  w.set_string("general.size_label", c.size_label);
  w.set_u32("general.file_type", llama_ftype(o.type));
  if (o.type != DType::kF32 && o.type != DType::kF16 && o.type != DType::kBF16)
    w.set_u32("general.quantization_version", 2);
  w.set_u32("gemma3.context_length", static_cast<uint32_t>(c.max_context));
  w.set_u32("gemma3.embedding_length", static_cast<uint32_t>(c.hidden));
  w.set_u32("gemma3.block_count", static_cast<uint32_t>(c.n_layers));
  w.set_u32("gemma3.feed_forward_length", static_cast<uint32_t>(c.intermediate));
  w.set_u32("gemma3.attention.head_count", static_cast<uint32_t>(c.n_heads));
  w.set_u32("gemma3.attention.head_count_kv", static_cast<uint32_t>(c.n_kv_heads));
  w.set_u32("gemma3.attention.key_length", static_cast<uint32_t>(c.head_dim));
  w.set_u32("gemma3.attention.value_length", static_cast<uint32_t>(c.head_dim));
  w.set_f32("gemma3.attention.layer_norm_rms_epsilon", c.rms_norm_eps);
  w.set_f32("gemma3.rope.freq_base", c.rope_theta_global);
  w.set_u32("gemma3.attention.sliding_window", static_cast<uint32_t>(c.sliding_window));
  if (c.rope_scale_global != 1.0f) {
    w.set_string("gemma3.rope.scaling.type", "linear");
    w.set_f32("gemma3.rope.scaling.factor", c.rope_scale_global);
  }
  w.set_string("tokenizer.ggml.model", "llama");
  w.set_string("tokenizer.ggml.pre", "default");
  w.set_string_array("tokenizer.ggml.tokens", vocab.pieces);
  w.set_f32_array("tokenizer.ggml.scores", vocab.scores);
  w.set_i32_array("tokenizer.ggml.token_type", vocab.types);
  w.set_u32("tokenizer.ggml.bos_token_id", 2);
  w.set_u32("tokenizer.ggml.eos_token_id", 1);
  w.set_u32("tokenizer.ggml.unknown_token_id", 3);
  w.set_u32("tokenizer.ggml.padding_token_id", 0);
  w.set_bool("tokenizer.ggml.add_bos_token", true);
  w.set_bool("tokenizer.ggml.add_eos_token", false);
  w.set_bool("tokenizer.ggml.add_space_prefix", false);
}

void set_mmproj_metadata(GgufWriter& w, const ModelConfig& c, DType type) {
  const VisionConfig& v = c.vision;
  w.set_string("general.architecture", "clip");
  w.set_string("general.type", "mmproj");
  w.set_u32("general.file_type", type == DType::kF32 ? 0 : type == DType::kBF16 ? 32 : 1);
  w.set_bool("clip.has_vision_encoder", true);
  w.set_string("clip.projector_type", "gemma3");
  w.set_u32("clip.vision.projection_dim", static_cast<uint32_t>(c.hidden));
  w.set_u32("clip.vision.image_size", static_cast<uint32_t>(v.image_size));
  w.set_u32("clip.vision.patch_size", static_cast<uint32_t>(v.patch_size));
  w.set_u32("clip.vision.embedding_length", static_cast<uint32_t>(v.hidden));
  w.set_u32("clip.vision.feed_forward_length", static_cast<uint32_t>(v.intermediate));
  w.set_u32("clip.vision.block_count", static_cast<uint32_t>(v.n_layers));
  w.set_u32("clip.vision.attention.head_count", static_cast<uint32_t>(v.n_heads));
  w.set_f32("clip.vision.attention.layer_norm_epsilon", v.layer_norm_eps);
  w.set_f32_array("clip.vision.image_mean", {0.5f, 0.5f, 0.5f});
  w.set_f32_array("clip.vision.image_std", {0.5f, 0.5f, 0.5f});
  w.set_bool("clip.use_gelu", true);
  const int side = v.image_size / v.patch_size;
  const int tok_side = static_cast<int>(std::lround(std::sqrt(static_cast<double>(v.tokens_per_image))));
  if (tok_side > 0 && side / tok_side != 4)
    w.set_u32("clip.vision.projector.scale_factor", static_cast<uint32_t>(side / tok_side));
}

// ---- safetensors ------------------------------------------------------------------------------

const char* st_dtype(const PlannedTensor& t) {
  if (t.emit == Emit::kFp8) return "F8_E4M3";
  if (t.emit == Emit::kFp8Scale) return "F32";
  switch (t.dtype) {
    case DType::kBF16: return "BF16";
    case DType::kF16: return "F16";
    default: return "F32";
  }
}

std::vector<int64_t> st_shape(const PlannedTensor& t) {
  if (t.emit == Emit::kFp8Scale) return {t.shape[0], 1};
  return t.shape;
}

// One safetensors file: JSON header (padded with spaces to 8 bytes, docs/formats.md §1.1), then the
// tensors back to back in plan order.
Status write_safetensors(const std::string& path, const std::vector<const PlannedTensor*>& tensors,
                         Emitter& em) {
  ojson header = ojson::object();
  header["__metadata__"] = {{"format", "pt"}};
  uint64_t off = 0;
  for (const PlannedTensor* t : tensors) {
    const uint64_t n = stored_bytes(*t);
    header[t->name] = {{"dtype", st_dtype(*t)}, {"shape", st_shape(*t)}, {"data_offsets", {off, off + n}}};
    off += n;
  }
  std::string h = header.dump();
  h.append((8 - h.size() % 8) % 8, ' ');
  const std::string tmp = path + ".tmp";
  std::unique_ptr<std::FILE, int (*)(std::FILE*)> f(std::fopen(tmp.c_str(), "wb"), &std::fclose);
  if (!f) return invalid_argument(fmt::format("{}: cannot create: {}", tmp, std::strerror(errno)));
  auto put = [&](const void* p, size_t n) -> Status {
    if (n && std::fwrite(p, 1, n, f.get()) != n)
      return invalid_argument(fmt::format("{}: write failed: {}", tmp, std::strerror(errno)));
    return ok_status();
  };
  const uint64_t hn = h.size();
  GEMMA3_TRY(put(&hn, 8));
  GEMMA3_TRY(put(h.data(), h.size()));
  em.progress.file = path;
  for (const PlannedTensor* t : tensors) GEMMA3_TRY(em.emit(*t, put));
  if (std::fclose(f.release()) != 0)
    return invalid_argument(fmt::format("{}: close failed: {}", tmp, std::strerror(errno)));
  std::error_code ec;
  fs::rename(tmp, path, ec);
  if (ec) return invalid_argument(fmt::format("{}: cannot rename to {}: {}", tmp, path, ec.message()));
  return ok_status();
}

Status write_text_file(const std::string& path, const std::string& text) {
  std::unique_ptr<std::FILE, int (*)(std::FILE*)> f(std::fopen(path.c_str(), "wb"), &std::fclose);
  if (!f || std::fwrite(text.data(), 1, text.size(), f.get()) != text.size())
    return invalid_argument(fmt::format("{}: cannot write: {}", path, std::strerror(errno)));
  return ok_status();
}

ojson hf_text_config(const ModelConfig& c) {
  ojson t;
  t["hidden_size"] = c.hidden;
  t["intermediate_size"] = c.intermediate;
  t["num_hidden_layers"] = c.n_layers;
  t["num_attention_heads"] = c.n_heads;
  t["num_key_value_heads"] = c.n_kv_heads;
  t["head_dim"] = c.head_dim;
  t["vocab_size"] = c.vocab_size;
  t["sliding_window"] = c.sliding_window;
  t["max_position_embeddings"] = c.max_context;
  t["query_pre_attn_scalar"] = c.query_pre_attn_scalar;
  t["rms_norm_eps"] = c.rms_norm_eps;
  t["rope_theta"] = c.rope_theta_global;
  t["rope_local_base_freq"] = c.rope_theta_local;
  if (c.rope_scale_global != 1.0f)
    t["rope_scaling"] = {{"rope_type", "linear"}, {"factor", c.rope_scale_global}};
  else
    t["rope_scaling"] = nullptr;
  t["sliding_window_pattern"] = 6;
  ojson types = ojson::array();
  for (LayerType lt : c.layer_types)
    types.push_back(lt == LayerType::kGlobal ? "full_attention" : "sliding_attention");
  t["layer_types"] = types;
  t["hidden_activation"] = "gelu_pytorch_tanh";
  t["final_logit_softcapping"] = nullptr;
  t["attn_logit_softcapping"] = nullptr;
  t["attention_bias"] = false;
  return t;
}

ojson hf_config_json(const ModelConfig& c, bool vision) {
  ojson q;
  q["quant_method"] = "compressed-tensors";
  q["format"] = "float-quantized";
  q["quantization_status"] = "compressed";
  q["config_groups"] = {
      {"group_0",
       {{"targets", {"Linear"}},
        {"weights",
         {{"num_bits", 8},
          {"type", "float"},
          {"strategy", "channel"},
          {"symmetric", true},
          {"dynamic", false}}},
        {"input_activations",
         {{"num_bits", 8}, {"type", "float"}, {"strategy", "token"}, {"symmetric", true}, {"dynamic", true}}},
        {"output_activations", nullptr}}}};
  q["ignore"] =
      vision ? ojson{"lm_head", "re:vision_tower.*", "re:multi_modal_projector.*"} : ojson{"lm_head"};
  q["kv_cache_scheme"] = nullptr;

  ojson j;
  if (!vision) {
    j["architectures"] = {"Gemma3ForCausalLM"};
    j["model_type"] = "gemma3_text";
    const ojson text = hf_text_config(c);  // named: items() of a temporary would dangle
    for (auto& [k, v] : text.items()) j[k] = v;
    j["bos_token_id"] = 2;
    j["eos_token_id"] = {1, 106};
    j["pad_token_id"] = 0;
  } else {
    const VisionConfig& v = c.vision;
    j["architectures"] = {"Gemma3ForConditionalGeneration"};
    j["model_type"] = "gemma3";
    ojson t = hf_text_config(c);
    t["model_type"] = "gemma3_text";
    j["text_config"] = t;
    j["vision_config"] = {{"model_type", "siglip_vision_model"},
                          {"hidden_size", v.hidden},
                          {"intermediate_size", v.intermediate},
                          {"num_hidden_layers", v.n_layers},
                          {"num_attention_heads", v.n_heads},
                          {"image_size", v.image_size},
                          {"patch_size", v.patch_size},
                          {"layer_norm_eps", v.layer_norm_eps},
                          {"vision_use_head", false}};
    j["boi_token_index"] = c.boi_id;
    j["eoi_token_index"] = c.eoi_id;
    j["image_token_index"] = c.image_token_id;
    j["mm_tokens_per_image"] = v.tokens_per_image;
    j["bos_token_id"] = 2;
    j["eos_token_id"] = {1, 106};
    j["pad_token_id"] = 0;
  }
  j["torch_dtype"] = "bfloat16";
  j["tie_word_embeddings"] = true;
  j["quantization_config"] = q;
  return j;
}

std::string tokenizer_model_bytes(int vocab) {
  // The SentencePiece model has at most 262144 pieces; HF's extra rows (<image_soft_token>
  // and padding) exist only in the embedding (docs/formats.md §1.7).
  SynthVocab v = make_synth_vocab(std::min(vocab, 262144), /*gguf_types=*/false);
  std::vector<spm::Piece> pieces(v.pieces.size());
  for (size_t i = 0; i < pieces.size(); ++i)
    pieces[i] = {v.pieces[i], v.scores[i], static_cast<PieceType>(v.types[i])};
  spm::TrainerSpec trainer;
  trainer.vocab_size = static_cast<int32_t>(pieces.size());
  trainer.byte_fallback = true;
  trainer.unk_id = 3, trainer.bos_id = 2, trainer.eos_id = 1, trainer.pad_id = 0;
  return spm::serialize_model_proto(pieces, trainer, spm::NormalizerSpec{});
}

}  // namespace

// ---- public ---------------------------------------------------------------------------------

SynthVocab make_synth_vocab(int n, bool gguf_types) {
  SynthVocab v;
  v.pieces.reserve(n);
  constexpr int kNormal = 1, kUnknown = 2, kControl = 3, kUser = 4, kUnused = 5, kByte = 6;
  // The original model marks only pad/eos/bos CONTROL and <unk> UNKNOWN; the llama.cpp
  // converter overrides every special to CONTROL (score -1000), docs/formats.md §4.2.
  const int special = gguf_types ? kControl : kUser;
  const float special_score = gguf_types ? -1000.0f : 0.0f;
  auto add = [&](std::string p, float score, int type) {
    v.pieces.push_back(std::move(p));
    v.scores.push_back(score);
    v.types.push_back(type);
  };
  add("<pad>", special_score, kControl);
  add("<eos>", special_score, kControl);
  add("<bos>", special_score, kControl);
  add("<unk>", special_score, gguf_types ? kControl : kUnknown);
  add("<mask>", special_score, special);
  add("[multimodal]", special_score, kUser);
  for (int i = 0; i < 99; ++i) add(fmt::format("<unused{}>", i), special_score, special);
  add("<start_of_turn>", special_score, special);  // 105
  add("<end_of_turn>", special_score, special);    // 106
  add("\n", 0.0f, kUser);                          // 107
  for (int b = 0; b < 256; ++b) add(fmt::format("<0x{:02X}>", b), 0.0f, kByte);
  // Fillers: single printable characters (space as "▁"), "▁" + letter, letter pairs, "▁" +
  // letter pair, then numbered pieces; scores decrease so BPE merges have a strict order.
  std::vector<std::string> fill;
  const std::string sp = "\xE2\x96\x81";
  fill.push_back(sp);
  for (char ch = 0x21; ch < 0x7F; ++ch) fill.push_back(std::string(1, ch));
  std::string letters = "etaoinshrdlucmfwygpbvkxqjz";
  for (char a : letters) fill.push_back(sp + a);
  for (char a : letters)
    for (char b : letters) fill.push_back(std::string{a, b});
  for (char a : letters)
    for (char b : letters) fill.push_back(sp + a + b);
  size_t next_fill = 0;
  int filler_rank = 0;
  while (static_cast<int>(v.pieces.size()) < n) {
    const int id = static_cast<int>(v.pieces.size());
    if (id == 255999) {
      add("<start_of_image>", special_score, special);
    } else if (id == 256000) {
      add("<end_of_image>", special_score, special);
    } else if (id == 262144) {
      add("<image_soft_token>", special_score, kControl);
    } else if (id > 262144) {
      add(fmt::format("[PAD{}]", id), -10000.0f, kUnused);
    } else {
      std::string p = next_fill < fill.size() ? fill[next_fill++] : fmt::format("w{}", id);
      add(std::move(p), -static_cast<float>(++filler_rank), kNormal);
    }
  }
  v.pieces.resize(n), v.scores.resize(n), v.types.resize(n);
  return v;
}

std::string make_model_mmproj_path(const std::string& out_path) {
  std::string base = out_path;
  if (base.size() > 5 && base.ends_with(".gguf")) base.resize(base.size() - 5);
  return base + ".mmproj.gguf";
}

Result<ModelConfig> make_model_config(const MakeModelOptions& o) {
  GEMMA3_ASSIGN_OR_RETURN(SizeDefaults d, defaults_for(o.size));
  auto pick = [](int override_value, int def) { return override_value > 0 ? override_value : def; };
  for (auto [name, v] : {std::pair{"layers", o.layers},
                         {"hidden", o.hidden},
                         {"intermediate", o.intermediate},
                         {"heads", o.heads},
                         {"kv_heads", o.kv_heads},
                         {"head_dim", o.head_dim},
                         {"vocab", o.vocab},
                         {"window", o.window}}) {
    if (v < 0) return invalid_argument(fmt::format("make-model: --{} {} must be positive", name, v));
  }
  ModelConfig c;
  c.n_layers = pick(o.layers, d.layers);
  c.hidden = pick(o.hidden, d.hidden);
  c.intermediate = pick(o.intermediate, d.intermediate);
  c.n_heads = pick(o.heads, d.heads);
  c.n_kv_heads = pick(o.kv_heads, d.kv_heads);
  c.head_dim = pick(o.head_dim, d.head_dim);
  c.vocab_size = pick(o.vocab, o.size == "tiny" ? 512 : 262144);
  c.sliding_window = pick(o.window, d.window);
  c.max_context = d.context;
  c.rope_scale_global = d.rope_scale;
  c.set_layer_pattern(6);
  // The value our GGUF loader (like llama.cpp) derives: hd, or H/nH for the 62-layer 27B.
  c.query_pre_attn_scalar = static_cast<float>(c.head_dim);
  if (c.n_layers == 62) c.query_pre_attn_scalar = static_cast<float>(c.hidden) / c.n_heads;
  c.size_label = ModelConfig::size_label_for(c.n_layers);
  if (o.vision) {
    if (!d.vision_capable)
      return invalid_argument(fmt::format(
          "make-model: Gemma 3 {} has no vision tower (--vision needs 4b, 12b, 27b or tiny)", o.size));
    c.has_vision = true;
    c.vision = d.vision;
  }
  if (c.vocab_size < kMakeModelMinVocab)
    return invalid_argument(
        fmt::format("make-model: --vocab {} is too small: the synthesized vocabulary needs at least {} "
                    "pieces (108 specials, "
                    "256 byte pieces, fillers)",
                    c.vocab_size, kMakeModelMinVocab));
  if (c.head_dim % 2)
    return invalid_argument(fmt::format("make-model: --head-dim {} must be even (RoPE)", c.head_dim));
  if (c.n_heads % c.n_kv_heads)
    return invalid_argument(
        fmt::format("make-model: --heads {} is not a multiple of --kv-heads {}", c.n_heads, c.n_kv_heads));
  if (c.hidden % 32 || c.intermediate % 32 || c.q_width() % 32)
    return invalid_argument(
        fmt::format("make-model: hidden {}, intermediate {} and heads*head_dim {} must be multiples of 32 "
                    "(quantization blocks)",
                    c.hidden, c.intermediate, c.q_width()));
  GEMMA3_TRY(c.validate("make-model"));
  return c;
}

Status make_model(const MakeModelOptions& o, const std::string& out_path,
                  const MakeModelProgressFn& progress_fn) {
  GEMMA3_ASSIGN_OR_RETURN(ModelConfig c, make_model_config(o));
  const bool fp8 = o.type == DType::kF8E4M3;
  if (!fp8 && !can_quantize(o.type))
    return invalid_argument(fmt::format("make-model: cannot write type {}", dtype_name(o.type)));
  if (out_path.empty()) return invalid_argument("make-model: no output path");

  ThreadPool pool(0);
  Emitter em{o.seed, &pool, {}, &progress_fn};
  const std::vector<Source> text = text_sources(c);
  const std::vector<Source> vision = c.has_vision ? vision_sources(c) : std::vector<Source>{};

  auto planned = [&](const Source& s, const std::string& name, DType dtype, bool norms_hold_one) {
    PlannedTensor t;
    t.name = name;
    t.key = s.gguf;
    t.dtype = dtype;
    t.shape = s.shape;
    init_for(s, norms_hold_one, &t.mean, &t.std);
    return t;
  };

  if (!fp8) {
    std::vector<PlannedTensor> text_plan, vision_plan;
    for (const Source& s : text)
      text_plan.push_back(planned(s, s.gguf, gguf_text_type(o.type, s, c.n_layers), true));
    for (const Source& s : vision)
      vision_plan.push_back(planned(s, s.gguf, gguf_vision_type(o.type, s), true));
    for (const auto* plan : {&text_plan, &vision_plan})
      for (const PlannedTensor& t : *plan) em.progress.bytes_total += stored_bytes(t);

    GgufWriter w;
    set_text_metadata(w, c, o, make_synth_vocab(c.vocab_size, /*gguf_types=*/true));
    GEMMA3_TRY(write_gguf(w, text_plan, out_path, em));
    if (!vision_plan.empty()) {
      GgufWriter wv;
      set_mmproj_metadata(wv, c, o.type);
      GEMMA3_TRY(write_gguf(wv, vision_plan, make_model_mmproj_path(out_path), em));
    }
    return ok_status();
  }

  // fp8: an HF folder. Linear weights F8_E4M3 + F32 [rows, 1] scales; the rest BF16.
  std::error_code ec;
  fs::create_directories(out_path, ec);
  if (ec) return invalid_argument(fmt::format("{}: cannot create the folder: {}", out_path, ec.message()));
  const std::string prefix = c.has_vision ? "language_model.model." : "model.";
  std::vector<PlannedTensor> plan;
  for (const Source& s : text) {
    const std::string name = prefix + s.hf;
    if (s.role == Role::kMatrix) {
      PlannedTensor w = planned(s, name, DType::kF8E4M3, false);
      w.emit = Emit::kFp8;
      PlannedTensor sc = w;
      sc.name = name + "_scale";
      sc.dtype = DType::kF32;
      sc.emit = Emit::kFp8Scale;
      sc.gen_cols = s.shape.back();
      plan.push_back(w);
      plan.push_back(sc);
    } else {
      plan.push_back(planned(s, name, DType::kBF16, false));
    }
  }
  for (const Source& s : vision) plan.push_back(planned(s, s.hf, DType::kBF16, false));

  // Shards of at most max_shard_bytes (a tensor larger than that gets a shard of its own).
  std::vector<std::vector<const PlannedTensor*>> shards(1);
  uint64_t in_shard = 0;
  for (const PlannedTensor& t : plan) {
    const uint64_t n = stored_bytes(t);
    em.progress.bytes_total += n;
    if (in_shard > 0 && in_shard + n > o.max_shard_bytes) shards.emplace_back(), in_shard = 0;
    shards.back().push_back(&t);
    in_shard += n;
  }
  GEMMA3_TRY(write_text_file(out_path + "/config.json", hf_config_json(c, c.has_vision).dump(2) + "\n"));
  GEMMA3_TRY(write_text_file(out_path + "/tokenizer.model", tokenizer_model_bytes(c.vocab_size)));
  if (shards.size() == 1) return write_safetensors(out_path + "/model.safetensors", shards[0], em);
  ojson weight_map = ojson::object();
  for (size_t k = 0; k < shards.size(); ++k) {
    const std::string file = fmt::format("model-{:05}-of-{:05}.safetensors", k + 1, shards.size());
    for (const PlannedTensor* t : shards[k]) weight_map[t->name] = file;
    GEMMA3_TRY(write_safetensors(out_path + "/" + file, shards[k], em));
  }
  ojson index = {{"metadata", {{"total_size", em.progress.bytes_total}}}, {"weight_map", weight_map}};
  return write_text_file(out_path + "/model.safetensors.index.json", index.dump(2) + "\n");
}

}  // namespace gemma3
