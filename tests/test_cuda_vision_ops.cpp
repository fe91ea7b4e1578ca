// The CUDA vision tower + projector (kernels/vision.cu, the tensor-core attention) against the
// CPU reference backend: the tiny-vision goldens' image through VisionEncoder on both backends.
// (The vision ops one by one are Cuda/BackendOps.LayerNormAddBiasGelu and .AvgPool,
// test_backend_ops.cpp.) Skips, saying why, without CUDA or a device.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>

#include "backend/backend.h"
#include "backend/cpu/cpu_backend.h"
#include "backend_test_util.h"
#include "bf16_gemm_reference.h"
#include "checkpoint/weights.h"
#include "model/vision.h"

namespace gemma3 {
namespace {

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
    cpu_ = testutil::cpu_reference_backend();
    ASSERT_NE(cpu_, nullptr);
  }

  std::unique_ptr<Backend> gpu_, cpu_;
};

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
  // P; its per-op bound is Cuda/BackendOps.Attention's) against it: measured 2.7e-3 of the
  // largest value through the tiny tower; 3e-2 as CudaOps.TinyModelMatchesCpu allows.
  setenv("GEMMA3_CUDA_FLASH", "0", 1);
  auto fp32 = make_cuda_backend({});
  unsetenv("GEMMA3_CUDA_FLASH");
  ASSERT_TRUE(fp32.ok()) << fp32.status().to_string();
  auto ge = VisionEncoder::create(**fp32, vw);
  auto fe = VisionEncoder::create(*gpu_, vw);
  ASSERT_TRUE(ce.ok() && ge.ok() && fe.ok());
  const int S = (*ce)->image_size();
  const auto pixels = testutil::randn(3 * S * S, 11, 0.5f);
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
