// KV cache layout: global layers hold every position of the context; local (sliding-window)
// layers hold a ring of min(context, W + chunk - 1) slots — the window plus what one prefill
// chunk needs, so keys a chunk's first query still sees are never overwritten by the chunk.
// Position p lives in slot p % capacity. `gemma3 info` prints this same plan.
#pragma once

#include <cstdint>
#include <vector>

#include "backend/backend.h"
#include "model/config.h"

namespace gemma3 {

struct KvPlan {
  int context = 0;                // tokens a session can hold
  int chunk = 0;                  // max tokens per prefill step
  DType dtype = DType::kBF16;     // element type of K and V
  std::vector<int> capacity;      // [L] slots per layer
  uint64_t bytes_per_slot = 0;    // K + V of one position in one layer: 2 * nKV * hd * elem
  uint64_t global_bytes = 0;      // all global layers
  uint64_t local_bytes = 0;       // all local rings
  uint64_t all_global_bytes = 0;  // what caching every layer at full context would need
  uint64_t total_bytes() const { return global_bytes + local_bytes; }
};

KvPlan plan_kv(const ModelConfig& config, int context, int chunk, DType dtype);

// The cache itself, in backend memory, laid out as the plan says.
class KvCache {
 public:
  KvCache(Backend& backend, KvPlan plan) : backend_(backend), plan_(std::move(plan)) {}
  ~KvCache();
  KvCache(const KvCache&) = delete;
  KvCache& operator=(const KvCache&) = delete;
  Status allocate(const ModelConfig& config);
  const KvPlan& plan() const { return plan_; }
  const KvLayer& layer(int i) const { return layers_[i]; }
  uint64_t allocated_bytes() const { return allocated_; }

 private:
  Backend& backend_;
  KvPlan plan_;
  std::vector<KvLayer> layers_;
  uint64_t allocated_ = 0;
};

}  // namespace gemma3
