// The fast CPU backend: same ops and semantics as the reference backend (cpu_backend.cpp),
// built from the kernel table of cpu_kernels.h.
//
//  * matmul. Weights are read in place from the mapped file (no repacked copy, so resident
//    memory stays the file plus the KV cache plus the scratch below). Work is split over output
//    rows. Up to kQ8MaxTokens tokens (decode, also batched: a token of each sequence), where the
//    kernel table has an int8 kernel for the weight dtype, the activations are quantized to int8
//    blocks once per call and the kernel gets every token at once (row x token tiles from
//    kQ8TileMinTokens on); other dtypes under kGemmMinTokens decode each row in registers once
//    per tile of up to kMaxTile fp32 tokens. Otherwise (prefill chunks; every call under
//    batch_invariant), panels of kGemmPanel rows are dequantized to fp32 and multiplied by an
//    fp32 GEMM kernel (the reference's result up to summation order).
//  * attention: one task per (token, kv head, key split) handles every query head of the GQA
//    group, so each cached key/value row is read once per group, not once per head. Only the
//    keys a query sees are visited (window and ring: slot = position % capacity). In decode the
//    keys are split over the threads and the partial softmaxes merged (flash-decoding). From
//    kGemmMinTokens queries on (prefill, the vision tower), a task takes a kv head and a block
//    of queries instead and walks its keys in chunks through the fp32 GEMM with an online
//    softmax (attention_blocked): each key row is dequantized once per block, not per query.
//  * rope: the cos/sin of a chunk's positions are computed once per (theta, scale) and reused
//    by every layer.
//
// Scratch owned by the backend (grown on demand, never shrunk): per thread 2 x kGemmPanel x cols
// fp32 GEMM panels (256 KiB at cols 2048), attention partials and score rows, the rope tables.
#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <mutex>
#include <vector>

#include "backend/backend.h"
#include "backend/cpu/cpu_backend.h"
#include "backend/cpu/cpu_kernels.h"
#include "backend/cpu/cpu_pool.h"
#include "core/quant.h"

namespace gemma3 {
namespace {

using cpu::KernelSet;
using cpu::kGemmPanel;
using cpu::kMaxTile;

using cpu::kGemmMinTokens;

constexpr int kTokenBlock = 64;  // tokens whose activations are walked together per row

class FastWeight final : public HostWeight {
 public:
  std::vector<float> values;  // 1-D tensors (norm weights): dequantized once at upload
};

const FastWeight& as_fast(const BackendWeight& w) { return static_cast<const FastWeight&>(w); }

class FastCpuBackend final : public HostBackend {
 public:
  FastCpuBackend(int threads, const KernelSet& k, bool batch_invariant)
      : pool_(threads), k_(k), invariant_(batch_invariant && k.gemm_f32) {}
  const std::string& pool_error() const { return pool_.start_error(); }

  std::string name() const override { return fmt::format("cpu {} ({} threads)", k_.name, pool_.size()); }
  double copy_bandwidth() override {
    return pool_copy_bandwidth(pool_.size(), [&](int64_t n, const std::function<void(int64_t)>& fn) {
      pool_.run(n, [&](int64_t i, int) { fn(i); });
    });
  }

  Result<std::unique_ptr<BackendWeight>> upload(const TensorView& t) override {
    auto w = std::make_unique<FastWeight>();
    GEMMA3_TRY(bind(t, w.get()));
    if (t.shape.size() == 1) {
      w->values.resize(w->cols);
      w->row(0, w->values.data());
    }
    return std::unique_ptr<BackendWeight>(std::move(w));
  }

  void embed(const BackendWeight& table, const int32_t* ids, int n, float scale, float* out) override {
    const FastWeight& w = as_fast(table);
    const int64_t d = w.cols;
    pool_.run(n, [&](int64_t t, int) {
      float* o = out + t * d;
      w.row(ids[t], o);
      for (int64_t i = 0; i < d; ++i) o[i] *= scale;
    });
  }

  void rmsnorm(const float* x, const BackendWeight& wt, int64_t rows, int dim, float eps,
               float* out) override {
    const FastWeight& fw = as_fast(wt);
    std::vector<float> tmp;
    const float* w = fw.values.data();
    if (fw.values.empty()) {  // a 2-D weight used as a norm: not expected, but stay correct
      tmp.resize(dim);
      fw.row(0, tmp.data());
      w = tmp.data();
    }
    auto body = [&](int64_t b, int64_t e, int) {
      for (int64_t r = b; r < e; ++r) {
        const float* xr = x + r * dim;
        float* o = out + r * dim;
        float ss = 0;
        for (int i = 0; i < dim; ++i) ss += xr[i] * xr[i];
        const float inv = 1.0f / std::sqrt(ss / static_cast<float>(dim) + eps);
        for (int i = 0; i < dim; ++i) o[i] = (xr[i] * inv) * w[i];
      }
    };
    if (rows * dim < 16384) {
      body(0, rows, 0);
    } else {
      pool_.run_ranges(rows, std::max<int64_t>(1, 8192 / dim), body);
    }
  }

  void matmul(const float* x, int n, const BackendWeight& wt, float* out) override {
    const FastWeight& w = as_fast(wt);
    const int64_t k = w.cols, m = w.rows;
    const int di = static_cast<int>(w.dtype);
    cpu::DotFn fn = k_.dot[di];
    if (!fn && w.view.row_scale.empty()) fn = cpu::portable_kernels().dot[di];
    // Decode with int8 activations (up to kQ8MaxTokens tokens: batched decode steps too): each
    // token's row quantized once here (n * k / 32 blocks, cheap next to the m * k weights), then
    // the int8 dot kernels.
    const cpu::DotQ8Fn fn8 = !invariant_ && n <= cpu::kQ8MaxTokens && w.view.row_scale.empty() && k % 32 == 0
                                 ? k_.dot_q8[di]
                                 : nullptr;
    if (!fn8 && (n >= kGemmMinTokens || invariant_) && k_.gemm_f32) return matmul_gemm(x, n, w, out);
    if (fn8) {
      const int64_t nb = k / 32;
      q8_.resize(static_cast<size_t>(n) * nb);
      q8_acts_.resize(n);
      for (int t = 0; t < n; ++t) {
        k_.quantize_q8(x + static_cast<int64_t>(t) * k, k, q8_.data() + t * nb);
        q8_acts_[t] = q8_.data() + t * nb;
      }
    } else if (!fn) {
      return matmul_generic(x, n, w, out);
    }

    acts_.resize(n);
    for (int t = 0; t < n; ++t) acts_[t] = x + static_cast<int64_t>(t) * k;

    // Row chunks: enough tasks for load balance between threads, big enough to amortize the
    // atomic claim (decode) and to reuse a row chunk across token blocks (prefill).
    const int64_t target_tasks = static_cast<int64_t>(pool_.size()) * (n == 1 ? 16 : 8);
    int64_t chunk = std::clamp<int64_t>(m / target_tasks, 4, n == 1 ? 512 : 64);
    chunk = (chunk + 3) / 4 * 4;
    const void* const* acts = acts_.data();
    const cpu::Q8Block* const* acts8 = q8_acts_.data();
    pool_.run_ranges(m, chunk, [&](int64_t r0, int64_t r1, int) {
      if (fn8) {  // the whole row range and every token per call
        fn8(k, w.row_ptr(r0), static_cast<int64_t>(w.row_stride), static_cast<int>(r1 - r0), acts8, n,
            out + r0, m);
        return;
      }
      float tmp[kMaxTile];
      for (int tb = 0; tb < n; tb += kTokenBlock) {
        const int te = std::min(n, tb + kTokenBlock);
        for (int64_t r = r0; r < r1; ++r) {
          const uint8_t* wr = w.row_ptr(r);
          for (int t = tb; t < te; t += kMaxTile) {
            const int nt = std::min(kMaxTile, te - t);
            fn(k, wr, acts + t, nt, tmp);
            for (int i = 0; i < nt; ++i) out[static_cast<int64_t>(t + i) * m + r] = tmp[i];
          }
        }
      }
    });
  }

  void rope(float* x, int n, int n_heads, int head_dim, int pos0, float theta, float scale) override {
    const int half = head_dim / 2;
    const RopeTable& tab = rope_table(n, head_dim, pos0, theta, scale);
    auto body = [&](int64_t b, int64_t e, int) {
      for (int64_t t = b; t < e; ++t) {
        const float* c = tab.cos.data() + t * half;
        const float* s = tab.sin.data() + t * half;
        for (int h = 0; h < n_heads; ++h) {
          float* v = x + (t * n_heads + h) * head_dim;
          for (int i = 0; i < half; ++i) {
            const float a = v[i], bb = v[i + half];
            v[i] = a * c[i] - bb * s[i];
            v[i + half] = bb * c[i] + a * s[i];
          }
        }
      }
    };
    if (n < 8)
      body(0, n, 0);
    else
      pool_.run_ranges(n, 4, body);
  }

  void attention(const float* q, const KvLayer& cache, const AttentionParams& p, float* out) override;

  void gelu_gate(const float* g, const float* u, int64_t n, float* out) override {
    if (n < 8192) return k_.gelu_gate(g, u, n, out);
    pool_.run_ranges(n, 4096, [&](int64_t b, int64_t e, int) { k_.gelu_gate(g + b, u + b, e - b, out + b); });
  }

  void add(const float* a, const float* b, int64_t n, float* out) override {
    for (int64_t i = 0; i < n; ++i) out[i] = a[i] + b[i];
  }

 private:
  struct RopeTable {
    int n = -1, head_dim = 0, pos0 = 0;
    float theta = 0, scale = 0;
    std::vector<float> cos, sin;  // [n, head_dim / 2]
  };

  // Same arithmetic as the reference: fp32 inv_freq and angle, cos/sin evaluated in double.
  const RopeTable& rope_table(int n, int head_dim, int pos0, float theta, float scale) {
    for (RopeTable& t : rope_)
      if (t.n == n && t.head_dim == head_dim && t.pos0 == pos0 && t.theta == theta && t.scale == scale)
        return t;
    RopeTable& t = rope_[rope_next_];
    rope_next_ = (rope_next_ + 1) % 2;
    const int half = head_dim / 2;
    std::vector<float> inv_freq(half);
    for (int i = 0; i < half; ++i)
      inv_freq[i] =
          (1.0f / std::pow(theta, static_cast<float>(2 * i) / static_cast<float>(head_dim))) / scale;
    t.cos.resize(static_cast<size_t>(n) * half);
    t.sin.resize(static_cast<size_t>(n) * half);
    for (int r = 0; r < n; ++r) {
      const float pos = static_cast<float>(pos0 + r);
      for (int i = 0; i < half; ++i) {
        const float angle = pos * inv_freq[i];
        t.cos[static_cast<size_t>(r) * half + i] = static_cast<float>(std::cos(static_cast<double>(angle)));
        t.sin[static_cast<size_t>(r) * half + i] = static_cast<float>(std::sin(static_cast<double>(angle)));
      }
    }
    t.n = n;
    t.head_dim = head_dim;
    t.pos0 = pos0;
    t.theta = theta;
    t.scale = scale;
    return t;
  }

  // Prefill: each task dequantizes a panel of kGemmPanel weight rows to fp32 (per-thread
  // buffer: [kGemmPanel][k] rows, then the kernel's packed copy of them; <= 256 KiB at k = 2048) and
  // multiplies it with all n tokens in the kernel's register tiles. The dequantization is amortized over the
  // n tokens, and the fp32 products add no activation rounding (the result is the reference's up to summation
  // order).
  void matmul_gemm(const float* x, int n, const FastWeight& w, float* out) {
    const int64_t k = w.cols, m = w.rows;
    const int di = static_cast<int>(w.dtype);
    const bool f32 = w.dtype == DType::kF32 && w.view.row_scale.empty() && w.row_stride % 4 == 0;
    auto deq = w.view.row_scale.empty() ? k_.dequant[di] : nullptr;
    if (static_cast<int>(gemm_buf_.size()) < pool_.size()) gemm_buf_.resize(pool_.size());
    pool_.run_ranges(m, kGemmPanel, [&](int64_t r0, int64_t r1, int th) {
      const int nr = static_cast<int>(r1 - r0);
      std::vector<float>& buf = gemm_buf_[th];
      if (static_cast<int64_t>(buf.size()) < 2 * kGemmPanel * k) buf.resize(2 * kGemmPanel * k);
      const float* panel;
      int64_t ld = k;
      if (f32) {  // F32 rows are used in place
        panel = reinterpret_cast<const float*>(w.row_ptr(r0));
        ld = static_cast<int64_t>(w.row_stride / 4);
      } else {
        for (int i = 0; i < nr; ++i) {
          if (deq)
            deq(w.row_ptr(r0 + i), k, buf.data() + i * k);
          else
            w.row(r0 + i, buf.data() + i * k);
        }
        panel = buf.data();
      }
      k_.gemm_f32(panel, ld, nr, x, k, n, k, out + r0, m, buf.data() + kGemmPanel * k);
    });
  }

  // The K or V row (base = cache.k or cache.v) of kv head g for position j, as fp32: read in
  // place when the cache is fp32, else dequantized into `row` [head_dim] (layouts: backend.h
  // KvLayer).
  const float* kv_row(const KvLayer& cache, const void* base, int64_t j, int g, int n_kv_heads, int hd,
                      float* row) const;
  void attention_blocked(const float* q, const KvLayer& cache, const AttentionParams& p, float* out);

  // Fallback for dtypes without a kernel (fp8 with row scales, odd column counts): dequantize
  // each row to fp32 and dot it with every token.
  void matmul_generic(const float* x, int n, const FastWeight& w, float* out) {
    const int64_t k = w.cols, m = w.rows;
    pool_.run_ranges(m, 16, [&](int64_t b, int64_t e, int) {
      std::vector<float> row(k);
      for (int64_t o = b; o < e; ++o) {
        w.row(o, row.data());
        for (int t = 0; t < n; ++t)
          out[static_cast<int64_t>(t) * m + o] = k_.dot_f32(row.data(), x + t * k, k);
      }
    });
  }

  cpu::CpuPool pool_;
  const KernelSet& k_;
  const bool invariant_;  // BackendOptions::batch_invariant (needs gemm_f32)
  std::vector<const void*> acts_;
  std::vector<cpu::Q8Block> q8_;              // decode: [n][k / 32] quantized activations
  std::vector<const cpu::Q8Block*> q8_acts_;  // token t's blocks
  std::vector<std::vector<float>> gemm_buf_;  // per thread: 2 x [kGemmPanel][k] (rows, packed)
  RopeTable rope_[2];
  int rope_next_ = 0;
  // attention scratch: per-thread key/value row and score buffers, and split partials
  std::vector<std::vector<float>> att_thread_;
  std::vector<float> att_part_;
};

// e4m3fn byte -> fp32, for an fp8 cache.
const float* f8_table() {
  static const struct F8Table {
    float v[256];
    F8Table() {
      for (int i = 0; i < 256; ++i) v[i] = f8e4m3_to_f32(static_cast<uint8_t>(i));
    }
  } f8;
  return f8.v;
}

const float* FastCpuBackend::kv_row(const KvLayer& cache, const void* base, int64_t j, int g, int n_kv_heads,
                                    int hd, float* row) const {
  const int64_t r = (j % cache.capacity) * n_kv_heads + g;  // (slot, head) row index
  switch (cache.dtype) {
    case DType::kF32: return static_cast<const float*>(base) + r * hd;
    case DType::kQ8_0: {
      const uint8_t* b = static_cast<const uint8_t*>(base) + r * (hd / 32) * 34;
      for (int blk = 0; blk < hd / 32; ++blk, b += 34) {
        uint16_t d16;
        std::memcpy(&d16, b, 2);
        const float d = f16_to_f32(d16);
        const int8_t* qs = reinterpret_cast<const int8_t*>(b + 2);
        for (int i = 0; i < 32; ++i) row[blk * 32 + i] = d * static_cast<float>(qs[i]);
      }
      return row;
    }
    case DType::kF8E4M3: {
      const uint8_t* b = static_cast<const uint8_t*>(base) + r * hd;
      const float* f8 = f8_table();
      for (int i = 0; i < hd; ++i) row[i] = f8[b[i]];
      return row;
    }
    default: k_.bf16_to_f32(static_cast<const uint16_t*>(base) + r * hd, row, hd); return row;
  }
}

// Attention. A task handles query token t, kv head g, and keys [lo, hi] of split s; for each
// of the `group` query heads it produces (max, sum, acc[hd]) of its keys. With one split the
// task writes the normalized output directly; otherwise a merge pass combines the splits.
void FastCpuBackend::attention(const float* q, const KvLayer& cache, const AttentionParams& p, float* out) {
  if ((p.n_tokens >= kGemmMinTokens || invariant_) && k_.gemm_f32) return attention_blocked(q, cache, p, out);
  const int hd = p.head_dim, group = p.n_heads / p.n_kv_heads;
  const int64_t q_width = static_cast<int64_t>(p.n_heads) * hd;
  const int threads = pool_.size();
  const int64_t pairs = static_cast<int64_t>(p.n_tokens) * p.n_kv_heads;
  // Longest key range of any query: the last token sees the most keys.
  const int64_t last = p.pos0 + p.n_tokens - 1;
  const int64_t max_len = last - std::max<int64_t>(p.kv_start, p.window > 0 ? last - p.window + 1 : 0) + 1;
  int splits = 1;
  if (pairs < 2 * threads && max_len >= 256)
    splits = static_cast<int>(std::min<int64_t>((2 * threads + pairs - 1) / pairs * 2, max_len / 128));
  splits = std::max(splits, 1);
  const int64_t part_stride = static_cast<int64_t>(hd) + 2;  // acc[hd], max, sum
  if (splits > 1) att_part_.resize(static_cast<size_t>(pairs) * splits * group * part_stride);
  if (static_cast<int>(att_thread_.size()) < threads) att_thread_.resize(threads);

  pool_.run(pairs * splits, [&](int64_t task, int th) {
    const int64_t pair = task / splits;
    const int s = static_cast<int>(task % splits);
    const int64_t t = pair / p.n_kv_heads;
    const int g = static_cast<int>(pair % p.n_kv_heads);
    const int64_t i = p.pos0 + t;
    const int64_t lo_all = std::max<int64_t>(p.kv_start, p.window > 0 ? i - p.window + 1 : 0);
    const int64_t len_all = attention_last_key(p, i) - lo_all + 1;  // through i's image group
    const int64_t lo = lo_all + len_all * s / splits, hi = lo_all + len_all * (s + 1) / splits;  // [lo, hi)
    const int64_t len = hi - lo;
    std::vector<float>& buf = att_thread_[th];
    // layout: key row [hd] | scores [group][len] | acc [group][hd]
    const size_t need = static_cast<size_t>(hd) + static_cast<size_t>(group) * (len + hd);
    if (buf.size() < need) buf.resize(need);
    float* row = buf.data();
    float* scores = row + hd;
    float* acc = scores + static_cast<int64_t>(group) * len;
    const float* qg = q + t * q_width + static_cast<int64_t>(g) * group * hd;

    for (int64_t j = lo; j < hi; ++j) {
      const float* kr = kv_row(cache, cache.k, j, g, p.n_kv_heads, hd, row);
      for (int h = 0; h < group; ++h) scores[h * len + (j - lo)] = k_.dot_f32(qg + h * hd, kr, hd) * p.scale;
    }
    float mx[64], sum[64];  // group <= 64 (Gemma: 1..8)
    for (int h = 0; h < group; ++h) {
      float* sc = scores + h * len;
      float m = -std::numeric_limits<float>::infinity();
      for (int64_t j = 0; j < len; ++j) m = std::max(m, sc[j]);
      mx[h] = m;
      sum[h] = len > 0 ? k_.exp_sub_sum(sc, len, m) : 0.0f;
      std::fill(acc + h * hd, acc + (h + 1) * hd, 0.0f);
    }
    for (int64_t j = lo; j < hi; ++j) {
      const float* vr = kv_row(cache, cache.v, j, g, p.n_kv_heads, hd, row);
      for (int h = 0; h < group; ++h) k_.axpy_f32(scores[h * len + (j - lo)], vr, acc + h * hd, hd);
    }
    if (splits == 1) {
      for (int h = 0; h < group; ++h) {
        float* o = out + t * q_width + static_cast<int64_t>(g * group + h) * hd;
        const float inv = 1.0f / sum[h];
        for (int d = 0; d < hd; ++d) o[d] = acc[h * hd + d] * inv;
      }
    } else {
      for (int h = 0; h < group; ++h) {
        float* part = att_part_.data() + ((pair * splits + s) * group + h) * part_stride;
        std::memcpy(part, acc + h * hd, hd * sizeof(float));
        part[hd] = mx[h];
        part[hd + 1] = sum[h];
      }
    }
  });
  if (splits == 1) return;
  for (int64_t pair = 0; pair < pairs; ++pair) {
    const int64_t t = pair / p.n_kv_heads;
    const int g = static_cast<int>(pair % p.n_kv_heads);
    for (int h = 0; h < group; ++h) {
      float m = -std::numeric_limits<float>::infinity();
      for (int s = 0; s < splits; ++s) {
        const float* part = att_part_.data() + ((pair * splits + s) * group + h) * part_stride;
        if (part[hd + 1] > 0) m = std::max(m, part[hd]);
      }
      float* o = out + t * q_width + static_cast<int64_t>(g * group + h) * hd;
      std::fill(o, o + hd, 0.0f);
      float total = 0;
      for (int s = 0; s < splits; ++s) {
        const float* part = att_part_.data() + ((pair * splits + s) * group + h) * part_stride;
        if (part[hd + 1] <= 0) continue;
        const float f = std::exp(part[hd] - m);
        total += part[hd + 1] * f;
        k_.axpy_f32(f, part, o, hd);
      }
      const float inv = 1.0f / total;
      for (int d = 0; d < hd; ++d) o[d] *= inv;
    }
  }
}

// Prefill attention (n_tokens >= kGemmMinTokens): a task handles kv head g and a block of up
// to kAttQueries consecutive query tokens, i.e. rows = group x queries (query head, token)
// pairs. The block's keys [lo(first query), max last key] are walked in chunks of kAttKeys
// with an online softmax (running max, sum, acc per row), so memory stays bounded at any
// context. Per chunk the K rows are gathered as fp32 [kc][hd] and the V rows transposed to
// [hd][kAttKeys]; S = Q K^T and P V are fp32 GEMMs (gemm_f32, panels of kGemmPanel keys / head
// dims). Each row's scores outside its visible keys are dropped (P = 0), as in the decode path.
void FastCpuBackend::attention_blocked(const float* q, const KvLayer& cache, const AttentionParams& p,
                                       float* out) {
  constexpr int kAttQueries = 64, kAttKeys = 256;
  const int hd = p.head_dim, group = p.n_heads / p.n_kv_heads;
  const int64_t q_width = static_cast<int64_t>(p.n_heads) * hd;
  const int64_t blocks = (p.n_tokens + kAttQueries - 1) / kAttQueries;
  const int64_t max_rows = static_cast<int64_t>(group) * kAttQueries;
  if (static_cast<int>(att_thread_.size()) < pool_.size()) att_thread_.resize(pool_.size());
  auto lo_of = [&](int64_t i) { return std::max<int64_t>(p.kv_start, p.window > 0 ? i - p.window + 1 : 0); };
  // Later blocks (more keys under a causal mask) first, for the balance of the last tasks.
  pool_.run(blocks * p.n_kv_heads, [&](int64_t task, int th) {
    const int64_t blk = blocks - 1 - task / p.n_kv_heads;
    const int g = static_cast<int>(task % p.n_kv_heads);
    const int64_t t0 = blk * kAttQueries;
    const int nq = static_cast<int>(std::min<int64_t>(kAttQueries, p.n_tokens - t0));
    const int rows = group * nq;  // row = h * nq + query
    // layout: Q [rows][hd] | K [kAttKeys][hd] | V^T [hd][kAttKeys] | S/P [rows][kAttKeys] |
    //         PV [rows][hd] | acc [rows][hd] | max, sum, alpha [rows] | row [hd] |
    //         gemm scratch [kGemmPanel][max(hd, kAttKeys)]
    std::vector<float>& buf = att_thread_[th];
    const size_t need = static_cast<size_t>(max_rows) * (3 * hd + kAttKeys + 3) + 2 * kAttKeys * hd + hd +
                        static_cast<size_t>(kGemmPanel) * std::max(hd, kAttKeys);
    if (buf.size() < need) buf.resize(need);
    float* qb = buf.data();
    float* kb = qb + static_cast<int64_t>(rows) * hd;
    float* vt = kb + static_cast<int64_t>(kAttKeys) * hd;
    float* s = vt + static_cast<int64_t>(kAttKeys) * hd;
    float* pv = s + static_cast<int64_t>(rows) * kAttKeys;
    float* acc = pv + static_cast<int64_t>(rows) * hd;
    float* mx = acc + static_cast<int64_t>(rows) * hd;
    float* sum = mx + rows;
    float* alpha = sum + rows;
    float* row = alpha + rows;
    float* scratch = row + hd;
    for (int h = 0; h < group; ++h)
      for (int t = 0; t < nq; ++t)
        std::memcpy(qb + (static_cast<int64_t>(h) * nq + t) * hd,
                    q + (t0 + t) * q_width + static_cast<int64_t>(g * group + h) * hd, hd * sizeof(float));
    std::fill(acc, acc + static_cast<int64_t>(rows) * hd, 0.0f);
    std::fill(mx, mx + rows, -std::numeric_limits<float>::infinity());
    std::fill(sum, sum + rows, 0.0f);
    const int64_t first = p.pos0 + t0;
    int64_t key_end = 0;  // one past the block's last visible key
    for (int t = 0; t < nq; ++t) key_end = std::max(key_end, attention_last_key(p, first + t) + 1);
    // Chunks start at multiples of kAttKeys, so a row meets its keys in the same chunks at the
    // same offsets whatever block it is in: the GEMMs sum over keys in order and add exact
    // zeros for masked ones, so its result does not depend on the block (batch invariance).
    // Keys before the block's first visible one are zeros, never read from the cache.
    const int64_t lo_first = lo_of(first);
    for (int64_t c0 = lo_first / kAttKeys * kAttKeys; c0 < key_end; c0 += kAttKeys) {
      const int kc = static_cast<int>(std::min<int64_t>(kAttKeys, key_end - c0));
      for (int j = 0; j < kc; ++j) {
        if (c0 + j < lo_first) {
          std::fill(kb + static_cast<int64_t>(j) * hd, kb + static_cast<int64_t>(j + 1) * hd, 0.0f);
          for (int d = 0; d < hd; ++d) vt[static_cast<int64_t>(d) * kAttKeys + j] = 0.0f;
          continue;
        }
        const float* kr =
            kv_row(cache, cache.k, c0 + j, g, p.n_kv_heads, hd, kb + static_cast<int64_t>(j) * hd);
        if (kr != kb + static_cast<int64_t>(j) * hd)
          std::memcpy(kb + static_cast<int64_t>(j) * hd, kr, hd * sizeof(float));
        const float* vr = kv_row(cache, cache.v, c0 + j, g, p.n_kv_heads, hd, row);
        for (int d = 0; d < hd; ++d) vt[static_cast<int64_t>(d) * kAttKeys + j] = vr[d];
      }
      // S[row][j] = q_row . k_j
      for (int j0 = 0; j0 < kc; j0 += kGemmPanel)
        k_.gemm_f32(kb + static_cast<int64_t>(j0) * hd, hd, std::min(kGemmPanel, kc - j0), qb, hd, rows, hd,
                    s + j0, kAttKeys, scratch);
      for (int r = 0; r < rows; ++r) {
        const int64_t i = first + r % nq;
        const int a = static_cast<int>(std::clamp<int64_t>(lo_of(i) - c0, 0, kc));
        const int b = static_cast<int>(std::clamp<int64_t>(attention_last_key(p, i) + 1 - c0, 0, kc));
        float* sr = s + static_cast<int64_t>(r) * kAttKeys;
        alpha[r] = 1.0f;
        if (a >= b) {
          std::fill(sr, sr + kc, 0.0f);
          continue;
        }
        float m = mx[r];
        for (int j = a; j < b; ++j) m = std::max(m, sr[j] *= p.scale);
        alpha[r] = std::exp(mx[r] - m);  // 0 on the first visible chunk (mx = -inf)
        mx[r] = m;
        sum[r] = sum[r] * alpha[r] + k_.exp_sub_sum(sr + a, b - a, m);
        std::fill(sr, sr + a, 0.0f);
        std::fill(sr + b, sr + kc, 0.0f);
      }
      // PV[row][d] = sum_j P[row][j] v_j[d]; acc = acc * alpha + PV
      for (int d0 = 0; d0 < hd; d0 += kGemmPanel)
        k_.gemm_f32(vt + static_cast<int64_t>(d0) * kAttKeys, kAttKeys, std::min(kGemmPanel, hd - d0), s,
                    kAttKeys, rows, kc, pv + d0, hd, scratch);
      for (int r = 0; r < rows; ++r) {
        float* ar = acc + static_cast<int64_t>(r) * hd;
        const float* pr = pv + static_cast<int64_t>(r) * hd;
        for (int d = 0; d < hd; ++d) ar[d] = ar[d] * alpha[r] + pr[d];
      }
    }
    for (int h = 0; h < group; ++h)
      for (int t = 0; t < nq; ++t) {
        const int r = h * nq + t;
        float* o = out + (t0 + t) * q_width + static_cast<int64_t>(g * group + h) * hd;
        const float inv = 1.0f / sum[r];
        for (int d = 0; d < hd; ++d) o[d] = acc[static_cast<int64_t>(r) * hd + d] * inv;
      }
  });
}

}  // namespace

Result<std::unique_ptr<Backend>> make_cpu_fast_backend(int threads, const std::string& kernels,
                                                       bool batch_invariant) {
  const cpu::KernelSet* k = cpu::select_kernels(kernels.c_str());
  if (!k)
    return unsupported(
        fmt::format("CPU kernels '{}' are unknown or cannot run on this CPU (have: portable{}{})", kernels,
                    cpu::cpu_has_avx2() ? ", avx2" : "", cpu::cpu_has_avx512() ? ", avx512" : ""));
  GEMMA3_TRY(check_cpu_threads(threads));
  auto b = std::make_unique<FastCpuBackend>(threads, *k, batch_invariant);
  if (!b->pool_error().empty()) return out_of_memory(b->pool_error());
  return std::unique_ptr<Backend>(std::move(b));
}

}  // namespace gemma3
