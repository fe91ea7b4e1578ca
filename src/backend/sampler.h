// Token sampling over one row of logits. Order as in HF generate: repetition penalty,
// temperature, top-k, top-p, min-p, then a draw; temperature 0 means greedy (argmax after the
// penalty). Ids >= n_allowed and the banned ids are never produced.
#pragma once

#include <cstdint>
#include <random>
#include <vector>

#include "gemma3/gemma3.h"

namespace gemma3 {

class Sampler {
 public:
  Sampler(const SamplingOptions& options, int n_allowed, std::vector<int32_t> banned);
  // history: tokens already in the context (the last repeat_last_n are penalized).
  int32_t sample(const float* logits, const std::vector<int32_t>& history);

 private:
  SamplingOptions opt_;
  int n_allowed_;
  std::vector<int32_t> banned_;
  std::mt19937_64 rng_;
  std::vector<std::pair<float, int32_t>> cand_;  // (logit or probability, id)
};

}  // namespace gemma3
