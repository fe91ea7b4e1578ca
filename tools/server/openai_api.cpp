#include "openai_api.h"

#include <fmt/format.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <limits>
#include <nlohmann/json.hpp>
#include <utility>

#include "gemma3/util.h"

namespace gemma3::server {

using json = nlohmann::json;

namespace {

// Nesting deeper than this is refused before parsing: nlohmann builds every level as a value,
// so a body of a million '[' would otherwise cost gigabytes.
constexpr int kMaxJsonDepth = 64;

bool too_deep(std::string_view s) {
  int depth = 0;
  bool in_string = false;
  for (size_t i = 0; i < s.size(); ++i) {
    const char c = s[i];
    if (in_string) {
      if (c == '\\')
        ++i;
      else if (c == '"')
        in_string = false;
    } else if (c == '"') {
      in_string = true;
    } else if (c == '[' || c == '{') {
      if (++depth > kMaxJsonDepth) return true;
    } else if (c == ']' || c == '}') {
      --depth;
    }
  }
  return false;
}

const json* field(const json& o, const char* name) {
  auto it = o.find(name);
  if (it == o.end() || it->is_null()) return nullptr;
  return &*it;
}

ApiError type_error(const char* name, const char* expected) {
  return bad_request(fmt::format("'{}' must be {}", name, expected), name);
}

ApiError get_number(const json& o, const char* name, double lo, double hi, float* out) {
  const json* v = field(o, name);
  if (!v) return {};
  if (!v->is_number()) return type_error(name, "a number");
  const double d = v->get<double>();
  if (!(d >= lo && d <= hi))
    return bad_request(fmt::format("'{}' must be in [{}, {}], got {}", name, lo, hi, d), name);
  *out = static_cast<float>(d);
  return {};
}

ApiError get_int(const json& o, const char* name, int64_t lo, int64_t hi, int64_t* out,
                 bool* given = nullptr) {
  const json* v = field(o, name);
  if (!v) return {};
  // 3.0 is accepted as 3 (JavaScript clients send integers as doubles).
  const double d = v->is_number() ? v->get<double>() : 0.5;
  const bool whole_float = v->is_number_float() && std::floor(d) == d && std::fabs(d) < 9e15;
  if (!v->is_number_integer() && !whole_float) return type_error(name, "an integer");
  const int64_t i = v->is_number_integer() ? v->get<int64_t>() : static_cast<int64_t>(d);
  if (v->is_number_unsigned() &&
      v->get<uint64_t>() > static_cast<uint64_t>(std::numeric_limits<int64_t>::max()))
    return bad_request(fmt::format("'{}' must be in [{}, {}]", name, lo, hi), name);
  if (i < lo || i > hi)
    return bad_request(fmt::format("'{}' must be in [{}, {}], got {}", name, lo, hi, i), name);
  *out = i;
  if (given) *given = true;
  return {};
}

ApiError get_bool(const json& o, const char* name, bool* out) {
  const json* v = field(o, name);
  if (!v) return {};
  if (!v->is_boolean()) return type_error(name, "true or false");
  *out = v->get<bool>();
  return {};
}

// Fields we know and refuse rather than ignore (the result would silently differ from what
// the client asked for).
ApiError refuse_unsupported(const json& o) {
  if (const json* rf = field(o, "response_format")) {
    const json* t = rf->is_object() ? field(*rf, "type") : nullptr;
    if (!t || !t->is_string() || t->get<std::string>() != "text")
      return bad_request(
          "'response_format' other than {\"type\": \"text\"} is not supported: gemma3 serve has no "
          "constrained "
          "(JSON) decoding",
          "response_format", "unsupported_parameter");
  }
  for (const char* name : {"tools", "functions"}) {
    const json* v = field(o, name);
    if (v && !(v->is_array() && v->empty()))
      return bad_request(
          fmt::format("'{}' is not supported: Gemma 3 has no tool-calling format in gemma3 serve", name),
          name, "unsupported_parameter");
  }
  for (const char* name : {"tool_choice", "function_call"}) {
    const json* v = field(o, name);
    if (v && !(v->is_string() && v->get<std::string>() == "none"))
      return bad_request(fmt::format("'{}' is not supported (only \"none\")", name), name,
                         "unsupported_parameter");
  }
  for (const char* name : {"presence_penalty", "frequency_penalty"}) {
    const json* v = field(o, name);
    if (v && !(v->is_number() && v->get<double>() == 0))
      return bad_request(
          fmt::format(
              "'{}' is not supported (use 'repeat_penalty', a llama.cpp-style multiplicative penalty)", name),
          name, "unsupported_parameter");
  }
  if (const json* v = field(o, "logit_bias"); v && !(v->is_object() && v->empty()))
    return bad_request("'logit_bias' is not supported", "logit_bias", "unsupported_parameter");
  for (const char* name : {"n", "best_of"}) {
    const json* v = field(o, name);
    if (v && !(v->is_number_integer() && v->get<int64_t>() == 1))
      return bad_request(fmt::format("'{}' must be 1: one choice per request", name), name,
                         "unsupported_parameter");
  }
  if (const json* v = field(o, "echo"); v && !(v->is_boolean() && !v->get<bool>()))
    return bad_request("'echo' is not supported", "echo", "unsupported_parameter");
  if (const json* v = field(o, "suffix"); v && !(v->is_string() && v->get<std::string>().empty()))
    return bad_request("'suffix' is not supported (Gemma 3 has no fill-in-the-middle format)", "suffix",
                       "unsupported_parameter");
  return {};
}

ApiError parse_sampling(const json& o, const RequestLimits& limits, ApiRequest* r) {
  GenerateOptions& g = r->engine.options;
  SamplingOptions& s = g.sampling;
  ApiError e;
  if ((e = get_number(o, "temperature", 0, 100, &s.temperature))) return e;
  if ((e = get_number(o, "top_p", 0, 1, &s.top_p))) return e;
  if ((e = get_number(o, "min_p", 0, 1, &s.min_p))) return e;
  if ((e = get_number(o, "repeat_penalty", 0, 100, &s.repeat_penalty))) return e;
  if (s.top_p == 0) s.top_p = 1e-6f;  // OpenAI accepts 0: the most likely token only
  int64_t v = s.top_k;
  if ((e = get_int(o, "top_k", -1, 1 << 20, &v))) return e;
  s.top_k = v < 0 ? 0 : static_cast<int>(v);  // -1: off (vLLM's spelling)
  v = s.repeat_last_n;
  if ((e = get_int(o, "repeat_last_n", 0, 1 << 20, &v))) return e;
  s.repeat_last_n = static_cast<int>(v);
  int64_t seed = 0;
  if ((e = get_int(o, "seed", std::numeric_limits<int64_t>::min(), std::numeric_limits<int64_t>::max(), &seed,
                   &r->seed_given)))
    return e;
  if (r->seed_given) s.seed = static_cast<uint64_t>(seed);

  const int64_t max_tokens_hi = limits.context > 0 ? limits.context : (1 << 30);
  for (const char* name : {"max_tokens", "max_completion_tokens"}) {
    v = -1;
    bool given = false;
    if ((e = get_int(o, name, 1, max_tokens_hi, &v, &given))) return e;
    if (given) g.max_tokens = static_cast<int>(v);
  }
  if ((e = get_bool(o, "ignore_eos", &g.ignore_eos))) return e;

  if (const json* stop = field(o, "stop")) {
    std::vector<std::string> list;
    if (stop->is_string()) {
      list.push_back(stop->get<std::string>());
    } else if (stop->is_array()) {
      for (const json& x : *stop) {
        if (!x.is_string()) return type_error("stop", "a string or an array of strings");
        list.push_back(x.get<std::string>());
      }
    } else {
      return type_error("stop", "a string or an array of strings");
    }
    if (static_cast<int>(list.size()) > limits.max_stop)
      return bad_request(fmt::format("'stop' has {} strings; at most {}", list.size(), limits.max_stop),
                         "stop");
    for (const std::string& s1 : list) {
      if (s1.size() > limits.max_stop_bytes)
        return bad_request(
            fmt::format("a 'stop' string is {} bytes; at most {}", s1.size(), limits.max_stop_bytes), "stop");
      if (!s1.empty()) g.stop_strings.push_back(s1);
    }
  }

  if (const json* so = field(o, "stream_options")) {
    if (!so->is_object()) return type_error("stream_options", "an object");
    if ((e = get_bool(*so, "include_usage", &r->include_usage))) return e;
  }
  return {};
}

ApiError parse_content(const json& content, size_t index, const RequestLimits& limits, ChatMessage* m,
                       int* images) {
  const std::string param = fmt::format("messages[{}].content", index);
  if (content.is_string()) {
    m->content = content.get<std::string>();
    return {};
  }
  if (!content.is_array()) return bad_request("must be a string or an array of content parts", param);
  // The Hugging Face Gemma 3 template: an image part is <start_of_image>, a text part its text
  // trimmed, nothing between parts (docs/server.md).
  for (size_t k = 0; k < content.size(); ++k) {
    const json& part = content[k];
    const std::string pp = fmt::format("{}[{}]", param, k);
    const json* type = part.is_object() ? field(part, "type") : nullptr;
    if (!type || !type->is_string()) return bad_request("a content part must be an object with a 'type'", pp);
    const std::string t = type->get<std::string>();
    if (t == "text") {
      const json* text = field(part, "text");
      if (!text || !text->is_string()) return bad_request("a text part needs a string 'text'", pp);
      std::string s = text->get<std::string>();
      const size_t b = s.find_first_not_of(" \t\n\r\f\v");
      s = b == std::string::npos ? "" : s.substr(b, s.find_last_not_of(" \t\n\r\f\v") - b + 1);
      m->content += s;
    } else if (t == "image_url") {
      const json* iu = field(part, "image_url");
      const json* url = iu && iu->is_object() ? field(*iu, "url") : (iu && iu->is_string() ? iu : nullptr);
      if (!url || !url->is_string())
        return bad_request("an image_url part needs 'image_url': {\"url\": ...}", pp);
      if (++*images > limits.max_images)
        return bad_request(
            fmt::format("more than {} images in one request (--max-images)", limits.max_images), pp);
      std::string bytes;
      if (ApiError e = decode_image_url(url->get<std::string>(), limits.max_image_bytes, &bytes)) {
        e.param = pp + ".image_url.url";
        return e;
      }
      m->content += "<start_of_image>";
      m->image_bytes.push_back(std::move(bytes));
    } else {
      return bad_request(fmt::format("content part type '{}' is not supported (text, image_url)", t), pp);
    }
  }
  return {};
}

ApiError parse_messages(const json& o, const RequestLimits& limits, ApiRequest* r) {
  const json* msgs = field(o, "messages");
  if (!msgs) return bad_request("'messages' is required", "messages");
  if (!msgs->is_array() || msgs->empty())
    return bad_request("'messages' must be a non-empty array", "messages");
  if (static_cast<int>(msgs->size()) > limits.max_messages)
    return bad_request(fmt::format("'messages' has {} entries; at most {} (--max-messages)", msgs->size(),
                                   limits.max_messages),
                       "messages");
  int images = 0;
  for (size_t i = 0; i < msgs->size(); ++i) {
    const json& m = (*msgs)[i];
    const std::string param = fmt::format("messages[{}]", i);
    if (!m.is_object()) return bad_request("a message must be an object", param);
    const json* role = field(m, "role");
    if (!role || !role->is_string()) return bad_request("a message needs a string 'role'", param + ".role");
    ChatMessage cm;
    cm.role = role->get<std::string>();
    if (cm.role == "developer") cm.role = "system";  // OpenAI's newer name for it
    if (cm.role == "assistant") cm.role = "model";
    if (cm.role != "system" && cm.role != "user" && cm.role != "model")
      return bad_request(
          fmt::format("role '{}' is not supported (system, developer, user, assistant)", cm.role),
          param + ".role");
    if (const json* content = field(m, "content")) {
      if (ApiError e = parse_content(*content, i, limits, &cm, &images)) return e;
    } else if (cm.role != "model") {
      return bad_request("a message needs 'content'", param + ".content");
    }
    if (!cm.image_bytes.empty() && cm.role != "user")
      return bad_request("only user messages may hold images", param + ".content");
    if (field(m, "tool_calls") || cm.role == "tool")
      return bad_request("tool calls are not supported", param, "unsupported_parameter");
    r->engine.messages.push_back(std::move(cm));
  }
  return {};
}

ApiError parse_prompt(const json& o, ApiRequest* r) {
  const json* p = field(o, "prompt");
  if (!p) return bad_request("'prompt' is required", "prompt");
  if (p->is_array()) {
    if (p->size() != 1 || !(*p)[0].is_string())
      return bad_request(
          "'prompt' must be a string (or an array of exactly one string): one prompt per request", "prompt");
    p = &(*p)[0];
  }
  if (!p->is_string()) return type_error("prompt", "a string");
  r->engine.text = p->get<std::string>();
  if (r->engine.text.empty()) return bad_request("'prompt' is empty", "prompt");
  return {};
}

int base64_value(unsigned char c) {
  if (c >= 'A' && c <= 'Z') return c - 'A';
  if (c >= 'a' && c <= 'z') return c - 'a' + 26;
  if (c >= '0' && c <= '9') return c - '0' + 52;
  if (c == '+' || c == '-') return 62;
  if (c == '/' || c == '_') return 63;
  return -1;
}

}  // namespace

ApiError bad_request(std::string message, std::string param, std::string code) {
  ApiError e;
  e.status = 400;
  e.message = std::move(message);
  e.type = "invalid_request_error";
  e.param = std::move(param);
  e.code = std::move(code);
  return e;
}

std::string error_json(const ApiError& e) {
  json err = {{"message", e.message}, {"type", e.type}};
  err["param"] = e.param.empty() ? json(nullptr) : json(e.param);
  err["code"] = e.code.empty() ? json(nullptr) : json(e.code);
  return json{{"error", err}}.dump(-1, ' ', false, json::error_handler_t::replace);  // invalid UTF-8: U+FFFD
}

ApiError decode_image_url(std::string_view url, size_t max_bytes, std::string* bytes) {
  if (!url.starts_with("data:")) {
    const size_t colon = url.find(':');
    return bad_request(
        fmt::format("image URL scheme '{}' is refused: the server fetches nothing; send the image "
                    "inline as a data:image/png;base64,... or data:image/jpeg;base64,... URI",
                    colon == std::string_view::npos ? std::string_view("(none)") : url.substr(0, colon)),
        "", "invalid_image_url");
  }
  const size_t comma = url.find(',');
  if (comma == std::string_view::npos)
    return bad_request("malformed data: URI (no ',')", "", "invalid_image_url");
  const std::string_view meta = url.substr(5, comma - 5);
  if (!meta.ends_with(";base64"))
    return bad_request("a data: image URI must be base64 (data:image/png;base64,...)", "",
                       "invalid_image_url");
  const std::string_view mime = meta.substr(0, meta.size() - 7);
  if (!mime.starts_with("image/"))
    return bad_request(fmt::format("data: URI media type '{}' is not an image", mime), "",
                       "invalid_image_url");
  const std::string_view b64 = url.substr(comma + 1);
  if (b64.size() / 4 * 3 > max_bytes + 3)
    return bad_request(
        fmt::format("image is about {} bytes; at most {} (--max-image-bytes)", b64.size() / 4 * 3, max_bytes),
        "", "image_too_large");
  bytes->clear();
  bytes->reserve(b64.size() / 4 * 3);
  uint32_t acc = 0;
  int bits = 0;
  size_t i = 0;
  for (; i < b64.size(); ++i) {
    const unsigned char c = static_cast<unsigned char>(b64[i]);
    if (c == '=') break;
    if (c == '\n' || c == '\r' || c == ' ') continue;
    const int v = base64_value(c);
    if (v < 0)
      return bad_request(fmt::format("invalid base64 at byte {} of the image data", i), "",
                         "invalid_image_url");
    acc = (acc << 6) | static_cast<uint32_t>(v);
    bits += 6;
    if (bits >= 8) {
      bits -= 8;
      bytes->push_back(static_cast<char>((acc >> bits) & 0xff));
    }
  }
  for (; i < b64.size(); ++i)
    if (b64[i] != '=' && b64[i] != '\n' && b64[i] != '\r')
      return bad_request("invalid base64: data after '=' padding", "", "invalid_image_url");
  if (bytes->empty()) return bad_request("the image data is empty", "", "invalid_image_url");
  if (bytes->size() > max_bytes)
    return bad_request(
        fmt::format("image is {} bytes; at most {} (--max-image-bytes)", bytes->size(), max_bytes), "",
        "image_too_large");
  return {};
}

ApiError parse_request(Endpoint endpoint, std::string_view body, const RequestLimits& limits,
                       ApiRequest* out) {
  try {
    *out = ApiRequest{};
    out->endpoint = endpoint;
    out->engine.options = limits.defaults;
    if (too_deep(body)) return bad_request(fmt::format("JSON nested deeper than {} levels", kMaxJsonDepth));
    const json o = json::parse(body, nullptr, /*allow_exceptions=*/false);
    if (o.is_discarded()) return bad_request("the body is not valid JSON");
    if (!o.is_object()) return bad_request("the body must be a JSON object");
    ApiError e;
    if (const json* m = field(o, "model")) {
      if (!m->is_string()) return type_error("model", "a string");
      out->model = m->get<std::string>();
    }
    if ((e = refuse_unsupported(o))) return e;
    if ((e = get_bool(o, "stream", &out->stream))) return e;
    if ((e = parse_sampling(o, limits, out))) return e;
    if (endpoint == Endpoint::kChat) {
      if ((e = parse_messages(o, limits, out))) return e;
      if ((e = get_bool(o, "logprobs", &out->logprobs))) return e;
      int64_t top = 0;
      if ((e = get_int(o, "top_logprobs", 0, kMaxTopLogprobs, &top))) return e;
      if (top > 0 && !out->logprobs)
        return bad_request("'top_logprobs' needs 'logprobs': true", "top_logprobs");
      out->top_logprobs = static_cast<int>(top);
    } else {
      if ((e = parse_prompt(o, out))) return e;
      // Completions: 'logprobs' is the number of top alternatives (0..5 in OpenAI; up to 20 here).
      int64_t top = -1;
      bool given = false;
      if (const json* lp = field(o, "logprobs"); lp && lp->is_boolean()) {
        out->logprobs = lp->get<bool>();
      } else {
        if ((e = get_int(o, "logprobs", 0, kMaxTopLogprobs, &top, &given))) return e;
        out->logprobs = given;
        out->top_logprobs = given ? static_cast<int>(top) : 0;
      }
    }
    out->engine.options.logprobs = out->logprobs;
    out->engine.options.top_logprobs = out->top_logprobs;
    if (!out->stream && out->include_usage) out->include_usage = false;
    return {};
  } catch (const std::exception& ex) {  // nlohmann type errors we did not foresee; bad_alloc
    return bad_request(fmt::format("malformed request: {}", ex.what()));
  }
}

// ---- UTF-8 ---------------------------------------------------------------------------------

namespace {
// The length of the UTF-8 sequence starting with lead byte c; 0 for a byte that cannot start one.
int utf8_length(unsigned char c) {
  if (c < 0x80) return 1;
  if (c >= 0xc2 && c <= 0xdf) return 2;
  if (c >= 0xe0 && c <= 0xef) return 3;
  if (c >= 0xf0 && c <= 0xf4) return 4;
  return 0;
}
// Valid UTF-8 of s, each maximal invalid subpart replaced by one U+FFFD (Unicode's "best
// practice", as Python's errors="replace"): a lead byte and the valid continuation bytes after
// it that do not complete a character, or one byte that cannot start one. The result does not
// depend on where the bytes were split, as long as splits fall before a lead byte.
std::string repair(std::string_view s) {
  std::string out;
  size_t i = 0;
  while (i < s.size()) {
    const unsigned char c = static_cast<unsigned char>(s[i]);
    const int len = utf8_length(c);
    if (len == 1) {
      out += static_cast<char>(c);
      ++i;
      continue;
    }
    // The second byte's range depends on the lead (no overlongs, surrogates, > U+10FFFF).
    unsigned char lo = 0x80, hi = 0xbf;
    if (c == 0xe0) lo = 0xa0;
    if (c == 0xed) hi = 0x9f;
    if (c == 0xf0) lo = 0x90;
    if (c == 0xf4) hi = 0x8f;
    int k = 0;  // valid continuation bytes after the lead
    while (len > 0 && k < len - 1 && i + 1 + k < s.size()) {
      const unsigned char b = static_cast<unsigned char>(s[i + 1 + k]);
      if (k == 0 ? (b < lo || b > hi) : (b & 0xc0) != 0x80) break;
      ++k;
    }
    if (len > 0 && k == len - 1) {
      out.append(s.substr(i, len));
    } else {
      out += "\xEF\xBF\xBD";
    }
    i += 1 + k;
  }
  return out;
}
}  // namespace

std::string Utf8Joiner::take(std::string_view bytes) {
  pending_.append(bytes);
  // Keep back an incomplete sequence at the end (at most 3 bytes).
  size_t cut = pending_.size();
  for (size_t back = 1; back <= 3 && back <= pending_.size(); ++back) {
    const unsigned char c = static_cast<unsigned char>(pending_[pending_.size() - back]);
    if ((c & 0xc0) == 0x80) continue;  // a continuation byte: look further back
    const int len = utf8_length(c);
    if (len > static_cast<int>(back)) cut = pending_.size() - back;
    break;
  }
  std::string out = repair(std::string_view(pending_).substr(0, cut));
  pending_.erase(0, cut);
  return out;
}

std::string Utf8Joiner::finish() {
  std::string out = repair(pending_);
  pending_.clear();
  return out;
}

std::string_view finish_reason(FinishReason reason) {
  switch (reason) {
    case FinishReason::kStopToken:
    case FinishReason::kStopString: return "stop";
    case FinishReason::kMaxTokens:
    case FinishReason::kContextFull: return "length";
    case FinishReason::kCancelled:
    case FinishReason::kCallback: break;
  }
  return "";
}

// ---- responses -----------------------------------------------------------------------------

namespace {
json usage_json(const Usage& u) {
  return {{"prompt_tokens", u.prompt_tokens},
          {"completion_tokens", u.completion_tokens},
          {"total_tokens", u.prompt_tokens + u.completion_tokens},
          {"prompt_tokens_details", {{"cached_tokens", u.cached_tokens}}}};
}
std::string dump(const json& j) { return j.dump(-1, ' ', false, json::error_handler_t::replace); }
}  // namespace

ResponseWriter::ResponseWriter(const ApiRequest& request, std::string id, int64_t created, std::string model,
                               const Tokenizer& tokenizer)
    : req_(request), id_(std::move(id)), created_(created), model_(std::move(model)), tok_(tokenizer) {}

std::string ResponseWriter::envelope(bool streaming, const void* body) const {
  const bool chat = req_.endpoint == Endpoint::kChat;
  json j = *static_cast<const json*>(body);
  j["id"] = id_;
  j["object"] = chat ? (streaming ? "chat.completion.chunk" : "chat.completion") : "text_completion";
  j["created"] = created_;
  j["model"] = model_;
  return dump(j);
}

void ResponseWriter::add_logprobs(void* choice_json, const std::vector<TokenLogprobs>& logprobs,
                                  size_t text_offset) const {
  json& choice = *static_cast<json*>(choice_json);
  auto token_json = [&](int32_t id, float lp) {
    const std::string text = tok_.decode(id);
    json bytes = json::array();
    for (unsigned char c : text) bytes.push_back(static_cast<int>(c));
    const float v = std::isfinite(lp) ? lp : -9999.0f;  // JSON has no -inf; OpenAI uses -9999
    return json{{"token", text}, {"logprob", v}, {"bytes", bytes}};
  };
  if (req_.endpoint == Endpoint::kChat) {
    json content = json::array();
    for (const TokenLogprobs& t : logprobs) {
      json entry = token_json(t.id, t.logprob);
      json top = json::array();
      for (const TokenLogprob& a : t.top) top.push_back(token_json(a.id, a.logprob));
      entry["top_logprobs"] = top;
      content.push_back(entry);
    }
    choice["logprobs"] = {{"content", content}};
    return;
  }
  json tokens = json::array(), token_logprobs = json::array(), top_logprobs = json::array(),
       offsets = json::array();
  size_t offset = text_offset;
  for (const TokenLogprobs& t : logprobs) {
    const std::string text = tok_.decode(t.id);
    tokens.push_back(text);
    token_logprobs.push_back(std::isfinite(t.logprob) ? t.logprob : -9999.0f);
    json top = json::object();
    for (const TokenLogprob& a : t.top)
      top[tok_.decode(a.id)] = std::isfinite(a.logprob) ? a.logprob : -9999.0f;
    top_logprobs.push_back(top);
    offsets.push_back(offset);
    offset += text.size();
  }
  choice["logprobs"] = {{"tokens", tokens},
                        {"token_logprobs", token_logprobs},
                        {"top_logprobs", top_logprobs},
                        {"text_offset", offsets}};
}

std::string ResponseWriter::chunk(const std::string& text, const std::vector<TokenLogprobs>& logprobs) {
  const bool chat = req_.endpoint == Endpoint::kChat;
  if (text.empty() && logprobs.empty() && (role_sent_ || !chat)) return "";
  json choice = {{"index", 0}, {"finish_reason", nullptr}};
  if (chat) {
    json delta = {{"content", text}};
    if (!role_sent_) delta["role"] = "assistant";
    role_sent_ = true;
    choice["delta"] = delta;
  } else {
    choice["text"] = text;
  }
  if (req_.logprobs)
    add_logprobs(&choice, logprobs, text_offset_);
  else
    choice["logprobs"] = nullptr;
  text_offset_ += text.size();
  const json body = {{"choices", json::array({choice})}};
  return envelope(true, &body);
}

std::string ResponseWriter::final_chunk(FinishReason reason) {
  const bool chat = req_.endpoint == Endpoint::kChat;
  json choice = {{"index", 0}, {"finish_reason", std::string(finish_reason(reason))}, {"logprobs", nullptr}};
  if (chat) {
    json delta = json::object();
    if (!role_sent_) delta = {{"role", "assistant"}, {"content", ""}};
    role_sent_ = true;
    choice["delta"] = delta;
  } else {
    choice["text"] = "";
  }
  const json body = {{"choices", json::array({choice})}};
  return envelope(true, &body);
}

std::string ResponseWriter::usage_chunk(const Usage& usage) const {
  const json body = {{"choices", json::array()}, {"usage", usage_json(usage)}};
  return envelope(true, &body);
}

std::string ResponseWriter::response(const std::string& text, const std::vector<TokenLogprobs>& logprobs,
                                     FinishReason reason, const Usage& usage) const {
  json choice = {{"index", 0}, {"finish_reason", std::string(finish_reason(reason))}};
  if (req_.endpoint == Endpoint::kChat)
    choice["message"] = {{"role", "assistant"}, {"content", text}};
  else
    choice["text"] = text;
  if (req_.logprobs)
    add_logprobs(&choice, logprobs, 0);
  else
    choice["logprobs"] = nullptr;
  const json body = {{"choices", json::array({choice})}, {"usage", usage_json(usage)}};
  return envelope(false, &body);
}

}  // namespace gemma3::server
