// libFuzzer target: request bodies of gemma3 serve's /v1/chat/completions and /v1/completions
// through parse_request (tools/server/openai_api.h), straight from memory, and the bytes through
// Utf8Joiner. Error answers are expected; crashes, uncaught exceptions, sanitizer reports and
// leaks are findings, and so are these properties: a parsed request holds exactly one prompt and
// respects the limits; an error is a 4xx whose JSON parses; joined text is valid UTF-8 and does
// not depend on where the bytes were split.
#include <cstdint>
#include <nlohmann/json.hpp>
#include <string>
#include <string_view>

#include "fuzz_common.h"
#include "gemma3/util.h"
#include "server/openai_api.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace gemma3::server;
  const std::string_view body(reinterpret_cast<const char*>(data), size);
  RequestLimits limits;
  limits.context = 512;
  limits.max_images = 2;
  limits.max_image_bytes = 4096;
  for (Endpoint e : {Endpoint::kChat, Endpoint::kCompletions}) {
    ApiRequest r;
    const ApiError err = parse_request(e, body, limits, &r);
    if (err) {
      FUZZ_CHECK(err.status >= 400 && err.status < 500);
      FUZZ_CHECK(!err.message.empty());
      FUZZ_CHECK(!nlohmann::json::parse(error_json(err), nullptr, false).is_discarded());
      continue;
    }
    FUZZ_CHECK(r.engine.messages.empty() != r.engine.text.empty());
    FUZZ_CHECK(r.engine.options.max_tokens == -1 ||
               (r.engine.options.max_tokens >= 1 && r.engine.options.max_tokens <= limits.context));
    FUZZ_CHECK(static_cast<int>(r.engine.options.stop_strings.size()) <= limits.max_stop);
    FUZZ_CHECK(r.engine.options.top_logprobs >= 0 &&
               r.engine.options.top_logprobs <= gemma3::kMaxTopLogprobs);
    int images = 0;
    for (const gemma3::ChatMessage& m : r.engine.messages)
      for (const std::string& b : m.image_bytes) {
        FUZZ_CHECK(!b.empty() && b.size() <= limits.max_image_bytes);
        ++images;
      }
    FUZZ_CHECK(images <= limits.max_images);
  }
  // The bytes split in two at a point the input picks, against all at once.
  Utf8Joiner whole, split;
  const std::string all = whole.take(body) + whole.finish();
  FUZZ_CHECK(gemma3::find_invalid_utf8(all) == std::string::npos);
  const size_t cut = size ? data[0] % (size + 1) : 0;
  const std::string parts = split.take(body.substr(0, cut)) + split.take(body.substr(cut)) + split.finish();
  FUZZ_CHECK(parts == all);
  return 0;
}
