// Model and Session: the library's public face over Checkpoint + backend + forward().
#include <fmt/format.h>

#include <algorithm>
#include <chrono>

#include "backend/backend.h"
#include "gemma3/gemma3.h"
#include "model/chat_template.h"
#include "model/forward.h"
#include "model/sampler.h"
#include "model/weights.h"

namespace gemma3 {
namespace {

using Clock = std::chrono::steady_clock;
double seconds_since(Clock::time_point t) { return std::chrono::duration<double>(Clock::now() - t).count(); }

class ModelImpl;

class SessionImpl final : public Session {
 public:
  SessionImpl(std::shared_ptr<ModelImpl> model, KvPlan plan);
  Status init();

  Status feed_tokens(const std::vector<int32_t>& ids) override;
  Status feed_text(const std::string& text) override;
  Status feed_chat(const std::vector<ChatMessage>& messages) override;
  Status generate(const GenerateOptions& options,
                  const std::function<bool(const TokenEvent&)>& on_token) override;
  const std::vector<float>& last_logits() const override { return last_logits_; }
  void keep_all_logits(bool keep) override { keep_all_ = keep; }
  const std::vector<float>& all_logits() const override { return all_logits_; }
  int position() const override { return static_cast<int>(tokens_.size()); }
  void clear() override {
    tokens_.clear();
    in_model_turn_ = false;
    stats_ = {};
  }
  const Stats& stats() const override { return stats_; }
  void set_activation_hook(ActivationHook hook) override { hook_ = std::move(hook); }

 private:
  Status run(const std::vector<int32_t>& ids, bool keep_all);

  std::shared_ptr<ModelImpl> model_;
  KvCache cache_;
  ForwardScratch scratch_;
  std::vector<int32_t> tokens_;  // everything in the context, in order
  std::vector<float> last_logits_, all_logits_;
  bool keep_all_ = false;
  bool in_model_turn_ = false;  // the context ends inside a model turn (after feed_chat)
  Stats stats_;
  ActivationHook hook_;
};

class ModelImpl final : public Model, public std::enable_shared_from_this<ModelImpl> {
 public:
  std::unique_ptr<Checkpoint> ckpt;
  std::unique_ptr<Backend> backend;
  BackendModel weights;
  LoadOptions options;
  int context = 0;

  const Tokenizer& tokenizer() const override { return ckpt->tokenizer(); }
  int context_length() const override { return context; }
  int vocab_size() const override { return ckpt->config().vocab_size; }
  std::string description() const override {
    const ModelConfig& c = ckpt->config();
    return fmt::format("Gemma 3 {} ({} layers, hidden {}, {} from {}), backend {}, context {}", c.size_label,
                       c.n_layers, c.hidden, ckpt->format(), ckpt->path(), backend->name(), context);
  }
  Result<std::unique_ptr<Session>> new_session() override {
    const DType kv = options.kv_type == KvType::kF32 ? DType::kF32 : DType::kBF16;
    auto s = std::make_unique<SessionImpl>(shared_from_this(),
                                           plan_kv(ckpt->config(), context, options.prefill_chunk, kv));
    GEMMA3_TRY(s->init());
    return std::unique_ptr<Session>(std::move(s));
  }
};

SessionImpl::SessionImpl(std::shared_ptr<ModelImpl> model, KvPlan plan)
    : model_(std::move(model)), cache_(*model_->backend, std::move(plan)), scratch_(*model_->backend) {}

Status SessionImpl::init() {
  GEMMA3_TRY(cache_.allocate(model_->ckpt->config()));
  return scratch_.allocate(model_->ckpt->config(), cache_.plan().chunk);
}

Status SessionImpl::run(const std::vector<int32_t>& ids, bool keep_all) {
  const ModelConfig& c = model_->ckpt->config();
  const int ctx = cache_.plan().context;
  if (ids.empty()) return ok_status();
  if (tokens_.size() + ids.size() > static_cast<size_t>(ctx))
    return out_of_range(
        fmt::format("the prompt needs {} tokens but the context holds {} ({} already used); "
                    "raise --ctx (the model allows up to {})",
                    ids.size(), ctx, tokens_.size(), c.max_context));
  const int chunk = cache_.plan().chunk;
  const int64_t V = c.vocab_size;
  if (keep_all) all_logits_.assign(ids.size() * V, 0.0f);
  last_logits_.resize(V);
  ActivationHook* hook = hook_ ? &hook_ : nullptr;
  for (size_t off = 0; off < ids.size(); off += chunk) {
    ForwardRequest req;
    req.ids = ids.data() + off;
    req.n = static_cast<int>(std::min<size_t>(chunk, ids.size() - off));
    req.pos0 = static_cast<int>(tokens_.size());
    req.all_logits = keep_all;
    float* dst = keep_all ? all_logits_.data() + off * V : last_logits_.data();
    GEMMA3_TRY(forward(c, model_->weights, *model_->backend, cache_, scratch_, req, dst, hook));
    tokens_.insert(tokens_.end(), req.ids, req.ids + req.n);
  }
  if (keep_all) std::copy(all_logits_.end() - V, all_logits_.end(), last_logits_.begin());
  return ok_status();
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
  GEMMA3_ASSIGN_OR_RETURN(std::vector<int32_t> turn, render_chat(tok, messages, /*add_bos=*/tokens_.empty(),
                                                                 /*add_generation_prompt=*/true));
  ids.insert(ids.end(), turn.begin(), turn.end());
  GEMMA3_TRY(feed_tokens(ids));
  in_model_turn_ = true;
  return ok_status();
}

Status SessionImpl::generate(const GenerateOptions& o,
                             const std::function<bool(const TokenEvent&)>& on_token) {
  if (tokens_.empty()) return invalid_argument("generate: the context is empty; feed a prompt first");
  const ModelConfig& c = model_->ckpt->config();
  const Tokenizer& tok = model_->tokenizer();
  // Never produce ids past the tokenizer (padding rows, <image_soft_token> = 262144) nor the
  // image delimiters (as the JAX sampler forbids them).
  const int n_allowed = std::min(c.vocab_size, std::min(tok.n_vocab(), c.image_token_id));
  std::vector<int32_t> banned = {c.boi_id, c.eoi_id};
  Sampler sampler(o.sampling, n_allowed, banned);
  auto is_stop = [&](int32_t id) {
    return std::find(c.eos_ids.begin(), c.eos_ids.end(), id) != c.eos_ids.end();
  };

  // Text is held back while it could still be the start of a stop string.
  std::string pending;
  size_t longest_stop = 0;
  for (const auto& s : o.stop_strings) longest_stop = std::max(longest_stop, s.size());

  const auto t0 = Clock::now();
  Status result;
  for (int n = 0; o.max_tokens < 0 || n < o.max_tokens; ++n) {
    if (o.cancel && o.cancel->load()) {
      result = cancelled("generation cancelled");
      break;
    }
    const int32_t id = sampler.sample(last_logits_.data(), tokens_);
    if (is_stop(id)) break;
    pending += tok.decode(id);
    bool stop = false;
    size_t emit = pending.size();
    for (const auto& s : o.stop_strings) {
      if (s.empty()) continue;
      size_t at = pending.find(s);
      if (at != std::string::npos) {
        stop = true;
        emit = std::min(emit, at);
      }
    }
    if (!stop && longest_stop > 0)
      emit = pending.size() > longest_stop - 1 ? pending.size() - (longest_stop - 1) : 0;
    bool keep_going = true;
    if (emit > 0 || stop) {
      keep_going = on_token(TokenEvent{id, pending.substr(0, emit)});
      pending.erase(0, emit);
    }
    ++stats_.generated_tokens;
    if (stop || !keep_going) break;
    if (tokens_.size() >= static_cast<size_t>(cache_.plan().context)) {
      result = out_of_range(fmt::format("the context of {} tokens is full", cache_.plan().context));
      break;
    }
    Status s = run({id}, false);
    if (!s.ok()) {
      result = s;
      break;
    }
  }
  if (result.ok() && !pending.empty()) on_token(TokenEvent{-1, pending});
  stats_.decode_seconds += seconds_since(t0);
  return result;
}

}  // namespace

Result<std::shared_ptr<Model>> Model::load(const std::string& path, const LoadOptions& options) {
  auto m = std::make_shared<ModelImpl>();
  m->options = options;
  GEMMA3_ASSIGN_OR_RETURN(m->ckpt, Checkpoint::open(path));
  const ModelConfig& c = m->ckpt->config();
  if (options.context < 0)
    return invalid_argument(fmt::format("context {} must be positive", options.context));
  if (options.context > c.max_context)
    return out_of_range(
        fmt::format("context {} exceeds the model's maximum of {} tokens", options.context, c.max_context));
  if (options.prefill_chunk < 1 || options.prefill_chunk > 65536)
    return invalid_argument(fmt::format("prefill chunk {} must be in [1, 65536]", options.prefill_chunk));
  // The projector is loaded and checked now; encoding images comes with the vision issue.
  if (!options.mmproj.empty()) GEMMA3_TRY(m->ckpt->attach_vision(options.mmproj));
  m->context = options.context ? options.context : std::min(c.max_context, 8192);
  BackendOptions bo;
  bo.threads = options.threads;
  const bool cuda = options.backend == BackendKind::kCuda ||
                    (options.backend == BackendKind::kAuto && cuda_backend_available());
  if (cuda) {
    GEMMA3_ASSIGN_OR_RETURN(m->backend, make_cuda_backend(bo));
  } else {
    GEMMA3_ASSIGN_OR_RETURN(m->backend, make_cpu_backend(bo));
  }
  GEMMA3_ASSIGN_OR_RETURN(m->weights,
                          BackendModel::upload(*m->backend, m->ckpt->weights(), options.progress));
  return std::shared_ptr<Model>(std::move(m));
}

}  // namespace gemma3
