// Continuous batching (docs/batching.md): a step thread admits queued requests into free
// sequences and runs one forward_batch per step over one token of every decoding sequence plus
// prefill chunks of the others, up to EngineOptions::step_tokens; then samples each sequence
// whose last token's logits came out and passes the ids through that request's TokenStream.
// An image block (a prompt's soft tokens with the vision tower's rows) runs as one chunk of one
// step, as Session runs it (docs/batching.md, "Images").
#include "runtime/engine.h"

#include <fmt/format.h>

#include <algorithm>
#include <condition_variable>
#include <deque>
#include <exception>
#include <future>
#include <random>
#include <thread>
#include <unordered_set>
#include <utility>

#include "core/api_guard.h"
#include "runtime/kv_cache.h"
#include "runtime/memory_plan.h"
#include "runtime/token_stream.h"

namespace gemma3 {
namespace {

// The least a copy of another sequence's prefix must add to what a request's own sequence gives.
constexpr size_t kMinCopyTokens = 32;

struct Job {
  uint64_t id = 0;
  std::vector<int32_t> prompt;
  std::vector<PromptImage> images;  // the prompt's image blocks, in order
  GenerateOptions options;
  Engine::OnToken on_token;
  Engine::OnDone on_done;
  size_t prompt_tokens = 0;  // the request's prompt (GenerateResult::prompt_tokens)
  // Preempted (engine.h, "Paged KV"): `prompt` is then the prompt and the tokens generated so
  // far; the request goes on with its stream, sampler state and reused count.
  std::unique_ptr<TokenStream> stream;
  std::mt19937_64 rng;
  size_t reused = 0;
};

// One sequence: its KV memory and, while it holds a request, that request's progress.
struct Slot {
  std::unique_ptr<KvCache> cache;
  std::unique_ptr<Job> job;     // null: free
  std::vector<int32_t> tokens;  // the positions in the KV memory, in order
  // The image blocks of the request the KV memory is (or was) for; those inside `tokens` are
  // what its soft-token positions hold (prefix reuse compares them).
  std::vector<PromptImage> images;
  uint64_t admitted = 0;    // admission order: prefill chunks go to the earliest first
  uint64_t idle_since = 0;  // when its last request finished: the least recent is evicted first
  // Its ring checkpoint (docs/batching.md, "Prefix reuse"): the rings as they were after the
  // first ckpt positions of `tokens` (the end of a prompt); 0: none. `restore`: admission
  // chose it, so the rings are put back before the request's first step.
  size_t ckpt = 0;
  bool restore = false;
  // Admission chose another sequence's prefix for it: copied before its first step. A source
  // is `pinned` until then (not evicted).
  Slot* copy_from = nullptr;
  bool pinned = false;
  size_t prefilled = 0;  // prompt tokens run so far
  size_t reused = 0;     // of those, reused from the last request's KV memory
  int32_t next = -1;     // the sampled token the next step feeds (decoding)
  std::unique_ptr<TokenStream> stream;
  std::mt19937_64 rng;
  Status error;  // a callback threw
};

class EngineImpl final : public Engine {
 public:
  EngineImpl(EngineHost host, const EngineOptions& o, const MemoryPlan& mp)
      : h_(std::move(host)),
        o_(o),
        plan_(mp.kv),
        pool_pages_(mp.kv_pages),
        scratch_(std::make_unique<ForwardScratch>(*h_.backend)) {
    stats_.kv_bytes = mp.kv_bytes();
  }

  ~EngineImpl() override {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stop_ = true;
    }
    cv_.notify_all();
    if (thread_.joinable()) thread_.join();
    // KV memory and scratch go back to the backend under the model's lock (sessions may run).
    std::lock_guard<std::mutex> lock(*h_.backend_mutex);
    slots_.clear();
    scratch_.reset();
  }

  Status init() {
    {
      std::lock_guard<std::mutex> lock(*h_.backend_mutex);
      slots_.resize(o_.max_sequences);
      for (Slot& s : slots_) {
        s.cache = std::make_unique<KvCache>(*h_.backend, plan_);
        GEMMA3_TRY(s.cache->allocate(*h_.config, /*paged=*/true).with_context("engine KV memory"));
        if (o_.ring_checkpoints)
          GEMMA3_TRY(s.cache->allocate_checkpoint().with_context("engine ring checkpoints"));
      }
      GEMMA3_TRY(scratch_->allocate(*h_.config, o_.step_tokens, o_.max_sequences));
    }
    stats_.max_sequences = o_.max_sequences;
    stats_.kv_capacity_tokens = uint64_t(pool_pages_) * plan_.page_tokens;
    stats_.kv_pages = pool_pages_;
    stats_.kv_page_tokens = plan_.page_tokens;
    thread_ = std::thread([this] { loop(); });
    return ok_status();
  }

  Result<uint64_t> submit(EngineRequest r, OnToken on_token, OnDone on_done) override {
    return api_guard("Engine::submit", [&]() -> Result<uint64_t> {
      if (!on_token || !on_done) return invalid_argument("Engine::submit: on_token and on_done are required");
      GEMMA3_TRY(check_generate_options(r.options));
      auto job = std::make_unique<Job>();
      GEMMA3_TRY(prompt_ids(r, *job));
      if (job->prompt.size() > static_cast<size_t>(plan_.context))
        return out_of_range(
            fmt::format("the prompt is {} tokens, but a sequence holds at most {} (EngineOptions::context)",
                        job->prompt.size(), plan_.context));
      for (const PromptImage& im : job->images)
        if (im.n > static_cast<size_t>(plan_.chunk))
          return invalid_argument(fmt::format(
              "EngineRequest::messages: an image is {} soft tokens, but a sequence runs at most {} tokens "
              "per step (EngineOptions::step_tokens, LoadOptions::prefill_chunk): an image must be "
              "prefilled in one step (its tokens attend to each other); raise both to at least {}",
              im.n, plan_.chunk, im.n));
      job->prompt_tokens = job->prompt.size();
      job->options = std::move(r.options);
      job->on_token = std::move(on_token);
      job->on_done = std::move(on_done);
      std::lock_guard<std::mutex> lock(mu_);
      if (stop_) return unavailable("the engine is shutting down");
      if (static_cast<int>(queue_.size()) >= o_.max_queued)
        return unavailable(fmt::format("{} requests are queued (EngineOptions::max_queued); try again later",
                                       queue_.size()));
      job->id = next_id_++;
      const uint64_t id = job->id;
      live_.insert(id);
      queue_.push_back(std::move(job));
      stats_.queued = static_cast<int>(queue_.size());
      cv_.notify_all();
      return id;
    });
  }

  void cancel(uint64_t id) override {
    try {
      std::lock_guard<std::mutex> lock(mu_);
      if (live_.count(id)) cancel_ids_.insert(id);  // finished or unknown ids leave nothing behind
      cv_.notify_all();
    } catch (...) {  // a failed insert (no memory) cancels nothing; nothing leaves the API
    }
  }

  EngineStats stats() const override {
    std::lock_guard<std::mutex> lock(mu_);
    return stats_;
  }

 private:
  // The request's prompt ids (and image blocks) into job.
  Status prompt_ids(const EngineRequest& r, Job& job) const {
    const int given = !r.tokens.empty() + !r.text.empty() + !r.messages.empty();
    if (given != 1)
      return invalid_argument(
          fmt::format("EngineRequest: give exactly one of tokens, text and messages (got {})",
                      given == 0 ? "none" : "several"));
    const Tokenizer& tok = *h_.tokenizer;
    if (!r.tokens.empty()) {
      for (size_t i = 0; i < r.tokens.size(); ++i)
        if (r.tokens[i] < 0 || r.tokens[i] >= h_.config->vocab_size)
          return invalid_argument(
              fmt::format("EngineRequest::tokens[{}] is id {}, outside the vocabulary [0, {})", i,
                          r.tokens[i], h_.config->vocab_size));
      job.prompt = r.tokens;
      return ok_status();
    }
    if (!r.text.empty()) {
      GEMMA3_ASSIGN_OR_RETURN(job.prompt, tok.encode(r.text));
      job.prompt.insert(job.prompt.begin(), tok.bos_id());
      return ok_status();
    }
    bool images = false;
    for (const ChatMessage& m : r.messages) images |= !m.images.empty() || !m.image_bytes.empty();
    if (!images) {
      GEMMA3_ASSIGN_OR_RETURN(job.prompt,
                              render_chat(tok, r.messages, /*add_bos=*/true, /*add_generation_prompt=*/true));
      return ok_status();
    }
    // Decoded and run through the vision tower here, on the submitting thread (engine.h).
    if (!h_.render_chat_images) return unsupported("EngineRequest::messages: this engine takes no images");
    Result<ImagePrompt> p = h_.render_chat_images(r.messages);
    if (!p.ok()) return p.status().with_context("EngineRequest::messages");
    job.prompt = std::move(p->ids);
    job.images = std::move(p->images);
    return ok_status();
  }

  // The image block of `images` that covers or starts at position `at`, if any.
  static const PromptImage* image_at(const std::vector<PromptImage>& images, size_t at) {
    for (const PromptImage& im : images)
      if (im.offset <= at && at < im.offset + im.n) return &im;
    return nullptr;
  }

  // How many first ids a and a prompt share, at most limit and prompt.size() - 1.
  static size_t shared_ids(const std::vector<int32_t>& a, const std::vector<int32_t>& prompt, size_t limit) {
    const size_t m = std::min({limit, a.size(), prompt.size() - 1});
    size_t l = 0;
    while (l < m && a[l] == prompt[l]) ++l;
    return l;
  }

  // The common prefix of the first `limit` tokens s holds and job's prompt, kept to
  // prompt.size() - 1 so that one token runs to give the logits. Every soft token has the same
  // id: the prefix also ends at the first image block that is not the same image at the same
  // place in both (or that it would cut).
  size_t common_prefix(const Slot& s, const Job& job, size_t limit) const {
    size_t l = shared_ids(s.tokens, job.prompt, limit);
    for (const auto* mine : {&s.images, &job.images})
      for (const PromptImage& im : *mine) {
        if (im.offset >= l) continue;
        const PromptImage* other = image_at(mine == &s.images ? job.images : s.images, im.offset);
        const bool same = other && other->offset == im.offset && other->n == im.n && other->key == im.key;
        if (!same || l < im.offset + im.n) l = im.offset;
      }
    return l;
  }

  // Whether rings as they were after writing positions 0 .. end - 1 still hold what continuing
  // at position l needs. Global layers hold every position; a local layer's ring of C slots
  // holds the last C positions written, and l needs the window before it, positions
  // l - W + 1 .. l - 1: so end went at most C - W + 1 positions past l (U, the most tokens a
  // step appends), or the ring never wrapped.
  bool rings_hold(size_t end, size_t l) const {
    const ModelConfig& c = *h_.config;
    for (int i = 0; i < c.n_layers; ++i) {
      const size_t cap = static_cast<size_t>(plan_.capacity[i]);
      if (c.is_global(i) || end <= cap) continue;
      if (end - l + c.sliding_window > cap + 1) return false;
    }
    return true;
  }

  // Prefix reuse (docs/batching.md): how many of the prompt's first tokens a free sequence's KV
  // memory still holds from its last request, with its live rings or, where those have moved on,
  // its ring checkpoint (the end of its last prompt: *from_checkpoint).
  size_t reusable(const Slot& s, const Job& job, bool* from_checkpoint) const {
    *from_checkpoint = false;
    const size_t l = common_prefix(s, job, s.tokens.size());
    if (l == 0) return 0;
    if (rings_hold(s.tokens.size(), l)) return l;
    // A prompt that diverges within a step of the old prompt's end (a shared system prompt, a
    // regenerated or edited last message).
    if (s.ckpt >= l && rings_hold(s.ckpt, l)) {
      *from_checkpoint = true;
      return l;
    }
    return 0;
  }

  // The prefix another sequence (running or idle) could give by copying its global layers'
  // positions and its ring checkpoint: a system prompt shared with a request running now.
  size_t copyable(const Slot& o, const Job& job) const {
    if (o.ckpt == 0) return 0;
    const size_t l = common_prefix(o, job, o.ckpt);
    return l > 0 && rings_hold(o.ckpt, l) ? l : 0;
  }

  // The longest prefix of job's prompt that a request prefilling now will hold in its ring
  // checkpoint once its prompt is done (copyable then): the same system prompt in a burst of
  // requests admitted together, which none of them has computed yet. Prompts without images.
  size_t pending_prefix(const Job& job) const {
    size_t best = 0;
    if (!o_.ring_checkpoints || !job.images.empty()) return 0;
    for (const Slot& o : slots_) {
      if (!o.job || o.next >= 0 || !o.job->images.empty()) continue;  // free, decoding, images
      const size_t l = shared_ids(o.job->prompt, job.prompt, o.job->prompt.size());
      if (l > best && rings_hold(o.job->prompt.size(), l)) best = l;
    }
    return best;
  }

  // Calls the request's on_token; an exception from it finishes the request with an error.
  bool emit(Slot& s, const TokenEvent& e) {
    try {
      return s.job->on_token(e);
    } catch (const std::exception& ex) {
      s.error = internal_error(fmt::format("Engine: on_token threw: {}", ex.what()));
    } catch (...) {
      s.error = internal_error("Engine: on_token threw");
    }
    return false;
  }

  // Ends the slot's request: flushes held-back text (not after an error), calls on_done, frees it.
  void finish(Slot& s, Status error = ok_status()) {
    if (error.ok()) error = s.error;
    if (error.ok() && s.stream) s.stream->flush([&](const TokenEvent& e) { return emit(s, e); });
    if (error.ok()) error = s.error;
    GenerateResult done = s.stream ? s.stream->result() : GenerateResult{};
    done.prompt_tokens = static_cast<int>(s.job->prompt_tokens);
    done.cached_tokens = static_cast<int>(s.reused);
    const Result<GenerateResult> result =
        error.ok() ? Result<GenerateResult>(done) : Result<GenerateResult>(error);
    try {
      s.job->on_done(result);
    } catch (...) {  // on_done must not throw (engine.h); nothing to report it to
    }
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (result.ok()) stats_.generated_tokens += result->tokens;
      ++stats_.finished;
      cancel_ids_.erase(s.job->id);
      live_.erase(s.job->id);
    }
    s.job.reset();
    s.stream.reset();
    s.idle_since = next_admitted_;
    // The KV memory stays for prefix reuse, unless a failed step may have written it.
    if (!error.ok()) evict(s);
  }

  // A queued request's result when it is cancelled: what a preempted one generated so far.
  static GenerateResult cancelled_result(Job& job) {
    GenerateResult r;
    if (job.stream) {
      job.stream->finish(FinishReason::kCancelled);
      r = job.stream->result();
      r.prompt_tokens = static_cast<int>(job.prompt_tokens);
      r.cached_tokens = static_cast<int>(job.reused);
    }
    r.finish = FinishReason::kCancelled;
    return r;
  }

  // ---- the page pool (engine.h, "Paged KV"; engine thread) ----

  int free_pages() const {
    int used = 0;
    for (const Slot& s : slots_) used += s.cache->mapped_pages();
    return pool_pages_ - used;
  }
  // Drops an idle sequence's kept prefix and gives its pages back.
  static void evict(Slot& s) {
    s.cache->unmap_pages_from(0);
    s.tokens.clear();
    s.images.clear();
    s.ckpt = 0;
    s.restore = false;
  }
  // The idle sequence (not `keep`) holding pages that finished longest ago, or null.
  Slot* least_recent_idle(const Slot* keep) {
    Slot* best = nullptr;
    for (Slot& s : slots_)
      if (!s.job && &s != keep && !s.pinned && s.cache->mapped_pages() > 0 &&
          (!best || s.idle_since < best->idle_since))
        best = &s;
    return best;
  }
  // Frees the running request admitted last: its pages go back to the pool and it goes back
  // to the front of the queue with what it generated (Job::stream).
  void preempt(Slot& v) {
    std::unique_ptr<Job> job = std::move(v.job);
    if (v.next >= 0) {  // decoding: the tokens it holds and the one it sampled become its prompt
      job->prompt = v.tokens;
      job->prompt.push_back(v.next);
    }
    job->stream = std::move(v.stream);
    job->rng = v.rng;
    job->reused = v.reused;
    evict(v);
    v.idle_since = 0;
    --running_;
    std::lock_guard<std::mutex> lock(mu_);
    queue_.push_front(std::move(job));
    stats_.queued = static_cast<int>(queue_.size());
    ++stats_.preempted;
  }
  // Pages for positions [0, tokens) of s, making room by evicting idle prefixes and then by
  // preempting the latest admitted requests (possibly s itself: false, s is then free). A
  // failure to map memory finishes s with the error (false).
  bool take_pages(Slot& s, int64_t tokens) {
    const int need = plan_.pages_for(tokens) - s.cache->mapped_pages();
    while (need > free_pages()) {
      if (Slot* idle = least_recent_idle(&s)) {
        evict(*idle);
        continue;
      }
      Slot* last = nullptr;
      for (Slot& o : slots_)
        if (o.job && (!last || o.admitted > last->admitted)) last = &o;
      preempt(*last);
      if (last == &s) return false;
    }
    if (Status st = s.cache->map_pages(plan_.pages_for(tokens)); !st.ok()) {
      finish(s, st);
      --running_;
      return false;
    }
    return true;
  }

  void loop() {
    while (true) {
      std::vector<std::unique_ptr<Job>> dropped;  // cancelled while queued
      std::vector<Slot*> admitted;                // their prompt's pages are taken below
      int promised = 0;                           // pages those take
      {
        std::unique_lock<std::mutex> lock(mu_);
        cv_.wait(lock, [&] { return stop_ || !queue_.empty() || running_ > 0; });
        if (stop_) break;
        for (auto it = queue_.begin(); it != queue_.end();) {
          if (cancel_ids_.count((*it)->id) || ((*it)->options.cancel && (*it)->options.cancel->load())) {
            cancel_ids_.erase((*it)->id);
            live_.erase((*it)->id);
            dropped.push_back(std::move(*it));
            it = queue_.erase(it);
          } else {
            ++it;
          }
        }
        while (!queue_.empty()) {
          Slot* free = nullptr;
          size_t reuse = 0;
          bool from_checkpoint = false;
          for (Slot& s : slots_) {  // the free sequence holding most of the prompt, else the emptiest
            if (s.job || s.pinned) continue;  // pinned: the source of a copy admitted this round
            bool ckpt = false;
            const size_t l = reusable(s, *queue_.front(), &ckpt);
            if (!free || l > reuse || (l == reuse && reuse == 0 && s.tokens.size() < free->tokens.size()))
              free = &s, reuse = l, from_checkpoint = ckpt;
          }
          if (!free) break;
          Slot& s = *free;
          // A longer prefix in another sequence's ring checkpoint (a request running now, or
          // idle, with the same system prompt): copied rather than run again.
          Slot* source = nullptr;
          size_t copy = 0;
          for (Slot& o : slots_) {
            const size_t l = &o == &s || o.pinned ? 0 : copyable(o, *queue_.front());
            if (l >= std::max(reuse, copy) + kMinCopyTokens) source = &o, copy = l;
          }
          // A request still prefilling will soon hold a longer prefix: wait for it and copy it
          // then, rather than compute the same prefix twice in the same steps (first come, first
          // served: the requests behind wait too; it is running, so this ends).
          if (pending_prefix(*queue_.front()) >= std::max(reuse, copy) + kMinCopyTokens) break;
          // Its prompt's pages: those s keeps for the reused prefix, the rest from the pool (with
          // the pages of idle sequences but the source, dropped least recent first); else it waits.
          const int keep =
              source ? 0 : std::min(s.cache->mapped_pages(), plan_.pages_for(static_cast<int64_t>(reuse)));
          int idle_pages = 0;
          for (const Slot& o : slots_)
            if (!o.job && &o != &s && &o != source && !o.pinned) idle_pages += o.cache->mapped_pages();
          const int need = plan_.pages_for(static_cast<int64_t>(queue_.front()->prompt.size())) - keep;
          if (need > free_pages() + s.cache->mapped_pages() - keep + idle_pages - promised) break;
          promised += need;
          s.job = std::move(queue_.front());
          queue_.pop_front();
          s.tokens.resize(reuse);
          s.cache->unmap_pages_from(keep);
          s.restore = from_checkpoint;
          if (reuse < s.ckpt) s.ckpt = 0;  // the positions after reuse are rewritten
          if (source) {
            s.tokens.assign(s.job->prompt.begin(), s.job->prompt.begin() + static_cast<std::ptrdiff_t>(copy));
            s.restore = false;
            s.ckpt = 0;
            s.copy_from = source;
            source->pinned = true;
            reuse = copy;
            stats_.copied_tokens += copy;
          }
          s.images = s.job->images;
          s.admitted = next_admitted_++;
          s.prefilled = reuse;
          stats_.reused_tokens += reuse;
          s.next = -1;
          s.error = ok_status();
          if (s.job->stream) {  // preempted before: it goes on
            s.stream = std::move(s.job->stream);
            s.rng = s.job->rng;
            s.reused = s.job->reused;
          } else {
            s.rng.seed(s.job->options.sampling.seed);
            s.reused = reuse;
            s.stream = std::make_unique<TokenStream>(
                s.job->options, *h_.tokenizer,
                std::vector<int32_t>(h_.config->eos_ids.begin(), h_.config->eos_ids.end()), h_.n_text_ids);
          }
          ++running_;
          admitted.push_back(&s);
        }
        stats_.queued = static_cast<int>(queue_.size());
        stats_.running = running_;
        for (Slot& s : slots_)
          if (s.job && cancel_ids_.count(s.job->id)) s.stream->finish(FinishReason::kCancelled);
      }
      for (auto& job : dropped) {
        try {
          job->on_done(cancelled_result(*job));
        } catch (...) {
        }
        std::lock_guard<std::mutex> lock(mu_);
        ++stats_.finished;
      }
      // Admission counted these pages as free or idle, so no request is preempted for them.
      for (Slot* s : admitted) {
        if (!s->job) continue;  // preempted by one admitted before it (admission counts against that)
        if (s->restore) {
          std::lock_guard<std::mutex> lock(*h_.backend_mutex);
          s->cache->restore_rings();
          s->restore = false;
        }
        Slot* from = std::exchange(s->copy_from, nullptr);
        if (take_pages(*s, static_cast<int64_t>(s->job->prompt.size())) && from) {
          if (from->ckpt >= s->tokens.size()) {
            std::lock_guard<std::mutex> lock(*h_.backend_mutex);
            s->cache->copy_prefix(*from->cache, static_cast<int>(s->tokens.size()));
          } else {  // the source lost its prefix (preempted): the prompt runs from the start
            std::lock_guard<std::mutex> lock(mu_);
            stats_.reused_tokens -= s->tokens.size();
            stats_.copied_tokens -= s->tokens.size();
            if (s->reused == s->tokens.size()) s->reused = 0;
            s->tokens.clear();
            s->prefilled = 0;
          }
        }
        if (from) from->pinned = false;
      }
      step();
    }
    // Shutting down: everything still queued or running is cancelled.
    std::deque<std::unique_ptr<Job>> queued;
    {
      std::lock_guard<std::mutex> lock(mu_);
      queued.swap(queue_);
    }
    for (Slot& s : slots_)
      if (s.job) {
        s.stream->finish(FinishReason::kCancelled);
        finish(s);
      }
    for (auto& job : queued) {
      try {
        job->on_done(cancelled_result(*job));
      } catch (...) {
      }
    }
  }

  // One forward step over the running sequences, then their sampling and callbacks.
  void step() {
    const ModelConfig& c = *h_.config;
    // Requests finished before the step: cancelled (by cancel() or their flag) or asking for no tokens.
    for (Slot& s : slots_) {
      if (!s.job) continue;
      const GenerateOptions& go = s.job->options;
      if (go.cancel && go.cancel->load()) s.stream->finish(FinishReason::kCancelled);
      if (s.stream->result().finish == FinishReason::kCancelled) {
        finish(s);
        --running_;
      }
    }
    // A decoding sequence's next position may start a page: the earliest admitted take theirs
    // first, preempting the latest (engine.h, "Paged KV").
    std::vector<Slot*> decoding;
    for (Slot& s : slots_)
      if (s.job && s.next >= 0) decoding.push_back(&s);
    std::sort(decoding.begin(), decoding.end(),
              [](const Slot* a, const Slot* b) { return a->admitted < b->admitted; });
    for (Slot* s : decoding)
      if (s->job) take_pages(*s, static_cast<int64_t>(s->tokens.size()) + 1);
    std::vector<ForwardSeq> seqs;
    std::vector<Slot*> who;
    int budget = o_.step_tokens;
    for (Slot& s : slots_) {  // one token for each decoding sequence
      if (!s.job || s.next < 0) continue;
      ForwardSeq q;
      q.kv = s.cache->view();
      q.ids = &s.next;
      q.n = 1;
      q.pos0 = static_cast<int>(s.tokens.size());
      seqs.push_back(q);
      who.push_back(&s);
      --budget;
    }
    // Prefill chunks with what is left, to the earliest admitted first. An image block goes
    // whole into one step: when it does not fit what is left, it waits for the next step, and
    // so do the prompts admitted after it (so that the budget frees up for it).
    std::vector<Slot*> prefilling;
    for (Slot& s : slots_)
      if (s.job && s.next < 0) prefilling.push_back(&s);
    std::sort(prefilling.begin(), prefilling.end(),
              [](const Slot* a, const Slot* b) { return a->admitted < b->admitted; });
    for (Slot* sp : prefilling) {
      Slot& s = *sp;
      if (budget <= 0) break;
      const int left = static_cast<int>(s.job->prompt.size() - s.prefilled);
      ForwardSeq q;
      q.kv = s.cache->view();
      q.ids = s.job->prompt.data() + s.prefilled;
      q.pos0 = static_cast<int>(s.tokens.size());
      const PromptImage* image = nullptr;  // the next image block at or after the prefilled tokens
      for (const PromptImage& im : s.job->images)
        if (im.offset >= s.prefilled) {
          image = &im;
          break;
        }
      if (image && image->offset == s.prefilled) {  // its soft tokens see each other
        const int n = static_cast<int>(image->n);
        if (n > budget) break;
        q.n = n;
        q.embeddings = image->embeddings->data();
        q.bidir_begin = q.pos0;
        q.bidir_end = q.pos0 + n;
      } else {  // text, up to the next image block
        q.n = std::min({left, budget, plan_.chunk});
        if (image) q.n = std::min(q.n, static_cast<int>(image->offset - s.prefilled));
      }
      q.want_logits = q.n == left;
      seqs.push_back(q);
      who.push_back(&s);
      budget -= q.n;
    }
    if (seqs.empty()) {  // every request was cancelled: the gauges still change
      publish(0, 0);
      return;
    }

    // The step and every sampling under the backend lock; callbacks after it.
    const int V = c.vocab_size, n_allowed = h_.n_text_ids;
    const std::vector<int32_t> banned = {c.boi_id, c.eoi_id};
    std::vector<int32_t> ids(seqs.size(), -1);
    std::vector<std::vector<float>> rows(seqs.size());
    Status error;
    {
      std::lock_guard<std::mutex> lock(*h_.backend_mutex);
      error = forward_batch(c, *h_.weights, *h_.backend, seqs, *scratch_, nullptr);
      for (size_t i = 0; i < seqs.size() && error.ok(); ++i) {
        Slot& s = *who[i];
        s.tokens.insert(s.tokens.end(), seqs[i].ids, seqs[i].ids + seqs[i].n);
        if (s.next < 0) s.prefilled += seqs[i].n;
        if (s.next < 0 && seqs[i].want_logits && o_.ring_checkpoints) {  // the end of its prompt
          s.cache->save_rings();
          s.ckpt = s.tokens.size();
        }
        if (!seqs[i].want_logits || s.job->options.max_tokens == 0) continue;
        const float* logits = scratch_->logits + static_cast<int64_t>(i) * V;
        if (s.stream->wants_logprobs()) {
          rows[i].resize(n_allowed);
          h_.backend->to_host(logits, rows[i].data(), rows[i].size() * sizeof(float));
        }
        ids[i] = h_.backend->sample(logits, n_allowed, s.job->options.sampling, banned, s.tokens, s.rng);
      }
      if (error.ok()) error = h_.backend->status();
    }
    uint64_t prompt_tokens = 0;
    for (size_t i = 0; i < seqs.size(); ++i) {
      Slot& s = *who[i];
      if (s.next < 0) prompt_tokens += seqs[i].n;
      if (!error.ok()) {
        finish(s, error);
        --running_;
        continue;
      }
      if (!seqs[i].want_logits) continue;
      if (s.job->options.max_tokens == 0) {  // the prompt only (as Session::generate with max_tokens 0)
        s.stream->finish(FinishReason::kMaxTokens);
        finish(s);
        --running_;
        continue;
      }
      const bool more =
          s.stream->accept(ids[i], rows[i].data(), [&](const TokenEvent& e) { return emit(s, e); });
      const int max = s.job->options.max_tokens;
      if (more && max >= 0 && s.stream->result().tokens >= max) {
        s.stream->finish(FinishReason::kMaxTokens);
      } else if (more && s.tokens.size() >= static_cast<size_t>(plan_.context)) {
        s.stream->finish(FinishReason::kContextFull);
      } else if (more) {
        s.next = ids[i];
        continue;
      }
      finish(s);
      --running_;
    }
    publish(1, prompt_tokens);
  }

  // The step's counts and the gauges (running requests, KV positions they hold) into stats_.
  void publish(uint64_t steps, uint64_t prompt_tokens) {
    uint64_t used = 0;
    int pages = 0;
    for (const Slot& s : slots_)
      if (s.job) used += s.tokens.size(), pages += s.cache->mapped_pages();
    std::lock_guard<std::mutex> lock(mu_);
    stats_.steps += steps;
    stats_.prompt_tokens += prompt_tokens;
    stats_.running = running_;
    stats_.kv_used_tokens = used;
    stats_.kv_pages_used = pages;
  }

  EngineHost h_;
  const EngineOptions o_;
  const KvPlan plan_;
  const int pool_pages_;     // the global layers' page pool (EngineOptions::kv_tokens)
  std::vector<Slot> slots_;  // the engine thread's (and init's, before it starts)
  std::unique_ptr<ForwardScratch> scratch_;
  int running_ = 0;  // slots holding a request (engine thread)

  mutable std::mutex mu_;  // guards what follows
  std::condition_variable cv_;
  std::deque<std::unique_ptr<Job>> queue_;
  std::unordered_set<uint64_t> live_;        // queued or running
  std::unordered_set<uint64_t> cancel_ids_;  // of live_, asked to cancel
  uint64_t next_id_ = 1;
  uint64_t next_admitted_ = 0;
  bool stop_ = false;
  EngineStats stats_;

  std::thread thread_;
};

}  // namespace

Result<std::unique_ptr<Engine>> make_engine(EngineHost host, const EngineOptions& options) {
  EngineOptions o = options;
  const int max_context = host.config->max_context;
  if (o.max_sequences < 1 || o.max_sequences > 4096)
    return invalid_argument(
        fmt::format("EngineOptions::max_sequences is {}; it must be in [1, 4096]", o.max_sequences));
  if (o.context < 0 || o.context > max_context)
    return invalid_argument(
        fmt::format("EngineOptions::context is {}; it must be in [0, {}] (0: the model's {})", o.context,
                    max_context, host.context));
  if (o.step_tokens < 0 || o.step_tokens > 65536)
    return invalid_argument(
        fmt::format("EngineOptions::step_tokens is {}; it must be in [0, 65536]", o.step_tokens));
  if (o.max_queued < 0)
    return invalid_argument(fmt::format("EngineOptions::max_queued is {}; it must be >= 0", o.max_queued));
  if (o.kv_tokens < 0)
    return invalid_argument(fmt::format("EngineOptions::kv_tokens is {}; it must be >= 0", o.kv_tokens));
  if (o.context == 0) o.context = host.context;
  if (o.kv_tokens > 0 && o.kv_tokens < o.context)
    return invalid_argument(
        fmt::format("EngineOptions::kv_tokens is {}, less than a sequence's context ({}): a sequence must be "
                    "able to fill its context; raise kv_tokens or lower EngineOptions::context",
                    o.kv_tokens, o.context));
  if (o.step_tokens == 0) o.step_tokens = std::max(host.prefill_chunk, o.max_sequences);
  if (o.step_tokens < o.max_sequences)
    return invalid_argument(
        fmt::format("EngineOptions::step_tokens is {}, fewer than max_sequences ({}): every decoding "
                    "sequence takes one per step",
                    o.step_tokens, o.max_sequences));
  // The memory planner's numbers for this engine (what `gemma3 info --parallel N` prints): each
  // sequence appends at most U = min(prefill chunk, step) tokens per step, so its rings hold
  // W + U - 1 slots. Checked against the backend's free memory before anything is allocated.
  // The global layers are a pool of pages, mapped on demand where the backend can.
  MemoryPlan mp;
  {
    std::lock_guard<std::mutex> lock(*host.backend_mutex);
    mp = plan_memory(*host.config, 0, o.context, host.prefill_chunk, host.kv_dtype, o.max_sequences,
                     o.step_tokens, o.kv_tokens, host.backend->map_granularity());
    mp.ring_checkpoints = o.ring_checkpoints;
    GEMMA3_TRY(
        check_fits(mp, host.backend->free_bytes(), host.backend->name())
            .with_context(fmt::format("an Engine of {} sequences of {} tokens (EngineOptions::max_sequences, "
                                      "context)",
                                      o.max_sequences, o.context)));
  }
  auto engine = std::make_unique<EngineImpl>(std::move(host), o, mp);
  GEMMA3_TRY(engine->init());
  return std::unique_ptr<Engine>(std::move(engine));
}

Result<GenerateResult> Engine::generate(EngineRequest request, const OnToken& on_token) {
  return api_guard("Engine::generate", [&]() -> Result<GenerateResult> {
    auto done = std::make_shared<std::promise<Result<GenerateResult>>>();
    std::future<Result<GenerateResult>> result = done->get_future();
    GEMMA3_ASSIGN_OR_RETURN(uint64_t id,
                            submit(std::move(request), on_token,
                                   [done](const Result<GenerateResult>& r) { done->set_value(r); }));
    (void)id;
    return result.get();
  });
}

}  // namespace gemma3
