// The CUDA emulator itself (tools/cuda-emu; these tests exist only in GEMMA3_CUDA_EMU builds,
// where CMake compiles this file like kernels/*.cu). Warp operations return what the CUDA
// programming guide specifies, and every kind of bug the emulator exists to catch ends the
// process with a report naming it: a shuffle that only part of the warp reaches, a barrier
// that a thread never reaches, a write one past dynamic shared memory (ASan) or a static
// __shared__ array (UBSan's bounds check, else ASan), a host pointer handed to a kernel.
// tools/cuda-emu/mutation-check.sh shows the same on the real attention kernel.
#if defined(GEMMA3_CUDA_EMU)

#include <gtest/gtest.h>

#include <functional>
#include <utility>
#include <vector>

#include "backend/backend.h"

namespace {

// The point of this build: the CUDA suites run on the emulated backend. Were the library unable
// to find it, every Cuda* test would skip and the stage would pass having run nothing (as it
// did between the CUDA module's commit and this test).
TEST(CudaEmu, TheEmulatedBackendIsAvailable) {
  EXPECT_TRUE(gemma3::cuda_backend_available());
  auto b = gemma3::make_cuda_backend({});
  ASSERT_TRUE(b.ok()) << b.status().to_string();
}

constexpr unsigned kFull = 0xFFFFFFFFu;

// Device buffer of n ints, freed at scope exit.
struct DeviceInts {
  explicit DeviceInts(size_t n) : n(n) { EXPECT_EQ(cudaMalloc(&p, n * sizeof(int)), cudaSuccess); }
  ~DeviceInts() { cudaFree(p); }
  std::vector<int> read() const {
    std::vector<int> v(n);
    EXPECT_EQ(cudaMemcpy(v.data(), p, n * sizeof(int), cudaMemcpyDeviceToHost), cudaSuccess);
    return v;
  }
  int* p = nullptr;
  size_t n;
};

// out[t * 8 + k] for thread t: the shuffles and votes below.
__global__ void warp_ops_kernel(int* out) {
  const int t = threadIdx.x, lane = t % 32;
  int* o = out + t * 8;
  o[0] = __shfl_xor_sync(kFull, lane * 10, 1);
  o[1] = __shfl_down_sync(kFull, lane * 10, 3, 16);  // segments of 16: the last 3 keep their own
  o[2] = __shfl_up_sync(kFull, lane * 10, 2, 8);     // segments of 8: the first 2 keep their own
  o[3] = __shfl_sync(kFull, lane * 10, 37);          // 37 % 32 = lane 5
  o[4] = static_cast<int>(__ballot_sync(kFull, lane % 3 == 0));
  o[5] = __any_sync(kFull, lane == 31);
  o[6] = __all_sync(kFull, lane < 31);
  // Half-warp masks: lanes 0-15 and 16-31 shuffle separately.
  const unsigned half = lane < 16 ? 0x0000FFFFu : 0xFFFF0000u;
  o[7] = __shfl_sync(half, lane * 10, lane < 16 ? 3 : 20);
}

TEST(CudaEmu, WarpOperationsFollowTheProgrammingGuide) {
  const int threads = 64;
  DeviceInts out(threads * 8);
  GEMMA3_LAUNCH(warp_ops_kernel, 1, threads, 0, nullptr, out.p);
  ASSERT_EQ(cudaGetLastError(), cudaSuccess);
  const auto v = out.read();
  unsigned ballot = 0;
  for (int l = 0; l < 32; l += 3) ballot |= 1u << l;
  for (int t = 0; t < threads; ++t) {
    const int lane = t % 32;
    const int* o = v.data() + t * 8;
    EXPECT_EQ(o[0], (lane ^ 1) * 10) << t;
    EXPECT_EQ(o[1], (lane % 16 + 3 < 16 ? lane + 3 : lane) * 10) << t;
    EXPECT_EQ(o[2], (lane % 8 >= 2 ? lane - 2 : lane) * 10) << t;
    EXPECT_EQ(o[3], 50) << t;
    EXPECT_EQ(static_cast<unsigned>(o[4]), ballot) << t;
    EXPECT_EQ(o[5], 1) << t;
    EXPECT_EQ(o[6], 0) << t;
    EXPECT_EQ(o[7], lane < 16 ? 30 : 200) << t;
  }
}

// Each thread writes its slot, the barrier, then reads its neighbour's: right under every
// policy because of the barrier. out[t] = t + 1 (mod n), out[n] = __syncthreads_count.
__global__ void barrier_kernel(int* out) {
  __shared__ int slots[256];
  const int t = threadIdx.x, n = blockDim.x;
  slots[t] = t;
  __syncthreads();
  out[t] = slots[(t + 1) % n];
  const int count = __syncthreads_count(t % 4 == 0);
  if (t == 0) out[n] = count;
}

TEST(CudaEmu, BarriersOrderSharedMemory) {
  const int threads = 256;
  DeviceInts out(threads + 1);
  GEMMA3_LAUNCH(barrier_kernel, 3, threads, 0, nullptr, out.p);
  ASSERT_EQ(cudaGetLastError(), cudaSuccess);
  const auto v = out.read();
  for (int t = 0; t < threads; ++t) EXPECT_EQ(v[t], (t + 1) % threads);
  EXPECT_EQ(v[threads], threads / 4);
}

TEST(CudaEmu, BadLaunchConfigurationsAreLaunchErrors) {
  DeviceInts out(1);
  GEMMA3_LAUNCH(barrier_kernel, 1, 2048, 0, nullptr, out.p);  // > 1024 threads
  EXPECT_EQ(cudaGetLastError(), cudaErrorInvalidConfiguration);
  GEMMA3_LAUNCH(barrier_kernel, 0, 32, 0, nullptr, out.p);  // empty grid
  EXPECT_EQ(cudaGetLastError(), cudaErrorInvalidConfiguration);
  EXPECT_EQ(cudaGetLastError(), cudaSuccess);  // read once, then cleared
}

// ---- stream capture and graphs ---------------------------------------------------------------

// out[i] += *step for i < blockDim.x: reads its input from device memory, as a recorded step does.
__global__ void add_step_kernel(const int* step, int* out) { out[threadIdx.x] += *step; }

// Captured work is kept, not run; each launch of the graph runs it again in capture order,
// with the parameters of the capture and the device memory of the moment (the step input
// written between launches). A local kernel pointer (as launchers pick kernels) outlives the
// capture in the node.
TEST(CudaEmu, CapturedWorkRunsOnEachGraphLaunch) {
  cudaStream_t s = nullptr;
  ASSERT_EQ(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking), cudaSuccess);
  DeviceInts step(1), out(4), copy(4);
  ASSERT_EQ(cudaMemset(out.p, 0, 4 * sizeof(int)), cudaSuccess);
  ASSERT_EQ(cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal), cudaSuccess);
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  ASSERT_EQ(cudaStreamIsCapturing(s, &status), cudaSuccess);
  EXPECT_EQ(status, cudaStreamCaptureStatusActive);
  {
    auto kernel = add_step_kernel;  // goes out of scope before the graph runs
    GEMMA3_LAUNCH(kernel, 1, 4, 0, s, step.p, out.p);
  }
  EXPECT_EQ(cudaGetLastError(), cudaSuccess);
  ASSERT_EQ(cudaMemcpyAsync(copy.p, out.p, 4 * sizeof(int), cudaMemcpyDeviceToDevice, s), cudaSuccess);
  cudaGraph_t graph = nullptr;
  ASSERT_EQ(cudaStreamEndCapture(s, &graph), cudaSuccess);
  EXPECT_EQ(out.read(), std::vector<int>(4, 0));  // nothing ran
  cudaGraphExec_t exec = nullptr;
  ASSERT_EQ(cudaGraphInstantiate(&exec, graph, 0), cudaSuccess);
  EXPECT_EQ(cudaGraphDestroy(graph), cudaSuccess);  // the executable graph keeps its own nodes
  for (int v : {5, 7}) {
    ASSERT_EQ(cudaMemcpyAsync(step.p, &v, sizeof(int), cudaMemcpyHostToDevice, s), cudaSuccess);
    ASSERT_EQ(cudaGraphLaunch(exec, s), cudaSuccess);
  }
  EXPECT_EQ(out.read(), std::vector<int>(4, 12));
  EXPECT_EQ(copy.read(), std::vector<int>(4, 12));
  EXPECT_EQ(cudaGraphExecDestroy(exec), cudaSuccess);
  EXPECT_EQ(cudaStreamDestroy(s), cudaSuccess);
}

// What a capture may not contain fails with cudaErrorStreamCaptureUnsupported (or Implicit, for
// the legacy stream) and invalidates it, as on a GPU: a copy from host memory on the capturing
// stream, synchronizing it or the device, an allocation, a free. The capture then ends with
// cudaErrorStreamCaptureInvalidated and no graph, and the stream works normally again.
TEST(CudaEmu, CaptureRefusesHostCopiesSynchronizationAndAllocation) {
  cudaStream_t s = nullptr;
  ASSERT_EQ(cudaStreamCreateWithFlags(&s, cudaStreamDefault), cudaSuccess);
  DeviceInts d(1);
  int host = 3;
  void* p = nullptr;
  const std::vector<std::pair<const char*, std::function<cudaError_t()>>> refused = {
      {"host to device copy",
       [&] { return cudaMemcpyAsync(d.p, &host, sizeof(int), cudaMemcpyHostToDevice, s); }},
      {"device to host copy",
       [&] { return cudaMemcpyAsync(&host, d.p, sizeof(int), cudaMemcpyDeviceToHost, s); }},
      {"stream synchronize", [&] { return cudaStreamSynchronize(s); }},
      {"device synchronize", [&] { return cudaDeviceSynchronize(); }},
      {"cudaMalloc", [&] { return cudaMalloc(&p, 64); }},
      {"cudaFree", [&] { return cudaFree(d.p); }},
      {"legacy-stream copy", [&] { return cudaMemcpy(d.p, &host, sizeof(int), cudaMemcpyHostToDevice); }},
  };
  for (const auto& [what, call] : refused) {
    ASSERT_EQ(cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal), cudaSuccess) << what;
    const cudaError_t e = call();
    EXPECT_TRUE(e == cudaErrorStreamCaptureUnsupported || e == cudaErrorStreamCaptureImplicit)
        << what << ": " << cudaGetErrorName(e);
    cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
    EXPECT_EQ(cudaStreamIsCapturing(s, &status), cudaSuccess);
    EXPECT_EQ(status, cudaStreamCaptureStatusInvalidated) << what;
    cudaGraph_t graph = nullptr;
    EXPECT_EQ(cudaStreamEndCapture(s, &graph), cudaErrorStreamCaptureInvalidated) << what;
    EXPECT_EQ(graph, nullptr) << what;
    (void)cudaGetLastError();
  }
  EXPECT_EQ(p, nullptr);
  EXPECT_EQ(cudaMemcpyAsync(d.p, &host, sizeof(int), cudaMemcpyHostToDevice, s), cudaSuccess);
  EXPECT_EQ(d.read(), std::vector<int>{3});
  cudaGraph_t graph = nullptr;
  EXPECT_EQ(cudaStreamEndCapture(s, &graph), cudaErrorIllegalState);  // no capture in progress
  EXPECT_EQ(cudaStreamBeginCapture(nullptr, cudaStreamCaptureModeGlobal), cudaErrorStreamCaptureUnsupported);
  (void)cudaGetLastError();
  EXPECT_EQ(cudaStreamDestroy(s), cudaSuccess);
}

// ---- the bugs the emulator must catch (each ends the process: death tests) ------------------

__global__ void divergent_shuffle_kernel(int* out) {
  int v = threadIdx.x;
  if (threadIdx.x % 32 < 16) v = __shfl_xor_sync(kFull, v, 1);  // lanes 16-31 never come
  __syncthreads();
  out[threadIdx.x] = v;
}

__global__ void early_exit_kernel(int* out) {
  if (threadIdx.x == 5) return;  // never reaches the barrier the others wait at
  __syncthreads();
  out[threadIdx.x] = 1;
}

__global__ void dynamic_overrun_kernel(int* out) {
  GEMMA3_DYNAMIC_SHARED(float, s);  // blockDim.x floats
  s[threadIdx.x + 1] = 1.0f;        // the last thread writes one past the end
  out[threadIdx.x] = 0;
}

__global__ void static_overrun_kernel(int* out) {
  __shared__ float tile[32];
  tile[threadIdx.x + 1] = 1.0f;  // thread 31 writes tile[32]
  out[threadIdx.x] = 0;
}

class CudaEmuDeath : public ::testing::Test {
 protected:
  void SetUp() override { GTEST_FLAG_SET(death_test_style, "threadsafe"); }
};

TEST_F(CudaEmuDeath, DivergentShuffleIsReported) {
  DeviceInts out(64);
  EXPECT_DEATH(GEMMA3_LAUNCH(divergent_shuffle_kernel, 1, 64, 0, nullptr, out.p),
               "cuda-emu: error: divergent warp: .*__shfl_xor_sync.*kernel divergent_shuffle_kernel");
}

TEST_F(CudaEmuDeath, ThreadThatSkipsABarrierIsReported) {
  DeviceInts out(64);
  EXPECT_DEATH(GEMMA3_LAUNCH(early_exit_kernel, 1, 64, 0, nullptr, out.p),
               "cuda-emu: error: thread .* (exits while|after) .*kernel early_exit_kernel");
}

TEST_F(CudaEmuDeath, DynamicSharedMemoryOverrunIsReported) {
  DeviceInts out(64);
  EXPECT_DEATH(GEMMA3_LAUNCH(dynamic_overrun_kernel, 1, 64, 64 * sizeof(float), nullptr, out.p),
               "AddressSanitizer: heap-buffer-overflow");
}

TEST_F(CudaEmuDeath, StaticSharedMemoryOverrunIsReported) {
  DeviceInts out(32);
  EXPECT_DEATH(GEMMA3_LAUNCH(static_overrun_kernel, 1, 32, 0, nullptr, out.p),
               "runtime error: index 32 out of bounds|AddressSanitizer: global-buffer-overflow");
}

TEST_F(CudaEmuDeath, HostPointerArgumentIsReported) {
  std::vector<int> host(64);
  EXPECT_DEATH(GEMMA3_LAUNCH(early_exit_kernel, 1, 32, 0, nullptr, host.data()),
               "kernel early_exit_kernel.*argument 1 .* is not device memory");
}

// A graph keeps the pointers it was captured with: run after one of its buffers is freed, the
// node's launch reports the dangling argument instead of reading freed memory.
void run_graph_after_freeing_its_output() {
  cudaStream_t s = nullptr;
  cudaStreamCreate(&s);
  int *step = nullptr, *out = nullptr;
  cudaMalloc(&step, sizeof(int));
  cudaMalloc(&out, 32 * sizeof(int));
  cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal);
  GEMMA3_LAUNCH(add_step_kernel, 1, 32, 0, s, step, out);
  cudaGraph_t graph = nullptr;
  cudaStreamEndCapture(s, &graph);
  cudaGraphExec_t exec = nullptr;
  cudaGraphInstantiate(&exec, graph, 0);
  cudaFree(out);
  cudaGraphLaunch(exec, s);
}

TEST_F(CudaEmuDeath, GraphOverAFreedBufferIsReported) {
  EXPECT_DEATH(run_graph_after_freeing_its_output(), "add_step_kernel.*argument 2.*not device memory");
}

}  // namespace

#endif  // GEMMA3_CUDA_EMU
