// The server's Prometheus metrics (GET /metrics, text exposition format 0.0.4; docs/server.md).
// Thread-safe: every method may be called from any thread.
#pragma once

#include <array>
#include <cstdint>
#include <mutex>
#include <string>
#include <vector>

#include "gemma3/engine.h"

namespace gemma3::server {

class Histogram {
 public:
  explicit Histogram(std::vector<double> bounds) : bounds_(std::move(bounds)), counts_(bounds_.size() + 1) {}
  void observe(double v);
  // "# TYPE name histogram" and its _bucket, _sum and _count lines.
  void write(std::string& out, const std::string& name, const std::string& help) const;

 private:
  std::vector<double> bounds_;
  std::vector<uint64_t> counts_;  // per bucket (not cumulative); the last is +Inf
  double sum_ = 0;
  uint64_t count_ = 0;
};

class Metrics {
 public:
  Metrics();
  // A request answered: its endpoint ("chat", "completions", "models", ...) and HTTP status.
  void request(const std::string& endpoint, int status);
  // A generation finished (any way), with its timings: seconds from arrival to the first token
  // (< 0: none), per output token after the first, and end to end.
  void generation(int prompt_tokens, int completion_tokens, double ttft, double tpot, double e2e);
  void disconnected();  // a client went away before its request finished: it was cancelled
  // The text of GET /metrics, with the engine's gauges now.
  std::string text(const EngineStats& engine) const;

 private:
  mutable std::mutex mu_;
  std::vector<std::pair<std::string, uint64_t>> requests_;  // "endpoint|status" -> count
  uint64_t prompt_tokens_ = 0, completion_tokens_ = 0, disconnects_ = 0, generations_ = 0;
  Histogram ttft_, tpot_, e2e_;
};

}  // namespace gemma3::server
