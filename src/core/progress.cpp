#include "core/progress.h"

#include <unistd.h>

#include <cstdio>

namespace gemma3 {

ProgressBar::ProgressBar(std::string label, uint64_t total, bool enabled)
    : label_(std::move(label)), total_(total), enabled_(enabled && total > 0 && isatty(STDERR_FILENO)) {}

ProgressBar::~ProgressBar() {
  if (enabled_ && last_percent_ >= 0) {
    update(total_);
    std::fputc('\n', stderr);
  }
}

void ProgressBar::update(uint64_t done) {
  if (!enabled_) return;
  const int percent = static_cast<int>(done >= total_ ? 100 : done * 100 / total_);
  if (percent == last_percent_) return;
  last_percent_ = percent;
  constexpr int kWidth = 30;
  const int fill = percent * kWidth / 100;
  std::fprintf(stderr, "\r%s %3d%% [", label_.c_str(), percent);
  for (int i = 0; i < kWidth; ++i) std::fputc(i < fill ? '=' : (i == fill ? '>' : ' '), stderr);
  std::fprintf(stderr, "] %.2f/%.2f GB", done / 1e9, total_ / 1e9);
  std::fflush(stderr);
}

}  // namespace gemma3
