#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <map>

#include "backend/sampler.h"

namespace gemma3 {
namespace {

TEST(Sampler, GreedyPicksArgmaxAndSkipsBannedAndOutOfRange) {
  SamplingOptions o;  // temperature 0: greedy
  std::vector<float> logits = {0.1f, 3.0f, 2.0f, 9.0f, 8.0f};
  // id 4 is outside n_allowed = 4, id 3 is banned: the best remaining is id 1.
  Sampler s(o, 4, {3});
  EXPECT_EQ(s.sample(logits.data(), {}), 1);
}

TEST(Sampler, RepetitionPenaltyDividesPositiveAndMultipliesNegative) {
  SamplingOptions o;
  o.repeat_penalty = 2.0f;
  std::vector<float> logits = {-1.0f, 3.0f, 2.0f};
  Sampler s(o, 3, {});
  // Token 1 was seen: 3/2 = 1.5 < 2, so greedy now picks 2.
  EXPECT_EQ(s.sample(logits.data(), {1}), 2);
  // Negative logits move further down: -1 * 2 = -2 (still the smallest).
  std::vector<float> l2 = {-0.5f, -1.0f, -0.7f};
  Sampler s2(o, 3, {});
  EXPECT_EQ(s2.sample(l2.data(), {0}), 2);  // -0.5*2 = -1.0 < -0.7
}

TEST(Sampler, TopKOneIsGreedyWhateverTheTemperature) {
  SamplingOptions o;
  o.temperature = 5.0f;
  o.top_k = 1;
  o.seed = 7;
  std::vector<float> logits = {1.0f, 1.5f, 0.2f};
  Sampler s(o, 3, {});
  for (int i = 0; i < 20; ++i) EXPECT_EQ(s.sample(logits.data(), {}), 1);
}

TEST(Sampler, TopPAndMinPRemoveTheTail) {
  // probabilities at T=1: softmax(log(0.6), log(0.3), log(0.1)) = 0.6, 0.3, 0.1
  std::vector<float> logits = {std::log(0.6f), std::log(0.3f), std::log(0.1f)};
  SamplingOptions o;
  o.temperature = 1.0f;
  o.top_p = 0.85f;  // keeps 0.6 + 0.3
  for (uint64_t seed = 0; seed < 200; ++seed) {
    o.seed = seed;
    Sampler s(o, 3, {});
    EXPECT_NE(s.sample(logits.data(), {}), 2);
  }
  o.top_p = 1.0f;
  o.min_p = 0.4f;  // keeps p >= 0.24: ids 0 and 1
  for (uint64_t seed = 0; seed < 200; ++seed) {
    o.seed = seed;
    Sampler s(o, 3, {});
    EXPECT_NE(s.sample(logits.data(), {}), 2);
  }
}

TEST(Sampler, SamplingFollowsTheDistributionAndIsSeeded) {
  std::vector<float> logits = {std::log(0.7f), std::log(0.2f), std::log(0.1f)};
  SamplingOptions o;
  o.temperature = 1.0f;
  o.seed = 42;
  Sampler s(o, 3, {});
  std::map<int, int> counts;
  const int n = 20000;
  std::vector<int> first;
  for (int i = 0; i < n; ++i) {
    int id = s.sample(logits.data(), {});
    ++counts[id];
    if (i < 10) first.push_back(id);
  }
  EXPECT_NEAR(counts[0] / double(n), 0.7, 0.02);
  EXPECT_NEAR(counts[1] / double(n), 0.2, 0.02);
  EXPECT_NEAR(counts[2] / double(n), 0.1, 0.02);
  Sampler again(o, 3, {});
  for (int i = 0; i < 10; ++i) EXPECT_EQ(again.sample(logits.data(), {}), first[i]);
}

// Issue #12.4: T = 1e-38 divided logits by T before subtracting the maximum, overflowed to inf,
// and inf - inf = NaN drew noise. A tiny temperature must tend to greedy.
TEST(Sampler, TinyTemperatureIsGreedy) {
  std::vector<float> logits = {1.0f, 7.5f, 7.25f, -3.0f, 0.0f};
  for (float t : {1e-38f, 1e-30f, 1e-10f, std::numeric_limits<float>::denorm_min()}) {
    for (uint64_t seed = 0; seed < 50; ++seed) {
      SamplingOptions o;
      o.temperature = t;
      o.seed = seed;
      Sampler s(o, 5, {});
      ASSERT_EQ(s.sample(logits.data(), {}), 1) << "temperature " << t << " seed " << seed;
    }
  }
}

// NaN counts as -inf on every path: never chosen, never poisons the softmax.
TEST(Sampler, NanLogitsAreMinusInfinityOnEveryPath) {
  const float nan = std::numeric_limits<float>::quiet_NaN();
  std::vector<float> logits = {nan, 2.0f, nan, 1.0f, nan};
  for (int mode = 0; mode < 4; ++mode) {
    for (uint64_t seed = 0; seed < 100; ++seed) {
      SamplingOptions o;
      o.seed = seed;
      if (mode >= 1) o.temperature = 1.0f;
      if (mode == 2) o.top_k = 3;
      if (mode == 3) o.top_p = 0.9f, o.min_p = 0.05f, o.repeat_penalty = 1.3f;
      Sampler s(o, 5, {});
      const int32_t id = s.sample(logits.data(), {0, 2});
      ASSERT_TRUE(id == 1 || id == 3) << "mode " << mode << " seed " << seed << " picked " << id;
    }
  }
  // A NaN first in the row must not win greedy (std::max_element compares false with NaN).
  std::vector<float> first_nan = {nan, -1.0f, 0.5f};
  SamplingOptions greedy;
  Sampler g(greedy, 3, {});
  EXPECT_EQ(g.sample(first_nan.data(), {}), 2);
}

// The same seed gives the same draw on rows with NaN and inf (deterministic output), and +inf
// logits share the probability among themselves.
TEST(Sampler, NonFiniteRowsAreDeterministic) {
  const float nan = std::numeric_limits<float>::quiet_NaN();
  const float inf = std::numeric_limits<float>::infinity();
  std::vector<float> logits = {inf, nan, -inf, 3.0f, inf, nan};
  std::map<int32_t, int> seen;
  for (uint64_t seed = 0; seed < 200; ++seed) {
    SamplingOptions o;
    o.temperature = 0.8f;
    o.seed = seed;
    Sampler a(o, 6, {}), b(o, 6, {});
    const int32_t id = a.sample(logits.data(), {});
    ASSERT_EQ(id, b.sample(logits.data(), {}));
    ++seen[id];
  }
  EXPECT_EQ(seen.size(), 2u);
  EXPECT_GT(seen[0], 50);
  EXPECT_GT(seen[4], 50);
  // Nothing drawable (all NaN or banned): a defined id, on both paths.
  std::vector<float> none = {nan, nan};
  for (float t : {0.0f, 1.0f}) {
    SamplingOptions o;
    o.temperature = t;
    Sampler s(o, 2, {});
    EXPECT_EQ(s.sample(none.data(), {}), 0);
  }
}

}  // namespace
}  // namespace gemma3
