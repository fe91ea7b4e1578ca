#include "core/thread_pool.h"

#include <algorithm>
#include <system_error>

namespace gemma3 {

ThreadPool::ThreadPool(int n_threads) {
  if (n_threads <= 0) n_threads = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  n_threads_ = n_threads;
  // std::thread throws when the system refuses a thread: stop the ones started, run inline,
  // and leave the reason for the owner.
  try {
    for (int i = 1; i < n_threads_; ++i) threads_.emplace_back([this, i] { worker(i); });
  } catch (const std::system_error& e) {
    start_error_ = "cannot start worker thread " + std::to_string(threads_.size() + 1) + " of " +
                   std::to_string(n_threads_) + ": " + e.what();
    shutdown();
    n_threads_ = 1;
  }
}

void ThreadPool::shutdown() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
  }
  cv_start_.notify_all();
  for (auto& t : threads_) t.join();
  threads_.clear();
}

ThreadPool::~ThreadPool() { shutdown(); }

static void run_range(const std::function<void(int64_t, int64_t, int)>& fn, int64_t n, int64_t grain,
                      int parts, int index) {
  int64_t blocks = (n + grain - 1) / grain;
  int64_t b0 = blocks * index / parts, b1 = blocks * (index + 1) / parts;
  int64_t begin = std::min(n, b0 * grain), end = std::min(n, b1 * grain);
  if (begin < end) fn(begin, end, index);
}

void ThreadPool::parallel_for(int64_t n, const std::function<void(int64_t, int64_t, int)>& fn,
                              int64_t grain) {
  if (n <= 0) return;
  grain = std::max<int64_t>(1, grain);
  if (n_threads_ == 1 || n <= grain) {
    fn(0, n, 0);
    return;
  }
  {
    std::lock_guard<std::mutex> lock(mu_);
    job_ = &fn;
    job_n_ = n;
    job_grain_ = grain;
    pending_ = n_threads_ - 1;
    ++generation_;
  }
  cv_start_.notify_all();
  run_range(fn, n, grain, n_threads_, 0);
  std::unique_lock<std::mutex> lock(mu_);
  cv_done_.wait(lock, [this] { return pending_ == 0; });
  job_ = nullptr;
}

void ThreadPool::worker(int index) {
  uint64_t seen = 0;
  for (;;) {
    const std::function<void(int64_t, int64_t, int)>* job;
    int64_t n, grain;
    {
      std::unique_lock<std::mutex> lock(mu_);
      cv_start_.wait(lock, [&] { return stop_ || generation_ != seen; });
      if (stop_) return;
      seen = generation_;
      job = job_;
      n = job_n_;
      grain = job_grain_;
    }
    run_range(*job, n, grain, n_threads_, index);
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (--pending_ == 0) cv_done_.notify_one();
    }
  }
}

}  // namespace gemma3
