// Unit checks of the CPU reference ops against formulas written out here, and of the ring
// cache: attention through a small ring equals attention through a full-length cache.
#include <gtest/gtest.h>

#include <cmath>
#include <random>

#include "backend/backend.h"
#include "core/quant.h"
#include "test_util.h"

namespace gemma3 {
namespace {

std::unique_ptr<Backend> cpu(int threads = 2) { return std::move(make_cpu_backend({threads}).value()); }

TensorView f32_view(const std::vector<float>& v, std::vector<int64_t> shape) {
  return TensorView{"w", DType::kF32, std::move(shape), v.data(), v.size() * 4, {}};
}

using testutil::randn;

TEST(CpuOps, RmsNormMultipliesByStoredWeight) {
  auto be = cpu();
  std::vector<float> w = {1.0f, 2.0f, 0.5f, 1.5f};  // already (1 + w_hf)
  auto bw = be->upload(f32_view(w, {4})).value();
  std::vector<float> x = {1, -2, 3, -4}, out(4);
  be->rmsnorm(x.data(), *bw, 1, 4, 1e-6f, out.data());
  const float r = 1.0f / std::sqrt((1 + 4 + 9 + 16) / 4.0f + 1e-6f);
  for (int i = 0; i < 4; ++i) EXPECT_FLOAT_EQ(out[i], x[i] * r * w[i]);
}

TEST(CpuOps, MatmulIsXTimesWTransposed) {
  auto be = cpu();
  const int n = 3, k = 37, m = 5;  // awkward sizes
  auto w = randn(m * k, 1), x = randn(n * k, 2);
  auto bw = be->upload(f32_view(w, {m, k})).value();
  std::vector<float> out(n * m);
  be->matmul(x.data(), n, *bw, out.data());
  for (int t = 0; t < n; ++t)
    for (int o = 0; o < m; ++o) {
      double ref = 0;
      for (int i = 0; i < k; ++i) ref += double(x[t * k + i]) * w[o * k + i];
      EXPECT_NEAR(out[t * m + o], ref, 1e-4);
    }
}

TEST(CpuOps, RopeRotatesHalvesByPositionTimesFrequency) {
  auto be = cpu();
  const int hd = 8, heads = 2, n = 3, pos0 = 5;
  auto x = randn(n * heads * hd, 3), y = x;
  be->rope(y.data(), n, heads, hd, pos0, 10000.0f, 8.0f);
  for (int t = 0; t < n; ++t)
    for (int h = 0; h < heads; ++h)
      for (int i = 0; i < hd / 2; ++i) {
        const double ang = (pos0 + t) * std::pow(10000.0, -2.0 * i / hd) / 8.0;
        const float* a = &x[(t * heads + h) * hd];
        const float* b = &y[(t * heads + h) * hd];
        EXPECT_NEAR(b[i], a[i] * std::cos(ang) - a[i + hd / 2] * std::sin(ang), 1e-5);
        EXPECT_NEAR(b[i + hd / 2], a[i + hd / 2] * std::cos(ang) + a[i] * std::sin(ang), 1e-5);
      }
}

TEST(CpuOps, GeluGateUsesTanhApproximationOnTheGate) {
  auto be = cpu();
  std::vector<float> g = {-3.0f, -0.5f, 0.0f, 0.7f, 2.5f}, u = {1.0f, 2.0f, 3.0f, -1.0f, 0.5f}, out(5);
  be->gelu_gate(g.data(), u.data(), 5, out.data());
  for (int i = 0; i < 5; ++i) {
    const double x = g[i];
    const double ref = 0.5 * x * (1 + std::tanh(std::sqrt(2 / M_PI) * (x + 0.044715 * x * x * x))) * u[i];
    EXPECT_NEAR(out[i], ref, 1e-6);
  }
}

// Naive attention over explicit K/V arrays for all positions [0, P).
std::vector<float> naive_attention(const std::vector<float>& q, const std::vector<float>& k,
                                   const std::vector<float>& v, const AttentionParams& p) {
  const int hd = p.head_dim, group = p.n_heads / p.n_kv_heads;
  std::vector<float> out(size_t(p.n_tokens) * p.n_heads * hd);
  for (int t = 0; t < p.n_tokens; ++t)
    for (int h = 0; h < p.n_heads; ++h) {
      const int i = p.pos0 + t, g = h / group;
      std::vector<double> s;
      std::vector<int> js;
      for (int j = 0; j <= i; ++j) {
        if (p.window > 0 && !(j > i - p.window)) continue;
        double d = 0;
        for (int e = 0; e < hd; ++e)
          d += double(q[(t * p.n_heads + h) * hd + e]) * k[(j * p.n_kv_heads + g) * hd + e];
        s.push_back(d * p.scale);
        js.push_back(j);
      }
      double mx = *std::max_element(s.begin(), s.end()), sum = 0;
      for (double& x : s) sum += (x = std::exp(x - mx));
      for (int e = 0; e < hd; ++e) {
        double acc = 0;
        for (size_t a = 0; a < js.size(); ++a) acc += s[a] / sum * v[(js[a] * p.n_kv_heads + g) * hd + e];
        out[(t * p.n_heads + h) * hd + e] = float(acc);
      }
    }
  return out;
}

// Feeds `total` positions in chunks of `chunk` through kv_write + attention with a cache of
// `capacity` slots and compares every chunk's output with the naive computation.
void check_attention(int window, int capacity, int chunk, DType kv_dtype, double tol) {
  auto be = cpu();
  const int total = 29, heads = 4, kv_heads = 2, hd = 16, kvw = kv_heads * hd, qw = heads * hd;
  auto q = randn(size_t(total) * qw, 10), k = randn(size_t(total) * kvw, 11),
       v = randn(size_t(total) * kvw, 12);
  if (kv_dtype == DType::kBF16) {  // the naive side sees what the cache stores
    for (float& x : k) x = round_bf16(x);
    for (float& x : v) x = round_bf16(x);
  }
  const size_t elem = kv_dtype == DType::kF32 ? 4 : 2;
  KvLayer cache{be->allocate(size_t(capacity) * kvw * elem).value(),
                be->allocate(size_t(capacity) * kvw * elem).value(), capacity, kv_dtype};
  for (int p0 = 0; p0 < total; p0 += chunk) {
    const int n = std::min(chunk, total - p0);
    be->kv_write(&k[size_t(p0) * kvw], &v[size_t(p0) * kvw], n, p0, kvw, cache);
    AttentionParams p{n, p0, heads, kv_heads, hd, 0.3f, window, 0};
    std::vector<float> out(size_t(n) * qw);
    be->attention(&q[size_t(p0) * qw], cache, p, out.data());
    std::vector<float> qs(q.begin() + size_t(p0) * qw, q.begin() + size_t(p0 + n) * qw);
    auto ref = naive_attention(qs, k, v, p);
    for (size_t i = 0; i < out.size(); ++i)
      ASSERT_NEAR(out[i], ref[i], tol) << "chunk at " << p0 << " element " << i;
  }
  be->release(cache.k);
  be->release(cache.v);
}

TEST(CpuOps, GlobalAttentionIsCausal) { check_attention(0, 29, 5, DType::kF32, 1e-5); }
TEST(CpuOps, SlidingWindowSeesExactlyWKeys) { check_attention(6, 29, 5, DType::kF32, 1e-5); }
// A ring of W + chunk - 1 slots wraps several times over 29 positions and still gives the
// same answer: window 6, chunk 1 (decode: ring of exactly W), chunk 4 (ring of 9), chunk 6.
TEST(CpuOps, SlidingWindowThroughARingOfWPlusChunkMinusOne) {
  check_attention(6, 6, 1, DType::kF32, 1e-5);
  check_attention(6, 9, 4, DType::kF32, 1e-5);
  check_attention(6, 11, 6, DType::kF32, 1e-5);
}
TEST(CpuOps, Bf16CacheStoresRoundedValues) { check_attention(6, 9, 4, DType::kBF16, 1e-5); }

}  // namespace
}  // namespace gemma3
