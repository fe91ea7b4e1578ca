#include "backend/sampler.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <unordered_set>

namespace gemma3 {

Sampler::Sampler(const SamplingOptions& options, int n_allowed, std::vector<int32_t> banned)
    : opt_(options), n_allowed_(n_allowed), banned_(std::move(banned)), rng_(options.seed) {}

int32_t Sampler::sample(const float* logits, const std::vector<int32_t>& history) {
  const float kNegInf = -std::numeric_limits<float>::infinity();
  const float kInf = std::numeric_limits<float>::infinity();
  // NaN never wins and never poisons the softmax: it counts as -inf on every path.
  std::vector<float> z(logits, logits + n_allowed_);
  for (float& v : z)
    if (std::isnan(v)) v = kNegInf;
  for (int32_t id : banned_)
    if (id >= 0 && id < n_allowed_) z[id] = kNegInf;

  // Repetition penalty (CTRL / llama.cpp): divide positive logits, multiply negative ones.
  if (opt_.repeat_penalty != 1.0f && opt_.repeat_last_n != 0) {
    const size_t n = opt_.repeat_last_n < 0
                         ? history.size()
                         : std::min(history.size(), static_cast<size_t>(opt_.repeat_last_n));
    std::unordered_set<int32_t> seen(history.end() - n, history.end());
    for (int32_t id : seen)
      if (id >= 0 && id < n_allowed_ && z[id] != kNegInf)
        z[id] = z[id] > 0 ? z[id] / opt_.repeat_penalty : z[id] * opt_.repeat_penalty;
  }

  if (!(opt_.temperature > 0.0f))
    return static_cast<int32_t>(std::max_element(z.begin(), z.end()) - z.begin());

  // Scaled logits (z - max) / T, formed in double in that order: dividing first overflows for a
  // tiny T (z / 1e-38 is inf, and inf - inf is NaN), subtracting first gives 0 for the maximum
  // and a finite or -inf value for the rest, so T -> 0 tends to greedy. +inf logits (an
  // overflowed model) share the probability among themselves.
  const float mx = *std::max_element(z.begin(), z.end());
  if (mx == kNegInf) return 0;  // every id banned or NaN: nothing to draw from
  cand_.clear();
  for (int32_t i = 0; i < n_allowed_; ++i) {
    if (z[i] == kNegInf) continue;
    if (mx == kInf) {
      if (z[i] == kInf) cand_.emplace_back(0.0f, i);
      continue;
    }
    // Below -FLT_MAX (a tiny T) the key is -FLT_MAX: still a candidate, of probability 0, and
    // the conversion to float stays defined (the CUDA sampler does the same).
    const double key = (static_cast<double>(z[i]) - mx) / opt_.temperature;
    cand_.emplace_back(
        static_cast<float>(std::max(key, -static_cast<double>(std::numeric_limits<float>::max()))), i);
  }
  auto by_logit = [](const auto& a, const auto& b) {
    return a.first > b.first || (a.first == b.first && a.second < b.second);
  };
  if (opt_.top_k > 0 && static_cast<size_t>(opt_.top_k) < cand_.size()) {
    std::partial_sort(cand_.begin(), cand_.begin() + opt_.top_k, cand_.end(), by_logit);
    cand_.resize(opt_.top_k);
  } else {
    std::sort(cand_.begin(), cand_.end(), by_logit);
  }
  // Softmax in place (cand_ sorted descending, so cand_[0] holds the max, 0).
  const float top = cand_[0].first;
  double sum = 0;
  for (auto& c : cand_) sum += (c.first = static_cast<float>(std::exp(static_cast<double>(c.first) - top)));
  for (auto& c : cand_) c.first = static_cast<float>(c.first / sum);
  if (opt_.top_p < 1.0f) {
    double cum = 0;
    size_t keep = cand_.size();
    for (size_t i = 0; i < cand_.size(); ++i) {
      cum += cand_[i].first;
      if (cum >= opt_.top_p) {
        keep = i + 1;
        break;
      }
    }
    cand_.resize(keep);
  }
  if (opt_.min_p > 0.0f) {
    const float floor = opt_.min_p * cand_[0].first;
    size_t keep = 1;
    while (keep < cand_.size() && cand_[keep].first >= floor) ++keep;
    cand_.resize(keep);
  }
  double total = 0;
  for (const auto& c : cand_) total += c.first;
  double r = std::uniform_real_distribution<double>(0.0, total)(rng_);
  for (const auto& c : cand_) {
    r -= c.first;
    if (r < 0) return c.second;
  }
  return cand_.back().second;
}

}  // namespace gemma3
