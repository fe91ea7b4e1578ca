// `gemma3 serve`: an OpenAI-compatible HTTP server on an Engine (docs/server.md). cpp-httplib
// runs each connection on a worker thread of its pool; a generation request submits to the
// Engine and its worker waits for the engine thread's tokens (streamed as Server-Sent Events, or
// gathered into one response). Routes: POST /v1/chat/completions, POST /v1/completions,
// GET /v1/models, GET /health, GET /metrics.
//
// Threads: start() once, then stop() and set_ready() from any thread; the destructor stops the
// server and waits for its threads.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "gemma3/engine.h"
#include "gemma3/gemma3.h"
#include "gemma3/status.h"
#include "openai_api.h"

namespace gemma3::server {

struct ServerOptions {
  std::string host = "127.0.0.1";
  int port = 8080;  // 0: any free port (start() returns it)
  // Accepted keys ("Authorization: Bearer KEY" on /v1/*); empty: no authentication.
  std::vector<std::string> api_keys;
  std::string model_id;  // the model's name in /v1/models and responses
  size_t max_body_bytes = 32u << 20;
  // Generation requests in flight (waiting or running) at once; beyond, 503 with Retry-After.
  int max_concurrent = 64;
  int sse_ping_seconds = 15;  // an SSE comment when a stream has sent nothing for this long
  // Origins allowed by CORS (Access-Control-Allow-Origin); empty: no CORS headers at all;
  // "*": any origin.
  std::vector<std::string> cors_origins;
  RequestLimits limits;  // per request (RequestLimits::context is set from the engine's)
};

class Server {
 public:
  explicit Server(ServerOptions options);
  ~Server();
  Server(const Server&) = delete;
  Server& operator=(const Server&) = delete;

  // Binds host:port and starts serving on a thread of its own; until set_ready(), /health
  // answers 503 and the other routes 503 too. Returns the bound port.
  Result<int> start();
  // The model is loaded: requests go to `engine` (made on `model`), whose sequences hold
  // `context` tokens (max_tokens above it is refused).
  void set_ready(std::shared_ptr<Model> model, std::unique_ptr<Engine> engine, int context);
  // Stops taking generation requests (503), waits up to `grace` for those in flight to finish,
  // cancels the rest (their streams end with an error event), and stops listening. Idempotent.
  void stop(std::chrono::milliseconds grace);
  // Requests in flight now (tests; the drain).
  int in_flight() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace gemma3::server
