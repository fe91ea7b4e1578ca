// The Gemma 3 decoder, written once over the backend op interface
// (docs/architecture.md §2).
#pragma once

#include <functional>
#include <map>
#include <memory>
#include <span>
#include <string>
#include <tuple>
#include <vector>

#include "backend/backend.h"
#include "checkpoint/weights.h"
#include "model/config.h"

namespace gemma3 {

// The weights as the backend holds them (same structure as Weights).
struct BackendModel {
  struct Layer {
    std::unique_ptr<BackendWeight> attn_norm, q, k, v, q_norm, k_norm, o, post_attn_norm, ffn_norm, gate, up,
        down, post_ffn_norm;
    // Backend::upload_stacked's q|k|v and gate|up, when the backend stacks them (then q, k, v
    // or gate, up are not uploaded).
    std::unique_ptr<BackendWeight> qkv, gate_up;
  };
  std::unique_ptr<BackendWeight> embed, final_norm;
  std::vector<Layer> layers;

  // progress: draw a bar on stderr while uploading (large models).
  static Result<BackendModel> upload(Backend& backend, const Weights& weights, bool progress = false);
};

// The KV memory one sequence's forward reads and appends to: one KvLayer per layer (position p
// in slot p % capacity), the positions it can hold and the most tokens one call may append.
// The runtime owns the memory (runtime/kv_cache.h: KvCache::view()); the graph only uses it.
struct KvView {
  std::span<const KvLayer> layers;  // [n_layers]
  int context = 0;
  int chunk = 0;
};

// Per-session activation buffers for chunks of up to `chunk` tokens, in backend memory.
class ForwardScratch {
 public:
  ForwardScratch(Backend& backend) : backend_(backend) {}
  ~ForwardScratch();
  ForwardScratch(const ForwardScratch&) = delete;
  ForwardScratch& operator=(const ForwardScratch&) = delete;
  // logit_rows: rows of `logits`; at least min(chunk, kLogitRows), and a batched step
  // (forward_batch) needs one per sequence.
  Status allocate(const ModelConfig& c, int chunk, int logit_rows = 0);
  uint64_t bytes() const { return bytes_; }
  int chunk() const { return chunk_; }
  int logit_rows() const { return logit_rows_; }

  float* x = nullptr;                    // [chunk, H] residual stream
  float* a = nullptr;                    // [chunk, H] branch output
  float* normed = nullptr;               // [chunk, H] normed input of a block
  float* q = nullptr;                    // [chunk, nH*hd]
  float* k = nullptr;                    // [chunk, nKV*hd]
  float* v = nullptr;                    // [chunk, nKV*hd]
  float* attn = nullptr;                 // [chunk, nH*hd]
  float* gate = nullptr;                 // [chunk, I]
  float* up = nullptr;                   // [chunk, I]
  static constexpr int kLogitRows = 16;  // LM head rows computed per matmul
  float* logits = nullptr;               // [logit_rows(), V]

  // Recorded steps (Backend::begin_recording) over these buffers and one cache, by (the cache's
  // layers, step tokens, end of the position bucket, kv_start); forward() makes and replays
  // them. No step: the ops could not be recorded and run directly.
  std::map<std::tuple<const KvLayer*, int, int, int>, std::unique_ptr<RecordedStep>> recorded;

 private:
  Backend& backend_;
  std::vector<void*> owned_;
  uint64_t bytes_ = 0;
  int chunk_ = 0, logit_rows_ = 0;
};

using ActivationHook = std::function<void(int layer, const std::string& name, const float* data, int64_t n)>;

struct ForwardRequest {
  const int32_t* ids = nullptr;  // host, [n]
  int n = 0;                     // 1 <= n <= chunk
  int pos0 = 0;                  // absolute position of ids[0]
  int kv_start = 0;              // position of the first token in the cache (0 unless a sequence
                                 // starts at an offset, as in the RoPE tests)
  bool all_logits = false;       // logits for every token, else only for the last one
  // Image soft tokens (docs/vision.md): host [n, H] input rows used instead of embed(ids), not
  // scaled by sqrt(H); ids are then only recorded, not looked up.
  const float* embeddings = nullptr;
  // A bidirectional group at absolute positions [bidir_begin, bidir_end) inside this chunk
  // (backend.h AttentionParams); empty: none.
  int bidir_begin = 0;
  int bidir_end = 0;
};

// Runs one chunk through the model, appending its K/V to the cache. Logits are copied to
// logits_host: [n, V] when all_logits, else [V]. With logits_host null (decode: the token is
// sampled on the backend) the last token's logits stay in s.logits (backend memory, [V]; needs
// !all_logits) until the next forward with s, and nothing is copied back.
Status forward(const ModelConfig& c, const BackendModel& w, Backend& backend, const KvView& kv,
               ForwardScratch& s, const ForwardRequest& req, float* logits_host, const ActivationHook* hook);

// One sequence's tokens in a batched step (forward_batch): its KV memory, its positions and,
// for an image, its embeddings and bidirectional group (as ForwardRequest).
struct ForwardSeq {
  KvView kv;
  const int32_t* ids = nullptr;  // host, [n]
  int n = 0;
  int pos0 = 0;
  int kv_start = 0;
  const float* embeddings = nullptr;
  int bidir_begin = 0;
  int bidir_end = 0;
  bool want_logits = true;  // the logits of its last token (decode; the end of a prompt)
};

// One step over the tokens of several sequences, each with its own KV memory and positions:
// the sequences' tokens are stacked (sequence i's rows after those of 0..i-1; at most s.chunk()
// in all) and every matmul, norm and GeGLU runs over all of them at once, so the weights are
// read once per step whatever the number of sequences; QK-norm + RoPE + the cache write and
// attention run per sequence (docs/architecture.md §7, "Batched steps"). The logits of
// sequence i's last token (when want_logits; at most s.logit_rows() sequences) are left in
// s.logits row i (backend memory) until the next forward with s, and copied to
// logits_host [seqs.size(), V] when it is given. A row depends only on its own sequence,
// never on the others in the step, up to the backend's choice of kernel by the step's token
// count (the fast CPU backend's int8 decode path below 16 tokens; none with
// BackendOptions::batch_invariant). Steps of several sequences are not recorded.
Status forward_batch(const ModelConfig& c, const BackendModel& w, Backend& backend,
                     std::span<const ForwardSeq> seqs, ForwardScratch& s, float* logits_host);

// bf16(sqrt(H)): the embedding scale is rounded to the checkpoints' dtype before the multiply
// (HF Gemma3TextScaledWordEmbedding, gemma.cpp EmbeddingScaling; docs/architecture.md §2.1).
float embedding_scale(int hidden);

}  // namespace gemma3
