// The CPU backends: the reference (plain loops; the oracle every fast kernel is tested
// against) and the fast one (quantized-activation kernels picked at run time from the CPU's
// features, a spinning worker pool, GQA-aware attention).
//
// make_cpu_backend() (backend.h) builds the fast backend unless the environment variable
// GEMMA3_CPU_KERNELS says otherwise: "ref" (reference backend), "portable", "avx2", "avx512",
// "auto".
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>

#include "backend/backend.h"

namespace gemma3 {

// A weight read in place from host memory (the mapped checkpoint): rows of row_stride bytes.
class HostWeight : public BackendWeight {
 public:
  TensorView view;
  uint64_t row_stride = 0;

  const uint8_t* row_ptr(int64_t r) const {
    return static_cast<const uint8_t*>(view.data) + static_cast<uint64_t>(r) * row_stride;
  }
  // dst[0..cols) = row r dequantized to fp32 (fp8 rows scaled by their row scale).
  void row(int64_t r, float* dst) const;
};

// Host memory and weight checks shared by the CPU backends.
class HostBackend : public Backend {
 public:
  Result<void*> allocate(size_t bytes) override;  // zero-filled
  void release(void* ptr) override;
  // Paged memory: an mmap'd range with no access, made readable and writable page by page
  // (mprotect); unmap gives the pages back to the system (madvise MADV_DONTNEED) and takes
  // access away again, so a stray write past what is mapped faults instead of using memory.
  size_t map_granularity() override;
  Result<void*> reserve(size_t bytes) override;
  void unreserve(void* base, size_t bytes) override;
  Status map(void* base, size_t offset, size_t bytes) override;
  void unmap(void* base, size_t offset, size_t bytes) override;
  void to_host(const void* src, void* dst, size_t bytes) override;
  void from_host(const void* src, void* dst, size_t bytes) override;
  void copy(const void* src, void* dst, size_t bytes) override;
  // Writes positions pos0.. into ring slots p % capacity, fp32 or bf16 (round to nearest even).
  void kv_write(const float* k, const float* v, int n, int pos0, int kv_width, const KvLayer& cache) override;
  // Vision tower ops (backend.h), single-threaded plain loops: shared by both CPU backends;
  // the tower's time goes to matmul and attention.
  void layernorm(const float* x, const BackendWeight& w, const BackendWeight& b, int64_t rows, int dim,
                 float eps, float* out) override;
  void add_bias(const float* x, const BackendWeight& b, int64_t rows, float* out) override;
  void gelu(const float* x, int64_t n, float* out) override;
  void avg_pool(const float* x, int side, int dim, int k, float* out) override;

 protected:
  // Fills w from t after checking t is 1-D or 2-D and its bytes hold whole rows of its type.
  static Status bind(const TensorView& t, HostWeight* w);
  // copy_bandwidth() of a backend with `threads` pool threads: run_tasks(n, fn) calls fn(i)
  // for i in [0, n) on the pool; each task copies its own 64 MiB buffer (far larger than the
  // caches, so this is DRAM speed); best of 5.
  static double pool_copy_bandwidth(
      int threads, const std::function<void(int64_t, const std::function<void(int64_t)>&)>& run_tasks);
};

// threads in [0, kMaxThreads] (0: one per core), else an invalid-argument error; a thread
// the system refuses to start is an out-of-memory error naming it.
Status check_cpu_threads(int threads);
Result<std::unique_ptr<Backend>> make_cpu_ref_backend(int threads);
// kernels: "auto" (best for this CPU), "portable", "avx2", "avx512"; an error if it cannot run here.
// batch_invariant: BackendOptions::batch_invariant.
Result<std::unique_ptr<Backend>> make_cpu_fast_backend(int threads, const std::string& kernels,
                                                       bool batch_invariant = false);
// "ref" or one of make_cpu_fast_backend's names.
Result<std::unique_ptr<Backend>> make_cpu_backend_named(int threads, const std::string& kernels,
                                                        bool batch_invariant = false);

}  // namespace gemma3
