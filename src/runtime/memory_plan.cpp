#include "runtime/memory_plan.h"

#include <fmt/format.h>

#include <algorithm>

#include "model/forward.h"

namespace gemma3 {

MemoryReport MemoryPlan::report() const {
  MemoryReport r;
  r.weight_bytes = weight_bytes;
  r.kv_global_bytes = kv_global_bytes();
  r.kv_pages = kv_pages;
  r.kv_page_tokens = kv_pages ? kv.page_tokens : 0;
  r.kv_page_bytes = kv_pages ? kv.page_bytes : 0;
  r.kv_local_bytes = kv.local_bytes * static_cast<uint64_t>(sequences);
  r.kv_checkpoint_bytes = kv_checkpoint_bytes();
  r.sequences = sequences;
  r.scratch_bytes = scratch_bytes;
  r.context = kv.context;
  r.prefill_chunk = kv.chunk;
  r.kv_type = kv.dtype == DType::kF32      ? KvType::kF32
              : kv.dtype == DType::kQ8_0   ? KvType::kQ8_0
              : kv.dtype == DType::kF8E4M3 ? KvType::kF8
                                           : KvType::kBF16;
  r.kv_bytes_per_slot = kv.bytes_per_slot;
  r.kv_local_slots = local_slots;
  r.kv_all_global_bytes = kv.all_global_bytes * static_cast<uint64_t>(sequences);
  return r;
}

uint64_t scratch_bytes(const ModelConfig& c, int chunk, int logit_rows) {
  const uint64_t n = static_cast<uint64_t>(chunk);
  const uint64_t widths = 3ull * c.hidden + 2ull * c.q_width() + 2ull * c.kv_width() + 2ull * c.intermediate;
  const uint64_t rows = std::max<uint64_t>(static_cast<uint64_t>(std::max(0, logit_rows)),
                                           std::min<uint64_t>(n, ForwardScratch::kLogitRows));
  return (n * widths + rows * c.vocab_size) * sizeof(float);
}

MemoryPlan plan_memory(const ModelConfig& c, uint64_t weight_bytes, int context, int chunk, DType kv,
                       int sequences, int step, int64_t kv_tokens, uint64_t granularity) {
  MemoryPlan p;
  p.weight_bytes = weight_bytes;
  p.sequences = std::max(1, sequences);
  if (p.sequences == 1 && step == 0 && kv_tokens == 0) {
    p.kv = plan_kv(c, context, chunk, kv);
    p.scratch_bytes = scratch_bytes(c, p.kv.chunk);  // the chunk as the plan clamps it
  } else {                                           // an Engine (runtime/engine.cpp: make_engine)
    if (step == 0) step = std::max(chunk, p.sequences);
    p.kv = plan_kv(c, context, std::min(chunk, step), kv, granularity);
    p.scratch_bytes = scratch_bytes(c, step, p.sequences);
    const int64_t all = static_cast<int64_t>(p.kv.pages_for(context)) * p.sequences;
    p.kv_pages = static_cast<int>(
        std::clamp<int64_t>(kv_tokens > 0 ? p.kv.pages_for(kv_tokens) : all, p.kv.pages_for(context), all));
    const uint64_t row = p.kv.bytes_per_slot / 2;
    p.paged = granularity > 0 && row * p.kv.page_tokens % granularity == 0;
    p.ring_checkpoints = true;  // EngineOptions' default
  }
  for (int i = 0; i < c.n_layers; ++i)
    if (!c.is_global(i)) p.local_slots = p.kv.capacity[i];  // every local layer has the same
  return p;
}

Status check_fits(const MemoryPlan& plan, uint64_t free_bytes, const std::string& backend_name) {
  if (free_bytes == 0 || plan.total_bytes() <= free_bytes) return ok_status();
  auto gib = [](uint64_t b) { return fmt::format("{:.2f} GiB", static_cast<double>(b) / (1ull << 30)); };
  return out_of_memory(
      fmt::format("{} needs {} (weights {}, KV {}, scratch {}) at context {} with KV type {}, {} free; "
                  "lower LoadOptions::context or use LoadOptions::kv_type = KvType::kQ8_0",
                  backend_name, gib(plan.total_bytes()), gib(plan.weight_bytes), gib(plan.kv_bytes()),
                  gib(plan.scratch_bytes), plan.kv.context, dtype_name(plan.kv.dtype), gib(free_bytes)));
}

}  // namespace gemma3
