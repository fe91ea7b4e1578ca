#include "model/forward.h"

#include <fmt/format.h>

#include <algorithm>
#include <bit>
#include <cmath>

#include "core/progress.h"

namespace gemma3 {

namespace {
// Steps recorded for replay have at most this many tokens: decode steps (one token, or one per
// sequence in a batch); a prefill chunk runs once per position, so recording it gains nothing.
constexpr int kMaxRecordedTokens = 8;
}  // namespace

float embedding_scale(int hidden) { return round_bf16(std::sqrt(static_cast<float>(hidden))); }

Result<BackendModel> BackendModel::upload(Backend& backend, const Weights& weights, bool progress) {
  BackendModel m;
  uint64_t total = weights.embed.nbytes, done = 0;
  for (const LayerWeights& l : weights.layers)
    for (const TensorView* t : {&l.q, &l.k, &l.v, &l.o, &l.gate, &l.up, &l.down}) total += t->nbytes;
  ProgressBar bar("loading", total, progress);
  // The decoder's matrices (projections, the tied embedding / LM head) are matmul weights a
  // backend may narrow (--weights fp8); the norm vectors stay as stored.
  auto up = [&](const TensorView& t, std::unique_ptr<BackendWeight>* out) -> Status {
    GEMMA3_ASSIGN_OR_RETURN(*out, t.shape.size() == 2 ? backend.upload_matmul_weight(t) : backend.upload(t));
    bar.update(done += t.shape.size() == 2 ? t.nbytes : 0);
    return ok_status();
  };
  GEMMA3_TRY(up(weights.embed, &m.embed));
  GEMMA3_TRY(up(weights.final_norm, &m.final_norm));
  m.layers.resize(weights.layers.size());
  for (size_t i = 0; i < weights.layers.size(); ++i) {
    const LayerWeights& l = weights.layers[i];
    Layer& d = m.layers[i];
    GEMMA3_ASSIGN_OR_RETURN(d.qkv, backend.upload_stacked({&l.q, &l.k, &l.v}));
    GEMMA3_ASSIGN_OR_RETURN(d.gate_up, backend.upload_stacked({&l.gate, &l.up}));
    if (d.qkv) bar.update(done += l.q.nbytes + l.k.nbytes + l.v.nbytes);
    if (d.gate_up) bar.update(done += l.gate.nbytes + l.up.nbytes);
    for (auto [src, dst] : {std::pair{&l.attn_norm, &d.attn_norm},
                            {&l.q, &d.q},
                            {&l.k, &d.k},
                            {&l.v, &d.v},
                            {&l.q_norm, &d.q_norm},
                            {&l.k_norm, &d.k_norm},
                            {&l.o, &d.o},
                            {&l.post_attn_norm, &d.post_attn_norm},
                            {&l.ffn_norm, &d.ffn_norm},
                            {&l.gate, &d.gate},
                            {&l.up, &d.up},
                            {&l.down, &d.down},
                            {&l.post_ffn_norm, &d.post_ffn_norm}}) {
      const bool in_stack = (d.qkv && (src == &l.q || src == &l.k || src == &l.v)) ||
                            (d.gate_up && (src == &l.gate || src == &l.up));
      if (!in_stack) GEMMA3_TRY(up(*src, dst));
    }
  }
  return m;
}

ForwardScratch::~ForwardScratch() {
  recorded.clear();
  for (void* p : owned_) backend_.release(p);
}

Status ForwardScratch::allocate(const ModelConfig& c, int chunk, int logit_rows) {
  recorded.clear();
  for (void* p : owned_) backend_.release(p);
  owned_.clear();
  bytes_ = 0;
  const int64_t n = chunk;
  chunk_ = chunk;
  logit_rows_ = std::max(logit_rows, std::min(chunk, kLogitRows));
  for (auto [ptr, width] : {std::pair{&x, int64_t{c.hidden}},
                            {&a, c.hidden},
                            {&normed, c.hidden},
                            {&q, c.q_width()},
                            {&k, c.kv_width()},
                            {&v, c.kv_width()},
                            {&attn, c.q_width()},
                            {&gate, c.intermediate},
                            {&up, c.intermediate},
                            {&logits, c.vocab_size}}) {
    const int64_t rows = ptr == &logits ? logit_rows_ : n;
    const uint64_t bytes = static_cast<uint64_t>(rows * width) * sizeof(float);
    GEMMA3_ASSIGN_OR_RETURN(void* p, backend_.allocate(bytes));
    owned_.push_back(p);
    *ptr = static_cast<float*>(p);
    bytes_ += bytes;
  }
  return ok_status();
}

namespace {

// One sequence's rows [off, off + n) of a step.
struct Segment {
  const KvView* kv;
  int off, n, pos0, kv_start, bidir_begin, bidir_end;
  const int32_t* ids;
  const float* embeddings;
};

Status check_segment(const ModelConfig& c, const Segment& g) {
  const int n = g.n;
  if (n < 1 || n > g.kv->chunk)
    return internal_error(fmt::format("forward: chunk of {} tokens, expected 1..{}", n, g.kv->chunk));
  if (g.kv_start < 0 || g.pos0 < g.kv_start || g.pos0 - g.kv_start + n > g.kv->context)
    return out_of_range(fmt::format("positions {}..{} (from {}) exceed the context of {} tokens", g.pos0,
                                    g.pos0 + n - 1, g.kv_start, g.kv->context));
  if (g.bidir_begin < g.bidir_end && (g.bidir_begin < g.pos0 || g.bidir_end > g.pos0 + n))
    return internal_error(fmt::format("forward: bidirectional group {}..{} is outside the chunk {}..{}",
                                      g.bidir_begin, g.bidir_end - 1, g.pos0, g.pos0 + n - 1));
  for (int t = 0; t < n && !g.embeddings; ++t)
    if (g.ids[t] < 0 || g.ids[t] >= c.vocab_size)
      return invalid_argument(
          fmt::format("token id {} is outside the vocabulary [0, {})", g.ids[t], c.vocab_size));
  return ok_status();
}

using Emit = std::function<void(int layer, const char* name, const float* buf, int64_t count)>;

// The input rows of the step into s.x: the segments' token embeddings (or image rows). Never
// recorded: the ids change from step to step.
// Adjacent text segments are looked up in one embed call (a decode step: one for the whole
// batch).
void embed_rows(const ModelConfig& c, const BackendModel& w, Backend& be, std::span<const Segment> segs,
                ForwardScratch& s) {
  const int64_t H = c.hidden;
  std::vector<int32_t> ids;
  for (size_t i = 0; i < segs.size();) {
    const Segment& g = segs[i];
    if (g.embeddings) {
      be.from_host(g.embeddings, s.x + g.off * H, static_cast<uint64_t>(g.n) * H * sizeof(float));
      ++i;
      continue;
    }
    size_t j = i + 1;
    while (j < segs.size() && !segs[j].embeddings) ++j;
    const int32_t* run = g.ids;
    int n = g.n;
    if (j > i + 1) {
      ids.clear();
      for (size_t k = i; k < j; ++k) ids.insert(ids.end(), segs[k].ids, segs[k].ids + segs[k].n);
      run = ids.data();
      n = static_cast<int>(ids.size());
    }
    be.embed(*w.embed, run, n, embedding_scale(c.hidden), s.x + g.off * H);
    i = j;
  }
}

// The layers over the step's n rows of s.x (the segments, stacked), leaving every row's final
// norm in s.normed. pos_bound >= 0 (one segment, while recording): the position the ops get
// instead of the segment's (backend.h, recorded steps).
void run_layers(const ModelConfig& c, const BackendModel& w, Backend& be, std::span<const Segment> segs,
                int n, ForwardScratch& s, const Emit& emit, int pos_bound) {
  const int64_t H = c.hidden, I = c.intermediate, qw = c.q_width(), kvw = c.kv_width();
  const float eps = c.rms_norm_eps;
  // Each block's input norm comes from the step before it: layer 0's here, the others' (and
  // the final norm) from the residual step that ends the previous block (Backend::add_rmsnorm).
  be.rmsnorm(s.x, *w.layers[0].attn_norm, n, H, eps, s.normed);
  for (int l = 0; l < c.n_layers; ++l) {
    const BackendModel::Layer& L = w.layers[l];
    const bool global = c.is_global(l);

    // Attention block: (norm) -> q/k/v -> QK-norm + RoPE + cache write -> attention -> o ->
    // post-norm + residual + the MLP's norm. The projections run over every row of the step;
    // what reads or writes a sequence's cache runs per sequence.
    if (L.qkv) {
      float* const qkv[] = {s.q, s.k, s.v};
      be.matmul_parts(s.normed, n, *L.qkv, qkv);
    } else {
      be.matmul(s.normed, n, *L.q, s.q);
      be.matmul(s.normed, n, *L.k, s.k);
      be.matmul(s.normed, n, *L.v, s.v);
    }
    const float theta = global ? c.rope_theta_global : c.rope_theta_local;
    const float rope_scale = global ? c.rope_scale_global : 1.0f;  // linear scaling: global layers only
    for (const Segment& g : segs)
      be.qk_norm_rope_kv_write(s.q + g.off * qw, s.k + g.off * kvw, s.v + g.off * kvw, *L.q_norm, *L.k_norm,
                               g.n, c.n_heads, c.n_kv_heads, c.head_dim, eps,
                               pos_bound >= 0 ? pos_bound : g.pos0, theta, rope_scale, g.kv->layers[l]);
    emit(l, "q", s.q, n * qw);
    emit(l, "k", s.k, n * kvw);
    emit(l, "v", s.v, n * kvw);
    for (const Segment& g : segs) {
      AttentionParams ap;
      ap.n_tokens = g.n;
      ap.pos0 = pos_bound >= 0 ? pos_bound : g.pos0;
      ap.n_heads = c.n_heads;
      ap.n_kv_heads = c.n_kv_heads;
      ap.head_dim = c.head_dim;
      ap.scale = c.attn_scale();
      ap.window = global ? 0 : c.sliding_window;
      ap.kv_start = g.kv_start;
      ap.bidir_begin = g.bidir_begin;
      ap.bidir_end = g.bidir_end;
      be.attention(s.q + g.off * qw, g.kv->layers[l], ap, s.attn + g.off * qw);
    }
    emit(l, "attn", s.attn, n * qw);
    be.matmul(s.attn, n, *L.o, s.a);
    be.add_rmsnorm(s.a, *L.post_attn_norm, s.x, L.ffn_norm.get(), n, static_cast<int>(H), eps, s.normed);
    emit(l, "attn_residual", s.x, n * H);

    // MLP block: (norm) -> GeGLU -> down -> post-norm + residual + the next block's norm (the
    // next layer's, or the final norm after the last layer).
    if (L.gate_up) {
      be.matmul_geglu(s.normed, n, *L.gate_up, s.up, s.gate);
    } else {
      be.matmul(s.normed, n, *L.gate, s.gate);
      be.matmul(s.normed, n, *L.up, s.up);
      be.gelu_gate(s.gate, s.up, n * I, s.gate);
    }
    be.matmul(s.gate, n, *L.down, s.a);
    const BackendWeight& next = l + 1 < c.n_layers ? *w.layers[l + 1].attn_norm : *w.final_norm;
    be.add_rmsnorm(s.a, *L.post_ffn_norm, s.x, &next, n, static_cast<int>(H), eps, s.normed);
    emit(l, "layer_out", s.x, n * H);
  }
}

}  // namespace

Status forward(const ModelConfig& c, const BackendModel& w, Backend& be, const KvView& kv, ForwardScratch& s,
               const ForwardRequest& req, float* logits_host, const ActivationHook* hook) {
  const int n = req.n;
  const Segment seg{&kv,           0, n, req.pos0, req.kv_start, req.bidir_begin, req.bidir_end, req.ids,
                    req.embeddings};
  GEMMA3_TRY(check_segment(c, seg));
  const std::span<const Segment> segs(&seg, 1);

  const int64_t H = c.hidden;
  std::vector<float> dump;
  const Emit emit = [&](int layer, const char* name, const float* buf, int64_t count) {
    if (!hook || !*hook) return;
    dump.resize(count);
    be.to_host(buf, dump.data(), count * sizeof(float));
    (*hook)(layer, name, dump.data(), count);
  };
  embed_rows(c, w, be, segs, s);
  emit(-1, "embed", s.x, n * H);

  // A step of a few tokens (decode) is recorded once per position bucket and then replayed,
  // when the backend records (the CUDA backend: one graph launch instead of ~200 kernel
  // launches). Positions are read from the step position; attention plans its key splits for
  // the bucket's end, a power of two, so a session makes about log2(context) recordings per
  // token count. Prefill chunks, images, activation hooks and all-row logits run directly.
  const bool record = be.can_record() && n <= kMaxRecordedTokens && !req.embeddings && !req.all_logits &&
                      req.bidir_begin == req.bidir_end && !(hook && *hook);
  if (record) {
    const int limit = req.kv_start + kv.context;
    const int bucket_end =
        std::min<int64_t>(limit, std::max<int64_t>(64, std::bit_ceil(uint32_t(req.pos0 + n))));
    auto [it, fresh] = s.recorded.try_emplace({kv.layers.data(), n, bucket_end, req.kv_start});
    std::unique_ptr<RecordedStep>& step = it->second;
    for (int attempt = 0; fresh && attempt < 2; ++attempt) {  // a second time after a workspace grew
      if (!be.begin_recording()) break;
      run_layers(c, w, be, segs, n, s, emit, bucket_end - n);
      be.matmul(s.normed + (n - 1) * H, 1, *w.embed, s.logits);
      bool again = false;
      GEMMA3_ASSIGN_OR_RETURN(step, be.end_recording(&again));
      if (!again) break;
    }
    if (step) {
      be.set_step_position(req.pos0);
      be.replay(*step);
      if (logits_host) be.to_host(s.logits, logits_host, static_cast<uint64_t>(c.vocab_size) * sizeof(float));
      return be.status();
    }
  }
  run_layers(c, w, be, segs, n, s, emit, -1);

  // The tied LM head, for the rows whose logits are wanted (s.normed holds every row's final norm).
  const int first = req.all_logits ? 0 : n - 1, rows = n - first;
  emit(-1, "final_norm", s.normed + first * H, rows * H);
  for (int r = 0; r < rows; r += ForwardScratch::kLogitRows) {
    const int m = std::min(ForwardScratch::kLogitRows, rows - r);
    be.matmul(s.normed + (first + r) * H, m, *w.embed, s.logits);
    if (logits_host)
      be.to_host(s.logits, logits_host + static_cast<int64_t>(r) * c.vocab_size,
                 static_cast<uint64_t>(m) * c.vocab_size * sizeof(float));
  }
  return be.status();
}

Status forward_batch(const ModelConfig& c, const BackendModel& w, Backend& be,
                     std::span<const ForwardSeq> seqs, ForwardScratch& s, float* logits_host) {
  if (seqs.empty()) return ok_status();
  if (static_cast<int>(seqs.size()) > s.logit_rows())
    return internal_error(fmt::format("forward_batch: {} sequences, but the scratch holds logits for {}",
                                      seqs.size(), s.logit_rows()));
  std::vector<Segment> segs;
  segs.reserve(seqs.size());
  int n = 0;
  for (const ForwardSeq& q : seqs) {
    segs.push_back({&q.kv, n, q.n, q.pos0, q.kv_start, q.bidir_begin, q.bidir_end, q.ids, q.embeddings});
    GEMMA3_TRY(check_segment(c, segs.back()));
    n += q.n;
  }
  if (n > s.chunk())
    return internal_error(fmt::format("forward_batch: {} tokens, but the scratch holds {}", n, s.chunk()));
  embed_rows(c, w, be, segs, s);
  run_layers(
      c, w, be, segs, n, s, [](int, const char*, const float*, int64_t) {}, -1);

  // The LM head over each run of wanted rows that are adjacent in the step and in s.logits (a
  // decode step: one run over every sequence).
  const int64_t H = c.hidden, V = c.vocab_size;
  for (size_t i = 0; i < seqs.size();) {
    if (!seqs[i].want_logits) {
      ++i;
      continue;
    }
    size_t j = i + 1;
    while (j < seqs.size() && seqs[j].want_logits && seqs[j].n == 1) ++j;
    const int last_row = segs[i].off + segs[i].n - 1;
    be.matmul(s.normed + last_row * H, static_cast<int>(j - i), *w.embed,
              s.logits + static_cast<int64_t>(i) * V);
    i = j;
  }
  if (logits_host) be.to_host(s.logits, logits_host, seqs.size() * static_cast<uint64_t>(V) * sizeof(float));
  return be.status();
}

}  // namespace gemma3
