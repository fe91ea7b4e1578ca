// Many requests at once on one model: an Engine decodes several sequences in each forward step
// (continuous batching with chunked prefill, docs/batching.md), so N requests share one read of
// the weights per generated token instead of N.
//
// Example (a function body):
//   auto model = gemma3::Model::load("gemma-3-270m-q4_k_m.gguf", {});
//   if (!model.ok()) return report(model.status());
//   auto engine = gemma3::Engine::create(*model, {.max_sequences = 8});
//   if (!engine.ok()) return report(engine.status());
//   gemma3::EngineRequest r;
//   r.messages = {{"user", "Hello"}};
//   auto done = (*engine)->generate(r, [](const gemma3::TokenEvent& e) { print(e.text); return true; });
//   return report(done.status());  // as Session::generate; call generate from many threads at once
//
// Threads: submit, cancel, generate and stats may be called from any thread, concurrently.
// The engine runs its steps on a thread of its own, which calls every request's on_token and
// on_done; a callback may call submit and cancel, but must not call generate or destroy the
// engine. Destroying the engine cancels what is still queued or running (on_done gets
// FinishReason::kCancelled) and waits for its thread. A request's images are decoded and run
// through the vision tower inside submit, on the calling thread (one image request at a time;
// the tower takes the model's backend between the engine's steps, which wait for it), so
// submit returns once they are encoded; the engine keeps up to 16 encoded images by content
// for later requests (a chat resends its images every turn).
//
// Prefix reuse: a finished request's sequence keeps its KV memory. A new request whose prompt
// starts with the tokens that sequence holds (the next turn of a chat: the previous prompt, the
// reply, the new message), or diverges from them at most a step's worth of tokens before their
// end, takes that sequence and runs only the rest of its prompt (EngineStats::reused_tokens).
// Images count as their content: a different image at the same place ends the common prefix.
// With EngineOptions::ring_checkpoints a sequence also keeps its rings as they were at the end
// of its prompt, so a prompt that diverges from that prompt at most a step's worth of tokens
// before its end (the same system prompt and a new question, a regenerated or edited last
// message) reuses the prefix too, from its own sequence or, copied (at least 32 tokens more
// than its own gives), from another one's, running or idle (EngineStats::copied_tokens). A
// request whose prompt shares such a prefix with one still running its prompt (a burst of
// requests with the same system prompt) waits for that prompt to finish and copies it, so the
// prefix is computed once; the requests queued behind it wait too.
//
// Paged KV: a sequence takes pages of the global layers' pool as it grows. A request is
// admitted when the pages for its prompt are free; to make room the engine drops the kept
// prefixes of idle sequences, least recently used first. When a decoding sequence needs a page
// and none is free, the request admitted last is preempted (vLLM's recompute preemption): its
// pages are freed and it goes back to the front of the queue, to run its prompt and the tokens
// it generated as a new prompt and go on where it stopped (its callbacks see nothing of this;
// EngineStats::preempted counts it).
//
// Results: a request's tokens are what Session::generate gives for the same prompt and options
// (same sampler, same per-request seed, same stop rules and finish reasons). Greedy outputs do
// not depend on the other requests in a step when the model was loaded with
// LoadOptions::batch_invariant; by default the fast CPU backend's kernel choice depends on a
// step's token count (int8 activations up to 64 tokens, fp32 above), so a token's logits
// can differ from a lone run's within that bound (docs/batching.md).
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "gemma3/gemma3.h"
#include "gemma3/status.h"

namespace gemma3 {

struct EngineOptions {
  // Sequences decoded together. Each holds KV memory for `context` tokens, reserved when the
  // engine is made (MemoryReport per sequence: Model::memory_plan() with this context).
  int max_sequences = 8;
  // Tokens a sequence can hold (prompt and reply); 0: the model's context (LoadOptions::context).
  int context = 0;
  // The most tokens one step runs: one per decoding sequence, the rest prefill chunks of
  // waiting prompts; 0: the model's prefill chunk (LoadOptions::prefill_chunk), and at least
  // max_sequences.
  int step_tokens = 0;
  // Requests waiting for a free sequence, at most; submit returns kUnavailable beyond.
  int max_queued = 1024;
  // Global-layer KV positions all sequences share: a pool of pages (EngineStats::kv_page_tokens
  // positions each; the memory is mapped as a sequence grows and unmapped when it is evicted),
  // so a short request does not hold a whole context. 0: max_sequences * context (every
  // sequence can hold a whole context at once); else at least `context` (a sequence can always
  // fill its context) and taken as at most max_sequences * context. See "Paged KV" below.
  int64_t kv_tokens = 0;
  // A copy of each sequence's sliding-window rings taken at the end of its prompt, so that a
  // later prompt diverging within a step of that end reuses the prefix (see "Prefix reuse").
  // It costs the rings' memory again (MemoryReport::kv_checkpoint_bytes).
  bool ring_checkpoints = true;
};

// One request. The prompt is exactly one of tokens, text and messages.
struct EngineRequest {
  std::vector<int32_t> tokens;        // ids, <bos> first (as Session::feed_tokens)
  std::string text;                   // completed raw: <bos> + text (as Session::feed_text)
  std::vector<ChatMessage> messages;  // the chat template with the generation prompt, images
                                      // included (as feed_chat on an empty session)
  GenerateOptions options;            // max_tokens, sampling (with its seed), stop strings, logprobs,
                                      // cancel (checked before each step)
};

struct EngineStats {
  int running = 0;                  // sequences holding a request (prefilling or decoding)
  int queued = 0;                   // requests waiting for a sequence
  int max_sequences = 0;            // EngineOptions::max_sequences
  uint64_t steps = 0;               // forward steps run
  uint64_t prompt_tokens = 0;       // prompt tokens prefilled
  uint64_t generated_tokens = 0;    // tokens generated (as GenerateResult::tokens)
  uint64_t finished = 0;            // requests finished (any reason, errors included)
  uint64_t reused_tokens = 0;       // prompt tokens not run again: prefix reuse (see below)
  uint64_t copied_tokens = 0;       // of those, copied from another sequence's prefix
  uint64_t kv_bytes = 0;            // KV memory the engine may use: the page pool and every sequence's rings
  uint64_t kv_used_tokens = 0;      // positions held by running sequences now
  uint64_t kv_capacity_tokens = 0;  // the pool's positions: kv_pages * kv_page_tokens
  int kv_pages = 0;                 // pages in the pool (EngineOptions::kv_tokens)
  int kv_page_tokens = 0;           // positions per page
  int kv_pages_used = 0;            // held by running requests (the rest: free, or idle prefixes)
  uint64_t preempted = 0;           // requests preempted for pages (see "Paged KV")
};

class Engine {
 public:
  using OnToken = std::function<bool(const TokenEvent&)>;
  using OnDone = std::function<void(const Result<GenerateResult>&)>;

  virtual ~Engine() = default;
  static Result<std::unique_ptr<Engine>> create(std::shared_ptr<Model> model, const EngineOptions& options);

  // Queues a request and returns its id. on_token gets its text as Session::generate's
  // callback does (returning false finishes it with kCallback; an exception from it fails the
  // request with kInternal); on_done gets the result or the error, exactly once, and must not
  // throw (what it throws is dropped). Errors here (nothing is queued, no callback runs): an empty or
  // ambiguous prompt, bad options (the fields as Session::generate names them), a prompt that
  // can never fit a sequence's context (kOutOfRange), a full queue (kUnavailable), and for
  // images (named "EngineRequest::messages: ..."): a model without a vision tower
  // (kUnsupported), an image that cannot be read or decoded or is over the limits, an image
  // block longer than a sequence's step (kInvalidArgument: its soft tokens, 256 on the real
  // models, run in one step, so EngineOptions::step_tokens and LoadOptions::prefill_chunk must
  // be at least that).
  virtual Result<uint64_t> submit(EngineRequest request, OnToken on_token, OnDone on_done) = 0;
  // Finishes a queued or running request with FinishReason::kCancelled before its next step
  // (its sequence is then free for the next request); the others in the step go on untouched.
  // Unknown or finished ids: nothing happens.
  virtual void cancel(uint64_t id) = 0;
  virtual EngineStats stats() const = 0;

  // submit, then waits for on_done and returns its result. on_token runs on the engine's thread.
  Result<GenerateResult> generate(EngineRequest request, const OnToken& on_token);
};

}  // namespace gemma3
