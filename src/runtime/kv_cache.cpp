#include "runtime/kv_cache.h"

#include <fmt/format.h>
#include <sys/stat.h>
#include <xxhash.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <iterator>
#include <memory>

#include "checkpoint/weights.h"
#include "gemma3/util.h"

namespace gemma3 {

DType kv_dtype(KvType t) {
  switch (t) {
    case KvType::kF32: return DType::kF32;
    case KvType::kQ8_0: return DType::kQ8_0;
    case KvType::kF8: return DType::kF8E4M3;
    case KvType::kBF16: break;
  }
  return DType::kBF16;
}

const char* kv_type_name(KvType t) {
  switch (t) {
    case KvType::kF32: return "f32";
    case KvType::kQ8_0: return "q8_0";
    case KvType::kF8: return "fp8";
    case KvType::kBF16: break;
  }
  return "bf16";
}

std::optional<KvType> kv_type_from_name(std::string_view name) {
  for (KvType t : {KvType::kBF16, KvType::kF32, KvType::kQ8_0, KvType::kF8})
    if (name == kv_type_name(t)) return t;
  return std::nullopt;
}

Status check_kv_type(const ModelConfig& config, KvType t) {
  if (t == KvType::kQ8_0 && config.head_dim % 32 != 0)
    return unsupported(
        fmt::format("KV type q8_0 needs head_dim % 32 == 0 (Q8_0 blocks of 32 per head row), "
                    "this model has head_dim {}; use LoadOptions::kv_type = KvType::kBF16 or KvType::kF8",
                    config.head_dim));
  return ok_status();
}

KvPlan plan_kv(const ModelConfig& config, int context, int chunk, DType dtype, uint64_t granularity) {
  KvPlan p;
  p.context = context;
  p.chunk = std::max(1, std::min(chunk, context));
  p.dtype = dtype;
  // One (slot, kv head) row of head_dim values (backend.h KvLayer); for Q8_0 a head_dim that is
  // not a multiple of 32 is refused by check_kv_type before any plan is used.
  const uint64_t row = row_bytes(dtype, config.head_dim).value_or(0);
  p.bytes_per_slot = 2ull * config.n_kv_heads * row;
  p.capacity.resize(config.n_layers);
  for (int i = 0; i < config.n_layers; ++i) {
    const bool global = config.is_global(i);
    p.capacity[i] = global ? context : std::min(context, config.sliding_window + p.chunk - 1);
    (global ? p.global_bytes : p.local_bytes) += p.bytes_per_slot * p.capacity[i];
    p.all_global_bytes += p.bytes_per_slot * static_cast<uint64_t>(context);
  }
  p.page_tokens = 16;
  const uint64_t layer_row = p.bytes_per_slot / 2;  // one position's K in one layer
  while (granularity > 0 && layer_row * p.page_tokens % granularity != 0 && p.page_tokens < (1 << 20))
    p.page_tokens += 16;
  // A page longer than the context (a GPU maps 2 MiB at a time: 131072 positions of a Q8_0 row
  // of 272 bytes) would make every sequence hold a whole page for nothing: such a plan is not
  // paged (KvCache::allocate, plan_memory) and counts in pages of 16 positions.
  if (p.page_tokens > context) p.page_tokens = 16;
  p.page_bytes = p.bytes_per_slot * p.page_tokens * static_cast<uint64_t>(config.n_global_layers());
  return p;
}

KvCache::~KvCache() {
  if (checkpoint_) backend_.release(checkpoint_);
  for (size_t i = 0; i < layers_.size(); ++i) {
    KvLayer& l = layers_[i];
    for (void* p : {l.k, l.v}) {
      if (!p) continue;
      if (reserved(i))  // the size allocate() reserved: whole pages
        backend_.unreserve(p, page_bytes_ * plan_.pages_for(plan_.capacity[i]));
      else
        backend_.release(p);
    }
  }
}

Status KvCache::allocate(const ModelConfig& config, bool paged) {
  const uint64_t row = plan_.bytes_per_slot / 2;
  const size_t gran = paged ? backend_.map_granularity() : 0;
  if (gran > 0 && row * plan_.page_tokens % gran == 0) page_bytes_ = row * plan_.page_tokens;
  layers_.resize(config.n_layers);
  global_.resize(config.n_layers);
  for (int i = 0; i < config.n_layers; ++i) global_[i] = config.is_global(i);
  for (int i = 0; i < config.n_layers; ++i) {
    const uint64_t half = row * plan_.capacity[i];
    KvLayer& l = layers_[i];
    l.capacity = plan_.capacity[i];
    l.dtype = plan_.dtype;
    const bool reserve = reserved(i);
    // A whole number of pages, so the last page of a context that is not a multiple maps whole.
    const uint64_t bytes = reserve ? page_bytes_ * plan_.pages_for(l.capacity) : half;
    for (void** p : {&l.k, &l.v}) {
      GEMMA3_ASSIGN_OR_RETURN(*p, reserve ? backend_.reserve(bytes) : backend_.allocate(bytes));
    }
    if (!reserve) (config.is_global(i) ? allocated_global_ : allocated_local_) += 2 * half;
  }
  return ok_status();
}

Status KvCache::allocate_checkpoint() {
  GEMMA3_ASSIGN_OR_RETURN(checkpoint_, backend_.allocate(plan_.local_bytes));
  return ok_status();
}

void KvCache::copy_rings(void* checkpoint, bool save) {
  char* at = static_cast<char*>(checkpoint);
  for (size_t i = 0; i < layers_.size(); ++i) {
    if (global_[i]) continue;
    const uint64_t half = plan_.bytes_per_slot / 2 * plan_.capacity[i];
    for (void* p : {layers_[i].k, layers_[i].v}) {
      if (save)
        backend_.copy(p, at, half);
      else
        backend_.copy(at, p, half);
      at += half;
    }
  }
}

void KvCache::save_rings() {
  if (checkpoint_) copy_rings(checkpoint_, true);
}
void KvCache::restore_rings() {
  if (checkpoint_) copy_rings(checkpoint_, false);
}

void KvCache::copy_prefix(const KvCache& from, int tokens) {
  const uint64_t bytes = plan_.bytes_per_slot / 2 * static_cast<uint64_t>(tokens);
  for (size_t i = 0; i < layers_.size(); ++i)
    if (global_[i]) {
      backend_.copy(from.layers_[i].k, layers_[i].k, bytes);
      backend_.copy(from.layers_[i].v, layers_[i].v, bytes);
    }
  if (from.checkpoint_) copy_rings(from.checkpoint_, false);
}

Status KvCache::map_pages(int n) {
  n = std::min(n, plan_.pages_for(plan_.context));
  if (n <= mapped_pages_) return ok_status();
  if (page_bytes_ > 0)
    for (size_t i = 0; i < layers_.size(); ++i) {
      if (!reserved(i)) continue;
      const uint64_t at = page_bytes_ * mapped_pages_, bytes = page_bytes_ * (n - mapped_pages_);
      for (void* p : {layers_[i].k, layers_[i].v}) {
        if (Status s = backend_.map(p, at, bytes); !s.ok()) {
          unmap_pages_from(mapped_pages_);  // the layers mapped so far (the count is unchanged)
          return s.with_context("engine KV pages");
        }
      }
    }
  allocated_global_ += 2 * page_bytes_ * (n - mapped_pages_) * reserved_layers();
  mapped_pages_ = n;
  return ok_status();
}

void KvCache::unmap_pages_from(int n) {
  n = std::max(n, 0);
  if (page_bytes_ > 0)
    for (size_t i = 0; i < layers_.size(); ++i) {
      if (!reserved(i)) continue;
      // Every page from n on: after a failed map_pages, some past mapped_pages_ may be mapped.
      const uint64_t at = page_bytes_ * n, bytes = page_bytes_ * plan_.pages_for(plan_.context) - at;
      if (bytes == 0) continue;
      backend_.unmap(layers_[i].k, at, bytes);
      backend_.unmap(layers_[i].v, at, bytes);
    }
  if (n < mapped_pages_) {
    allocated_global_ -= 2 * page_bytes_ * (mapped_pages_ - n) * reserved_layers();
    mapped_pages_ = n;
  }
}

}  // namespace gemma3

// ---- session state ------------------------------------------------------------------------------

namespace gemma3 {
namespace {

constexpr char kStateMagic[8] = {'G', '3', 'S', 'T', 'A', 'T', 'E', '\0'};
constexpr uint32_t kStateVersion = 2;  // 2: XXH3 checksum and fingerprint of every tensor byte

// XXH3-64 over a stream of byte ranges (the file checksum and the model fingerprint; tens of
// GB/s, so hashing every weight byte costs about what reading the file does).
class Hash {
 public:
  Hash() : s_(XXH3_createState()) { XXH3_64bits_reset(s_.get()); }
  void add(const void* p, size_t n) { XXH3_64bits_update(s_.get(), p, n); }
  uint64_t value() const { return XXH3_64bits_digest(s_.get()); }

 private:
  struct Free {
    void operator()(XXH3_state_t* s) const { XXH3_freeState(s); }
  };
  std::unique_ptr<XXH3_state_t, Free> s_;
};

// Appends to a sink (a file, or a string) while hashing what it wrote.
struct Writer {
  std::function<void(const void*, size_t)> sink;
  Hash hash;
  void bytes(const void* p, size_t n) {
    sink(p, n);
    hash.add(p, n);
  }
  template <typename T>
  void pod(T v) {
    bytes(&v, sizeof v);
  }
};

// Reads from a buffer holding the whole state; every read checks the bytes are there.
struct Reader {
  const std::string& what;  // "prompt cache PATH", "session state"
  std::string_view buf;
  size_t at = 0;
  Status take(void* dst, size_t n, const char* field) {
    if (buf.size() - at < n)
      return invalid_file(fmt::format("{}: truncated at byte {} reading {} ({} bytes, {} left)", what, at,
                                      field, n, buf.size() - at));
    std::memcpy(dst, buf.data() + at, n);
    at += n;
    return ok_status();
  }
  template <typename T>
  Result<T> pod(const char* what) {
    T v;
    GEMMA3_TRY(take(&v, sizeof v, what));
    return v;
  }
};

}  // namespace

std::string model_fingerprint(const Checkpoint& ckpt) {
  const ModelConfig& c = ckpt.config();
  Hash hash;
  for (const TensorView* t : ckpt.text_tensors()) {
    hash.add(t->name.data(), t->name.size());
    const uint8_t dt = static_cast<uint8_t>(t->dtype);
    hash.add(&dt, 1);
    hash.add(&t->nbytes, sizeof t->nbytes);
    if (t->data) hash.add(t->data, t->nbytes);  // every byte: a checkpoint that differs anywhere differs here
  }
  return fmt::format("Gemma 3 {} L{} H{} I{} heads {}/{} hd {} V{} W{} tensors {:016x}", c.size_label,
                     c.n_layers, c.hidden, c.intermediate, c.n_heads, c.n_kv_heads, c.head_dim, c.vocab_size,
                     c.sliding_window, hash.value());
}

namespace {

// The state in the file format, through w (everything but the trailing checksum).
void write_state(Writer& w, const SessionState& state, Backend& backend, const KvCache& cache) {
  const KvPlan& plan = cache.plan();
  w.bytes(kStateMagic, sizeof kStateMagic);
  w.pod(kStateVersion);
  w.pod(static_cast<uint32_t>(state.fingerprint.size()));
  w.bytes(state.fingerprint.data(), state.fingerprint.size());
  w.pod(static_cast<int32_t>(plan.context));
  w.pod(static_cast<int32_t>(plan.chunk));
  w.pod(static_cast<uint32_t>(plan.dtype));
  w.pod(static_cast<uint32_t>(plan.capacity.size()));
  w.pod(static_cast<uint32_t>(plan.bytes_per_slot));
  const uint32_t n = static_cast<uint32_t>(state.tokens.size());
  w.pod(n);
  w.pod(static_cast<uint8_t>(state.in_model_turn));
  w.bytes(state.tokens.data(), n * sizeof(int32_t));
  std::vector<char> host;
  const uint64_t half_slot = plan.bytes_per_slot / 2;  // K (or V) of one slot
  for (size_t i = 0; i < plan.capacity.size(); ++i) {
    const uint32_t live = std::min<uint32_t>(n, plan.capacity[i]);
    w.pod(static_cast<uint32_t>(plan.capacity[i]));
    w.pod(live);
    host.resize(live * half_slot);
    for (void* src : {cache.layer(static_cast<int>(i)).k, cache.layer(static_cast<int>(i)).v}) {
      backend.to_host(src, host.data(), host.size());
      w.bytes(host.data(), host.size());
    }
  }
  w.pod(static_cast<uint32_t>(state.last_logits.size()));
  w.bytes(state.last_logits.data(), state.last_logits.size() * sizeof(float));
}

}  // namespace

std::string session_state_bytes(const SessionState& state, Backend& backend, const KvCache& cache) {
  std::string out;
  Writer w{[&](const void* p, size_t n) { out.append(static_cast<const char*>(p), n); }, {}};
  write_state(w, state, backend, cache);
  const uint64_t sum = w.hash.value();
  out.append(reinterpret_cast<const char*>(&sum), sizeof sum);
  return out;
}

Status save_session_state(const std::string& path, const SessionState& state, Backend& backend,
                          const KvCache& cache) {
  // Only a regular file is replaced: never a directory, a device or a /proc file.
  struct stat st {};
  if (::stat(path.c_str(), &st) == 0 && !S_ISREG(st.st_mode))
    return invalid_file(fmt::format("prompt cache {}: {}, not a regular file", path,
                                    S_ISDIR(st.st_mode) ? "is a directory" : "exists"));
  const std::string tmp = path + ".tmp";
  std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
  if (!out)
    return invalid_file(
        fmt::format("prompt cache {}: cannot create {}: {}", path, tmp, std::strerror(errno)));
  Writer w{[&](const void* p, size_t n) {
             out.write(static_cast<const char*>(p), static_cast<std::streamsize>(n));
           },
           {}};
  write_state(w, state, backend, cache);
  const uint64_t sum = w.hash.value();
  out.write(reinterpret_cast<const char*>(&sum), sizeof sum);
  out.close();
  if (!out) {
    std::remove(tmp.c_str());
    return invalid_file(fmt::format("prompt cache {}: writing {} failed (disk full?)", path, tmp));
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0) {
    const int err = errno;
    std::remove(tmp.c_str());
    return invalid_file(
        fmt::format("prompt cache {}: cannot rename {} into place: {}", path, tmp, std::strerror(err)));
  }
  return ok_status();
}

Status load_session_state(const std::string& path, int vocab, SessionState* state, Backend& backend,
                          KvCache& cache) {
  // The largest state this session can have written: the header (fingerprint at most 64 KiB),
  // every token, every layer's live K/V, the logits and the checksum. Anything larger, or not a
  // regular file (a directory, /dev/zero, /proc/self/mem), is refused before it is read.
  const KvPlan& plan = cache.plan();
  uint64_t max_bytes = (64u << 10) + 4ull * plan.context + 4ull * vocab + 8;
  for (int cap : plan.capacity) max_bytes += 8 + static_cast<uint64_t>(cap) * plan.bytes_per_slot;
  GEMMA3_ASSIGN_OR_RETURN(
      const std::string buf,
      read_file_limited(path, max_bytes, "prompt cache", FileKind::kRegular, ErrorCode::kInvalidFile));
  return restore_session_state(buf, fmt::format("prompt cache {}", path), vocab, state, backend, cache);
}

Status restore_session_state(std::string_view buf, const std::string& what, int vocab, SessionState* state,
                             Backend& backend, KvCache& cache) {
  const KvPlan& plan = cache.plan();
  if (buf.size() < sizeof kStateMagic + 8 || std::memcmp(buf.data(), kStateMagic, sizeof kStateMagic) != 0)
    return invalid_file(fmt::format("{}: not a gemma3 session state (bad magic)", what));
  uint64_t sum;
  std::memcpy(&sum, buf.data() + buf.size() - 8, 8);
  Hash hash;
  hash.add(buf.data(), buf.size() - 8);
  Reader r{what, buf, sizeof kStateMagic};
  GEMMA3_ASSIGN_OR_RETURN(uint32_t version, r.pod<uint32_t>("version"));
  if (version != kStateVersion)
    return invalid_file(fmt::format("{}: version {}, expected {}", what, version, kStateVersion));
  if (hash.value() != sum)
    return invalid_file(fmt::format("{}: checksum mismatch (file truncated or corrupt)", what));

  GEMMA3_ASSIGN_OR_RETURN(uint32_t fp_len, r.pod<uint32_t>("fingerprint length"));
  std::string fp(std::min<size_t>(fp_len, buf.size()), '\0');
  GEMMA3_TRY(r.take(fp.data(), fp_len, "fingerprint"));
  if (fp != state->fingerprint)
    return invalid_argument(
        fmt::format("{}: saved for another model ({}), this is {}", what, fp, state->fingerprint));
  auto expect = [&](const char* field, int64_t got, int64_t want, const char* hint) -> Status {
    if (got == want) return ok_status();
    return invalid_argument(fmt::format("{}: {} is {}, this session has {}{}", what, field, got, want, hint));
  };
  GEMMA3_ASSIGN_OR_RETURN(int32_t context, r.pod<int32_t>("context"));
  GEMMA3_TRY(expect("context", context, plan.context, " (use the same LoadOptions::context)"));
  GEMMA3_ASSIGN_OR_RETURN(int32_t chunk, r.pod<int32_t>("chunk"));
  GEMMA3_TRY(expect("prefill chunk", chunk, plan.chunk, " (use the same LoadOptions::prefill_chunk)"));
  GEMMA3_ASSIGN_OR_RETURN(uint32_t dtype, r.pod<uint32_t>("kv type"));
  if (dtype != static_cast<uint32_t>(plan.dtype))
    return invalid_argument(
        fmt::format("{}: KV type {}, this session has {} (use the same LoadOptions::kv_type)", what,
                    dtype < 16 ? dtype_name(static_cast<DType>(dtype)) : "?", dtype_name(plan.dtype)));
  GEMMA3_ASSIGN_OR_RETURN(uint32_t n_layers, r.pod<uint32_t>("layer count"));
  GEMMA3_TRY(expect("layer count", n_layers, static_cast<int64_t>(plan.capacity.size()), ""));
  GEMMA3_ASSIGN_OR_RETURN(uint32_t slot_bytes, r.pod<uint32_t>("bytes per slot"));
  GEMMA3_TRY(expect("bytes per slot", slot_bytes, static_cast<int64_t>(plan.bytes_per_slot), ""));
  GEMMA3_ASSIGN_OR_RETURN(uint32_t n, r.pod<uint32_t>("token count"));
  if (n > static_cast<uint32_t>(plan.context))
    return invalid_file(fmt::format("{}: {} tokens exceed the context {}", what, n, plan.context));
  GEMMA3_ASSIGN_OR_RETURN(uint8_t in_model_turn, r.pod<uint8_t>("turn flag"));
  std::vector<int32_t> tokens(n);
  GEMMA3_TRY(r.take(tokens.data(), n * sizeof(int32_t), "tokens"));
  const uint64_t half_slot = plan.bytes_per_slot / 2;
  std::vector<size_t> kv_at(n_layers);  // offset of each layer's K bytes in buf
  for (uint32_t i = 0; i < n_layers; ++i) {
    GEMMA3_ASSIGN_OR_RETURN(uint32_t cap, r.pod<uint32_t>("layer capacity"));
    GEMMA3_TRY(expect("layer capacity", cap, plan.capacity[i], ""));
    GEMMA3_ASSIGN_OR_RETURN(uint32_t live, r.pod<uint32_t>("live slots"));
    GEMMA3_TRY(expect("live slots", live, std::min<uint32_t>(n, cap), ""));
    kv_at[i] = r.at;
    if (buf.size() - r.at < 2 * live * half_slot)
      return invalid_file(fmt::format("{}: truncated in layer {}'s K/V", what, i));
    r.at += 2 * live * half_slot;
  }
  GEMMA3_ASSIGN_OR_RETURN(uint32_t n_logits, r.pod<uint32_t>("vocab"));
  GEMMA3_TRY(expect("vocab", n_logits, vocab, ""));
  std::vector<float> logits(n_logits);
  GEMMA3_TRY(r.take(logits.data(), n_logits * sizeof(float), "last logits"));
  if (r.at + 8 != buf.size())
    return invalid_file(fmt::format("{}: {} unexpected bytes at the end", what, buf.size() - r.at - 8));

  // Everything checked: now the session changes.
  for (uint32_t i = 0; i < n_layers; ++i) {
    const size_t bytes = std::min<uint32_t>(n, plan.capacity[i]) * half_slot;
    backend.from_host(buf.data() + kv_at[i], cache.layer(static_cast<int>(i)).k, bytes);
    backend.from_host(buf.data() + kv_at[i] + bytes, cache.layer(static_cast<int>(i)).v, bytes);
  }
  state->tokens = std::move(tokens);
  state->in_model_turn = in_model_turn != 0;
  state->last_logits = std::move(logits);
  return ok_status();
}

}  // namespace gemma3
