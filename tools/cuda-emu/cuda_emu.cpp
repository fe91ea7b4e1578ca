// The CUDA emulator's runtime (cuda_emu.h): the fiber scheduler that runs a kernel's threads,
// the checks of barriers and warp operations, device memory, streams and events, and the
// cuBLAS reference. One CUDA thread = one fiber with its own stack; a block's fibers switch
// only at __syncthreads and warp operations, blocks run one after another. A fiber that stops
// at one records why, and the scheduling step (the checks, then the policy's pick) runs on its
// stack and switches straight to the next fiber; the launching thread's stack sees only the
// start and the end of each block.
//
// Fibers switch with a dozen instructions of assembly on x86-64 (ucontext's swapcontext makes
// a system call per switch, ~30x slower; it is the fallback elsewhere). ASan is told about the
// stack switches (__sanitizer_start/finish_switch_fiber), so that a report inside a kernel
// shows the kernel's stack: once per block that the stack is the whole region of fiber stacks
// (each fiber's frames lie in it), or at every switch when fake stacks are on
// (detect_stack_use_after_return=1), which costs twice the time. This file itself is built
// without instrumentation (CMakeLists.txt): it is the hot path, and not what is under test.
#include "cuda_emu.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <unistd.h>

#include <array>
#include <chrono>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <thread>

#if defined(__SANITIZE_ADDRESS__) || defined(GEMMA3_CUDA_EMU_ASAN)
#define GEMMA3_EMU_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define GEMMA3_EMU_ASAN 1
#endif
#endif
#if defined(GEMMA3_EMU_ASAN)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
extern "C" __attribute__((weak)) int __asan_option_detect_stack_use_after_return;
#endif

#if !defined(__x86_64__) || defined(GEMMA3_CUDA_EMU_UCONTEXT)
#define GEMMA3_EMU_UCONTEXT 1
#include <ucontext.h>
#endif

namespace gemma3_cuda_emu {
namespace detail {
uint3 thread_idx{0, 0, 0}, block_idx{0, 0, 0};
dim3 block_dim, grid_dim;
}  // namespace detail

namespace {

// ---- options and errors ---------------------------------------------------------------------

enum class Policy { kRoundRobin, kLowFirst, kHighFirst, kRandom };

struct Options {
  Policy policy = Policy::kRoundRobin;
  uint64_t seed = 1;
  std::string text = "round-robin";
  size_t memory_bytes = size_t{16} << 30;
};

[[noreturn]] void die(const char* fmt, ...) __attribute__((format(printf, 1, 2)));
void die(const char* fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  fputs("cuda-emu: error: ", stderr);
  vfprintf(stderr, fmt, ap);
  fputc('\n', stderr);
  va_end(ap);
  fflush(stderr);
  abort();
}

// GEMMA3_CUDA_EMU_POLICY: round-robin (default), low-first, high-first, random[:SEED];
// GEMMA3_CUDA_EMU_MEMORY_MIB: the emulated device memory (default 16384).
const Options& options() {
  static const Options o = [] {
    Options r;
    if (const char* p = getenv("GEMMA3_CUDA_EMU_POLICY"); p && *p) {
      const std::string s = p;
      r.text = s;
      if (s == "round-robin") {
        r.policy = Policy::kRoundRobin;
      } else if (s == "low-first") {
        r.policy = Policy::kLowFirst;
      } else if (s == "high-first") {
        r.policy = Policy::kHighFirst;
      } else if (s == "random" || s.rfind("random:", 0) == 0) {
        r.policy = Policy::kRandom;
        if (s.size() > 7) {
          char* end = nullptr;
          r.seed = strtoull(s.c_str() + 7, &end, 10);
          if (*end != '\0' || s.size() == 7)
            die("GEMMA3_CUDA_EMU_POLICY=%s: the seed after random: is not a number", p);
        }
      } else {
        die("GEMMA3_CUDA_EMU_POLICY=%s: expected round-robin, low-first, high-first, random or random:SEED",
            p);
      }
    }
    if (const char* m = getenv("GEMMA3_CUDA_EMU_MEMORY_MIB"); m && *m) {
      char* end = nullptr;
      const unsigned long long mib = strtoull(m, &end, 10);
      if (*end != '\0' || mib == 0)
        die("GEMMA3_CUDA_EMU_MEMORY_MIB=%s: expected a positive number of MiB", m);
      r.memory_bytes = static_cast<size_t>(mib) << 20;
    }
    return r;
  }();
  return o;
}

// "kernels/x.cu" rather than the absolute path the build passed to the compiler.
const char* short_path(const char* file) {
  if (!file) return "?";
  for (const char* marker : {"/kernels/", "/src/", "/tools/", "/tests/"}) {
    const char* best = nullptr;
    for (const char* p = strstr(file, marker); p; p = strstr(p + 1, marker)) best = p;
    if (best) return best + 1;
  }
  return file;
}

thread_local cudaError_t last_error = cudaSuccess;
cudaError_t record(cudaError_t e) {
  if (e != cudaSuccess) last_error = e;
  return e;
}

// ---- device memory ---------------------------------------------------------------------------

std::mutex mem_mutex;
std::map<uintptr_t, size_t> allocations;  // base -> bytes, every live cudaMalloc
size_t allocated = 0;

// The allocation holding [p, p + bytes) (one past its end when bytes == 0), or end().
std::map<uintptr_t, size_t>::const_iterator find_allocation(const void* p, size_t bytes) {
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  auto it = allocations.upper_bound(a);
  if (it == allocations.begin()) return allocations.end();
  --it;
  const uintptr_t end = it->first + it->second;
  if (a < it->first || a > end || bytes > end - a) return allocations.end();
  return it;
}

// ---- driver virtual memory (cuda_emu.h): reservations, handles, mappings

struct Reservation {
  size_t bytes = 0;
  void* mmap_base = nullptr;  // the mmap'd region the aligned range lies in
  size_t mmap_bytes = 0;
  struct Mapping {
    size_t bytes;
    CUmemGenericAllocationHandle handle;
    bool accessible;  // cuMemSetAccess done
  };
  std::map<uintptr_t, Mapping> mapped;  // start -> mapping
};
std::map<uintptr_t, Reservation> reservations;                            // aligned start -> reservation
std::map<CUmemGenericAllocationHandle, std::pair<size_t, bool>> handles;  // -> (bytes, mapped)
CUmemGenericAllocationHandle next_handle = 1;

Reservation* find_reservation(uintptr_t a, size_t bytes) {
  auto it = reservations.upper_bound(a);
  if (it == reservations.begin()) return nullptr;
  --it;
  if (a < it->first || a - it->first > it->second.bytes || bytes > it->second.bytes - (a - it->first))
    return nullptr;
  return &it->second;
}

// Whether [p, p + bytes) lies in accessible mappings of one reservation that follow each other
// with no gap (one past the end counts when bytes == 0).
bool in_accessible_mappings(const void* p, size_t bytes) {
  const uintptr_t a = reinterpret_cast<uintptr_t>(p), end = a + bytes;
  Reservation* r = find_reservation(a, bytes);
  if (!r) return false;
  auto it = r->mapped.upper_bound(a);
  if (it == r->mapped.begin()) return false;
  --it;  // the mapping starting at or before a
  uintptr_t at = it->first + it->second.bytes;
  if (!it->second.accessible || a > at) return false;
  while (end > at) {  // the rest must be in the next mapping, starting where this one ends
    ++it;
    if (it == r->mapped.end() || it->first != at || !it->second.accessible) return false;
    at += it->second.bytes;
  }
  return true;
}

bool is_device_range(const void* p, size_t bytes) {
  std::lock_guard<std::mutex> lock(mem_mutex);
  return find_allocation(p, bytes) != allocations.end() || in_accessible_mappings(p, bytes);
}

// For the copy and memset calls: CUDA returns cudaErrorInvalidValue for such a pointer; say why.
bool device_range_or_report(const char* call, const char* which, const void* p, size_t bytes) {
  if (bytes == 0 || is_device_range(p, bytes)) return true;
  fprintf(stderr,
          "cuda-emu: %s: the %s range [%p, +%zu bytes) is not inside one live cudaMalloc allocation "
          "(returning cudaErrorInvalidValue)\n",
          call, which, p, bytes);
  return false;
}

// ---- streams, events, cuBLAS handles ---------------------------------------------------------

std::mutex handle_mutex;
std::set<const void*> live_handles;  // streams, events and cuBLAS handles

template <class T>
T* new_handle() {
  T* h = new T();
  std::lock_guard<std::mutex> lock(handle_mutex);
  live_handles.insert(h);
  return h;
}
bool handle_live(const void* h) {
  std::lock_guard<std::mutex> lock(handle_mutex);
  return live_handles.count(h) != 0;
}
template <class T>
bool delete_handle(T* h) {
  {
    std::lock_guard<std::mutex> lock(handle_mutex);
    if (live_handles.erase(h) == 0) return false;
  }
  delete h;
  return true;
}

}  // namespace
}  // namespace gemma3_cuda_emu

// A stream capture in progress (cudaStreamBeginCapture .. cudaStreamEndCapture).
struct EmuCapture {
  std::vector<std::function<void(cudaStream_t)>> nodes;
  cudaStreamCaptureMode mode = cudaStreamCaptureModeGlobal;
  std::thread::id thread;
  bool invalidated = false;
};
struct CUstream_st {
  unsigned flags = 0;
  std::unique_ptr<EmuCapture> capture;  // under capture_mutex
};
struct CUgraph_st {
  std::vector<std::function<void(cudaStream_t)>> nodes;
};
struct CUgraphExec_st {
  std::vector<std::function<void(cudaStream_t)>> nodes;
};
struct CUevent_st {
  unsigned flags = 0;
  bool recorded = false;
  std::chrono::steady_clock::time_point when;
};
struct cublasContext {
  cudaStream_t stream = nullptr;
  cublasMath_t mode = CUBLAS_DEFAULT_MATH;
};

namespace gemma3_cuda_emu {
namespace detail {

bool stream_ok(cudaStream_t s) { return s == nullptr || handle_live(s); }

void check_device_range(const char* what, const void* p, size_t bytes) {
  if (bytes == 0 || is_device_range(p, bytes)) return;
  die("%s: [%p, +%zu bytes) is not inside one live cudaMalloc allocation", what, p, bytes);
}

}  // namespace detail

// ---- stream capture --------------------------------------------------------------------------

namespace {
cudaError_t check_config(dim3 grid, dim3 block, size_t smem);  // launches, below

std::mutex capture_mutex;
std::set<cudaStream_t> capturing_streams;  // streams with a capture in progress

EmuCapture* capture_of(cudaStream_t s) {  // under capture_mutex
  return s && handle_live(s) && s->capture ? s->capture.get() : nullptr;
}

// For a call a capture may not contain (allocation, device synchronization, the legacy stream):
// true, invalidating them, when a capture it would break is in progress (global mode: any
// thread's; thread-local: this thread's); `legacy` calls only break captures of blocking streams.
bool breaks_capture(const char* call, bool legacy = false) {
  std::lock_guard<std::mutex> lock(capture_mutex);
  bool broke = false;
  for (cudaStream_t s : capturing_streams) {
    EmuCapture* c = s->capture.get();
    if (c->mode == cudaStreamCaptureModeThreadLocal && c->thread != std::this_thread::get_id()) continue;
    if (legacy && (s->flags & cudaStreamNonBlocking)) continue;
    if (!c->invalidated)
      fprintf(stderr, "cuda-emu: %s during a stream capture: the capture is invalidated\n", call);
    c->invalidated = true;
    broke = true;
  }
  return broke;
}

// The capture of a stream (invalidating it) for a call that is not allowed on a capturing stream.
bool refuse_on_capturing(const char* call, cudaStream_t s) {
  std::lock_guard<std::mutex> lock(capture_mutex);
  EmuCapture* c = capture_of(s);
  if (!c) return false;
  if (!c->invalidated)
    fprintf(stderr, "cuda-emu: %s on a capturing stream: the capture is invalidated\n", call);
  c->invalidated = true;
  return true;
}
}  // namespace

namespace detail {
bool capturing(cudaStream_t stream) {
  if (!stream) return false;
  std::lock_guard<std::mutex> lock(capture_mutex);
  return capture_of(stream) != nullptr;
}

cudaError_t capture_launch(dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                           std::function<void(cudaStream_t)> node) {
  const cudaError_t e = check_config(grid, block, smem);
  std::lock_guard<std::mutex> lock(capture_mutex);
  EmuCapture* c = capture_of(stream);
  if (!c) return record(cudaErrorInvalidResourceHandle);
  if (c->invalidated) return record(cudaErrorStreamCaptureInvalidated);
  if (e != cudaSuccess) {
    c->invalidated = true;
    return record(e);
  }
  c->nodes.push_back(std::move(node));
  return cudaSuccess;
}
}  // namespace detail

namespace {

// ---- fibers ------------------------------------------------------------------------------

#if !defined(GEMMA3_EMU_UCONTEXT)
// Saves the callee-saved registers on the current stack, stores the stack pointer in *save_sp
// and continues on new_sp, popping what an earlier switch (or start_fiber) left there.
extern "C" void gemma3_cuda_emu_switch(void** save_sp, void* new_sp);
asm(R"(
  .text
  .p2align 4
  .globl gemma3_cuda_emu_switch
  .type gemma3_cuda_emu_switch, @function
gemma3_cuda_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size gemma3_cuda_emu_switch, .-gemma3_cuda_emu_switch
)");
#endif

// One fiber stack per CUDA thread of the largest block so far, each above a guard page.
class Stacks {
 public:
  static constexpr size_t kStackBytes = size_t{256} << 10;  // ASan's frames and reports fit

  ~Stacks() {
    if (region_) munmap(region_, count_ * stride());
  }
  void reserve(int n) {
    if (n <= count_) return;
    if (region_) munmap(region_, count_ * stride());
    const int count = n < 256 ? 256 : 1024;
    void* r = mmap(nullptr, count * stride(), PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (r == MAP_FAILED) die("cannot map %d fiber stacks of %zu KiB", count, kStackBytes >> 10);
    region_ = static_cast<char*>(r);
    count_ = count;
    for (int i = 0; i < count; ++i) mprotect(region_ + i * stride(), page(), PROT_NONE);
#if defined(GEMMA3_EMU_ASAN)
    ASAN_UNPOISON_MEMORY_REGION(region_, count_ * stride());
#endif
  }
  char* bottom(int i) const { return region_ + i * stride() + page(); }
  char* region() const { return region_; }  // every stack (and guard page)
  size_t region_bytes() const { return count_ * stride(); }

 private:
  static size_t page() {
    static const size_t p = static_cast<size_t>(sysconf(_SC_PAGESIZE));
    return p;
  }
  static size_t stride() { return kStackBytes + page(); }
  char* region_ = nullptr;
  int count_ = 0;
};

// ---- the scheduler -----------------------------------------------------------------------

enum class State : uint8_t { kRunnable, kBarrier, kWarp, kDone };
using detail::BarrierOp;
using detail::WarpOp;

struct Thread {
  void* sp = nullptr;  // saved stack pointer while switched out (x86-64)
#if defined(GEMMA3_EMU_UCONTEXT)
  ucontext_t ctx;
#endif
  void* fake_stack = nullptr;  // ASan's fake stack of this fiber
  uint3 idx{0, 0, 0};          // threadIdx
  State state = State::kDone;
  // The pending barrier or warp operation, and its result.
  WarpOp op = WarpOp::kSyncWarp;
  BarrierOp bop = BarrierOp::kPlain;
  unsigned mask = 0;
  int arg = 0, width = 32;
  uint64_t value = 0, result = 0;
  const char* file = nullptr;
  int line = 0;
};

const char* op_name(WarpOp op) {
  switch (op) {
    case WarpOp::kShflIdx: return "__shfl_sync";
    case WarpOp::kShflUp: return "__shfl_up_sync";
    case WarpOp::kShflDown: return "__shfl_down_sync";
    case WarpOp::kShflXor: return "__shfl_xor_sync";
    case WarpOp::kSyncWarp: return "__syncwarp";
    case WarpOp::kBallot: return "__ballot_sync";
    case WarpOp::kAny: return "__any_sync";
    case WarpOp::kAll: return "__all_sync";
  }
  return "?";
}
const char* barrier_name(BarrierOp op) {
  switch (op) {
    case BarrierOp::kPlain: return "__syncthreads";
    case BarrierOp::kCount: return "__syncthreads_count";
    case BarrierOp::kAnd: return "__syncthreads_and";
    case BarrierOp::kOr: return "__syncthreads_or";
  }
  return "?";
}
bool same_site(const char* f1, int l1, const char* f2, int l2) {
  return l1 == l2 && (f1 == f2 || (f1 && f2 && strcmp(f1, f2) == 0));
}

class Scheduler {
 public:
  cudaError_t run(const LaunchSite& site, dim3 grid, dim3 block, size_t smem, void (*body)(void*), void* ctx);
  uint64_t warp_op(WarpOp op, unsigned mask, uint64_t value, int arg, int width, const char* file, int line);
  int barrier(BarrierOp op, int predicate, const char* file, int line);
  void* dynamic_shared();
  [[noreturn]] void fiber_main();

 private:
  void run_block();
  int pick();
  Thread& current(const char* what);
  void enter(int i);
  void announce(void** save_fake_stack, const void* bottom, size_t bytes);
  void arrived(void* fake_stack, const void** from_bottom = nullptr, size_t* from_bytes = nullptr);
  void step(Thread& self);
  [[noreturn]] void step_exit(Thread& self);
  void transfer(Thread& from, int to);
  void set_runnable(int i) { runnable_[i >> 6] |= uint64_t{1} << (i & 63); }
  void clear_runnable(int i) { runnable_[i >> 6] &= ~(uint64_t{1} << (i & 63)); }
  void on_warp(int i);
  void on_barrier(int i);
  void on_exit(int i);
  void complete_warp_op(int warp, unsigned mask);
  void check_no_waiting_mate(int i, const char* doing);
  uint64_t next_random();
  std::string describe_warp(int warp) const;
  std::string describe_block() const;
  [[noreturn]] void fail(int warp, const char* fmt, ...) __attribute__((format(printf, 3, 4)));

  // The launch.
  const LaunchSite* site_ = nullptr;
  dim3 grid_, block_;
  size_t smem_bytes_ = 0;
  void (*body_)(void*) = nullptr;
  void* ctx_ = nullptr;
  bool in_kernel_ = false;
  uint64_t rng_ = 0;
  // The block.
  int n_ = 0, warps_ = 0;
  std::vector<Thread> threads_;
  std::array<uint64_t, 16> runnable_{};                // bit i: thread i can run
  std::vector<uint32_t> at_warp_, at_barrier_, done_;  // per warp: lanes in each wait state
  int done_count_ = 0, barrier_count_ = 0, barrier_pred_ = 0, rr_next_ = 0, cur_ = -1;
  Policy policy_ = Policy::kRoundRobin;
  const char* barrier_file_ = nullptr;
  int barrier_line_ = 0;
  void* smem_ = nullptr;
  // The scheduler's own context (the launching host thread's stack).
  void* main_sp_ = nullptr;
#if defined(GEMMA3_EMU_UCONTEXT)
  ucontext_t main_ctx_;
#endif
  void* main_fake_stack_ = nullptr;
  const void* main_bottom_ = nullptr;
  size_t main_size_ = 0;
  bool main_bounds_known_ = false;
  bool per_fiber_ = true;        // ASan: announce every fiber switch (else: per block, the region)
  bool switch_pending_ = false;  // ASan: a switch was announced, the next context finishes it
  Stacks stacks_;
};

Scheduler the_scheduler;  // a plain global: its accessor is on the hot path
Scheduler& scheduler() { return the_scheduler; }
std::mutex launch_mutex;  // one grid at a time (the scheduler's state is global)

#if defined(GEMMA3_EMU_UCONTEXT)
void fiber_entry() { scheduler().fiber_main(); }
#else
[[noreturn]] void fiber_entry() { scheduler().fiber_main(); }
#endif

void Scheduler::fail(int warp, const char* fmt, ...) {
  char msg[1024];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(msg, sizeof msg, fmt, ap);
  va_end(ap);
  std::string where;
  if (site_) {
    char buf[512];
    snprintf(buf, sizeof buf,
             "\n  kernel %s, launched at %s:%d with grid (%u,%u,%u), block (%u,%u,%u), %zu bytes of dynamic "
             "shared "
             "memory\n  in block (%u,%u,%u)",
             site_->kernel, short_path(site_->file), site_->line, grid_.x, grid_.y, grid_.z, block_.x,
             block_.y, block_.z, smem_bytes_, detail::block_idx.x, detail::block_idx.y, detail::block_idx.z);
    where = buf;
    where += warp >= 0 ? "\n" + describe_warp(warp) : "\n" + describe_block();
  }
  die("%s%s\n  scheduling policy %s (GEMMA3_CUDA_EMU_POLICY)", msg, where.c_str(), options().text.c_str());
}

// Lanes grouped by what they wait at: "  warp 1 lanes 0-15: at __shfl_xor_sync (mask 0xffffffff),
// kernels/common.cuh:19".
std::string Scheduler::describe_warp(int warp) const {
  std::string out;
  const int base = warp * 32, lanes = std::min(32, n_ - base);
  auto what = [&](const Thread& t) {
    char buf[256];
    switch (t.state) {
      case State::kRunnable: return std::string("running (not at a barrier or warp operation)");
      case State::kDone: return std::string("exited");
      case State::kBarrier:
        snprintf(buf, sizeof buf, "at %s, %s:%d", barrier_name(t.bop), short_path(t.file), t.line);
        return std::string(buf);
      case State::kWarp:
        snprintf(buf, sizeof buf, "at %s (mask 0x%08x), %s:%d", op_name(t.op), t.mask, short_path(t.file),
                 t.line);
        return std::string(buf);
    }
    return std::string("?");
  };
  for (int l = 0; l < lanes;) {
    const std::string w = what(threads_[base + l]);
    int e = l + 1;
    while (e < lanes && what(threads_[base + e]) == w) ++e;
    char head[64];
    if (e - l == 1)
      snprintf(head, sizeof head, "  warp %d lane %d: ", warp, l);
    else
      snprintf(head, sizeof head, "  warp %d lanes %d-%d: ", warp, l, e - 1);
    out += head + w + "\n";
    l = e;
  }
  if (!out.empty()) out.pop_back();
  return out;
}

std::string Scheduler::describe_block() const {
  std::string out;
  for (int w = 0; w < warps_; ++w) out += describe_warp(w) + (w + 1 < warps_ ? "\n" : "");
  return out;
}

uint64_t Scheduler::next_random() {  // splitmix64
  uint64_t z = (rng_ += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

int Scheduler::pick() {
  const int words = (n_ + 63) / 64;
  switch (policy_) {
    case Policy::kLowFirst:
      for (int w = 0; w < words; ++w)
        if (runnable_[w]) return w * 64 + __builtin_ctzll(runnable_[w]);
      return -1;
    case Policy::kHighFirst:
      for (int w = words - 1; w >= 0; --w)
        if (runnable_[w]) return w * 64 + 63 - __builtin_clzll(runnable_[w]);
      return -1;
    case Policy::kRoundRobin:
      for (int k = 0; k < 2; ++k) {  // from rr_next_ to the end, then from 0
        const int from = k == 0 ? rr_next_ : 0;
        for (int w = from >> 6; w < words; ++w) {
          uint64_t bits = runnable_[w];
          if (w == (from >> 6)) bits &= ~uint64_t{0} << (from & 63);
          if (bits) {
            const int i = w * 64 + __builtin_ctzll(bits);
            rr_next_ = i + 1 < n_ ? i + 1 : 0;
            return i;
          }
        }
      }
      return -1;
    case Policy::kRandom: {
      int total = 0;
      for (int w = 0; w < words; ++w) total += __builtin_popcountll(runnable_[w]);
      if (total == 0) return -1;
      int k = static_cast<int>(next_random() % static_cast<uint64_t>(total));
      for (int w = 0; w < words; ++w) {
        uint64_t bits = runnable_[w];
        const int c = __builtin_popcountll(bits);
        if (k >= c) {
          k -= c;
          continue;
        }
        while (k-- > 0) bits &= bits - 1;
        return w * 64 + __builtin_ctzll(bits);
      }
      return -1;
    }
  }
  return -1;
}

// Fiber side: the CUDA thread that is running now.
Thread& Scheduler::current(const char* what) {
  if (!in_kernel_ || cur_ < 0) die("%s called outside a kernel", what);
  return threads_[cur_];
}

// Makes thread i the current one (threadIdx) and switches from `from` to it; returns when
// some fiber switches back to `from`.
void Scheduler::transfer(Thread& from, int i) {
  Thread& to = threads_[i];
  cur_ = i;
  detail::thread_idx = threads_[i].idx;
  if (per_fiber_) announce(&from.fake_stack, stacks_.bottom(i), Stacks::kStackBytes);
#if defined(GEMMA3_EMU_UCONTEXT)
  swapcontext(&from.ctx, &to.ctx);
#else
  gemma3_cuda_emu_switch(&from.sp, to.sp);
#endif
  arrived(from.fake_stack);
}

// ASan's view of the stack: announce(...) before a switch, arrived(...) first thing in the
// context that runs next (a fresh fiber, a resumed one, the launching thread).
void Scheduler::announce(void** save_fake_stack, const void* bottom, size_t bytes) {
#if defined(GEMMA3_EMU_ASAN)
  __sanitizer_start_switch_fiber(save_fake_stack, bottom, bytes);
  switch_pending_ = true;
#endif
}
void Scheduler::arrived(void* fake_stack, const void** from_bottom, size_t* from_bytes) {
#if defined(GEMMA3_EMU_ASAN)
  if (!switch_pending_) return;
  switch_pending_ = false;
  __sanitizer_finish_switch_fiber(fake_stack, from_bottom, from_bytes);
#endif
}

// Fiber side, after the current thread recorded a barrier or warp operation: the checks, then
// on with the thread the policy picks (this one again: no switch).
void Scheduler::step(Thread& self) {
  const int me = cur_;
  switch (self.state) {
    case State::kWarp: on_warp(me); break;
    case State::kBarrier: on_barrier(me); break;
    default: break;
  }
  const int next = pick();
  if (next < 0) fail(-1, "deadlock: no thread of the block can continue");
  if (next != me) transfer(self, next);
}

// Fiber side, when the current thread's kernel function returned: the checks, then the next
// thread, or the launching thread once the whole block is done. This fiber never runs again.
void Scheduler::step_exit(Thread& self) {
  on_exit(cur_);
  const int next = pick();
  if (next < 0 && done_count_ < n_) fail(-1, "deadlock: no thread of the block can continue");
  // null: this fiber ends (ASan drops its fake stack).
  if (next < 0)
    announce(nullptr, main_bottom_, main_size_);
  else if (per_fiber_)
    announce(nullptr, stacks_.bottom(next), Stacks::kStackBytes);
  if (next >= 0) {
    cur_ = next;
    detail::thread_idx = threads_[next].idx;
  }
#if defined(GEMMA3_EMU_UCONTEXT)
  setcontext(next < 0 ? &main_ctx_ : &threads_[next].ctx);
#else
  gemma3_cuda_emu_switch(&self.sp, next < 0 ? main_sp_ : threads_[next].sp);
#endif
  __builtin_unreachable();
}

void Scheduler::fiber_main() {
  // The first fiber of a launch starts from the launching thread: learn its stack.
  const void* from_bottom = nullptr;
  size_t from_size = 0;
  arrived(nullptr, &from_bottom, &from_size);
  if (from_bottom && !main_bounds_known_) {
    main_bottom_ = from_bottom;
    main_size_ = from_size;
    main_bounds_known_ = true;
  }
  body_(ctx_);
  Thread& t = threads_[cur_];
  t.state = State::kDone;
  step_exit(t);
}

// Writes the frame that the first switch to a fiber pops: six zero registers and the entry.
__attribute__((no_sanitize_address)) void start_fiber(Thread& t, char* bottom, size_t bytes) {
#if defined(GEMMA3_EMU_UCONTEXT)
  getcontext(&t.ctx);
  t.ctx.uc_stack.ss_sp = bottom;
  t.ctx.uc_stack.ss_size = bytes;
  t.ctx.uc_link = nullptr;
  makecontext(&t.ctx, fiber_entry, 0);
#else
  void** sp = reinterpret_cast<void**>(bottom + bytes);  // 16-byte aligned (page aligned)
  *--sp = nullptr;                                       // fiber_entry's return address: it never returns
  *--sp = reinterpret_cast<void*>(&fiber_entry);         // where the switch's ret goes
  for (int r = 0; r < 6; ++r) *--sp = nullptr;           // rbp, rbx, r12-r15
  t.sp = sp;
#endif
}

// Launching thread: runs the block from its first thread until the last one exits.
void Scheduler::enter(int i) {
  cur_ = i;
  detail::thread_idx = threads_[i].idx;
  if (per_fiber_)
    announce(&main_fake_stack_, stacks_.bottom(i), Stacks::kStackBytes);
  else
    announce(&main_fake_stack_, stacks_.region(), stacks_.region_bytes());
#if defined(GEMMA3_EMU_UCONTEXT)
  swapcontext(&main_ctx_, &threads_[i].ctx);
#else
  gemma3_cuda_emu_switch(&main_sp_, threads_[i].sp);
#endif
  arrived(main_fake_stack_);
}

cudaError_t Scheduler::run(const LaunchSite& site, dim3 grid, dim3 block, size_t smem, void (*body)(void*),
                           void* ctx) {
  if (in_kernel_) die("kernel %s launched from inside a kernel (not emulated)", site.kernel);
  site_ = &site;
  grid_ = grid;
  block_ = block;
  smem_bytes_ = smem;
  body_ = body;
  ctx_ = ctx;
  n_ = static_cast<int>(block.x * block.y * block.z);
  warps_ = (n_ + 31) / 32;
  stacks_.reserve(n_);
  threads_.resize(static_cast<size_t>(n_));
  for (int i = 0; i < n_; ++i)
    threads_[i].idx = {i % block.x, (i / block.x) % block.y, i / (block.x * block.y)};
  at_warp_.assign(static_cast<size_t>(warps_), 0);
  at_barrier_.assign(static_cast<size_t>(warps_), 0);
  done_.assign(static_cast<size_t>(warps_), 0);
  policy_ = options().policy;
  if (rng_ == 0) rng_ = options().seed * 0x2545F4914F6CDD1Dull + 1;
  main_bounds_known_ = false;
#if defined(GEMMA3_EMU_ASAN)
  per_fiber_ =
      !&__asan_option_detect_stack_use_after_return || __asan_option_detect_stack_use_after_return != 0;
#endif
  detail::grid_dim = grid;
  detail::block_dim = block;
  in_kernel_ = true;
  // Blocks in index order; high-first runs them backwards, random in a random order.
  const uint64_t blocks = uint64_t{grid.x} * grid.y * grid.z;
  std::vector<uint64_t> order;
  if (policy_ == Policy::kRandom) {
    order.resize(blocks);
    for (uint64_t b = 0; b < blocks; ++b) order[b] = b;
    for (uint64_t b = blocks; b > 1; --b) std::swap(order[b - 1], order[next_random() % b]);
  }
  for (uint64_t k = 0; k < blocks; ++k) {
    const uint64_t b = !order.empty() ? order[k] : policy_ == Policy::kHighFirst ? blocks - 1 - k : k;
    detail::block_idx = {static_cast<unsigned>(b % grid.x), static_cast<unsigned>((b / grid.x) % grid.y),
                         static_cast<unsigned>(b / (uint64_t{grid.x} * grid.y))};
    run_block();
  }
  in_kernel_ = false;
  cur_ = -1;
  site_ = nullptr;
  return cudaSuccess;
}

void Scheduler::run_block() {
  for (int i = 0; i < n_; ++i) {
    Thread& t = threads_[i];
    t.state = State::kRunnable;
    t.fake_stack = nullptr;
    start_fiber(t, stacks_.bottom(i), Stacks::kStackBytes);
  }
  runnable_.fill(0);
  for (int i = 0; i < n_; ++i) set_runnable(i);
  std::fill(at_warp_.begin(), at_warp_.end(), 0);
  std::fill(at_barrier_.begin(), at_barrier_.end(), 0);
  std::fill(done_.begin(), done_.end(), 0);
  done_count_ = barrier_count_ = barrier_pred_ = rr_next_ = 0;
  if (smem_bytes_ > 0) {  // exactly the launch's size, NaN in every float
    if (posix_memalign(&smem_, 16, smem_bytes_) != 0)
      die("cannot allocate %zu bytes of shared memory", smem_bytes_);
    memset(smem_, 0xFF, smem_bytes_);
  }
  enter(pick());  // the fibers hand over to each other; the last one to exit comes back here
  if (done_count_ != n_) fail(-1, "the block returned with threads still running");
  free(smem_);
  smem_ = nullptr;
}

// A lane of the warp waits at a warp operation whose mask includes thread i, which is about to
// do something else (`doing`): that lane can never complete.
void Scheduler::check_no_waiting_mate(int i, const char* doing) {
  const int warp = i / 32, lane = i % 32;
  for (uint32_t waiting = at_warp_[warp]; waiting; waiting &= waiting - 1) {
    const int l = __builtin_ctz(waiting);
    const Thread& o = threads_[warp * 32 + l];
    if ((o.mask >> lane) & 1)
      fail(warp, "divergent warp: lane %d %s while lane %d waits for it at %s (mask 0x%08x), %s:%d", lane,
           doing, l, op_name(o.op), o.mask, short_path(o.file), o.line);
  }
}

void Scheduler::on_warp(int i) {
  Thread& t = threads_[i];
  const int warp = i / 32, lane = i % 32, lanes = std::min(32, n_ - warp * 32);
  const uint32_t exist = lanes == 32 ? ~0u : (1u << lanes) - 1;
  clear_runnable(i);
  at_warp_[warp] |= 1u << lane;
  if (!((t.mask >> lane) & 1))
    fail(warp, "lane %d calls %s with mask 0x%08x, which does not include the lane itself", lane,
         op_name(t.op), t.mask);
  if (t.mask & ~exist)
    fail(warp, "lane %d calls %s with mask 0x%08x, which names lanes this block does not have (%d threads)",
         lane, op_name(t.op), t.mask, n_);
  if (t.width < 1 || t.width > 32 || (t.width & (t.width - 1)))
    fail(warp, "lane %d calls %s with width %d (a power of 2 up to 32 is needed)", lane, op_name(t.op),
         t.width);
  if (const uint32_t gone = done_[warp] & t.mask)
    fail(warp, "divergent warp: lane %d reaches %s (mask 0x%08x), %s:%d, but lane %d of the mask has exited",
         lane, op_name(t.op), t.mask, short_path(t.file), t.line, __builtin_ctz(gone));
  if (const uint32_t blocked = at_barrier_[warp] & t.mask)
    fail(warp,
         "divergent warp: lane %d reaches %s (mask 0x%08x), %s:%d, while lane %d of the mask waits at %s",
         lane, op_name(t.op), t.mask, short_path(t.file), t.line, __builtin_ctz(blocked),
         barrier_name(threads_[warp * 32 + __builtin_ctz(blocked)].bop));
  if ((at_warp_[warp] & t.mask) == t.mask) complete_warp_op(warp, t.mask);
}

// Every lane of `mask` waits at a warp operation: check that it is one operation (same kind and
// mask everywhere), hand out the results and let the lanes go on.
void Scheduler::complete_warp_op(int warp, unsigned mask) {
  const int base = warp * 32;
  const Thread& first = threads_[base + __builtin_ctz(mask)];
  uint32_t votes = 0;
  for (uint32_t m = mask; m; m &= m - 1) {
    const int l = __builtin_ctz(m);
    const Thread& o = threads_[base + l];
    if (o.op != first.op || o.mask != first.mask)
      fail(warp,
           "divergent warp: lanes of one mask wait at different warp operations (%s mask 0x%08x, %s:%d vs %s "
           "mask 0x%08x, %s:%d)",
           op_name(first.op), first.mask, short_path(first.file), first.line, op_name(o.op), o.mask,
           short_path(o.file), o.line);
    if (o.value) votes |= 1u << l;
  }
  for (uint32_t m = mask; m; m &= m - 1) {
    const int l = __builtin_ctz(m);
    Thread& o = threads_[base + l];
    const int w = o.width, seg = l & ~(w - 1), pos = l & (w - 1);
    int src = l;
    switch (o.op) {
      case WarpOp::kShflIdx: src = seg + (((o.arg % w) + w) % w); break;
      case WarpOp::kShflUp: src = o.arg >= 0 && pos >= o.arg ? l - o.arg : l; break;
      case WarpOp::kShflDown: src = o.arg >= 0 && pos + o.arg < w ? l + o.arg : l; break;
      case WarpOp::kShflXor:
        src = l ^ (o.arg & 31);
        if ((src & ~(w - 1)) > seg) src = l;  // a later segment: the lane's own value
        break;
      default: break;
    }
    switch (o.op) {
      case WarpOp::kShflIdx:
      case WarpOp::kShflUp:
      case WarpOp::kShflDown:
      case WarpOp::kShflXor:
        if (!((mask >> src) & 1))
          fail(warp,
               "lane %d's %s (mask 0x%08x), %s:%d, reads lane %d, which is not in the mask (undefined value)",
               l, op_name(o.op), mask, short_path(o.file), o.line, src);
        o.result = threads_[base + src].value;
        break;
      case WarpOp::kBallot: o.result = votes; break;
      case WarpOp::kAny: o.result = votes != 0; break;
      case WarpOp::kAll: o.result = votes == mask; break;
      case WarpOp::kSyncWarp: o.result = 0; break;
    }
  }
  for (uint32_t m = mask; m; m &= m - 1) {
    const int l = __builtin_ctz(m);
    threads_[base + l].state = State::kRunnable;
    set_runnable(base + l);
  }
  at_warp_[warp] &= ~mask;
}

void Scheduler::on_barrier(int i) {
  Thread& t = threads_[i];
  const int warp = i / 32;
  clear_runnable(i);
  if (done_count_ > 0)
    fail(-1, "thread %d reaches %s, %s:%d, after %d thread(s) of the block exited: they never arrive", i,
         barrier_name(t.bop), short_path(t.file), t.line, done_count_);
  check_no_waiting_mate(i, "reaches __syncthreads");
  if (barrier_count_ == 0) {
    barrier_file_ = t.file;
    barrier_line_ = t.line;
  } else if (!same_site(barrier_file_, barrier_line_, t.file, t.line)) {
    fail(-1,
         "divergent block: thread %d waits at %s, %s:%d, while other threads wait at the barrier at %s:%d", i,
         barrier_name(t.bop), short_path(t.file), t.line, short_path(barrier_file_), barrier_line_);
  }
  at_barrier_[warp] |= 1u << (i % 32);
  ++barrier_count_;
  barrier_pred_ += static_cast<int>(t.value);
  if (barrier_count_ < n_) return;
  int result = 0;
  switch (t.bop) {
    case BarrierOp::kPlain: break;
    case BarrierOp::kCount: result = barrier_pred_; break;
    case BarrierOp::kAnd: result = barrier_pred_ == n_; break;
    case BarrierOp::kOr: result = barrier_pred_ > 0; break;
  }
  for (int k = 0; k < n_; ++k) {
    threads_[k].state = State::kRunnable;
    threads_[k].result = static_cast<uint64_t>(result);
    set_runnable(k);
  }
  std::fill(at_barrier_.begin(), at_barrier_.end(), 0);
  barrier_count_ = barrier_pred_ = 0;
}

void Scheduler::on_exit(int i) {
  const int warp = i / 32;
  clear_runnable(i);
  done_[warp] |= 1u << (i % 32);
  ++done_count_;
  if (barrier_count_ > 0)
    fail(-1, "thread %d exits while %d thread(s) of the block wait at the barrier at %s:%d: it never arrives",
         i, barrier_count_, short_path(barrier_file_), barrier_line_);
  check_no_waiting_mate(i, "exits");
}

uint64_t Scheduler::warp_op(WarpOp op, unsigned mask, uint64_t value, int arg, int width, const char* file,
                            int line) {
  Thread& t = current(op_name(op));
  t.state = State::kWarp;
  t.op = op;
  t.mask = mask;
  t.value = value;
  t.arg = arg;
  t.width = width;
  t.file = file;
  t.line = line;
  step(t);
  return t.result;
}

int Scheduler::barrier(BarrierOp op, int predicate, const char* file, int line) {
  Thread& t = current(barrier_name(op));
  t.state = State::kBarrier;
  t.bop = op;
  t.value = static_cast<uint64_t>(predicate);
  t.file = file;
  t.line = line;
  step(t);
  return static_cast<int>(t.result);
}

void* Scheduler::dynamic_shared() {
  current("GEMMA3_DYNAMIC_SHARED");
  // A launch without dynamic shared memory: a 0-byte block, so that any access is reported.
  if (!smem_) smem_ = malloc(0);
  return smem_;
}

cudaError_t check_config(dim3 grid, dim3 block, size_t smem) {
  const uint64_t threads = uint64_t{block.x} * block.y * block.z;
  if (block.x == 0 || block.y == 0 || block.z == 0 || block.x > 1024 || block.y > 1024 || block.z > 64 ||
      threads > 1024 || grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.x > 0x7FFFFFFFu || grid.y > 65535 ||
      grid.z > 65535)
    return cudaErrorInvalidConfiguration;
  if (smem > 48 * 1024) return cudaErrorInvalidValue;  // more needs cudaFuncSetAttribute (not emulated)
  return cudaSuccess;
}

}  // namespace

namespace detail {

cudaError_t run_grid(const LaunchSite& site, dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                     void (*body)(void*), void* ctx) {
  cudaError_t e = check_config(grid, block, smem);
  if (e == cudaSuccess && !stream_ok(stream)) e = cudaErrorInvalidResourceHandle;
  if (e != cudaSuccess) return record(e);
  std::lock_guard<std::mutex> lock(launch_mutex);
  return scheduler().run(site, grid, block, smem, body, ctx);
}

void check_kernel_pointer(const LaunchSite& site, int index, const void* p) {
  if (!p || is_device_range(p, 0)) return;
  die("kernel %s, launched at %s:%d: argument %d is %p, which is not device memory (not inside any live "
      "cudaMalloc "
      "allocation)",
      site.kernel, short_path(site.file), site.line, index + 1, p);
}

uint64_t warp_op(WarpOp op, unsigned mask, uint64_t value, int arg, int width, const char* file, int line) {
  return scheduler().warp_op(op, mask, value, arg, width, file, line);
}
int barrier(BarrierOp op, int predicate, const char* file, int line) {
  return scheduler().barrier(op, predicate, file, line);
}
void* dynamic_shared() { return scheduler().dynamic_shared(); }

}  // namespace detail
}  // namespace gemma3_cuda_emu

// ---- runtime API ---------------------------------------------------------------------------

using gemma3_cuda_emu::options;
namespace emu = gemma3_cuda_emu;

const char* cudaGetErrorName(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "cudaSuccess";
    case cudaErrorInvalidValue: return "cudaErrorInvalidValue";
    case cudaErrorMemoryAllocation: return "cudaErrorMemoryAllocation";
    case cudaErrorInitializationError: return "cudaErrorInitializationError";
    case cudaErrorInvalidConfiguration: return "cudaErrorInvalidConfiguration";
    case cudaErrorInvalidDevicePointer: return "cudaErrorInvalidDevicePointer";
    case cudaErrorInvalidMemcpyDirection: return "cudaErrorInvalidMemcpyDirection";
    case cudaErrorNoDevice: return "cudaErrorNoDevice";
    case cudaErrorInvalidDevice: return "cudaErrorInvalidDevice";
    case cudaErrorInvalidResourceHandle: return "cudaErrorInvalidResourceHandle";
    case cudaErrorNotReady: return "cudaErrorNotReady";
    case cudaErrorIllegalAddress: return "cudaErrorIllegalAddress";
    case cudaErrorLaunchFailure: return "cudaErrorLaunchFailure";
    case cudaErrorNotSupported: return "cudaErrorNotSupported";
    case cudaErrorIllegalState: return "cudaErrorIllegalState";
    case cudaErrorStreamCaptureUnsupported: return "cudaErrorStreamCaptureUnsupported";
    case cudaErrorStreamCaptureInvalidated: return "cudaErrorStreamCaptureInvalidated";
    case cudaErrorStreamCaptureImplicit: return "cudaErrorStreamCaptureImplicit";
    case cudaErrorStreamCaptureWrongThread: return "cudaErrorStreamCaptureWrongThread";
  }
  return "cudaErrorUnknown";
}

const char* cudaGetErrorString(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorMemoryAllocation: return "out of memory";
    case cudaErrorInitializationError: return "initialization error";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorInvalidDevicePointer: return "invalid device pointer";
    case cudaErrorInvalidMemcpyDirection: return "invalid copy direction for memcpy";
    case cudaErrorNoDevice: return "no CUDA-capable device is detected";
    case cudaErrorInvalidDevice: return "invalid device ordinal";
    case cudaErrorInvalidResourceHandle: return "invalid resource handle";
    case cudaErrorNotReady: return "device not ready";
    case cudaErrorIllegalAddress: return "an illegal memory access was encountered";
    case cudaErrorLaunchFailure: return "unspecified launch failure";
    case cudaErrorNotSupported: return "operation not supported";
    case cudaErrorIllegalState: return "the operation cannot be performed in the present state";
    case cudaErrorStreamCaptureUnsupported: return "operation not permitted when stream is capturing";
    case cudaErrorStreamCaptureInvalidated: return "operation failed due to a previous error during capture";
    case cudaErrorStreamCaptureImplicit:
      return "operation would make the legacy stream depend on a capturing blocking stream";
    case cudaErrorStreamCaptureWrongThread:
      return "attempt to terminate a thread-local capture sequence from another thread";
  }
  return "unknown error";
}

cudaError_t cudaGetLastError() {
  const cudaError_t e = emu::last_error;
  emu::last_error = cudaSuccess;
  return e;
}
cudaError_t cudaPeekAtLastError() { return emu::last_error; }

cudaError_t cudaGetDeviceCount(int* count) {
  if (!count) return emu::record(cudaErrorInvalidValue);
  *count = 1;
  return cudaSuccess;
}
cudaError_t cudaSetDevice(int device) {
  return device == 0 ? cudaSuccess : emu::record(cudaErrorInvalidDevice);
}
cudaError_t cudaGetDevice(int* device) {
  if (!device) return emu::record(cudaErrorInvalidValue);
  *device = 0;
  return cudaSuccess;
}

cudaError_t cudaGetDeviceProperties(cudaDeviceProp* prop, int device) {
  if (!prop) return emu::record(cudaErrorInvalidValue);
  if (device != 0) return emu::record(cudaErrorInvalidDevice);
  *prop = cudaDeviceProp{};
  snprintf(prop->name, sizeof prop->name, "cuda-emu (CPU)");
  prop->totalGlobalMem = options().memory_bytes;
  prop->sharedMemPerBlock = 48 * 1024;
  prop->sharedMemPerBlockOptin = 48 * 1024;
  prop->sharedMemPerMultiprocessor = 228 * 1024;
  prop->regsPerBlock = 65536;
  prop->warpSize = 32;
  prop->maxThreadsPerBlock = 1024;
  prop->maxThreadsDim[0] = 1024, prop->maxThreadsDim[1] = 1024, prop->maxThreadsDim[2] = 64;
  prop->maxGridSize[0] = 0x7FFFFFFF, prop->maxGridSize[1] = 65535, prop->maxGridSize[2] = 65535;
  prop->major = 8;
  prop->minor = 0;
  prop->multiProcessorCount = 132;  // an H100 SXM's: split-KV attention plans as on one
  prop->l2CacheSize = 50 << 20;
  prop->maxThreadsPerMultiProcessor = 2048;
  return cudaSuccess;
}

cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device) {
  if (!value) return emu::record(cudaErrorInvalidValue);
  if (device != 0) return emu::record(cudaErrorInvalidDevice);
  cudaDeviceProp p;
  cudaGetDeviceProperties(&p, 0);
  switch (attr) {
    case cudaDevAttrMaxThreadsPerBlock: *value = p.maxThreadsPerBlock; break;
    case cudaDevAttrMaxSharedMemoryPerBlock: *value = static_cast<int>(p.sharedMemPerBlock); break;
    case cudaDevAttrWarpSize: *value = p.warpSize; break;
    case cudaDevAttrMultiProcessorCount: *value = p.multiProcessorCount; break;
    case cudaDevAttrComputeCapabilityMajor: *value = p.major; break;
    case cudaDevAttrComputeCapabilityMinor: *value = p.minor; break;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *value = static_cast<int>(p.sharedMemPerBlockOptin); break;
    default: return emu::record(cudaErrorInvalidValue);
  }
  return cudaSuccess;
}

cudaError_t cudaDeviceSynchronize() {  // every operation completes when issued
  return emu::breaks_capture("cudaDeviceSynchronize") ? emu::record(cudaErrorStreamCaptureUnsupported)
                                                      : cudaSuccess;
}

cudaError_t cudaMalloc(void** ptr, size_t bytes) {
  if (!ptr) return emu::record(cudaErrorInvalidValue);
  *ptr = nullptr;
  if (emu::breaks_capture("cudaMalloc")) return emu::record(cudaErrorStreamCaptureUnsupported);
  if (bytes == 0) return cudaSuccess;
  std::lock_guard<std::mutex> lock(emu::mem_mutex);
  if (bytes > options().memory_bytes - emu::allocated) return emu::record(cudaErrorMemoryAllocation);
  void* p = nullptr;
  if (posix_memalign(&p, 256, bytes) != 0) return emu::record(cudaErrorMemoryAllocation);
  memset(p, 0xFF, bytes);  // uninitialized device memory reads as NaN / -1
  emu::allocations[reinterpret_cast<uintptr_t>(p)] = bytes;
  emu::allocated += bytes;
  *ptr = p;
  return cudaSuccess;
}

cudaError_t cudaFree(void* ptr) {
  if (emu::breaks_capture("cudaFree")) return emu::record(cudaErrorStreamCaptureUnsupported);
  if (!ptr) return cudaSuccess;
  std::lock_guard<std::mutex> lock(emu::mem_mutex);
  auto it = emu::allocations.find(reinterpret_cast<uintptr_t>(ptr));
  if (it == emu::allocations.end()) {
    fprintf(stderr,
            "cuda-emu: cudaFree(%p): not the start of a live cudaMalloc allocation (cudaErrorInvalidValue)\n",
            ptr);
    return emu::record(cudaErrorInvalidValue);
  }
  emu::allocated -= it->second;
  emu::allocations.erase(it);
  free(ptr);
  return cudaSuccess;
}

cudaError_t cudaMallocHost(void** ptr, size_t bytes) {
  if (!ptr) return emu::record(cudaErrorInvalidValue);
  *ptr = bytes ? malloc(bytes) : nullptr;
  return bytes && !*ptr ? emu::record(cudaErrorMemoryAllocation) : cudaSuccess;
}
cudaError_t cudaFreeHost(void* ptr) {
  free(ptr);
  return cudaSuccess;
}

cudaError_t cudaMemGetInfo(size_t* free_bytes, size_t* total) {
  if (!free_bytes || !total) return emu::record(cudaErrorInvalidValue);
  std::lock_guard<std::mutex> lock(emu::mem_mutex);
  *total = options().memory_bytes;
  *free_bytes = options().memory_bytes - emu::allocated;
  return cudaSuccess;
}

// ---- driver virtual memory --------------------------------------------------------------------

namespace {
size_t vmm_granularity() {
  size_t g = size_t{2} << 20;
  if (const char* e = getenv("GEMMA3_CUDA_EMU_VMM_GRANULARITY"); e && *e) {
    char* end = nullptr;
    const unsigned long long v = strtoull(e, &end, 10);
    const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
    if (*end != '\0' || v == 0 || v % page != 0)
      emu::die("GEMMA3_CUDA_EMU_VMM_GRANULARITY=%s: expected a positive multiple of %zu bytes", e, page);
    g = static_cast<size_t>(v);
  }
  return g;
}

bool device_prop_ok(const CUmemAllocationProp* prop) {
  return prop && prop->type == CU_MEM_ALLOCATION_TYPE_PINNED &&
         prop->location.type == CU_MEM_LOCATION_TYPE_DEVICE && prop->location.id == 0;
}

CUresult vmm_error(const char* call, const char* why) {
  fprintf(stderr, "cuda-emu: %s: %s (CUDA_ERROR_INVALID_VALUE)\n", call, why);
  return CUDA_ERROR_INVALID_VALUE;
}
}  // namespace

CUresult cuMemGetAllocationGranularity(size_t* granularity, const CUmemAllocationProp* prop,
                                       CUmemAllocationGranularity_flags) {
  if (!granularity || !device_prop_ok(prop)) return CUDA_ERROR_INVALID_VALUE;
  *granularity = vmm_granularity();
  return CUDA_SUCCESS;
}

CUresult cuMemAddressReserve(CUdeviceptr* ptr, size_t size, size_t alignment, CUdeviceptr addr,
                             unsigned long long flags) {
  const size_t g = vmm_granularity();
  if (!ptr || size == 0 || size % g != 0 || addr != 0 || flags != 0 || (alignment != 0 && alignment % g != 0))
    return vmm_error("cuMemAddressReserve",
                     "size not a multiple of the granularity, or an unsupported argument");
  const size_t align = std::max(alignment, g), total = size + align;
  void* m = mmap(nullptr, total, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (m == MAP_FAILED) return CUDA_ERROR_OUT_OF_MEMORY;
  const uintptr_t start = (reinterpret_cast<uintptr_t>(m) + align - 1) / align * align;
  std::lock_guard<std::mutex> lock(emu::mem_mutex);
  emu::Reservation& r = emu::reservations[start];
  r.bytes = size, r.mmap_base = m, r.mmap_bytes = total;
  *ptr = start;
  return CUDA_SUCCESS;
}

CUresult cuMemAddressFree(CUdeviceptr ptr, size_t size) {
  std::lock_guard<std::mutex> lock(emu::mem_mutex);
  auto it = emu::reservations.find(ptr);
  if (it == emu::reservations.end() || it->second.bytes != size)
    return vmm_error("cuMemAddressFree", "not a reservation's start and size");
  if (!it->second.mapped.empty()) return vmm_error("cuMemAddressFree", "the reservation still has mappings");
  munmap(it->second.mmap_base, it->second.mmap_bytes);
  emu::reservations.erase(it);
  return CUDA_SUCCESS;
}

CUresult cuMemCreate(CUmemGenericAllocationHandle* handle, size_t size, const CUmemAllocationProp* prop,
                     unsigned long long flags) {
  if (!handle || size == 0 || size % vmm_granularity() != 0 || !device_prop_ok(prop) || flags != 0)
    return vmm_error("cuMemCreate", "size not a multiple of the granularity, or an unsupported property");
  std::lock_guard<std::mutex> lock(emu::mem_mutex);
  if (size > options().memory_bytes - emu::allocated) return CUDA_ERROR_OUT_OF_MEMORY;
  emu::allocated += size;
  *handle = emu::next_handle++;
  emu::handles[*handle] = {size, false};
  return CUDA_SUCCESS;
}

CUresult cuMemRelease(CUmemGenericAllocationHandle handle) {
  std::lock_guard<std::mutex> lock(emu::mem_mutex);
  auto it = emu::handles.find(handle);
  if (it == emu::handles.end()) return vmm_error("cuMemRelease", "not a live handle");
  // CUDA frees a mapped handle's memory at its cuMemUnmap; the backend never releases one mapped.
  if (it->second.second) return vmm_error("cuMemRelease", "the handle is still mapped (not emulated)");
  emu::allocated -= it->second.first;
  emu::handles.erase(it);
  return CUDA_SUCCESS;
}

CUresult cuMemMap(CUdeviceptr ptr, size_t size, size_t offset, CUmemGenericAllocationHandle handle,
                  unsigned long long flags) {
  std::lock_guard<std::mutex> lock(emu::mem_mutex);
  auto h = emu::handles.find(handle);
  if (h == emu::handles.end() || h->second.second || h->second.first != size || offset != 0 || flags != 0)
    return vmm_error("cuMemMap", "not a live unmapped handle of this size (or an offset / flags)");
  emu::Reservation* r = emu::find_reservation(ptr, size);
  if (!r || ptr % vmm_granularity() != 0)
    return vmm_error("cuMemMap", "not an aligned range of a reservation");
  auto next = r->mapped.lower_bound(ptr);
  if ((next != r->mapped.end() && next->first < ptr + size) ||
      (next != r->mapped.begin() && std::prev(next)->first + std::prev(next)->second.bytes > ptr))
    return vmm_error("cuMemMap", "the range overlaps a mapping");
  r->mapped[ptr] = {size, handle, false};
  h->second.second = true;
  return CUDA_SUCCESS;
}

CUresult cuMemUnmap(CUdeviceptr ptr, size_t size) {
  std::lock_guard<std::mutex> lock(emu::mem_mutex);
  emu::Reservation* r = emu::find_reservation(ptr, size);
  auto it = r ? r->mapped.find(ptr) : decltype(r->mapped.find(ptr)){};
  if (!r || it == r->mapped.end() || it->second.bytes != size)
    return vmm_error("cuMemUnmap", "not one whole mapping");
  void* p = reinterpret_cast<void*>(ptr);
  madvise(p, size, MADV_DONTNEED);
  mprotect(p, size, PROT_NONE);
  emu::handles[it->second.handle].second = false;
  r->mapped.erase(it);
  return CUDA_SUCCESS;
}

CUresult cuMemSetAccess(CUdeviceptr ptr, size_t size, const CUmemAccessDesc* desc, size_t count) {
  if (!desc || count != 1 || desc->location.type != CU_MEM_LOCATION_TYPE_DEVICE || desc->location.id != 0 ||
      desc->flags != CU_MEM_ACCESS_FLAGS_PROT_READWRITE)
    return vmm_error("cuMemSetAccess", "only read-write access for device 0 is emulated");
  std::lock_guard<std::mutex> lock(emu::mem_mutex);
  emu::Reservation* r = emu::find_reservation(ptr, size);
  if (!r) return vmm_error("cuMemSetAccess", "not a range of a reservation");
  for (uintptr_t at = ptr; at < ptr + size;) {  // whole mappings, one after another
    auto it = r->mapped.find(at);
    if (it == r->mapped.end() || it->second.bytes > ptr + size - at)
      return vmm_error("cuMemSetAccess", "the range is not made of whole mappings");
    at += it->second.bytes;
  }
  for (uintptr_t at = ptr; at < ptr + size;) {
    auto it = r->mapped.find(at);
    void* p = reinterpret_cast<void*>(at);
    if (!it->second.accessible) {
      mprotect(p, it->second.bytes, PROT_READ | PROT_WRITE);
      memset(p, 0xFF, it->second.bytes);  // uninitialized device memory reads as NaN / -1
      it->second.accessible = true;
    }
    at += it->second.bytes;
  }
  return CUDA_SUCCESS;
}

cudaError_t cudaGetDriverEntryPointByVersion(const char* symbol, void** func, unsigned int,
                                             unsigned long long, cudaDriverEntryPointQueryResult* status) {
  if (!symbol || !func) return emu::record(cudaErrorInvalidValue);
  const std::pair<const char*, void*> table[] = {
      {"cuMemGetAllocationGranularity", reinterpret_cast<void*>(&cuMemGetAllocationGranularity)},
      {"cuMemAddressReserve", reinterpret_cast<void*>(&cuMemAddressReserve)},
      {"cuMemAddressFree", reinterpret_cast<void*>(&cuMemAddressFree)},
      {"cuMemCreate", reinterpret_cast<void*>(&cuMemCreate)},
      {"cuMemRelease", reinterpret_cast<void*>(&cuMemRelease)},
      {"cuMemMap", reinterpret_cast<void*>(&cuMemMap)},
      {"cuMemUnmap", reinterpret_cast<void*>(&cuMemUnmap)},
      {"cuMemSetAccess", reinterpret_cast<void*>(&cuMemSetAccess)},
  };
  *func = nullptr;
  for (const auto& [name, fn] : table)
    if (strcmp(name, symbol) == 0) *func = fn;
  if (status) *status = *func ? cudaDriverEntryPointSuccess : cudaDriverEntryPointSymbolNotFound;
  return cudaSuccess;
}

cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t bytes, cudaMemcpyKind kind,
                            cudaStream_t stream) {
  if (!emu::detail::stream_ok(stream)) return emu::record(cudaErrorInvalidResourceHandle);
  if (!stream && emu::breaks_capture("a copy on the legacy stream", true))
    return emu::record(cudaErrorStreamCaptureImplicit);
  if (bytes == 0) return cudaSuccess;
  if (!dst || !src) return emu::record(cudaErrorInvalidValue);
  bool dst_dev = false, src_dev = false;
  switch (kind) {
    case cudaMemcpyHostToHost: break;
    case cudaMemcpyHostToDevice: dst_dev = true; break;
    case cudaMemcpyDeviceToHost: src_dev = true; break;
    case cudaMemcpyDeviceToDevice: dst_dev = src_dev = true; break;
    case cudaMemcpyDefault:
      dst_dev = emu::is_device_range(dst, 0);
      src_dev = emu::is_device_range(src, 0);
      break;
    default: return emu::record(cudaErrorInvalidMemcpyDirection);
  }
  if ((dst_dev && !emu::device_range_or_report("cudaMemcpyAsync", "destination", dst, bytes)) ||
      (src_dev && !emu::device_range_or_report("cudaMemcpyAsync", "source", src, bytes)))
    return emu::record(cudaErrorInvalidValue);
  if (emu::detail::capturing(stream)) {  // a device-to-device copy is a graph node; host memory is not
    if (!dst_dev || !src_dev) {
      return emu::refuse_on_capturing("cudaMemcpyAsync to or from host memory", stream)
                 ? emu::record(cudaErrorStreamCaptureUnsupported)
                 : emu::record(cudaErrorInvalidResourceHandle);
    }
    return emu::detail::capture_launch(1, 1, 0, stream, [dst, src, bytes](cudaStream_t) {
      emu::detail::check_device_range("cudaMemcpyAsync (graph node) destination", dst, bytes);
      emu::detail::check_device_range("cudaMemcpyAsync (graph node) source", src, bytes);
      memmove(dst, src, bytes);
    });
  }
  memmove(dst, src, bytes);
  return cudaSuccess;
}
cudaError_t cudaMemcpy(void* dst, const void* src, size_t bytes, cudaMemcpyKind kind) {
  return cudaMemcpyAsync(dst, src, bytes, kind, nullptr);
}

cudaError_t cudaMemsetAsync(void* ptr, int value, size_t bytes, cudaStream_t stream) {
  if (!emu::detail::stream_ok(stream)) return emu::record(cudaErrorInvalidResourceHandle);
  if (!stream && emu::breaks_capture("a memset on the legacy stream", true))
    return emu::record(cudaErrorStreamCaptureImplicit);
  if (!emu::device_range_or_report("cudaMemsetAsync", "destination", ptr, bytes))
    return emu::record(cudaErrorInvalidValue);
  if (emu::detail::capturing(stream))
    return emu::detail::capture_launch(1, 1, 0, stream, [ptr, value, bytes](cudaStream_t) {
      emu::detail::check_device_range("cudaMemsetAsync (graph node) destination", ptr, bytes);
      if (bytes) memset(ptr, value, bytes);
    });
  if (bytes) memset(ptr, value, bytes);
  return cudaSuccess;
}
cudaError_t cudaMemset(void* ptr, int value, size_t bytes) {
  return cudaMemsetAsync(ptr, value, bytes, nullptr);
}

cudaError_t cudaStreamCreateWithFlags(cudaStream_t* stream, unsigned flags) {
  if (!stream) return emu::record(cudaErrorInvalidValue);
  *stream = emu::new_handle<CUstream_st>();
  (*stream)->flags = flags;
  return cudaSuccess;
}
cudaError_t cudaStreamCreate(cudaStream_t* stream) {
  return cudaStreamCreateWithFlags(stream, cudaStreamDefault);
}
cudaError_t cudaStreamDestroy(cudaStream_t stream) {
  if (emu::detail::capturing(stream)) {
    std::lock_guard<std::mutex> lock(emu::capture_mutex);
    emu::capturing_streams.erase(stream);
  }
  if (!stream || !emu::delete_handle(stream)) return emu::record(cudaErrorInvalidResourceHandle);
  return cudaSuccess;
}
cudaError_t cudaStreamSynchronize(cudaStream_t stream) {
  if (!emu::detail::stream_ok(stream)) return emu::record(cudaErrorInvalidResourceHandle);
  if (stream ? emu::refuse_on_capturing("cudaStreamSynchronize", stream)
             : emu::breaks_capture("cudaStreamSynchronize (legacy stream)", true))
    return emu::record(cudaErrorStreamCaptureUnsupported);
  return cudaSuccess;
}
cudaError_t cudaStreamQuery(cudaStream_t stream) { return cudaStreamSynchronize(stream); }
cudaError_t cudaStreamWaitEvent(cudaStream_t stream, cudaEvent_t event, unsigned) {
  if (!emu::detail::stream_ok(stream) || !event || !emu::handle_live(event))
    return emu::record(cudaErrorInvalidResourceHandle);
  if (emu::refuse_on_capturing("cudaStreamWaitEvent (not emulated in captures)", stream))
    return emu::record(cudaErrorStreamCaptureUnsupported);
  return cudaSuccess;
}

cudaError_t cudaStreamBeginCapture(cudaStream_t stream, cudaStreamCaptureMode mode) {
  if (!stream) return emu::record(cudaErrorStreamCaptureUnsupported);  // the legacy stream
  if (!emu::handle_live(stream)) return emu::record(cudaErrorInvalidResourceHandle);
  if (mode != cudaStreamCaptureModeGlobal && mode != cudaStreamCaptureModeThreadLocal)
    return emu::record(cudaErrorNotSupported);  // relaxed: not emulated
  std::lock_guard<std::mutex> lock(emu::capture_mutex);
  if (stream->capture) return emu::record(cudaErrorIllegalState);
  stream->capture = std::make_unique<EmuCapture>();
  stream->capture->mode = mode;
  stream->capture->thread = std::this_thread::get_id();
  emu::capturing_streams.insert(stream);
  return cudaSuccess;
}

cudaError_t cudaStreamEndCapture(cudaStream_t stream, cudaGraph_t* graph) {
  if (!graph) return emu::record(cudaErrorInvalidValue);
  *graph = nullptr;
  std::unique_ptr<EmuCapture> c;
  {
    std::lock_guard<std::mutex> lock(emu::capture_mutex);
    EmuCapture* live = emu::capture_of(stream);
    if (!live) return emu::record(cudaErrorIllegalState);
    if (live->mode != cudaStreamCaptureModeRelaxed && live->thread != std::this_thread::get_id())
      return emu::record(cudaErrorStreamCaptureWrongThread);
    c = std::move(stream->capture);
    emu::capturing_streams.erase(stream);
  }
  if (c->invalidated) return emu::record(cudaErrorStreamCaptureInvalidated);
  *graph = emu::new_handle<CUgraph_st>();
  (*graph)->nodes = std::move(c->nodes);
  return cudaSuccess;
}

cudaError_t cudaStreamIsCapturing(cudaStream_t stream, cudaStreamCaptureStatus* status) {
  if (!status) return emu::record(cudaErrorInvalidValue);
  if (!emu::detail::stream_ok(stream)) return emu::record(cudaErrorInvalidResourceHandle);
  std::lock_guard<std::mutex> lock(emu::capture_mutex);
  const EmuCapture* c = emu::capture_of(stream);
  *status = !c               ? cudaStreamCaptureStatusNone
            : c->invalidated ? cudaStreamCaptureStatusInvalidated
                             : cudaStreamCaptureStatusActive;
  return cudaSuccess;
}

cudaError_t cudaGraphInstantiate(cudaGraphExec_t* exec, cudaGraph_t graph, unsigned long long flags) {
  if (!exec || flags != 0) return emu::record(cudaErrorInvalidValue);
  if (!graph || !emu::handle_live(graph)) return emu::record(cudaErrorInvalidResourceHandle);
  *exec = emu::new_handle<CUgraphExec_st>();
  (*exec)->nodes = graph->nodes;
  return cudaSuccess;
}

// Runs the nodes in capture order on `stream`; the first launch error any of them hit.
cudaError_t cudaGraphLaunch(cudaGraphExec_t exec, cudaStream_t stream) {
  if (!exec || !emu::handle_live(exec) || !emu::detail::stream_ok(stream))
    return emu::record(cudaErrorInvalidResourceHandle);
  if (emu::detail::capturing(stream)) return emu::record(cudaErrorNotSupported);  // graphs in graphs
  const cudaError_t before = emu::last_error;
  emu::last_error = cudaSuccess;
  for (auto& node : exec->nodes) node(stream);
  const cudaError_t e = emu::last_error;
  emu::last_error = e != cudaSuccess ? e : before;
  return e;
}

cudaError_t cudaGraphDestroy(cudaGraph_t graph) {
  if (!graph || !emu::delete_handle(graph)) return emu::record(cudaErrorInvalidResourceHandle);
  return cudaSuccess;
}
cudaError_t cudaGraphExecDestroy(cudaGraphExec_t exec) {
  if (!exec || !emu::delete_handle(exec)) return emu::record(cudaErrorInvalidResourceHandle);
  return cudaSuccess;
}

cudaError_t cudaEventCreateWithFlags(cudaEvent_t* event, unsigned flags) {
  if (!event) return emu::record(cudaErrorInvalidValue);
  *event = emu::new_handle<CUevent_st>();
  (*event)->flags = flags;
  return cudaSuccess;
}
cudaError_t cudaEventCreate(cudaEvent_t* event) { return cudaEventCreateWithFlags(event, cudaEventDefault); }
cudaError_t cudaEventDestroy(cudaEvent_t event) {
  if (!event || !emu::delete_handle(event)) return emu::record(cudaErrorInvalidResourceHandle);
  return cudaSuccess;
}
cudaError_t cudaEventRecord(cudaEvent_t event, cudaStream_t stream) {
  if (!event || !emu::handle_live(event) || !emu::detail::stream_ok(stream))
    return emu::record(cudaErrorInvalidResourceHandle);
  if (emu::refuse_on_capturing("cudaEventRecord (not emulated in captures)", stream))
    return emu::record(cudaErrorStreamCaptureUnsupported);
  event->recorded = true;
  event->when = std::chrono::steady_clock::now();
  return cudaSuccess;
}
cudaError_t cudaEventSynchronize(cudaEvent_t event) {
  return event && emu::handle_live(event) ? cudaSuccess : emu::record(cudaErrorInvalidResourceHandle);
}
cudaError_t cudaEventQuery(cudaEvent_t event) { return cudaEventSynchronize(event); }
cudaError_t cudaEventElapsedTime(float* ms, cudaEvent_t start, cudaEvent_t end) {
  if (!ms || !start || !end || !emu::handle_live(start) || !emu::handle_live(end))
    return emu::record(cudaErrorInvalidResourceHandle);
  if (!start->recorded || !end->recorded || (start->flags & cudaEventDisableTiming) ||
      (end->flags & cudaEventDisableTiming))
    return emu::record(cudaErrorInvalidResourceHandle);
  *ms = std::chrono::duration<float, std::milli>(end->when - start->when).count();
  return cudaSuccess;
}

// ---- cuBLAS ---------------------------------------------------------------------------------

cublasStatus_t cublasCreate(cublasHandle_t* handle) {
  if (!handle) return CUBLAS_STATUS_INVALID_VALUE;
  *handle = emu::new_handle<cublasContext>();
  return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasDestroy(cublasHandle_t handle) {
  return handle && emu::delete_handle(handle) ? CUBLAS_STATUS_SUCCESS : CUBLAS_STATUS_NOT_INITIALIZED;
}
cublasStatus_t cublasSetStream(cublasHandle_t handle, cudaStream_t stream) {
  if (!handle || !emu::handle_live(handle)) return CUBLAS_STATUS_NOT_INITIALIZED;
  if (!emu::detail::stream_ok(stream)) return CUBLAS_STATUS_INVALID_VALUE;
  handle->stream = stream;
  return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasSetMathMode(cublasHandle_t handle, cublasMath_t mode) {
  if (!handle || !emu::handle_live(handle)) return CUBLAS_STATUS_NOT_INITIALIZED;
  handle->mode = mode;
  return CUBLAS_STATUS_SUCCESS;
}
const char* cublasGetStatusString(cublasStatus_t status) {
  switch (status) {
    case CUBLAS_STATUS_SUCCESS: return "CUBLAS_STATUS_SUCCESS";
    case CUBLAS_STATUS_NOT_INITIALIZED: return "CUBLAS_STATUS_NOT_INITIALIZED";
    case CUBLAS_STATUS_ALLOC_FAILED: return "CUBLAS_STATUS_ALLOC_FAILED";
    case CUBLAS_STATUS_INVALID_VALUE: return "CUBLAS_STATUS_INVALID_VALUE";
    case CUBLAS_STATUS_ARCH_MISMATCH: return "CUBLAS_STATUS_ARCH_MISMATCH";
    case CUBLAS_STATUS_MAPPING_ERROR: return "CUBLAS_STATUS_MAPPING_ERROR";
    case CUBLAS_STATUS_EXECUTION_FAILED: return "CUBLAS_STATUS_EXECUTION_FAILED";
    case CUBLAS_STATUS_INTERNAL_ERROR: return "CUBLAS_STATUS_INTERNAL_ERROR";
    case CUBLAS_STATUS_NOT_SUPPORTED: return "CUBLAS_STATUS_NOT_SUPPORTED";
  }
  return "CUBLAS_STATUS_UNKNOWN";
}

namespace {

// An operand element as fp32: T = float, or uint16_t holding bf16 bits (exact in fp32).
inline float operand(float v) { return v; }
inline float operand(uint16_t bits) {
  const uint32_t u = uint32_t{bits} << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// C (m x n, ldc) = alpha op(A) op(B) + beta C, column-major, fp32 accumulation in k order; A and
// B of element type T (fp32, or bf16 as on tensor cores: exact products summed in fp32).
template <class T>
cublasStatus_t gemm_f32(cublasHandle_t handle, cublasOperation_t ta, cublasOperation_t tb, int m, int n,
                        int k, float alpha, const T* A, int lda, const T* B, int ldb, float beta, float* C,
                        int ldc) {
  if (!handle || !emu::handle_live(handle)) return CUBLAS_STATUS_NOT_INITIALIZED;
  if (emu::refuse_on_capturing("cuBLAS (not emulated in captures)", handle->stream))
    return CUBLAS_STATUS_NOT_SUPPORTED;
  const bool a_t = ta != CUBLAS_OP_N, b_t = tb != CUBLAS_OP_N;
  if ((ta != CUBLAS_OP_N && ta != CUBLAS_OP_T && ta != CUBLAS_OP_C) ||
      (tb != CUBLAS_OP_N && tb != CUBLAS_OP_T && tb != CUBLAS_OP_C) || m < 0 || n < 0 || k < 0 ||
      lda < std::max(1, a_t ? k : m) || ldb < std::max(1, b_t ? n : k) || ldc < std::max(1, m))
    return CUBLAS_STATUS_INVALID_VALUE;
  if (m == 0 || n == 0) return CUBLAS_STATUS_SUCCESS;
  // Every element the call reads or writes must be device memory (a GPU would fault).
  auto extent = [](int rows, int cols, int ld) { return (size_t(cols) - 1) * size_t(ld) + size_t(rows); };
  if (k > 0 && alpha != 0.0f) {
    emu::detail::check_device_range("cublasGemmEx A", A, extent(a_t ? k : m, a_t ? m : k, lda) * sizeof(T));
    emu::detail::check_device_range("cublasGemmEx B", B, extent(b_t ? n : k, b_t ? k : n, ldb) * sizeof(T));
  }
  emu::detail::check_device_range("cublasGemmEx C", C, extent(m, n, ldc) * sizeof(float));
  // op(A)[i, l] = A[i * ai + l * al], op(B)[l, j] = B[l * bl + j * bj].
  const size_t ai = a_t ? size_t(lda) : 1, al = a_t ? 1 : size_t(lda);
  const size_t bl = b_t ? size_t(ldb) : 1, bj = b_t ? 1 : size_t(ldb);
  for (int j = 0; j < n; ++j) {
    for (int i = 0; i < m; ++i) {
      float acc = 0.0f;
      if (alpha != 0.0f) {
        const T* a = A + i * ai;
        const T* b = B + j * bj;
        for (int l = 0; l < k; ++l) acc += operand(a[l * al]) * operand(b[l * bl]);
      }
      float& c = C[i + size_t(j) * ldc];
      c = beta == 0.0f ? alpha * acc : alpha * acc + beta * c;  // beta == 0: C is not read
    }
  }
  return CUBLAS_STATUS_SUCCESS;
}

}  // namespace

cublasStatus_t cublasGemmEx(cublasHandle_t handle, cublasOperation_t transa, cublasOperation_t transb, int m,
                            int n, int k, const void* alpha, const void* A, cudaDataType_t Atype, int lda,
                            const void* B, cudaDataType_t Btype, int ldb, const void* beta, void* C,
                            cudaDataType_t Ctype, int ldc, cublasComputeType_t computeType,
                            cublasGemmAlgo_t algo) {
  // Only what the backend uses: fp32 or bf16 operands, fp32 output and compute.
  if (Atype != Btype || (Atype != CUDA_R_32F && Atype != CUDA_R_16BF) || Ctype != CUDA_R_32F ||
      (computeType != CUBLAS_COMPUTE_32F && computeType != CUBLAS_COMPUTE_32F_PEDANTIC))
    return CUBLAS_STATUS_NOT_SUPPORTED;
  if (!alpha || !beta) return CUBLAS_STATUS_INVALID_VALUE;
  const float al = *static_cast<const float*>(alpha), be = *static_cast<const float*>(beta);
  if (Atype == CUDA_R_16BF)
    return gemm_f32(handle, transa, transb, m, n, k, al, static_cast<const uint16_t*>(A), lda,
                    static_cast<const uint16_t*>(B), ldb, be, static_cast<float*>(C), ldc);
  return gemm_f32(handle, transa, transb, m, n, k, al, static_cast<const float*>(A), lda,
                  static_cast<const float*>(B), ldb, be, static_cast<float*>(C), ldc);
}

cublasStatus_t cublasSgemm(cublasHandle_t handle, cublasOperation_t transa, cublasOperation_t transb, int m,
                           int n, int k, const float* alpha, const float* A, int lda, const float* B, int ldb,
                           const float* beta, float* C, int ldc) {
  if (!alpha || !beta) return CUBLAS_STATUS_INVALID_VALUE;
  return gemm_f32(handle, transa, transb, m, n, k, *alpha, A, lda, B, ldb, *beta, C, ldc);
}
