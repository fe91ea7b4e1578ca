// The CUDA backend: weights resident on the GPU as their raw checkpoint bytes, fp32
// activations, one stream, every op a kernel launch (no host round trip inside an op).
// Kernels and their launchers live in kernels/; this file is the host side: memory, cuBLAS,
// argument checks, and error bookkeeping.
//
// Errors: the op interface returns void, so the first CUDA/cuBLAS error (or bad argument) is
// kept as a sticky Status; later ops become no-ops, to_host poisons its output with NaN bytes,
// and cuda_backend_status() synchronizes and returns it. Nothing here aborts.
#include <cublas_v2.h>
#include <cuda_runtime_api.h>
#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "backend/backend.h"
#include "core/quant.h"
#include "launch.h"

namespace gemma3 {
namespace {

std::string cuda_error_text(cudaError_t e) {
  return fmt::format("{} ({})", cudaGetErrorName(e), cudaGetErrorString(e));
}

class CudaWeight final : public BackendWeight {
 public:
  ~CudaWeight() override {
    // Errors cannot be reported from a destructor; a failed free only leaks device memory.
    if (data) (void)cudaFree(data);
    if (scales) (void)cudaFree(scales);
    if (vec) (void)cudaFree(vec);
  }
  std::string name;
  void* data = nullptr;  // [rows, row_bytes] raw blocks as stored in the checkpoint
  uint64_t row_bytes = 0;
  float* scales = nullptr;  // fp8 only: [n_scales] row scales (1 = per tensor)
  int64_t n_scales = 0;
  float* vec = nullptr;  // vectors (rows == 1) only: [cols] dequantized fp32, read by rmsnorm

  cuda::WeightRef ref() const {
    cuda::WeightRef r;
    r.data = data;
    r.rows = rows;
    r.cols = cols;
    r.row_bytes = row_bytes;
    r.dtype = dtype;
    r.row_scale = scales;
    r.n_scales = n_scales;
    return r;
  }
};

const CudaWeight& as_cuda(const BackendWeight& w) { return static_cast<const CudaWeight&>(w); }

class CudaBackend final : public Backend {
 public:
  // fp32 elements of the dequantized weight tile for the cuBLAS path (n > 8 tokens): 64 MiB.
  static constexpr int64_t kScratchFloats = int64_t{16} << 20;

  static Result<std::unique_ptr<CudaBackend>> create() {
    int count = 0;
    cudaError_t e = cudaGetDeviceCount(&count);
    if (e != cudaSuccess)
      return unsupported("CUDA backend: no usable CUDA driver/device: " + cuda_error_text(e));
    if (count == 0) return unsupported("CUDA backend: no CUDA device is visible");
    auto b = std::unique_ptr<CudaBackend>(new CudaBackend());
    if ((e = cudaSetDevice(0)) != cudaSuccess)
      return internal_error("CUDA backend: cudaSetDevice(0): " + cuda_error_text(e));
    cudaDeviceProp prop{};
    if ((e = cudaGetDeviceProperties(&prop, 0)) != cudaSuccess)
      return internal_error("CUDA backend: cudaGetDeviceProperties: " + cuda_error_text(e));
    // The library carries sm_90a code and compute_80 PTX (CMAKE_CUDA_ARCHITECTURES).
    if (prop.major < 8)
      return unsupported(
          fmt::format("CUDA backend: device 0 ({}) has compute capability {}.{}; 8.0 or newer is needed",
                      prop.name, prop.major, prop.minor));
    b->device_name_ = fmt::format("{}, sm_{}{}, {:.0f} GiB", prop.name, prop.major, prop.minor,
                                  static_cast<double>(prop.totalGlobalMem) / (1 << 30));
    cudaStream_t stream = nullptr;
    if ((e = cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking)) != cudaSuccess)
      return internal_error("CUDA backend: cudaStreamCreate: " + cuda_error_text(e));
    b->stream_ = stream;
    cublasHandle_t handle = nullptr;
    cublasStatus_t cs = cublasCreate(&handle);
    if (cs != CUBLAS_STATUS_SUCCESS)
      return internal_error(fmt::format("CUDA backend: cublasCreate: {}", cublasGetStatusString(cs)));
    b->cublas_ = handle;
    if ((cs = cublasSetStream(handle, stream)) != CUBLAS_STATUS_SUCCESS)
      return internal_error(fmt::format("CUDA backend: cublasSetStream: {}", cublasGetStatusString(cs)));
    // Plain fp32 GEMM: CUBLAS_COMPUTE_32F with the default math mode never uses TF32.
    if ((cs = cublasSetMathMode(handle, CUBLAS_DEFAULT_MATH)) != CUBLAS_STATUS_SUCCESS)
      return internal_error(fmt::format("CUDA backend: cublasSetMathMode: {}", cublasGetStatusString(cs)));
    return b;
  }

  ~CudaBackend() override {
    if (stream_) (void)cudaStreamSynchronize(stream());
    if (scratch_) (void)cudaFree(scratch_);
    if (ids_) (void)cudaFree(ids_);
    if (cublas_) (void)cublasDestroy(static_cast<cublasHandle_t>(cublas_));
    if (stream_) (void)cudaStreamDestroy(stream());
  }

  std::string name() const override { return fmt::format("cuda ({})", device_name_); }

  // Synchronizes and returns the first error any call has hit.
  Status status() override {
    if (error_.ok() && stream_) check(cudaStreamSynchronize(stream()), "cudaStreamSynchronize");
    return error_;
  }

  // ---- memory ----

  Result<void*> allocate(size_t bytes) override {
    GEMMA3_TRY(error_);
    void* p = nullptr;
    cudaError_t e = cudaMalloc(&p, std::max<size_t>(bytes, 1));
    if (e != cudaSuccess) {
      (void)cudaGetLastError();  // an allocation failure is not sticky; clear it
      return out_of_memory(fmt::format("CUDA backend: cannot allocate {} bytes of device memory: {}", bytes,
                                       cuda_error_text(e)));
    }
    if (!check(cudaMemsetAsync(p, 0, bytes, stream()), "cudaMemsetAsync") ||
        !check(cudaStreamSynchronize(stream()), "cudaStreamSynchronize")) {
      (void)cudaFree(p);
      return error_;
    }
    return p;
  }

  void release(void* ptr) override {
    if (ptr) check(cudaFree(ptr), "cudaFree");
  }

  void to_host(const void* src, void* dst, size_t bytes) override {
    if (error_.ok() && check(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, stream()), "to_host") &&
        check(cudaStreamSynchronize(stream()), "to_host (synchronize)"))
      return;
    if (bytes > 0)
      std::memset(dst, 0xFF, bytes);  // NaN in every float: a failed backend never yields plausible numbers
  }

  void from_host(const void* src, void* dst, size_t bytes) override {
    if (!error_.ok()) return;
    if (check(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, stream()), "from_host"))
      check(cudaStreamSynchronize(stream()), "from_host (synchronize)");
  }

  Result<std::unique_ptr<BackendWeight>> upload(const TensorView& t) override {
    GEMMA3_TRY(error_);
    if (t.shape.empty() || t.shape.size() > 2)
      return unsupported(fmt::format("tensor {}: {}-D weights are not supported", t.name, t.shape.size()));
    auto w = std::make_unique<CudaWeight>();
    w->name = t.name;
    w->dtype = t.dtype;
    w->rows = t.rows();
    w->cols = t.cols();
    auto rb = row_bytes(t.dtype, w->cols);
    if (!rb || *rb * static_cast<uint64_t>(w->rows) != t.nbytes)
      return invalid_file(fmt::format("tensor {}: {} bytes do not hold {} {} values", t.name, t.nbytes,
                                      shape_to_string(t.shape), dtype_name(t.dtype)));
    w->row_bytes = *rb;
    if (!t.row_scale.empty() && t.row_scale.size() != 1 &&
        static_cast<int64_t>(t.row_scale.size()) != w->rows)
      return invalid_file(
          fmt::format("tensor {}: {} row scales for {} rows", t.name, t.row_scale.size(), w->rows));
    GEMMA3_TRY(copy_to_device(t.data, t.nbytes, &w->data, t.name));
    if (!t.row_scale.empty()) {
      w->n_scales = static_cast<int64_t>(t.row_scale.size());
      GEMMA3_TRY(copy_to_device(t.row_scale.data(), t.row_scale.size() * sizeof(float),
                                reinterpret_cast<void**>(&w->scales), t.name + " (row scales)"));
    }
    if (w->rows == 1) {
      // Norm weights: dequantized once on the host (the reference dequantizer) for rmsnorm.
      std::vector<float> v(static_cast<size_t>(w->cols));
      dequantize_row(t.dtype, t.data, v.data(), w->cols);
      if (!t.row_scale.empty())
        for (float& x : v) x *= t.row_scale[0];
      GEMMA3_TRY(copy_to_device(v.data(), v.size() * sizeof(float), reinterpret_cast<void**>(&w->vec),
                                t.name + " (fp32)"));
    }
    return std::unique_ptr<BackendWeight>(std::move(w));
  }

  // ---- ops ----

  void embed(const BackendWeight& table, const int32_t* ids, int n, float scale, float* out) override {
    if (!error_.ok() || n <= 0) return;
    const CudaWeight& w = as_cuda(table);
    for (int t = 0; t < n; ++t) {
      if (ids[t] < 0 || ids[t] >= w.rows) {
        fail(invalid_argument(
            fmt::format("embed: token id {} is outside [0, {}) of {}", ids[t], w.rows, w.name)));
        return;
      }
    }
    if (!reserve(&ids_, &ids_bytes_, static_cast<size_t>(n) * sizeof(int32_t), "embed ids")) return;
    // From pageable memory the copy is staged before the call returns, so `ids` may go away.
    if (!check(cudaMemcpyAsync(ids_, ids, n * sizeof(int32_t), cudaMemcpyHostToDevice, stream()),
               "embed ids copy"))
      return;
    check_launch(cuda::launch_embed(w.ref(), static_cast<const int32_t*>(ids_), n, scale, out, stream_),
                 "embed");
  }

  void rmsnorm(const float* x, const BackendWeight& wt, int64_t rows, int dim, float eps,
               float* out) override {
    if (!error_.ok() || rows <= 0) return;
    const CudaWeight& w = as_cuda(wt);
    if (!w.vec || w.cols != dim) {
      fail(invalid_argument(fmt::format("rmsnorm: weight {} is [{}, {}], expected a vector of {}", w.name,
                                        w.rows, w.cols, dim)));
      return;
    }
    check_launch(cuda::launch_rmsnorm(x, w.vec, rows, dim, eps, out, stream_), "rmsnorm");
  }

  void matmul(const float* x, int n, const BackendWeight& wt, float* out) override {
    if (!error_.ok() || n <= 0) return;
    const CudaWeight& w = as_cuda(wt);
    if (n <= cuda::kGemvMaxTokens) {
      check_launch(cuda::launch_gemv(w.ref(), x, n, out, stream_), "matmul (gemv)");
      return;
    }
    // n > 8: dequantize the weight tile by tile into fp32 and multiply with cuBLAS.
    if (w.dtype == DType::kF32 && w.n_scales == 0) {
      gemm(static_cast<const float*>(w.data), w.rows, 0, x, n, w, out);
      return;
    }
    const int64_t tile = std::clamp<int64_t>(kScratchFloats / std::max<int64_t>(w.cols, 1), 1, w.rows);
    if (!reserve(&scratch_, &scratch_bytes_, static_cast<size_t>(tile * w.cols) * sizeof(float),
                 "matmul scratch"))
      return;
    for (int64_t r0 = 0; r0 < w.rows && error_.ok(); r0 += tile) {
      const int64_t nr = std::min(tile, w.rows - r0);
      float* s = static_cast<float*>(scratch_);
      if (check_launch(cuda::launch_dequant_rows(w.ref(), r0, nr, s, stream_), "matmul (dequantize)"))
        gemm(s, nr, r0, x, n, w, out);
    }
  }

  void rope(float* x, int n, int n_heads, int head_dim, int pos0, float theta, float scale) override {
    if (!error_.ok() || n <= 0) return;
    const int half = head_dim / 2;
    if (head_dim % 2 != 0 || half > cuda::kRopeMaxHalf) {
      fail(unsupported(
          fmt::format("rope: head_dim {} (must be even and <= {})", head_dim, 2 * cuda::kRopeMaxHalf)));
      return;
    }
    // The CPU reference's frequencies, bit for bit: inv_freq = 1 / theta^(2i/hd) / scale in fp32.
    float inv_freq[cuda::kRopeMaxHalf];
    for (int i = 0; i < half; ++i)
      inv_freq[i] =
          (1.0f / std::pow(theta, static_cast<float>(2 * i) / static_cast<float>(head_dim))) / scale;
    check_launch(cuda::launch_rope(x, n, n_heads, head_dim, pos0, inv_freq, stream_), "rope");
  }

  void kv_write(const float* k, const float* v, int n, int pos0, int kv_width,
                const KvLayer& cache) override {
    if (!error_.ok() || n <= 0) return;
    if (cache.dtype != DType::kF32 && cache.dtype != DType::kBF16) {
      fail(
          unsupported(fmt::format("kv_write: cache type {}, expected F32 or BF16", dtype_name(cache.dtype))));
      return;
    }
    check_launch(cuda::launch_kv_write(k, v, n, pos0, kv_width, cache.k, cache.v, cache.capacity,
                                       cache.dtype == DType::kBF16, stream_),
                 "kv_write");
  }

  void attention(const float* q, const KvLayer& cache, const AttentionParams& p, float* out) override {
    if (!error_.ok() || p.n_tokens <= 0) return;
    if (cache.dtype != DType::kF32 && cache.dtype != DType::kBF16) {
      fail(unsupported(
          fmt::format("attention: cache type {}, expected F32 or BF16", dtype_name(cache.dtype))));
      return;
    }
    cuda::AttentionArgs a;
    a.q = q;
    a.k = cache.k;
    a.v = cache.v;
    a.out = out;
    a.kv_bf16 = cache.dtype == DType::kBF16;
    a.capacity = cache.capacity;
    a.n_tokens = p.n_tokens;
    a.pos0 = p.pos0;
    a.n_heads = p.n_heads;
    a.n_kv_heads = p.n_kv_heads;
    a.head_dim = p.head_dim;
    a.scale = p.scale;
    a.window = p.window;
    a.kv_start = p.kv_start;
    check_launch(cuda::launch_attention(a, stream_), "attention");
  }

  void gelu_gate(const float* g, const float* u, int64_t n, float* out) override {
    if (!error_.ok() || n <= 0) return;
    check_launch(cuda::launch_gelu_gate(g, u, n, out, stream_), "gelu_gate");
  }

  void add(const float* a, const float* b, int64_t n, float* out) override {
    if (!error_.ok() || n <= 0) return;
    check_launch(cuda::launch_add(a, b, n, out, stream_), "add");
  }

 private:
  CudaBackend() = default;

  cudaStream_t stream() const { return static_cast<cudaStream_t>(stream_); }

  void fail(Status s) {
    if (error_.ok()) error_ = std::move(s);
  }
  bool check(cudaError_t e, const char* what) {
    if (e == cudaSuccess) return true;
    fail(internal_error(fmt::format("CUDA backend: {}: {}", what, cuda_error_text(e))));
    return false;
  }
  bool check_launch(int code, const char* op) {
    if (code == 0) return true;
    const auto e = static_cast<cudaError_t>(code);
    fail(e == cudaErrorInvalidValue
             ? invalid_argument(fmt::format("CUDA backend: {}: arguments rejected by the launcher ({})", op,
                                            cuda_error_text(e)))
             : internal_error(fmt::format("CUDA backend: {} launch: {}", op, cuda_error_text(e))));
    return false;
  }

  // *buf holds at least `bytes` (grown, never shrunk; cudaFree synchronizes the device first).
  bool reserve(void** buf, size_t* have, size_t bytes, const char* what) {
    if (bytes <= *have) return true;
    if (*buf) {
      if (!check(cudaFree(*buf), what)) return false;
      *buf = nullptr;
      *have = 0;
    }
    cudaError_t e = cudaMalloc(buf, bytes);
    if (e != cudaSuccess) {
      (void)cudaGetLastError();
      *buf = nullptr;
      fail(out_of_memory(
          fmt::format("CUDA backend: {}: cannot allocate {} bytes: {}", what, bytes, cuda_error_text(e))));
      return false;
    }
    *have = bytes;
    return true;
  }

  Status copy_to_device(const void* src, size_t bytes, void** dst, const std::string& what) {
    cudaError_t e = cudaMalloc(dst, std::max<size_t>(bytes, 1));
    if (e != cudaSuccess) {
      (void)cudaGetLastError();
      *dst = nullptr;
      return out_of_memory(
          fmt::format("CUDA backend: tensor {}: cannot allocate {} bytes of device memory: {}", what, bytes,
                      cuda_error_text(e)));
    }
    if (bytes > 0 && (e = cudaMemcpy(*dst, src, bytes, cudaMemcpyHostToDevice)) != cudaSuccess)
      return internal_error(
          fmt::format("CUDA backend: tensor {}: upload of {} bytes: {}", what, bytes, cuda_error_text(e)));
    return ok_status();
  }

  // out[:, r0 : r0 + nr] (row-major out [n, w.rows]) = x [n, cols] . a^T, a = rows r0.. of the
  // weight as fp32 [nr, cols]. In cuBLAS's column-major terms: C (nr x n, ldc = w.rows) =
  // A^T (A: cols x nr, lda = cols) * B (cols x n, ldb = cols).
  void gemm(const float* a, int64_t nr, int64_t r0, const float* x, int n, const CudaWeight& w, float* out) {
    const float alpha = 1.0f, beta = 0.0f;
    const cublasStatus_t s =
        cublasGemmEx(static_cast<cublasHandle_t>(cublas_), CUBLAS_OP_T, CUBLAS_OP_N, static_cast<int>(nr), n,
                     static_cast<int>(w.cols), &alpha, a, CUDA_R_32F, static_cast<int>(w.cols), x, CUDA_R_32F,
                     static_cast<int>(w.cols), &beta, out + r0, CUDA_R_32F, static_cast<int>(w.rows),
                     CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
    if (s != CUBLAS_STATUS_SUCCESS)
      fail(internal_error(fmt::format("CUDA backend: cublasGemmEx ({} x {} x {}, weight {}): {}", nr, n,
                                      w.cols, w.name, cublasGetStatusString(s))));
  }

  std::string device_name_;
  void* stream_ = nullptr;   // cudaStream_t
  void* cublas_ = nullptr;   // cublasHandle_t
  void* scratch_ = nullptr;  // [tile, cols] fp32 dequantized weight rows (cuBLAS path)
  size_t scratch_bytes_ = 0;
  void* ids_ = nullptr;  // [n] int32 token ids for embed
  size_t ids_bytes_ = 0;
  Status error_;  // first failure; sticky
};

}  // namespace

Result<std::unique_ptr<Backend>> make_cuda_backend(const BackendOptions& options) {
  (void)options;  // one device (0), one stream; nothing to configure yet
  GEMMA3_ASSIGN_OR_RETURN(std::unique_ptr<CudaBackend> b, CudaBackend::create());
  return std::unique_ptr<Backend>(std::move(b));
}

bool cuda_backend_available() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    (void)cudaGetLastError();
    return false;
  }
  return count > 0;
}

Status cuda_backend_status(Backend& backend) {
  if (auto* b = dynamic_cast<CudaBackend*>(&backend)) return b->status();
  return ok_status();
}

}  // namespace gemma3
