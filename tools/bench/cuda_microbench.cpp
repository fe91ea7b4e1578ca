// cuda_microbench: the CUDA backend's kernels one at a time, each against a reference measured
// in the same run (issue #13; tools/gpu-check.sh stage 1 runs it):
//   copy       a 1 GiB device-to-device cudaMemcpy (read + write bytes / time): the bandwidth
//              reference of every memory-bound row
//   gemv       matmul at 1 token (the fused GEMV) for bf16, fp8, q4_0, q8_0 and q4_k weights
//              [10240x2560], [2560x10240], [1024x2560] (Gemma 3 4B's FFN and k/v shapes) and
//              the LM head [262208x2560]; GB/s = (weight + x + out bytes) / time
//   attention  decode attention (1 token) over 128, 1K, 4K and 32K keys, Gemma 3 4B's shape
//              (8 query heads, 4 kv heads, head_dim 256, bf16 cache), on a local layer
//              (window 1024, a ring) and a global one; GB/s = (K + V bytes visible) / time
//   prefill    matmul at 256 and 512 tokens (dequantize + fp32 cuBLAS) on the GEMV shapes,
//              TFLOP/s = 2 n rows cols / time, against cuBLAS's bf16 GEMM of the same shape
//   siglip     one SigLIP attention call: 4096 tokens, 16 heads, head_dim 72, all bidirectional
//              (the vision tower's shape), TFLOP/s = 4 n^2 heads head_dim / time, against a
//              cuBLAS bf16 8192^3 GEMM
// Timing: std::chrono around back-to-back calls, after a warm-up, ending with the backend's
// status() (a stream synchronize); the iteration count is chosen so each row runs >= --min-ms.
// Launch overhead is included, as a decode step pays it.
//
// usage: cuda_microbench [--list] [--only GROUPS] [--min-ms MS] [--tsv FILE] [--help]
//   --list      print the table's rows without measuring (needs no GPU)
//   --only      comma-separated groups (copy is always measured: the other rows refer to it)
//   --min-ms    time per row (default 30)
//   --tsv FILE  also write the rows as tab-separated values
// Output: a markdown table on stdout, one row per case:
//   | group | case | type | us | rate | unit | % of reference | reference |
// Exit codes: 0 done; 1 some row failed (marked "failed" in the table, the error on stderr);
//   2 bad arguments; 77 skipped: no CUDA device or backend (the reason on stdout).
#include <cublas_v2.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "backend/backend.h"
#include "core/dtype.h"

namespace gemma3 {
namespace {

constexpr int kSkipped = 77;

struct Options {
  bool list = false;
  std::vector<std::string> only;  // empty: all
  double min_ms = 30;
  std::string tsv;
};

struct Row {
  std::string group, name, type;
  double us = -1;    // < 0: not measured
  double rate = 0;   // GB/s or TFLOP/s
  std::string unit;  // "GB/s" or "TFLOP/s"
  double pct = -1;   // of the reference; < 0: none
  std::string ref;   // what the percentage refers to
  bool failed = false;
};

void usage(FILE* f) {
  std::fprintf(f,
               "usage: cuda_microbench [--list] [--only GROUPS] [--min-ms MS] [--tsv FILE] [--help]\n"
               "  groups: copy, gemv, attention, prefill, siglip (comma-separated)\n"
               "  exit codes: 0 done, 1 a row failed, 2 bad arguments, 77 skipped (no CUDA device)\n");
}

const char* const kGroups[] = {"copy", "gemv", "attention", "prefill", "siglip"};

// Returns 0, or 2 after printing what is wrong; exits 0 for --help.
int parse(int argc, char** argv, Options* o) {
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto value = [&](const char* flag) -> const char* {
      if (i + 1 >= argc) {
        std::fprintf(stderr, "cuda_microbench: %s needs a value\n", flag);
        return nullptr;
      }
      return argv[++i];
    };
    if (a == "--help" || a == "-h") {
      usage(stdout);
      std::exit(0);
    } else if (a == "--list") {
      o->list = true;
    } else if (a == "--only") {
      const char* v = value("--only");
      if (!v) return 2;
      std::string s = v;
      for (size_t at = 0; at <= s.size();) {
        const size_t comma = std::min(s.find(',', at), s.size());
        const std::string g = s.substr(at, comma - at);
        if (std::find(std::begin(kGroups), std::end(kGroups), g) == std::end(kGroups)) {
          std::fprintf(stderr, "cuda_microbench: unknown group '%s' in --only\n", g.c_str());
          usage(stderr);
          return 2;
        }
        o->only.push_back(g);
        at = comma + 1;
      }
    } else if (a == "--min-ms") {
      const char* v = value("--min-ms");
      if (!v) return 2;
      char* end = nullptr;
      o->min_ms = std::strtod(v, &end);
      if (end == v || *end || !(o->min_ms > 0) || o->min_ms > 60000) {
        std::fprintf(stderr, "cuda_microbench: --min-ms expects a number in (0, 60000], got '%s'\n", v);
        return 2;
      }
    } else if (a == "--tsv") {
      const char* v = value("--tsv");
      if (!v) return 2;
      o->tsv = v;
    } else {
      std::fprintf(stderr, "cuda_microbench: unknown argument '%s'\n", a.c_str());
      usage(stderr);
      return 2;
    }
  }
  return 0;
}

bool wanted(const Options& o, const std::string& group) {
  return group == "copy" || o.only.empty() || std::find(o.only.begin(), o.only.end(), group) != o.only.end();
}

// ---- the cases ------------------------------------------------------------------------------

struct Shape {
  int64_t rows, cols;
  const char* what;
};
const Shape kGemvShapes[] = {{10240, 2560, "10240x2560"},
                             {2560, 10240, "2560x10240"},
                             {1024, 2560, "1024x2560"},
                             {262208, 2560, "262208x2560 (LM head)"}};
const DType kGemvTypes[] = {DType::kBF16, DType::kF8E4M3, DType::kQ4_0, DType::kQ8_0, DType::kQ4_K};
const int kPrefillTokens[] = {256, 512};
const int kAttnKeys[] = {128, 1024, 4096, 32768};
constexpr int kAttnHeads = 8, kAttnKvHeads = 4, kAttnHeadDim = 256, kAttnWindow = 1024, kPrefillChunk = 512;
constexpr int kSiglipTokens = 4096, kSiglipHeads = 16, kSiglipHeadDim = 72;

const char* type_name(DType t) {
  switch (t) {
    case DType::kBF16: return "bf16";
    case DType::kF8E4M3: return "fp8";
    case DType::kQ4_0: return "q4_0";
    case DType::kQ8_0: return "q8_0";
    case DType::kQ4_K: return "q4_k";
    case DType::kF32: return "f32";
    default: return "?";
  }
}

// Every row, in order, unmeasured (the --list output and the skeleton the run fills in).
std::vector<Row> all_rows(const Options& o) {
  std::vector<Row> rows;
  rows.push_back({"copy", "d2d cudaMemcpy 1 GiB", "-", -1, 0, "GB/s", -1, "", false});
  if (wanted(o, "gemv"))
    for (const Shape& s : kGemvShapes)
      for (DType t : kGemvTypes)
        rows.push_back(
            {"gemv", std::string("1 token, ") + s.what, type_name(t), -1, 0, "GB/s", -1, "d2d copy", false});
  if (wanted(o, "attention"))
    for (const char* layer : {"local", "global"})
      for (int keys : kAttnKeys)
        rows.push_back({"attention", std::string("decode, ") + layer + ", " + std::to_string(keys) + " keys",
                        "bf16", -1, 0, "GB/s", -1, "d2d copy", false});
  if (wanted(o, "prefill"))
    for (int n : kPrefillTokens)
      for (int s = 0; s < 3; ++s) {
        const std::string name = "pp" + std::to_string(n) + ", " + kGemvShapes[s].what;
        rows.push_back({"prefill", name, "cublas bf16", -1, 0, "TFLOP/s", -1, "", false});
        for (DType t : kGemvTypes)
          rows.push_back(
              {"prefill", name, type_name(t), -1, 0, "TFLOP/s", -1, "cublas bf16 same shape", false});
      }
  if (wanted(o, "siglip")) {
    rows.push_back({"siglip", "cublas bf16 8192^3", "bf16", -1, 0, "TFLOP/s", -1, "", false});
    rows.push_back({"siglip", "attention 4096 tokens, 16 heads, hd 72, bidirectional", "f32 kv", -1, 0,
                    "TFLOP/s", -1, "cublas bf16 8192^3", false});
  }
  return rows;
}

void print_table(const std::vector<Row>& rows, FILE* f) {
  std::fprintf(f, "| group | case | type | us | rate | unit | %% of reference | reference |\n");
  std::fprintf(f, "|---|---|---|---:|---:|---|---:|---|\n");
  for (const Row& r : rows) {
    char us[32] = "-", rate[32] = "-", pct[32] = "-";
    if (r.failed) std::snprintf(us, sizeof us, "failed");
    if (r.us >= 0) {
      std::snprintf(us, sizeof us, "%.1f", r.us);
      std::snprintf(rate, sizeof rate, "%.1f", r.rate);
    }
    if (r.pct >= 0) std::snprintf(pct, sizeof pct, "%.1f%%", r.pct);
    std::fprintf(f, "| %s | %s | %s | %s | %s | %s | %s | %s |\n", r.group.c_str(), r.name.c_str(),
                 r.type.c_str(), us, rate, r.unit.c_str(), pct, r.ref.empty() ? "-" : r.ref.c_str());
  }
}

void write_tsv(const std::vector<Row>& rows, const std::string& path) {
  FILE* f = std::fopen(path.c_str(), "w");
  if (!f) {
    std::fprintf(stderr, "cuda_microbench: cannot write %s\n", path.c_str());
    return;
  }
  std::fprintf(f, "group\tcase\ttype\tus\trate\tunit\tpct_of_reference\treference\n");
  for (const Row& r : rows)
    std::fprintf(f, "%s\t%s\t%s\t%.3f\t%.3f\t%s\t%.2f\t%s\n", r.group.c_str(), r.name.c_str(), r.type.c_str(),
                 r.us, r.rate, r.unit.c_str(), r.pct, r.ref.c_str());
  std::fclose(f);
}

// ---- measuring ------------------------------------------------------------------------------

// Microseconds per call of f: one warm-up, one timed call to size the loop, then enough calls
// for min_ms. sync() waits for the device and returns false on an error.
double time_us(const std::function<void()>& f, const std::function<bool()>& sync, double min_ms) {
  using clock = std::chrono::steady_clock;
  f();
  if (!sync()) return -1;
  auto t0 = clock::now();
  f();
  if (!sync()) return -1;
  const double one = std::chrono::duration<double, std::micro>(clock::now() - t0).count();
  const int iters = static_cast<int>(std::clamp(min_ms * 1e3 / std::max(one, 1.0), 3.0, 10000.0));
  t0 = clock::now();
  for (int i = 0; i < iters; ++i) f();
  if (!sync()) return -1;
  return std::chrono::duration<double, std::micro>(clock::now() - t0).count() / iters;
}

// Deterministic filler bytes (timing does not depend on the values; xorshift is fast enough for
// the 1.3 GB LM head).
void fill(std::vector<uint8_t>& v, uint64_t seed) {
  uint64_t x = seed * 0x9E3779B97F4A7C15ull + 1;
  size_t i = 0;
  for (; i + 8 <= v.size(); i += 8) {
    x ^= x << 13, x ^= x >> 7, x ^= x << 17;
    std::memcpy(v.data() + i, &x, 8);
  }
  for (; i < v.size(); ++i) v[i] = static_cast<uint8_t>(x >> (8 * (i % 8)));
}

class Bench {
 public:
  Bench(Backend& be, const Options& o) : be_(be), o_(o) {}
  ~Bench() {
    for (void* p : owned_) be_.release(p);
    if (cublas_) cublasDestroy(cublas_);
    if (stream_) cudaStreamDestroy(stream_);
  }

  bool init() {
    if (cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking) != cudaSuccess) return false;
    if (cublasCreate(&cublas_) != CUBLAS_STATUS_SUCCESS) return false;
    return cublasSetStream(cublas_, stream_) == CUBLAS_STATUS_SUCCESS;
  }

  // Device memory from the backend (zero-filled), released at the end; null after an error.
  float* alloc(size_t bytes) {
    auto r = be_.allocate(bytes);
    if (!r.ok()) {
      std::fprintf(stderr, "cuda_microbench: %s\n", r.status().to_string().c_str());
      return nullptr;
    }
    owned_.push_back(*r);
    return static_cast<float*>(*r);
  }
  void free_all() {
    for (void* p : owned_) be_.release(p);
    owned_.clear();
  }

  bool backend_sync() {
    const Status s = be_.status();
    if (!s.ok()) std::fprintf(stderr, "cuda_microbench: %s\n", s.to_string().c_str());
    return s.ok();
  }
  bool stream_sync() {
    const cudaError_t e = cudaStreamSynchronize(stream_);
    if (e != cudaSuccess) std::fprintf(stderr, "cuda_microbench: %s\n", cudaGetErrorString(e));
    return e == cudaSuccess;
  }

  // copy: GB/s of a 1 GiB device-to-device copy, counting read + write.
  void copy(Row* r) {
    const size_t bytes = size_t{1} << 30;
    void *a = nullptr, *b = nullptr;
    if (cudaMalloc(&a, bytes) != cudaSuccess || cudaMalloc(&b, bytes) != cudaSuccess) {
      r->failed = true;
      std::fprintf(stderr, "cuda_microbench: cudaMalloc of 2 GiB for the copy failed\n");
      if (a) cudaFree(a);
      return;
    }
    r->us = time_us([&] { cudaMemcpyAsync(b, a, bytes, cudaMemcpyDeviceToDevice, stream_); },
                    [&] { return stream_sync(); }, o_.min_ms);
    cudaFree(a);
    cudaFree(b);
    if (r->us < 0) return fail(r, "copy failed");
    r->rate = 2.0 * bytes / r->us / 1e3;
    copy_gbs_ = r->rate;
  }

  // A weight [rows, cols] of type t with filler bytes (fp8: row scales of 1).
  Result<std::unique_ptr<BackendWeight>> weight(DType t, int64_t rows, int64_t cols, uint64_t* bytes) {
    const uint64_t rb = *row_bytes(t, cols);
    host_.resize(static_cast<size_t>(rb * rows));
    fill(host_, static_cast<uint64_t>(rows * 31 + cols));
    if (t == DType::kBF16)  // finite values (no NaN/inf patterns): clear each element's top exponent bit
      for (size_t i = 1; i < host_.size(); i += 2) host_[i] &= 0xBF;
    std::vector<float> scales;
    if (t == DType::kF8E4M3) scales.assign(static_cast<size_t>(rows), 1.0f);
    *bytes = rb * rows + scales.size() * sizeof(float);
    TensorView v{"bench", t, {rows, cols}, host_.data(), host_.size(), scales};
    return be_.upload(v);
  }

  void gemv(Row* r, const Shape& s, DType t) {
    uint64_t wbytes = 0;
    auto w = weight(t, s.rows, s.cols, &wbytes);
    float* x = alloc(s.cols * 4);
    float* out = alloc(s.rows * 4);
    if (!w.ok() || !x || !out) return fail(r, w.ok() ? "" : w.status().to_string());
    r->us = time_us([&] { be_.matmul(x, 1, **w, out); }, [&] { return backend_sync(); }, o_.min_ms);
    if (r->us < 0) return fail(r, "");
    r->rate = static_cast<double>(wbytes + 4 * (s.rows + s.cols)) / r->us / 1e3;
    if (copy_gbs_ > 0) r->pct = 100 * r->rate / copy_gbs_;
    free_all();
  }

  void attention(Row* r, bool local, int keys) {
    const int kvw = kAttnKvHeads * kAttnHeadDim, qw = kAttnHeads * kAttnHeadDim;
    const int capacity = local ? std::min(keys, kAttnWindow + kPrefillChunk - 1) : keys;
    const int visible = local ? std::min(keys, kAttnWindow) : keys;
    float* k = alloc(static_cast<size_t>(capacity) * kvw * 2);
    float* v = alloc(static_cast<size_t>(capacity) * kvw * 2);
    float* q = alloc(qw * 4);
    float* out = alloc(qw * 4);
    if (!k || !v || !q || !out) return fail(r, "");
    AttentionParams p;
    p.n_tokens = 1, p.pos0 = keys - 1, p.n_heads = kAttnHeads, p.n_kv_heads = kAttnKvHeads;
    p.head_dim = kAttnHeadDim, p.scale = 0.0625f, p.window = local ? kAttnWindow : 0;
    const KvLayer cache{k, v, capacity, DType::kBF16};
    r->us = time_us([&] { be_.attention(q, cache, p, out); }, [&] { return backend_sync(); }, o_.min_ms);
    if (r->us < 0) return fail(r, "");
    const double bytes = 2.0 * visible * kvw * 2 + 2.0 * qw * 4;
    r->rate = bytes / r->us / 1e3;
    if (copy_gbs_ > 0) r->pct = 100 * r->rate / copy_gbs_;
    free_all();
  }

  // cuBLAS bf16 GEMM out [n, rows] = x [n, cols] . W [rows, cols]^T, fp32 output and compute.
  double cublas_bf16_us(int64_t rows, int64_t cols, int64_t n) {
    void *w = nullptr, *x = nullptr, *c = nullptr;
    double us = -1;
    if (cudaMalloc(&w, rows * cols * 2) == cudaSuccess && cudaMalloc(&x, n * cols * 2) == cudaSuccess &&
        cudaMalloc(&c, n * rows * 4) == cudaSuccess && cudaMemset(w, 0, rows * cols * 2) == cudaSuccess &&
        cudaMemset(x, 0, n * cols * 2) == cudaSuccess) {
      const float alpha = 1, beta = 0;
      bool ok = true;
      us = time_us(
          [&] {
            ok &= cublasGemmEx(cublas_, CUBLAS_OP_T, CUBLAS_OP_N, static_cast<int>(rows), static_cast<int>(n),
                               static_cast<int>(cols), &alpha, w, CUDA_R_16BF, static_cast<int>(cols), x,
                               CUDA_R_16BF, static_cast<int>(cols), &beta, c, CUDA_R_32F,
                               static_cast<int>(rows), CUBLAS_COMPUTE_32F,
                               CUBLAS_GEMM_DEFAULT) == CUBLAS_STATUS_SUCCESS;
          },
          [&] { return stream_sync(); }, o_.min_ms);
      if (!ok) us = -1;
    }
    if (w) cudaFree(w);
    if (x) cudaFree(x);
    if (c) cudaFree(c);
    return us;
  }

  void cublas_row(Row* r, int64_t rows, int64_t cols, int64_t n) {
    r->us = cublas_bf16_us(rows, cols, n);
    if (r->us < 0) return fail(r, "cuBLAS bf16 GEMM failed");
    r->rate = 2.0 * rows * cols * n / r->us / 1e6;
    ref_tflops_ = r->rate;
  }

  void prefill(Row* r, const Shape& s, DType t, int n) {
    uint64_t wbytes = 0;
    auto w = weight(t, s.rows, s.cols, &wbytes);
    float* x = alloc(static_cast<size_t>(n) * s.cols * 4);
    float* out = alloc(static_cast<size_t>(n) * s.rows * 4);
    if (!w.ok() || !x || !out) return fail(r, w.ok() ? "" : w.status().to_string());
    r->us = time_us([&] { be_.matmul(x, n, **w, out); }, [&] { return backend_sync(); }, o_.min_ms);
    if (r->us < 0) return fail(r, "");
    r->rate = 2.0 * s.rows * s.cols * n / r->us / 1e6;
    if (ref_tflops_ > 0) r->pct = 100 * r->rate / ref_tflops_;
    free_all();
  }

  void siglip(Row* r) {
    const int64_t n = kSiglipTokens, width = int64_t{kSiglipHeads} * kSiglipHeadDim;
    float* k = alloc(n * width * 4);
    float* v = alloc(n * width * 4);
    float* q = alloc(n * width * 4);
    float* out = alloc(n * width * 4);
    if (!k || !v || !q || !out) return fail(r, "");
    AttentionParams p;
    p.n_tokens = kSiglipTokens, p.pos0 = 0, p.n_heads = kSiglipHeads, p.n_kv_heads = kSiglipHeads;
    p.head_dim = kSiglipHeadDim, p.scale = 1.0f / std::sqrt(float(kSiglipHeadDim));
    p.bidir_begin = 0, p.bidir_end = kSiglipTokens;
    const KvLayer cache{k, v, kSiglipTokens, DType::kF32};
    r->us = time_us([&] { be_.attention(q, cache, p, out); }, [&] { return backend_sync(); }, o_.min_ms);
    if (r->us < 0) return fail(r, "");
    r->rate = 4.0 * n * n * width / r->us / 1e6;
    if (ref_tflops_ > 0) r->pct = 100 * r->rate / ref_tflops_;
    free_all();
  }

 private:
  void fail(Row* r, const std::string& why) {
    r->failed = true;
    r->us = -1;
    if (!why.empty())
      std::fprintf(stderr, "cuda_microbench: %s %s: %s\n", r->group.c_str(), r->name.c_str(), why.c_str());
    free_all();
  }

  Backend& be_;
  const Options& o_;
  std::vector<void*> owned_;
  std::vector<uint8_t> host_;
  cudaStream_t stream_ = nullptr;
  cublasHandle_t cublas_ = nullptr;
  double copy_gbs_ = 0;
  double ref_tflops_ = 0;  // the last cuBLAS reference row
};

int run(const Options& o) {
  std::vector<Row> rows = all_rows(o);
  if (o.list) {
    print_table(rows, stdout);
    if (!o.tsv.empty()) write_tsv(rows, o.tsv);
    return 0;
  }
  auto be = make_cuda_backend({});
  if (!be.ok()) {
    std::printf("cuda_microbench: skipped: %s\n", be.status().to_string().c_str());
    return kSkipped;
  }
  std::printf("backend: %s\n\n", (*be)->name().c_str());
  Bench b(**be, o);
  if (!b.init()) {
    std::printf("cuda_microbench: skipped: cannot create a stream / cuBLAS handle\n");
    return kSkipped;
  }
  size_t i = 0;
  b.copy(&rows[i++]);
  if (wanted(o, "gemv"))
    for (const Shape& s : kGemvShapes)
      for (DType t : kGemvTypes) b.gemv(&rows[i++], s, t);
  if (wanted(o, "attention"))
    for (bool local : {true, false})
      for (int keys : kAttnKeys) b.attention(&rows[i++], local, keys);
  if (wanted(o, "prefill"))
    for (int n : kPrefillTokens)
      for (int s = 0; s < 3; ++s) {
        b.cublas_row(&rows[i++], kGemvShapes[s].rows, kGemvShapes[s].cols, n);
        for (DType t : kGemvTypes) b.prefill(&rows[i++], kGemvShapes[s], t, n);
      }
  if (wanted(o, "siglip")) {
    b.cublas_row(&rows[i++], 8192, 8192, 8192);
    b.siglip(&rows[i++]);
  }
  print_table(rows, stdout);
  if (!o.tsv.empty()) write_tsv(rows, o.tsv);
  const bool any_failed = std::any_of(rows.begin(), rows.end(), [](const Row& r) { return r.failed; });
  return any_failed ? 1 : 0;
}

}  // namespace
}  // namespace gemma3

int main(int argc, char** argv) {
  gemma3::Options o;
  if (int rc = gemma3::parse(argc, argv, &o)) return rc;
  return gemma3::run(o);
}
