// A one-line progress bar on stderr for long loads ("loading  42% [=====>    ] 1.2/2.9 GB").
// Draws only when enabled and stderr is a terminal, at most once per percent.
#pragma once

#include <cstdint>
#include <string>

namespace gemma3 {

class ProgressBar {
 public:
  ProgressBar(std::string label, uint64_t total, bool enabled);
  ~ProgressBar();  // finishes the line
  void update(uint64_t done);

 private:
  std::string label_;
  uint64_t total_;
  bool enabled_;
  int last_percent_ = -1;
};

}  // namespace gemma3
