// gemma3 serve's OpenAI API (tools/server, issue #18): the request parser and response JSON
// (pure functions), then a Server on the tiny models answering over HTTP: greedy outputs equal a
// lone Session's, SSE framing, usage, logprobs, images as data: URIs, every error status,
// concurrent clients equal sequential runs, a client that disconnects frees its request, and a
// stop that drains. tests/server/test_openai.py drives the real binary with the openai client.
#include <fmt/format.h>
#include <gtest/gtest.h>
#include <httplib.h>

#include <atomic>
#include <chrono>
#include <fstream>
#include <functional>
#include <iterator>
#include <nlohmann/json.hpp>
#include <string>
#include <thread>
#include <vector>

#include "gemma3/engine.h"
#include "gemma3/gemma3.h"
#include "server/openai_api.h"
#include "server/server.h"
#include "test_util.h"

namespace gemma3::server {
namespace {

using json = nlohmann::json;

ApiRequest parse_ok(Endpoint e, const std::string& body, RequestLimits limits = {}) {
  ApiRequest r;
  ApiError err = parse_request(e, body, limits, &r);
  EXPECT_FALSE(err) << body << " -> " << err.message;
  return r;
}

ApiError parse_err(Endpoint e, const std::string& body, RequestLimits limits = {}) {
  ApiRequest r;
  return parse_request(e, body, limits, &r);
}

std::string base64(const std::string& bytes) {
  static const char* k = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
  std::string out;
  size_t i = 0;
  for (; i + 2 < bytes.size(); i += 3) {
    const uint32_t v = (uint8_t(bytes[i]) << 16) | (uint8_t(bytes[i + 1]) << 8) | uint8_t(bytes[i + 2]);
    out += {k[v >> 18], k[(v >> 12) & 63], k[(v >> 6) & 63], k[v & 63]};
  }
  if (bytes.size() - i == 1) {
    const uint32_t v = uint8_t(bytes[i]) << 16;
    out += {k[v >> 18], k[(v >> 12) & 63], '=', '='};
  } else if (bytes.size() - i == 2) {
    const uint32_t v = (uint8_t(bytes[i]) << 16) | (uint8_t(bytes[i + 1]) << 8);
    out += {k[v >> 18], k[(v >> 12) & 63], k[(v >> 6) & 63], '='};
  }
  return out;
}

std::string file_bytes(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  return {std::istreambuf_iterator<char>(f), {}};
}

TEST(OpenAiParse, ChatFieldsBecomeEngineOptions) {
  const ApiRequest r = parse_ok(Endpoint::kChat, R"({"model": "m", "messages": [
      {"role": "system", "content": "Be brief."},
      {"role": "user", "content": [{"type": "text", "text": "  Hi  "}, {"type": "text", "text": "there"}]},
      {"role": "assistant", "content": "Hello"},
      {"role": "user", "content": "Again"}],
    "temperature": 0.5, "top_p": 0.9, "top_k": 40, "min_p": 0.05, "seed": 7, "max_completion_tokens": 12,
    "stop": ["\n\n", "END"], "logprobs": true, "top_logprobs": 3, "stream": true,
    "stream_options": {"include_usage": true}, "user": "ignored", "n": 1})");
  EXPECT_EQ(r.model, "m");
  ASSERT_EQ(r.engine.messages.size(), 4u);
  EXPECT_EQ(r.engine.messages[1].content, "Hithere");  // parts trimmed and joined (the HF template)
  EXPECT_EQ(r.engine.messages[2].role, "model");
  const GenerateOptions& g = r.engine.options;
  EXPECT_FLOAT_EQ(g.sampling.temperature, 0.5f);
  EXPECT_FLOAT_EQ(g.sampling.top_p, 0.9f);
  EXPECT_EQ(g.sampling.top_k, 40);
  EXPECT_FLOAT_EQ(g.sampling.min_p, 0.05f);
  EXPECT_EQ(g.sampling.seed, 7u);
  EXPECT_TRUE(r.seed_given);
  EXPECT_EQ(g.max_tokens, 12);
  EXPECT_EQ(g.stop_strings, (std::vector<std::string>{"\n\n", "END"}));
  EXPECT_TRUE(g.logprobs);
  EXPECT_EQ(g.top_logprobs, 3);
  EXPECT_TRUE(r.stream);
  EXPECT_TRUE(r.include_usage);
}

TEST(OpenAiParse, AbsentFieldsTakeTheDefaults) {
  RequestLimits limits;
  limits.defaults.sampling.top_k = 64;
  limits.defaults.max_tokens = -1;
  const ApiRequest r =
      parse_ok(Endpoint::kCompletions, R"({"prompt": ["Once"], "logprobs": 2, "stop": "x"})", limits);
  EXPECT_EQ(r.engine.text, "Once");
  EXPECT_EQ(r.engine.options.sampling.top_k, 64);
  EXPECT_EQ(r.engine.options.max_tokens, -1);
  EXPECT_FALSE(r.seed_given);
  EXPECT_TRUE(r.logprobs);
  EXPECT_EQ(r.top_logprobs, 2);
  EXPECT_EQ(r.engine.options.stop_strings, std::vector<std::string>{"x"});
}

TEST(OpenAiParse, ImagePartsBecomeMarkersAndBytes) {
  const std::string png = file_bytes(testutil::data_path("images/rgb_300x90.png"));
  ASSERT_FALSE(png.empty());
  const ApiRequest r = parse_ok(
      Endpoint::kChat,
      json{{"messages",
            {{{"role", "user"},
              {"content",
               {{{"type", "text"}, {"text", "Look: "}},
                {{"type", "image_url"}, {"image_url", {{"url", "data:image/png;base64," + base64(png)}}}},
                {{"type", "text"}, {"text", " what is it?"}}}}}}}}
          .dump());
  ASSERT_EQ(r.engine.messages.size(), 1u);
  EXPECT_EQ(r.engine.messages[0].content, "Look:<start_of_image>what is it?");
  ASSERT_EQ(r.engine.messages[0].image_bytes.size(), 1u);
  EXPECT_EQ(r.engine.messages[0].image_bytes[0], png);
}

TEST(OpenAiParse, RefusesWhatItCannotHonour) {
  struct Case {
    const char* body;
    const char* param;
  };
  const Case cases[] = {
      {R"({"messages":[{"role":"user","content":"x"}],"response_format":{"type":"json_object"}})",
       "response_format"},
      {R"({"messages":[{"role":"user","content":"x"}],"response_format":{"type":"json_schema","json_schema":{}}})",
       "response_format"},
      {R"({"messages":[{"role":"user","content":"x"}],"tools":[{"type":"function"}]})", "tools"},
      {R"({"messages":[{"role":"user","content":"x"}],"tool_choice":"auto"})", "tool_choice"},
      {R"({"messages":[{"role":"user","content":"x"}],"n":2})", "n"},
      {R"({"messages":[{"role":"user","content":"x"}],"presence_penalty":0.5})", "presence_penalty"},
      {R"({"messages":[{"role":"user","content":"x"}],"logit_bias":{"1":5}})", "logit_bias"},
  };
  for (const Case& c : cases) {
    const ApiError e = parse_err(Endpoint::kChat, c.body);
    EXPECT_EQ(e.status, 400) << c.body;
    EXPECT_EQ(e.param, c.param) << c.body;
    EXPECT_EQ(e.code, "unsupported_parameter") << c.body;
  }
}

TEST(OpenAiParse, MalformedRequestsNameTheField) {
  RequestLimits limits;
  limits.context = 100;
  limits.max_images = 1;
  struct Case {
    std::string body;
    std::string param;  // "" for the body as a whole
    std::string says;
  };
  const std::string img = "data:image/png;base64," + base64("not really a png");
  const std::vector<Case> cases = {
      {"{", "", "not valid JSON"},
      {"[1]", "", "JSON object"},
      {std::string(100, '[') + std::string(100, ']'), "", "nested deeper"},
      {R"({"messages":"hi"})", "messages", "non-empty array"},
      {R"({"messages":[]})", "messages", "non-empty array"},
      {R"({})", "messages", "required"},
      {R"({"messages":[{"role":"user","content":"x"}],"temperature":"hot"})", "temperature", "number"},
      {R"({"messages":[{"role":"user","content":"x"}],"temperature":-1})", "temperature", "in [0"},
      {R"({"messages":[{"role":"user","content":"x"}],"max_tokens":101})", "max_tokens", "in [1, 100]"},
      {R"({"messages":[{"role":"user","content":"x"}],"max_tokens":1.5})", "max_tokens", "integer"},
      {R"({"messages":[{"role":"user","content":"x"}],"top_logprobs":2})", "top_logprobs",
       "needs 'logprobs'"},
      {R"({"messages":[{"role":"user","content":"x"}],"top_logprobs":21,"logprobs":true})", "top_logprobs",
       "in [0, 20]"},
      {R"({"messages":[{"role":"user","content":"x"}],"stop":[1]})", "stop", "string"},
      {R"({"messages":[{"role":"robot","content":"x"}]})", "messages[0].role", "not supported"},
      {R"({"messages":[{"role":"user"}]})", "messages[0].content", "needs 'content'"},
      {R"({"messages":[{"role":"user","content":[{"type":"audio"}]}]})", "messages[0].content[0]",
       "not supported"},
      {R"({"messages":[{"role":"user","content":[{"type":"image_url","image_url":{"url":"https://x.org/a.png"}}]}]})",
       "messages[0].content[0].image_url.url", "fetches nothing"},
      {R"({"messages":[{"role":"user","content":[{"type":"image_url","image_url":{"url":"data:image/png;base64,@@"}}]}]})",
       "messages[0].content[0].image_url.url", "invalid base64"},
      {R"({"messages":[{"role":"user","content":[{"type":"image_url","image_url":{"url":")" + img +
           R"("}},{"type":"image_url","image_url":{"url":")" + img + R"("}}]}]})",
       "messages[0].content[1]", "more than 1 images"},
      {R"({"messages":[{"role":"user","content":"x"}],"model":5})", "model", "string"},
      {R"({"messages":[{"role":"user","content":"x"}],"stream":"yes"})", "stream", "true or false"},
  };
  for (const Case& c : cases) {
    const ApiError e = parse_err(Endpoint::kChat, c.body, limits);
    EXPECT_EQ(e.status, 400) << c.body;
    EXPECT_EQ(e.param, c.param) << c.body;
    EXPECT_NE(e.message.find(c.says), std::string::npos) << c.body << " -> " << e.message;
    const json j = json::parse(error_json(e));
    EXPECT_EQ(j["error"]["type"], "invalid_request_error");
    EXPECT_EQ(j["error"]["message"], e.message);
  }
  EXPECT_EQ(parse_err(Endpoint::kCompletions, R"({"prompt":["a","b"]})").param, "prompt");
  EXPECT_EQ(parse_err(Endpoint::kCompletions, R"({"prompt":""})").param, "prompt");
  EXPECT_EQ(parse_err(Endpoint::kCompletions, R"({"prompt":"a","suffix":"b"})").param, "suffix");
}

TEST(OpenAiParse, ImageUrlsDecodeOnlyInlineData) {
  std::string bytes;
  EXPECT_FALSE(decode_image_url("data:image/jpeg;base64," + base64("abcde"), 100, &bytes));
  EXPECT_EQ(bytes, "abcde");
  EXPECT_FALSE(decode_image_url("data:image/png;base64,YWJj\nZGU=", 100, &bytes));  // line breaks allowed
  EXPECT_EQ(bytes, "abcde");
  EXPECT_EQ(decode_image_url("file:///etc/passwd", 100, &bytes).status, 400);
  EXPECT_EQ(decode_image_url("data:text/plain;base64,YWJj", 100, &bytes).status, 400);
  EXPECT_EQ(decode_image_url("data:image/png,abc", 100, &bytes).status, 400);
  EXPECT_EQ(decode_image_url("data:image/png;base64,YWJj=YWJj", 100, &bytes).status, 400);
  const ApiError big =
      decode_image_url("data:image/png;base64," + base64(std::string(200, 'x')), 100, &bytes);
  EXPECT_EQ(big.code, "image_too_large");
}

TEST(OpenAiUtf8, JoinsCharactersSplitAcrossTokens) {
  Utf8Joiner j;
  const std::string euro = "\xE2\x82\xAC";
  EXPECT_EQ(j.take("a\xE2"), "a");
  EXPECT_EQ(j.take("\x82"), "");
  EXPECT_EQ(j.take("\xAC"
                   "b"),
            euro + "b");
  EXPECT_EQ(j.take("\xFF"), "\xEF\xBF\xBD");  // an invalid byte: U+FFFD
  EXPECT_EQ(j.take("\xF0\x9F"), "");
  EXPECT_EQ(j.finish(), "\xEF\xBF\xBD");  // a character cut by the end
  EXPECT_EQ(j.finish(), "");
}

TEST(OpenAiResponse, ChunksAndResponsesHaveOpenAisShape) {
  ApiRequest r = parse_ok(Endpoint::kChat, R"({"messages":[{"role":"user","content":"x"}],"logprobs":true})");
  auto tok = Tokenizer::from_checkpoint(testutil::data_path("tiny"));
  ASSERT_TRUE(tok.ok()) << tok.status().to_string();
  ResponseWriter w(r, "chatcmpl-1", 5, "tiny", *tok);
  TokenLogprobs lp;
  lp.id = 5;
  lp.logprob = -0.5f;
  lp.top = {{5, -0.5f}, {6, -1.5f}};
  const json first = json::parse(w.chunk("Hi", {lp}));
  EXPECT_EQ(first["object"], "chat.completion.chunk");
  EXPECT_EQ(first["choices"][0]["delta"]["role"], "assistant");
  EXPECT_EQ(first["choices"][0]["delta"]["content"], "Hi");
  EXPECT_TRUE(first["choices"][0]["finish_reason"].is_null());
  EXPECT_EQ(first["choices"][0]["logprobs"]["content"][0]["logprob"], -0.5);
  EXPECT_EQ(first["choices"][0]["logprobs"]["content"][0]["top_logprobs"].size(), 2u);
  const json second = json::parse(w.chunk("!", {}));
  EXPECT_FALSE(second["choices"][0]["delta"].contains("role"));
  EXPECT_EQ(json::parse(w.final_chunk(FinishReason::kStopString))["choices"][0]["finish_reason"], "stop");
  const json usage = json::parse(w.usage_chunk({3, 2, 1}));
  EXPECT_TRUE(usage["choices"].empty());
  EXPECT_EQ(usage["usage"]["total_tokens"], 5);
  EXPECT_EQ(usage["usage"]["prompt_tokens_details"]["cached_tokens"], 1);
  const json full = json::parse(w.response("Hi!", {lp}, FinishReason::kMaxTokens, {3, 2, 0}));
  EXPECT_EQ(full["object"], "chat.completion");
  EXPECT_EQ(full["choices"][0]["message"]["content"], "Hi!");
  EXPECT_EQ(full["choices"][0]["finish_reason"], "length");
  EXPECT_EQ(full["usage"]["completion_tokens"], 2);
}

// ---- a server on the tiny models -----------------------------------------------------------

std::shared_ptr<Model> load(const std::string& path, int context) {
  LoadOptions o;
  o.backend = BackendKind::kCpu;
  o.threads = 2;
  o.context = context;
  o.batch_invariant = true;  // greedy outputs independent of the batch (engine.h)
  auto m = Model::load(path, o);
  EXPECT_TRUE(m.ok()) << m.status().to_string();
  return m.ok() ? *m : nullptr;
}

struct Running {
  std::shared_ptr<Model> model;
  std::unique_ptr<Server> server;
  int port = 0;
  std::unique_ptr<httplib::Client> client() const {
    auto c = std::make_unique<httplib::Client>("127.0.0.1", port);
    c->set_read_timeout(60);
    return c;
  }
};

Running start(const std::string& model_dir, ServerOptions so = {}, int sequences = 4, int context = 256) {
  Running r;
  r.model = load(testutil::data_path(model_dir), context);
  if (!r.model) return r;
  so.port = 0;
  so.model_id = "tiny";
  so.limits.defaults.max_tokens = -1;
  r.server = std::make_unique<Server>(so);
  auto port = r.server->start();
  EXPECT_TRUE(port.ok()) << port.status().to_string();
  r.port = port.ok() ? *port : 0;
  EngineOptions eo;
  eo.max_sequences = sequences;
  auto engine = Engine::create(r.model, eo);
  EXPECT_TRUE(engine.ok()) << engine.status().to_string();
  r.server->set_ready(r.model, std::move(*engine), r.model->context_length());
  return r;
}

httplib::Headers json_headers(const std::string& key = "") {
  httplib::Headers h;
  if (!key.empty()) h.emplace("Authorization", "Bearer " + key);
  return h;
}

// The text a lone session gives (greedy).
std::string session_text(Model& m, const std::string& prompt, int max_tokens, bool chat) {
  auto s = m.new_session().value();
  Status st = chat ? s->feed_chat({{"user", prompt}}) : s->feed_text(prompt);
  EXPECT_TRUE(st.ok()) << st.to_string();
  GenerateOptions g;
  g.max_tokens = max_tokens;
  std::string text;
  auto r = s->generate(g, [&](const TokenEvent& e) {
    text += e.text;
    return true;
  });
  EXPECT_TRUE(r.ok()) << r.status().to_string();
  Utf8Joiner utf8;  // the server sends valid UTF-8 (a bad byte of the tiny model: U+FFFD)
  return utf8.take(text) + utf8.finish();
}

// The events of an SSE body: the text after each "data: ".
std::vector<std::string> sse_events(const std::string& body) {
  std::vector<std::string> out;
  size_t start = 0;
  while (start < body.size()) {
    size_t end = body.find("\n\n", start);
    if (end == std::string::npos) end = body.size();
    const std::string event = body.substr(start, end - start);
    if (event.starts_with("data: "))
      out.push_back(event.substr(6));
    else
      ADD_FAILURE() << "not an SSE data event: '" << event << "'";
    start = end + 2;
  }
  return out;
}

// A streamed completion of max_tokens tokens (ignore_eos): `on_bytes` gets the body as it
// arrives; returning false hangs up.
void stream_completion(const Running& r, int max_tokens,
                       const std::function<bool(const char*, size_t)>& on_bytes) {
  auto c = r.client();
  httplib::Request req;
  req.method = "POST";
  req.path = "/v1/completions";
  req.body =
      json{{"prompt", "Once"}, {"max_tokens", max_tokens}, {"ignore_eos", true}, {"stream", true}}.dump();
  req.set_header("Content-Type", "application/json");
  req.content_receiver = [&](const char* data, size_t n, uint64_t, uint64_t) { return on_bytes(data, n); };
  httplib::Response res;
  httplib::Error err;
  c->send(req, res, err);
}

TEST(Server, CompletionsEqualALoneSession) {
  Running r = start("tiny");
  ASSERT_TRUE(r.server);
  auto c = r.client();
  const std::string want = session_text(*r.model, "Once upon a time", 12, false);
  auto res = c->Post("/v1/completions", R"({"prompt":"Once upon a time","max_tokens":12,"temperature":0})",
                     "application/json");
  ASSERT_TRUE(res);
  ASSERT_EQ(res->status, 200) << res->body;
  const json j = json::parse(res->body);
  EXPECT_EQ(j["object"], "text_completion");
  EXPECT_EQ(j["model"], "tiny");
  EXPECT_EQ(j["choices"][0]["text"], want);
  auto ids = r.model->tokenizer().encode("Once upon a time");
  ASSERT_TRUE(ids.ok());
  EXPECT_EQ(j["usage"]["prompt_tokens"], ids->size() + 1);  // + <bos>
  EXPECT_EQ(j["usage"]["completion_tokens"], 12);
  EXPECT_EQ(j["choices"][0]["finish_reason"], "length");
}

TEST(Server, ChatStreamIsFramedAsOpenAis) {
  Running r = start("tiny");
  ASSERT_TRUE(r.server);
  auto c = r.client();
  const std::string want = session_text(*r.model, "Hello there", 10, true);
  auto res = c->Post(
      "/v1/chat/completions",
      R"({"messages":[{"role":"user","content":"Hello there"}],"max_tokens":10,"temperature":0,"stream":true,
          "stream_options":{"include_usage":true},"logprobs":true,"top_logprobs":2})",
      "application/json");
  ASSERT_TRUE(res);
  ASSERT_EQ(res->status, 200) << res->body;
  EXPECT_EQ(res->get_header_value("Content-Type"), "text/event-stream");
  const std::vector<std::string> events = sse_events(res->body);
  ASSERT_GE(events.size(), 3u);
  EXPECT_EQ(events.back(), "[DONE]");
  std::string text;
  size_t logprobs = 0;
  for (size_t i = 0; i + 3 < events.size(); ++i) {
    const json e = json::parse(events[i]);
    EXPECT_EQ(e["object"], "chat.completion.chunk");
    EXPECT_EQ(e["choices"][0]["delta"].contains("role"), i == 0);
    EXPECT_TRUE(e["choices"][0]["finish_reason"].is_null());
    text += e["choices"][0]["delta"]["content"].get<std::string>();
    for (const json& lp : e["choices"][0]["logprobs"]["content"]) {
      EXPECT_EQ(lp["top_logprobs"].size(), 2u);
      ++logprobs;
    }
  }
  EXPECT_EQ(text, want);
  EXPECT_EQ(logprobs, 10u);
  const json last = json::parse(events[events.size() - 3]);
  EXPECT_EQ(last["choices"][0]["finish_reason"], "length");
  const json usage = json::parse(events[events.size() - 2]);
  EXPECT_TRUE(usage["choices"].empty());
  EXPECT_EQ(usage["usage"]["completion_tokens"], 10);
}

TEST(Server, ErrorsHaveTheirStatus) {
  ServerOptions so;
  so.api_keys = {"sekret", "other"};
  so.max_body_bytes = 4096;
  Running r = start("tiny", so);
  ASSERT_TRUE(r.server);
  auto c = r.client();
  const std::string body = R"({"messages":[{"role":"user","content":"x"}],"max_tokens":2})";
  auto expect_error = [&](httplib::Result res, int status, const std::string& type) {
    ASSERT_TRUE(res);
    EXPECT_EQ(res->status, status) << res->body;
    const json j = json::parse(res->body, nullptr, false);
    ASSERT_FALSE(j.is_discarded()) << res->body;
    EXPECT_EQ(j["error"]["type"], type) << res->body;
  };
  expect_error(c->Post("/v1/chat/completions", body, "application/json"), 401, "authentication_error");
  expect_error(c->Post("/v1/chat/completions", json_headers("wrong"), body, "application/json"), 401,
               "authentication_error");
  auto ok = c->Post("/v1/chat/completions", json_headers("other"), body, "application/json");
  ASSERT_TRUE(ok);
  EXPECT_EQ(ok->status, 200) << ok->body;
  auto health = c->Get("/health");  // public
  ASSERT_TRUE(health);
  EXPECT_EQ(health->status, 200);
  expect_error(c->Get("/v1/nothing", json_headers("sekret")), 404, "not_found_error");
  expect_error(c->Post("/v1/chat/completions", json_headers("sekret"),
                       R"({"model":"gpt-4","messages":[{"role":"user","content":"x"}]})", "application/json"),
               404, "not_found_error");
  expect_error(c->Post("/v1/chat/completions", json_headers("sekret"), "{oops", "application/json"), 400,
               "invalid_request_error");
  expect_error(c->Post("/v1/chat/completions", json_headers("sekret"),
                       R"({"messages":[{"role":"user","content":")" + std::string(5000, 'a') + R"("}]})",
                       "application/json"),
               413, "invalid_request_error");
  // A prompt longer than the context (256) is the request's fault.
  std::string longer;
  for (int i = 0; i < 400; ++i) longer += "word ";
  auto too_long =
      c->Post("/v1/completions", json_headers("sekret"), json{{"prompt", longer}}.dump(), "application/json");
  ASSERT_TRUE(too_long);
  EXPECT_EQ(too_long->status, 400) << too_long->body;
  // Images to a model without a vision tower.
  expect_error(c->Post("/v1/chat/completions", json_headers("sekret"),
                       json{{"messages",
                             {{{"role", "user"},
                               {"content",
                                {{{"type", "image_url"},
                                  {"image_url", {{"url", "data:image/png;base64," + base64("xyz")}}}}}}}}}}
                           .dump(),
                       "application/json"),
               400, "invalid_request_error");
}

TEST(Server, BusyServerAnswers503WithRetryAfter) {
  ServerOptions so;
  so.max_concurrent = 1;
  Running r = start("tiny", so);
  ASSERT_TRUE(r.server);
  std::atomic<bool> streaming{false};
  std::thread long_request([&] {
    stream_completion(r, 200, [&](const char*, size_t) {
      streaming = true;
      return true;
    });
  });
  while (!streaming) std::this_thread::sleep_for(std::chrono::milliseconds(5));
  auto c = r.client();
  auto res = c->Post("/v1/completions", R"({"prompt":"Again","max_tokens":2})", "application/json");
  ASSERT_TRUE(res);
  EXPECT_EQ(res->status, 503) << res->body;
  EXPECT_EQ(res->get_header_value("Retry-After"), "1");
  long_request.join();
}

TEST(Server, ConcurrentClientsGetWhatSequentialRunsGive) {
  Running r = start("tiny", {}, 8);
  ASSERT_TRUE(r.server);
  constexpr int kClients = 32, kEach = 3;
  std::vector<std::string> prompts;
  for (int i = 0; i < kClients * kEach; ++i) prompts.push_back(fmt::format("Story {} begins", i % 7 + i / 7));
  std::vector<std::string> want;
  for (const std::string& p : prompts) want.push_back(session_text(*r.model, p, 6, false));
  std::vector<std::string> got(prompts.size());
  std::vector<std::thread> clients;
  for (int t = 0; t < kClients; ++t)
    clients.emplace_back([&, t] {
      auto c = r.client();
      for (int k = 0; k < kEach; ++k) {
        const size_t i = static_cast<size_t>(t * kEach + k);
        auto res = c->Post(
            "/v1/completions",
            json{{"prompt", prompts[i]}, {"max_tokens", 6}, {"temperature", 0}, {"stream", true}}.dump(),
            "application/json");
        if (!res) {
          got[i] = fmt::format("(no response: {}, request {} of client {})", httplib::to_string(res.error()),
                               k, t);
          continue;
        }
        if (res->status != 200) {
          got[i] = fmt::format("(status {}: {})", res->status, res->body);
          continue;
        }
        for (const std::string& e : sse_events(res->body))
          if (e != "[DONE]") got[i] += json::parse(e)["choices"][0]["text"].get<std::string>();
      }
    });
  for (std::thread& t : clients) t.join();
  for (size_t i = 0; i < prompts.size(); ++i) EXPECT_EQ(got[i], want[i]) << prompts[i];
}

std::string metric(Running& r, const std::string& name) {
  auto res = r.client()->Get("/metrics");
  if (!res) return "";
  const std::string& t = res->body;
  const size_t at = t.find("\n" + name + " ");
  if (at == std::string::npos) return "";
  const size_t start = at + name.size() + 2;
  return t.substr(start, t.find('\n', start) - start);
}

TEST(Server, AClientThatGoesAwayFreesItsRequest) {
  ServerOptions so;
  so.sse_ping_seconds = 1;
  Running r = start("tiny", so, 4, 4096);
  ASSERT_TRUE(r.server);
  int chunks = 0;
  stream_completion(r, 4000, [&](const char*, size_t) { return ++chunks < 3; });  // then hang up
  std::string running, gone;
  for (int i = 0; i < 200 && (running != "0" || gone != "1"); ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
    running = metric(r, "gemma3:num_requests_running");
    gone = metric(r, "gemma3:requests_disconnected_total");
  }
  EXPECT_EQ(running, "0");
  EXPECT_EQ(gone, "1");
  EXPECT_EQ(metric(r, "gemma3:kv_cache_usage_perc"), "0");
  EXPECT_EQ(r.server->in_flight(), 0);
}

TEST(Server, StopDrainsThenCancels) {
  Running r = start("tiny", {}, 4, 4096);
  ASSERT_TRUE(r.server);
  std::atomic<bool> streaming{false};
  std::string body;
  std::thread client([&] {
    stream_completion(r, 4000, [&](const char* data, size_t n) {
      body.append(data, n);
      streaming = true;
      return true;
    });
  });
  while (!streaming) std::this_thread::sleep_for(std::chrono::milliseconds(5));
  r.server->stop(std::chrono::milliseconds(200));  // the request cannot finish in time: cancelled
  client.join();
  EXPECT_EQ(r.server->in_flight(), 0);
  const std::vector<std::string> events = sse_events(body);
  ASSERT_GE(events.size(), 2u);
  EXPECT_EQ(events.back(), "[DONE]");
  EXPECT_NE(events[events.size() - 2].find("shutting down"), std::string::npos) << events[events.size() - 2];
}

TEST(Server, ImageRequestEqualsALoneSession) {
  Running r = start("tiny-vision");
  ASSERT_TRUE(r.server);
  const std::string png = file_bytes(testutil::data_path("images/rgba_64x64.png"));
  ASSERT_FALSE(png.empty());
  auto s = r.model->new_session().value();
  ChatMessage m{"user", "<start_of_image>What is this?", {}, {png}};
  ASSERT_TRUE(s->feed_chat({m}).ok());
  GenerateOptions g;
  g.max_tokens = 8;
  std::string want;
  ASSERT_TRUE(s->generate(g, [&](const TokenEvent& e) {
                 want += e.text;
                 return true;
               }).ok());
  auto res = r.client()->Post(
      "/v1/chat/completions",
      json{{"messages",
            {{{"role", "user"},
              {"content",
               {{{"type", "image_url"}, {"image_url", {{"url", "data:image/png;base64," + base64(png)}}}},
                {{"type", "text"}, {"text", "What is this?"}}}}}}},
           {"max_tokens", 8},
           {"temperature", 0}}
          .dump(),
      "application/json");
  ASSERT_TRUE(res);
  ASSERT_EQ(res->status, 200) << res->body;
  const json j = json::parse(res->body);
  EXPECT_EQ(j["choices"][0]["message"]["content"], want);
  EXPECT_GT(j["usage"]["prompt_tokens"].get<int>(), 16);  // the image's soft tokens count
}

}  // namespace
}  // namespace gemma3::server
