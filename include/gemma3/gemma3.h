// libgemma3: load a Gemma 3 checkpoint, open sessions, generate text.
//
// Example (a function body; tests compile and run it, see HeaderExample in CMakeLists.txt):
//   auto model = gemma3::Model::load("gemma-3-270m-q4_k_m.gguf", {});
//   if (!model.ok()) return report(model.status());
//   auto session = (*model)->new_session();
//   if (!session.ok()) return report(session.status());
//   gemma3::Status st = (*session)->feed_chat({{"user", "Hello"}});
//   if (!st.ok()) return report(st);
//   auto done = (*session)->generate({}, [](const gemma3::TokenEvent& e) { print(e.text); return true; });
//   return report(done.status());  // done->finish: why it stopped (FinishReason)
//
// Every fallible call returns a Status/Result; the library never exits and never throws (an
// exception from inside, or from a callback you pass, comes back as an error Status).
//
// Threads:
//   - Model: every method may be called from any thread at any time, concurrently. Sessions of
//     one model may be used from different threads at once: each computes exactly what it
//     would alone. They share the model's backend, which runs one forward step (a prefill
//     chunk, a decode token, an image encode) at a time, so N busy sessions each run at about
//     1/N of the speed; to serve many requests, use an Engine (gemma3/engine.h), which decodes
//     them together. A session keeps its model alive; the Model may be released while sessions
//     still run.
//   - Session: one thread at a time. Its methods are not synchronized: calling two of them
//     concurrently on one session is a data race. Handing a session from one thread to another
//     (with the usual happens-before, e.g. a mutex or a join) is fine.
//   - GenerateOptions::cancel may be set from any thread. on_token and an ActivationHook run
//     on the thread that called generate/feed_*; an activation hook runs while the model's
//     backend is held, so it must not call into another session of the same model.
//   - Tokenizer: const methods may be called concurrently.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "gemma3/status.h"
#include "gemma3/tokenizer.h"

namespace gemma3 {

enum class BackendKind { kAuto, kCpu, kCuda };
// Element type of the KV cache. kQ8_0: GGUF Q8_0 blocks (needs head_dim % 32 == 0), kF8: fp8
// e4m3fn without scale; both about half of bf16, with attention reading them directly.
enum class KvType { kBF16, kF32, kQ8_0, kF8 };
const char* kv_type_name(KvType t);                              // "bf16", "f32", "q8_0", "fp8"
std::optional<KvType> kv_type_from_name(std::string_view name);  // those names; nullopt otherwise

// The library's version, "MAJOR.MINOR.PATCH" (CMake's project version).
const char* version();

// The most CPU threads a model may use (LoadOptions::threads; as llama.cpp's GGML_MAX_N_THREADS).
inline constexpr int kMaxThreads = 512;

// LoadOptions::prefill_chunk's defaults per backend.
inline constexpr int kCpuPrefillChunk = 256;
inline constexpr int kCudaPrefillChunk = 512;

struct LoadOptions {
  BackendKind backend = BackendKind::kAuto;
  int threads = 0;  // 0: one per core; at most kMaxThreads
  int context = 0;  // KV cache length in tokens; 0: min(model max, 8192)
  KvType kv_type = KvType::kBF16;
  // Tokens per prefill step (also sizes the local-layer rings); 0: the backend's choice,
  // kCudaPrefillChunk on a GPU, kCpuPrefillChunk on the CPU.
  int prefill_chunk = 0;
  std::string mmproj;         // llama.cpp vision projector GGUF (optional)
  bool pan_and_scan = false;  // images: also encode Pan & Scan crops (docs/vision.md)
  // CUDA only (`--weights fp8`): the decoder's bf16/f16/f32 matrices (projections, the tied
  // embedding as LM head) are quantized at load to fp8 e4m3 with a scale per row, halving bf16's
  // bytes per decoded token; embedding lookups, norms and the vision tower keep the stored
  // values. An error on other backends.
  bool fp8_weights = false;
  // CPU only, for evaluation: a token's logits are the same bits however the text before it
  // was split across feed calls and prefill chunks. By default decode (up to 64 tokens per call)
  // multiplies with int8-quantized activations and its own attention path, as llama.cpp does,
  // so feeding text token by token gives logits that differ from one feed of the same text (by
  // up to ~0.8 on the 270M Q4_K_M; see docs/perf.md). This makes every call run the prefill
  // path (fp32 activations), which costs decode speed. An error with the CUDA backend.
  bool batch_invariant = false;
  bool progress = false;  // progress bar on stderr while mapping/checking large files
};

// Per-session settings (Model::new_session).
struct SessionOptions {
  // Tokens this session's context holds (its KV cache is allocated for them): 0 takes the
  // model's (LoadOptions::context); at most the checkpoint's maximum. Sessions of one model may
  // differ, e.g. a server's short and long requests.
  int context = 0;
};

struct ChatMessage {
  std::string role;  // "system", "user", "model" ("assistant" is accepted as "model")
  std::string content;
  // Images for a user message: the files `images` names, then the files `image_bytes` holds in
  // memory, in that order, one per "<start_of_image>" marker in `content` (in order), or all
  // placed before the text when the content has no marker (as the HF chat template does for
  // image content items). Needs a model with a vision tower.
  std::vector<std::string> images;  // image file paths
  // Image files' bytes (PNG, JPEG, BMP or GIF; the limits of feed_image_bytes), e.g. a server's
  // base64 data: URIs decoded; errors name them "image_bytes[k] of message i".
  std::vector<std::string> image_bytes;
};

struct SamplingOptions {
  float temperature = 0.0f;  // 0: greedy
  int top_k = 0;             // 0: off
  float top_p = 1.0f;        // 1: off
  float min_p = 0.0f;        // 0: off
  float repeat_penalty = 1.0f;
  int repeat_last_n = 64;
  uint64_t seed = 0;
};

struct GenerateOptions {
  int max_tokens = 256;  // -1: until a stop token or the context is full
  SamplingOptions sampling;
  std::vector<std::string> stop_strings;
  const std::atomic<bool>* cancel = nullptr;  // set to true from any thread to stop
  // Log-probabilities in each TokenEvent (TokenEvent::logprobs): of the model's own
  // distribution at each step, the log-softmax of the logits over the ids generate may
  // produce, before temperature, penalties and top-k/p (OpenAI's logprobs, vLLM's default), and
  // the top_logprobs (0..20) most likely ids. top_logprobs > 0 implies logprobs. On a GPU each
  // step's logits row is then copied to the host.
  bool logprobs = false;
  int top_logprobs = 0;
  // The end-of-text and end-of-turn ids do not stop generation: they are streamed (their text)
  // and fed like any other token, so a run makes exactly max_tokens tokens unless something
  // else stops it (benchmarks; vLLM's and llama-server's ignore_eos).
  bool ignore_eos = false;
};
constexpr int kMaxTopLogprobs = 20;

// The natural-log probability of one token.
struct TokenLogprob {
  int32_t id = 0;
  float logprob = 0;
};
// A generated token's log-probability and the most likely ids at its step (GenerateOptions).
struct TokenLogprobs {
  int32_t id = 0;
  float logprob = 0;
  std::vector<TokenLogprob> top;  // top_logprobs entries, most likely first (ties: lower id first)
};

// Why Session::generate stopped.
enum class FinishReason {
  kStopToken,    // the model produced an end-of-text or end-of-turn id
  kStopString,   // one of GenerateOptions::stop_strings appeared in the text
  kMaxTokens,    // GenerateOptions::max_tokens tokens were generated
  kContextFull,  // the context could not take the next token (raise LoadOptions::context)
  kCancelled,    // GenerateOptions::cancel was set
  kCallback,     // on_token returned false
};
const char* finish_reason_name(FinishReason reason);  // "stop_token", "max_tokens", ...

struct GenerateResult {
  FinishReason finish = FinishReason::kMaxTokens;
  int tokens = 0;  // tokens this call generated (as Stats::generated_tokens; a stop id is not one)
  // The tokens the generated ones follow: Session::generate, the context when it was called;
  // an Engine request, its prompt (images' soft tokens included). OpenAI's usage.prompt_tokens.
  int prompt_tokens = 0;
  // Of those, the ones not run for this call: an Engine request's prefix reused from an earlier
  // request's KV memory (EngineStats::reused_tokens); 0 from Session::generate.
  int cached_tokens = 0;
};

struct TokenEvent {
  int32_t id;        // the token this event ends with; -1 for the held-back text sent at the end
  std::string text;  // bytes this token adds to the output (may be a partial UTF-8 sequence)
  // With GenerateOptions::logprobs: one entry per generated token whose text this event
  // completes, in order. Text held back while it could begin a stop string comes with a later
  // event, and so do its tokens' entries; a token whose text a stop string removed has none.
  std::vector<TokenLogprobs> logprobs;
};

struct Stats {
  int prompt_tokens = 0;
  double prefill_seconds = 0;
  int generated_tokens = 0;
  double decode_seconds = 0;
  int images = 0;                   // images fed (each Pan & Scan crop counts as one)
  int images_encoded = 0;           // of those, run through the vision tower (the rest were cached)
  double image_encode_seconds = 0;  // decoding, preprocessing and the vision tower
};

// What one session of a model holds, in bytes (the memory planner's numbers; `gemma3 info`
// prints the same). Weights are shared by all sessions; KV and scratch are per session.
struct MemoryReport {
  uint64_t weight_bytes = 0;
  uint64_t kv_global_bytes = 0;      // global layers: every position of the context (a session), or
                                     // an Engine's pool of pages (kv_pages * kv_page_bytes)
  uint64_t kv_local_bytes = 0;       // sliding-window layers' rings (all sequences)
  uint64_t scratch_bytes = 0;        // activations of one prefill chunk
  uint64_t kv_checkpoint_bytes = 0;  // an Engine's ring checkpoints: the rings again (EngineOptions)
  uint64_t total_bytes() const {
    return weight_bytes + kv_global_bytes + kv_local_bytes + kv_checkpoint_bytes + scratch_bytes;
  }
  // The settings and shape behind the numbers.
  int context = 0;        // tokens a session holds (the global layers' slots)
  int prefill_chunk = 0;  // tokens per prefill step
  int sequences = 1;      // sequences planned for (PlanOptions::sequences)
  KvType kv_type = KvType::kBF16;
  uint64_t kv_bytes_per_slot = 0;    // K + V of one position in one layer
  int kv_local_slots = 0;            // ring slots of one sliding-window layer: min(context, W + chunk - 1)
  uint64_t kv_all_global_bytes = 0;  // what the cache would take if every layer held the whole context
  // An Engine's global-layer pool (PlanOptions::sequences > 1 or kv_tokens; else 0): pages of
  // kv_page_tokens positions, kv_page_bytes each (K and V in every global layer), shared by the
  // sequences and mapped as they grow (gemma3/engine.h, EngineOptions::kv_tokens).
  int kv_pages = 0;
  int kv_page_tokens = 0;
  uint64_t kv_page_bytes = 0;
};

// ---- inspecting a checkpoint without loading it ----

// One tensor as the checkpoint stores it.
struct TensorInfo {
  std::string name;
  std::string type;            // element type: "BF16", "Q4_K", "F8_E4M3", ...
  std::vector<int64_t> shape;  // slowest dimension first
  uint64_t bytes = 0;
};

// The settings a memory plan depends on (Model::load takes them from LoadOptions).
struct PlanOptions {
  int context = 0;  // 0: the model's maximum context (per sequence)
  KvType kv_type = KvType::kBF16;
  int prefill_chunk = kCpuPrefillChunk;
  // Sequences decoded together: 1 is one session; N is an Engine with max_sequences N and its
  // default step (max(prefill_chunk, N) tokens): N caches of `context` tokens, and the step's
  // scratch with logits for N rows (gemma3/engine.h).
  int sequences = 1;
  // Global-layer positions the N sequences share (EngineOptions::kv_tokens); 0: N * context.
  int64_t kv_tokens = 0;
};

// What a checkpoint declares: its architecture, tokenizer ids, tensors, and the memory one
// session would take (inspect(): at the given PlanOptions; Model::info(): the loaded model's).
struct ModelInfo {
  std::string path;
  std::string format;      // "gguf" or "safetensors"
  std::string size_label;  // "270M", "1B", "4B", "12B", "27B", or "custom"
  bool base_model = false;
  bool has_vision = false;  // a vision tower is present (HF folder, or Model::load's mmproj)
  int n_layers = 0, hidden = 0, intermediate = 0;
  int n_heads = 0, n_kv_heads = 0, head_dim = 0;
  int vocab_size = 0;      // embedding rows (logits per position)
  int sliding_window = 0;  // W of the sliding-window layers
  int max_context = 0;
  std::string layer_pattern;  // one letter per layer: 'L' sliding window, 'G' global
  float rope_theta_local = 0, rope_theta_global = 0, rope_scale_global = 1;
  float query_pre_attn_scalar = 0, attention_scale = 0, rms_norm_eps = 0;
  int tokenizer_size = 0, bos_id = 0;
  std::vector<int32_t> eos_ids;
  std::vector<TensorInfo> tensors;  // the text model's, in the checkpoint's order
  uint64_t weight_bytes = 0;        // the text model's tensors as loaded
  MemoryReport memory;
};

// Reads a checkpoint's header, config and tokenizer (maps the file; uploads nothing, touches
// no tensor data) and plans one session's memory at `plan`. Errors as Model::load's for the
// file and for the plan's settings.
Result<ModelInfo> inspect(const std::string& path, const PlanOptions& plan = {});

// Named activation dump: (layer or -1, name, values). Installed on a session for debugging.
using ActivationHook = std::function<void(int layer, const std::string& name, const float* data, int64_t n)>;

// The ids of messages in the Gemma 3 chat format (what Session::feed_chat feeds, text between
// image blocks): <bos> when add_bos, <start_of_turn>role\n content <end_of_turn>\n per turn,
// and <start_of_turn>model\n when add_generation_prompt.
//
// Roles: "user", "model" ("assistant" is renamed to "model"), and "system" only as the first
// message, whose content (not trimmed, as in the template) plus "\n\n" is prepended to the
// first user message. User/model content is trimmed of leading and trailing whitespace (Python
// str.strip's whitespace set, as Jinja's `trim` uses). After an optional system message the roles
// must alternate user, model, user, ... (an invalid-argument error otherwise).
//
// Model content may hold any bytes: a reply as generate() streamed it can end inside a UTF-8
// character (cut by max_tokens, or a byte token of an emoji), and bytes that are not
// well-formed UTF-8 are rendered as their "<0xNN>" byte pieces, so re-rendering a conversation
// (feed_chat_truncating) never fails on what the model wrote. User and system content must be
// valid UTF-8 (the tokenizer's error otherwise).
//
// add_bos = false renders a continuation: the next turns of a session that already holds
// earlier ones (ending in "<end_of_turn>\n" or with a model reply just generated). Rendering
// [m0..mk] with add_bos and then [mk+1..mn] without it gives the same ids as rendering
// [m0..mn] at once when mk is a model turn. A continuation must start with a user message
// and may not contain a system message.
//
// Images: a user message with images (ChatMessage::images, then image_bytes) gets one image
// slot per "<start_of_image>" marker in its content (their count must equal the number of
// images), or, with no markers, one slot per image at the start of the text (where the HF
// template puts image items that precede the text). The text between slots is encoded piece by
// piece, so nothing merges across an image. Slot k's position (index into the returned ids
// where image k's block goes, in message order) is appended to *image_slots; images with
// image_slots == nullptr are an error.
Result<std::vector<int32_t>> render_chat(const Tokenizer& tokenizer, const std::vector<ChatMessage>& messages,
                                         bool add_bos, bool add_generation_prompt,
                                         std::vector<size_t>* image_slots = nullptr);

class Session;

class Model {
 public:
  virtual ~Model() = default;
  static Result<std::shared_ptr<Model>> load(const std::string& path, const LoadOptions& options);

  virtual const Tokenizer& tokenizer() const = 0;
  // The checkpoint as inspect() describes it (with the mmproj's vision tower when one was
  // attached), with the memory plan Model::load checked (one session).
  virtual const ModelInfo& info() const = 0;
  virtual int context_length() const = 0;  // tokens a session can hold
  virtual int vocab_size() const = 0;      // logits per position
  virtual std::string description() const = 0;
  virtual int image_size() const = 0;  // pixels per side the vision tower takes; 0: no vision tower
  // True when the checkpoint says it is a pre-trained (base) model rather than an
  // instruction-tuned one: a GGUF without a chat template whose general.finetune names no
  // instruction tune. Such a model completes text; under the chat template its replies are
  // poor. False when the checkpoint does not say (Hugging Face folders).
  virtual bool is_base_model() const = 0;
  // The plan Model::load checked against the backend's free memory (one session).
  virtual MemoryReport memory_plan() const = 0;
  // A session with the model's context (LoadOptions::context), or with its own.
  Result<std::unique_ptr<Session>> new_session() { return new_session(SessionOptions()); }
  virtual Result<std::unique_ptr<Session>> new_session(const SessionOptions& options) = 0;
  // Bytes read + written per second by a large copy in the backend's memory (GPU: device to
  // device; CPU: a memcpy on each thread), best of a few, measured now (about 0.1-1 s, while
  // sessions on other threads wait): the roofline decode speed is compared with. 0 if it
  // could not be measured (e.g. no memory left for the buffers).
  virtual double copy_bandwidth() = 0;
  // FLOP/s (2 per multiply-add) of a dense bf16 GEMM with fp32 accumulation of the shape
  // [m, k] x [k, n] on the backend's own library (cuBLAS on a GPU), best of a few, measured
  // now as copy_bandwidth is: the compute roofline prefill is compared with. 0 on the CPU
  // backend (no reference library) or if it could not be measured.
  virtual double gemm_rate(int64_t m, int64_t n, int64_t k) = 0;
};

class Session {
 public:
  virtual ~Session() = default;

  virtual int context_length() const = 0;  // tokens this session can hold (SessionOptions::context)

  // Appends token ids to the context and runs them through the model (chunked prefill).
  virtual Status feed_tokens(const std::vector<int32_t>& ids) = 0;
  // Plain text: BOS (if the context is empty) + text, no chat template.
  virtual Status feed_text(const std::string& text) = 0;
  // Renders messages with the Gemma 3 chat template, ending with the generation prompt
  // "<start_of_turn>model\n". On a non-empty session this continues the conversation. Images
  // (ChatMessage::images, image_bytes) are encoded and cached as feed_image does.
  virtual Status feed_chat(const std::vector<ChatMessage>& messages) = 0;
  // Appends one image: "\n\n" <start_of_image> N soft tokens <end_of_image> "\n\n" (N = 256 for
  // the real models; docs/vision.md), or with Pan & Scan the original and its crops with their
  // connecting text. Encoded images are cached in the session by file content, so asking again
  // about the same image does not re-run the vision tower. Needs a model with a vision tower.
  // On an empty context <bos> comes first, as with feed_text.
  virtual Status feed_image(const std::string& path) = 0;
  // The same for one preprocessed image: [3, S, S] floats, channels-first RGB, normalized as the
  // image processor does (S = image_size(); no Pan & Scan).
  virtual Status feed_image_pixels(const std::vector<float>& pixels) = 0;
  // feed_image for an image file's bytes held in memory (PNG, JPEG, BMP or GIF; the same
  // limits); errors name it "image bytes". The bytes may be released once the call returns.
  virtual Status feed_image_bytes(std::string_view bytes) = 0;

  // Samples tokens until one of the FinishReasons (gemma3.h, above) and returns which, with the
  // count; errors (bad options, a backend failure, an exception from on_token) are the Result's.
  // Text that could still begin a stop string is held back, and a stop string is never
  // streamed (the text before it is). What the context holds afterwards: every token streamed
  // or held back, except the last sampled one for kStopToken (the end-of-turn id), kStopString
  // (the token that completed the stop string), kCallback and kContextFull; those were sampled
  // from the last logits, which last_logits() still returns. After kMaxTokens and kCancelled
  // every sampled token is in the context and last_logits() follows the last of them.
  virtual Result<GenerateResult> generate(const GenerateOptions& options,
                                          const std::function<bool(const TokenEvent&)>& on_token) = 0;

  // Scoring: the log-probability of each token of `continuation` given everything before it
  // (the first given the current context, which must not be empty: start with <bos>), as
  // GenerateOptions::logprobs computes them. The continuation is fed, so the context ends with
  // it as after feed_tokens; on an error it holds what was fed before the error.
  virtual Result<std::vector<float>> score(const std::vector<int32_t>& continuation) = 0;

  // Logits of the last fed position ([vocab_size] floats), valid after feed_* / generate. After
  // generate they are the logits after its last token and are copied from the backend on the
  // first call (a decode step keeps them in backend memory: the token is sampled there).
  // Lifetime: the span views the session's own buffer; it stays valid until the next non-const
  // call on this session (feed_*, generate, score, clear, load_state...) or its destruction.
  // Copy what must outlive that (std::vector<float>(s.begin(), s.end())).
  virtual std::span<const float> last_logits() const = 0;
  // Logits of every position fed by the next feed_* call are kept when enabled (perplexity, tests).
  virtual void keep_all_logits(bool keep) = 0;
  // [n_fed, vocab_size] row-major, of the last feed_* call; the same lifetime as last_logits().
  virtual std::span<const float> all_logits() const = 0;

  virtual int position() const = 0;  // tokens in the context
  virtual void clear() = 0;          // forget the context
  virtual const Stats& stats() const = 0;
  virtual void set_activation_hook(ActivationHook hook) = 0;
  // Bytes this session allocated (KV, scratch) beside the model's weights.
  virtual MemoryReport memory() const = 0;

  // ---- long context ----
  virtual const std::vector<int32_t>& tokens() const = 0;  // the context's ids, in order
  // Context overflow, opt-in truncation (no shifting of ring buffers): clears the context and
  // feeds the whole conversation `messages` (chat template, generation prompt at the end). When
  // it plus `reserve` tokens for the reply does not fit, the oldest non-system messages are
  // dropped first (a user turn with the model reply after it) and erased from `messages`.
  // Returns how many messages were dropped; out-of-range when the last user turn alone does
  // not fit. (The default everywhere else is an out-of-range error naming the limit.)
  virtual Result<int> feed_chat_truncating(std::vector<ChatMessage>& messages, int reserve) = 0;
  // The prompt cache. save_state writes the context (token ids, each layer's cached K/V for the
  // live slots, the last logits) with a header naming the model (a fingerprint of its config and
  // tensors) and the settings its bytes depend on (context, KV type, prefill chunk).
  // load_state replaces the context with a saved one after checking all of it; on a mismatch or
  // a truncated or corrupt file it returns an error naming the field and leaves the session as
  // it was.
  virtual Status save_state(const std::string& path) const = 0;
  virtual Status load_state(const std::string& path) = 0;
  // The same state in memory: the bytes save_state writes, and load_state from such bytes
  // (checked as a file is; bytes may be released once the call returns). For a cache kept in a
  // database or sent to another process of the same model.
  virtual Result<std::string> save_state_to_memory() const = 0;
  virtual Status load_state_from_memory(std::string_view bytes) = 0;
  // A prompt fed through a state file, as llama.cpp's --prompt-cache: the context is cleared;
  // when `state_file` exists and holds a state of this model and settings whose tokens are a
  // prefix of `ids`, it is loaded and only the rest of `ids` is fed; then the whole context is
  // saved to `state_file` (created or replaced). Returns how many tokens were restored and,
  // when a file was there but not used, why (another model's, other settings, corrupt, not a
  // prefix). Errors of feeding or of writing the file are errors.
  struct PromptCacheUse {
    size_t restored = 0;
    std::string not_reused;  // empty when the file was used or absent
  };
  Result<PromptCacheUse> feed_tokens_with_state_file(const std::vector<int32_t>& ids,
                                                     const std::string& state_file);
  // A new session of the same model holding a copy of this one's context (tokens, K/V, last
  // logits, an open model turn) and stats: the two then continue independently, e.g. to branch
  // a conversation or draw several replies to one prompt. Encoded images are not copied.
  virtual Result<std::unique_ptr<Session>> fork() const = 0;
};

}  // namespace gemma3
