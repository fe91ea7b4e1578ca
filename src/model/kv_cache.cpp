#include "model/kv_cache.h"

#include <algorithm>

namespace gemma3 {

KvPlan plan_kv(const ModelConfig& config, int context, int chunk, DType dtype) {
  KvPlan p;
  p.context = context;
  p.chunk = std::max(1, std::min(chunk, context));
  p.dtype = dtype;
  const uint64_t elem = dtype == DType::kF32 ? 4 : 2;
  p.bytes_per_slot = 2ull * config.n_kv_heads * config.head_dim * elem;
  p.capacity.resize(config.n_layers);
  for (int i = 0; i < config.n_layers; ++i) {
    const bool global = config.is_global(i);
    p.capacity[i] = global ? context : std::min(context, config.sliding_window + p.chunk - 1);
    (global ? p.global_bytes : p.local_bytes) += p.bytes_per_slot * p.capacity[i];
    p.all_global_bytes += p.bytes_per_slot * static_cast<uint64_t>(context);
  }
  return p;
}

KvCache::~KvCache() {
  for (KvLayer& l : layers_) {
    if (l.k) backend_.release(l.k);
    if (l.v) backend_.release(l.v);
  }
}

Status KvCache::allocate(const ModelConfig& config) {
  layers_.resize(config.n_layers);
  for (int i = 0; i < config.n_layers; ++i) {
    const uint64_t half = plan_.bytes_per_slot / 2 * plan_.capacity[i];
    KvLayer& l = layers_[i];
    l.capacity = plan_.capacity[i];
    l.dtype = plan_.dtype;
    GEMMA3_ASSIGN_OR_RETURN(l.k, backend_.allocate(half));
    GEMMA3_ASSIGN_OR_RETURN(l.v, backend_.allocate(half));
    allocated_ += 2 * half;
  }
  return ok_status();
}

}  // namespace gemma3
