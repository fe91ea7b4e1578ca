// The op interface every backend implements: a small, Gemma-shaped op set. The model graph
// (src/model/forward.cpp) is written once over it; no backend ever sees "Gemma".
//
// Activations are fp32 row-major buffers in backend memory (host for the CPU, device for CUDA),
// allocated through the backend. Weights are uploaded once into BackendWeight objects.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "core/dtype.h"
#include "core/tensor.h"
#include "gemma3/gemma3.h"  // SamplingOptions
#include "gemma3/status.h"

namespace gemma3 {

// A weight tensor as a backend holds it: a matrix [rows (out), cols (in)] or a vector [cols].
class BackendWeight {
 public:
  virtual ~BackendWeight() = default;
  int64_t rows = 0;
  int64_t cols = 0;
  DType dtype = DType::kF32;
};

// One layer's K and V cache in backend memory. Position p lives in slot p % capacity.
// k, v: [capacity, n_kv_heads, head_dim] of `dtype`:
//   kF32, kBF16: plain elements;
//   kQ8_0: each (slot, kv head) row of head_dim values is head_dim / 32 GGUF Q8_0 blocks
//          (fp16 scale + 32 int8), i.e. 34 * head_dim / 32 bytes per row (head_dim % 32 == 0);
//   kF8E4M3: one e4m3fn byte per value, no scale (saturating conversion, as vLLM's default).
struct KvLayer {
  void* k = nullptr;
  void* v = nullptr;
  int capacity = 0;
  DType dtype = DType::kBF16;
};

struct AttentionParams {
  int n_tokens = 0;  // queries, at absolute positions pos0 .. pos0 + n_tokens - 1
  int pos0 = 0;
  int n_heads = 0;  // query heads; query head h reads kv head h / (n_heads / n_kv_heads)
  int n_kv_heads = 0;
  int head_dim = 0;
  float scale = 0;   // logits = (q . k) * scale
  int window = 0;    // 0: causal (j <= i); W > 0: sliding, keys i - W < j <= i
  int kv_start = 0;  // first position the cache holds (keys j < kv_start do not exist)
  // A bidirectional group (an image's soft tokens; the vision tower uses the whole input):
  // a query at position i in [bidir_begin, bidir_end) also sees the later keys j of that range
  // (i < j < bidir_end). The window still bounds keys from below: on a sliding layer the keys
  // are i - W < j <= max(i, bidir_end - 1). This is transformers 5.24's
  // create_masks_for_vision_model, sliding = (causal OR same-image) AND (j > i - W), and JAX's
  // (an image never exceeds the real models' windows, so only tiny test models see the AND).
  // Empty range: none. The group lies inside this call's tokens.
  int bidir_begin = 0;
  int bidir_end = 0;
};

// The last key position query position i sees (i itself, or the end of its bidirectional group).
inline int64_t attention_last_key(const AttentionParams& p, int64_t i) {
  return i >= p.bidir_begin && i < p.bidir_end ? p.bidir_end - 1 : i;
}

// A recorded sequence of ops (Backend::begin_recording); opaque, freed by its owner.
class RecordedStep {
 public:
  virtual ~RecordedStep() = default;
};

class Backend {
 public:
  virtual ~Backend() = default;
  virtual std::string name() const = 0;

  // ---- memory ----
  virtual Result<void*> allocate(size_t bytes) = 0;  // zero-filled
  virtual void release(void* ptr) = 0;
  // Paged memory (the Engine's KV pool, docs/batching.md "Paged KV"): an address range with
  // nothing behind it, into which pages of memory are put and taken back as a sequence grows
  // and ends, so that attention still reads one contiguous range per layer (vAttention's
  // design, not a page table in every kernel). map_granularity() is the unit (offsets and sizes
  // are multiples of it); 0 when the backend cannot do this: reserve() then allocates the
  // whole range and map/unmap do nothing (the memory is all there from the start).
  virtual size_t map_granularity() { return 0; }
  virtual Result<void*> reserve(size_t bytes) { return allocate(bytes); }
  virtual void unreserve(void* base, size_t bytes) { release(base); }
  // Zero-filled memory behind [base + offset, base + offset + bytes) / none (its contents lost).
  virtual Status map(void* base, size_t offset, size_t bytes) { return ok_status(); }
  virtual void unmap(void* base, size_t offset, size_t bytes) {}
  virtual void to_host(const void* src, void* dst_host, size_t bytes) = 0;
  // Within backend memory, in order with the ops (a device-to-device copy on a GPU).
  virtual void copy(const void* src, void* dst, size_t bytes) = 0;
  virtual void from_host(const void* src_host, void* dst, size_t bytes) = 0;
  // Makes a weight usable by the ops. The view's data must outlive the returned object
  // (the CPU backend reads mapped memory in place).
  virtual Result<std::unique_ptr<BackendWeight>> upload(const TensorView& tensor) = 0;
  // upload() for a matrix only matmul and embed read: the decoder's projections and the tied
  // token embedding / LM head. A backend may hold it in a smaller type for matmul
  // (BackendOptions::fp8_weights); embed still returns the stored values. Everything else
  // (norm vectors, the vision tower) goes through upload() and keeps its stored type.
  virtual Result<std::unique_ptr<BackendWeight>> upload_matmul_weight(const TensorView& tensor) {
    return upload(tensor);
  }

  // Matrices of one type and width stacked into one weight, rows in the given order (a layer's
  // q|k|v, or gate|up), for a backend whose matmul gains from reading them in one pass; the
  // same narrowing as upload_matmul_weight. Returns no weight (the default) when the backend
  // would not gain; the graph then keeps and multiplies the parts. The views need not outlive
  // the result. Only matmul_parts and matmul_geglu take a stacked weight.
  virtual Result<std::unique_ptr<BackendWeight>> upload_stacked(const std::vector<const TensorView*>& parts) {
    return std::unique_ptr<BackendWeight>();
  }

  // Waits for queued work and returns the first error any op hit since the backend was made
  // (ops return void; a device backend records failures instead). The CPU backend never fails.
  virtual Status status() { return ok_status(); }
  // Bytes the backend can still allocate; 0 when unknown or not worth planning (host memory).
  // The memory planner compares its plan with this before allocating anything.
  virtual uint64_t free_bytes() { return 0; }
  // Bytes read + written per second by a large copy inside backend memory, best of a few (a
  // device-to-device copy on a GPU, a memcpy on every pool thread on the CPU): the bandwidth
  // roofline `gemma3 bench` puts decode speed against. 0 when it cannot be measured.
  virtual double copy_bandwidth() { return 0; }
  // Multiply-adds x 2 per second of the backend's dense bf16 GEMM (cuBLAS, fp32 accumulation)
  // for out [m, n] = a [m, k] b^T, best of a few: the compute roofline `gemma3 bench` puts
  // prefill against. 0 when the backend has none (the CPU) or it cannot be measured.
  virtual double gemm_rate(int64_t m, int64_t n, int64_t k) { return 0; }

  // ---- ops (shapes in elements; all float* are backend memory) ----
  // out[t, :] = row ids[t] of table (dequantized) * scale. ids: host, [n].
  virtual void embed(const BackendWeight& table, const int32_t* ids, int n, float scale, float* out) = 0;
  // out[r, :] = x[r, :] / sqrt(mean(x[r, :]^2) + eps) * w, for rows r < rows; w [dim] already
  // holds (1 + w_hf): the +1 is applied once, at load time. In place allowed.
  virtual void rmsnorm(const float* x, const BackendWeight& w, int64_t rows, int dim, float eps,
                       float* out) = 0;
  // out[t, o] = sum_i x[t, i] * W[o, i]; x [n, W.cols], out [n, W.rows]. fp32 accumulation.
  virtual void matmul(const float* x, int n, const BackendWeight& w, float* out) = 0;
  // matmul with a weight of upload_stacked: part j's rows give outs[j] [n, rows of part j].
  // (The defaults of these two are unreachable: the default upload_stacked stacks nothing.)
  virtual void matmul_parts(const float* x, int n, const BackendWeight& stacked, float* const* outs) {}
  // The MLP's GeGLU from a stacked gate|up weight: out [n, rows / 2] = gelu_tanh(x gate^T) *
  // (x up^T), as matmul, matmul, gelu_gate; up: [n, rows / 2] the backend may use as scratch.
  virtual void matmul_geglu(const float* x, int n, const BackendWeight& gate_up, float* up, float* out) {}
  // Rotate-half RoPE in place on x [n, n_heads, head_dim], token t at position pos0 + t:
  // angle_i = (pos / scale) * theta^(-2i/head_dim), pairs (i, i + head_dim/2).
  virtual void rope(float* x, int n, int n_heads, int head_dim, int pos0, float theta, float scale) = 0;
  // Writes k, v [n, n_kv_heads * head_dim] for positions pos0.. into the cache slots.
  virtual void kv_write(const float* k, const float* v, int n, int pos0, int kv_width,
                        const KvLayer& cache) = 0;
  // out [n, n_heads * head_dim] = softmax(q k^T * scale + mask) v, over the cached keys visible
  // to each query (see AttentionParams). q: [n, n_heads * head_dim].
  virtual void attention(const float* q, const KvLayer& cache, const AttentionParams& p, float* out) = 0;
  // Fused steps of the decoder (docs/cuda.md, "One decode step"). The defaults run the ops
  // above in turn; a backend may replace them with one pass that gives the same result.
  //
  // One layer's QK-norm, RoPE and cache write: rmsnorm of q's n * n_heads and k's
  // n * n_kv_heads head rows (q_norm, k_norm: [head_dim]), rope of both at pos0 (theta, scale as
  // rope), then kv_write of k and v. q, k: in place.
  virtual void qk_norm_rope_kv_write(float* q, float* k, const float* v, const BackendWeight& q_norm,
                                     const BackendWeight& k_norm, int n, int n_heads, int n_kv_heads,
                                     int head_dim, float eps, int pos0, float theta, float scale,
                                     const KvLayer& cache) {
    rmsnorm(q, q_norm, int64_t{n} * n_heads, head_dim, eps, q);
    rmsnorm(k, k_norm, int64_t{n} * n_kv_heads, head_dim, eps, k);
    rope(q, n, n_heads, head_dim, pos0, theta, scale);
    rope(k, n, n_kv_heads, head_dim, pos0, theta, scale);
    kv_write(k, v, n, pos0, n_kv_heads * head_dim, cache);
  }
  // The residual step after a block, for rows [rows, dim]: x += rmsnorm(a, post_norm) (a is
  // overwritten), then, when next_norm is given, normed = rmsnorm(x, *next_norm): the next
  // block's input.
  virtual void add_rmsnorm(float* a, const BackendWeight& post_norm, float* x, const BackendWeight* next_norm,
                           int64_t rows, int dim, float eps, float* normed) {
    rmsnorm(a, post_norm, rows, dim, eps, a);
    add(x, a, rows * dim, x);
    if (next_norm) rmsnorm(x, *next_norm, rows, dim, eps, normed);
  }
  // out = gelu_tanh(g) * u, elementwise over n values.
  virtual void gelu_gate(const float* g, const float* u, int64_t n, float* out) = 0;
  // out = a + b, elementwise over n values (in place allowed).
  virtual void add(const float* a, const float* b, int64_t n, float* out) = 0;

  // ---- recorded steps (docs/cuda.md, "Recorded decode steps") ----
  // A backend may record the ops of one step and replay them as one unit (the CUDA backend: a
  // CUDA graph, one launch for the ~200 of a decode step). A recording keeps the backend-memory
  // pointers its ops were given: replay it only while those buffers live, on the thread
  // discipline of the ops. Positions are what changes between replays, so inside a recording
  // every op that takes one (qk_norm_rope_kv_write, attention) reads it from the step position
  // (set_step_position, in backend memory) instead, and its pos0 argument is the bound: the
  // largest pos0 the recording will be replayed with (attention plans its key splits for it).
  // The defaults record nothing.
  virtual bool can_record() const { return false; }
  // From here until end_recording, this backend's ops are kept, not run; false when no
  // recording could start (then issue nothing for it and do not call end_recording).
  virtual bool begin_recording() { return false; }
  // Ends the recording. Returns it, or no step when it cannot be replayed: an op that cannot be
  // recorded was issued (the caller runs the ops directly), or, with *again set, a workspace had
  // to grow, which the backend did just now, and the same ops must be recorded again. Errors as
  // for the ops.
  virtual Result<std::unique_ptr<RecordedStep>> end_recording(bool* again) {
    *again = false;
    return std::unique_ptr<RecordedStep>();
  }
  // Sets the step position that recorded ops read, in order with the ops (before a replay).
  virtual void set_step_position(int pos0) {}
  // Runs a recording of end_recording.
  virtual void replay(const RecordedStep& step) {}

  // ---- sampling ----
  // The next token from one row of logits in backend memory ([n_allowed] fp32; ids >=
  // n_allowed are never produced), by Sampler's rules (backend/sampler.h): banned ids excluded,
  // repetition penalty over history, temperature (0: greedy), top-k, top-p, min-p, one draw.
  // Takes exactly one value from rng per call (this step's seed), greedy included, so a seeded
  // run's tokens do not depend on the backend. This default copies the row to the host and runs
  // Sampler; the CUDA backend picks on the device and copies back only the candidates it needs.
  // Errors as for the ops (status()); a failed backend returns 0.
  virtual int32_t sample(const float* logits, int n_allowed, const SamplingOptions& options,
                         const std::vector<int32_t>& banned, const std::vector<int32_t>& history,
                         std::mt19937_64& rng);  // default: backend_registry.cpp

  // ---- vision tower ops (SigLIP + the Gemma 3 projector) ----
  // Standard LayerNorm over rows of dim: out = (x - mean) / sqrt(var + eps) * w + b, biased
  // variance, fp32 (torch.nn.LayerNorm). w, b: [dim]. In place allowed.
  virtual void layernorm(const float* x, const BackendWeight& w, const BackendWeight& b, int64_t rows,
                         int dim, float eps, float* out) = 0;
  // The tower's residual step before a LayerNorm: x += a, then out = layernorm(x) (rows of dim);
  // out may alias a or x. Default: add, then layernorm; a backend may fuse them.
  virtual void add_layernorm(const float* a, float* x, const BackendWeight& w, const BackendWeight& b,
                             int64_t rows, int dim, float eps, float* out) {
    add(x, a, rows * dim, x);
    layernorm(x, w, b, rows, dim, eps, out);
  }
  // out[r, :] = x[r, :] + b for r < rows; b: [dim] (b.cols). In place allowed.
  virtual void add_bias(const float* x, const BackendWeight& b, int64_t rows, float* out) = 0;
  // out = gelu_tanh(x) (gelu_pytorch_tanh), elementwise over n values. In place allowed.
  virtual void gelu(const float* x, int64_t n, float* out) = 0;
  // Average pooling of a side x side grid of dim-wide rows (x [side * side, dim], row-major
  // grid) with a k x k kernel and stride k: out [(side/k)^2, dim], out row R * (side/k) + C
  // averages grid rows kR..kR+k-1, cols kC..kC+k-1 (torch AvgPool2d on the [dim, side, side]
  // view). side % k == 0.
  virtual void avg_pool(const float* x, int side, int dim, int k, float* out) = 0;
};

struct BackendOptions {
  int threads = 0;
  // CUDA only (`--weights fp8`): F32/F16/BF16 matrices given to upload_matmul_weight are
  // quantized to fp8 e4m3fn with one fp32 scale per row (amax / 448) for matmul, halving bf16's
  // bytes per decode step; embed lookups keep reading the stored rows. upload() (vectors, the
  // vision tower) and already-quantized types are kept as stored. Other backends ignore it.
  bool fp8_weights = false;
  // CPU only (LoadOptions::batch_invariant): a row's results do not depend on how many rows a
  // call has, so a token's logits are the same bits however its text was split across calls.
  // The fast backend then runs every matmul and attention as prefill does (fp32 activations,
  // the blocked attention), decode included; CUDA refuses it.
  bool batch_invariant = false;
};

Result<std::unique_ptr<Backend>> make_cpu_backend(const BackendOptions& options);

// The CUDA backend (src/backend/cuda/, kernels/): device 0, one stream. In a build without
// CUDA make_cuda_backend returns "unsupported" and cuda_backend_available() false.
Result<std::unique_ptr<Backend>> make_cuda_backend(const BackendOptions& options);
bool cuda_backend_available();  // built with CUDA and at least one device visible
// Ops return void, so the CUDA backend keeps the first error it hits; this synchronizes and
// returns it (ok for any other backend).
Status cuda_backend_status(Backend& backend);

}  // namespace gemma3
