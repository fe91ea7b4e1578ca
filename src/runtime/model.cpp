// Model and Session: the library's public face over Checkpoint + backend + forward().
#include <fmt/format.h>
#include <sys/stat.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <deque>
#include <mutex>
#include <string_view>
#include <unordered_map>

#include "backend/backend.h"
#include "checkpoint/weights.h"
#include "core/api_guard.h"
#include "gemma3/gemma3.h"
#include "gemma3/util.h"
#include "image/image.h"
#include "model/forward.h"
#include "model/vision.h"
#include "runtime/engine.h"
#include "runtime/memory_plan.h"
#include "runtime/token_stream.h"
#include "text/chat_template.h"

namespace gemma3 {
namespace {

using Clock = std::chrono::steady_clock;
double seconds_since(Clock::time_point t) { return std::chrono::duration<double>(Clock::now() - t).count(); }

class ModelImpl;

// One stretch of a prompt: text ids, or an image's N soft tokens (ids all image_token_id) with
// their embeddings [N, H], prefilled as one chunk with a bidirectional group.
struct Piece {
  Piece() = default;
  Piece(std::vector<int32_t> i, std::shared_ptr<const std::vector<float>> e, std::string k = {})
      : ids(std::move(i)), embeddings(std::move(e)), key(std::move(k)) {}
  std::vector<int32_t> ids;
  std::shared_ptr<const std::vector<float>> embeddings;
  std::string key;  // an image's: EncodedImage::key and its slot (the engine's prefix reuse)
};

// An image as the prompt shows it: the layout (one slot, or with Pan & Scan the original, its
// crops and the connecting text) and each slot's projected features [N, H].
struct EncodedImage {
  std::vector<vision::PromptPiece> layout;
  std::vector<std::shared_ptr<const std::vector<float>>> slots;
  std::string key;  // ImageCache's key: the content's identity
};

// Encoded images by content: file bytes hash + size + Pan & Scan flag (or the pixels' hash).
// At most kSize entries (~2.6 MB each for 4B), oldest evicted first. A session has its own; an
// engine has one for all its requests (under its own lock).
struct ImageCache {
  static constexpr size_t kSize = 16;
  std::unordered_map<std::string, std::shared_ptr<const EncodedImage>> map;
  std::deque<std::string> order;
  std::shared_ptr<const EncodedImage> find(const std::string& key) const {
    auto it = map.find(key);
    return it == map.end() ? nullptr : it->second;
  }
  void remember(const std::string& key, std::shared_ptr<const EncodedImage> image) {
    if (map.count(key)) return;
    if (map.size() >= kSize) {
      map.erase(order.front());
      order.pop_front();
    }
    map[key] = std::move(image);
    order.push_back(key);
  }
};

class SessionImpl final : public Session {
 public:
  SessionImpl(std::shared_ptr<ModelImpl> model, KvPlan plan);
  ~SessionImpl() override;
  Status init();

  Status feed_tokens(const std::vector<int32_t>& ids) override;
  Status feed_text(const std::string& text) override;
  Status feed_chat(const std::vector<ChatMessage>& messages) override;
  Status feed_image(const std::string& path) override;
  Status feed_image_pixels(const std::vector<float>& pixels) override;
  Result<GenerateResult> generate(const GenerateOptions& options,
                                  const std::function<bool(const TokenEvent&)>& on_token) override;
  Result<std::vector<float>> score(const std::vector<int32_t>& continuation) override;
  std::span<const float> last_logits() const override {
    fetch_logits();
    return last_logits_;
  }
  void keep_all_logits(bool keep) override { keep_all_ = keep; }
  std::span<const float> all_logits() const override { return all_logits_; }
  int position() const override { return static_cast<int>(tokens_.size()); }
  int context_length() const override { return cache_.plan().context; }
  void clear() override {
    tokens_.clear();
    in_model_turn_ = false;
    stats_ = {};
  }
  const Stats& stats() const override { return stats_; }
  void set_activation_hook(ActivationHook hook) override { hook_ = std::move(hook); }
  MemoryReport memory() const override;
  const std::vector<int32_t>& tokens() const override { return tokens_; }
  Result<int> feed_chat_truncating(std::vector<ChatMessage>& messages, int reserve) override;
  Status save_state(const std::string& path) const override;
  Status load_state(const std::string& path) override;
  Status feed_image_bytes(std::string_view bytes) override;
  Result<std::string> save_state_to_memory() const override;
  Status load_state_from_memory(std::string_view bytes) override;
  Result<std::unique_ptr<Session>> fork() const override;

 private:
  SessionState state_for_save(std::string fingerprint) const;
  void adopt(SessionState&& st);
  Status run(const std::vector<int32_t>& ids, bool keep_all) {
    return run_pieces({Piece{ids, nullptr}}, keep_all);
  }
  // Prefills pieces in order: text in chunks, each image block as one chunk. With keep_all,
  // all_logits_ holds every position of all pieces. Without logits_to_host (a decode step) the
  // last logits stay in scratch_.logits (logits_on_device_) until fetch_logits().
  Status run_pieces(const std::vector<Piece>& pieces, bool keep_all, bool logits_to_host = true);
  // last_logits_ = scratch_.logits when a decode step left them in backend memory.
  void fetch_logits() const;
  Status feed_pieces(const std::vector<Piece>& pieces);  // run_pieces + prompt stats
  // One encoded image's pieces fed (<bos> first on an empty context).
  Status feed_image_pieces(const EncodedImage& image);
  const ActivationHook* hook() const { return hook_ ? &hook_ : nullptr; }

  ImageCache image_cache_;

  std::shared_ptr<ModelImpl> model_;
  // Held from ~SessionImpl's body until cache_ and scratch_ (declared after it, so destroyed
  // before it) have released their backend memory under the model's backend lock.
  std::unique_lock<std::mutex> teardown_lock_;
  KvCache cache_;
  ForwardScratch scratch_;
  std::vector<int32_t> tokens_;  // everything in the context, in order
  // last_logits_ is stale while logits_on_device_ (fetch_logits() copies on demand): mutable,
  // since last_logits() is const; a Session is used by one thread at a time (gemma3.h).
  mutable std::vector<float> last_logits_;
  mutable bool logits_on_device_ = false;
  std::vector<float> all_logits_;
  bool keep_all_ = false;
  bool in_model_turn_ = false;  // the context ends inside a model turn (after feed_chat)
  Stats stats_;
  ActivationHook hook_;
};

// The public Session: every fallible call goes through api_guard, so nothing thrown inside
// (or by the caller's on_token callback) escapes the library.
class GuardedSession final : public Session {
 public:
  explicit GuardedSession(std::unique_ptr<SessionImpl> s) : s_(std::move(s)) {}

  Status feed_tokens(const std::vector<int32_t>& ids) override {
    return api_guard("feed_tokens", [&] { return s_->feed_tokens(ids); });
  }
  Status feed_text(const std::string& text) override {
    return api_guard("feed_text", [&] { return s_->feed_text(text); });
  }
  Status feed_chat(const std::vector<ChatMessage>& messages) override {
    return api_guard("feed_chat", [&] { return s_->feed_chat(messages); });
  }
  Status feed_image(const std::string& path) override {
    return api_guard("feed_image", [&] { return s_->feed_image(path); });
  }
  Status feed_image_pixels(const std::vector<float>& pixels) override {
    return api_guard("feed_image_pixels", [&] { return s_->feed_image_pixels(pixels); });
  }
  Result<GenerateResult> generate(const GenerateOptions& options,
                                  const std::function<bool(const TokenEvent&)>& on_token) override {
    return api_guard("generate", [&] { return s_->generate(options, on_token); });
  }
  Result<std::vector<float>> score(const std::vector<int32_t>& continuation) override {
    return api_guard("score", [&] { return s_->score(continuation); });
  }
  std::span<const float> last_logits() const override { return s_->last_logits(); }
  void keep_all_logits(bool keep) override { s_->keep_all_logits(keep); }
  std::span<const float> all_logits() const override { return s_->all_logits(); }
  int position() const override { return s_->position(); }
  int context_length() const override { return s_->context_length(); }
  void clear() override { s_->clear(); }
  const Stats& stats() const override { return s_->stats(); }
  void set_activation_hook(ActivationHook hook) override { s_->set_activation_hook(std::move(hook)); }
  MemoryReport memory() const override { return s_->memory(); }
  const std::vector<int32_t>& tokens() const override { return s_->tokens(); }
  Result<int> feed_chat_truncating(std::vector<ChatMessage>& messages, int reserve) override {
    return api_guard("feed_chat_truncating", [&] { return s_->feed_chat_truncating(messages, reserve); });
  }
  Status save_state(const std::string& path) const override {
    return api_guard("save_state", [&] { return s_->save_state(path); });
  }
  Status load_state(const std::string& path) override {
    return api_guard("load_state", [&] { return s_->load_state(path); });
  }
  Status feed_image_bytes(std::string_view bytes) override {
    return api_guard("feed_image_bytes", [&] { return s_->feed_image_bytes(bytes); });
  }
  Result<std::string> save_state_to_memory() const override {
    return api_guard("save_state_to_memory", [&] { return s_->save_state_to_memory(); });
  }
  Status load_state_from_memory(std::string_view bytes) override {
    return api_guard("load_state_from_memory", [&] { return s_->load_state_from_memory(bytes); });
  }
  Result<std::unique_ptr<Session>> fork() const override {
    return api_guard("fork", [&] { return s_->fork(); });
  }

 private:
  std::unique_ptr<SessionImpl> s_;
};

// ModelInfo of an open checkpoint with a memory plan (inspect, Model::info).
ModelInfo describe(const Checkpoint& ckpt, const MemoryPlan& plan) {
  const ModelConfig& c = ckpt.config();
  ModelInfo m;
  m.path = ckpt.path();
  m.format = ckpt.format();
  m.size_label = c.size_label;
  m.base_model = c.base_model;
  m.has_vision = c.has_vision || ckpt.vision() != nullptr;
  m.n_layers = c.n_layers, m.hidden = c.hidden, m.intermediate = c.intermediate;
  m.n_heads = c.n_heads, m.n_kv_heads = c.n_kv_heads, m.head_dim = c.head_dim;
  m.vocab_size = c.vocab_size, m.sliding_window = c.sliding_window, m.max_context = c.max_context;
  for (int i = 0; i < c.n_layers; ++i) m.layer_pattern += c.is_global(i) ? 'G' : 'L';
  m.rope_theta_local = c.rope_theta_local, m.rope_theta_global = c.rope_theta_global;
  m.rope_scale_global = c.rope_scale_global, m.query_pre_attn_scalar = c.query_pre_attn_scalar;
  m.attention_scale = c.attn_scale(), m.rms_norm_eps = c.rms_norm_eps;
  m.tokenizer_size = ckpt.tokenizer().n_vocab(), m.bos_id = c.bos_id;
  m.eos_ids.assign(c.eos_ids.begin(), c.eos_ids.end());
  for (const TensorView* t : ckpt.text_tensors())
    m.tensors.push_back({t->name, dtype_name(t->dtype), t->shape, t->nbytes});
  m.weight_bytes = ckpt.weight_bytes();
  m.memory = plan.report();
  return m;
}

class ModelImpl final : public Model, public std::enable_shared_from_this<ModelImpl> {
 public:
  std::unique_ptr<Checkpoint> ckpt;
  std::unique_ptr<Backend> backend;
  BackendModel weights;
  LoadOptions options;
  int context = 0;
  MemoryPlan plan;  // one session's memory, checked against the backend before uploading
  std::unique_ptr<VisionEncoder> vision;  // null without a vision tower
  ModelInfo info_;                        // describe(*ckpt, plan), made at load
  // The backend serves one caller at a time: its stream, error state, scratch buffers and
  // thread pool (and the vision encoder's buffers) are shared by every session. Sessions take
  // this lock around each forward step, image encode, state copy, allocation and release, so
  // sessions on different threads interleave step by step and each computes exactly what it
  // would alone (gemma3.h states the contract).
  std::mutex backend_mutex;

  const Tokenizer& tokenizer() const override { return ckpt->tokenizer(); }
  const ModelInfo& info() const override { return info_; }
  int context_length() const override { return context; }
  int vocab_size() const override { return ckpt->config().vocab_size; }
  std::string description() const override {
    const ModelConfig& c = ckpt->config();
    return fmt::format("Gemma 3 {} ({} layers, hidden {}, {} from {}), backend {}, context {}", c.size_label,
                       c.n_layers, c.hidden, ckpt->format(), ckpt->path(), backend->name(), context);
  }
  MemoryReport memory_plan() const override { return plan.report(); }
  double copy_bandwidth() override {
    try {  // nothing thrown leaves the API: a failed host allocation measures nothing
      std::lock_guard<std::mutex> lock(backend_mutex);
      return backend->copy_bandwidth();
    } catch (...) {
      return 0;
    }
  }
  double gemm_rate(int64_t m, int64_t n, int64_t k) override {
    try {
      std::lock_guard<std::mutex> lock(backend_mutex);
      return backend->gemm_rate(m, n, k);
    } catch (...) {
      return 0;
    }
  }
  int image_size() const override { return vision ? vision->image_size() : 0; }
  bool is_base_model() const override { return ckpt->config().base_model; }
  // Ids generate may produce and score takes: not past the tokenizer (padding rows,
  // <image_soft_token> = 262144) nor the image soft token.
  int n_text_ids() const {
    const ModelConfig& c = ckpt->config();
    return std::min(c.vocab_size, std::min(tokenizer().n_vocab(), c.image_token_id));
  }
  using Model::new_session;
  Result<std::unique_ptr<Session>> new_session(const SessionOptions& so) override {
    return api_guard("new_session", [&]() -> Result<std::unique_ptr<Session>> {
      const int max = ckpt->config().max_context;
      if (so.context < 0 || so.context > max)
        return invalid_argument(
            fmt::format("SessionOptions::context is {}; it must be in [0, {}] (0: the model's {}; {}: the "
                        "checkpoint's maximum)",
                        so.context, max, context, max));
      GEMMA3_ASSIGN_OR_RETURN(auto s, make_session(so.context ? so.context : context));
      return std::unique_ptr<Session>(std::make_unique<GuardedSession>(std::move(s)));
    });
  }
  Result<std::unique_ptr<SessionImpl>> make_session(int session_context) {
    auto s = std::make_unique<SessionImpl>(
        shared_from_this(),
        plan_kv(ckpt->config(), session_context, options.prefill_chunk, kv_dtype(options.kv_type)));
    GEMMA3_TRY(s->init());
    return s;
  }
  // The fingerprint a prompt cache is checked against: hashes every byte of every tensor, so
  // it is computed once, on the first save_state/load_state, never at load.
  const std::string& fingerprint() {
    std::call_once(fingerprint_once_, [this] { fingerprint_ = model_fingerprint(*ckpt); });
    return fingerprint_;
  }

 private:
  std::once_flag fingerprint_once_;
  std::string fingerprint_;
};

SessionImpl::SessionImpl(std::shared_ptr<ModelImpl> model, KvPlan plan)
    : model_(std::move(model)), cache_(*model_->backend, std::move(plan)), scratch_(*model_->backend) {}

SessionImpl::~SessionImpl() { teardown_lock_ = std::unique_lock<std::mutex>(model_->backend_mutex); }

Status SessionImpl::init() {
  std::lock_guard<std::mutex> lock(model_->backend_mutex);
  GEMMA3_TRY(cache_.allocate(model_->ckpt->config()));
  return scratch_.allocate(model_->ckpt->config(), cache_.plan().chunk);
}

MemoryReport SessionImpl::memory() const {
  MemoryReport r;
  r.weight_bytes = model_->plan.weight_bytes;
  r.kv_global_bytes = cache_.allocated_global_bytes();
  r.kv_local_bytes = cache_.allocated_local_bytes();
  r.scratch_bytes = scratch_.bytes();
  return r;
}

Result<int> SessionImpl::feed_chat_truncating(std::vector<ChatMessage>& messages, int reserve) {
  const int ctx = cache_.plan().context;
  int dropped = 0;
  while (true) {
    std::vector<size_t> slots;
    GEMMA3_ASSIGN_OR_RETURN(std::vector<int32_t> ids,
                            render_chat(model_->tokenizer(), messages, /*add_bos=*/true,
                                        /*add_generation_prompt=*/true, &slots));
    // Without images the rendered ids are exact; image blocks add tokens only feeding knows (Pan &
    // Scan crops), so then the conversation is fed and checked.
    if (ids.size() + static_cast<size_t>(std::max(reserve, 0)) <= static_cast<size_t>(ctx)) {
      clear();
      Status fed = slots.empty() ? feed_tokens(ids) : feed_chat(messages);
      if (fed.ok() && position() + std::max(reserve, 0) <= ctx) {
        in_model_turn_ = true;
        return dropped;
      }
      clear();
      if (!fed.ok() && fed.code() != ErrorCode::kOutOfRange) return fed;
    }
    size_t first = 0;  // the oldest non-system message
    while (first < messages.size() && messages[first].role == "system") ++first;
    if (messages.size() - first <= 1)
      return out_of_range(
          fmt::format("the last message needs {} tokens and {} are kept for the reply, but the context holds "
                      "{}; raise LoadOptions::context",
                      ids.size(), reserve, ctx));
    // Drop it, and any model replies after it, so the conversation still opens with a user turn.
    do {
      messages.erase(messages.begin() + static_cast<std::ptrdiff_t>(first));
      ++dropped;
    } while (messages.size() - first > 1 && messages[first].role != "user");
  }
}

SessionState SessionImpl::state_for_save(std::string fingerprint) const {
  SessionState st;
  st.fingerprint = std::move(fingerprint);
  st.tokens = tokens_;
  st.in_model_turn = in_model_turn_;
  fetch_logits();
  st.last_logits = last_logits_;
  return st;
}

// A checked state replaces the context (the K/V are already in the cache).
void SessionImpl::adopt(SessionState&& st) {
  clear();
  tokens_ = std::move(st.tokens);
  in_model_turn_ = st.in_model_turn;
  last_logits_ = std::move(st.last_logits);
  logits_on_device_ = false;
  all_logits_.clear();
}

Status SessionImpl::save_state(const std::string& path) const {
  const SessionState st = state_for_save(model_->fingerprint());
  std::lock_guard<std::mutex> lock(model_->backend_mutex);
  return save_session_state(path, st, *model_->backend, cache_);
}

Status SessionImpl::load_state(const std::string& path) {
  SessionState st;
  st.fingerprint = model_->fingerprint();
  {
    std::lock_guard<std::mutex> lock(model_->backend_mutex);
    GEMMA3_TRY(load_session_state(path, model_->vocab_size(), &st, *model_->backend, cache_));
  }
  adopt(std::move(st));
  return ok_status();
}

Result<std::string> SessionImpl::save_state_to_memory() const {
  const SessionState st = state_for_save(model_->fingerprint());
  std::lock_guard<std::mutex> lock(model_->backend_mutex);
  std::string bytes = session_state_bytes(st, *model_->backend, cache_);
  GEMMA3_TRY(model_->backend->status());
  return bytes;
}

Status SessionImpl::load_state_from_memory(std::string_view bytes) {
  SessionState st;
  st.fingerprint = model_->fingerprint();
  {
    std::lock_guard<std::mutex> lock(model_->backend_mutex);
    GEMMA3_TRY(
        restore_session_state(bytes, "session state", model_->vocab_size(), &st, *model_->backend, cache_));
  }
  adopt(std::move(st));
  return ok_status();
}

// Through the state format in memory, without the model fingerprint (both sessions share the
// model, and hashing every weight byte would cost more than the copy).
Result<std::unique_ptr<Session>> SessionImpl::fork() const {
  constexpr const char* kSameModel = "fork";
  const SessionState st = state_for_save(kSameModel);
  std::string bytes;
  {
    std::lock_guard<std::mutex> lock(model_->backend_mutex);
    bytes = session_state_bytes(st, *model_->backend, cache_);
    GEMMA3_TRY(model_->backend->status());
  }
  GEMMA3_ASSIGN_OR_RETURN(std::unique_ptr<SessionImpl> copy, model_->make_session(cache_.plan().context));
  SessionState got;
  got.fingerprint = kSameModel;
  {
    std::lock_guard<std::mutex> lock(model_->backend_mutex);
    GEMMA3_TRY(
        restore_session_state(bytes, "fork", model_->vocab_size(), &got, *model_->backend, copy->cache_));
  }
  copy->adopt(std::move(got));
  copy->stats_ = stats_;
  return std::unique_ptr<Session>(std::make_unique<GuardedSession>(std::move(copy)));
}

void SessionImpl::fetch_logits() const {
  if (!logits_on_device_) return;
  std::lock_guard<std::mutex> lock(model_->backend_mutex);
  model_->backend->to_host(scratch_.logits, last_logits_.data(), last_logits_.size() * sizeof(float));
  logits_on_device_ = false;
}

Status SessionImpl::run_pieces(const std::vector<Piece>& pieces, bool keep_all, bool logits_to_host) {
  const ModelConfig& c = model_->ckpt->config();
  const int ctx = cache_.plan().context;
  size_t total = 0;
  for (const Piece& p : pieces) total += p.ids.size();
  if (total == 0) return ok_status();
  if (tokens_.size() + total > static_cast<size_t>(ctx))
    return out_of_range(
        fmt::format("the prompt needs {} tokens but the context holds {} ({} already used); "
                    "raise LoadOptions::context (the model allows up to {})",
                    total, ctx, tokens_.size(), c.max_context));
  const int chunk = cache_.plan().chunk;
  const int64_t V = c.vocab_size;
  for (const Piece& p : pieces)
    if (p.embeddings && static_cast<int>(p.ids.size()) > chunk)
      return invalid_argument(fmt::format(
          "an image is {} soft tokens, but the prefill chunk is {}: an image must be prefilled in one "
          "chunk (its tokens attend to each other); raise LoadOptions::prefill_chunk to at least {}",
          p.ids.size(), chunk, p.ids.size()));
  if (keep_all) all_logits_.assign(total * V, 0.0f);
  last_logits_.resize(V);
  logits_on_device_ = false;
  const bool to_host = logits_to_host || keep_all;
  ActivationHook* hook = hook_ ? &hook_ : nullptr;
  size_t row = 0;  // logit row of the next token
  auto step = [&](const int32_t* ids, int n, const float* embeddings) -> Status {
    ForwardRequest req;
    req.ids = ids;
    req.n = n;
    req.pos0 = static_cast<int>(tokens_.size());
    req.all_logits = keep_all;
    if (embeddings) {  // an image: one chunk, its soft tokens see each other
      req.embeddings = embeddings;
      req.bidir_begin = req.pos0;
      req.bidir_end = req.pos0 + n;
    }
    float* dst = keep_all ? all_logits_.data() + row * V : to_host ? last_logits_.data() : nullptr;
    {
      std::lock_guard<std::mutex> lock(model_->backend_mutex);
      GEMMA3_TRY(forward(c, model_->weights, *model_->backend, cache_.view(), scratch_, req, dst, hook));
    }
    tokens_.insert(tokens_.end(), ids, ids + n);
    row += n;
    return ok_status();
  };
  for (size_t i = 0; i < pieces.size();) {
    if (pieces[i].embeddings) {
      const Piece& p = pieces[i++];
      GEMMA3_TRY(step(p.ids.data(), static_cast<int>(p.ids.size()), p.embeddings->data()));
      continue;
    }
    // Consecutive text pieces go through together, in chunks.
    std::vector<int32_t> text;
    for (; i < pieces.size() && !pieces[i].embeddings; ++i)
      text.insert(text.end(), pieces[i].ids.begin(), pieces[i].ids.end());
    for (size_t off = 0; off < text.size(); off += chunk)
      GEMMA3_TRY(
          step(text.data() + off, static_cast<int>(std::min<size_t>(chunk, text.size() - off)), nullptr));
  }
  if (keep_all) std::copy(all_logits_.end() - V, all_logits_.end(), last_logits_.begin());
  logits_on_device_ = !to_host;
  return ok_status();
}

Status SessionImpl::feed_pieces(const std::vector<Piece>& pieces) {
  const auto t0 = Clock::now();
  GEMMA3_TRY(run_pieces(pieces, keep_all_));
  for (const Piece& p : pieces) stats_.prompt_tokens += static_cast<int>(p.ids.size());
  stats_.prefill_seconds += seconds_since(t0);
  return ok_status();
}

// ---- images: shared by sessions and the engine (EngineHost::render_chat_images) ----
// `hook` (may be null) sees the vision tower's activations; `stats` (may be null) counts images
// and encode time.

Status check_vision(const ModelImpl& m) {
  if (!m.vision)
    return unsupported(fmt::format(
        "{} has no vision tower, so it cannot take images; use a multimodal checkpoint (4B, 12B, 27B) or "
        "attach its projector (LoadOptions::mmproj)",
        m.ckpt->path()));
  return ok_status();
}

Result<std::shared_ptr<const std::vector<float>>> encode_pixels(ModelImpl& m,
                                                                const std::vector<float>& pixels,
                                                                const ActivationHook* hook, Stats* stats) {
  VisionEncoder& enc = *m.vision;
  const int S = enc.image_size();
  if (pixels.size() != static_cast<size_t>(3) * S * S)
    return invalid_argument(fmt::format("image pixels: got {} floats, expected 3 x {} x {} = {}",
                                        pixels.size(), S, S, 3 * S * S));
  auto out =
      std::make_shared<std::vector<float>>(static_cast<size_t>(enc.tokens_per_image()) * enc.text_hidden());
  const auto t0 = Clock::now();
  {
    std::lock_guard<std::mutex> lock(m.backend_mutex);
    GEMMA3_TRY(enc.encode(pixels.data(), out->data(), hook));
  }
  if (stats) {
    stats->image_encode_seconds += seconds_since(t0);
    ++stats->images_encoded;
  }
  return std::shared_ptr<const std::vector<float>>(std::move(out));
}

// An encoded image file's bytes (name: for errors), or the cached encoding of the same bytes;
// t0: when the work for it began.
Result<std::shared_ptr<const EncodedImage>> encode_bytes(ModelImpl& m, ImageCache& cache,
                                                         std::string_view bytes, const std::string& name,
                                                         Clock::time_point t0, const ActivationHook* hook,
                                                         Stats* stats) {
  const vision::ImageLimits limits;
  GEMMA3_TRY(vision::check_image_file_size(bytes.size(), name, limits));
  const uint64_t size = bytes.size();
  const bool pan_scan = m.options.pan_and_scan;
  const std::string key =
      fmt::format("file:{:016x}:{}:{}", std::hash<std::string_view>{}(bytes), size, pan_scan);
  if (auto hit = cache.find(key)) return hit;

  const std::span<const uint8_t> span(reinterpret_cast<const uint8_t*>(bytes.data()), bytes.size());
  GEMMA3_ASSIGN_OR_RETURN(vision::Image image, vision::decode_image(span, name, limits));
  std::vector<vision::Image> views;  // slot 0: the whole image, then the Pan & Scan crops
  if (pan_scan)
    for (const vision::CropBox& box : vision::pan_and_scan_boxes(image.width, image.height))
      views.push_back(vision::crop(image, box));
  auto encoded = std::make_shared<EncodedImage>();
  encoded->layout = vision::pan_and_scan_prompt(static_cast<int>(views.size()));
  encoded->key = key;
  views.insert(views.begin(), std::move(image));
  vision::PreprocessOptions pre;
  pre.size = m.vision->image_size();
  const double decode_seconds = seconds_since(t0);
  for (const vision::Image& v : views) {
    GEMMA3_ASSIGN_OR_RETURN(auto features, encode_pixels(m, vision::preprocess(v, pre), hook, stats));
    encoded->slots.push_back(std::move(features));
  }
  if (stats) stats->image_encode_seconds += decode_seconds;
  cache.remember(key, encoded);
  return std::shared_ptr<const EncodedImage>(std::move(encoded));
}

// Decodes, preprocesses and encodes a file (or takes it from the cache).
Result<std::shared_ptr<const EncodedImage>> encode_file(ModelImpl& m, ImageCache& cache,
                                                        const std::string& path, const ActivationHook* hook,
                                                        Stats* stats) {
  const auto t0 = Clock::now();
  // Read the bytes once: they are the cache key and the decoder's input. A regular file only,
  // checked against the size limit before it is read (vision::check_image_file_size's error).
  const vision::ImageLimits limits;
  struct stat st {};
  if (::stat(path.c_str(), &st) == 0 && S_ISREG(st.st_mode))
    GEMMA3_TRY(vision::check_image_file_size(static_cast<uint64_t>(st.st_size), path, limits));
  GEMMA3_ASSIGN_OR_RETURN(
      const std::string bytes,
      read_file_limited(path, limits.max_file_bytes, "image", FileKind::kRegular, ErrorCode::kInvalidFile));
  return encode_bytes(m, cache, bytes, path, t0, hook, stats);
}

// The pieces of one image: "\n\n" <boi> | N soft tokens | <eoi> "\n\n" per slot (+ text).
Result<std::vector<Piece>> image_pieces(const ModelImpl& m, const EncodedImage& image, Stats* stats) {
  const ModelConfig& c = m.ckpt->config();
  const Tokenizer& tok = m.tokenizer();
  // <start_of_image>/<end_of_image>: the tokenizer's pieces (a GGUF carries no boi/eoi keys),
  // else the config's ids.
  const int32_t boi = tok.find("<start_of_image>").value_or(c.boi_id);
  const int32_t eoi = tok.find("<end_of_image>").value_or(c.eoi_id);
  if (boi < 0 || boi >= c.vocab_size || eoi < 0 || eoi >= c.vocab_size)
    return unsupported(
        fmt::format("the vocabulary has no <start_of_image>/<end_of_image> tokens (ids {}, {})", boi, eoi));
  GEMMA3_ASSIGN_OR_RETURN(std::vector<int32_t> nl, tok.encode("\n\n"));
  std::vector<Piece> pieces;
  for (const vision::PromptPiece& lp : image.layout) {
    if (lp.image < 0) {
      GEMMA3_ASSIGN_OR_RETURN(std::vector<int32_t> ids, tok.encode(lp.text));
      pieces.push_back({std::move(ids), nullptr});
      continue;
    }
    if (lp.image >= static_cast<int>(image.slots.size()))
      return internal_error(fmt::format("image layout names slot {} of {}", lp.image, image.slots.size()));
    // JAX-style explicit ids (docs/vision.md): "\n\n" <boi> N x <image_soft_token> <eoi> "\n\n".
    Piece open{nl, nullptr}, close{{eoi}, nullptr};
    open.ids.push_back(boi);
    close.ids.insert(close.ids.end(), nl.begin(), nl.end());
    const auto& feats = image.slots[lp.image];
    Piece soft{std::vector<int32_t>(feats->size() / c.hidden, c.image_token_id), feats,
               fmt::format("{}#{}", image.key, lp.image)};
    pieces.push_back(std::move(open));
    pieces.push_back(std::move(soft));
    pieces.push_back(std::move(close));
    if (stats) ++stats->images;
  }
  return pieces;
}

// Chat messages as pieces: `ids` (what comes before them), then the messages rendered
// (render_chat with the generation prompt), split where render_chat leaves image slots (at
// "<start_of_image>" markers, or before the text) with each image's block there: a message's
// files (ChatMessage::images), then its bytes (image_bytes), as gemma3.h says.
Result<std::vector<Piece>> chat_pieces(ModelImpl& m, ImageCache& cache, std::vector<int32_t> ids,
                                       const std::vector<ChatMessage>& messages, bool add_bos,
                                       const ActivationHook* hook, Stats* stats) {
  struct Source {
    const std::string* path;   // a file, or
    const std::string* bytes;  // a file's bytes,
    std::string name;          // named so in errors
  };
  std::vector<Source> sources;
  for (size_t i = 0; i < messages.size(); ++i) {
    const ChatMessage& msg = messages[i];
    if (msg.images.empty() && msg.image_bytes.empty()) continue;
    GEMMA3_TRY(check_vision(m));
    for (const std::string& path : msg.images) sources.push_back({&path, nullptr, path});
    for (size_t k = 0; k < msg.image_bytes.size(); ++k)
      sources.push_back({nullptr, &msg.image_bytes[k], fmt::format("image_bytes[{}] of message {}", k, i)});
  }
  std::vector<size_t> slots;
  GEMMA3_ASSIGN_OR_RETURN(std::vector<int32_t> turn, render_chat(m.tokenizer(), messages, add_bos,
                                                                 /*add_generation_prompt=*/true, &slots));
  const size_t offset = ids.size();
  ids.insert(ids.end(), turn.begin(), turn.end());
  if (slots.size() != sources.size()) return internal_error("chat: image slots and images differ in number");
  std::vector<Piece> pieces(1);
  size_t from = 0;
  for (size_t k = 0; k < slots.size(); ++k) {
    const size_t at = offset + slots[k];
    pieces.back().ids.insert(pieces.back().ids.end(), ids.begin() + from, ids.begin() + at);
    std::shared_ptr<const EncodedImage> image;
    if (sources[k].path) {
      GEMMA3_ASSIGN_OR_RETURN(image, encode_file(m, cache, *sources[k].path, hook, stats));
    } else {
      GEMMA3_ASSIGN_OR_RETURN(
          image, encode_bytes(m, cache, *sources[k].bytes, sources[k].name, Clock::now(), hook, stats));
    }
    GEMMA3_ASSIGN_OR_RETURN(std::vector<Piece> block, image_pieces(m, *image, stats));
    pieces.insert(pieces.end(), block.begin(), block.end());
    pieces.emplace_back();
    from = at;
  }
  pieces.back().ids.insert(pieces.back().ids.end(), ids.begin() + from, ids.end());
  return pieces;
}

Status SessionImpl::feed_image_pieces(const EncodedImage& image) {
  GEMMA3_ASSIGN_OR_RETURN(std::vector<Piece> pieces, image_pieces(*model_, image, &stats_));
  if (tokens_.empty()) pieces.insert(pieces.begin(), Piece{{model_->tokenizer().bos_id()}, nullptr});
  return feed_pieces(pieces);
}

Status SessionImpl::feed_image(const std::string& path) {
  GEMMA3_TRY(check_vision(*model_));
  GEMMA3_ASSIGN_OR_RETURN(auto image, encode_file(*model_, image_cache_, path, hook(), &stats_));
  return feed_image_pieces(*image);
}

Status SessionImpl::feed_image_bytes(std::string_view bytes) {
  GEMMA3_TRY(check_vision(*model_));
  GEMMA3_ASSIGN_OR_RETURN(
      auto image, encode_bytes(*model_, image_cache_, bytes, "image bytes", Clock::now(), hook(), &stats_));
  return feed_image_pieces(*image);
}

Status SessionImpl::feed_image_pixels(const std::vector<float>& pixels) {
  GEMMA3_TRY(check_vision(*model_));
  const std::string key = fmt::format("pixels:{:016x}:{}",
                                      std::hash<std::string_view>{}(std::string_view(
                                          reinterpret_cast<const char*>(pixels.data()), pixels.size() * 4)),
                                      pixels.size());
  std::shared_ptr<const EncodedImage> image = image_cache_.find(key);
  if (!image) {
    GEMMA3_ASSIGN_OR_RETURN(auto features, encode_pixels(*model_, pixels, hook(), &stats_));
    auto e = std::make_shared<EncodedImage>();
    e->layout = vision::pan_and_scan_prompt(0);
    e->slots.push_back(std::move(features));
    e->key = key;
    image_cache_.remember(key, e);
    image = std::move(e);
  }
  return feed_image_pieces(*image);
}

Status SessionImpl::feed_tokens(const std::vector<int32_t>& ids) {
  const auto t0 = Clock::now();
  GEMMA3_TRY(run(ids, keep_all_));
  stats_.prompt_tokens += static_cast<int>(ids.size());
  stats_.prefill_seconds += seconds_since(t0);
  return ok_status();
}

Status SessionImpl::feed_text(const std::string& text) {
  GEMMA3_ASSIGN_OR_RETURN(std::vector<int32_t> ids, model_->tokenizer().encode(text));
  if (tokens_.empty()) ids.insert(ids.begin(), model_->tokenizer().bos_id());
  return feed_tokens(ids);
}

Status SessionImpl::feed_chat(const std::vector<ChatMessage>& messages) {
  const Tokenizer& tok = model_->tokenizer();
  std::vector<int32_t> ids;
  if (in_model_turn_) {
    // Close the model's answer: "<end_of_turn>\n" (the stop token itself was never fed).
    if (tok.end_of_turn_id() < 0)
      return unsupported("this tokenizer has no <end_of_turn> token; chat needs one");
    ids.push_back(tok.end_of_turn_id());
    GEMMA3_ASSIGN_OR_RETURN(std::vector<int32_t> nl, tok.encode("\n"));
    ids.insert(ids.end(), nl.begin(), nl.end());
  }
  GEMMA3_ASSIGN_OR_RETURN(std::vector<Piece> pieces,
                          chat_pieces(*model_, image_cache_, std::move(ids), messages,
                                      /*add_bos=*/tokens_.empty(), hook(), &stats_));
  GEMMA3_TRY(feed_pieces(pieces));
  in_model_turn_ = true;
  return ok_status();
}

Result<GenerateResult> SessionImpl::generate(const GenerateOptions& o,
                                             const std::function<bool(const TokenEvent&)>& on_token) {
  if (tokens_.empty()) return invalid_argument("generate: the context is empty; feed a prompt first");
  GEMMA3_TRY(check_generate_options(o));
  const ModelConfig& c = model_->ckpt->config();
  // Only text ids (ModelImpl::n_text_ids), and never the image delimiters (as the JAX sampler
  // forbids them).
  const int n_allowed = model_->n_text_ids();
  const std::vector<int32_t> banned = {c.boi_id, c.eoi_id};
  // Each step's token is picked where the logits are (Backend::sample: on a GPU only the id comes
  // back), with this step's seed drawn from one generator, so a seeded run's tokens do not
  // depend on the backend.
  Backend& be = *model_->backend;
  std::mt19937_64 rng(o.sampling.seed);
  TokenStream stream(o, model_->tokenizer(), std::vector<int32_t>(c.eos_ids.begin(), c.eos_ids.end()),
                     n_allowed);
  std::vector<float> row;  // the step's logits on the host (logprobs)
  const int prompt_tokens = static_cast<int>(tokens_.size());

  const auto t0 = Clock::now();
  Status error;
  for (int n = 0; o.max_tokens < 0 || n < o.max_tokens; ++n) {
    if (o.cancel && o.cancel->load()) {
      stream.finish(FinishReason::kCancelled);
      break;
    }
    int32_t id = 0;
    {
      std::lock_guard<std::mutex> lock(model_->backend_mutex);
      // The logits of a feed (or a loaded state) are on the host: upload them once.
      if (!logits_on_device_)
        be.from_host(last_logits_.data(), scratch_.logits, size_t(n_allowed) * sizeof(float));
      if (stream.wants_logprobs()) {
        row.resize(static_cast<size_t>(n_allowed));
        be.to_host(scratch_.logits, row.data(), row.size() * sizeof(float));
      }
      id = be.sample(scratch_.logits, n_allowed, o.sampling, banned, tokens_, rng);
      error = be.status();
    }
    if (!error.ok()) break;
    if (!stream.accept(id, row.data(), on_token)) break;
    if (tokens_.size() >= static_cast<size_t>(cache_.plan().context)) {
      stream.finish(FinishReason::kContextFull);
      break;
    }
    error = run_pieces({Piece{{id}, nullptr}}, false, /*logits_to_host=*/false);
    if (!error.ok()) break;
  }
  stats_.generated_tokens += stream.result().tokens;
  stats_.decode_seconds += seconds_since(t0);
  if (!error.ok()) return error;
  stream.flush(on_token);
  GenerateResult result = stream.result();
  result.prompt_tokens = prompt_tokens;
  return result;
}

Result<std::vector<float>> SessionImpl::score(const std::vector<int32_t>& continuation) {
  if (tokens_.empty())
    return invalid_argument("score: the context is empty; feed at least <bos> before the scored tokens");
  const ModelConfig& c = model_->ckpt->config();
  const int n_allowed = model_->n_text_ids();
  for (size_t i = 0; i < continuation.size(); ++i)
    if (continuation[i] < 0 || continuation[i] >= n_allowed)
      return invalid_argument(
          fmt::format("score: token {} of the continuation is id {}, outside the text ids [0, {})", i,
                      continuation[i], n_allowed));
  if (tokens_.size() + continuation.size() > static_cast<size_t>(cache_.plan().context))
    return out_of_range(
        fmt::format("score: {} tokens after the {} in the context exceed its {}; raise "
                    "LoadOptions::context",
                    continuation.size(), tokens_.size(), cache_.plan().context));
  // In pieces of a few chunks, so that the kept logits stay small (64 rows: 64 MiB at 262K ids).
  constexpr size_t kPiece = 64;
  const size_t V = static_cast<size_t>(c.vocab_size);
  const std::span<const float> last = last_logits();
  std::vector<float> out, prev(last.begin(), last.end());  // the logits that predict the next token
  out.reserve(continuation.size());
  const auto t0 = Clock::now();
  for (size_t off = 0; off < continuation.size(); off += kPiece) {
    const std::vector<int32_t> piece(
        continuation.begin() + static_cast<std::ptrdiff_t>(off),
        continuation.begin() + static_cast<std::ptrdiff_t>(std::min(continuation.size(), off + kPiece)));
    GEMMA3_TRY(run(piece, /*keep_all=*/true));
    stats_.prompt_tokens += static_cast<int>(piece.size());
    for (size_t t = 0; t < piece.size(); ++t) {
      const float* l = t == 0 ? prev.data() : all_logits_.data() + (t - 1) * V;
      out.push_back(LogSoftmax(l, n_allowed)(piece[t]));
    }
    prev.assign(all_logits_.end() - static_cast<std::ptrdiff_t>(V), all_logits_.end());
  }
  all_logits_.clear();
  stats_.prefill_seconds += seconds_since(t0);
  return out;
}

}  // namespace

namespace {
Result<std::shared_ptr<Model>> load_model(const std::string& path, const LoadOptions& options);
}  // namespace

const char* version() { return GEMMA3_VERSION; }

const char* finish_reason_name(FinishReason reason) {
  switch (reason) {
    case FinishReason::kStopToken: return "stop_token";
    case FinishReason::kStopString: return "stop_string";
    case FinishReason::kMaxTokens: return "max_tokens";
    case FinishReason::kContextFull: return "context_full";
    case FinishReason::kCancelled: return "cancelled";
    case FinishReason::kCallback: return "callback";
  }
  return "?";
}

namespace {
Result<ModelInfo> inspect_checkpoint(const std::string& path, const PlanOptions& options) {
  GEMMA3_ASSIGN_OR_RETURN(std::unique_ptr<Checkpoint> ckpt, Checkpoint::open(path));
  const ModelConfig& c = ckpt->config();
  if (options.context < 0 || options.context > c.max_context)
    return out_of_range(
        fmt::format("PlanOptions::context is {}; it must be in [0, {}] (0: the model's maximum)",
                    options.context, c.max_context));
  if (options.prefill_chunk < 1 || options.prefill_chunk > 65536)
    return invalid_argument(
        fmt::format("PlanOptions::prefill_chunk is {}; it must be in [1, 65536]", options.prefill_chunk));
  if (options.sequences < 1 || options.sequences > 4096)
    return invalid_argument(
        fmt::format("PlanOptions::sequences is {}; it must be in [1, 4096]", options.sequences));
  if (options.kv_tokens < 0)
    return invalid_argument(fmt::format("PlanOptions::kv_tokens is {}; it must be >= 0", options.kv_tokens));
  GEMMA3_TRY(check_kv_type(c, options.kv_type));
  const MemoryPlan plan =
      plan_memory(c, ckpt->weight_bytes(), options.context ? options.context : c.max_context,
                  options.prefill_chunk, kv_dtype(options.kv_type), options.sequences, 0, options.kv_tokens);
  return describe(*ckpt, plan);
}
}  // namespace

Result<ModelInfo> inspect(const std::string& path, const PlanOptions& plan) {
  return api_guard("inspect", [&] { return inspect_checkpoint(path, plan); });
}

Result<Session::PromptCacheUse> Session::feed_tokens_with_state_file(const std::vector<int32_t>& ids,
                                                                     const std::string& state_file) {
  return api_guard("Session::feed_tokens_with_state_file", [&]() -> Result<PromptCacheUse> {
    PromptCacheUse use;
    clear();
    if (std::FILE* f = std::fopen(state_file.c_str(), "rb")) {
      std::fclose(f);
      const Status st = load_state(state_file);
      const std::vector<int32_t>& saved = tokens();
      if (st.ok() && saved.size() <= ids.size() && std::equal(saved.begin(), saved.end(), ids.begin())) {
        use.restored = saved.size();
      } else {
        use.not_reused = st.ok() ? "its tokens are not a prefix of this prompt" : st.to_string();
        clear();
      }
    }
    if (use.restored == ids.size() && use.restored > 0) return use;  // nothing new to feed or save
    GEMMA3_TRY(feed_tokens(
        std::vector<int32_t>(ids.begin() + static_cast<std::ptrdiff_t>(use.restored), ids.end())));
    GEMMA3_TRY(save_state(state_file));
    return use;
  });
}

// Here rather than in tokenizer.cpp: reading a checkpoint (weights.h) builds on the tokenizer.
Result<std::unique_ptr<Engine>> Engine::create(std::shared_ptr<Model> model, const EngineOptions& options) {
  return api_guard("Engine::create", [&]() -> Result<std::unique_ptr<Engine>> {
    auto* m = dynamic_cast<ModelImpl*>(model.get());
    if (!m) return invalid_argument("Engine::create: no model (load one with Model::load)");
    EngineHost h;
    h.config = &m->ckpt->config();
    h.weights = &m->weights;
    h.backend = m->backend.get();
    h.backend_mutex = &m->backend_mutex;
    h.tokenizer = &m->tokenizer();
    h.n_text_ids = m->n_text_ids();
    h.context = m->context;
    h.prefill_chunk = m->options.prefill_chunk;
    h.kv_dtype = kv_dtype(m->options.kv_type);
    // Images are encoded on the submitting thread, one request at a time, with one cache of
    // encoded images for every request (a chat resends its images each turn).
    struct Images {
      std::mutex mu;
      ImageCache cache;
    };
    h.render_chat_images = [m, images = std::make_shared<Images>()](
                               const std::vector<ChatMessage>& messages) -> Result<ImagePrompt> {
      std::lock_guard<std::mutex> lock(images->mu);
      GEMMA3_ASSIGN_OR_RETURN(std::vector<Piece> pieces, chat_pieces(*m, images->cache, {}, messages,
                                                                     /*add_bos=*/true, nullptr, nullptr));
      ImagePrompt prompt;
      for (Piece& p : pieces) {
        if (p.embeddings)
          prompt.images.push_back(
              {prompt.ids.size(), p.ids.size(), std::move(p.embeddings), std::move(p.key)});
        prompt.ids.insert(prompt.ids.end(), p.ids.begin(), p.ids.end());
      }
      return prompt;
    };
    h.owner = std::move(model);
    return make_engine(std::move(h), options);
  });
}

Result<Tokenizer> Tokenizer::from_checkpoint(const std::string& path) {
  return api_guard("Tokenizer::from_checkpoint", [&]() -> Result<Tokenizer> {
    GEMMA3_ASSIGN_OR_RETURN(std::unique_ptr<Checkpoint> ckpt, Checkpoint::open(path));
    return Tokenizer(ckpt->tokenizer());  // copies share the model (they outlive the checkpoint)
  });
}

Result<std::shared_ptr<Model>> Model::load(const std::string& path, const LoadOptions& options) {
  return api_guard("Model::load", [&] { return load_model(path, options); });
}

namespace {
Result<std::shared_ptr<Model>> load_model(const std::string& path, const LoadOptions& options) {
  auto m = std::make_shared<ModelImpl>();
  m->options = options;
  GEMMA3_ASSIGN_OR_RETURN(m->ckpt, Checkpoint::open(path));
  const ModelConfig& c = m->ckpt->config();
  if (options.context < 0)
    return invalid_argument(fmt::format("context {} must be positive", options.context));
  if (options.context > c.max_context)
    return out_of_range(
        fmt::format("context {} exceeds the model's maximum of {} tokens", options.context, c.max_context));
  if (options.threads < 0 || options.threads > kMaxThreads)
    return invalid_argument(fmt::format("LoadOptions::threads is {}; it must be in [0, {}] (0: one per core)",
                                        options.threads, kMaxThreads));
  if (options.prefill_chunk < 0 || options.prefill_chunk > 65536)
    return invalid_argument(
        fmt::format("LoadOptions::prefill_chunk is {}; it must be in [0, 65536] (0: the backend's choice)",
                    options.prefill_chunk));
  GEMMA3_TRY(check_kv_type(c, options.kv_type));
  // The vision tower + projector (HF multimodal folder, or --mmproj): checked now, uploaded below.
  if (!options.mmproj.empty()) GEMMA3_TRY(m->ckpt->attach_vision(options.mmproj));
  m->context = options.context ? options.context : std::min(c.max_context, 8192);
  BackendOptions bo;
  bo.threads = options.threads;
  bo.fp8_weights = options.fp8_weights;
  bo.batch_invariant = options.batch_invariant;
#if defined(GEMMA3_CUDA_EMU)
  // The CPU emulator of CUDA (docs/cuda.md) is a test device, ~1000x slower than the CPU
  // backend: only an explicit kCuda runs on it, so sanitized builds keep their CPU tests.
  constexpr bool kAutoMayPickCuda = false;
#else
  constexpr bool kAutoMayPickCuda = true;
#endif
  const bool cuda = options.backend == BackendKind::kCuda ||
                    (options.backend == BackendKind::kAuto && kAutoMayPickCuda && cuda_backend_available());
  if (options.fp8_weights && !cuda)
    return invalid_argument("LoadOptions::fp8_weights needs the CUDA backend; the CPU runs the stored types");
  if (options.batch_invariant && cuda)
    return invalid_argument(
        "LoadOptions::batch_invariant is a CPU backend option; the CUDA backend's decode and prefill paths "
        "differ "
        "(choose BackendKind::kCpu)");
  if (cuda) {
    GEMMA3_ASSIGN_OR_RETURN(m->backend, make_cuda_backend(bo));
  } else {
    GEMMA3_ASSIGN_OR_RETURN(m->backend, make_cpu_backend(bo));
  }
  // The backend's chunk: a GPU's GEMMs reach their rate past ~300-600 tokens (its ridge point,
  // docs/cuda.md "Prefill GEMM"); the CPU's are compute-bound from a few dozen.
  if (m->options.prefill_chunk == 0) m->options.prefill_chunk = cuda ? kCudaPrefillChunk : kCpuPrefillChunk;
  // Weights + one session's KV and scratch, checked before anything large is allocated.
  // Weight bytes as stored (fp8 weights only shrink them: the plan stays an upper bound), the
  // vision tower's included.
  uint64_t weight_bytes = m->ckpt->weight_bytes();
  if (const VisionWeights* vw = m->ckpt->vision())
    for (const TensorView* t : vw->all()) weight_bytes += t->nbytes;
  m->plan = plan_memory(c, weight_bytes, m->context, m->options.prefill_chunk, kv_dtype(options.kv_type));
  GEMMA3_TRY(check_fits(m->plan, m->backend->free_bytes(), m->backend->name()));
  m->info_ = describe(*m->ckpt, m->plan);
  GEMMA3_ASSIGN_OR_RETURN(m->weights,
                          BackendModel::upload(*m->backend, m->ckpt->weights(), options.progress));
  if (m->ckpt->vision()) {
    GEMMA3_ASSIGN_OR_RETURN(m->vision, VisionEncoder::create(*m->backend, *m->ckpt->vision()));
  }
  return std::shared_ptr<Model>(std::move(m));
}

}  // namespace

}  // namespace gemma3
