// A persistent worker pool for the fast CPU backend. Ops are tiny in decode (tens of
// microseconds), so a condition-variable hand-off per op would cost as much as the op:
// workers spin on a generation counter for a while before they sleep (C++20 atomic wait), and
// tasks are claimed one at a time from an atomic counter so a core that another process
// slows down simply takes fewer of them. The caller returns as soon as every task is done: it
// never waits for a worker that has not woken up yet (the machine may be oversubscribed).
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

namespace gemma3::cpu {

class CpuPool {
 public:
  explicit CpuPool(int n_threads);  // <= 0: hardware concurrency
  ~CpuPool();
  CpuPool(const CpuPool&) = delete;
  CpuPool& operator=(const CpuPool&) = delete;

  int size() const { return n_threads_; }
  // Empty when every worker started; else why one could not (the pool then runs no workers:
  // its owner reports the error instead of using it).
  const std::string& start_error() const { return start_error_; }

  // Calls fn(task, thread) for every task in [0, n_tasks), on all threads (the caller is
  // thread 0); returns when all are done. fn must be safe to call concurrently.
  template <typename F>
  void run(int64_t n_tasks, F&& fn) {
    if (n_tasks <= 0) return;
    if (n_threads_ == 1 || n_tasks == 1) {
      for (int64_t i = 0; i < n_tasks; ++i) fn(i, 0);
      return;
    }
    using Fn = std::remove_reference_t<F>;
    dispatch(
        n_tasks, [](void* ctx, int64_t task, int thread) { (*static_cast<Fn*>(ctx))(task, thread); },
        const_cast<void*>(static_cast<const void*>(&fn)));
  }

  // fn(begin, end, thread) over contiguous ranges of `grain` items (the last may be shorter).
  template <typename F>
  void run_ranges(int64_t n, int64_t grain, F&& fn) {
    if (grain < 1) grain = 1;
    const int64_t tasks = (n + grain - 1) / grain;
    run(tasks, [&](int64_t t, int thread) { fn(t * grain, std::min(n, (t + 1) * grain), thread); });
  }

 private:
  using TaskFn = void (*)(void* ctx, int64_t task, int thread);
  void dispatch(int64_t n_tasks, TaskFn fn, void* ctx);
  // Claims and runs tasks of job `gen` until none is left or a newer job started.
  void work(uint32_t gen, int thread);
  void worker_main(int thread);
  void shutdown();  // stops and joins the workers

  // A job lives in slot gen % 2: a worker that wakes late validates every claim against the
  // generation in state_, so it never runs a task of a job it did not read.
  struct Job {
    std::atomic<TaskFn> fn{nullptr};
    std::atomic<void*> ctx{nullptr};
    std::atomic<int64_t> n_tasks{0};
  };

  int n_threads_;
  std::vector<std::thread> threads_;
  Job jobs_[2];
  // (generation << 32) | next unclaimed task of the current job.
  alignas(64) std::atomic<uint64_t> state_{0};
  alignas(64) std::atomic<int64_t> done_{0};   // tasks of the current job finished
  alignas(64) std::atomic<uint32_t> wake_{0};  // bumped per job; sleepers wait on it
  std::atomic<bool> stop_{false};
  std::string start_error_;
};

}  // namespace gemma3::cpu
