// gemma3 serve: an OpenAI-compatible HTTP server (tools/server, docs/server.md). It listens
// first (GET /health answers 503 while the model loads), then loads the model and makes an
// Engine of --parallel sequences. SIGTERM or SIGINT drains: no new requests, those in flight
// get --shutdown-grace seconds to finish, the rest are cancelled, and the process exits 0.
#include <fmt/format.h>
#include <pthread.h>
#include <signal.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <string>
#include <thread>
#include <vector>

#include "cli_common.h"
#include "commands.h"
#include "gemma3/engine.h"
#include "server/server.h"

namespace gemma3::cli {

namespace {

std::vector<std::string> split_commas(const std::vector<std::string>& items) {
  std::vector<std::string> out;
  for (const std::string& item : items) {
    size_t start = 0;
    while (start <= item.size()) {
      const size_t comma = item.find(',', start);
      const std::string part =
          item.substr(start, comma == std::string::npos ? std::string::npos : comma - start);
      if (!part.empty()) out.push_back(part);
      if (comma == std::string::npos) break;
      start = comma + 1;
    }
  }
  return out;
}

}  // namespace

int cmd_serve(int argc, char** argv) {
  ModelFlags mf;
  server::ServerOptions so;
  EngineOptions eo;
  int max_queue = eo.max_queued;
  int grace = 30;
  std::string alias, api_key_file;
  std::vector<std::string> api_keys, cors;
  uint64_t max_body = so.max_body_bytes, max_image_bytes = so.limits.max_image_bytes;
  ArgParser p(
      "serve", "-m MODEL [--host ADDR] [--port N] [-np N] [options]",
      "Serves the model over HTTP with OpenAI's API: POST /v1/chat/completions, POST /v1/completions,\n"
      "GET /v1/models, GET /health, GET /metrics (docs/server.md). --ctx is the context of each of\n"
      "the --parallel sequences.");
  mf.add_to(p);
  p.add_option("--host", "ADDR", &so.host,
               "address to listen on (default: 127.0.0.1; 0.0.0.0: every interface)");
  p.add_option("--port", "N", &so.port, "TCP port (default: 8080; 0: any free port, printed at start)");
  p.add_option("-np,--parallel", "N", &eo.max_sequences, "sequences decoded together (default: 8)");
  bool no_checkpoints = false;
  p.add_flag("--no-ring-checkpoints", &no_checkpoints,
             "keep no copy of each sequence's rings at the end of its prompt: saves that memory (gemma3 "
             "info --parallel N shows it), but prompts sharing only a system prompt run it again");
  uint64_t kv_tokens = 0;
  p.add_option("--kv-tokens", "N", &kv_tokens,
               "KV positions of the global layers the sequences share, in pages taken as they grow "
               "(default: --parallel x --ctx; at least --ctx)");
  p.add_option("--alias", "NAME", &alias, "the model's id in the API (default: the model file's name)");
  p.add_list("--api-key", "KEY", &api_keys,
             "require 'Authorization: Bearer KEY' on /v1/* (repeatable, or comma-separated)");
  p.add_option("--api-key-file", "FILE", &api_key_file, "read accepted keys from FILE, one per line");
  p.add_option("--max-concurrent", "N", &so.max_concurrent,
               "generation requests in flight at once; beyond: 503 (default: 64)");
  p.add_option("--max-queue", "N", &max_queue,
               "requests waiting for a sequence, at most; beyond: 503 (default: 1024)");
  p.add_option("--max-body-bytes", "N", &max_body, "largest request body; beyond: 413 (default: 32 MiB)");
  p.add_option("--max-messages", "N", &so.limits.max_messages, "chat messages per request (default: 256)");
  p.add_option("--max-images", "N", &so.limits.max_images, "images per request (default: 4)");
  p.add_option("--max-image-bytes", "N", &max_image_bytes, "one image's decoded size (default: 8 MiB)");
  p.add_option("--sse-ping", "S", &so.sse_ping_seconds,
               "seconds of silence before a stream gets a keep-alive comment (default: 15)");
  p.add_list("--cors-origin", "ORIGIN", &cors,
             "allow browser requests from ORIGIN ('*': any); default: no CORS");
  p.add_option(
      "--shutdown-grace", "S", &grace,
      "on SIGTERM/SIGINT, seconds requests in flight get to finish before they are cancelled (default: 30)");
  if (Status st = p.parse(argc, argv, 2); !st.ok()) return fail("serve", kExitUsage, st.message());
  if (p.help_requested()) {
    std::fputs(p.help_text().c_str(), stdout);
    return kExitOk;
  }
  if (Status st = mf.check(); !st.ok()) return fail("serve", kExitUsage, st.message());
  if (so.port < 0 || so.port > 65535)
    return fail("serve", kExitUsage, fmt::format("--port must be in [0, 65535], got {}", so.port));
  if (eo.max_sequences < 1 || eo.max_sequences > 1024)
    return fail("serve", kExitUsage,
                fmt::format("--parallel must be in [1, 1024], got {}", eo.max_sequences));
  eo.ring_checkpoints = !no_checkpoints;
  eo.kv_tokens = static_cast<int64_t>(std::min<uint64_t>(kv_tokens, uint64_t{1} << 40));
  if (so.max_concurrent < 1 || so.max_concurrent > 4096)
    return fail("serve", kExitUsage,
                fmt::format("--max-concurrent must be in [1, 4096], got {}", so.max_concurrent));
  if (max_queue < 0) return fail("serve", kExitUsage, "--max-queue must be >= 0");
  if (so.limits.max_messages < 1 || so.limits.max_images < 0 || max_body < 1024 || max_image_bytes < 1 ||
      so.sse_ping_seconds < 1 || grace < 0)
    return fail("serve", kExitUsage,
                "--max-messages and --sse-ping must be >= 1, --max-images and --shutdown-grace >= 0, "
                "--max-body-bytes >= 1024");
  so.max_body_bytes = max_body;
  so.limits.max_image_bytes = max_image_bytes;
  so.api_keys = split_commas(api_keys);
  if (!api_key_file.empty()) {
    auto text = read_file(api_key_file, 1 << 20);
    if (!text.ok()) return fail("serve", text.status());
    size_t start = 0;
    while (start < text->size()) {
      size_t end = text->find('\n', start);
      if (end == std::string::npos) end = text->size();
      std::string line = text->substr(start, end - start);
      while (!line.empty() && (line.back() == '\r' || line.back() == ' ')) line.pop_back();
      if (!line.empty() && line[0] != '#') so.api_keys.push_back(line);
      start = end + 1;
    }
    if (so.api_keys.empty())
      return fail("serve", kExitUsage, fmt::format("--api-key-file {} holds no key", api_key_file));
  }
  so.cors_origins = split_commas(cors);
  so.model_id = alias.empty() ? std::filesystem::path(mf.model).filename().string() : alias;
  eo.max_queued = max_queue;
  eo.context = mf.context;

  // Fields a request leaves out: Gemma 3's recommended sampling (as run and chat; vLLM also
  // takes the model's generation_config), and no token limit but the context.
  GenerateOptions& d = so.limits.defaults;
  const SamplingFlags sf;
  d.sampling.temperature = sf.temperature;
  d.sampling.top_k = sf.top_k;
  d.sampling.top_p = sf.top_p;
  d.sampling.min_p = sf.min_p;
  d.max_tokens = -1;

  // SIGTERM/SIGINT go to one thread that waits for them (blocked here, before any thread
  // starts, so every thread inherits the mask).
  sigset_t signals;
  sigemptyset(&signals);
  sigaddset(&signals, SIGTERM);
  sigaddset(&signals, SIGINT);
  pthread_sigmask(SIG_BLOCK, &signals, nullptr);
  // A peer that closes a connection must not kill the process.
  signal(SIGPIPE, SIG_IGN);

  server::Server server(so);
  auto port = server.start();
  if (!port.ok()) return fail("serve", kExitUsage, port.status().message());
  std::fprintf(stderr, "gemma3 serve: listening on http://%s:%d (loading %s)\n", so.host.c_str(), *port,
               mf.model.c_str());

  std::atomic<bool> ready{false};
  std::atomic<int> got_signal{0};
  std::thread waiter([&] {
    int sig = 0;
    sigwait(&signals, &sig);
    got_signal = sig;
    if (!ready) {  // still loading: nothing in flight to drain
      std::fprintf(stderr, "gemma3 serve: %s while loading; exiting\n",
                   sig == SIGTERM ? "SIGTERM" : "SIGINT");
      std::fflush(stderr);
      std::_Exit(0);
    }
    std::fprintf(stderr, "gemma3 serve: %s: draining (up to %d s), then exiting\n",
                 sig == SIGTERM ? "SIGTERM" : "SIGINT", grace);
    server.stop(std::chrono::seconds(grace));
  });

  auto loaded = load_model(mf);
  if (!loaded.ok()) {
    const int code = fail("serve", loaded.status());
    std::_Exit(code);  // the waiter thread blocks in sigwait
  }
  std::shared_ptr<Model> model = loaded->model;
  auto engine = Engine::create(model, eo);
  if (!engine.ok()) std::_Exit(fail("serve", engine.status()));
  so.limits.context = mf.context > 0 ? mf.context : model->context_length();
  const EngineStats es = (*engine)->stats();  // before the server takes the engine
  server.set_ready(model, std::move(*engine), so.limits.context);
  ready = true;
  std::fprintf(stderr,
               "gemma3 serve: ready: model '%s', %d sequences of %d tokens sharing %llu KV positions "
               "(%d pages), %.1f s to load\n",
               so.model_id.c_str(), eo.max_sequences, so.limits.context,
               static_cast<unsigned long long>(es.kv_capacity_tokens), es.kv_pages, loaded->load_seconds);
  std::fflush(stderr);
  waiter.join();
  std::fprintf(stderr, "gemma3 serve: stopped\n");
  return kExitOk;
}

}  // namespace gemma3::cli
