#include "backend/cpu/cpu_pool.h"

#include <algorithm>
#include <system_error>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define GEMMA3_CPU_RELAX() _mm_pause()
#else
#define GEMMA3_CPU_RELAX() std::this_thread::yield()
#endif

namespace gemma3::cpu {
namespace {
// Idle workers spin this many rounds (a few hundred microseconds: the gaps between the ops of
// one token), then yield the core for a while, then sleep until the next job.
constexpr int kSpins = 20000;
constexpr int kYields = 200;
constexpr int kWaitSpinsBeforeYield = 2000;
}  // namespace

CpuPool::CpuPool(int n_threads) {
  if (n_threads <= 0) n_threads = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  n_threads_ = n_threads;
  // std::thread throws when the system refuses a thread (EAGAIN at a process or memory limit):
  // stop the ones started and leave the reason for the owner to return as an error.
  try {
    for (int i = 1; i < n_threads_; ++i) threads_.emplace_back([this, i] { worker_main(i); });
  } catch (const std::system_error& e) {
    start_error_ = "cannot start CPU worker thread " + std::to_string(threads_.size() + 1) + " of " +
                   std::to_string(n_threads_) + ": " + e.what();
    shutdown();
    n_threads_ = 1;
  }
}

void CpuPool::shutdown() {
  stop_.store(true, std::memory_order_release);
  wake_.fetch_add(1, std::memory_order_release);
  wake_.notify_all();
  for (auto& t : threads_) t.join();
  threads_.clear();
}

CpuPool::~CpuPool() { shutdown(); }

void CpuPool::work(uint32_t gen, int thread) {
  const Job& job = jobs_[gen & 1];
  for (;;) {
    uint64_t s = state_.load(std::memory_order_acquire);
    if (static_cast<uint32_t>(s >> 32) != gen) return;
    const TaskFn fn = job.fn.load(std::memory_order_relaxed);
    void* ctx = job.ctx.load(std::memory_order_relaxed);
    const int64_t n = job.n_tasks.load(std::memory_order_relaxed);
    const int64_t task = static_cast<int64_t>(s & 0xFFFFFFFFu);
    if (task >= n) return;
    // The claim succeeds only if the job is still `gen`, so fn/ctx/n read above were its own.
    if (!state_.compare_exchange_weak(s, s + 1, std::memory_order_acq_rel)) continue;
    fn(ctx, task, thread);
    done_.fetch_add(1, std::memory_order_acq_rel);
  }
}

void CpuPool::dispatch(int64_t n_tasks, TaskFn fn, void* ctx) {
  const uint32_t gen = static_cast<uint32_t>(state_.load(std::memory_order_relaxed) >> 32) + 1;
  Job& job = jobs_[gen & 1];
  job.fn.store(fn, std::memory_order_relaxed);
  job.ctx.store(ctx, std::memory_order_relaxed);
  job.n_tasks.store(n_tasks, std::memory_order_relaxed);
  done_.store(0, std::memory_order_relaxed);
  state_.store(static_cast<uint64_t>(gen) << 32, std::memory_order_release);
  wake_.fetch_add(1, std::memory_order_release);
  wake_.notify_all();
  work(gen, 0);
  for (int spin = 0; done_.load(std::memory_order_acquire) < n_tasks; ++spin) {
    if (spin < kWaitSpinsBeforeYield) {
      GEMMA3_CPU_RELAX();
    } else {
      std::this_thread::yield();  // a claimed task's thread may need this core
    }
  }
}

void CpuPool::worker_main(int thread) {
  uint32_t seen_wake = 0;
  for (;;) {
    uint32_t w = wake_.load(std::memory_order_acquire);
    for (int i = 0; w == seen_wake && i < kSpins + kYields; ++i) {
      if (i < kSpins) {
        GEMMA3_CPU_RELAX();
      } else {
        std::this_thread::yield();
      }
      w = wake_.load(std::memory_order_acquire);
    }
    if (w == seen_wake) {
      wake_.wait(seen_wake, std::memory_order_acquire);
      continue;
    }
    seen_wake = w;
    if (stop_.load(std::memory_order_acquire)) return;
    work(static_cast<uint32_t>(state_.load(std::memory_order_acquire) >> 32), thread);
  }
}

}  // namespace gemma3::cpu
