// The CPU reference backend: plain loops, fp32 accumulation, threaded over output rows or
// (token, head) pairs. Obviously right first; the fast kernels (cpu_fast_backend.cpp) are
// checked against it. Also the factory that picks between the two.
#include "backend/cpu/cpu_backend.h"

#include <fmt/format.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <vector>

#include "backend/backend.h"
#include "core/quant.h"
#include "core/thread_pool.h"

namespace gemma3 {

void HostWeight::row(int64_t r, float* dst) const {
  dequantize_row(dtype, row_ptr(r), dst, cols);
  if (!view.row_scale.empty()) {
    const float s = view.row_scale.size() == 1 ? view.row_scale[0] : view.row_scale[r];
    for (int64_t i = 0; i < cols; ++i) dst[i] *= s;
  }
}

Result<void*> HostBackend::allocate(size_t bytes) {
  void* p = std::calloc(std::max<size_t>(bytes, 1), 1);
  if (!p) return out_of_memory(fmt::format("cannot allocate {} bytes of host memory", bytes));
  return p;
}
void HostBackend::release(void* ptr) { std::free(ptr); }

size_t HostBackend::map_granularity() { return static_cast<size_t>(sysconf(_SC_PAGESIZE)); }

Result<void*> HostBackend::reserve(size_t bytes) {
  void* p = mmap(nullptr, std::max<size_t>(bytes, 1), PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                 -1, 0);
  if (p == MAP_FAILED)
    return out_of_memory(
        fmt::format("cannot reserve {} bytes of address space: {}", bytes, std::strerror(errno)));
  return p;
}

void HostBackend::unreserve(void* base, size_t bytes) { munmap(base, std::max<size_t>(bytes, 1)); }

Status HostBackend::map(void* base, size_t offset, size_t bytes) {
  if (mprotect(static_cast<char*>(base) + offset, bytes, PROT_READ | PROT_WRITE) != 0)
    return out_of_memory(fmt::format("cannot map {} bytes of host memory: {}", bytes, std::strerror(errno)));
  return ok_status();
}

void HostBackend::unmap(void* base, size_t offset, size_t bytes) {
  char* p = static_cast<char*>(base) + offset;
  madvise(p, bytes, MADV_DONTNEED);  // anonymous private pages read as zeros when mapped again
  mprotect(p, bytes, PROT_NONE);
}
void HostBackend::to_host(const void* src, void* dst, size_t bytes) { std::memcpy(dst, src, bytes); }

double HostBackend::pool_copy_bandwidth(
    int threads, const std::function<void(int64_t, const std::function<void(int64_t)>&)>& run_tasks) {
  constexpr size_t kBytes = size_t{64} << 20;
  const int n = std::max(threads, 1);
  std::vector<std::vector<char>> src(n), dst(n);
  run_tasks(n, [&](int64_t i) {  // first touch by a pool thread
    src[i].assign(kBytes, static_cast<char>(i + 1));
    dst[i].assign(kBytes, 0);
  });
  double best = 0;
  for (int rep = 0; rep < 5; ++rep) {
    const auto t0 = std::chrono::steady_clock::now();
    run_tasks(n, [&](int64_t i) { std::memcpy(dst[i].data(), src[i].data(), kBytes); });
    const double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (dt > 0) best = std::max(best, 2.0 * kBytes * n / dt);
  }
  return best;
}
void HostBackend::from_host(const void* src, void* dst, size_t bytes) { std::memcpy(dst, src, bytes); }
void HostBackend::copy(const void* src, void* dst, size_t bytes) { std::memcpy(dst, src, bytes); }

namespace {

// The fp8 KV cache never holds a NaN: NaN is stored as 0 (saturation as f32_to_f8e4m3; the
// CUDA encoder in kernels/block_decode.h does the same).
uint8_t kv_f8e4m3(float x) { return std::isnan(x) ? 0 : f32_to_f8e4m3(x); }

}  // namespace

void HostBackend::kv_write(const float* k, const float* v, int n, int pos0, int kv_width,
                           const KvLayer& cache) {
  // A slot is kv_width values in the cache's layout (backend.h KvLayer). Q8_0 blocks of 32 never
  // straddle two heads (head_dim % 32 == 0), so quantizing the whole slot as one row gives
  // exactly the per-(slot, head) rows.
  const uint64_t slot_bytes = row_bytes(cache.dtype, kv_width).value_or(0);
  for (int t = 0; t < n; ++t) {
    const int64_t slot = (pos0 + t) % cache.capacity;
    const float* src[2] = {k + static_cast<int64_t>(t) * kv_width, v + static_cast<int64_t>(t) * kv_width};
    void* base[2] = {cache.k, cache.v};
    for (int kv = 0; kv < 2; ++kv) {
      uint8_t* dst = static_cast<uint8_t*>(base[kv]) + slot * slot_bytes;
      if (cache.dtype == DType::kF8E4M3) {
        for (int i = 0; i < kv_width; ++i) dst[i] = kv_f8e4m3(src[kv][i]);
      } else {
        quantize_row(cache.dtype, src[kv], dst, kv_width);  // F32 copy, BF16 round to nearest even, Q8_0
      }
    }
  }
}

void HostBackend::layernorm(const float* x, const BackendWeight& wt, const BackendWeight& bt, int64_t rows,
                            int dim, float eps, float* out) {
  std::vector<float> w(dim), b(dim);
  static_cast<const HostWeight&>(wt).row(0, w.data());
  static_cast<const HostWeight&>(bt).row(0, b.data());
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * dim;
    float* o = out + r * dim;
    // torch.nn.LayerNorm in fp32: mean, then the biased variance of (x - mean).
    float mean = 0;
    for (int i = 0; i < dim; ++i) mean += xr[i];
    mean /= static_cast<float>(dim);
    float var = 0;
    for (int i = 0; i < dim; ++i) var += (xr[i] - mean) * (xr[i] - mean);
    const float inv = 1.0f / std::sqrt(var / static_cast<float>(dim) + eps);
    for (int i = 0; i < dim; ++i) o[i] = (xr[i] - mean) * inv * w[i] + b[i];
  }
}

void HostBackend::add_bias(const float* x, const BackendWeight& bt, int64_t rows, float* out) {
  const int64_t dim = bt.cols;
  std::vector<float> b(dim);
  static_cast<const HostWeight&>(bt).row(0, b.data());
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t i = 0; i < dim; ++i) out[r * dim + i] = x[r * dim + i] + b[i];
}

void HostBackend::gelu(const float* x, int64_t n, float* out) {
  constexpr float kSqrt2OverPi = 0.7978845608028654f;
  for (int64_t i = 0; i < n; ++i) {
    const float v = x[i];
    out[i] = 0.5f * v * (1.0f + std::tanh(kSqrt2OverPi * (v + 0.044715f * v * v * v)));
  }
}

void HostBackend::avg_pool(const float* x, int side, int dim, int k, float* out) {
  const int out_side = side / k;
  for (int R = 0; R < out_side; ++R)
    for (int C = 0; C < out_side; ++C) {
      float* o = out + (static_cast<int64_t>(R) * out_side + C) * dim;
      std::fill(o, o + dim, 0.0f);
      for (int dy = 0; dy < k; ++dy)
        for (int dx = 0; dx < k; ++dx) {
          const float* xr = x + (static_cast<int64_t>(R * k + dy) * side + (C * k + dx)) * dim;
          for (int i = 0; i < dim; ++i) o[i] += xr[i];
        }
      for (int i = 0; i < dim; ++i) o[i] /= static_cast<float>(k * k);  // torch divides the sum
    }
}

Status HostBackend::bind(const TensorView& t, HostWeight* w) {
  GEMMA3_ASSIGN_OR_RETURN(w->row_stride, weight_row_bytes(t));
  w->view = t;
  w->dtype = t.dtype;
  w->rows = t.rows();
  w->cols = t.cols();
  return ok_status();
}

namespace {

using CpuWeight = HostWeight;
const CpuWeight& as_cpu(const BackendWeight& w) { return static_cast<const CpuWeight&>(w); }

// Dot product with 8 independent fp32 partial sums (vectorizes; deterministic order).
float dot(const float* a, const float* b, int64_t n) {
  float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int k = 0; k < 8; ++k) acc[k] += a[i + k] * b[i + k];
  float s = 0;
  for (; i < n; ++i) s += a[i] * b[i];
  return s + ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
}

// dst[0..hd) = the K or V row of kv head g in slot `slot`, dequantized (layout: backend.h KvLayer).
void load_kv_row(const void* base, DType t, int64_t slot, int g, int n_kv_heads, int hd, float* dst) {
  const uint64_t row = row_bytes(t, hd).value_or(0);
  const uint8_t* p = static_cast<const uint8_t*>(base) + (slot * n_kv_heads + g) * row;
  dequantize_row(t, p, dst, hd);  // F8E4M3: the raw e4m3 value (the KV cache has no scale)
}

class RefCpuBackend final : public HostBackend {
 public:
  explicit RefCpuBackend(int threads) : pool_(threads) {}
  const std::string& pool_error() const { return pool_.start_error(); }

  std::string name() const override { return fmt::format("cpu reference ({} threads)", pool_.size()); }
  double copy_bandwidth() override {
    return pool_copy_bandwidth(pool_.size(), [&](int64_t n, const std::function<void(int64_t)>& fn) {
      pool_.parallel_for(n, [&](int64_t b, int64_t e, int) {
        for (int64_t i = b; i < e; ++i) fn(i);
      });
    });
  }

  Result<std::unique_ptr<BackendWeight>> upload(const TensorView& t) override {
    auto w = std::make_unique<CpuWeight>();
    GEMMA3_TRY(bind(t, w.get()));
    return std::unique_ptr<BackendWeight>(std::move(w));
  }

  void embed(const BackendWeight& table, const int32_t* ids, int n, float scale, float* out) override {
    const CpuWeight& w = as_cpu(table);
    const int64_t d = w.cols;
    pool_.parallel_for(n, [&](int64_t b, int64_t e, int) {
      for (int64_t t = b; t < e; ++t) {
        float* o = out + t * d;
        w.row(ids[t], o);
        for (int64_t i = 0; i < d; ++i) o[i] *= scale;
      }
    });
  }

  void rmsnorm(const float* x, const BackendWeight& wt, int64_t rows, int dim, float eps,
               float* out) override {
    std::vector<float> w(dim);
    as_cpu(wt).row(0, w.data());
    pool_.parallel_for(
        rows,
        [&](int64_t b, int64_t e, int) {
          for (int64_t r = b; r < e; ++r) {
            const float* xr = x + r * dim;
            float* o = out + r * dim;
            float ss = 0;
            for (int i = 0; i < dim; ++i) ss += xr[i] * xr[i];
            // Matches HF Gemma3RMSNorm: x * rsqrt(mean(x^2) + eps) * (1 + w), in fp32.
            const float inv = 1.0f / std::sqrt(ss / static_cast<float>(dim) + eps);
            for (int i = 0; i < dim; ++i) o[i] = (xr[i] * inv) * w[i];
          }
        },
        16);
  }

  void matmul(const float* x, int n, const BackendWeight& wt, float* out) override {
    const CpuWeight& w = as_cpu(wt);
    const int64_t k = w.cols, m = w.rows;
    pool_.parallel_for(
        m,
        [&](int64_t b, int64_t e, int) {
          std::vector<float> row(k);
          for (int64_t o = b; o < e; ++o) {
            w.row(o, row.data());
            for (int t = 0; t < n; ++t) out[static_cast<int64_t>(t) * m + o] = dot(row.data(), x + t * k, k);
          }
        },
        16);
  }

  void rope(float* x, int n, int n_heads, int head_dim, int pos0, float theta, float scale) override {
    const int half = head_dim / 2;
    // As HF computes it in fp32: inv_freq = 1 / theta^(2i/hd), divided by the linear factor,
    // angle = float(pos) * inv_freq.
    std::vector<float> inv_freq(half);
    for (int i = 0; i < half; ++i)
      inv_freq[i] =
          (1.0f / std::pow(theta, static_cast<float>(2 * i) / static_cast<float>(head_dim))) / scale;
    pool_.parallel_for(n, [&](int64_t b, int64_t e, int) {
      std::vector<float> c(half), s(half);
      for (int64_t t = b; t < e; ++t) {
        const float pos = static_cast<float>(pos0 + t);
        for (int i = 0; i < half; ++i) {
          const float angle = pos * inv_freq[i];
          c[i] = static_cast<float>(std::cos(static_cast<double>(angle)));
          s[i] = static_cast<float>(std::sin(static_cast<double>(angle)));
        }
        for (int h = 0; h < n_heads; ++h) {
          float* v = x + (t * n_heads + h) * head_dim;
          for (int i = 0; i < half; ++i) {
            const float a = v[i], bb = v[i + half];
            v[i] = a * c[i] - bb * s[i];
            v[i + half] = bb * c[i] + a * s[i];
          }
        }
      }
    });
  }

  void attention(const float* q, const KvLayer& cache, const AttentionParams& p, float* out) override {
    const int hd = p.head_dim, group = p.n_heads / p.n_kv_heads;
    const int64_t q_width = static_cast<int64_t>(p.n_heads) * hd;
    pool_.parallel_for(static_cast<int64_t>(p.n_tokens) * p.n_heads, [&](int64_t b, int64_t e, int) {
      std::vector<float> scores, row(hd), acc(hd);
      for (int64_t th = b; th < e; ++th) {
        const int64_t t = th / p.n_heads;
        const int h = static_cast<int>(th % p.n_heads), g = h / group;
        const int64_t i = p.pos0 + t;
        const int64_t lo = std::max<int64_t>(p.kv_start, p.window > 0 ? i - p.window + 1 : 0);
        const int64_t hi = attention_last_key(p, i);  // i, or the end of i's image group
        const float* qv = q + t * q_width + static_cast<int64_t>(h) * hd;
        scores.resize(hi - lo + 1);
        float mx = -std::numeric_limits<float>::infinity();
        for (int64_t j = lo; j <= hi; ++j) {
          load_kv_row(cache.k, cache.dtype, j % cache.capacity, g, p.n_kv_heads, hd, row.data());
          const float s = dot(qv, row.data(), hd) * p.scale;
          scores[j - lo] = s;
          mx = std::max(mx, s);
        }
        float sum = 0;
        for (float& s : scores) sum += (s = std::exp(s - mx));
        std::fill(acc.begin(), acc.end(), 0.0f);
        for (int64_t j = lo; j <= hi; ++j) {
          load_kv_row(cache.v, cache.dtype, j % cache.capacity, g, p.n_kv_heads, hd, row.data());
          const float w = scores[j - lo] / sum;
          for (int d = 0; d < hd; ++d) acc[d] += w * row[d];
        }
        std::memcpy(out + t * q_width + static_cast<int64_t>(h) * hd, acc.data(), hd * sizeof(float));
      }
    });
  }

  void gelu_gate(const float* g, const float* u, int64_t n, float* out) override {
    constexpr float kSqrt2OverPi = 0.7978845608028654f;
    pool_.parallel_for(
        n,
        [&](int64_t b, int64_t e, int) {
          for (int64_t i = b; i < e; ++i) {
            const float x = g[i];
            // gelu_pytorch_tanh, applied to the gate projection (HF Gemma3MLP).
            out[i] = 0.5f * x * (1.0f + std::tanh(kSqrt2OverPi * (x + 0.044715f * x * x * x))) * u[i];
          }
        },
        4096);
  }

  void add(const float* a, const float* b, int64_t n, float* out) override {
    for (int64_t i = 0; i < n; ++i) out[i] = a[i] + b[i];
  }

 private:
  ThreadPool pool_;
};

}  // namespace

Result<std::unique_ptr<Backend>> make_cpu_ref_backend(int threads) {
  GEMMA3_TRY(check_cpu_threads(threads));
  auto b = std::make_unique<RefCpuBackend>(threads);
  if (!b->pool_error().empty()) return out_of_memory(b->pool_error());
  return std::unique_ptr<Backend>(std::move(b));
}

Status check_cpu_threads(int threads) {
  if (threads < 0 || threads > kMaxThreads)
    return invalid_argument(
        fmt::format("threads is {}; it must be in [0, {}] (0: one per core)", threads, kMaxThreads));
  return ok_status();
}

Result<std::unique_ptr<Backend>> make_cpu_backend_named(int threads, const std::string& kernels,
                                                        bool batch_invariant) {
  // The reference backend's loops treat every row alike: batch-invariant as it is.
  if (kernels == "ref" || kernels == "reference") return make_cpu_ref_backend(threads);
  return make_cpu_fast_backend(threads, kernels, batch_invariant);
}

Result<std::unique_ptr<Backend>> make_cpu_backend(const BackendOptions& options) {
  const char* env = std::getenv("GEMMA3_CPU_KERNELS");
  return make_cpu_backend_named(options.threads, env && *env ? env : "auto", options.batch_invariant);
}

}  // namespace gemma3
