// The CUDA vision-tower ops (kernels/vision.cu) and the whole tower + projector against the CPU
// reference backend, on random inputs at awkward shapes, then the tiny-vision goldens' image
// through VisionEncoder on both backends. Skips, saying why, without CUDA or a device.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <deque>
#include <random>

#include "backend/backend.h"
#include "backend/cpu/cpu_backend.h"
#include "bf16_gemm_reference.h"
#include "checkpoint/weights.h"
#include "model/vision.h"

namespace gemma3 {
namespace {

std::vector<float> randn(size_t n, uint32_t seed, float mean = 0.0f, float scale = 1.0f) {
  std::mt19937 g(seed);
  std::normal_distribution<float> d(mean, scale);
  std::vector<float> v(n);
  for (float& x : v) x = d(g);
  return v;
}

float max_rel(const std::vector<float>& a, const std::vector<float>& b) {
  float m = 0, s = 1e-6f;
  for (size_t i = 0; i < a.size(); ++i) {
    m = std::max(m, std::fabs(a[i] - b[i]));
    s = std::max(s, std::fabs(b[i]));
  }
  return m / s;
}

class CudaVisionOps : public ::testing::Test {
 protected:
  void SetUp() override {
    auto g = make_cuda_backend({});
    if (!g.ok()) GTEST_SKIP() << "no CUDA backend here: " << g.status().to_string();
    gpu_ = std::move(g).value();
    auto c = make_cpu_ref_backend(2);
    ASSERT_TRUE(c.ok());
    cpu_ = std::move(c).value();
  }
  // A buffer on the device holding `v`.
  float* dev(const std::vector<float>& v) {
    auto p = gpu_->allocate(std::max<size_t>(v.size(), 1) * 4);
    EXPECT_TRUE(p.ok());
    gpu_->from_host(v.data(), *p, v.size() * 4);
    owned_.push_back(*p);
    return static_cast<float*>(*p);
  }
  std::vector<float> host(const float* d, size_t n) {
    std::vector<float> v(n);
    gpu_->to_host(d, v.data(), n * 4);
    EXPECT_TRUE(gpu_->status().ok()) << gpu_->status().to_string();
    return v;
  }
  void TearDown() override {
    for (void* p : owned_) gpu_->release(p);
  }
  // A [n] fp32 vector weight on both backends (data kept alive by the fixture).
  std::pair<std::unique_ptr<BackendWeight>, std::unique_ptr<BackendWeight>> vec(const std::vector<float>& v) {
    auto& keep = kept_.emplace_back(v);
    TensorView t{"vec", DType::kF32, {static_cast<int64_t>(v.size())}, keep.data(), keep.size() * 4, {}};
    return {std::move(cpu_->upload(t)).value(), std::move(gpu_->upload(t)).value()};
  }

  std::unique_ptr<Backend> gpu_, cpu_;
  std::vector<void*> owned_;
  std::deque<std::vector<float>> kept_;
};

TEST_F(CudaVisionOps, LayerNormAddBiasGeluAvgPool) {
  for (int dim : {1, 31, 48, 1152}) {
    const int64_t rows = 37;
    SCOPED_TRACE(dim);
    const auto x = randn(rows * dim, dim, 0.5f, 2.0f);
    auto [wc, wg] = vec(randn(dim, 2, 1.0f, 0.3f));
    auto [bc, bg] = vec(randn(dim, 3, 0.0f, 0.3f));
    std::vector<float> ref(x.size());
    cpu_->layernorm(x.data(), *wc, *bc, rows, dim, 1e-6f, ref.data());
    float* d = dev(x);
    gpu_->layernorm(d, *wg, *bg, rows, dim, 1e-6f, d);  // in place
    // Different summation order for mean and variance: a few fp32 ulps of the normalized value.
    EXPECT_LE(max_rel(host(d, x.size()), ref), 1e-5f);

    // The fused residual step (x += a, then the LayerNorm; out aliasing a, as the tower calls
    // it) against the CPU's unfused default: x exactly (one fp32 add), out as above.
    {
      const auto a = randn(rows * dim, dim + 7, 0.0f, 1.0f);
      std::vector<float> x_ref = x, out_ref(x.size()), a_ref = a;
      cpu_->add_layernorm(a_ref.data(), x_ref.data(), *wc, *bc, rows, dim, 1e-6f, out_ref.data());
      float* xd = dev(x);
      float* ad = dev(a);
      gpu_->add_layernorm(ad, xd, *wg, *bg, rows, dim, 1e-6f, ad);
      EXPECT_EQ(host(xd, x.size()), x_ref);
      EXPECT_LE(max_rel(host(ad, x.size()), out_ref), 1e-5f);
    }

    cpu_->add_bias(x.data(), *bc, rows, ref.data());
    float* e = dev(x);
    gpu_->add_bias(e, *bg, rows, e);
    EXPECT_EQ(host(e, x.size()), ref);  // one rounding, same on both
  }
  const auto g = randn(10007, 5, 0.0f, 3.0f);
  std::vector<float> ref(g.size());
  cpu_->gelu(g.data(), static_cast<int64_t>(g.size()), ref.data());
  float* d = dev(g);
  gpu_->gelu(d, static_cast<int64_t>(g.size()), d);
  EXPECT_LE(max_rel(host(d, g.size()), ref), 1e-6f);  // tanhf vs std::tanh: 1-2 ulps

  for (auto [side, k] : {std::pair{8, 2}, {64, 4}, {6, 3}, {5, 1}}) {
    const int dim = 19;
    const auto x = randn(static_cast<size_t>(side) * side * dim, side);
    std::vector<float> want(static_cast<size_t>(side / k) * (side / k) * dim);
    cpu_->avg_pool(x.data(), side, dim, k, want.data());
    float* dx = dev(x);
    float* dout = dev(std::vector<float>(want.size()));
    gpu_->avg_pool(dx, side, dim, k, dout);
    EXPECT_EQ(host(dout, want.size()), want) << side << " / " << k;  // same order of the same adds
  }
}

// The tiny-vision tower + projector end to end (matmul via cuBLAS for the 64 patches,
// attention with the all-patches bidirectional group) on the GPU vs the CPU reference.
TEST_F(CudaVisionOps, TinyVisionEncoderMatchesCpu) {
  // GEMMA3_SOURCE_DIR in the environment: the GPU machine runs this binary from a copy of the tree.
  const char* root = std::getenv("GEMMA3_SOURCE_DIR");
  const std::string dir = std::string(root && *root ? root : GEMMA3_SOURCE_DIR) + "/tests/data/tiny-vision";
  auto ckpt = Checkpoint::open(dir);
  if (!ckpt.ok()) GTEST_SKIP() << "no tiny-vision fixture: " << ckpt.status().to_string();
  const VisionWeights& vw = *(*ckpt)->vision();
  // The reference multiplies what the GPU multiplies: bf16 operands in the patch GEMMs.
  testutil::Bf16GemmReference ref(*cpu_);
  auto ce = VisionEncoder::create(ref, vw);
  // The GPU's attention here is the fp32 kernel (GEMMA3_CUDA_FLASH=0): the same arithmetic as
  // the reference but summation order. Then the default, tensor-core attention (bf16 q, K, V and
  // P; its per-op bound is CudaOps.AttentionMatchesCpu's) against it: measured 2.7e-3 of the
  // largest value through the tiny tower; 3e-2 as CudaOps.TinyModelMatchesCpu allows.
  setenv("GEMMA3_CUDA_FLASH", "0", 1);
  auto fp32 = make_cuda_backend({});
  unsetenv("GEMMA3_CUDA_FLASH");
  ASSERT_TRUE(fp32.ok()) << fp32.status().to_string();
  auto ge = VisionEncoder::create(**fp32, vw);
  auto fe = VisionEncoder::create(*gpu_, vw);
  ASSERT_TRUE(ce.ok() && ge.ok() && fe.ok());
  const int S = (*ce)->image_size();
  const auto pixels = randn(3 * S * S, 11, 0.0f, 0.5f);
  const size_t n = static_cast<size_t>((*ce)->tokens_per_image()) * (*ce)->text_hidden();
  std::vector<float> want(n), got(n), flash(n);
  ASSERT_TRUE((*ce)->encode(pixels.data(), want.data()).ok());
  Status s = (*ge)->encode(pixels.data(), got.data());
  ASSERT_TRUE(s.ok()) << s.to_string();
  EXPECT_LE(max_rel(got, want), 1e-4f);
  s = (*fe)->encode(pixels.data(), flash.data());
  ASSERT_TRUE(s.ok()) << s.to_string();
  EXPECT_LE(max_rel(flash, got), 3e-2f);
  EXPECT_GT(max_rel(flash, got), 0.0f) << "the tensor-core attention did not run";
}

}  // namespace
}  // namespace gemma3
