// CUDA on the CPU: the subset of CUDA that kernels/*.cu and src/backend/cuda/cuda_backend.cpp
// use, for g++, so that every kernel runs (under ASan + UBSan) on a machine without a GPU.
// docs/cuda.md ("The CUDA emulator") describes the model; in short:
//
//   - kernels/*.cu are compiled as C++ with this header forced in (-include) and __CUDACC__,
//     __CUDA_ARCH__ = 800 and GEMMA3_CUDA_EMU defined, so the device paths (__CUDA_ARCH__)
//     are the ones that run. A launch is GEMMA3_LAUNCH(kernel, grid, block, smem, stream, args...)
//     (kernels/common.cuh; plain kernel<<<...>>>(args) under nvcc), dynamic shared memory is
//     GEMMA3_DYNAMIC_SHARED(T, name) (extern __shared__ T name[] under nvcc).
//   - Each CUDA thread is a fiber with its own stack; blocks run one after another, the
//     threads of a block interleave at every __syncthreads and warp operation (shuffles,
//     __syncwarp, votes) in the order GEMMA3_CUDA_EMU_POLICY picks (round-robin, low-first,
//     high-first, random:SEED). A barrier or warp operation that only part of the block/warp
//     reaches is an error naming the kernel, the block and the call sites (stderr, abort).
//   - Dynamic shared memory is a heap block of exactly the launch's size, filled with NaN
//     bytes (0xFF); static __shared__ arrays are function-scope statics (blocks run one at a
//     time), so ASan sees an access one past either. cudaMalloc is an exact-size heap block
//     (256-byte aligned, 0xFF-filled); copies, memsets, streams and events are host operations
//     done at once; cuBLAS GEMMs and CUB radix sorts are plain reference loops.
//   - cudaGetDeviceProperties describes an sm_80 device with 132 multiprocessors (an H100's
//     count, so split-KV plans match it) and 16 GiB (GEMMA3_CUDA_EMU_MEMORY_MIB overrides).
//
// The shim headers in tools/cuda-emu/include (cuda_runtime.h, cublas_v2.h, cub/...) include
// this file, so the backend's #includes resolve here too.
#pragma once

#include <math.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#ifndef GEMMA3_CUDA_EMU
#define GEMMA3_CUDA_EMU 1
#endif

// ---- keywords -------------------------------------------------------------------------------

#define __global__
#define __device__
#define __host__
#define __constant__
#define __shared__ static  // one instance per function; blocks run one at a time
#define __forceinline__ inline __attribute__((always_inline))
#define __launch_bounds__(...)

// ---- built-in types and variables ----------------------------------------------------------

struct uint3 {
  unsigned x, y, z;
};
struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned vx = 1, unsigned vy = 1, unsigned vz = 1) : x(vx), y(vy), z(vz) {}
};

namespace gemma3_cuda_emu::detail {
extern uint3 thread_idx, block_idx;  // set by the scheduler before each fiber runs
extern dim3 block_dim, grid_dim;
}  // namespace gemma3_cuda_emu::detail

inline const uint3& threadIdx = gemma3_cuda_emu::detail::thread_idx;
inline const uint3& blockIdx = gemma3_cuda_emu::detail::block_idx;
inline const dim3& blockDim = gemma3_cuda_emu::detail::block_dim;
inline const dim3& gridDim = gemma3_cuda_emu::detail::grid_dim;
constexpr int warpSize = 32;

// ---- runtime API: types ------------------------------------------------------------------

enum cudaError {  // the numeric values of CUDA's driver_types.h
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorMemoryAllocation = 2,
  cudaErrorInitializationError = 3,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorInvalidDevicePointer = 17,
  cudaErrorInvalidMemcpyDirection = 21,
  cudaErrorNoDevice = 100,
  cudaErrorInvalidDevice = 101,
  cudaErrorInvalidResourceHandle = 400,
  cudaErrorIllegalState = 401,
  cudaErrorNotReady = 600,
  cudaErrorIllegalAddress = 700,
  cudaErrorLaunchFailure = 719,
  cudaErrorNotSupported = 801,
  cudaErrorStreamCaptureUnsupported = 900,
  cudaErrorStreamCaptureInvalidated = 901,
  cudaErrorStreamCaptureImplicit = 906,
  cudaErrorStreamCaptureWrongThread = 908,
};
typedef enum cudaError cudaError_t;

enum cudaMemcpyKind {
  cudaMemcpyHostToHost = 0,
  cudaMemcpyHostToDevice = 1,
  cudaMemcpyDeviceToHost = 2,
  cudaMemcpyDeviceToDevice = 3,
  cudaMemcpyDefault = 4,
};

struct CUstream_st;
typedef CUstream_st* cudaStream_t;
struct CUevent_st;
typedef CUevent_st* cudaEvent_t;
constexpr unsigned cudaStreamDefault = 0x00;
constexpr unsigned cudaStreamNonBlocking = 0x01;
struct CUgraph_st;
typedef CUgraph_st* cudaGraph_t;
struct CUgraphExec_st;
typedef CUgraphExec_st* cudaGraphExec_t;
enum cudaStreamCaptureMode {
  cudaStreamCaptureModeGlobal = 0,
  cudaStreamCaptureModeThreadLocal = 1,
  cudaStreamCaptureModeRelaxed = 2,
};
enum cudaStreamCaptureStatus {
  cudaStreamCaptureStatusNone = 0,
  cudaStreamCaptureStatusActive = 1,
  cudaStreamCaptureStatusInvalidated = 2,
};
constexpr unsigned cudaEventDefault = 0x00;
constexpr unsigned cudaEventDisableTiming = 0x02;

struct cudaDeviceProp {
  char name[256];
  size_t totalGlobalMem;
  size_t sharedMemPerBlock;
  size_t sharedMemPerBlockOptin;
  size_t sharedMemPerMultiprocessor;
  int regsPerBlock;
  int warpSize;
  int maxThreadsPerBlock;
  int maxThreadsDim[3];
  int maxGridSize[3];
  int major;
  int minor;
  int multiProcessorCount;
  int l2CacheSize;
  int maxThreadsPerMultiProcessor;
};

enum cudaDeviceAttr {
  cudaDevAttrMaxThreadsPerBlock = 1,
  cudaDevAttrMaxSharedMemoryPerBlock = 8,
  cudaDevAttrWarpSize = 10,
  cudaDevAttrMultiProcessorCount = 16,
  cudaDevAttrComputeCapabilityMajor = 75,
  cudaDevAttrComputeCapabilityMinor = 76,
  cudaDevAttrMaxSharedMemoryPerBlockOptin = 97,
};

// ---- runtime API: functions (cuda_emu.cpp) -------------------------------------------------

const char* cudaGetErrorName(cudaError_t e);
const char* cudaGetErrorString(cudaError_t e);
cudaError_t cudaGetLastError();
cudaError_t cudaPeekAtLastError();
cudaError_t cudaGetDeviceCount(int* count);
cudaError_t cudaSetDevice(int device);
cudaError_t cudaGetDevice(int* device);
cudaError_t cudaGetDeviceProperties(cudaDeviceProp* prop, int device);
cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device);
cudaError_t cudaDeviceSynchronize();
cudaError_t cudaMalloc(void** ptr, size_t bytes);
template <class T>
cudaError_t cudaMalloc(T** ptr, size_t bytes) {
  return cudaMalloc(reinterpret_cast<void**>(ptr), bytes);
}
cudaError_t cudaFree(void* ptr);
cudaError_t cudaMallocHost(void** ptr, size_t bytes);
cudaError_t cudaFreeHost(void* ptr);
cudaError_t cudaMemGetInfo(size_t* free, size_t* total);
cudaError_t cudaMemcpy(void* dst, const void* src, size_t bytes, cudaMemcpyKind kind);
cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t bytes, cudaMemcpyKind kind,
                            cudaStream_t stream = nullptr);
cudaError_t cudaMemset(void* ptr, int value, size_t bytes);
cudaError_t cudaMemsetAsync(void* ptr, int value, size_t bytes, cudaStream_t stream = nullptr);
cudaError_t cudaStreamCreate(cudaStream_t* stream);
cudaError_t cudaStreamCreateWithFlags(cudaStream_t* stream, unsigned flags);
cudaError_t cudaStreamDestroy(cudaStream_t stream);
cudaError_t cudaStreamSynchronize(cudaStream_t stream);
cudaError_t cudaStreamQuery(cudaStream_t stream);
cudaError_t cudaStreamWaitEvent(cudaStream_t stream, cudaEvent_t event, unsigned flags = 0);
// Stream capture and graphs: between cudaStreamBeginCapture and cudaStreamEndCapture, kernel
// launches, device-to-device copies and memsets issued to the stream are kept as the graph's
// nodes, in order, instead of run; cudaGraphLaunch runs them (again checking every pointer
// argument). As on a GPU in the global and thread-local modes, what a capture may not contain
// fails with cudaErrorStreamCaptureUnsupported and invalidates it (cudaStreamEndCapture then
// returns cudaErrorStreamCaptureInvalidated): copies to or from host memory on the capturing
// stream, synchronizing it or the device, cudaMalloc / cudaFree, and work on the legacy stream
// (cudaErrorStreamCaptureImplicit) while a capture is active. Relaxed mode is not emulated.
cudaError_t cudaStreamBeginCapture(cudaStream_t stream, cudaStreamCaptureMode mode);
cudaError_t cudaStreamEndCapture(cudaStream_t stream, cudaGraph_t* graph);
cudaError_t cudaStreamIsCapturing(cudaStream_t stream, cudaStreamCaptureStatus* status);
cudaError_t cudaGraphInstantiate(cudaGraphExec_t* exec, cudaGraph_t graph, unsigned long long flags = 0);
cudaError_t cudaGraphLaunch(cudaGraphExec_t exec, cudaStream_t stream);
cudaError_t cudaGraphDestroy(cudaGraph_t graph);
cudaError_t cudaGraphExecDestroy(cudaGraphExec_t exec);
cudaError_t cudaEventCreate(cudaEvent_t* event);
cudaError_t cudaEventCreateWithFlags(cudaEvent_t* event, unsigned flags);
cudaError_t cudaEventDestroy(cudaEvent_t event);
cudaError_t cudaEventRecord(cudaEvent_t event, cudaStream_t stream = nullptr);
cudaError_t cudaEventSynchronize(cudaEvent_t event);
cudaError_t cudaEventQuery(cudaEvent_t event);
cudaError_t cudaEventElapsedTime(float* ms, cudaEvent_t start, cudaEvent_t end);

// ---- driver API: virtual memory management (cuda.h's subset; reached through
// cudaGetDriverEntryPointByVersion, as the backend does on a GPU) ---------------------------
//
// A reservation is host address space with no access (mmap PROT_NONE, aligned to the
// granularity); cuMemCreate counts a handle's bytes against the device memory; cuMemMap ties a
// handle to a range of a reservation, and only cuMemSetAccess makes it readable and writable
// (0xFF-filled, as cudaMalloc's memory): a kernel or copy touching a range before that, or after
// cuMemUnmap, is outside every live allocation (the checks name it; a host access faults).
// Adjacent accessible mappings of one reservation count as one range for copies and memsets.
// A handle's contents are not kept across cuMemUnmap (the backend never maps one twice). The
// granularity is 2 MiB, a GPU's (GEMMA3_CUDA_EMU_VMM_GRANULARITY=BYTES, a multiple of the
// host page, overrides: read at each cuMemGetAllocationGranularity, so tests can shrink it).
enum CUresult {
  CUDA_SUCCESS = 0,
  CUDA_ERROR_INVALID_VALUE = 1,
  CUDA_ERROR_OUT_OF_MEMORY = 2,
  CUDA_ERROR_NOT_SUPPORTED = 801,
};
typedef unsigned long long CUdeviceptr;
typedef unsigned long long CUmemGenericAllocationHandle;
enum CUmemAllocationType { CU_MEM_ALLOCATION_TYPE_INVALID = 0, CU_MEM_ALLOCATION_TYPE_PINNED = 1 };
enum CUmemAllocationHandleType { CU_MEM_HANDLE_TYPE_NONE = 0 };
enum CUmemLocationType { CU_MEM_LOCATION_TYPE_INVALID = 0, CU_MEM_LOCATION_TYPE_DEVICE = 1 };
struct CUmemLocation {
  CUmemLocationType type;
  int id;
};
struct CUmemAllocationProp {
  CUmemAllocationType type;
  CUmemAllocationHandleType requestedHandleTypes;
  CUmemLocation location;
  void* win32HandleMetaData;
  struct {
    unsigned char compressionType;
    unsigned char gpuDirectRDMACapable;
    unsigned short usage;
    unsigned char reserved[4];
  } allocFlags;
};
enum CUmemAllocationGranularity_flags {
  CU_MEM_ALLOC_GRANULARITY_MINIMUM = 0,
  CU_MEM_ALLOC_GRANULARITY_RECOMMENDED = 1,
};
enum CUmemAccess_flags {
  CU_MEM_ACCESS_FLAGS_PROT_NONE = 0,
  CU_MEM_ACCESS_FLAGS_PROT_READ = 1,
  CU_MEM_ACCESS_FLAGS_PROT_READWRITE = 3,
};
struct CUmemAccessDesc {
  CUmemLocation location;
  CUmemAccess_flags flags;
};
CUresult cuMemGetAllocationGranularity(size_t* granularity, const CUmemAllocationProp* prop,
                                       CUmemAllocationGranularity_flags option);
CUresult cuMemAddressReserve(CUdeviceptr* ptr, size_t size, size_t alignment, CUdeviceptr addr,
                             unsigned long long flags);
CUresult cuMemAddressFree(CUdeviceptr ptr, size_t size);
CUresult cuMemCreate(CUmemGenericAllocationHandle* handle, size_t size, const CUmemAllocationProp* prop,
                     unsigned long long flags);
CUresult cuMemRelease(CUmemGenericAllocationHandle handle);
CUresult cuMemMap(CUdeviceptr ptr, size_t size, size_t offset, CUmemGenericAllocationHandle handle,
                  unsigned long long flags);
CUresult cuMemUnmap(CUdeviceptr ptr, size_t size);
CUresult cuMemSetAccess(CUdeviceptr ptr, size_t size, const CUmemAccessDesc* desc, size_t count);

enum cudaDriverEntryPointQueryResult {
  cudaDriverEntryPointSuccess = 0,
  cudaDriverEntryPointSymbolNotFound = 1,
  cudaDriverEntryPointVersionNotSufficent = 2,
};
constexpr unsigned long long cudaEnableDefault = 0x0;
// The functions above by name (the driver's "cuMemCreate", ...); others are not found.
cudaError_t cudaGetDriverEntryPointByVersion(const char* symbol, void** func, unsigned int cuda_version,
                                             unsigned long long flags,
                                             cudaDriverEntryPointQueryResult* status = nullptr);

// ---- device intrinsics -------------------------------------------------------------------

// The _rn operations are rounded once and never contracted into an FMA, with their operands
// or with what uses their result (as on the device): the empty asm statements make each value
// opaque to g++, which may otherwise fuse a * b + c when the kernels are built with
// -ffp-contract=fast (as nvcc fuses plain expressions by default).
namespace gemma3_cuda_emu::detail {
template <class T>
inline T opaque(T v) {
  asm("" : "+m"(v));
  return v;
}
}  // namespace gemma3_cuda_emu::detail
#define GEMMA3_EMU_RN(T, name, op)                           \
  inline T name(T a, T b) {                                  \
    namespace d = gemma3_cuda_emu::detail;                   \
    return d::opaque<T>(d::opaque<T>(a) op d::opaque<T>(b)); \
  }
GEMMA3_EMU_RN(float, __fadd_rn, +)
GEMMA3_EMU_RN(float, __fsub_rn, -)
GEMMA3_EMU_RN(float, __fmul_rn, *)
GEMMA3_EMU_RN(float, __fdiv_rn, /)
GEMMA3_EMU_RN(double, __dadd_rn, +)
GEMMA3_EMU_RN(double, __dsub_rn, -)
GEMMA3_EMU_RN(double, __dmul_rn, *)
GEMMA3_EMU_RN(double, __ddiv_rn, /)
#undef GEMMA3_EMU_RN
inline float __frcp_rn(float a) { return __fdiv_rn(1.0f, a); }
inline double __drcp_rn(double a) { return __ddiv_rn(1.0, a); }
inline float __fsqrt_rn(float a) { return std::sqrt(a); }
inline double __dsqrt_rn(double a) { return std::sqrt(a); }
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
inline double __fma_rn(double a, double b, double c) { return std::fma(a, b, c); }
inline float __double2float_rn(double a) { return static_cast<float>(a); }  // host default: nearest even
inline int __float2int_rn(float a) { return static_cast<int>(std::nearbyint(a)); }
inline int __float2int_rz(float a) { return static_cast<int>(a); }
inline int __double2int_rn(double a) { return static_cast<int>(std::nearbyint(a)); }
// The fast approximations: the precise host functions (more accurate than the device's).
inline float __expf(float a) { return std::exp(a); }
inline float __logf(float a) { return std::log(a); }
inline float __sinf(float a) { return std::sin(a); }
inline float __cosf(float a) { return std::cos(a); }
inline float __powf(float a, float b) { return std::pow(a, b); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __saturatef(float a) { return a != a ? 0.0f : a < 0.0f ? 0.0f : a > 1.0f ? 1.0f : a; }

inline unsigned __float_as_uint(float f) {
  unsigned u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline float __uint_as_float(unsigned u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline int __float_as_int(float f) { return static_cast<int>(__float_as_uint(f)); }
inline float __int_as_float(int i) { return __uint_as_float(static_cast<unsigned>(i)); }
inline long long __double_as_longlong(double d) {
  long long u;
  std::memcpy(&u, &d, 8);
  return u;
}
inline double __longlong_as_double(long long u) {
  double d;
  std::memcpy(&d, &u, 8);
  return d;
}

inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(static_cast<unsigned>(x)); }
inline int __clzll(long long x) { return x == 0 ? 64 : __builtin_clzll(static_cast<unsigned long long>(x)); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __ffsll(long long x) { return __builtin_ffsll(x); }
inline unsigned __brev(unsigned x) {
  x = ((x >> 1) & 0x55555555u) | ((x & 0x55555555u) << 1);
  x = ((x >> 2) & 0x33333333u) | ((x & 0x33333333u) << 2);
  x = ((x >> 4) & 0x0F0F0F0Fu) | ((x & 0x0F0F0F0Fu) << 4);
  x = ((x >> 8) & 0x00FF00FFu) | ((x & 0x00FF00FFu) << 8);
  return (x >> 16) | (x << 16);
}
template <class T>
T __ldg(const T* p) {
  return *p;
}
inline void __threadfence() {}
inline void __threadfence_block() {}

// Atomics: blocks run one at a time on one host thread and a fiber switches only at barriers
// and warp operations, so a read-modify-write is atomic as written. They are no scheduling
// points (a spin-wait on another thread would never end).
template <class T>
T atomicAdd(T* p, T v) {
  const T old = *p;
  *p = old + v;
  return old;
}
template <class T>
T atomicSub(T* p, T v) {
  const T old = *p;
  *p = old - v;
  return old;
}
template <class T>
T atomicMax(T* p, T v) {
  const T old = *p;
  *p = old < v ? v : old;
  return old;
}
template <class T>
T atomicMin(T* p, T v) {
  const T old = *p;
  *p = v < old ? v : old;
  return old;
}
template <class T>
T atomicExch(T* p, T v) {
  const T old = *p;
  *p = v;
  return old;
}
template <class T>
T atomicCAS(T* p, T compare, T v) {
  const T old = *p;
  if (old == compare) *p = v;
  return old;
}
template <class T>
T atomicAnd(T* p, T v) {
  const T old = *p;
  *p = old & v;
  return old;
}
template <class T>
T atomicOr(T* p, T v) {
  const T old = *p;
  *p = old | v;
  return old;
}
template <class T>
T atomicXor(T* p, T v) {
  const T old = *p;
  *p = old ^ v;
  return old;
}

// ---- scheduling points: barriers and warp operations (cuda_emu.cpp) ------------------------

namespace gemma3_cuda_emu::detail {

enum class WarpOp : uint8_t { kShflIdx, kShflUp, kShflDown, kShflXor, kSyncWarp, kBallot, kAny, kAll };
enum class BarrierOp : uint8_t { kPlain, kCount, kAnd, kOr };

// Suspends the calling CUDA thread until every lane of `mask` has reached a warp operation of
// the same kind and mask; returns this lane's result (the source lane's value for shuffles,
// the vote for ballot/any/all). Errors (divergence, a lane that exited, a mask without the
// caller) abort, naming the kernel and the call sites.
uint64_t warp_op(WarpOp op, unsigned mask, uint64_t value, int arg, int width, const char* file, int line);
// Suspends the calling CUDA thread until every thread of the block is at this barrier;
// returns the count / and / or of `predicate` over the block (kPlain: 0).
int barrier(BarrierOp op, int predicate, const char* file, int line);
// The launch's dynamic shared memory (exactly its `smem` bytes, NaN-filled at block start).
void* dynamic_shared();

template <class T>
uint64_t to_bits(T v) {
  static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= 8, "warp operations move <= 8 bytes");
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  return bits;
}
template <class T>
T from_bits(uint64_t bits) {
  T v;
  std::memcpy(&v, &bits, sizeof(T));
  return v;
}

}  // namespace gemma3_cuda_emu::detail

namespace gemma3_cuda_emu {
template <class T>
T* dynamic_shared() {
  return static_cast<T*>(detail::dynamic_shared());
}
}  // namespace gemma3_cuda_emu

inline void __syncthreads(const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  gemma3_cuda_emu::detail::barrier(gemma3_cuda_emu::detail::BarrierOp::kPlain, 0, file, line);
}
inline int __syncthreads_count(int predicate, const char* file = __builtin_FILE(),
                               int line = __builtin_LINE()) {
  return gemma3_cuda_emu::detail::barrier(gemma3_cuda_emu::detail::BarrierOp::kCount, predicate != 0, file,
                                          line);
}
inline int __syncthreads_and(int predicate, const char* file = __builtin_FILE(),
                             int line = __builtin_LINE()) {
  return gemma3_cuda_emu::detail::barrier(gemma3_cuda_emu::detail::BarrierOp::kAnd, predicate != 0, file,
                                          line);
}
inline int __syncthreads_or(int predicate, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  return gemma3_cuda_emu::detail::barrier(gemma3_cuda_emu::detail::BarrierOp::kOr, predicate != 0, file,
                                          line);
}

#define GEMMA3_EMU_SHFL(name, op)                                                                    \
  template <class T>                                                                                 \
  T name(unsigned mask, T var, int arg, int width = warpSize, const char* file = __builtin_FILE(),   \
         int line = __builtin_LINE()) {                                                              \
    namespace d = gemma3_cuda_emu::detail;                                                           \
    return d::from_bits<T>(                                                                          \
        d::warp_op(d::WarpOp::op, mask, d::to_bits(var), static_cast<int>(arg), width, file, line)); \
  }
GEMMA3_EMU_SHFL(__shfl_sync, kShflIdx)
GEMMA3_EMU_SHFL(__shfl_up_sync, kShflUp)
GEMMA3_EMU_SHFL(__shfl_down_sync, kShflDown)
GEMMA3_EMU_SHFL(__shfl_xor_sync, kShflXor)
#undef GEMMA3_EMU_SHFL

inline void __syncwarp(unsigned mask = 0xFFFFFFFFu, const char* file = __builtin_FILE(),
                       int line = __builtin_LINE()) {
  gemma3_cuda_emu::detail::warp_op(gemma3_cuda_emu::detail::WarpOp::kSyncWarp, mask, 0, 0, warpSize, file,
                                   line);
}
inline unsigned __ballot_sync(unsigned mask, int predicate, const char* file = __builtin_FILE(),
                              int line = __builtin_LINE()) {
  return static_cast<unsigned>(gemma3_cuda_emu::detail::warp_op(
      gemma3_cuda_emu::detail::WarpOp::kBallot, mask, predicate != 0, 0, warpSize, file, line));
}
inline int __any_sync(unsigned mask, int predicate, const char* file = __builtin_FILE(),
                      int line = __builtin_LINE()) {
  return static_cast<int>(gemma3_cuda_emu::detail::warp_op(gemma3_cuda_emu::detail::WarpOp::kAny, mask,
                                                           predicate != 0, 0, warpSize, file, line));
}
inline int __all_sync(unsigned mask, int predicate, const char* file = __builtin_FILE(),
                      int line = __builtin_LINE()) {
  return static_cast<int>(gemma3_cuda_emu::detail::warp_op(gemma3_cuda_emu::detail::WarpOp::kAll, mask,
                                                           predicate != 0, 0, warpSize, file, line));
}

// ---- launches ---------------------------------------------------------------------------

namespace gemma3_cuda_emu {

struct LaunchSite {
  const char* kernel;  // the kernel expression as written at the launch
  const char* file;    // the launch's file and line
  int line;
};

namespace detail {
// Runs body(ctx) once per CUDA thread of every block (the current thread's indices in
// threadIdx/blockIdx), after checking the configuration; returns the launch error (also kept
// for cudaGetLastError).
cudaError_t run_grid(const LaunchSite& site, dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                     void (*body)(void*), void* ctx);
// Aborts unless p is null or inside (or one past) a live cudaMalloc allocation.
void check_kernel_pointer(const LaunchSite& site, int index, const void* p);
// Whether work issued to `stream` now is captured (cudaStreamBeginCapture) rather than run.
bool capturing(cudaStream_t stream);
// Checks the configuration and keeps `node` as the capturing stream's next graph node (run with
// the stream the graph is launched on); the launch error, as cudaGetLastError would see it.
cudaError_t capture_launch(dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                           std::function<void(cudaStream_t)> node);
}  // namespace detail

// GEMMA3_LAUNCH(kernel, grid, block, smem, stream, args...): the arguments are copied once,
// as the kernel's parameters are, and every CUDA thread calls kernel(copies...). The call is a
// lambda holding the kernel by value (a launcher may pick it into a local), so that a captured
// launch can run after the launcher returns.
template <class F>
class Launch {
 public:
  Launch(const char* kernel, const char* file, int line, dim3 grid, dim3 block, size_t smem,
         cudaStream_t stream, F call)
      : site_{kernel, file, line}, grid_(grid), block_(block), smem_(smem), stream_(stream), call_(call) {}

  template <class... A>
  void operator()(A&&... args) {
    using Params = std::tuple<std::decay_t<A>...>;
    Params params(std::forward<A>(args)...);
    // Captured into a graph: the node owns copies of the parameters, as a CUDA graph's kernel
    // node does, and checks them again each time it runs.
    if (detail::capturing(stream_)) {
      detail::capture_launch(grid_, block_, smem_, stream_,
                             [site = site_, grid = grid_, block = block_, smem = smem_, call = call_, params](
                                 cudaStream_t s) mutable { run(site, grid, block, smem, s, call, params); });
      return;
    }
    run(site_, grid_, block_, smem_, stream_, call_, params);
  }

 private:
  template <class Params>
  static void run(const LaunchSite& site, dim3 grid, dim3 block, size_t smem, cudaStream_t stream, F& call,
                  Params& params) {
    check_pointers(site, params, std::make_index_sequence<std::tuple_size_v<Params>>{});
    struct Ctx {
      F* call;
      Params* params;
    } ctx{&call, &params};
    detail::run_grid(
        site, grid, block, smem, stream,
        [](void* c) {
          auto* x = static_cast<Ctx*>(c);
          std::apply(*x->call, *x->params);
        },
        &ctx);
  }

  template <class Tuple, size_t... I>
  static void check_pointers(const LaunchSite& site, const Tuple& t, std::index_sequence<I...>) {
    (check_pointer(site, static_cast<int>(I), std::get<I>(t)), ...);
  }
  template <class T>
  static void check_pointer(const LaunchSite& site, int index, const T& v) {
    if constexpr (std::is_pointer_v<T>) detail::check_kernel_pointer(site, index, v);
  }

  LaunchSite site_;
  dim3 grid_, block_;
  size_t smem_;
  cudaStream_t stream_;
  F call_;
};

}  // namespace gemma3_cuda_emu

#define GEMMA3_LAUNCH(kernel, grid, block, smem, stream, ...)                               \
  ::gemma3_cuda_emu::Launch(#kernel, __FILE__, __LINE__, (grid), (block), (smem), (stream), \
                            [=](auto&... gemma3_emu_params) { kernel(gemma3_emu_params...); })(__VA_ARGS__)
#define GEMMA3_DYNAMIC_SHARED(T, name) T* const name = ::gemma3_cuda_emu::dynamic_shared<T>()

// ---- cuBLAS (the calls the backend makes; reference loops in cuda_emu.cpp) ---------------

struct cublasContext;
typedef cublasContext* cublasHandle_t;
enum cublasStatus_t {
  CUBLAS_STATUS_SUCCESS = 0,
  CUBLAS_STATUS_NOT_INITIALIZED = 1,
  CUBLAS_STATUS_ALLOC_FAILED = 3,
  CUBLAS_STATUS_INVALID_VALUE = 7,
  CUBLAS_STATUS_ARCH_MISMATCH = 8,
  CUBLAS_STATUS_MAPPING_ERROR = 11,
  CUBLAS_STATUS_EXECUTION_FAILED = 13,
  CUBLAS_STATUS_INTERNAL_ERROR = 14,
  CUBLAS_STATUS_NOT_SUPPORTED = 15,
};
enum cublasOperation_t { CUBLAS_OP_N = 0, CUBLAS_OP_T = 1, CUBLAS_OP_C = 2 };
enum cublasMath_t {
  CUBLAS_DEFAULT_MATH = 0,
  CUBLAS_TENSOR_OP_MATH = 1,
  CUBLAS_PEDANTIC_MATH = 2,
  CUBLAS_TF32_TENSOR_OP_MATH = 3,
};
enum cudaDataType_t {
  CUDA_R_32F = 0,
  CUDA_R_64F = 1,
  CUDA_R_16F = 2,
  CUDA_R_8I = 3,
  CUDA_R_32I = 10,
  CUDA_R_16BF = 14
};
typedef cudaDataType_t cudaDataType;
enum cublasComputeType_t {
  CUBLAS_COMPUTE_16F = 64,
  CUBLAS_COMPUTE_32F = 68,
  CUBLAS_COMPUTE_32F_PEDANTIC = 69,
  CUBLAS_COMPUTE_64F = 70,
  CUBLAS_COMPUTE_32F_FAST_16F = 74,
  CUBLAS_COMPUTE_32F_FAST_16BF = 75,
  CUBLAS_COMPUTE_32F_FAST_TF32 = 77,
};
enum cublasGemmAlgo_t { CUBLAS_GEMM_DEFAULT = -1, CUBLAS_GEMM_DEFAULT_TENSOR_OP = 99 };

cublasStatus_t cublasCreate(cublasHandle_t* handle);
cublasStatus_t cublasDestroy(cublasHandle_t handle);
cublasStatus_t cublasSetStream(cublasHandle_t handle, cudaStream_t stream);
cublasStatus_t cublasSetMathMode(cublasHandle_t handle, cublasMath_t mode);
const char* cublasGetStatusString(cublasStatus_t status);
// C = alpha op(A) op(B) + beta C, column-major, fp32 data and fp32 accumulation only (any
// other type: CUBLAS_STATUS_NOT_SUPPORTED); beta == 0 never reads C.
cublasStatus_t cublasGemmEx(cublasHandle_t handle, cublasOperation_t transa, cublasOperation_t transb, int m,
                            int n, int k, const void* alpha, const void* A, cudaDataType_t Atype, int lda,
                            const void* B, cudaDataType_t Btype, int ldb, const void* beta, void* C,
                            cudaDataType_t Ctype, int ldc, cublasComputeType_t computeType,
                            cublasGemmAlgo_t algo);
cublasStatus_t cublasSgemm(cublasHandle_t handle, cublasOperation_t transa, cublasOperation_t transb, int m,
                           int n, int k, const float* alpha, const float* A, int lda, const float* B, int ldb,
                           const float* beta, float* C, int ldc);

// ---- CUB (DeviceRadixSort, reference: a stable sort of the radix-ordered keys) ------------

namespace gemma3_cuda_emu::detail {
// Aborts (naming `what`) unless [p, p + bytes) lies inside one live cudaMalloc allocation.
void check_device_range(const char* what, const void* p, size_t bytes);
bool stream_ok(cudaStream_t s);

// The unsigned key CUB's radix sort orders: floats with the sign bit flipped (negative:
// every bit), so -0 < +0 and NaNs sort by their bits, beyond the infinities.
template <class K>
auto radix_key(K k) {
  if constexpr (std::is_floating_point_v<K>) {
    using U = std::conditional_t<sizeof(K) == 4, uint32_t, uint64_t>;
    U u;
    std::memcpy(&u, &k, sizeof(K));
    constexpr U kSign = U{1} << (8 * sizeof(K) - 1);
    return (u & kSign) ? static_cast<U>(~u) : static_cast<U>(u | kSign);
  } else if constexpr (std::is_signed_v<K>) {
    using U = std::make_unsigned_t<K>;
    return static_cast<U>(static_cast<U>(k) ^ (U{1} << (8 * sizeof(K) - 1)));
  } else {
    return k;
  }
}

template <class K, class V>
cudaError_t radix_sort_pairs(bool descending, void* temp, size_t& temp_bytes, const K* keys_in, K* keys_out,
                             const V* values_in, V* values_out, int64_t n, int begin_bit, int end_bit,
                             cudaStream_t stream) {
  const size_t need = static_cast<size_t>(n > 0 ? n : 0) * sizeof(uint32_t) + 16;
  if (!temp) {  // size query: no work
    temp_bytes = need;
    return cudaSuccess;
  }
  if (temp_bytes < need || n < 0 || n > 0xFFFFFFFFll || begin_bit < 0 || end_bit > int(8 * sizeof(K)) ||
      begin_bit >= end_bit || !stream_ok(stream))
    return cudaErrorInvalidValue;
  if (capturing(stream)) return cudaErrorStreamCaptureUnsupported;  // not emulated in captures
  if (n == 0) return cudaSuccess;
  const size_t kb = static_cast<size_t>(n) * sizeof(K), vb = static_cast<size_t>(n) * sizeof(V);
  check_device_range("cub::DeviceRadixSort temporary storage", temp, need);
  check_device_range("cub::DeviceRadixSort keys in", keys_in, kb);
  check_device_range("cub::DeviceRadixSort keys out", keys_out, kb);
  check_device_range("cub::DeviceRadixSort values in", values_in, vb);
  check_device_range("cub::DeviceRadixSort values out", values_out, vb);
  // The order lives in the caller's temporary storage, as CUB's own passes do.
  uint32_t* order = static_cast<uint32_t*>(temp);
  using U = decltype(radix_key(K{}));
  const int bits = end_bit - begin_bit;
  const U digit_mask =
      bits >= int(8 * sizeof(U)) ? static_cast<U>(~U{0}) : static_cast<U>((U{1} << bits) - 1);
  std::vector<U> digits(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) {
    order[i] = static_cast<uint32_t>(i);
    digits[i] = static_cast<U>((radix_key(keys_in[i]) >> begin_bit) & digit_mask);
  }
  std::stable_sort(order, order + n, [&](uint32_t a, uint32_t b) {
    return descending ? digits[a] > digits[b] : digits[a] < digits[b];
  });
  for (int64_t i = 0; i < n; ++i) {
    keys_out[i] = keys_in[order[i]];
    values_out[i] = values_in[order[i]];
  }
  return cudaSuccess;
}
}  // namespace gemma3_cuda_emu::detail

namespace cub {
struct DeviceRadixSort {
  template <class K, class V, class N>
  static cudaError_t SortPairs(void* d_temp_storage, size_t& temp_storage_bytes, const K* d_keys_in,
                               K* d_keys_out, const V* d_values_in, V* d_values_out, N num_items,
                               int begin_bit = 0, int end_bit = sizeof(K) * 8,
                               cudaStream_t stream = nullptr) {
    return gemma3_cuda_emu::detail::radix_sort_pairs(
        false, d_temp_storage, temp_storage_bytes, d_keys_in, d_keys_out, d_values_in, d_values_out,
        static_cast<int64_t>(num_items), begin_bit, end_bit, stream);
  }
  template <class K, class V, class N>
  static cudaError_t SortPairsDescending(void* d_temp_storage, size_t& temp_storage_bytes, const K* d_keys_in,
                                         K* d_keys_out, const V* d_values_in, V* d_values_out, N num_items,
                                         int begin_bit = 0, int end_bit = sizeof(K) * 8,
                                         cudaStream_t stream = nullptr) {
    return gemma3_cuda_emu::detail::radix_sort_pairs(
        true, d_temp_storage, temp_storage_bytes, d_keys_in, d_keys_out, d_values_in, d_values_out,
        static_cast<int64_t>(num_items), begin_bit, end_bit, stream);
  }
};
}  // namespace cub
