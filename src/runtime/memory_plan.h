// The memory planner: what one session of a model costs before anything is allocated —
// weights, KV cache (global layers, local rings) and the forward scratch for one prefill chunk.
// `gemma3 info` prints it and Model::load checks it against the backend's free memory, so the
// numbers a user reads are the ones the engine allocates (tests/test_long_context.cpp checks).
#pragma once

#include <cstdint>
#include <string>

#include "backend/backend.h"
#include "gemma3/gemma3.h"
#include "model/config.h"
#include "runtime/kv_cache.h"

namespace gemma3 {

struct MemoryPlan {
  uint64_t weight_bytes = 0;   // the text model's tensors, as the backend holds them
  KvPlan kv;                   // one sequence's cache
  int sequences = 1;           // caches: one session, or an Engine's max_sequences
  uint64_t scratch_bytes = 0;  // the ForwardScratch of a session, or of an Engine's step
  int local_slots = 0;         // ring slots of one sliding-window layer (0: none)
  // An Engine's global layers: a pool of kv_pages pages (KvPlan::page_tokens positions each)
  // the sequences share; paged false when the backend cannot map memory on demand, so every
  // sequence's global layers are allocated whole (the pool then only bounds admission).
  int kv_pages = 0;
  bool paged = false;
  bool ring_checkpoints = false;  // an Engine's copy of each sequence's rings (EngineOptions)
  uint64_t kv_checkpoint_bytes() const {
    return ring_checkpoints ? kv.local_bytes * static_cast<uint64_t>(sequences) : 0;
  }
  uint64_t kv_global_bytes() const {
    return paged ? kv.page_bytes * static_cast<uint64_t>(kv_pages)
                 : kv.global_bytes * static_cast<uint64_t>(sequences);
  }
  uint64_t kv_bytes() const {
    return kv_global_bytes() + kv.local_bytes * static_cast<uint64_t>(sequences) + kv_checkpoint_bytes();
  }
  uint64_t total_bytes() const { return weight_bytes + kv_bytes() + scratch_bytes; }
  MemoryReport report() const;
};

// Bytes ForwardScratch::allocate(c, chunk, logit_rows) takes (src/model/forward.h: nine
// [chunk, width] fp32 buffers and [max(logit_rows, min(chunk, kLogitRows)), V] logits).
uint64_t scratch_bytes(const ModelConfig& c, int chunk, int logit_rows = 0);

// One session (sequences 1), or an Engine with `sequences` sequences of `context` tokens and
// `step` tokens per step (0: its default, max(chunk, sequences)); each sequence appends at
// most min(chunk, step) tokens per step, which sizes its rings. An Engine's global layers are
// a pool of kv_tokens positions in pages (0: sequences * context; at most that, and at least a
// context: EngineOptions::kv_tokens), mapped on demand with a backend whose map_granularity is
// `granularity` (0: none; the pool's memory is then every sequence's whole context).
MemoryPlan plan_memory(const ModelConfig& c, uint64_t weight_bytes, int context, int chunk, DType kv,
                       int sequences = 1, int step = 0, int64_t kv_tokens = 0, uint64_t granularity = 4096);

// Ok when free_bytes is 0 (unknown: host memory) or the plan fits; otherwise a
// resource-exhausted error: "<backend> needs X GiB (weights A, KV B, scratch C), Y GiB free".
Status check_fits(const MemoryPlan& plan, uint64_t free_bytes, const std::string& backend_name);

}  // namespace gemma3
