#include "model/vision.h"

#include <fmt/format.h>

#include <cmath>
#include <numeric>
#include <tuple>

#include "core/quant.h"

namespace gemma3 {

VisionEncoder::~VisionEncoder() {
  for (void* p : owned_) be_.release(p);
}

Result<std::unique_ptr<VisionEncoder>> VisionEncoder::create(Backend& be, const VisionWeights& w) {
  std::unique_ptr<VisionEncoder> e(new VisionEncoder(be));
  const VisionConfig& c = w.config;
  e->cfg_ = c;
  e->text_hidden_ = w.text_hidden;
  e->side_ = c.image_size / c.patch_size;
  const int tokens_side = static_cast<int>(std::lround(std::sqrt(static_cast<double>(c.tokens_per_image))));
  if (tokens_side < 1 || tokens_side * tokens_side != c.tokens_per_image || e->side_ % tokens_side != 0)
    return invalid_file(fmt::format("{}: {} image tokens do not pool a {}x{} patch grid", w.source,
                                    c.tokens_per_image, e->side_, e->side_));
  e->pool_ = e->side_ / tokens_side;
  const int64_t Hv = c.hidden, H = w.text_hidden, pp3 = int64_t{3} * c.patch_size * c.patch_size;

  // The Conv2d weight [Hv, 3, p, p] is a [Hv, 3*p*p] matrix over im2col rows.
  e->patch_view_ = w.patch_embd;
  e->patch_view_.shape = {Hv, pp3};
  // input_projection [Hv, H] is used as x @ W; the matmul op wants [out, in] = [H, Hv].
  e->projection_t_.resize(static_cast<size_t>(H * Hv));
  std::vector<float> row(static_cast<size_t>(H));
  const TensorView& p = w.input_projection;
  for (int64_t i = 0; i < Hv; ++i) {
    dequantize_row(p.dtype, p.row_ptr(i), row.data(), H);
    const float s = p.row_scale.empty() ? 1.0f : p.row_scale.size() == 1 ? p.row_scale[0] : p.row_scale[i];
    for (int64_t o = 0; o < H; ++o) e->projection_t_[o * Hv + i] = row[o] * s;
  }
  e->projection_view_ = TensorView{p.name + " (transposed)",
                                   DType::kF32,
                                   {H, Hv},
                                   e->projection_t_.data(),
                                   static_cast<uint64_t>(H * Hv) * sizeof(float),
                                   {}};

  auto up = [&](const TensorView& t, std::unique_ptr<BackendWeight>* out) -> Status {
    auto r = be.upload(t);
    if (!r.ok()) return r.status().with_context(fmt::format("{}: vision tensor {}", w.source, t.name));
    *out = std::move(r).value();
    return ok_status();
  };
  GEMMA3_TRY(up(e->patch_view_, &e->patch_w_));
  GEMMA3_TRY(up(w.patch_bias, &e->patch_b_));
  GEMMA3_TRY(up(w.position_embd, &e->position_));
  GEMMA3_TRY(up(w.post_ln_w, &e->post_ln_w_));
  GEMMA3_TRY(up(w.post_ln_b, &e->post_ln_b_));
  GEMMA3_TRY(up(w.soft_emb_norm, &e->soft_norm_));
  GEMMA3_TRY(up(e->projection_view_, &e->projection_));
  e->layers_.resize(w.layers.size());
  for (size_t j = 0; j < w.layers.size(); ++j) {
    const VisionLayerWeights& s = w.layers[j];
    Layer& d = e->layers_[j];
    for (auto [src, dst] : {std::pair{&s.ln1_w, &d.ln1_w},
                            {&s.ln1_b, &d.ln1_b},
                            {&s.q_w, &d.q_w},
                            {&s.q_b, &d.q_b},
                            {&s.k_w, &d.k_w},
                            {&s.k_b, &d.k_b},
                            {&s.v_w, &d.v_w},
                            {&s.v_b, &d.v_b},
                            {&s.o_w, &d.o_w},
                            {&s.o_b, &d.o_b},
                            {&s.ln2_w, &d.ln2_w},
                            {&s.ln2_b, &d.ln2_b},
                            {&s.fc1_w, &d.fc1_w},
                            {&s.fc1_b, &d.fc1_b},
                            {&s.fc2_w, &d.fc2_w},
                            {&s.fc2_b, &d.fc2_b}})
      GEMMA3_TRY(up(*src, dst));
  }
  return e;
}

Status VisionEncoder::allocate() {
  const int64_t P = int64_t{side_} * side_, Hv = cfg_.hidden, Iv = cfg_.intermediate,
                N = cfg_.tokens_per_image, pp3 = int64_t{3} * cfg_.patch_size * cfg_.patch_size;
  for (auto [ptr, count] : {std::pair{&patches_, P * pp3},
                            {&x_, P * Hv},
                            {&normed_, P * Hv},
                            {&q_, P * Hv},
                            {&k_, P * Hv},
                            {&v_, P * Hv},
                            {&attn_, P * Hv},
                            {&mlp_, P * Iv},
                            {&pooled_, N * Hv},
                            {&out_, N * int64_t{text_hidden_}}}) {
    GEMMA3_ASSIGN_OR_RETURN(void* p, be_.allocate(static_cast<size_t>(count) * sizeof(float)));
    owned_.push_back(p);
    *ptr = static_cast<float*>(p);
  }
  // The projections' outputs are the attention's keys and values as they stand: [P, Hv] fp32
  // is a KvLayer of P slots (patch p in slot p), so there is no cache to copy them into.
  kv_.k = k_;
  kv_.v = v_;
  kv_.capacity = static_cast<int>(P);
  kv_.dtype = DType::kF32;
  position_ids_.resize(P);
  std::iota(position_ids_.begin(), position_ids_.end(), 0);
  host_patches_.resize(static_cast<size_t>(P * pp3));
  return ok_status();
}

Status VisionEncoder::encode(const float* pixels, float* out, const ActivationHook* hook) {
  if (!x_) GEMMA3_TRY(allocate());
  const int S = cfg_.image_size, p = cfg_.patch_size, side = side_;
  const int64_t P = int64_t{side} * side, Hv = cfg_.hidden, Iv = cfg_.intermediate, N = cfg_.tokens_per_image,
                H = text_hidden_, pp3 = int64_t{3} * p * p;
  const float eps = cfg_.layer_norm_eps;
  Backend& be = be_;
  std::vector<float> dump;
  auto emit = [&](int layer, const char* name, const float* buf, int64_t count) {
    if (!hook || !*hook) return;
    dump.resize(count);
    be.to_host(buf, dump.data(), count * sizeof(float));
    (*hook)(layer, name, dump.data(), count);
  };

  // im2col: patch (row, col) -> [c][ky][kx], the Conv2d weight's order.
  for (int r = 0; r < side; ++r)
    for (int col = 0; col < side; ++col) {
      float* dst = host_patches_.data() + (int64_t{r} * side + col) * pp3;
      for (int c = 0; c < 3; ++c)
        for (int ky = 0; ky < p; ++ky) {
          const float* src = pixels + (int64_t{c} * S + int64_t{r} * p + ky) * S + int64_t{col} * p;
          std::copy(src, src + p, dst + (int64_t{c} * p + ky) * p);
        }
    }
  be.from_host(host_patches_.data(), patches_, host_patches_.size() * sizeof(float));

  // Patch embedding + bias + learned position embedding (rows 0..P-1 of the table).
  be.matmul(patches_, static_cast<int>(P), *patch_w_, x_);
  be.add_bias(x_, *patch_b_, P, x_);
  be.embed(*position_, position_ids_.data(), static_cast<int>(P), 1.0f, normed_);
  be.add(x_, normed_, P * Hv, x_);
  emit(-1, "vision_embed", x_, P * Hv);

  AttentionParams ap;
  ap.n_tokens = static_cast<int>(P);
  ap.pos0 = 0;
  ap.n_heads = cfg_.n_heads;
  ap.n_kv_heads = cfg_.n_heads;
  ap.head_dim = cfg_.hidden / cfg_.n_heads;
  ap.scale = 1.0f / std::sqrt(static_cast<float>(ap.head_dim));  // SiglipAttention: head_dim^-0.5
  ap.window = 0;
  ap.kv_start = 0;
  ap.bidir_begin = 0;  // every patch sees every patch
  ap.bidir_end = static_cast<int>(P);

  // Each residual add is fused with the LayerNorm after it (Backend::add_layernorm): the
  // attention's into ln2, the MLP's into the next layer's ln1 or, after the last layer, the
  // post-LayerNorm (whose output stays in normed_).
  be.layernorm(x_, *layers_.front().ln1_w, *layers_.front().ln1_b, P, static_cast<int>(Hv), eps, normed_);
  for (size_t l = 0; l < layers_.size(); ++l) {
    const Layer& L = layers_[l];
    for (auto [w, b, dst] : {std::tuple{L.q_w.get(), L.q_b.get(), q_},
                             {L.k_w.get(), L.k_b.get(), k_},
                             {L.v_w.get(), L.v_b.get(), v_}}) {
      be.matmul(normed_, static_cast<int>(P), *w, dst);
      be.add_bias(dst, *b, P, dst);
    }
    be.attention(q_, kv_, ap, attn_);  // kv_ is k_ and v_ (allocate)
    be.matmul(attn_, static_cast<int>(P), *L.o_w, normed_);
    be.add_bias(normed_, *L.o_b, P, normed_);
    be.add_layernorm(normed_, x_, *L.ln2_w, *L.ln2_b, P, static_cast<int>(Hv), eps, normed_);
    be.matmul(normed_, static_cast<int>(P), *L.fc1_w, mlp_);
    be.add_bias(mlp_, *L.fc1_b, P, mlp_);
    be.gelu(mlp_, P * Iv, mlp_);
    be.matmul(mlp_, static_cast<int>(P), *L.fc2_w, normed_);
    be.add_bias(normed_, *L.fc2_b, P, normed_);
    const bool last = l + 1 == layers_.size();
    be.add_layernorm(normed_, x_, last ? *post_ln_w_ : *layers_[l + 1].ln1_w,
                     last ? *post_ln_b_ : *layers_[l + 1].ln1_b, P, static_cast<int>(Hv), eps, normed_);
    emit(static_cast<int>(l), "vision_layer_out", x_, P * Hv);
  }
  float* const tower = normed_;  // the post-LayerNorm's output
  emit(-1, "vision_tower", tower, P * Hv);

  // Projector: pool the patch grid, Gemma RMSNorm (weight holds 1 + w), project to H.
  be.avg_pool(tower, side, static_cast<int>(Hv), pool_, pooled_);
  emit(-1, "vision_pooled", pooled_, N * Hv);
  be.rmsnorm(pooled_, *soft_norm_, N, static_cast<int>(Hv), eps, pooled_);
  be.matmul(pooled_, static_cast<int>(N), *projection_, out_);
  emit(-1, "vision_projected", out_, N * H);
  be.to_host(out_, out, static_cast<size_t>(N * H) * sizeof(float));
  return be.status();
}

}  // namespace gemma3
