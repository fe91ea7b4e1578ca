// The OpenAI API as `gemma3 serve` speaks it (docs/server.md): request bodies of
// /v1/chat/completions and /v1/completions parsed into an EngineRequest, and the JSON of
// responses, stream chunks and errors. Pure functions of their inputs (no I/O, no model), so that
// the HTTP layer stays thin and the parser can be fuzzed (fuzz/fuzz_openai_request.cpp).
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "gemma3/engine.h"
#include "gemma3/gemma3.h"
#include "gemma3/tokenizer.h"

namespace gemma3::server {

// An error as OpenAI's API returns it: the HTTP status and
// {"error": {"message", "type", "param", "code"}}.
struct ApiError {
  int status = 0;  // 0: no error
  std::string message;
  std::string type;   // "invalid_request_error", "authentication_error", "not_found_error", ...
  std::string param;  // the offending field, "" when none
  std::string code;   // "model_not_found", "unsupported_parameter", ...
  explicit operator bool() const { return status != 0; }
};
ApiError bad_request(std::string message, std::string param = "", std::string code = "");
std::string error_json(const ApiError& e);

// What a request may hold (flags of `gemma3 serve`, docs/server.md).
struct RequestLimits {
  int max_messages = 256;             // chat messages per request
  int max_images = 4;                 // images per request
  size_t max_image_bytes = 8u << 20;  // one image's decoded bytes (PNG/JPEG file)
  int max_stop = 16;                  // stop strings
  size_t max_stop_bytes = 256;        // one stop string
  int context = 0;                    // a sequence's context: max_tokens above it is refused
  GenerateOptions defaults;           // sampling when a field is absent (the model's)
};

enum class Endpoint { kChat, kCompletions };

struct ApiRequest {
  Endpoint endpoint = Endpoint::kChat;
  EngineRequest engine;  // prompt (messages or text) and generation options
  std::string model;     // as given; "" when absent
  bool stream = false;
  bool include_usage = false;  // stream_options.include_usage
  bool logprobs = false;       // return logprobs (chat: logprobs; completions: logprobs >= 0)
  int top_logprobs = 0;
  bool seed_given = false;  // options.sampling.seed came from the request
};

// Parses a request body. On success fills *out and returns a falsy ApiError; otherwise the 400
// (or 404 for an unknown model is the caller's check) that names the field. Never throws.
ApiError parse_request(Endpoint endpoint, std::string_view body, const RequestLimits& limits,
                       ApiRequest* out);

// Decodes a data: URI ("data:image/png;base64,...") into the file's bytes. Remote URLs
// (http/https/file) are refused: the server fetches nothing.
ApiError decode_image_url(std::string_view url, size_t max_bytes, std::string* bytes);

// Joins a stream of byte pieces into valid UTF-8 text: take() returns the longest prefix of
// what was given so far that ends on a character boundary (a token's bytes can end inside a
// character); finish() returns the rest, a cut character as U+FFFD. Invalid bytes become U+FFFD.
class Utf8Joiner {
 public:
  std::string take(std::string_view bytes);
  std::string finish();

 private:
  std::string pending_;
};

// "stop" (a stop token or string), "length" (max_tokens, or the context is full), or "" for a
// request that did not finish by itself (cancelled).
std::string_view finish_reason(FinishReason reason);

struct Usage {
  int prompt_tokens = 0;
  int completion_tokens = 0;
  int cached_tokens = 0;  // prompt tokens whose KV was reused (prompt_tokens_details)
};

// The JSON of one request's responses. Not thread-safe: one per request.
class ResponseWriter {
 public:
  ResponseWriter(const ApiRequest& request, std::string id, int64_t created, std::string model,
                 const Tokenizer& tokenizer);

  // A stream chunk carrying `text` (valid UTF-8) and the logprobs of its tokens; the first call
  // of a chat stream also carries the role. Returns "" when there is nothing to send.
  std::string chunk(const std::string& text, const std::vector<TokenLogprobs>& logprobs);
  // The last chunk of a stream: empty delta, the finish reason.
  std::string final_chunk(FinishReason reason);
  // The usage chunk (stream_options.include_usage): choices [] and usage.
  std::string usage_chunk(const Usage& usage) const;
  // The whole response of a non-streamed request.
  std::string response(const std::string& text, const std::vector<TokenLogprobs>& logprobs,
                       FinishReason reason, const Usage& usage) const;

 private:
  // The JSON of `body` (a json object: choices, usage) with id, object, created and model.
  std::string envelope(bool streaming, const void* body) const;
  void add_logprobs(void* choice_json, const std::vector<TokenLogprobs>& logprobs, size_t text_offset) const;

  const ApiRequest& req_;
  std::string id_;
  int64_t created_;
  std::string model_;
  const Tokenizer& tok_;
  bool role_sent_ = false;
  size_t text_offset_ = 0;  // completions logprobs: bytes of text sent so far
};

}  // namespace gemma3::server
