// Host launchers of the CUDA kernels, declared without CUDA types so that the backend (and
// nothing else) can call them from plain C++. Pointers are device memory unless named *_host;
// `stream` is a cudaStream_t. Every launcher returns a cudaError_t as int (0 = success): the
// error of the launch itself or of an argument check done before it (cudaErrorInvalidValue).
// Kernel execution errors show up later, at the backend's next synchronization.
#pragma once

#include <cstddef>
#include <cstdint>

#include "block_decode.h"  // GEMMA3_HD
#include "core/dtype.h"

namespace gemma3::cuda {

using Stream = void*;  // cudaStream_t

// A weight matrix [rows, cols] in device memory: row r starts at data + r * row_bytes.
// Layout of a row by dtype (what the backend's upload writes; kernels read it through
// common.cuh's dispatch_weight): ggml's blocks back to back as stored in the checkpoint, except
// Q4_0 and Q8_0, repacked at upload into block_decode.h's planar layout — the row's quants
// (16 or 32 bytes per 32-element block) first, then its nb half scales, zero-padded to a
// multiple of 16 bytes; row_bytes = blocks::Planar<B>::row_bytes(cols) — so that the GEMV can
// read every row with 16-byte loads. Q4_K (144 B) and Q5_K (176 B) blocks are already 16-byte
// multiples; F32/F16/BF16/F8E4M3 rows are when cols is a multiple of 16 elements (the GEMV
// checks alignment and otherwise takes its per-element path).
struct WeightRef {
  const void* data = nullptr;
  int64_t rows = 0;
  int64_t cols = 0;
  uint64_t row_bytes = 0;
  DType dtype = DType::kF32;
  const float* row_scale = nullptr;  // fp8 only: n_scales values (1: per tensor, rows: per row)
  int64_t n_scales = 0;
};

// ---- dequant.cu ----
// out[(r - row0) * cols + i] = W[r, i] (dequantized, row scale applied), row0 <= r < row0 + n_rows.
int launch_dequant_rows(const WeightRef& w, int64_t row0, int64_t n_rows, float* out, Stream stream);
// The same rows rounded to bf16 bits (round to nearest even): the bf16 GEMM's weight tiles.
int launch_dequant_rows_bf16(const WeightRef& w, int64_t row0, int64_t n_rows, uint16_t* out, Stream stream);
// out[t, :] = W[ids[t], :] * scale for t < n; ids: device, [n], each in [0, rows).
int launch_embed(const WeightRef& w, const int32_t* ids, int n, float scale, float* out, Stream stream);

// fp8 weights (BackendOptions::fp8_weights): for each row r of w (F32, F16 or BF16, no row
// scale), scales[r] = amax_r / 448 (1 for an all-zero row) and dst[r * cols + i] =
// e4m3(W[r, i] / scales[r]) (round to nearest even, saturating; block_decode.h float_to_e4m3).
// dst: [rows, cols] bytes, scales: [rows].
int launch_quantize_fp8_rows(const WeightRef& w, uint8_t* dst, float* scales, Stream stream);

// ---- gemv.cu ----
constexpr int kGemvMaxTokens = 8;
constexpr int kGemvMaxParts = 3;  // q|k|v
// Where a GEMV's results go. A weight of stacked parts (q|k|v, gate|up: the rows of part j are
// rows end[j-1] .. end[j] - 1) writes part j's to out[j], [n, rows of part j]. geglu (two
// parts of equal rows, gate then up): out[0][t, i] = gelu_tanh(gate[t, i]) * up[t, i], and
// nothing else is written.
struct GemvOut {
  float* out[kGemvMaxParts] = {};
  int64_t end[kGemvMaxParts] = {};
  int parts = 1;
  bool geglu = false;
};
// out[t, o] = sum_i x[t, i] * W[o, i], x [n, cols], out as above (one part: [n, rows]),
// 1 <= n <= kGemvMaxTokens. sm_count (multiprocessors) sizes the grid and the split of
// short-row-count matrices. geglu needs the vectorized path (gemv_vectorized).
int launch_gemv(const WeightRef& w, const float* x, int n, const GemvOut& out, Stream stream,
                int sm_count = 132);
inline int launch_gemv(const WeightRef& w, const float* x, int n, float* out, Stream stream,
                       int sm_count = 132) {
  GemvOut o;
  o.out[0] = out;
  o.end[0] = w.rows;
  return launch_gemv(w, x, n, o, stream, sm_count);
}
// Whether launch_gemv reads w with the vectorized kernel (its type has a 16-byte chunk decoder
// and the rows are whole 16-byte chunks), given 16-byte aligned data and x.
bool gemv_vectorized(const WeightRef& w);

// ---- norm.cu ----
// out[r, :] = x[r, :] / sqrt(mean(x[r, :]^2) + eps) * w, w [dim] fp32; in place allowed.
int launch_rmsnorm(const float* x, const float* w, int64_t rows, int dim, float eps, float* out,
                   Stream stream);
// The residual step: x[r, :] += rmsnorm(a[r, :], w_post); then, when w_next is given,
// normed[r, :] = rmsnorm(x[r, :], w_next). Bit for bit rmsnorm, add, rmsnorm in turn.
int launch_add_rmsnorm(const float* a, const float* w_post, float* x, const float* w_next, int64_t rows,
                       int dim, float eps, float* normed, Stream stream);

// ---- rope.cu ----
constexpr int kRopeMaxHalf = 256;  // head_dim <= 512
// Rotate-half RoPE in place on x [n, n_heads, head_dim]; inv_freq_host [head_dim / 2] holds
// the per-pair frequencies (already divided by the linear scale), computed by the caller.
int launch_rope(float* x, int n, int n_heads, int head_dim, int pos0, const float* inv_freq_host,
                Stream stream);

// ---- kv_attention.cu ----
// Cache rows of positions pos0 .. pos0 + n - 1 (slot p % capacity) from k, v [n, kv_width].
// kv_dtype (backend.h's KvLayer): kF32; kBF16 (round to nearest even); kQ8_0 (kv_width / 32
// GGUF blocks per slot, quantized as ggml's quantize_row_q8_0_ref; kv_width % 32 == 0);
// kF8E4M3 (one saturating e4m3fn byte per value). Bytes identical to HostBackend::kv_write.
int launch_kv_write(const float* k, const float* v, int n, int pos0, int kv_width, void* cache_k,
                    void* cache_v, int capacity, DType kv_dtype, Stream stream);

// One layer's QK-norm + RoPE + cache write in one launch, bit for bit launch_rmsnorm on q's and
// k's head rows (q_norm, k_norm [head_dim] fp32), launch_rope on both (inv_freq_host as there)
// and launch_kv_write of k and v at pos0 (kv_dtype Q8_0 needs head_dim % 32 == 0).
struct QkPrepArgs {
  float* q = nullptr;        // [n, n_heads * head_dim], normalized and rotated in place
  float* k = nullptr;        // [n, n_kv_heads * head_dim], normalized and rotated in place
  const float* v = nullptr;  // [n, n_kv_heads * head_dim]
  const float* q_norm = nullptr;
  const float* k_norm = nullptr;
  int n = 0, n_heads = 0, n_kv_heads = 0, head_dim = 0, pos0 = 0;
  // A recorded step's position (device memory, written in stream order before the launch):
  // when set, the kernel reads pos0 there and ignores the field.
  const int* pos_dev = nullptr;
  float eps = 0;
  void* cache_k = nullptr;  // [capacity] slots of kv_dtype, as launch_kv_write
  void* cache_v = nullptr;
  int capacity = 0;
  DType kv_dtype = DType::kBF16;
};
int launch_qk_norm_rope_kv_write(const QkPrepArgs& a, const float* inv_freq_host, Stream stream);

struct AttentionArgs {
  const float* q = nullptr;  // [n_tokens, n_heads * head_dim]
  const void* k = nullptr;   // [capacity, n_kv_heads * head_dim] of kv_dtype (as kv_write)
  const void* v = nullptr;
  float* out = nullptr;  // [n_tokens, n_heads * head_dim]
  DType kv_dtype = DType::kBF16;
  int capacity = 0;
  int n_tokens = 0, pos0 = 0;
  // A recorded step's position (device memory, written in stream order before the launch; the
  // backend's replay): when set, the kernels read pos0 there, and the field is the bound, the
  // largest pos0 the launch will see. The plan (split count, workspace, the ring check) is made
  // for the bound, and each split's keys are recut on the device for the real position
  // (step_chunk). No bidirectional group with it.
  const int* pos_dev = nullptr;
  int n_heads = 0, n_kv_heads = 0, head_dim = 0;
  float scale = 0;
  int window = 0;                      // 0: causal; W > 0: keys i - W < j <= i
  int kv_start = 0;                    // keys j < kv_start do not exist
  int bidir_begin = 0, bidir_end = 0;  // queries in [begin, end) also see keys in [begin, end)
  // Split-KV (flash-decoding) workspace: attention_plan(...).workspace_floats floats, or null
  // when the plan has one split. `sm_count` sizes the split count (device multiprocessors).
  float* partials = nullptr;
  int64_t partial_floats = 0;
  int sm_count = 132;
  bool no_flash = false;  // never the tensor-core prefill kernel (GEMMA3_CUDA_FLASH=0), to compare
};
constexpr int kAttentionMaxHeadDim = 512;

constexpr int kAttentionKeyTile = 32;  // keys the attention kernels score per step (a warp's lanes)
constexpr int kMinSplitKeys = 256;     // prefill kernel: a split's keys at least this many ...
constexpr int kMaxSplitKeys = 1024;    // ... and at most this many, unless kMaxSplits forces more
constexpr int kMaxSplits = 1024;       // grid.y and the combine kernel's shared weights
// Decode kernel (n_tokens <= kAttentionDecodeMaxTokens): one block per (kv head, split, row
// group) serving the rows (query token, query head of the kv head's group) of the call, at most
// kAttentionDecodeRows per block, so K/V are read once per row group (once for every Gemma 3
// decode step: group size 2 or 4, one token). Splits hold at least kDecodeMinSplitKeys keys.
constexpr int kAttentionDecodeMaxTokens = kGemvMaxTokens;
constexpr int kAttentionDecodeRows = 8;  // one softmax warp per row
constexpr int kDecodeMinSplitKeys = 32;

// Keys visible to query t (position i = pos0 + t): the contiguous range [lo, hi],
//   lo = max(kv_start, i - W + 1 if W else 0), hi = i, except that a query in the
//   bidirectional group [bb, be) also sees the later keys of its group: hi = be - 1. The window
//   still bounds keys from below (backend.h AttentionParams; transformers' sliding mask is
//   (causal OR same group) AND j > i - W). Never empty when kv_start <= pos0.
GEMMA3_HD void visible_keys(const AttentionArgs& a, int t, int64_t* lo, int64_t* hi) {
  const int64_t i = int64_t{a.pos0} + t;
  int64_t l = a.window > 0 ? i - a.window + 1 : 0;
  if (l < a.kv_start) l = a.kv_start;
  *lo = l;
  *hi = i >= a.bidir_begin && i < a.bidir_end ? int64_t{a.bidir_end} - 1 : i;
}

// The keys per split for `splits` splits of the keys visible to any token of the call (the decode
// kernel's union [lo(0), hi(n_tokens - 1)]) or of its longest range (the prefill kernel), in
// whole key tiles: what attention_plan gives at the bound, recut for a recorded step's real
// position (AttentionArgs::pos_dev; a.pos0 holds it by then).
GEMMA3_HD int step_chunk(const AttentionArgs& a, int splits, bool decode) {
  int64_t longest = 1, lo0 = 0, hi0 = 0;
  visible_keys(a, 0, &lo0, &hi0);
  for (int t = 0; t < a.n_tokens; ++t) {
    int64_t lo = 0, hi = 0;
    visible_keys(a, t, &lo, &hi);
    const int64_t keys = decode ? hi - lo0 + 1 : hi - lo + 1;
    longest = keys > longest ? keys : longest;
  }
  const int64_t chunk = (longest + splits - 1) / splits;
  return static_cast<int>((chunk + kAttentionKeyTile - 1) / kAttentionKeyTile * kAttentionKeyTile);
}

// Arguments launch_attention refuses (cudaErrorInvalidValue), the ring check aside.
inline bool bad_attention_args(const AttentionArgs& a) {
  const bool bidir = a.bidir_begin < a.bidir_end;
  return a.n_tokens < 0 || a.pos0 < 0 || a.n_heads < 1 || a.n_kv_heads < 1 || a.n_heads % a.n_kv_heads != 0 ||
         a.head_dim < 1 || a.head_dim > kAttentionMaxHeadDim || a.capacity < 1 || a.window < 0 ||
         a.kv_start < 0 || a.kv_start > a.pos0 || int64_t{a.n_tokens} * a.n_heads > 0x7FFFFFFF ||
         (a.kv_dtype == DType::kQ8_0 && a.head_dim % 32 != 0) || a.bidir_begin > a.bidir_end ||
         (bidir && (a.bidir_begin < a.pos0 || a.bidir_end > int64_t{a.pos0} + a.n_tokens)) ||
         (bidir && a.pos_dev);
}

// How launch_attention divides the work. Prefill kernel: each (token, head) row's visible keys
// are cut into `splits` chunks of `chunk` keys, one block each. Decode kernel (`decode`): the
// keys visible to any token of the call (one range: [lo(0), hi(n_tokens - 1)]) are cut into
// `splits` chunks, one block per (kv head, chunk, row group). Both write (m, l, acc) partials
// per (token, head) row and split, combined by a second kernel when splits > 1.
struct AttentionPlan {
  bool decode = false;     // the decode kernel (else the prefill kernel)
  int flash_dim = 0;       // > 0: the tensor-core prefill kernel for head dims padded to this
  int rows_per_block = 0;  // decode: rows (token, query head of one kv head) per block
  int row_groups = 0;      // decode: ceil(n_tokens * group size / rows_per_block)
  int splits = 1;
  int chunk = 0;                 // keys per split (the longest visible range when splits == 1)
  int64_t longest = 0;           // keys of the longest visible range (decode: of their union)
  int64_t workspace_floats = 0;  // n_tokens * n_heads * splits * (head_dim + 2) when splits > 1
  // Positions lo(0) .. pos0 + n_tokens - 1: every key the call reads (the last query reads the
  // newest; lo is nondecreasing in t). They must all be in the ring at once, span <= capacity,
  // or slot j % capacity already holds a later position than j (launch_attention refuses).
  int64_t span = 0;
};

// Elements the decode kernel loads together from a K/V row: 16 bytes of fp32 or bf16, 8 of fp8
// or of a Q8_0 block's quants (its 34-byte blocks are only 2-byte aligned). The decode kernel
// needs head_dim a multiple of it and 16-byte aligned caches (cudaMalloc gives 256).
inline int attention_decode_chunk(DType t) { return t == DType::kF32 ? 4 : 8; }

// The tensor-core prefill kernel (kv_attention.cu, "flash" below): head dims up to 256, zero-
// padded to one of its instances (SigLIP's 72 to 80; Gemma's 128 and 256 as they are), and its
// query rows per block (16 per warp). 0: none (head_dim > 256).
GEMMA3_HD constexpr int flash_head_dim(int head_dim) {
  return head_dim <= 80 ? 80 : head_dim <= 128 ? 128 : head_dim <= 256 ? 256 : 0;
}
GEMMA3_HD constexpr int flash_rows(int padded_dim) { return padded_dim > 128 ? 32 : 64; }

// Host-only planning (no device work); the default plan for bad arguments or no tokens.
// Split only when the blocks without splits leave the device mostly idle: aim for about 4
// blocks per multiprocessor. Prefill kernel: blocks = n_tokens * n_heads, each split between
// kMinSplitKeys and kMaxSplitKeys keys. Decode kernel: blocks = n_kv_heads * row_groups, each
// split at least kDecodeMinSplitKeys keys and no upper bound but kMaxSplits (one kv head at 128K
// keys: 512 splits of 256 keys; 4 kv heads: 128 of 1024). Chunks are whole key tiles.
inline AttentionPlan attention_plan(const AttentionArgs& a) {
  AttentionPlan p;
  if (bad_attention_args(a) || a.n_tokens == 0) return p;
  int64_t longest = 1, lo0 = 0, hi0 = 0, lo_last = 0, hi_last = 0;
  visible_keys(a, 0, &lo0, &hi0);
  for (int t = 0; t < a.n_tokens; ++t) {
    int64_t lo, hi;
    visible_keys(a, t, &lo, &hi);
    longest = hi - lo + 1 > longest ? hi - lo + 1 : longest;
  }
  visible_keys(a, a.n_tokens - 1, &lo_last, &hi_last);
  p.span = int64_t{a.pos0} + a.n_tokens - lo0;
  const int64_t group = a.n_heads / a.n_kv_heads, rows = int64_t{a.n_tokens} * group;
  const int64_t row_groups = (rows + kAttentionDecodeRows - 1) / kAttentionDecodeRows;
  const uintptr_t align = reinterpret_cast<uintptr_t>(a.k) | reinterpret_cast<uintptr_t>(a.v);
  p.decode = a.n_tokens <= kAttentionDecodeMaxTokens &&
             a.head_dim % attention_decode_chunk(a.kv_dtype) == 0 && align % 16 == 0 && row_groups <= 65535;
  int64_t blocks = int64_t{a.n_tokens} * a.n_heads, min_keys = kMinSplitKeys, max_keys = kMaxSplitKeys;
  if (p.decode) {
    p.rows_per_block = static_cast<int>(rows < kAttentionDecodeRows ? rows : kAttentionDecodeRows);
    p.row_groups = static_cast<int>(row_groups);
    longest = hi_last - lo0 + 1;  // lo and hi are nondecreasing in t: the union is one range
    blocks = int64_t{a.n_kv_heads} * row_groups;
    min_keys = kDecodeMinSplitKeys;
    max_keys = int64_t{1} << 40;
  }
  if (!p.decode && !a.no_flash && !a.pos_dev && flash_head_dim(a.head_dim) > 0) {
    // One block per (tile of query rows, head, split); a tile reads the union of its rows' keys.
    p.flash_dim = flash_head_dim(a.head_dim);
    const int tile = flash_rows(p.flash_dim);
    blocks = (int64_t{a.n_tokens} + tile - 1) / tile * a.n_heads;
    longest = 0;
    for (int t0 = 0; t0 < a.n_tokens; t0 += tile) {
      int64_t lo, hi, lo_end, hi_end;
      visible_keys(a, t0, &lo, &hi);
      visible_keys(a, (t0 + tile < a.n_tokens ? t0 + tile : a.n_tokens) - 1, &lo_end, &hi_end);
      longest = hi_end - lo + 1 > longest ? hi_end - lo + 1 : longest;
    }
  }
  p.longest = longest;
  p.chunk = static_cast<int>(longest < 0x7FFFFFFF ? longest : 0x7FFFFFFF);
  const int64_t target = 4 * int64_t{a.sm_count > 0 ? a.sm_count : 1};
  if (blocks >= target || longest <= min_keys) return p;
  const int64_t want = (target + blocks - 1) / blocks;
  int64_t chunk = (longest + want - 1) / want;
  chunk = chunk < min_keys ? min_keys : chunk > max_keys ? max_keys : chunk;
  if ((longest + chunk - 1) / chunk > kMaxSplits) chunk = (longest + kMaxSplits - 1) / kMaxSplits;
  chunk = (chunk + kAttentionKeyTile - 1) / kAttentionKeyTile * kAttentionKeyTile;
  const int64_t splits = (longest + chunk - 1) / chunk;
  if (splits <= 1) return p;
  p.splits = static_cast<int>(splits);
  p.chunk = static_cast<int>(chunk);
  p.workspace_floats = int64_t{a.n_tokens} * a.n_heads * splits * (a.head_dim + 2);
  return p;
}
int launch_attention(const AttentionArgs& a, Stream stream);

// ---- sample.cu ----
// The device half of Backend::sample (backend.h; the rules of src/backend/sampler.h). The logits
// row is turned into keys as sampler.cpp does: z = logits with NaN as -inf, edit_ids[0 ..
// n_bans) set to -inf and edit_ids[n_bans .. n_edits) (the repetition-penalized ids, unique,
// none banned) divided (z > 0) or multiplied by `penalty`; greedy keys are z, sampling keys
// float((double(z) - max z) / temperature) (only the +inf ids stay, as 0, when max z = +inf).
struct SampleArgs {
  const float* logits = nullptr;  // [n] (the allowed ids)
  int n = 0;
  const int32_t* edit_ids = nullptr;  // device, [n_edits], unique
  int n_bans = 0, n_edits = 0;
  float penalty = 1.0f, temperature = 0.0f;
  int top_k = 0;              // softmax limit for the stats (0: all n)
  void* workspace = nullptr;  // sample_workspace_bytes(n) bytes
  size_t workspace_bytes = 0;
};
size_t sample_workspace_bytes(int n);
// Greedy: *out_id (device) = the first index of the largest key (std::max_element's choice).
int launch_sample_argmax(const SampleArgs& a, int32_t* out_id, Stream stream);
// Sampling (temperature > 0): the keys sorted descending, ties by ascending id (a stable radix
// sort of the ids in order), and per-block statistics: counts[b] = keys != -inf, sums[b] = sum
// over sorted positions i < (top_k > 0 ? min(top_k, n) : n) of float(exp(double(key_i) -
// key_0)) (0 when all keys are -inf). Pointers into the workspace, valid until the next call.
constexpr int kSampleStatBlocks = 128;
struct SampleSorted {
  const float* keys = nullptr;   // [n]
  const int32_t* ids = nullptr;  // [n]
  const double* sums = nullptr;  // [kSampleStatBlocks]
  const int* counts = nullptr;   // [kSampleStatBlocks]
};
int launch_sample_sort(const SampleArgs& a, SampleSorted* out, Stream stream);

// ---- elementwise.cu ----
// out = gelu_tanh(g) * u over n values.
int launch_gelu_gate(const float* g, const float* u, int64_t n, float* out, Stream stream);
// out[i] = x[i] rounded to bf16 bits (round to nearest even) over n values: a GEMM's activations.
int launch_to_bf16(const float* x, int64_t n, uint16_t* out, Stream stream);
// out = a + b over n values.
int launch_add(const float* a, const float* b, int64_t n, float* out, Stream stream);

}  // namespace gemma3::cuda
