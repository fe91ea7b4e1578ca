// A persistent pool of worker threads; parallel_for splits [0, n) into contiguous ranges,
// one per thread, and returns when all are done. Created once per model, never per op.
#pragma once

#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

namespace gemma3 {

class ThreadPool {
 public:
  explicit ThreadPool(int n_threads);  // n_threads <= 0: hardware concurrency
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  int size() const { return n_threads_; }
  // Empty when every worker started; else why one could not (the pool then runs everything on
  // the calling thread: its owner reports the error instead of using it).
  const std::string& start_error() const { return start_error_; }
  // fn(begin, end, thread_index) over disjoint ranges covering [0, n). Ranges are aligned to
  // `grain` elements (except the last). Runs inline when n is small or the pool has one thread.
  void parallel_for(int64_t n, const std::function<void(int64_t, int64_t, int)>& fn, int64_t grain = 1);

 private:
  void worker(int index);
  void shutdown();  // stops and joins the workers

  int n_threads_;
  std::vector<std::thread> threads_;
  std::mutex mu_;
  std::condition_variable cv_start_, cv_done_;
  const std::function<void(int64_t, int64_t, int)>* job_ = nullptr;
  int64_t job_n_ = 0, job_grain_ = 1;
  uint64_t generation_ = 0;
  int pending_ = 0;
  bool stop_ = false;
  std::string start_error_;
};

}  // namespace gemma3
