#include "server.h"

#include <fmt/format.h>
#include <httplib.h>
#include <sys/socket.h>

#include <algorithm>
#include <condition_variable>
#include <ctime>
#include <mutex>
#include <nlohmann/json.hpp>
#include <random>
#include <set>
#include <thread>
#include <utility>

#include "metrics.h"

namespace gemma3::server {

namespace {

using Clock = std::chrono::steady_clock;

double seconds(Clock::duration d) { return std::chrono::duration<double>(d).count(); }

ApiError api_error(int status, std::string type, std::string message, std::string code = "") {
  ApiError e;
  e.status = status;
  e.type = std::move(type);
  e.message = std::move(message);
  e.code = std::move(code);
  return e;
}

// The HTTP status of a library error from the engine: the request's fault (400), busy (503), ours (500).
ApiError from_status(const Status& s) {
  switch (s.code()) {
    case ErrorCode::kInvalidArgument:
    case ErrorCode::kNotFound:
    case ErrorCode::kInvalidFile:
    case ErrorCode::kUnsupported: return api_error(400, "invalid_request_error", s.message());
    case ErrorCode::kOutOfRange:
      return api_error(400, "invalid_request_error", s.message(), "context_length_exceeded");
    case ErrorCode::kUnavailable:
    case ErrorCode::kOutOfMemory: return api_error(503, "server_error", s.message(), "server_busy");
    default: return api_error(500, "server_error", s.message());
  }
}

// Compares without an early exit, so the time taken does not tell how much of a key matched.
bool equal_constant_time(std::string_view a, std::string_view b) {
  unsigned char diff = a.size() == b.size() ? 0 : 1;
  const size_t n = std::max(a.size(), b.size());
  for (size_t i = 0; i < n; ++i)
    diff |= static_cast<unsigned char>((i < a.size() ? a[i] : 0) ^ (i < b.size() ? b[i] : 0));
  return diff == 0;
}

std::string random_id(const char* prefix) {
  thread_local std::mt19937_64 rng{std::random_device{}()};
  return fmt::format("{}{:016x}{:08x}", prefix, rng(), static_cast<uint32_t>(rng()));
}

// What the engine thread hands one request's HTTP worker: text (whole UTF-8 characters),
// logprobs, and the end.
struct Channel {
  std::mutex mu;
  std::condition_variable cv;
  Utf8Joiner joiner;
  std::string text;
  std::vector<TokenLogprobs> logprobs;
  bool done = false;
  Result<GenerateResult> result{internal_error("no result")};
  Clock::time_point start = Clock::now();
  Clock::time_point first_token{};
  bool got_token = false;
};

}  // namespace

struct Server::Impl {
  ServerOptions opt;
  httplib::Server http;
  std::thread thread;
  Metrics metrics;
  int listen_fd = -1;  // the listening socket (set_socket_options hands it over)

  std::mutex mu;  // guards model, engine, ids
  std::shared_ptr<Model> model;
  std::unique_ptr<Engine> engine;
  std::atomic<bool> ready{false};
  std::atomic<bool> draining{false};
  std::atomic<int> in_flight{0};
  std::set<uint64_t> ids;  // engine requests in flight
  std::condition_variable idle_cv;
  bool stopped = false;

  explicit Impl(ServerOptions o) : opt(std::move(o)) {}

  // ---- helpers ----
  void send_error(httplib::Response& res, const ApiError& e) {
    res.status = e.status;
    res.set_content(error_json(e), "application/json");
    if (e.status == 503) res.set_header("Retry-After", "1");
  }

  bool authorized(const httplib::Request& req) const {
    if (opt.api_keys.empty()) return true;
    const std::string h = req.get_header_value("Authorization");
    if (!h.starts_with("Bearer ")) return false;
    const std::string_view key = std::string_view(h).substr(7);
    bool ok = false;
    for (const std::string& k : opt.api_keys) ok |= equal_constant_time(key, k);
    return ok;
  }

  void cors(const httplib::Request& req, httplib::Response& res) const {
    if (opt.cors_origins.empty()) return;
    const std::string origin = req.get_header_value("Origin");
    if (origin.empty()) return;
    const bool any =
        std::find(opt.cors_origins.begin(), opt.cors_origins.end(), "*") != opt.cors_origins.end();
    if (!any && std::find(opt.cors_origins.begin(), opt.cors_origins.end(), origin) == opt.cors_origins.end())
      return;
    res.set_header("Access-Control-Allow-Origin", any ? "*" : origin);
    res.set_header("Vary", "Origin");
    res.set_header("Access-Control-Allow-Headers", "Authorization, Content-Type");
    res.set_header("Access-Control-Allow-Methods", "GET, POST, OPTIONS");
  }

  // Counts a generation request in flight for as long as a copy of it lives (a streamed
  // response's provider outlives the handler).
  struct InFlight {
    Impl* impl;
    explicit InFlight(Impl* i) : impl(i) { ++impl->in_flight; }
    ~InFlight() {
      std::lock_guard<std::mutex> lock(impl->mu);
      --impl->in_flight;
      impl->idle_cv.notify_all();
    }
  };

  void forget(uint64_t id) {
    std::lock_guard<std::mutex> lock(mu);
    ids.erase(id);
  }

  // ---- routes ----
  void models(const httplib::Request&, httplib::Response& res) {
    nlohmann::json m = {{"id", opt.model_id}, {"object", "model"}, {"created", 0}, {"owned_by", "gemma3"}};
    if (ready) {
      const ModelInfo& info = model->info();
      m["meta"] = {{"context_length", opt.limits.context},
                   {"vocab_size", info.vocab_size},
                   {"size", info.size_label},
                   {"vision", info.has_vision}};
    }
    res.set_content(nlohmann::json{{"object", "list"}, {"data", {m}}}.dump(), "application/json");
  }

  void generate(Endpoint endpoint, const httplib::Request& req, httplib::Response& res) {
    ApiRequest r;
    if (ApiError e = parse_request(endpoint, req.body, opt.limits, &r)) return send_error(res, e);
    if (!r.model.empty() && r.model != opt.model_id)
      return send_error(res, api_error(404, "not_found_error",
                                       fmt::format("model '{}' does not exist; this server serves '{}'",
                                                   r.model, opt.model_id),
                                       "model_not_found"));
    if (!r.seed_given)
      r.engine.options.sampling.seed = (uint64_t{std::random_device{}()} << 32) | std::random_device{}();
    if (draining)
      return send_error(res, api_error(503, "server_error", "the server is shutting down", "shutting_down"));
    auto guard = std::make_shared<InFlight>(this);
    if (in_flight > opt.max_concurrent)
      return send_error(res, api_error(503, "server_error",
                                       fmt::format("{} requests are in flight, the most this server takes "
                                                   "(--max-concurrent); retry later",
                                                   opt.max_concurrent),
                                       "server_busy"));

    auto ch = std::make_shared<Channel>();
    auto on_token = [ch](const TokenEvent& e) {
      std::lock_guard<std::mutex> lock(ch->mu);
      if (!ch->got_token) {
        ch->got_token = true;
        ch->first_token = Clock::now();
      }
      ch->text += ch->joiner.take(e.text);
      ch->logprobs.insert(ch->logprobs.end(), e.logprobs.begin(), e.logprobs.end());
      ch->cv.notify_all();
      return true;
    };
    auto on_done = [ch](const Result<GenerateResult>& result) {
      std::lock_guard<std::mutex> lock(ch->mu);
      ch->text += ch->joiner.finish();
      ch->result = result;
      ch->done = true;
      ch->cv.notify_all();
    };
    // Not under mu: submit encodes the request's images on this thread (engine.h).
    Result<uint64_t> sub = engine->submit(std::move(r.engine), on_token, on_done);
    if (!sub.ok()) return send_error(res, from_status(sub.status()));
    const uint64_t id = *sub;
    {
      std::lock_guard<std::mutex> lock(mu);
      ids.insert(id);
    }
    // The writer refers to the request: the stream's provider keeps both.
    auto req_copy = std::make_shared<ApiRequest>(std::move(r));
    auto writer = std::make_shared<ResponseWriter>(
        *req_copy, random_id(endpoint == Endpoint::kChat ? "chatcmpl-" : "cmpl-"),
        static_cast<int64_t>(std::time(nullptr)), opt.model_id, model->tokenizer());

    if (!req_copy->stream) {
      std::unique_lock<std::mutex> lock(ch->mu);
      ch->cv.wait(lock, [&] { return ch->done; });
      forget(id);
      if (!ch->result.ok()) return send_error(res, from_status(ch->result.status()));
      if (ch->result->finish == FinishReason::kCancelled)
        return send_error(
            res, api_error(503, "server_error", "the request was cancelled: the server is shutting down",
                           "shutting_down"));
      const Usage usage = usage_of(*ch);
      record(*ch, usage);
      res.set_content(writer->response(ch->text, ch->logprobs, ch->result->finish, usage),
                      "application/json");
      return;
    }

    res.set_header("Cache-Control", "no-cache");
    res.set_header("X-Accel-Buffering", "no");
    auto finished = std::make_shared<bool>(false);
    res.set_chunked_content_provider(
        "text/event-stream",
        [this, ch, writer, req_copy, id, finished, guard](size_t, httplib::DataSink& sink) {
          std::string text;
          std::vector<TokenLogprobs> logprobs;
          bool done = false;
          {
            std::unique_lock<std::mutex> lock(ch->mu);
            ch->cv.wait_for(lock, std::chrono::seconds(opt.sse_ping_seconds),
                            [&] { return ch->done || !ch->text.empty() || !ch->logprobs.empty(); });
            text.swap(ch->text);
            logprobs.swap(ch->logprobs);
            done = ch->done;
          }
          auto write = [&](const std::string& s) { return sink.write(s.data(), s.size()); };
          std::string out;
          if (const std::string c = writer->chunk(text, logprobs); !c.empty()) out += "data: " + c + "\n\n";
          if (!done) {
            if (out.empty()) out = ": keep-alive\n\n";  // also finds a client that went away
            if (!write(out)) return false;              // the releaser cancels the request
            return true;
          }
          forget(id);
          *finished = true;
          const Result<GenerateResult>& result = ch->result;
          if (!result.ok()) {
            out += "data: " + error_json(from_status(result.status())) + "\n\n";
          } else if (result->finish == FinishReason::kCancelled) {
            out += "data: " +
                   error_json(api_error(503, "server_error",
                                        "the request was cancelled: the server is shutting down",
                                        "shutting_down")) +
                   "\n\n";
          } else {
            const Usage usage = usage_of(*ch);
            record(*ch, usage);
            out += "data: " + writer->final_chunk(result->finish) + "\n\n";
            if (req_copy->include_usage) out += "data: " + writer->usage_chunk(usage) + "\n\n";
          }
          out += "data: [DONE]\n\n";
          if (!write(out)) return false;
          sink.done();
          return true;
        },
        [this, id, finished](bool) {
          if (*finished) return;
          // The client went away (a write failed) before the end: free its sequence now.
          engine->cancel(id);
          forget(id);
          metrics.disconnected();
        });
  }

  static Usage usage_of(const Channel& ch) {
    Usage u;
    u.prompt_tokens = ch.result->prompt_tokens;
    u.cached_tokens = ch.result->cached_tokens;
    u.completion_tokens = ch.result->tokens;
    return u;
  }

  void record(const Channel& ch, const Usage& u) {
    const Clock::time_point end = Clock::now();
    const double ttft = ch.got_token ? seconds(ch.first_token - ch.start) : -1;
    const double tpot = ch.got_token && u.completion_tokens > 1
                            ? seconds(end - ch.first_token) / (u.completion_tokens - 1)
                            : -1;
    metrics.generation(u.prompt_tokens, u.completion_tokens, ttft, tpot, seconds(end - ch.start));
  }

  void routes() {
    http.new_task_queue = [this] {
      // A streamed request holds its worker until it ends: room for every request in flight,
      // plus workers for health checks, metrics and the refusals beyond the limit.
      return new httplib::ThreadPool(static_cast<size_t>(opt.max_concurrent) + 16);
    };
    // Debian's cpp-httplib listens with a backlog of 5: a burst of clients connecting at once
    // (32 in the tests) overflows it and some get no response. Keep the socket to listen again
    // with a deep backlog after binding (Linux updates the backlog of a listening socket).
    http.set_socket_options([this](socket_t sock) {
      httplib::default_socket_options(sock);  // SO_REUSEPORT only, in Debian's 0.11
      int yes = 1;  // bind a port whose last connections are still in TIME_WAIT (a restart)
      setsockopt(sock, SOL_SOCKET, SO_REUSEADDR, &yes, sizeof(yes));
      listen_fd = sock;
    });
    http.set_payload_max_length(opt.max_body_bytes);
    http.set_keep_alive_timeout(5);
    http.set_read_timeout(30);
    http.set_write_timeout(30);

    // Every route: CORS headers; authentication on /v1/*; 503 before the model is ready.
    http.set_pre_routing_handler([this](const httplib::Request& req, httplib::Response& res) {
      cors(req, res);
      if (req.method == "OPTIONS") {
        res.status = opt.cors_origins.empty() ? 405 : 204;
        return httplib::Server::HandlerResponse::Handled;
      }
      if (req.path.starts_with("/v1/") && !authorized(req)) {
        send_error(res,
                   api_error(401, "authentication_error",
                             "invalid or missing API key (Authorization: Bearer KEY)", "invalid_api_key"));
        return httplib::Server::HandlerResponse::Handled;
      }
      if (!ready && req.path != "/health" && req.path != "/metrics") {
        send_error(res, api_error(503, "server_error", "the model is still loading", "loading"));
        return httplib::Server::HandlerResponse::Handled;
      }
      return httplib::Server::HandlerResponse::Unhandled;
    });
    http.set_post_routing_handler([this](const httplib::Request& req, httplib::Response& res) {
      metrics.request(endpoint_name(req.path), res.status);
    });
    // Statuses httplib sets itself (404 unknown route, 413 body too large, 400 bad framing)
    // get a body in OpenAI's shape.
    http.set_error_handler([this](const httplib::Request& req, httplib::Response& res) {
      if (!res.body.empty()) return;
      std::string message = fmt::format("HTTP {}", res.status);
      std::string type = "invalid_request_error";
      if (res.status == 404)
        message = fmt::format("no route {} {}", req.method, req.path), type = "not_found_error";
      if (res.status == 413)
        message =
            fmt::format("the request body is larger than {} bytes (--max-body-bytes)", opt.max_body_bytes);
      if (res.status == 405) message = fmt::format("method {} is not allowed on {}", req.method, req.path);
      ApiError e = api_error(res.status, type, message);
      res.set_content(error_json(e), "application/json");
    });

    http.Get("/health", [this](const httplib::Request&, httplib::Response& res) {
      if (ready)
        res.set_content(R"({"status":"ok"})", "application/json");
      else
        send_error(res, api_error(503, "server_error", "the model is still loading", "loading"));
    });
    http.Get("/metrics", [this](const httplib::Request&, httplib::Response& res) {
      EngineStats s;
      if (ready) s = engine->stats();
      res.set_content(metrics.text(s), "text/plain; version=0.0.4");
    });
    http.Get("/v1/models", [this](const httplib::Request& req, httplib::Response& res) { models(req, res); });
    http.Post("/v1/chat/completions", [this](const httplib::Request& req, httplib::Response& res) {
      generate(Endpoint::kChat, req, res);
    });
    http.Post("/v1/completions", [this](const httplib::Request& req, httplib::Response& res) {
      generate(Endpoint::kCompletions, req, res);
    });
  }

  static std::string endpoint_name(const std::string& path) {
    if (path == "/v1/chat/completions") return "chat";
    if (path == "/v1/completions") return "completions";
    if (path == "/v1/models") return "models";
    if (path == "/health") return "health";
    if (path == "/metrics") return "metrics";
    return "other";
  }
};

Server::Server(ServerOptions options) : impl_(std::make_unique<Impl>(std::move(options))) { impl_->routes(); }

Server::~Server() { stop(std::chrono::milliseconds(0)); }

Result<int> Server::start() {
  Impl& m = *impl_;
  int port = m.opt.port;
  if (port == 0) {
    port = m.http.bind_to_any_port(m.opt.host);
    if (port <= 0) return unavailable(fmt::format("cannot listen on {} (any port)", m.opt.host));
  } else if (!m.http.bind_to_port(m.opt.host, port)) {
    return unavailable(
        fmt::format("cannot listen on {}:{} (in use, or not an address of this machine)", m.opt.host, port));
  }
  if (m.listen_fd >= 0) ::listen(m.listen_fd, 1024);
  m.thread = std::thread([&m] { m.http.listen_after_bind(); });
  return port;
}

void Server::set_ready(std::shared_ptr<Model> model, std::unique_ptr<Engine> engine, int context) {
  Impl& m = *impl_;
  {
    std::lock_guard<std::mutex> lock(m.mu);
    m.opt.limits.context = context;
    m.model = std::move(model);
    m.engine = std::move(engine);
  }
  m.ready = true;
}

void Server::stop(std::chrono::milliseconds grace) {
  Impl& m = *impl_;
  {
    std::lock_guard<std::mutex> lock(m.mu);
    if (m.stopped) return;
    m.stopped = true;
  }
  m.draining = true;
  std::unique_lock<std::mutex> lock(m.mu);
  m.idle_cv.wait_for(lock, grace, [&] { return m.in_flight == 0; });
  const std::set<uint64_t> left = m.ids;
  lock.unlock();
  if (m.engine)
    for (uint64_t id : left) m.engine->cancel(id);
  // Cancelled requests end within a step; their streams then write their last event.
  lock.lock();
  m.idle_cv.wait_for(lock, std::chrono::seconds(10), [&] { return m.in_flight == 0; });
  lock.unlock();
  m.http.stop();
  if (m.thread.joinable()) m.thread.join();
}

int Server::in_flight() const { return impl_->in_flight; }

}  // namespace gemma3::server
