// The CUDA backend: weights resident on the GPU as their checkpoint bytes (Q4_0/Q8_0 repacked
// for 16-byte loads: upload_planar), fp32
// activations, one stream, every op a kernel launch (no host round trip inside an op).
// Kernels and their launchers live in kernels/; this file is the host side: memory, cuBLAS,
// argument checks, and error bookkeeping.
//
// Errors: the op interface returns void, so the first CUDA/cuBLAS error (or bad argument) is
// kept as a sticky Status; later ops become no-ops, to_host poisons its output with NaN bytes,
// and cuda_backend_status() synchronizes and returns it. Nothing here aborts.
#include <cublas_v2.h>
#include <cuda.h>  // the driver API's types (virtual memory); its functions via the runtime
#include <cuda_runtime_api.h>
#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <map>
#include <random>
#include <unordered_set>
#include <utility>
#include <vector>

#include "backend/backend.h"
#include "backend/cuda/cuda_module.h"
#include "backend/sampler.h"
#include "core/quant.h"
#include "launch.h"
#include "vision.h"

namespace gemma3 {
namespace {

std::string cuda_error_text(cudaError_t e) {
  return fmt::format("{} ({})", cudaGetErrorName(e), cudaGetErrorString(e));
}

// A recorded step: an instantiated CUDA graph.
class CudaRecordedStep final : public RecordedStep {
 public:
  explicit CudaRecordedStep(cudaGraphExec_t exec) : exec(exec) {}
  ~CudaRecordedStep() override { (void)cudaGraphExecDestroy(exec); }
  cudaGraphExec_t exec;
};

class CudaWeight final : public BackendWeight {
 public:
  ~CudaWeight() override {
    // Errors cannot be reported from a destructor; a failed free only leaks device memory.
    if (data) (void)cudaFree(data);
    if (scales) (void)cudaFree(scales);
    if (vec) (void)cudaFree(vec);
  }
  std::string name;
  void* data = nullptr;  // [rows, row_bytes] blocks as stored in the checkpoint (Q4_0/Q8_0: planar)
  uint64_t row_bytes = 0;
  float* scales = nullptr;  // fp8 only: [n_scales] row scales (1 = per tensor)
  int64_t n_scales = 0;
  float* vec = nullptr;  // vectors (rows == 1) only: [cols] dequantized fp32, read by rmsnorm
  // fp8-narrowed matmul weights (upload_matmul_weight) only: the stored rows in the caller's
  // view (which outlives the weight, backend.h), [rows, lookup_row_bytes] of lookup_dtype.
  // embed copies the rows it needs from here, so lookups return the stored values.
  const uint8_t* lookup_rows = nullptr;
  uint64_t lookup_row_bytes = 0;
  DType lookup_dtype = DType::kF32;
  // Stacked weights (upload_stacked) only: where each part's rows end (cumulative).
  std::vector<int64_t> part_end;

  // Rows r0 .. r0 + count - 1 as a matrix of their own (rows are independent in every layout).
  cuda::WeightRef rows_ref(int64_t r0, int64_t count) const {
    cuda::WeightRef r = ref();
    r.data = static_cast<const uint8_t*>(data) + static_cast<uint64_t>(r0) * row_bytes;
    r.rows = count;
    if (n_scales > 1) r.row_scale = scales + r0, r.n_scales = count;
    return r;
  }

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

  static Result<std::unique_ptr<CudaBackend>> create(const BackendOptions& options) {
    int count = 0;
    cudaError_t e = cudaGetDeviceCount(&count);
    if (e != cudaSuccess)
      return unsupported("CUDA backend: no usable CUDA driver/device: " + cuda_error_text(e));
    if (count == 0) return unsupported("CUDA backend: no CUDA device is visible");
    auto b = std::unique_ptr<CudaBackend>(new CudaBackend());
    b->fp8_weights_ = options.fp8_weights;
    // GEMMA3_CUDA_SYNC=1 (tools/gpu-check.sh): synchronize after every op and name the op whose
    // kernel faulted, instead of the next synchronization reporting it.
    const char* sync = std::getenv("GEMMA3_CUDA_SYNC");
    b->sync_each_op_ = sync && *sync && std::strcmp(sync, "0") != 0;
    // GEMMA3_CUDA_GRAPHS=0: run every step's ops one by one (no recorded steps), to compare.
    const char* graphs = std::getenv("GEMMA3_CUDA_GRAPHS");
    b->record_steps_ = !(graphs && std::strcmp(graphs, "0") == 0);
    // GEMMA3_CUDA_FP32_GEMM=1: prefill GEMMs in fp32 (no tensor cores), to compare.
    const char* fp32 = std::getenv("GEMMA3_CUDA_FP32_GEMM");
    b->fp32_gemm_ = fp32 && *fp32 && std::strcmp(fp32, "0") != 0;
    // GEMMA3_CUDA_FLASH=0: prefill attention on the fp32 kernel instead of tensor cores, to compare.
    const char* flash = std::getenv("GEMMA3_CUDA_FLASH");
    b->flash_attention_ = !(flash && std::strcmp(flash, "0") == 0);
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
    b->sm_count_ = prop.multiProcessorCount;
    b->device_name_ = fmt::format("{}, sm_{}{}, {:.0f} GiB", prop.name, prop.major, prop.minor,
                                  static_cast<double>(prop.totalGlobalMem) / (1 << 30));
    cudaStream_t stream = nullptr;
    if ((e = cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking)) != cudaSuccess)
      return internal_error("CUDA backend: cudaStreamCreate: " + cuda_error_text(e));
    b->stream_ = stream;
    b->init_vmm();
    // The step position recorded ops read (set_step_position), one int for the backend's life.
    GEMMA3_TRY(b->device_malloc(reinterpret_cast<void**>(&b->step_pos_), sizeof(int), "step position"));
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
    for (const auto& [at, handle] : vmm_mapped_) {  // a KvCache outliving its backend: none should
      (void)vmm_.unmap(at, vmm_granularity_);
      (void)vmm_.release(handle);
    }
    if (scratch_) (void)cudaFree(scratch_);
    if (act16_) (void)cudaFree(act16_);
    if (ids_) (void)cudaFree(ids_);
    if (partials_) (void)cudaFree(partials_);
    for (void* p : retired_) (void)cudaFree(p);
    if (step_pos_) (void)cudaFree(step_pos_);
    if (sample_ws_) (void)cudaFree(sample_ws_);
    if (cublas_) (void)cublasDestroy(static_cast<cublasHandle_t>(cublas_));
    if (stream_) (void)cudaStreamDestroy(stream());
  }

  std::string name() const override {
    return fmt::format("cuda ({}{}{})", device_name_, fp8_weights_ ? ", fp8 weights" : "",
                       sync_each_op_ ? ", GEMMA3_CUDA_SYNC" : "");
  }

  // Synchronizes and returns the first error any call has hit.
  Status status() override {
    if (error_.ok() && stream_ && !recording_)
      check(cudaStreamSynchronize(stream()), "cudaStreamSynchronize");
    return error_;
  }

  // ---- memory ----

  // cudaMemGetInfo's free device memory (other processes and our own allocations included);
  // 0 if the query fails (the planner then skips its check).
  uint64_t free_bytes() override {
    size_t free = 0, total = 0;
    if (cudaMemGetInfo(&free, &total) != cudaSuccess) {
      (void)cudaGetLastError();
      return 0;
    }
    return free;
  }

  // Device-to-device copies of 256 MiB (far past the L2) on our stream, timed with events:
  // one warm-up, best of 5. 0 if the buffers cannot be had (the bench then prints no ratio).
  double copy_bandwidth() override {
    constexpr size_t kBytes = size_t{256} << 20;
    void *src = nullptr, *dst = nullptr;
    cudaEvent_t start = nullptr, end = nullptr;
    double best = 0;
    if (cudaMalloc(&src, kBytes) == cudaSuccess && cudaMalloc(&dst, kBytes) == cudaSuccess &&
        cudaEventCreate(&start) == cudaSuccess && cudaEventCreate(&end) == cudaSuccess &&
        cudaMemsetAsync(src, 1, kBytes, stream()) == cudaSuccess) {
      for (int rep = -1; rep < 5; ++rep) {
        float ms = 0;
        if (cudaEventRecord(start, stream()) != cudaSuccess ||
            cudaMemcpyAsync(dst, src, kBytes, cudaMemcpyDeviceToDevice, stream()) != cudaSuccess ||
            cudaEventRecord(end, stream()) != cudaSuccess || cudaEventSynchronize(end) != cudaSuccess ||
            cudaEventElapsedTime(&ms, start, end) != cudaSuccess) {
          best = 0;
          break;
        }
        if (rep >= 0 && ms > 0) best = std::max(best, 2.0 * kBytes / (ms * 1e-3));
      }
    }
    if (start) cudaEventDestroy(start);
    if (end) cudaEventDestroy(end);
    if (src) cudaFree(src);
    if (dst) cudaFree(dst);
    (void)cudaGetLastError();  // a failure here is not the model's error
    return best;
  }

  double gemm_rate(int64_t m, int64_t n, int64_t k) override {
    if (m <= 0 || n <= 0 || k <= 0 || m > INT32_MAX || n > INT32_MAX || k > INT32_MAX || recording_) return 0;
    const size_t a_bytes = static_cast<size_t>(m * k) * 2, b_bytes = static_cast<size_t>(n * k) * 2,
                 c_bytes = static_cast<size_t>(m * n) * 4;
    void *a = nullptr, *b = nullptr, *c = nullptr;
    cudaEvent_t start = nullptr, end = nullptr;
    double best = 0;
    const float alpha = 1.0f, beta = 0.0f;
    // Operands of bf16 0x3C3C (~0.0115): nonzero, so the tensor cores draw their real power.
    if (cudaMalloc(&a, a_bytes) == cudaSuccess && cudaMalloc(&b, b_bytes) == cudaSuccess &&
        cudaMalloc(&c, c_bytes) == cudaSuccess && cudaEventCreate(&start) == cudaSuccess &&
        cudaEventCreate(&end) == cudaSuccess && cudaMemsetAsync(a, 0x3C, a_bytes, stream()) == cudaSuccess &&
        cudaMemsetAsync(b, 0x3C, b_bytes, stream()) == cudaSuccess) {
      for (int rep = -1; rep < 5; ++rep) {
        float ms = 0;
        // The matmul's own call (gemm above): C^T (n x m) = B^T-major weights x activations.
        if (cudaEventRecord(start, stream()) != cudaSuccess ||
            cublasGemmEx(static_cast<cublasHandle_t>(cublas_), CUBLAS_OP_T, CUBLAS_OP_N, static_cast<int>(n),
                         static_cast<int>(m), static_cast<int>(k), &alpha, b, CUDA_R_16BF,
                         static_cast<int>(k), a, CUDA_R_16BF, static_cast<int>(k), &beta, c, CUDA_R_32F,
                         static_cast<int>(n), CUBLAS_COMPUTE_32F,
                         CUBLAS_GEMM_DEFAULT) != CUBLAS_STATUS_SUCCESS ||
            cudaEventRecord(end, stream()) != cudaSuccess || cudaEventSynchronize(end) != cudaSuccess ||
            cudaEventElapsedTime(&ms, start, end) != cudaSuccess) {
          best = 0;
          break;
        }
        if (rep >= 0 && ms > 0) best = std::max(best, 2.0 * double(m) * double(n) * double(k) / (ms * 1e-3));
      }
    }
    if (start) cudaEventDestroy(start);
    if (end) cudaEventDestroy(end);
    if (a) cudaFree(a);
    if (b) cudaFree(b);
    if (c) cudaFree(c);
    (void)cudaGetLastError();  // a failure here is not the model's error
    return best;
  }

  Result<void*> allocate(size_t bytes) override {
    GEMMA3_TRY(error_);
    if (recording_) return internal_error("CUDA backend: allocate while recording a step");
    void* p = nullptr;
    GEMMA3_TRY(device_malloc(&p, bytes, "allocation"));
    if (!check(cudaMemsetAsync(p, 0, bytes, stream()), "cudaMemsetAsync") ||
        !check(cudaStreamSynchronize(stream()), "cudaStreamSynchronize")) {
      (void)cudaFree(p);
      return error_;
    }
    return p;
  }

  void release(void* ptr) override {
    if (ptr && !unrecordable("release")) check(cudaFree(ptr), "cudaFree");
  }

  void to_host(const void* src, void* dst, size_t bytes) override {
    if (error_.ok() && !unrecordable("to_host") &&
        check(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, stream()), "to_host") &&
        check(cudaStreamSynchronize(stream()), "to_host (synchronize)"))
      return;
    if (bytes > 0)
      std::memset(dst, 0xFF, bytes);  // NaN in every float: a failed backend never yields plausible numbers
  }

  void from_host(const void* src, void* dst, size_t bytes) override {
    if (!error_.ok() || unrecordable("from_host")) return;
    if (check(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, stream()), "from_host"))
      check(cudaStreamSynchronize(stream()), "from_host (synchronize)");
  }

  void copy(const void* src, void* dst, size_t bytes) override {
    if (!error_.ok() || bytes == 0 || unrecordable("copy")) return;
    check(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, stream()), "copy");
  }

  // ---- memory mapped on demand (an Engine's paged KV, backend.h) ----
  //
  // The driver's virtual memory management: reserve() takes an address range with nothing
  // behind it (cuMemAddressReserve); map() puts a physical allocation of one granule (2 MiB on
  // current GPUs) behind each granule of the range (cuMemCreate + cuMemMap + cuMemSetAccess)
  // and zeroes it; unmap() gives them back. Addresses never move, so kernels and recorded steps
  // (CUDA graphs) keep reading one contiguous range per layer. The driver functions come
  // through the runtime (cudaGetDriverEntryPointByVersion), so the library does not link
  // libcuda; map_granularity() is 0 (everything allocated whole, as before) when any is missing
  // or GEMMA3_CUDA_VMM=0.
  size_t map_granularity() override { return vmm_granularity_; }

  Result<void*> reserve(size_t bytes) override {
    if (vmm_granularity_ == 0) return allocate(bytes);
    GEMMA3_TRY(error_);
    CUdeviceptr p = 0;
    const CUresult r = vmm_.reserve(&p, round_to_granule(bytes), 0, 0, 0);
    if (r != CUDA_SUCCESS)
      return out_of_memory(fmt::format("CUDA backend: cannot reserve {} bytes of device address space: {}",
                                       bytes, cu_error_text(r)));
    return reinterpret_cast<void*>(p);
  }

  void unreserve(void* base, size_t bytes) override {
    if (vmm_granularity_ == 0) return release(base);
    if (!base) return;
    unmap(base, 0, round_to_granule(bytes));
    check_cu(vmm_.free(reinterpret_cast<CUdeviceptr>(base), round_to_granule(bytes)), "cuMemAddressFree");
  }

  Status map(void* base, size_t offset, size_t bytes) override {
    if (vmm_granularity_ == 0 || bytes == 0) return ok_status();
    GEMMA3_TRY(error_);
    if (recording_) return internal_error("CUDA backend: map while recording a step");
    const CUdeviceptr from = reinterpret_cast<CUdeviceptr>(base) + offset;
    if (from % vmm_granularity_ != 0 || bytes % vmm_granularity_ != 0)
      return internal_error(
          fmt::format("CUDA backend: map of {} bytes at offset {}: not whole granules of {} bytes", bytes,
                      offset, vmm_granularity_));
    CUmemAllocationProp prop = device_allocation();
    CUmemAccessDesc access{};
    access.location = prop.location;
    access.flags = CU_MEM_ACCESS_FLAGS_PROT_READWRITE;
    for (CUdeviceptr at = from; at < from + bytes; at += vmm_granularity_) {
      if (vmm_mapped_.count(at)) continue;
      CUmemGenericAllocationHandle h = 0;
      CUresult r = vmm_.create(&h, vmm_granularity_, &prop, 0);
      const char* call = "cuMemCreate";
      if (r == CUDA_SUCCESS && (r = vmm_.map(at, vmm_granularity_, 0, h, 0)) != CUDA_SUCCESS)
        call = "cuMemMap";
      if (r == CUDA_SUCCESS && (r = vmm_.set_access(at, vmm_granularity_, &access, 1)) != CUDA_SUCCESS) {
        call = "cuMemSetAccess";
        (void)vmm_.unmap(at, vmm_granularity_);
      }
      if (r != CUDA_SUCCESS) {
        if (h) (void)vmm_.release(h);
        unmap(base, offset, static_cast<size_t>(at - from));  // this call's granules so far
        return out_of_memory(fmt::format(
            "CUDA backend: cannot map {} bytes of device memory ({}: {}), {} bytes ({:.1f} MiB) free", bytes,
            call, cu_error_text(r), free_bytes(), static_cast<double>(free_bytes()) / (1 << 20)));
      }
      vmm_mapped_[at] = h;
    }
    if (!check(cudaMemsetAsync(reinterpret_cast<void*>(from), 0, bytes, stream()), "cudaMemsetAsync (map)"))
      return error_;
    return ok_status();
  }

  void unmap(void* base, size_t offset, size_t bytes) override {
    if (vmm_granularity_ == 0 || bytes == 0 || unrecordable("unmap")) return;
    const CUdeviceptr from = reinterpret_cast<CUdeviceptr>(base) + offset;
    auto it = vmm_mapped_.lower_bound(from);
    if (it == vmm_mapped_.end() || it->first >= from + bytes) return;  // nothing mapped there
    // Work queued on the stream may still read these pages (the driver does not wait for it).
    if (!check(cudaStreamSynchronize(stream()), "cudaStreamSynchronize (unmap)")) return;
    while (it != vmm_mapped_.end() && it->first < from + bytes) {
      check_cu(vmm_.unmap(it->first, vmm_granularity_), "cuMemUnmap");
      check_cu(vmm_.release(it->second), "cuMemRelease");
      it = vmm_mapped_.erase(it);
    }
  }

  Result<std::unique_ptr<BackendWeight>> upload(const TensorView& t) override {
    GEMMA3_TRY(error_);
    auto w = std::make_unique<CudaWeight>();
    GEMMA3_ASSIGN_OR_RETURN(w->row_bytes, weight_row_bytes(t));
    w->name = t.name;
    w->dtype = t.dtype;
    w->rows = t.rows();
    w->cols = t.cols();
    if (!t.row_scale.empty() && t.row_scale.size() != 1 &&
        static_cast<int64_t>(t.row_scale.size()) != w->rows)
      return invalid_file(
          fmt::format("tensor {}: {} row scales for {} rows", t.name, t.row_scale.size(), w->rows));
    if (planar(t.dtype)) {
      GEMMA3_TRY(upload_planar(t, w.get()));
    } else {
      GEMMA3_TRY(copy_to_device(t.data, t.nbytes, &w->data, t.name));
    }
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

  // Whether upload_matmul_weight narrows t to fp8 (--weights fp8 on a plain matrix).
  bool narrows_to_fp8(const TensorView& t) const {
    return fp8_weights_ && t.rows() > 1 && t.row_scale.empty() &&
           (t.dtype == DType::kF32 || t.dtype == DType::kF16 || t.dtype == DType::kBF16);
  }
  static bool planar(DType t) { return t == DType::kQ4_0 || t == DType::kQ8_0; }
  static uint64_t planar_row_bytes(DType t, int64_t cols) {
    return t == DType::kQ4_0 ? blocks::Q4_0Planar::row_bytes(cols) : blocks::Q8_0Planar::row_bytes(cols);
  }
  // The device layout upload_matmul_weight gives t (fp8 rows, planar Q4_0/Q8_0, or as stored),
  // without its data.
  Result<cuda::WeightRef> uploaded_layout(const TensorView& t) const {
    cuda::WeightRef r;
    r.rows = t.rows();
    r.cols = t.cols();
    r.dtype = t.dtype;
    if (narrows_to_fp8(t)) {
      r.dtype = DType::kF8E4M3;
      r.row_bytes = static_cast<uint64_t>(r.cols);
    } else if (planar(t.dtype)) {
      r.row_bytes = planar_row_bytes(t.dtype, r.cols);
    } else {
      GEMMA3_ASSIGN_OR_RETURN(r.row_bytes, weight_row_bytes(t));
    }
    return r;
  }

  // --weights fp8: an F32/F16/BF16 matrix becomes fp8 e4m3 + row scales for matmul (the LM
  // head included), while embed keeps reading the stored rows from the caller's view. Anything
  // else, or without the option, is upload().
  Result<std::unique_ptr<BackendWeight>> upload_matmul_weight(const TensorView& t) override {
    if (!narrows_to_fp8(t)) return upload(t);
    GEMMA3_TRY(error_);
    auto w = std::make_unique<CudaWeight>();
    GEMMA3_ASSIGN_OR_RETURN(w->lookup_row_bytes, weight_row_bytes(t));
    w->name = t.name;
    w->dtype = t.dtype;
    w->rows = t.rows();
    w->cols = t.cols();
    w->row_bytes = w->lookup_row_bytes;
    GEMMA3_TRY(upload_fp8(t, w.get()));
    w->lookup_rows = static_cast<const uint8_t*>(t.data);
    w->lookup_dtype = t.dtype;
    return std::unique_ptr<BackendWeight>(std::move(w));
  }

  // ---- ops ----

  void embed(const BackendWeight& table, const int32_t* ids, int n, float scale, float* out) override {
    if (!error_.ok() || n <= 0 || unrecordable("embed")) return;  // copies the ids first
    const CudaWeight& w = as_cuda(table);
    for (int t = 0; t < n; ++t) {
      if (ids[t] < 0 || ids[t] >= w.rows) {
        fail(invalid_argument(
            fmt::format("embed: token id {} is outside [0, {}) of {}", ids[t], w.rows, w.name)));
        return;
      }
    }
    if (w.lookup_rows) {
      embed_stored_rows(w, ids, n, scale, out);
      return;
    }
    if (!reserve(&ids_, &ids_bytes_, static_cast<size_t>(n) * sizeof(int32_t), "embed ids")) return;
    // From pageable memory the copy is staged before the call returns, so `ids` may go away.
    if (!check(cudaMemcpyAsync(ids_, ids, n * sizeof(int32_t), cudaMemcpyHostToDevice, stream()),
               "embed ids copy"))
      return;
    check_launch(cuda::launch_embed(w.ref(), static_cast<const int32_t*>(ids_), n, scale, out, stream_),
                 "embed");
  }

  // embed on an fp8-narrowed weight: the n stored rows are gathered on the host from the
  // caller's view and sent with ids 0..n-1 in one copy, [n int32, padded to 256 bytes][n rows],
  // then looked up as a table of n rows. n * row bytes per call (5 KiB per token for a bf16
  // 2560-wide embedding): no device copy of the stored table.
  void embed_stored_rows(const CudaWeight& w, const int32_t* ids, int n, float scale, float* out) {
    const size_t id_bytes = (static_cast<size_t>(n) * sizeof(int32_t) + 255) / 256 * 256;
    const size_t bytes = id_bytes + static_cast<size_t>(n) * w.lookup_row_bytes;
    if (!reserve(&ids_, &ids_bytes_, bytes, "embed rows")) return;
    lookup_staging_.resize(bytes);
    auto* local = reinterpret_cast<int32_t*>(lookup_staging_.data());
    for (int t = 0; t < n; ++t) {
      local[t] = t;
      std::memcpy(lookup_staging_.data() + id_bytes + static_cast<size_t>(t) * w.lookup_row_bytes,
                  w.lookup_rows + static_cast<uint64_t>(ids[t]) * w.lookup_row_bytes, w.lookup_row_bytes);
    }
    // Pageable: staged before the call returns, and lookup_staging_ lives on anyway.
    if (!check(cudaMemcpyAsync(ids_, lookup_staging_.data(), bytes, cudaMemcpyHostToDevice, stream()),
               "embed rows copy"))
      return;
    cuda::WeightRef table;
    table.data = static_cast<const uint8_t*>(ids_) + id_bytes;
    table.rows = n;
    table.cols = w.cols;
    table.row_bytes = w.lookup_row_bytes;
    table.dtype = w.lookup_dtype;
    check_launch(cuda::launch_embed(table, static_cast<const int32_t*>(ids_), n, scale, out, stream_),
                 "embed (stored rows)");
  }

  void rmsnorm(const float* x, const BackendWeight& wt, int64_t rows, int dim, float eps,
               float* out) override {
    if (!error_.ok() || rows <= 0) return;
    const float* w = vector_of(wt, dim, "rmsnorm");
    if (!w) return;
    check_launch(cuda::launch_rmsnorm(x, w, rows, dim, eps, out, stream_), "rmsnorm");
  }

  void matmul(const float* x, int n, const BackendWeight& wt, float* out) override {
    const CudaWeight& w = as_cuda(wt);
    if (!error_.ok() || n <= 0) return;
    matmul_ref(w.ref(), w.name, x, n, out);
  }

  // Stacked weights (upload_stacked): q|k|v or gate|up of one layer, one type, rows in order.
  // Only types and widths the vectorized GEMV reads are stacked (the point is one launch that
  // keeps more bytes in flight); the rest stay separate matrices.
  Result<std::unique_ptr<BackendWeight>> upload_stacked(
      const std::vector<const TensorView*>& parts) override {
    GEMMA3_TRY(error_);
    std::unique_ptr<BackendWeight> none;
    if (parts.size() < 2 || parts.size() > static_cast<size_t>(cuda::kGemvMaxParts)) return none;
    const TensorView& first = *parts[0];
    std::vector<int64_t> ends;
    uint64_t bytes = 0;
    for (const TensorView* p : parts) {
      if (p->shape.size() != 2 || p->dtype != first.dtype || p->cols() != first.cols()) return none;
      ends.push_back((ends.empty() ? 0 : ends.back()) + p->rows());
      bytes += p->nbytes;
    }
    const bool scaled =
        std::any_of(parts.begin(), parts.end(), [](auto* p) { return !p->row_scale.empty(); });
    // The stack's shape alone (no data yet) gives the layout upload_matmul_weight will give it.
    TensorView shape{first.name, first.dtype, {ends.back(), first.cols()}, nullptr, bytes, {}};
    if (scaled) shape.row_scale.assign(1, 1.0f);
    GEMMA3_ASSIGN_OR_RETURN(const cuda::WeightRef probe, uploaded_layout(shape));
    if (!cuda::gemv_vectorized(probe)) return none;
    std::vector<uint8_t> stacked;
    stacked.reserve(static_cast<size_t>(bytes));
    std::vector<float> scales;  // fp8 checkpoints: one per row (a part's single scale repeated)
    std::string name;
    for (const TensorView* p : parts) {
      const auto* b = static_cast<const uint8_t*>(p->data);
      stacked.insert(stacked.end(), b, b + p->nbytes);
      name += (name.empty() ? "" : "|") + p->name;
      if (!scaled) continue;
      const std::vector<float>& rs = p->row_scale;
      if (!rs.empty() && rs.size() != 1 && static_cast<int64_t>(rs.size()) != p->rows())
        return invalid_file(
            fmt::format("tensor {}: {} row scales for {} rows", p->name, rs.size(), p->rows()));
      for (int64_t r = 0; r < p->rows(); ++r)
        scales.push_back(rs.empty() ? 1.0f : rs.size() == 1 ? rs[0] : rs[r]);
    }
    TensorView t{name, first.dtype, shape.shape, stacked.data(), bytes, std::move(scales)};
    GEMMA3_ASSIGN_OR_RETURN(std::unique_ptr<BackendWeight> w, upload_matmul_weight(t));
    auto& cw = static_cast<CudaWeight&>(*w);
    cw.lookup_rows = nullptr;  // the staging buffer goes away; stacks are never looked up
    cw.part_end = std::move(ends);
    return w;
  }

  void matmul_parts(const float* x, int n, const BackendWeight& wt, float* const* outs) override {
    const CudaWeight& w = as_cuda(wt);
    if (!error_.ok() || n <= 0) return;
    if (!stacked(w, "matmul_parts")) return;
    const int parts = static_cast<int>(w.part_end.size());
    if (n <= cuda::kGemvMaxTokens) {
      cuda::GemvOut o;
      o.parts = parts;
      for (int j = 0; j < parts; ++j) o.out[j] = outs[j], o.end[j] = w.part_end[j];
      check_launch(cuda::launch_gemv(w.ref(), x, n, o, stream_, sm_count_), "matmul_parts (gemv)");
      return;
    }
    const uint16_t* x16 = nullptr;  // the parts share the rounded activations
    if (bf16_gemm(w.ref()) && !unrecordable("matmul_parts (cuBLAS)") && !(x16 = to_bf16(x, n, w.cols)))
      return;
    for (int j = 0; j < parts && error_.ok(); ++j) {
      const int64_t r0 = j > 0 ? w.part_end[j - 1] : 0;
      matmul_ref(w.rows_ref(r0, w.part_end[j] - r0), w.name, x, n, outs[j], x16);
    }
  }

  void matmul_geglu(const float* x, int n, const BackendWeight& wt, float* up, float* out) override {
    const CudaWeight& w = as_cuda(wt);
    if (!error_.ok() || n <= 0) return;
    if (!stacked(w, "matmul_geglu")) return;
    const int64_t half = w.part_end[0];
    if (w.part_end.size() != 2 || 2 * half != w.rows) {
      fail(invalid_argument(fmt::format("matmul_geglu: {} is not two stacked parts of equal rows", w.name)));
      return;
    }
    if (n <= cuda::kGemvMaxTokens && reinterpret_cast<uintptr_t>(x) % 16 == 0) {
      cuda::GemvOut o;  // vectorized (upload_stacked made sure): gelu(gate) * up in the epilogue
      o.parts = 2;
      o.out[0] = out;
      o.out[1] = up;
      o.end[0] = half;
      o.end[1] = w.rows;
      o.geglu = true;
      check_launch(cuda::launch_gemv(w.ref(), x, n, o, stream_, sm_count_), "matmul_geglu (gemv)");
      return;
    }
    const uint16_t* x16 = nullptr;  // gate and up share the rounded activations
    if (n > cuda::kGemvMaxTokens && bf16_gemm(w.ref()) && !unrecordable("matmul_geglu (cuBLAS)") &&
        !(x16 = to_bf16(x, n, w.cols)))
      return;
    matmul_ref(w.rows_ref(0, half), w.name, x, n, out, x16);
    matmul_ref(w.rows_ref(half, half), w.name, x, n, up, x16);
    gelu_gate(out, up, int64_t{n} * half, out);
  }

  // A stacked weight, or false after recording an error.
  bool stacked(const CudaWeight& w, const char* op) {
    if (!w.part_end.empty()) return true;
    fail(invalid_argument(fmt::format("{}: {} is not a stacked weight (upload_stacked)", op, w.name)));
    return false;
  }

  // out [n, r.rows] = x [n, r.cols] r^T: the GEMV for n <= 8, else a cuBLAS GEMM (docs/cuda.md,
  // "Prefill GEMM"): bf16 operands on tensor cores with fp32 accumulation — the activations
  // rounded to bf16 once per call (x16, when the caller already has them), a BF16 weight read in
  // place, any other type dequantized into bf16 tiles — or, for an F32 weight (and with
  // GEMMA3_CUDA_FP32_GEMM=1 for every type), fp32 operands and fp32 tiles.
  void matmul_ref(const cuda::WeightRef& r, const std::string& name, const float* x, int n, float* out,
                  const uint16_t* x16 = nullptr) {
    if (r.rows == 0) return;  // no outputs (and the tile clamp needs rows >= 1)
    if (n <= cuda::kGemvMaxTokens) {
      check_launch(cuda::launch_gemv(r, x, n, out, stream_, sm_count_), "matmul (gemv)");
      return;
    }
    if (unrecordable("matmul (cuBLAS)")) return;
    const bool bf16 = bf16_gemm(r);
    if (bf16 && !x16 && !(x16 = to_bf16(x, n, r.cols))) return;
    const cudaDataType_t type = bf16 ? CUDA_R_16BF : CUDA_R_32F;
    const void* xop = bf16 ? static_cast<const void*>(x16) : x;
    const int64_t elem = bf16 ? 2 : 4;
    // A weight already of the operand type is read in place; any other is dequantized into tiles
    // of the 64 MiB scratch (twice the rows in bf16).
    if (r.n_scales == 0 && r.dtype == (bf16 ? DType::kBF16 : DType::kF32) &&
        r.row_bytes == static_cast<uint64_t>(r.cols * elem)) {
      gemm(r.data, type, r.rows, 0, xop, n, r, name, out);
      return;
    }
    const int64_t tile =
        std::clamp<int64_t>(4 * kScratchFloats / elem / std::max<int64_t>(r.cols, 1), 1, r.rows);
    if (!reserve(&scratch_, &scratch_bytes_, static_cast<size_t>(tile * r.cols * elem), "matmul scratch"))
      return;
    for (int64_t r0 = 0; r0 < r.rows && error_.ok(); r0 += tile) {
      const int64_t nr = std::min(tile, r.rows - r0);
      const int rc =
          bf16 ? cuda::launch_dequant_rows_bf16(r, r0, nr, static_cast<uint16_t*>(scratch_), stream_)
               : cuda::launch_dequant_rows(r, r0, nr, static_cast<float*>(scratch_), stream_);
      if (check_launch(rc, "matmul (dequantize)")) gemm(scratch_, type, nr, r0, xop, n, r, name, out);
    }
  }

  // Whether matmul_ref multiplies this weight in bf16 for n > 8 tokens.
  bool bf16_gemm(const cuda::WeightRef& r) const {
    return !fp32_gemm_ && !(r.dtype == DType::kF32 && r.n_scales == 0);
  }

  // x [n, cols] rounded to bf16 in the activation scratch (valid until the next call), or
  // nullptr after recording an error.
  const uint16_t* to_bf16(const float* x, int n, int64_t cols) {
    const int64_t count = int64_t{n} * cols;
    if (!reserve(&act16_, &act16_bytes_, static_cast<size_t>(count) * sizeof(uint16_t),
                 "matmul bf16 activations"))
      return nullptr;
    auto* x16 = static_cast<uint16_t*>(act16_);
    if (!check_launch(cuda::launch_to_bf16(x, count, x16, stream_), "matmul (activations to bf16)"))
      return nullptr;
    return x16;
  }

  // The CPU reference's RoPE frequencies, bit for bit: inv_freq[i] = 1 / theta^(2i/hd) / scale
  // in fp32, for i < head_dim / 2; false after recording an error for a head_dim the kernels
  // cannot take.
  bool rope_frequencies(int head_dim, float theta, float scale, float* inv_freq) {
    const int half = head_dim / 2;
    if (head_dim % 2 != 0 || half < 1 || half > cuda::kRopeMaxHalf) {
      fail(unsupported(
          fmt::format("rope: head_dim {} (must be even and <= {})", head_dim, 2 * cuda::kRopeMaxHalf)));
      return false;
    }
    for (int i = 0; i < half; ++i)
      inv_freq[i] =
          (1.0f / std::pow(theta, static_cast<float>(2 * i) / static_cast<float>(head_dim))) / scale;
    return true;
  }

  void rope(float* x, int n, int n_heads, int head_dim, int pos0, float theta, float scale) override {
    if (!error_.ok() || n <= 0 || unrecordable("rope")) return;  // pos0 is a kernel argument
    float inv_freq[cuda::kRopeMaxHalf];
    if (!rope_frequencies(head_dim, theta, scale, inv_freq)) return;
    check_launch(cuda::launch_rope(x, n, n_heads, head_dim, pos0, inv_freq, stream_), "rope");
  }

  void kv_write(const float* k, const float* v, int n, int pos0, int kv_width,
                const KvLayer& cache) override {
    if (!error_.ok() || n <= 0 || unrecordable("kv_write")) return;  // pos0 is a kernel argument
    if (!kv_type_ok(cache.dtype, "kv_write")) return;
    check_launch(cuda::launch_kv_write(k, v, n, pos0, kv_width, cache.k, cache.v, cache.capacity, cache.dtype,
                                       stream_),
                 "kv_write");
  }

  void qk_norm_rope_kv_write(float* q, float* k, const float* v, const BackendWeight& q_norm,
                             const BackendWeight& k_norm, int n, int n_heads, int n_kv_heads, int head_dim,
                             float eps, int pos0, float theta, float scale, const KvLayer& cache) override {
    if (!error_.ok() || n <= 0) return;
    if (cache.dtype == DType::kQ8_0 && head_dim % 32 != 0) {  // a Q8_0 block would span two heads
      Backend::qk_norm_rope_kv_write(q, k, v, q_norm, k_norm, n, n_heads, n_kv_heads, head_dim, eps, pos0,
                                     theta, scale, cache);
      return;
    }
    if (!kv_type_ok(cache.dtype, "qk_norm_rope_kv_write")) return;
    float inv_freq[cuda::kRopeMaxHalf];
    if (!rope_frequencies(head_dim, theta, scale, inv_freq)) return;
    cuda::QkPrepArgs a;
    a.q = q;
    a.k = k;
    a.v = v;
    a.q_norm = vector_of(q_norm, head_dim, "qk_norm_rope_kv_write (q norm)");
    a.k_norm = vector_of(k_norm, head_dim, "qk_norm_rope_kv_write (k norm)");
    if (!a.q_norm || !a.k_norm) return;
    a.n = n;
    a.n_heads = n_heads;
    a.n_kv_heads = n_kv_heads;
    a.head_dim = head_dim;
    a.pos0 = pos0;
    a.pos_dev = recording_ ? step_pos_ : nullptr;
    a.eps = eps;
    a.cache_k = cache.k;
    a.cache_v = cache.v;
    a.capacity = cache.capacity;
    a.kv_dtype = cache.dtype;
    check_launch(cuda::launch_qk_norm_rope_kv_write(a, inv_freq, stream_), "qk_norm_rope_kv_write");
  }

  void add_rmsnorm(float* a, const BackendWeight& post_norm, float* x, const BackendWeight* next_norm,
                   int64_t rows, int dim, float eps, float* normed) override {
    if (!error_.ok() || rows <= 0) return;
    const float* post = vector_of(post_norm, dim, "add_rmsnorm (post norm)");
    const float* next = next_norm ? vector_of(*next_norm, dim, "add_rmsnorm (next norm)") : nullptr;
    if (!post || (next_norm && !next)) return;
    check_launch(cuda::launch_add_rmsnorm(a, post, x, next, rows, dim, eps, normed, stream_), "add_rmsnorm");
  }

  void attention(const float* q, const KvLayer& cache, const AttentionParams& p, float* out) override {
    if (!error_.ok() || p.n_tokens <= 0) return;
    if (!kv_type_ok(cache.dtype, "attention")) return;
    cuda::AttentionArgs a;
    a.q = q;
    a.k = cache.k;
    a.v = cache.v;
    a.out = out;
    a.kv_dtype = cache.dtype;
    a.capacity = cache.capacity;
    a.n_tokens = p.n_tokens;
    a.pos0 = p.pos0;
    a.n_heads = p.n_heads;
    a.n_kv_heads = p.n_kv_heads;
    a.head_dim = p.head_dim;
    a.scale = p.scale;
    a.window = p.window;
    a.kv_start = p.kv_start;
    a.bidir_begin = p.bidir_begin;
    a.bidir_end = p.bidir_end;
    a.sm_count = sm_count_;
    a.no_flash = !flash_attention_;
    a.pos_dev = recording_ ? step_pos_ : nullptr;  // pos0 is then the bound the plan is made for
    // Split-KV decode: the partials live in a growable scratch buffer (stream-ordered reuse).
    const cuda::AttentionPlan plan = cuda::attention_plan(a);
    if (plan.workspace_floats > 0) {
      const size_t bytes = static_cast<size_t>(plan.workspace_floats) * sizeof(float);
      if (recording_ && bytes > partials_bytes_) {  // grown after the recording (end_recording)
        partials_wanted_ = std::max(partials_wanted_, bytes);
        return;
      }
      // Recorded steps may hold the old buffer: it is kept until the backend goes.
      if (!reserve(&partials_, &partials_bytes_, bytes, "attention split partials", &retired_)) return;
      a.partials = static_cast<float*>(partials_);
      a.partial_floats = static_cast<int64_t>(partials_bytes_ / sizeof(float));
    }
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

  // ---- vision tower ops (kernels/vision.cu) ----

  // The fp32 copy of a vector weight of `dim` values, or null after recording an error.
  const float* vector_of(const BackendWeight& wt, int64_t dim, const char* op) {
    const CudaWeight& w = as_cuda(wt);
    if (!w.vec || w.cols != dim) {
      fail(invalid_argument(fmt::format("{}: weight {} is [{}, {}], expected a vector of {}", op, w.name,
                                        w.rows, w.cols, dim)));
      return nullptr;
    }
    return w.vec;
  }

  void layernorm(const float* x, const BackendWeight& w, const BackendWeight& b, int64_t rows, int dim,
                 float eps, float* out) override {
    if (!error_.ok() || rows <= 0) return;
    const float* wv = vector_of(w, dim, "layernorm");
    const float* bv = wv ? vector_of(b, dim, "layernorm") : nullptr;
    if (bv) check_launch(cuda::launch_layernorm(x, wv, bv, rows, dim, eps, out, stream_), "layernorm");
  }

  void add_layernorm(const float* a, float* x, const BackendWeight& w, const BackendWeight& b, int64_t rows,
                     int dim, float eps, float* out) override {
    if (!error_.ok() || rows <= 0) return;
    const float* wv = vector_of(w, dim, "add_layernorm");
    const float* bv = wv ? vector_of(b, dim, "add_layernorm") : nullptr;
    if (bv)
      check_launch(cuda::launch_add_layernorm(a, x, wv, bv, rows, dim, eps, out, stream_), "add_layernorm");
  }

  void add_bias(const float* x, const BackendWeight& b, int64_t rows, float* out) override {
    if (!error_.ok() || rows <= 0) return;
    if (const float* bv = vector_of(b, b.cols, "add_bias"))
      check_launch(cuda::launch_add_bias(x, bv, rows, static_cast<int>(b.cols), out, stream_), "add_bias");
  }

  void gelu(const float* x, int64_t n, float* out) override {
    if (!error_.ok() || n <= 0) return;
    check_launch(cuda::launch_gelu(x, n, out, stream_), "gelu");
  }

  void avg_pool(const float* x, int side, int dim, int k, float* out) override {
    if (!error_.ok()) return;
    check_launch(cuda::launch_avg_pool(x, side, dim, k, out, stream_), "avg_pool");
  }

  // ---- recorded steps: CUDA graphs (docs/cuda.md, "Recorded decode steps") ----

  bool can_record() const override { return record_steps_; }

  // Stream capture in thread-local mode: the ops of this thread on our stream become the graph's
  // nodes. What a capture may not hold (a host copy, a synchronization, an allocation) is turned
  // away by the ops themselves (unrecordable), so the capture stays valid and the caller
  // runs such a step directly.
  bool begin_recording() override {
    if (!error_.ok() || recording_) return false;
    if (!check(cudaStreamBeginCapture(stream(), cudaStreamCaptureModeThreadLocal), "cudaStreamBeginCapture"))
      return false;
    recording_ = true;
    return true;
  }

  Result<std::unique_ptr<RecordedStep>> end_recording(bool* again) override {
    *again = false;
    std::unique_ptr<RecordedStep> none;
    if (!recording_) {
      GEMMA3_TRY(error_);
      return none;  // begin_recording could not start one
    }
    recording_ = false;
    cudaGraph_t graph = nullptr;
    const cudaError_t e = cudaStreamEndCapture(stream(), &graph);
    const char* refused = std::exchange(unrecordable_, nullptr);
    const size_t wanted = std::exchange(partials_wanted_, 0);
    if (e != cudaSuccess) (void)cudaGetLastError();  // not sticky: the ops run directly instead
    std::unique_ptr<RecordedStep> step;
    if (e == cudaSuccess && error_.ok() && !refused && wanted == 0) {
      cudaGraphExec_t exec = nullptr;
      if (check(cudaGraphInstantiate(&exec, graph, 0), "cudaGraphInstantiate"))
        step = std::make_unique<CudaRecordedStep>(exec);
    }
    if (graph) (void)cudaGraphDestroy(graph);
    GEMMA3_TRY(error_);
    if (e == cudaSuccess && !refused && wanted > 0) {
      if (!reserve(&partials_, &partials_bytes_, wanted, "attention split partials", &retired_))
        return error_;
      *again = true;
    }
    return step;
  }

  void set_step_position(int pos0) override {
    if (!error_.ok() || unrecordable("set_step_position")) return;
    // From pageable memory: staged before the call returns.
    check(cudaMemcpyAsync(step_pos_, &pos0, sizeof(int), cudaMemcpyHostToDevice, stream()), "step position");
  }

  void replay(const RecordedStep& step) override {
    if (!error_.ok() || unrecordable("replay")) return;
    if (check(cudaGraphLaunch(static_cast<const CudaRecordedStep&>(step).exec, stream()), "cudaGraphLaunch"))
      after_op("replay");
  }

  // ---- sampling ----

  // Backend::sample on the device. The keys (logits with bans, penalty and temperature) are
  // made on the device; greedy copies back one id. Sampling sorts (key, id) pairs on the
  // device and copies back the leading kHostCandidates pairs plus softmax statistics; the rest
  // of sampler.cpp (softmax over the top-k, top-p, min-p, the draw) runs on those few on the
  // host in the same double arithmetic, so for top_k <= kHostCandidates the token equals the
  // CPU sampler's for the same rng. When top-p/min-p/the draw need candidates beyond them
  // (top_k off with a flat distribution, or plain temperature sampling) all top-k pairs
  // are copied back (the CPU path's cost) and the step finishes the same way.
  int32_t sample(const float* logits, int n_allowed, const SamplingOptions& o,
                 const std::vector<int32_t>& banned, const std::vector<int32_t>& history,
                 std::mt19937_64& rng) override {
    if (unrecordable("sample")) return 0;
    // The step's draw, as Sampler's uniform_real_distribution<double>(0, total) over a fresh
    // mt19937_64(seed): total * u with u the canonical draw (libstdc++ computes u * (b - a) + a).
    std::mt19937_64 gen(rng());
    const double u = std::uniform_real_distribution<double>(0.0, 1.0)(gen);
    if (!error_.ok() || n_allowed < 1) return 0;
    // Edits: bans first, then the penalized ids of the history window (unique, not banned).
    std::vector<int32_t> edits;
    std::unordered_set<int32_t> seen;
    for (int32_t id : banned)
      if (id >= 0 && id < n_allowed && seen.insert(id).second) edits.push_back(id);
    const int n_bans = static_cast<int>(edits.size());
    if (o.repeat_penalty != 1.0f && o.repeat_last_n != 0) {
      const size_t n = o.repeat_last_n < 0 ? history.size()
                                           : std::min(history.size(), static_cast<size_t>(o.repeat_last_n));
      for (auto it = history.end() - static_cast<std::ptrdiff_t>(n); it != history.end(); ++it)
        if (*it >= 0 && *it < n_allowed && seen.insert(*it).second) edits.push_back(*it);
    }
    const size_t ws = cuda::sample_workspace_bytes(n_allowed);
    const size_t edit_bytes = std::max<size_t>(edits.size(), 1) * sizeof(int32_t);
    // Workspace: [ws bytes][edit ids][result id], 256-byte aligned parts.
    const size_t edit_at = (ws + 255) / 256 * 256, id_at = edit_at + (edit_bytes + 255) / 256 * 256;
    if (!reserve(&sample_ws_, &sample_ws_bytes_, id_at + sizeof(int32_t), "sampling workspace")) return 0;
    auto* base = static_cast<uint8_t*>(sample_ws_);
    auto* edit_ids = reinterpret_cast<int32_t*>(base + edit_at);
    if (!edits.empty() && !check(cudaMemcpyAsync(edit_ids, edits.data(), edits.size() * sizeof(int32_t),
                                                 cudaMemcpyHostToDevice, stream()),
                                 "sample (edit ids)"))
      return 0;
    cuda::SampleArgs a;
    a.logits = logits;
    a.n = n_allowed;
    a.edit_ids = edit_ids;
    a.n_bans = n_bans;
    a.n_edits = static_cast<int>(edits.size());
    a.penalty = o.repeat_penalty;
    a.temperature = o.temperature;
    a.top_k = o.top_k;
    a.workspace = sample_ws_;
    a.workspace_bytes = ws;
    if (!(o.temperature > 0.0f)) {  // greedy, as sampler.cpp (a NaN temperature too)
      auto* id = reinterpret_cast<int32_t*>(base + id_at);
      if (!check_launch(cuda::launch_sample_argmax(a, id, stream_), "sample (argmax)")) return 0;
      int32_t host = 0;
      to_host(id, &host, sizeof(host));
      return error_.ok() ? host : 0;
    }
    cuda::SampleSorted sorted;
    if (!check_launch(cuda::launch_sample_sort(a, &sorted, stream_), "sample (sort)")) return 0;
    std::vector<double> sums(cuda::kSampleStatBlocks);
    std::vector<int> counts(cuda::kSampleStatBlocks);
    const int first = std::min(n_allowed, kHostCandidates);
    std::vector<float> keys(static_cast<size_t>(first));
    std::vector<int32_t> ids(static_cast<size_t>(first));
    if (!check(cudaMemcpyAsync(sums.data(), sorted.sums, sums.size() * sizeof(double), cudaMemcpyDeviceToHost,
                               stream()),
               "sample (sums)") ||
        !check(cudaMemcpyAsync(counts.data(), sorted.counts, counts.size() * sizeof(int),
                               cudaMemcpyDeviceToHost, stream()),
               "sample (counts)"))
      return 0;
    to_host(sorted.keys, keys.data(), keys.size() * sizeof(float));  // synchronizes all three
    to_host(sorted.ids, ids.data(), ids.size() * sizeof(int32_t));
    if (!error_.ok()) return 0;
    int64_t count = 0;
    double device_sum = 0;
    for (int b = 0; b < cuda::kSampleStatBlocks; ++b) count += counts[b], device_sum += sums[b];
    if (count == 0) return 0;  // every id banned (Sampler: no candidates)
    const int64_t k = o.top_k > 0 && o.top_k < count ? o.top_k : count;
    int32_t token = finish_sample(keys, ids, k, device_sum, o, u);
    if (token >= 0) return token;
    keys.resize(static_cast<size_t>(k));  // the rare case: every top-k candidate
    ids.resize(static_cast<size_t>(k));
    to_host(sorted.keys, keys.data(), keys.size() * sizeof(float));
    to_host(sorted.ids, ids.data(), ids.size() * sizeof(int32_t));
    token = finish_sample(keys, ids, k, device_sum, o, u);
    return error_.ok() && token >= 0 ? token : 0;
  }

 private:
  CudaBackend() = default;

  cudaStream_t stream() const { return static_cast<cudaStream_t>(stream_); }

  // Inside a recording, an op that cannot be part of one (a host copy or synchronization, an
  // allocation, a position given as a kernel argument, cuBLAS) is not issued: the first is
  // noted, the recording is then not replayed and the caller runs the ops directly. True then.
  bool unrecordable(const char* op) {
    if (!recording_) return false;
    if (!unrecordable_) unrecordable_ = op;
    return true;
  }

  bool kv_type_ok(DType t, const char* op) {
    if (t == DType::kF32 || t == DType::kBF16 || t == DType::kQ8_0 || t == DType::kF8E4M3) return true;
    fail(unsupported(
        fmt::format("{}: cache type {}, expected F32, BF16, Q8_0 or F8_E4M3", op, dtype_name(t))));
    return false;
  }

  void fail(Status s) {
    if (error_.ok()) error_ = std::move(s);
  }
  bool check(cudaError_t e, const char* what) {
    if (e == cudaSuccess) return true;
    fail(internal_error(fmt::format("CUDA backend: {}: {}", what, cuda_error_text(e))));
    return false;
  }
  bool check_launch(int code, const char* op) {
    if (code == 0) return after_op(op);
    const auto e = static_cast<cudaError_t>(code);
    fail(e == cudaErrorInvalidValue
             ? invalid_argument(fmt::format("CUDA backend: {}: arguments rejected by the launcher ({})", op,
                                            cuda_error_text(e)))
             : internal_error(fmt::format("CUDA backend: {} launch: {}", op, cuda_error_text(e))));
    return false;
  }
  // The one per-op check of GEMMA3_CUDA_SYNC: every op's launch (check_launch) and cuBLAS call
  // (gemm) ends here. Off, it costs nothing; on, a kernel fault is reported by the op that
  // caused it ("CUDA error after rmsnorm: cudaErrorIllegalAddress (...)"), not by a later sync.
  bool after_op(const char* op) {
    if (!sync_each_op_ || recording_) return true;
    const cudaError_t e = cudaStreamSynchronize(stream());
    if (e == cudaSuccess) return true;
    fail(internal_error(fmt::format("CUDA error after {}: {}", op, cuda_error_text(e))));
    return false;
  }

  // --weights fp8: the F32/F16/BF16 matrix goes up as is, is quantized on the device into fp8
  // e4m3 [rows, cols] + fp32 row scales (launch_quantize_fp8_rows), and the original is freed.
  // The fp8 GEMV/dequant paths then serve it like a checkpoint's fp8 weight.
  Status upload_fp8(const TensorView& t, CudaWeight* w) {
    void* raw = nullptr;
    GEMMA3_TRY(copy_to_device(t.data, t.nbytes, &raw, t.name + " (before fp8 quantization)"));
    cuda::WeightRef src = w->ref();  // still the source type, no scales
    src.data = raw;
    Status s = device_malloc(&w->data, static_cast<size_t>(w->rows * w->cols), "tensor " + t.name + " (fp8)");
    if (s.ok())
      s = device_malloc(reinterpret_cast<void**>(&w->scales), static_cast<size_t>(w->rows) * sizeof(float),
                        "tensor " + t.name + " (fp8 row scales)");
    if (s.ok()) {
      const int rc = cuda::launch_quantize_fp8_rows(src, static_cast<uint8_t*>(w->data), w->scales, stream_);
      cudaError_t e = static_cast<cudaError_t>(rc);
      if (e == cudaSuccess) e = cudaStreamSynchronize(stream());
      if (e != cudaSuccess)
        s = internal_error(
            fmt::format("CUDA backend: tensor {}: fp8 quantization: {}", t.name, cuda_error_text(e)));
    }
    (void)cudaFree(raw);  // after the synchronize above (cudaFree also waits for the device)
    GEMMA3_TRY(s);
    w->dtype = DType::kF8E4M3;
    w->row_bytes = static_cast<uint64_t>(w->cols);
    w->n_scales = w->rows;
    return ok_status();
  }

  // Q4_0/Q8_0 weights are stored on the device in block_decode.h's planar layout (quants, then
  // the row's scales, rows padded to 16 bytes: launch.h WeightRef), so the GEMV can read them
  // with 16-byte loads. Repacked on the host through a staging buffer of at most 64 MiB (rows
  // at a time, each copy synchronized before the buffer is refilled).
  Status upload_planar(const TensorView& t, CudaWeight* w) {
    const bool q4 = t.dtype == DType::kQ4_0;
    const uint64_t prb = planar_row_bytes(t.dtype, w->cols);
    const auto repack = q4 ? &blocks::Q4_0Planar::repack_row : &blocks::Q8_0Planar::repack_row;
    const int64_t rows = w->rows;
    GEMMA3_TRY(device_malloc(&w->data, static_cast<size_t>(prb * rows), "tensor " + t.name));
    const int64_t chunk =
        std::clamp<int64_t>(static_cast<int64_t>((uint64_t{64} << 20) / std::max<uint64_t>(prb, 1)), 1,
                            std::max<int64_t>(rows, 1));
    std::vector<uint8_t> staging(static_cast<size_t>(chunk * prb));
    const auto* src = static_cast<const uint8_t*>(t.data);
    cudaError_t e = cudaSuccess;
    for (int64_t r0 = 0; r0 < rows && e == cudaSuccess; r0 += chunk) {
      const int64_t nr = std::min(chunk, rows - r0);
      for (int64_t r = 0; r < nr; ++r)
        repack(src + (r0 + r) * w->row_bytes, staging.data() + r * prb, w->cols);
      e = cudaMemcpyAsync(static_cast<uint8_t*>(w->data) + r0 * prb, staging.data(),
                          static_cast<size_t>(nr * prb), cudaMemcpyHostToDevice, stream());
      if (e == cudaSuccess) e = cudaStreamSynchronize(stream());
    }
    if (e != cudaSuccess) {
      (void)cudaFree(w->data);  // the caller keeps nothing of a failed copy
      w->data = nullptr;
      return internal_error(fmt::format("CUDA backend: tensor {}: upload of {} bytes: {}", t.name, prb * rows,
                                        cuda_error_text(e)));
    }
    w->row_bytes = prb;
    return ok_status();
  }

  // *p = cudaMalloc(max(bytes, 1)); on failure an out-of-memory Status naming what, the
  // bytes needed and the bytes cudaMemGetInfo reports free. A failed cudaMalloc is not a
  // sticky CUDA error: it is cleared, and the backend stays usable.
  Status device_malloc(void** p, size_t bytes, const std::string& what) {
    *p = nullptr;
    const cudaError_t e = cudaMalloc(p, std::max<size_t>(bytes, 1));
    if (e == cudaSuccess) return ok_status();
    (void)cudaGetLastError();
    *p = nullptr;
    return out_of_memory(fmt::format(
        "CUDA backend: {}: cannot allocate {} bytes ({:.1f} MiB) of device memory, {} bytes ({:.1f} MiB) "
        "free: {}",
        what, bytes, static_cast<double>(bytes) / (1 << 20), free_bytes(),
        static_cast<double>(free_bytes()) / (1 << 20), cuda_error_text(e)));
  }

  // *buf holds at least `bytes` (grown, never shrunk; cudaFree synchronizes the device first).
  // With `retired`, the old buffer is moved there instead of freed.
  bool reserve(void** buf, size_t* have, size_t bytes, const char* what,
               std::vector<void*>* retired = nullptr) {
    if (bytes <= *have) return true;
    if (*buf) {
      if (retired)
        retired->push_back(*buf);
      else if (!check(cudaFree(*buf), what))
        return false;
      *buf = nullptr;
      *have = 0;
    }
    Status s = device_malloc(buf, bytes, what);
    if (!s.ok()) {
      fail(std::move(s));
      return false;
    }
    *have = bytes;
    return true;
  }

  // On our stream, then synchronized: a plain cudaMemcpy runs on the legacy default stream,
  // which our non-blocking stream does not wait for, and from pageable memory it may return
  // before the last DMA lands (CUDA's "API synchronization behavior"), so a kernel queued next
  // (upload_fp8's quantizer) could read a partly copied tensor.
  Status copy_to_device(const void* src, size_t bytes, void** dst, const std::string& what) {
    GEMMA3_TRY(device_malloc(dst, bytes, "tensor " + what));
    cudaError_t e = cudaSuccess;
    if (bytes > 0) {
      e = cudaMemcpyAsync(*dst, src, bytes, cudaMemcpyHostToDevice, stream());
      if (e == cudaSuccess) e = cudaStreamSynchronize(stream());
    }
    if (e != cudaSuccess) {
      (void)cudaFree(*dst);  // the caller keeps nothing of a failed copy
      *dst = nullptr;
      return internal_error(
          fmt::format("CUDA backend: tensor {}: upload of {} bytes: {}", what, bytes, cuda_error_text(e)));
    }
    return ok_status();
  }

  // out[:, r0 : r0 + nr] (row-major out [n, w.rows]) = x [n, cols] . a^T, a = rows r0.. of the
  // weight as [nr, cols] of `type` (fp32 or bf16; x the same type), fp32 output and accumulation.
  // In cuBLAS's column-major terms: C (nr x n, ldc = w.rows) = A^T (A: cols x nr, lda = cols) *
  // B (cols x n, ldb = cols).
  void gemm(const void* a, cudaDataType_t type, int64_t nr, int64_t r0, const void* x, int n,
            const cuda::WeightRef& w, const std::string& name, float* out) {
    const float alpha = 1.0f, beta = 0.0f;
    const cublasStatus_t s =
        cublasGemmEx(static_cast<cublasHandle_t>(cublas_), CUBLAS_OP_T, CUBLAS_OP_N, static_cast<int>(nr), n,
                     static_cast<int>(w.cols), &alpha, a, type, static_cast<int>(w.cols), x, type,
                     static_cast<int>(w.cols), &beta, out + r0, CUDA_R_32F, static_cast<int>(w.rows),
                     CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
    if (s != CUBLAS_STATUS_SUCCESS)
      fail(internal_error(fmt::format("CUDA backend: cublasGemmEx ({} x {} x {}, {}, weight {}): {}", nr, n,
                                      w.cols, type == CUDA_R_16BF ? "bf16" : "fp32", name,
                                      cublasGetStatusString(s))));
    else
      after_op("matmul (cublasGemmEx)");
  }

  // Pairs copied back after the device sort (top_k <= this: the whole choice on the host).
  static constexpr int kHostCandidates = 1024;

  // sampler.cpp after its sort, on the leading pairs of the sorted candidates (keys: (z - max) /
  // temperature as sampler.cpp forms them, descending; ids). k: candidates kept by top-k (>= 1).
  // When k <= keys.size() the softmax sum is taken here, in sampler.cpp's order; otherwise
  // device_sum (the same sum in another order). Returns -1 when top-p, min-p or the draw reach
  // past keys.size().
  static int32_t finish_sample(const std::vector<float>& keys, const std::vector<int32_t>& ids, int64_t k,
                               double device_sum, const SamplingOptions& o, double u) {
    const int64_t have = std::min<int64_t>(k, static_cast<int64_t>(keys.size()));
    const float top = keys[0];
    std::vector<float> p(static_cast<size_t>(have));
    double sum = 0;
    for (int64_t i = 0; i < have; ++i)
      sum += (p[i] = static_cast<float>(std::exp(static_cast<double>(keys[i]) - top)));
    if (have < k) sum = device_sum;
    for (float& v : p) v = static_cast<float>(v / sum);
    int64_t keep = k;
    if (o.top_p < 1.0f) {
      double cum = 0;
      int64_t i = 0;
      for (; i < have; ++i) {
        cum += p[i];
        if (cum >= o.top_p) break;
      }
      if (i < have)
        keep = i + 1;
      else if (have < k)
        return -1;
    }
    if (o.min_p > 0.0f) {
      const float floor = o.min_p * p[0];
      int64_t kept = 1;
      while (kept < keep && kept < have && p[kept] >= floor) ++kept;
      if (kept == have && kept < keep) return -1;
      keep = kept;
    }
    if (keep > have) return -1;
    double total = 0;
    for (int64_t i = 0; i < keep; ++i) total += p[i];
    double r = total * u;
    for (int64_t i = 0; i < keep; ++i) {
      r -= p[i];
      if (r < 0) return ids[i];
    }
    return ids[keep - 1];
  }

  // Looks the driver's virtual memory functions up; vmm_granularity_ stays 0 without them.
  void init_vmm() {
    const char* env = std::getenv("GEMMA3_CUDA_VMM");
    if (env && std::strcmp(env, "0") == 0) return;
    const std::pair<const char*, void**> wanted[] = {
        {"cuMemGetAllocationGranularity", reinterpret_cast<void**>(&vmm_.granularity)},
        {"cuMemAddressReserve", reinterpret_cast<void**>(&vmm_.reserve)},
        {"cuMemAddressFree", reinterpret_cast<void**>(&vmm_.free)},
        {"cuMemCreate", reinterpret_cast<void**>(&vmm_.create)},
        {"cuMemRelease", reinterpret_cast<void**>(&vmm_.release)},
        {"cuMemMap", reinterpret_cast<void**>(&vmm_.map)},
        {"cuMemUnmap", reinterpret_cast<void**>(&vmm_.unmap)},
        {"cuMemSetAccess", reinterpret_cast<void**>(&vmm_.set_access)},
    };
    for (const auto& [name, fn] : wanted) {
      cudaDriverEntryPointQueryResult found{};
      // 12000: the functions' CUDA 12 signatures (unchanged since 10.2)
      if (cudaGetDriverEntryPointByVersion(name, fn, 12000, cudaEnableDefault, &found) != cudaSuccess ||
          found != cudaDriverEntryPointSuccess || !*fn) {
        (void)cudaGetLastError();
        return;
      }
    }
    const CUmemAllocationProp prop = device_allocation();
    size_t g = 0;
    if (vmm_.granularity(&g, &prop, CU_MEM_ALLOC_GRANULARITY_MINIMUM) == CUDA_SUCCESS && g > 0)
      vmm_granularity_ = g;
  }

  static CUmemAllocationProp device_allocation() {
    CUmemAllocationProp prop{};
    prop.type = CU_MEM_ALLOCATION_TYPE_PINNED;
    prop.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
    prop.location.id = 0;  // create() selects device 0
    return prop;
  }

  size_t round_to_granule(size_t bytes) const {
    return (std::max<size_t>(bytes, 1) + vmm_granularity_ - 1) / vmm_granularity_ * vmm_granularity_;
  }

  static std::string cu_error_text(CUresult r) { return fmt::format("CUresult {}", static_cast<int>(r)); }

  // A failed driver call on memory already given out: sticky, as a failed runtime call.
  bool check_cu(CUresult r, const char* what) {
    if (r == CUDA_SUCCESS) return true;
    if (error_.ok()) fail(internal_error(fmt::format("CUDA backend: {}: {}", what, cu_error_text(r))));
    return false;
  }

  struct DriverVmm {
    CUresult (*granularity)(size_t*, const CUmemAllocationProp*, CUmemAllocationGranularity_flags) = nullptr;
    CUresult (*reserve)(CUdeviceptr*, size_t, size_t, CUdeviceptr, unsigned long long) = nullptr;
    CUresult (*free)(CUdeviceptr, size_t) = nullptr;
    CUresult (*create)(CUmemGenericAllocationHandle*, size_t, const CUmemAllocationProp*,
                       unsigned long long) = nullptr;
    CUresult (*release)(CUmemGenericAllocationHandle) = nullptr;
    CUresult (*map)(CUdeviceptr, size_t, size_t, CUmemGenericAllocationHandle, unsigned long long) = nullptr;
    CUresult (*unmap)(CUdeviceptr, size_t) = nullptr;
    CUresult (*set_access)(CUdeviceptr, size_t, const CUmemAccessDesc*, size_t) = nullptr;
  } vmm_;
  size_t vmm_granularity_ = 0;  // 0: no virtual memory management (map_granularity)
  std::map<CUdeviceptr, CUmemGenericAllocationHandle> vmm_mapped_;  // each mapped granule's start

  std::string device_name_;
  void* stream_ = nullptr;   // cudaStream_t
  void* cublas_ = nullptr;   // cublasHandle_t
  void* scratch_ = nullptr;  // [tile, cols] fp32 or bf16 dequantized weight rows (cuBLAS path)
  size_t scratch_bytes_ = 0;
  void* act16_ = nullptr;  // [n, cols] bf16 activations of the bf16 GEMM
  size_t act16_bytes_ = 0;
  bool fp32_gemm_ = false;       // GEMMA3_CUDA_FP32_GEMM: fp32 operands for every weight type
  bool flash_attention_ = true;  // GEMMA3_CUDA_FLASH != 0: the tensor-core prefill attention
  void* ids_ = nullptr;          // [n] int32 token ids for embed (+ the stored rows: embed_stored_rows)
  size_t ids_bytes_ = 0;
  // Host side of embed_stored_rows' copy.
  std::vector<uint8_t> lookup_staging_;
  void* partials_ = nullptr;  // split-KV attention partials, cuda::AttentionPlan::workspace_floats
  size_t partials_bytes_ = 0;
  std::vector<void*> retired_;  // outgrown partials that recorded steps may still read
  // Recorded steps (begin_recording .. end_recording).
  bool record_steps_ = true;            // GEMMA3_CUDA_GRAPHS != 0
  bool recording_ = false;              // our stream is capturing
  const char* unrecordable_ = nullptr;  // the first op the recording turned away
  size_t partials_wanted_ = 0;          // the partials the recording's attention needed
  int* step_pos_ = nullptr;             // device: the step position recorded ops read
  void* sample_ws_ = nullptr;           // sampling: cuda::sample_workspace_bytes + edit ids + result id
  size_t sample_ws_bytes_ = 0;
  int sm_count_ = 132;         // multiprocessors of device 0 (sizes the split-KV attention)
  bool fp8_weights_ = false;   // BackendOptions::fp8_weights
  bool sync_each_op_ = false;  // GEMMA3_CUDA_SYNC: synchronize after every op (after_op)
  Status error_;               // first failure; sticky
};

Result<std::unique_ptr<Backend>> create_backend(const BackendOptions& options) {
  GEMMA3_ASSIGN_OR_RETURN(std::unique_ptr<CudaBackend> b, CudaBackend::create(options));
  return std::unique_ptr<Backend>(std::move(b));
}

bool any_device() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    (void)cudaGetLastError();
    return false;
  }
  return count > 0;
}

Status backend_status(Backend& backend) {
  if (auto* b = dynamic_cast<CudaBackend*>(&backend)) return b->status();
  return ok_status();
}

constexpr CudaModuleApi kModuleApi{kCudaModuleAbi, GEMMA3_VERSION, &create_backend, &any_device,
                                   &backend_status};

}  // namespace
}  // namespace gemma3

extern "C" __attribute__((visibility("default"))) const gemma3::CudaModuleApi* gemma3_cuda_module() {
  return &gemma3::kModuleApi;
}
