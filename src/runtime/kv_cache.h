// KV cache layout: global layers hold every position of the context; local (sliding-window)
// layers hold a ring of min(context, W + chunk - 1) slots — the window plus what one prefill
// chunk needs, so keys a chunk's first query still sees are never overwritten by the chunk.
// Position p lives in slot p % capacity. `gemma3 info` prints this same plan.
#pragma once

#include <algorithm>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "backend/backend.h"
#include "gemma3/gemma3.h"
#include "model/config.h"
#include "model/forward.h"

namespace gemma3 {

// The cache element type of a KvType (kBF16, kF32, kQ8_0, kF8E4M3); its names are in gemma3.h.
DType kv_dtype(KvType t);
// Whether the model's heads can be cached in `t`: Q8_0 blocks must not straddle two heads'
// rows, so it needs head_dim % 32 == 0 (Gemma 3: 256, 128).
Status check_kv_type(const ModelConfig& config, KvType t);

struct KvPlan {
  int context = 0;                // tokens a session can hold
  int chunk = 0;                  // max tokens per prefill step
  DType dtype = DType::kBF16;     // element type of K and V
  std::vector<int> capacity;      // [L] slots per layer
  uint64_t bytes_per_slot = 0;    // K + V of one position in one layer: 2 * nKV * row_bytes(hd)
  uint64_t global_bytes = 0;      // all global layers
  uint64_t local_bytes = 0;       // all local rings
  uint64_t all_global_bytes = 0;  // what caching every layer at full context would need
  // An Engine's global layers come in pages of page_tokens positions (docs/batching.md, "Paged
  // KV"): the fewest, a multiple of 16, whose K rows fill whole pages of `granularity` bytes.
  int page_tokens = 0;
  uint64_t page_bytes = 0;  // one page: K + V of page_tokens positions in every global layer
  uint64_t total_bytes() const { return global_bytes + local_bytes; }
  int pages_for(int64_t tokens) const { return static_cast<int>((tokens + page_tokens - 1) / page_tokens); }
};

// granularity: the unit the backend maps memory in (Backend::map_granularity; 4 KiB, the
// CPU's, when planning without a backend).
KvPlan plan_kv(const ModelConfig& config, int context, int chunk, DType dtype, uint64_t granularity = 4096);

// The cache itself, in backend memory, laid out as the plan says.
class KvCache {
 public:
  KvCache(Backend& backend, KvPlan plan) : backend_(backend), plan_(std::move(plan)) {}
  ~KvCache();
  KvCache(const KvCache&) = delete;
  KvCache& operator=(const KvCache&) = delete;
  // paged: the global layers' slots are an address range with nothing behind it until
  // map_pages() (Backend::reserve); the local rings are allocated whole. A backend that cannot
  // map memory on demand (map_granularity() 0, or one a page's rows do not fill) allocates
  // everything, and map_pages only counts.
  Status allocate(const ModelConfig& config, bool paged = false);
  // Puts memory behind the first n pages of every global layer (positions
  // 0 .. n * plan().page_tokens - 1) / takes back every page from the n-th on. Unpaged:
  // only the count changes.
  Status map_pages(int n);
  void unmap_pages_from(int n);
  int mapped_pages() const { return mapped_pages_; }
  // A ring checkpoint (an Engine's prefix reuse, docs/batching.md): a copy of every local
  // layer's ring, K and V, in backend memory. allocate_checkpoint() takes the rings' bytes
  // again; save_rings() copies the rings into it, restore_rings() copies it back.
  Status allocate_checkpoint();
  void save_rings();
  void restore_rings();
  // Positions 0 .. tokens - 1 of every global layer from `from` (a cache of the same plan),
  // and its ring checkpoint into this cache's rings: another sequence's prefix, as the
  // sequence had it at its checkpoint. This cache's pages for those positions must be mapped.
  void copy_prefix(const KvCache& from, int tokens);
  const KvPlan& plan() const { return plan_; }
  const KvLayer& layer(int i) const { return layers_[i]; }
  KvView view() const { return {layers_, plan_.context, plan_.chunk}; }
  uint64_t allocated_bytes() const { return allocated_global_ + allocated_local_; }
  uint64_t allocated_global_bytes() const { return allocated_global_; }
  uint64_t allocated_local_bytes() const { return allocated_local_; }

 private:
  Backend& backend_;
  KvPlan plan_;
  std::vector<KvLayer> layers_;
  std::vector<bool> global_;    // [L] a global layer
  void* checkpoint_ = nullptr;  // [local layers][K, V] rings, or null
  // Copies every local layer's K and V to (save) or from `checkpoint` (this cache's or another's).
  void copy_rings(void* checkpoint, bool save);
  uint64_t page_bytes_ = 0;  // one page of one layer's K (or V) when paged; else 0
  int mapped_pages_ = 0;
  // Whether layer i's K and V come from Backend::reserve (paged global layers).
  bool reserved(size_t i) const { return page_bytes_ > 0 && global_[i]; }
  uint64_t reserved_layers() const {
    return page_bytes_ > 0 ? static_cast<uint64_t>(std::count(global_.begin(), global_.end(), true)) : 0;
  }
  uint64_t allocated_global_ = 0, allocated_local_ = 0;
};

// ---- session state (the prompt cache) -------------------------------------------------------

class Checkpoint;

// "Gemma 3 270M L18 H640 ... tensors <hash>": the config plus an XXH3-64 hash of every text
// tensor's name, type, size and every byte of its data, so a state never meets another
// model's weights. It reads the whole checkpoint (docs/perf.md: its cost on a large file), so
// the model computes it once, on the first save or load of a state, never at load.
std::string model_fingerprint(const Checkpoint& ckpt);

// A saved context. File layout (little-endian; tests/test_long_context.cpp):
//   "G3STATE\0" u32 version (2)
//   u32 n, fingerprint [n bytes]
//   i32 context, i32 chunk, u32 kv dtype (DType), u32 n_layers, u32 bytes_per_slot
//   u32 n_tokens, u8 in_model_turn, i32 tokens[n_tokens]
//   per layer: u32 capacity, u32 live = min(n_tokens, capacity), K [live slots], V [live slots]
//     (slot p % capacity holds position p, so the live slots are 0 .. live-1)
//   u32 vocab, f32 last_logits[vocab]
//   u64 XXH3-64 of every byte before it
struct SessionState {
  std::string fingerprint;
  std::vector<int32_t> tokens;
  bool in_model_turn = false;
  std::vector<float> last_logits;
};

// Writes `state` and the live slots of `cache` to path (through a temporary file renamed into
// place, so an interrupted save never leaves a damaged file under that name).
Status save_session_state(const std::string& path, const SessionState& state, Backend& backend,
                          const KvCache& cache);
// Reads path (a regular file no larger than this cache's largest state), checks the fingerprint against
// state->fingerprint, the settings against cache's plan, the sizes and the checksum; only then copies K/V
// into `cache` and fills tokens, in_model_turn and last_logits (whose size must be `vocab`).
Status load_session_state(const std::string& path, int vocab, SessionState* state, Backend& backend,
                          KvCache& cache);
// The same state as bytes in memory (the file's format), and back: errors name `what`.
std::string session_state_bytes(const SessionState& state, Backend& backend, const KvCache& cache);
Status restore_session_state(std::string_view bytes, const std::string& what, int vocab, SessionState* state,
                             Backend& backend, KvCache& cache);

}  // namespace gemma3
